"""``bridge update``: download and check a package, then hand over to the detached helper.

The bridge cannot install itself: installing the package restarts it. So it
only does what can fail cleanly while it still answers the RPC (download with
whatever the router has, size bound, sha256) and then starts the helper
(``packaging/update-helper.sh``, installed as ``/usr/libexec/spotfi-bridge-update``)
in its own session. The helper installs with the router's package manager,
restarts the service, waits for the new bridge's connected marker (written by
:meth:`Updater.mark_connected` after every CONNACK) and, if it never comes,
reinstalls the previous package and restarts that. Its outcome lands in a state
file that outlives the restart and that ``bridge info`` shows.

The previous package is a copy kept in the state directory: the helper keeps
every package it installed successfully (``installed.ipk`` / ``installed.apk``).
Before the first ``bridge update`` of an opkg router there is no such copy: it
is rebuilt from opkg's own record of the installed files. apk's database cannot
be turned back into a package, so an apk router needs that copy (see
docs/OPENWRT.md).
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
import os
import re
import secrets
import shutil
import subprocess
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Optional

from spotfi_bridge import __version__
from spotfi_bridge.aio import child_environment
from spotfi_bridge.config import UpdateConfig
from spotfi_bridge.rpc.backend import UBUS_INVALID_ARGUMENT, Outcome, ubus_failure

if TYPE_CHECKING:
    import tarfile

log = logging.getLogger("spotfi_bridge.update")

PACKAGE = "spotfi-bridge"
#: in the order they are tried: OpenWrt's own first, then what may have been added
DOWNLOADERS = ("uclient-fetch", "wget", "curl")
#: states the helper is still working in; anything else is an outcome
BUSY_STATES = ("installing", "rolling-back")
_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")
#: environment the helper (and through it the restarted bridge) gets beyond the children's:
#: where the config lives and the path overrides, never the token
_PASSED_ON = ("SPOTFI_CONFIG", "SPOTFI_ENV_FILE")


@dataclass(frozen=True)
class UpdatePaths:
    """Where the update touches the system. ``root`` is "" on a router; tests set
    ``SPOTFI_BRIDGE_ROOT`` to a scratch tree (the init script and the helper read it too),
    and ``SPOTFI_BRIDGE_SHELL`` to the shell that runs the helper (busybox ash, as on a
    router; default /bin/sh)."""

    root: str = ""

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> UpdatePaths:
        return cls(environ.get("SPOTFI_BRIDGE_ROOT", "").rstrip("/"))

    @property
    def state_dir(self) -> str:
        return f"{self.root}/etc/spotfi/update"

    @property
    def request_file(self) -> str:
        return f"{self.state_dir}/request.json"

    @property
    def state_file(self) -> str:
        return f"{self.state_dir}/state.json"

    @property
    def helper_log(self) -> str:
        return f"{self.state_dir}/helper.log"

    @property
    def marker(self) -> str:
        return f"{self.root}/var/run/spotfi-bridge.connected"

    @property
    def helper(self) -> str:
        return f"{self.root}/usr/libexec/spotfi-bridge-update"

    @property
    def download_dir(self) -> str:
        return f"{self.root}/tmp"

    @property
    def opkg_info(self) -> str:
        return f"{self.root}/usr/lib/opkg/info"


class UpdateRefused(Exception):
    """Why an update was not started; the message is the RPC error."""


def parse_request(args: Mapping[str, Any]) -> tuple[str, str]:
    url, digest = args.get("url"), args.get("sha256")
    if not isinstance(url, str) or not url.startswith(("http://", "https://")) or \
            any(c.isspace() for c in url):
        raise UpdateRefused("invalid argument: 'url' must be an http:// or https:// URL")
    if not isinstance(digest, str) or not _SHA256.match(digest):
        raise UpdateRefused("invalid argument: 'sha256' must be 64 hexadecimal digits")
    return url, digest.lower()


def package_manager() -> Optional[str]:
    """opkg (OpenWrt up to 24.10) or apk (25.12 on), whichever this router has."""
    for name in ("opkg", "apk"):
        if shutil.which(name):
            return name
    return None


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(65536), b""):
            digest.update(block)
    return digest.hexdigest()


def rebuild_installed_ipk(info_dir: str, root: str, out_path: str) -> str:
    """An .ipk of the installed spotfi-bridge from opkg's records (``.list``, ``.control``,
    maintainer scripts): the package to roll back to when no copy was kept. Returns its
    version. Raises OSError or UpdateRefused."""
    base = os.path.join(info_dir, PACKAGE)
    try:
        with open(base + ".control", encoding="utf-8") as handle:
            control = handle.read()
        with open(base + ".list", encoding="utf-8") as handle:
            paths = sorted(line.rstrip("\n").split("\t")[0] for line in handle if line.strip())
    except OSError as exc:
        raise UpdateRefused(f"cannot roll back: opkg has no record of {PACKAGE} in "
                            f"{info_dir} ({exc.strerror})") from None
    version = re.search(r"^Version:\s*(\S+)", control, re.M)
    import tarfile  # 0.34 MB that only a roll-back needs, not the daemon's start

    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w:gz", format=tarfile.GNU_FORMAT) as archive:
        for path in paths:
            archive.add(root + path, arcname="." + path, recursive=False)
    controls = io.BytesIO()
    with tarfile.open(fileobj=controls, mode="w:gz", format=tarfile.GNU_FORMAT) as archive:
        _add_bytes(archive, "./control", control.encode(), 0o644)
        for script in ("conffiles", "postinst", "prerm", "preinst", "postrm"):
            if os.path.exists(f"{base}.{script}"):
                archive.add(f"{base}.{script}", arcname=f"./{script}")
    with tarfile.open(out_path, mode="w:gz", format=tarfile.GNU_FORMAT) as outer:
        _add_bytes(outer, "./debian-binary", b"2.0\n", 0o644)
        _add_bytes(outer, "./control.tar.gz", controls.getvalue(), 0o644)
        _add_bytes(outer, "./data.tar.gz", data.getvalue(), 0o644)
    return version.group(1) if version else "unknown"


def _add_bytes(archive: tarfile.TarFile, name: str, data: bytes, mode: int) -> None:
    info = archive.tarinfo(name)
    info.size, info.mode, info.mtime = len(data), mode, int(time.time())
    archive.addfile(info, io.BytesIO(data))


def read_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as handle:
            value = json.load(handle)
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Updater:
    def __init__(self, config: UpdateConfig, paths: UpdatePaths,
                 environ: Optional[Mapping[str, str]] = None) -> None:
        self.config = config
        self.paths = paths
        self._environ = os.environ if environ is None else environ
        self._starting = False  # a download is running for an accepted request
        self._helper: Optional[subprocess.Popen[bytes]] = None

    # ------------------------------------------------------------------ the RPC

    async def start(self, args: Mapping[str, Any], timeout: float) -> Outcome:
        """``bridge update``: an error, or accepted with an update id once the helper runs."""
        try:
            url, digest = parse_request(args)
        except UpdateRefused as exc:
            return ubus_failure(UBUS_INVALID_ARGUMENT, error=str(exc))
        if self._starting or self._helper_running():
            return Outcome(error=f"refused: an update is already running "
                                 f"({self.info().get('id', 'starting')})")
        self._starting = True
        try:
            return await self._start(url, digest, timeout)
        except UpdateRefused as exc:
            log.warning("update from %s refused: %s", url, exc)
            return Outcome(error=str(exc))
        finally:
            self._starting = False

    async def _start(self, url: str, digest: str, timeout: float) -> Outcome:
        manager = package_manager()
        if manager is None:
            raise UpdateRefused("refused: neither opkg nor apk is on PATH")
        ext = "ipk" if manager == "opkg" else "apk"
        update_id = f"upd-{int(time.time())}-{secrets.token_hex(3)}"
        os.makedirs(self.paths.state_dir, exist_ok=True)
        os.makedirs(self.paths.download_dir, exist_ok=True)
        package = os.path.join(self.paths.download_dir, f"spotfi-bridge-{update_id}.{ext}")
        try:
            size = await self._download(url, package, max(1.0, timeout - 2.0))
            actual = await asyncio.get_running_loop().run_in_executor(None, sha256_of, package)
            if actual != digest:
                raise UpdateRefused(f"refused: sha256 mismatch: expected {digest}, the "
                                    f"download ({size} bytes) has {actual}")
            previous = self._previous_package(ext, update_id)
        except BaseException:
            _remove(package)
            raise
        request = {"id": update_id, "state": "installing", "url": url, "sha256": digest,
                   "size": size, "manager": manager, "fromVersion": __version__,
                   "accepted": int(time.time()), "previous": previous}
        self._spawn_helper(update_id, package, previous, manager, request)
        log.info("update %s accepted: %s (%d bytes) handed to the helper; %s installs it",
                 update_id, url, size, manager)
        return Outcome(result={"accepted": True, "id": update_id, "size": size,
                               "sha256": digest, "manager": manager,
                               "confirmTimeout": self.config.confirm_timeout}, exit_code=0)

    async def _download(self, url: str, path: str, timeout: float) -> int:
        tool = next((name for name in DOWNLOADERS if shutil.which(name)), None)
        if tool is None:
            raise UpdateRefused("refused: no download tool (uclient-fetch, wget or curl)")
        argv = {"uclient-fetch": [tool, "-q", "-O", path, url],
                "wget": [tool, "-q", "-O", path, url],
                "curl": [tool, "-fsS", "-o", path, url]}[tool]
        limit = self.config.max_bytes
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE, env=child_environment(), start_new_session=True)
        assert proc.stderr is not None
        errors = asyncio.ensure_future(proc.stderr.read(4096))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            while True:  # the size is watched while it grows: a huge file never fills /tmp
                try:
                    await asyncio.wait_for(asyncio.shield(proc.wait()), 0.2)
                    break
                except asyncio.TimeoutError:
                    pass
                if _size(path) > limit:
                    raise UpdateRefused(f"refused: the package is larger than [update] "
                                        f"max_bytes ({limit} bytes)")
                if loop.time() > deadline:
                    raise UpdateRefused(f"download failed: not finished after {timeout:g} s")
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        stderr = (await errors).decode("utf-8", "replace").strip().splitlines()
        if proc.returncode != 0:
            detail = f": {stderr[-1]}" if stderr else ""
            raise UpdateRefused(f"download failed: {tool} exited with status "
                                f"{proc.returncode}{detail}")
        size = _size(path)
        if size > limit:
            raise UpdateRefused(f"refused: the package is larger than [update] max_bytes "
                                f"({limit} bytes)")
        if size == 0:
            raise UpdateRefused("download failed: the file is empty")
        return size

    def _previous_package(self, ext: str, update_id: str) -> str:
        kept = os.path.join(self.paths.state_dir, f"installed.{ext}")
        if os.path.isfile(kept):
            return kept
        if ext == "apk":
            raise UpdateRefused(
                f"refused: no copy of the installed package to roll back to ({kept}); apk "
                f"cannot rebuild one: copy the .apk that is installed there first")
        rebuilt = os.path.join(self.paths.download_dir, f"spotfi-bridge-{update_id}.previous.ipk")
        try:
            version = rebuild_installed_ipk(self.paths.opkg_info, self.paths.root, rebuilt)
        except OSError as exc:
            _remove(rebuilt)
            raise UpdateRefused(f"refused: cannot rebuild the installed package to roll back "
                                f"to: {exc}") from None
        log.info("no copy of the installed package kept: rebuilt %s %s from opkg's records",
                 PACKAGE, version)
        return rebuilt

    def _spawn_helper(self, update_id: str, package: str, previous: str, manager: str,
                            request: dict[str, Any]) -> None:
        if not os.path.isfile(self.paths.helper):
            raise UpdateRefused(f"refused: the update helper {self.paths.helper} is missing "
                                f"(reinstall the {PACKAGE} package)")
        env = child_environment()
        env.update({name: value for name, value in self._environ.items()
                    if name in _PASSED_ON or name.startswith("SPOTFI_BRIDGE_")})
        try:
            with open(self.paths.helper_log, "ab") as log_file:
                # Popen, not asyncio: asyncio kills the children it still tracks when its loop
                # closes, and this one must outlive the bridge it stops (own session too)
                proc = subprocess.Popen(
                    [self._environ.get("SPOTFI_BRIDGE_SHELL", "/bin/sh"), self.paths.helper,
                     update_id, package, previous, manager,
                     str(os.getpid()), str(int(self.config.confirm_timeout))],
                    stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file, env=env,
                    start_new_session=True, close_fds=True)
        except OSError as exc:
            raise UpdateRefused(f"refused: cannot start {self.paths.helper}: "
                                f"{exc.strerror}") from None
        self._helper = proc  # kept: Python reaps it if it ends while the bridge still runs
        request["helperPid"] = proc.pid
        _write_json(self.paths.request_file, request)

    # ------------------------------------------------------------------ state

    def _helper_running(self) -> bool:
        if self._helper is not None:
            self._helper.poll()  # reap ours if it ended: a zombie would look alive
        state = self.info()
        return state.get("state") in BUSY_STATES and _pid_alive(state.get("helperPid"))

    def info(self) -> dict[str, Any]:
        """The last update, as ``bridge info`` shows it: the request and the helper's outcome
        (``state``: installing, rolling-back, done, rolled-back, failed; ``reason``)."""
        request = read_json(self.paths.request_file)
        if not request:
            return {}
        outcome = read_json(self.paths.state_file)
        if outcome.get("id") == request.get("id"):
            request.update(outcome)
        return request

    def log_last(self) -> None:
        """At start: how the last update went, so logread tells it beside the version."""
        last = self.info()
        if last:
            reason = f" ({last['reason']})" if last.get("reason") else ""
            log.info("last update %s from %s: %s%s", last.get("id"), last.get("fromVersion"),
                     last.get("state"), reason)

    def mark_connected(self) -> None:
        """After every CONNACK while an update waits for it: the helper waits for this file,
        from a new pid. With no update under way nothing is written (a development machine's
        /var/run stays as it was)."""
        if self.info().get("state") not in BUSY_STATES:
            return
        try:
            os.makedirs(os.path.dirname(self.paths.marker), exist_ok=True)
            _write_text(self.paths.marker, f"{os.getpid()} {__version__}\n")
        except OSError as exc:
            log.warning("cannot write %s (an update in progress will roll back): %s",
                        self.paths.marker, exc.strerror)


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _write_text(path: str, text: str) -> None:
    temporary = f"{path}.tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(temporary, path)


def _write_json(path: str, value: dict[str, Any]) -> None:
    _write_text(path, json.dumps(value, sort_keys=True) + "\n")


__all__ = ["UpdatePaths", "UpdateRefused", "Updater", "parse_request",
           "rebuild_installed_ipk"]
