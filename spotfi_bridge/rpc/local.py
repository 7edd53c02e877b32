"""The ubus objects the dashboard uses, answered in Python where ubus is absent (dry run).

Same names, same result shapes, same failures as ubus: an unknown object is
"Not found" (status 4), an unknown method of a known object "Method not found"
(status 3), file errors follow rpcd's errno mapping. ``file exec`` runs the
command directly (argv, no shell), as rpcd does.
"""

from __future__ import annotations

import base64
import binascii
import errno
import os
import shutil
import stat
from typing import Any, Awaitable, Callable, Optional

from spotfi_bridge.aio import child_environment
from spotfi_bridge.config import RpcConfig
from spotfi_bridge.rpc import sysinfo
from spotfi_bridge.rpc.backend import (
    UBUS_INVALID_ARGUMENT,
    UBUS_METHOD_NOT_FOUND,
    UBUS_NOT_FOUND,
    UBUS_PERMISSION_DENIED,
    UBUS_UNKNOWN_ERROR,
    Call,
    Outcome,
    ServiceAction,
    UbusError,
    timeout_failure,
    ubus_failure,
)
from spotfi_bridge.rpc.child import ArgumentTooLong, run_child
from spotfi_bridge.rpc.ubus import decode_text

Handler = Callable[[Call], Awaitable[Any]]

#: ``log read`` with no or a silly ``lines``: as many as logd keeps by default, about
MAX_LOG_LINES = 10000
MAX_LIST_ENTRIES = 10000
_LOG_PRIORITY = 30  # daemon.info
_OPEN_FLAGS = os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0)


def errno_status(exc: OSError) -> int:
    """rpcd's ``rpc_errno_status``."""
    if exc.errno in (errno.EACCES, errno.EPERM):
        return UBUS_PERMISSION_DENIED
    if exc.errno in (errno.ENOTDIR, errno.EINVAL, errno.EISDIR, errno.ENXIO):
        return UBUS_INVALID_ARGUMENT
    if exc.errno == errno.ENOENT:
        return UBUS_NOT_FOUND
    return UBUS_UNKNOWN_ERROR


def _string(args: dict[str, Any], key: str) -> str:
    value = args.get(key)
    if not isinstance(value, str) or not value or "\x00" in value:
        raise UbusError(UBUS_INVALID_ARGUMENT)
    return value


def _flag(args: dict[str, Any], key: str, default: bool = False) -> bool:
    value = args.get(key, default)
    if not isinstance(value, bool):
        raise UbusError(UBUS_INVALID_ARGUMENT)
    return value


_TYPES = (
    (stat.S_ISREG, "file"), (stat.S_ISDIR, "directory"), (stat.S_ISLNK, "symlink"),
    (stat.S_ISCHR, "char"), (stat.S_ISBLK, "block"), (stat.S_ISFIFO, "fifo"),
    (stat.S_ISSOCK, "socket"),
)


def _stat_entry(st: os.stat_result) -> dict[str, Any]:
    kind = next((name for test, name in _TYPES if test(st.st_mode)), "unknown")
    return {"type": kind, "size": st.st_size, "mode": stat.S_IMODE(st.st_mode),
            "atime": int(st.st_atime), "mtime": int(st.st_mtime), "ctime": int(st.st_ctime),
            "inode": st.st_ino, "uid": st.st_uid, "gid": st.st_gid}


def _open_regular(path: str, flags: int, mode: int = 0o666) -> int:
    """Open without ever blocking (a FIFO or a device would stall the loop); regular files only."""
    fd = os.open(path, flags | _OPEN_FLAGS, mode)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UbusError(UBUS_INVALID_ARGUMENT)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _read_head(path: str, cap: int) -> tuple[bytes, bool]:
    fd = _open_regular(path, os.O_RDONLY)
    try:
        chunks, size = [], 0
        while size <= cap:
            data = os.read(fd, min(1 << 20, cap + 1 - size))
            if not data:
                break
            chunks.append(data)
            size += len(data)
    finally:
        os.close(fd)
    data = b"".join(chunks)
    return data[:cap], len(data) > cap


