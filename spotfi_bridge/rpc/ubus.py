"""The real backend: one ``ubus call`` child per request, and the init scripts the
compat layer runs for ``service ACTION {name}`` (rpc/compat.py).

Why the CLI and not the ``ubus`` Python binding: the binding's ``call`` blocks
the calling thread until ubusd answers (up to the call's timeout), so it would
stall the loop or need a thread per call, and a call stuck in it cannot be
killed. A CLI child costs a fork+exec (a few ms on a router) and can always be
timed out, killed and reaped. So the binding is not used.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import shutil
import signal
from typing import Any, Optional

from spotfi_bridge.config import RpcConfig
from spotfi_bridge.rpc.backend import (
    UBUS_TIMEOUT,
    Call,
    Outcome,
    ServiceAction,
    timeout_failure,
    ubus_failure,
)
from spotfi_bridge.rpc.child import MAX_ARG_STRLEN, ArgumentTooLong, run_child, spawn_detached
from spotfi_bridge.rpc.compat import SELF_ENDING_ACTIONS, SELF_SERVICE

logger = logging.getLogger("spotfi_bridge.rpc")


def decode_text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


def parse_stdout(data: bytes) -> Any:
    """ubus prints JSON; anything else is handed back as text. Empty output is ``None``."""
    text = decode_text(data)
    if not text.strip():
        return None
    try:
        # NaN/Infinity are not JSON the API can read back: keep them as their names
        return json.loads(text, parse_constant=lambda name: name)
    except (ValueError, RecursionError):
        return text


def find_ubus() -> Optional[str]:
    return shutil.which("ubus")


class UbusBackend:
    name = "ubus"

    def __init__(self, config: RpcConfig, binary: str = "ubus") -> None:
        self.binary = binary
        self.config = config

    def reconfigure(self, config: RpcConfig) -> None:
        self.config = config

    def argv(self, call: Call) -> list[str]:
        # "--" ends ubus's options: a path or method starting with "-" stays an operand
        seconds = max(1, math.ceil(call.timeout))
        return [self.binary, "-S", "-t", str(seconds), "--", "call", call.path, call.method,
                json.dumps(call.args, separators=(",", ":"), ensure_ascii=False)]

    async def call(self, call: Call) -> Outcome:
        try:
            argv = self.argv(call)
        except (ValueError, TypeError) as exc:
            return ubus_failure(2, f"arguments cannot be encoded as JSON: {exc}")
        try:
            child = await run_child(argv, timeout=call.timeout, output_cap=call.output_cap)
        except ArgumentTooLong as exc:
            what = "args (as JSON)" if exc.index == len(argv) - 1 else "path or method"
            return Outcome(error=f"{what} too large for ubus: {exc.size} bytes, over the "
                                 f"kernel's limit of {MAX_ARG_STRLEN - 1} bytes for one "
                                 "command-line argument (MAX_ARG_STRLEN); not run")
        except ValueError:  # NUL byte in path, method or args
            return ubus_failure(2, "path, method or args contain a NUL character")
        except UnicodeEncodeError:
            return ubus_failure(2, "path, method or args are not valid Unicode")
        except OSError as exc:
            return Outcome(error=f"cannot run {self.binary}: {exc.strerror or exc}")
        stderr = decode_text(child.stderr)
        stdout = parse_stdout(child.stdout)
        if child.timed_out:
            return timeout_failure(call.timeout, stderr, truncated=child.truncated)
        if child.signal is not None:
            return dataclasses.replace(killed("ubus", child.signal, stderr, child.truncated),
                                       result=stdout)
        if child.returncode != 0:
            outcome = ubus_failure(child.returncode, stderr, truncated=child.truncated)
            # ubus's own timeout (-t, or an object that never answered): its status, its words
            return dataclasses.replace(outcome, result=stdout,
                                       timed_out=child.returncode == UBUS_TIMEOUT)
        return Outcome(result=stdout, stderr=stderr, exit_code=0, truncated=child.truncated)

    async def service(self, action: ServiceAction) -> Outcome:
        """``/etc/init.d/N ACTION``; ``status`` asks procd and the script's ``enabled``."""
        if action.action == "status":
            return await self._service_status(action)
        if action.name == SELF_SERVICE and action.action in SELF_ENDING_ACTIONS:
            return Outcome(result={"name": action.name, "action": action.action,
                                   "scheduled": True}, exit_code=0,
                           after_reply=lambda: act_on_self(action))
        return await run_init_script(action, action.action, action.timeout)

    async def _service_status(self, action: ServiceAction) -> Outcome:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + action.timeout
        procd = await self.call(Call("service", "list", {"name": action.name}, action.timeout,
                                     action.output_cap))
        if not procd.ok:
            return procd
        entry = procd.result.get(action.name) if isinstance(procd.result, dict) else None
        instances = entry.get("instances") if isinstance(entry, dict) else None
        instances = instances if isinstance(instances, dict) else {}
        enabled = await run_init_script(action, "enabled", max(0.1, deadline - loop.time()))
        if enabled.timed_out or enabled.signal is not None or enabled.result is None:
            return enabled
        running = any(isinstance(i, dict) and i.get("running") is True
                      for i in instances.values())
        return Outcome(result={"name": action.name, "running": running,
                               "enabled": enabled.result["code"] == 0,
                               "instances": instances}, exit_code=0)


async def run_init_script(action: ServiceAction, verb: str, timeout: float) -> Outcome:
    """``script verb`` as a child; the reply carries its exit code and output, and is an
    error when it did not exit 0 (except ``enabled``, whose status is its answer)."""
    command = f"{action.script} {verb}"
    try:
        child = await run_child([action.script, verb], timeout=timeout,
                                output_cap=action.output_cap)
    except OSError as exc:
        return Outcome(error=f"cannot run {command}: {exc.strerror or exc}")
    stdout, stderr = decode_text(child.stdout), decode_text(child.stderr)
    if child.timed_out:
        return timeout_failure(timeout, stderr, truncated=child.truncated)
    if child.signal is not None:
        return killed(command, child.signal, stderr, child.truncated)
    result = {"name": action.name, "action": verb, "code": child.returncode,
              "stdout": stdout, "stderr": stderr}
    if child.returncode != 0 and verb != "enabled":
        return Outcome(result=result, error=f"{command} failed with exit status "
                                            f"{child.returncode}",
                       exit_code=child.returncode, truncated=child.truncated)
    return Outcome(result=result, exit_code=0, truncated=child.truncated)


def act_on_self(action: ServiceAction) -> None:
    """After the reply left: the script stops or restarts us, so it runs detached."""
    try:
        pid = spawn_detached([action.script, action.action])
    except OSError as exc:
        logger.error("rpc: cannot run %s %s: %s", action.script, action.action,
                     exc.strerror or exc)
        return
    logger.warning("rpc: %s %s started (pid %d) after its reply", action.script, action.action,
                   pid)


def killed(command: str, number: int, stderr: str, truncated: bool) -> Outcome:
    """A child that a signal ended: it has no exit status, so the reply has no exitCode."""
    try:
        name = signal.Signals(number).name
    except ValueError:
        name = "unknown signal"
    return Outcome(error=f"{command} killed by signal {number} ({name})", stderr=stderr,
                   signal=number, truncated=truncated)