def _read_tail(path: str, lines: int, cap: int) -> tuple[list[bytes], float]:
    """The last ``lines`` lines (at most ``cap`` bytes of them) and the file's mtime."""
    fd = _open_regular(path, os.O_RDONLY)
    try:
        st = os.fstat(fd)
        end = st.st_size
        data = b""
        while end > 0 and data.count(b"\n") <= lines and len(data) < cap:
            start = max(0, end - 65536)
            data = os.pread(fd, end - start, start) + data
            end = start
    finally:
        os.close(fd)
    parts = data.split(b"\n")
    if parts and parts[-1] == b"":
        parts.pop()
    if end > 0 and parts:
        parts.pop(0)  # a partial first line
    tail = parts[-lines:] if lines else parts
    while tail and sum(len(line) + 1 for line in tail) > cap:
        tail.pop(0)
    return tail, st.st_mtime


class LocalBackend:
    name = "local"

    def __init__(self, config: RpcConfig) -> None:
        self.config = config
        self.objects: dict[str, dict[str, Handler]] = {
            "system": {"info": self._system_info, "board": self._system_board},
            "file": {"exec": self._file_exec, "read": self._file_read,
                     "write": self._file_write, "stat": self._file_stat,
                     "list": self._file_list},
            "log": {"read": self._log_read},
            "network.device": {"status": self._device_status},
            "network.interface": {"dump": self._interface_dump,
                                  "status": self._interface_status},
            "service": {"list": self._service_list},
        }
        #: emulated init script state (running, enabled), by service name
        self.services: dict[str, dict[str, bool]] = {}

    def reconfigure(self, config: RpcConfig) -> None:
        self.config = config

    async def call(self, call: Call) -> Outcome:
        methods = self.objects.get(call.path)
        if methods is None and call.path.startswith("hostapd.") \
                and call.path[len("hostapd."):] in sysinfo.wireless_interfaces():
            methods = {"get_status": self._hostapd_status}
        if methods is None:
            return ubus_failure(UBUS_NOT_FOUND)
        handler = methods.get(call.method)
        if handler is None:
            return ubus_failure(UBUS_METHOD_NOT_FOUND)
        try:
            result = await handler(call)
        except UbusError as exc:
            return ubus_failure(exc.status, error=exc.error)
        except OSError as exc:
            return ubus_failure(errno_status(exc))
        if isinstance(result, Outcome):
            return result
        return Outcome(result=result, exit_code=0)

    # ------------------------------------------------------------------ system

    async def _system_info(self, call: Call) -> Any:
        return sysinfo.system_info()

    async def _system_board(self, call: Call) -> Any:
        return sysinfo.system_board()

    # ------------------------------------------------------------------ file

    async def _file_exec(self, call: Call) -> Any:
        command = _string(call.args, "command")
        params = call.args.get("params", [])
        env = call.args.get("env", {})
        if params is None:
            params = []
        if env is None:
            env = {}
        if not isinstance(params, list) or not all(isinstance(p, str) for p in params):
            raise UbusError(UBUS_INVALID_ARGUMENT)
        if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
            raise UbusError(UBUS_INVALID_ARGUMENT)
        executable = command if os.sep in command else shutil.which(command)
        if executable is None or not os.path.isfile(executable):
            raise UbusError(UBUS_NOT_FOUND)
        if not os.access(executable, os.X_OK):
            raise UbusError(UBUS_PERMISSION_DENIED)
        environ = child_environment()
        environ.update(env)
        try:
            child = await run_child([executable, *params], timeout=call.timeout,
                                    output_cap=call.output_cap, env=environ)
        except ArgumentTooLong as exc:
            raise UbusError(UBUS_INVALID_ARGUMENT, f"file exec: {exc}; not run") from None
        except ValueError:  # NUL in an argument or the environment
            raise UbusError(UBUS_INVALID_ARGUMENT) from None
        stdout, stderr = decode_text(child.stdout), decode_text(child.stderr)
        if child.timed_out:
            return timeout_failure(call.timeout, stderr, truncated=child.truncated)
        return Outcome(result={"code": child.returncode, "stdout": stdout, "stderr": stderr},
                       exit_code=0, truncated=child.truncated)

    async def _file_read(self, call: Call) -> Any:
        data, truncated = _read_head(_string(call.args, "path"), call.output_cap)
        encode = _flag(call.args, "base64")
        text = base64.b64encode(data).decode("ascii") if encode else decode_text(data)
        return Outcome(result={"data": text}, exit_code=0, truncated=truncated)

    async def _file_write(self, call: Call) -> Any:
        path = _string(call.args, "path")
        data = call.args.get("data")
        mode = call.args.get("mode", 0o666)
        if not isinstance(data, str) or isinstance(mode, bool) or not isinstance(mode, int) \
                or not 0 <= mode <= 0o7777:
            raise UbusError(UBUS_INVALID_ARGUMENT)
        if _flag(call.args, "base64"):
            try:
                raw = base64.b64decode(data, validate=True)
            except (binascii.Error, ValueError):
                raise UbusError(UBUS_INVALID_ARGUMENT) from None
        else:
            raw = data.encode("utf-8", errors="surrogateescape")
        flags = os.O_WRONLY | os.O_CREAT
        flags |= os.O_APPEND if _flag(call.args, "append") else os.O_TRUNC
        fd = _open_regular(path, flags, mode)
        try:
            view = memoryview(raw)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        return {}

    async def _file_stat(self, call: Call) -> Any:
        path = _string(call.args, "path")
        return {"path": path, **_stat_entry(os.stat(path))}

    async def _file_list(self, call: Call) -> Any:
        entries: list[dict[str, Any]] = []
        truncated = False
        with os.scandir(_string(call.args, "path")) as listing:
            for entry in listing:
                if len(entries) >= MAX_LIST_ENTRIES:
                    truncated = True
                    break
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                entries.append({"name": entry.name, **_stat_entry(st)})
        entries.sort(key=lambda item: item["name"])
        return Outcome(result={"entries": entries}, exit_code=0, truncated=truncated)

    # ------------------------------------------------------------------ log

    async def _log_read(self, call: Call) -> Any:
        if not self.config.log_file:
            raise UbusError(UBUS_NOT_FOUND, "log read: no log file configured for the local "
                                            "backend (set [rpc] log_file)")
        lines = call.args.get("lines", 0)
        if isinstance(lines, bool) or not isinstance(lines, int) or lines < 0:
            raise UbusError(UBUS_INVALID_ARGUMENT)
        if _flag(call.args, "stream", True):
            return Outcome(result=None, exit_code=0)  # logd streams: the ubus CLI prints nothing
        count = min(lines, MAX_LOG_LINES) if lines else MAX_LOG_LINES
        tail, mtime = _read_tail(self.config.log_file, count, call.output_cap)
        stamp = int(mtime * 1000)
        return {"log": [{"msg": decode_text(line), "id": index, "priority": _LOG_PRIORITY,
                         "source": 1, "time": stamp} for index, line in enumerate(tail)]}

    # ------------------------------------------------------------------ network, service

    async def _device_status(self, call: Call) -> Any:
        name = call.args.get("name")
        if name is not None and not isinstance(name, str):
            raise UbusError(UBUS_INVALID_ARGUMENT)
        return sysinfo.device_status(name)

    async def _interface_dump(self, call: Call) -> Any:
        return sysinfo.interface_dump()

    async def _interface_status(self, call: Call) -> Any:
        return sysinfo.interface_status(_string(call.args, "interface"))

    async def _service_list(self, call: Call) -> Any:
        """Init scripts, without procd's instance data (there is no procd here)."""
        name: Optional[str] = call.args.get("name")
        if name is not None and not isinstance(name, str):
            raise UbusError(UBUS_INVALID_ARGUMENT)
        directory = self.config.init_dir
        try:
            scripts = sorted(os.listdir(directory))
        except OSError:
            scripts = []
        return {script: {} for script in scripts
                if (name is None or script == name)
                and os.access(os.path.join(directory, script), os.X_OK)}

    async def service(self, action: ServiceAction) -> Outcome:
        """Init script actions emulated, never run: a dry run must not stop this machine's
        services. Each one starts running and enabled; actions change that."""
        state = self.services.setdefault(action.name, {"running": True, "enabled": True})
        if action.action == "status":
            return Outcome(result={"name": action.name, **state, "instances": {},
                                   "emulated": True}, exit_code=0)
        if action.action in ("start", "restart", "reload", "stop"):
            state["running"] = action.action != "stop"
        elif action.action in ("enable", "disable"):
            state["enabled"] = action.action == "enable"
        return Outcome(result={"name": action.name, "action": action.action, "code": 0,
                               "stdout": "", "stderr": "", "emulated": True}, exit_code=0)

    # ------------------------------------------------------------------ wireless

    async def _hostapd_status(self, call: Call) -> Any:
        return sysinfo.hostapd_status(call.path[len("hostapd."):])
