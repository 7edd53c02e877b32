"""``bridge update`` end to end: real packages (built by packaging/build_ipk.py), served over
loopback HTTP, fetched by the real wget, installed by a fake ``opkg`` into a scratch tree,
started by the real init script under a procd stand-in that really runs it, against a real
Mosquitto. Also the API's own legacy binary update on a package install.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import importlib.util
import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.conftest import wait_online
from tests.helpers.apiclient import ApiClient
from tests.helpers.broker import Mosquitto
from tests.helpers.router import ROOT, ScratchRouter, alive
from tests.helpers.wait import wait_for
from tests.unit.test_packaging import load_builder, shell

ROUTER = "test-router"
STATUS = f"spotfi/router/{ROUTER}/status"
OLD, NEW, BROKEN = "9.1.0", "9.2.0", "9.3.0"


def _build(out: Path, version: str, broken: bool = False, kind: str = "ipk") -> Path:
    """The package of this checkout with another version (and, broken, a bridge that exits
    at once with status 1, as a bad release would)."""
    source = out / f"source-{version}-{kind}"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for part in ("spotfi_bridge", "init.d", "packaging"):
        shutil.copytree(ROOT / part, source / part, ignore=ignore)
    init = source / "spotfi_bridge" / "__init__.py"
    text = init.read_text()
    init.write_text(text.replace('__version__ = "', f'__version__ = "{version}"  # was "', 1))
    if broken:
        cli = source / "spotfi_bridge" / "cli.py"
        cli.write_text(cli.read_text().replace(
            "    args = build_parser().parse_args(argv)\n",
            "    args = build_parser().parse_args(argv)\n"
            "    if args.command == \"run\":\n        return 1  # a release that dies at once\n"))
    if kind == "apk":
        built = _apk_builder().build_apk(out / "dist", source=source)
    else:
        built = load_builder().build_ipk(out / "dist", source=source)
    assert built.version == version
    path: Path = built.path
    return path


@pytest.fixture(scope="module")
def packages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("packages")
    return {"old": _build(out, OLD), "new": _build(out, NEW),
            "broken": _build(out, BROKEN, broken=True)}


class Server:
    """http.server on 127.0.0.1 serving one directory."""

    def __init__(self, directory: Path) -> None:
        handler = functools.partial(_QuietHandler, directory=str(directory))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def served(tmp_path: Path, packages: dict[str, Path]) -> Iterator[tuple[Server, Path]]:
    directory = tmp_path / "www"
    directory.mkdir()
    for name, path in packages.items():
        shutil.copy(path, directory / f"{name}.ipk")
    server = Server(directory)
    yield server, directory
    server.close()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _serve(served: tuple[Server, Path], name: str, data: bytes) -> tuple[str, str]:
    """Put ``data`` on the server: its URL and sha256."""
    server, directory = served
    (directory / name).write_bytes(data)
    return server.url(name), _sha256(directory / name)


@pytest.fixture
def router(tmp_path: Path, broker: Mosquitto, packages: dict[str, Path],
           request: pytest.FixtureRequest) -> Iterator[ScratchRouter]:
    """The old package installed and its service started (not yet waited for)."""
    extra = getattr(request, "param", "[update]\nconfirm_timeout = 10\n")
    scratch = ScratchRouter(tmp_path / "root", broker.url, ROUTER, config_extra=extra)
    scratch.install(packages["old"])
    started = scratch.service("start")
    assert started.returncode == 0, started.stderr
    helpers: list[int] = []
    scratch.helpers = helpers  # type: ignore[attr-defined]
    yield scratch
    scratch.cleanup(tuple(helpers))


def _info(api: ApiClient) -> dict[str, Any]:
    reply = api.rpc(ROUTER, "bridge", "info", timeout=15)
    assert reply["status"] == "success", reply
    result: dict[str, Any] = reply["result"]
    return result


def _update(api: ApiClient, url: str, digest: str) -> dict[str, Any]:
    return api.rpc(ROUTER, "bridge", "update", {"url": url, "sha256": digest}, timeout=60)


def _outcome(api: ApiClient, update_id: str, states: tuple[str, ...],
             timeout: float = 90) -> dict[str, Any]:
    """bridge info of whichever bridge answers, once its update shows one of ``states``."""
    def done() -> Any:
        try:
            info = _info(api)
        except AssertionError:  # between two bridges: no answer for a moment
            return None
        update = info.get("update", {})
        return info if update.get("id") == update_id and update.get("state") in states else None

    result: dict[str, Any] = wait_for(done, timeout, f"update {update_id} to end in {states}",
                                      interval=0.5)
    return result


def _accepted(api: ApiClient, router: ScratchRouter, url: str, digest: str) -> dict[str, Any]:
    reply = _update(api, url, digest)
    assert reply["status"] == "success", reply
    result: dict[str, Any] = reply["result"]
    assert result["accepted"] is True and result["id"].startswith("upd-")
    request = (router.root / "etc/spotfi/update/request.json").read_text()
    router.helpers.append(json.loads(request)["helperPid"])  # type: ignore
    return result


# --------------------------------------------------------------------------- refusals

def test_a_checksum_mismatch_is_refused_and_nothing_changes(
        api: ApiClient, broker: Mosquitto, router: ScratchRouter,
        served: tuple[Server, Path]) -> None:
    server, directory = served
    wait_online(api)
    before = _info(api)
    reply = _update(api, server.url("new.ipk"), "0" * 64)
    assert reply["status"] == "error"
    assert "sha256 mismatch: expected " + "0" * 64 in reply["error"]
    assert _sha256(directory / "new.ipk") in reply["error"]
    after = _info(api)
    assert (after["pid"], after["version"]) == (before["pid"], OLD)
    assert after["update"] == {}
    # no update under way: the bridge wrote no connected marker
    assert not (router.root / "var/run/spotfi-bridge.connected").exists()
    assert list((router.root / "tmp").iterdir()) == []  # the download is gone
    assert (router.root / "opkg.log").read_text() == f"install spotfi-bridge {OLD}-1\n"
    # the same through spotfi-bridge-ctl: exit status 1 and the router's words
    ctl = subprocess.run([sys.executable, "-m", "spotfi_bridge.ctl", "--broker", broker.url,
                          "--router", ROUTER, "update", server.url("new.ipk"), "--sha256",
                          "1" * 64], capture_output=True, text=True, timeout=60,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT),
                              "HOME": str(router.root)})
    assert ctl.returncode == 1, ctl.stderr
    assert "sha256 mismatch: expected " + "1" * 64 in ctl.stderr


@pytest.mark.parametrize("router", ["[update]\nmax_bytes = 65536\n"], indirect=True)
def test_a_package_over_the_size_bound_is_refused(
        api: ApiClient, router: ScratchRouter, served: tuple[Server, Path]) -> None:
    wait_online(api)
    reply = _update(api, *_serve(served, "big.ipk", b"\0" * 300_000))
    assert reply["status"] == "error"
    assert "larger than [update] max_bytes (65536 bytes)" in reply["error"]
    assert list((router.root / "tmp").iterdir()) == []


def test_bad_arguments_are_refused(api: ApiClient, router: ScratchRouter) -> None:
    wait_online(api)
    for args, word in (({"url": "ftp://x/p.ipk", "sha256": "0" * 64}, "'url'"),
                       ({"url": "http://127.0.0.1/p.ipk", "sha256": "xyz"}, "'sha256'")):
        reply = api.rpc(ROUTER, "bridge", "update", args, timeout=15)
        assert reply["status"] == "error" and word in reply["error"], reply


# --------------------------------------------------------------------------- installing

def test_an_update_installs_restarts_and_survives_the_bridge_it_stops(
        api: ApiClient, router: ScratchRouter, served: tuple[Server, Path]) -> None:
    server, directory = served
    wait_online(api)
    old_pid = _info(api)["pid"]
    accepted = _accepted(api, router, server.url("new.ipk"), _sha256(directory / "new.ipk"))
    helper = router.helpers[-1]  # type: ignore[attr-defined]
    info = _outcome(api, accepted["id"], ("done", "rolled-back", "failed"))
    assert info["update"]["state"] == "done", info["update"]
    assert info["version"] == NEW and info["pid"] != old_pid
    assert not alive(old_pid)  # the helper stopped the bridge that started it, and went on
    assert info["update"]["fromVersion"] == OLD and info["update"]["helperPid"] == helper
    kept = router.root / "etc/spotfi/update/installed.ipk"
    assert kept.read_bytes() == (directory / "new.ipk").read_bytes()
    assert f"update {accepted['id']}: done" in router.messages()
    assert list((router.root / "tmp").iterdir()) == []

    # the same version again, on purpose: reinstalled and restarted
    again = _accepted(api, router, server.url("new.ipk"), _sha256(directory / "new.ipk"))
    info = _outcome(api, again["id"], ("done", "rolled-back", "failed"))
    assert info["update"]["state"] == "done" and info["version"] == NEW
    assert (router.root / "opkg.log").read_text().splitlines() == [
        f"install spotfi-bridge {OLD}-1", f"install spotfi-bridge {NEW}-1",
        f"install spotfi-bridge {NEW}-1"]


def test_a_release_that_dies_at_once_is_rolled_back_and_the_old_one_comes_online(
        api: ApiClient, router: ScratchRouter, served: tuple[Server, Path]) -> None:
    server, directory = served
    wait_online(api)
    accepted = _accepted(api, router, server.url("broken.ipk"),
                         _sha256(directory / "broken.ipk"))
    mark = api.mark()
    info = _outcome(api, accepted["id"], ("rolled-back", "done", "failed"), timeout=120)
    update = info["update"]
    assert update["state"] == "rolled-back", update
    assert update["reason"] == "the new bridge did not connect within 10 s"
    assert info["version"] == OLD
    wait_online(api, start=mark)
    assert (router.root / "opkg.log").read_text().splitlines() == [
        f"install spotfi-bridge {OLD}-1", f"install spotfi-bridge {BROKEN}-1",
        f"install spotfi-bridge {OLD}-1"]
    # no copy was kept before: the previous package was rebuilt from opkg's records, and is
    # kept now for the next time
    assert update["previous"].endswith(".previous.ipk")
    assert (router.root / "etc/spotfi/update/installed.ipk").exists()
    assert "rolled back" in router.messages()
    assert (f"last update {accepted['id']} from {OLD}: rolling-back (the new bridge did not "
            "connect within 10 s)") in router.service_log()


# --------------------------------------------------------------------------- the API's own update

#: routes/router-system.ts /bridge/update (the SpotFi API), line for line, with the tree's
#: paths ($R) and /etc/init.d/X ACTION spelled /bin/sh /etc/rc.common /etc/init.d/X ACTION as
#: OpenWrt runs it. On a router the API sends it as file exec /bin/sh -c SCRIPT, which
#: rpcd runs: the script is not the bridge's child and lives on when it stops the bridge.
LEGACY_SCRIPT = """
set -e
echo "Stopping spotfi-bridge service..."
/bin/sh "$R/etc/rc.common" "$R/etc/init.d/spotfi-bridge" stop || true
echo "Downloading new binary from $URL..."
TEMP_FILE="$R/tmp/spotfi-bridge-new"
wget -q -O "$TEMP_FILE" "$URL" || curl -s -o "$TEMP_FILE" "$URL" || {
  echo "ERROR: Failed to download binary"
  exit 1
}
echo "Verifying binary..."
chmod +x "$TEMP_FILE"
if ! "$TEMP_FILE" --version > /dev/null 2>&1; then
  echo "ERROR: Downloaded file is not a valid executable"
  rm -f "$TEMP_FILE"
  exit 1
fi
echo "Backing up old binary..."
cp "$R/usr/bin/spotfi-bridge" "$R/usr/bin/spotfi-bridge.backup.$(date +%s)" || true
echo "Installing new binary..."
mv "$TEMP_FILE" "$R/usr/bin/spotfi-bridge"
chmod +x "$R/usr/bin/spotfi-bridge"
echo "Starting spotfi-bridge service..."
/bin/sh "$R/etc/rc.common" "$R/etc/init.d/spotfi-bridge" start
echo "SUCCESS: Bridge updated and restarted"
"$R/usr/bin/spotfi-bridge" --version
"""

#: the Go bridge's binary as far as the init script can tell: no launcher mark, runs
#: whatever its arguments (a daemon: check-config would never return)
GO_BRIDGE = """#!/bin/sh
[ "$1" = --version ] && { echo "spotfi-bridge go 2.0.0"; exit 0; }
exec sleep 300
"""


def test_the_apis_legacy_binary_update_leaves_a_running_service(
        api: ApiClient, router: ScratchRouter, served: tuple[Server, Path]) -> None:
    server, directory = served
    (directory / "go-bridge").write_text(GO_BRIDGE)
    wait_online(api)
    env = {**router.env, "R": str(router.root), "URL": server.url("go-bridge")}
    result = subprocess.run([*shell(), "-c", LEGACY_SCRIPT], env=env, capture_output=True,
                            text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    assert "spotfi-bridge go 2.0.0" in result.stdout
    pid = wait_for(router.service_pid, 10, "the replaced bridge to run")
    assert router.command() == str(router.root / "usr/bin/spotfi-bridge")  # no "run"
    wait_for(lambda: Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:2] ==
             [b"sleep", b"300"], 10, "the replaced bridge to run as it does without arguments")
    assert "not the spotfi-bridge package's launcher" in router.messages()


def test_a_package_the_manager_refuses_is_rolled_back_with_its_words(
        api: ApiClient, router: ScratchRouter, served: tuple[Server, Path]) -> None:
    wait_online(api)
    accepted = _accepted(api, router, *_serve(served, "garbage.ipk",
                                              b"not a package at all\n" * 100))
    info = _outcome(api, accepted["id"], ("rolled-back", "done", "failed"), timeout=120)
    assert info["update"]["state"] == "rolled-back", info["update"]
    assert info["update"]["reason"].startswith("opkg failed: * pkg_init_from_file: Malformed "
                                               "package file"), info["update"]
    assert info["version"] == OLD


def test_a_download_that_fails_is_refused_with_the_tools_words(
        api: ApiClient, router: ScratchRouter, served: tuple[Server, Path]) -> None:
    server, _ = served
    wait_online(api)
    reply = _update(api, server.url("missing.ipk"), "0" * 64)
    assert reply["status"] == "error"
    assert reply["error"].startswith("download failed: wget exited with status 8"), reply
    assert list((router.root / "tmp").iterdir()) == []


# --------------------------------------------------------------------------- apk (25.12)

def _apk_builder() -> Any:
    load_builder()  # build_apk imports build_ipk by that name
    spec = importlib.util.spec_from_file_location("build_apk", ROOT / "packaging/build_apk.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["build_apk"] = module
    spec.loader.exec_module(module)
    return module


def test_an_update_on_an_apk_router(api: ApiClient, broker: Mosquitto, tmp_path: Path) -> None:
    """apk's database cannot give the installed package back: without the copy the docs
    ask for, bridge update refuses; with it, the update goes as with opkg."""
    out = tmp_path / "apk-packages"
    old, new = _build(out, OLD, kind="apk"), _build(out, NEW, kind="apk")
    www = tmp_path / "www"
    www.mkdir()
    shutil.copy(new, www / "new.apk")
    server = Server(www)
    router = ScratchRouter(tmp_path / "root", broker.url, ROUTER, manager="apk",
                           config_extra="[update]\nconfirm_timeout = 10\n")
    helpers: list[int] = []
    try:
        router.install(old)
        assert router.service("start").returncode == 0
        wait_online(api)
        reply = _update(api, server.url("new.apk"), _sha256(www / "new.apk"))
        assert reply["status"] == "error"
        assert "no copy of the installed package to roll back to" in reply["error"]
        kept = router.root / "etc/spotfi/update/installed.apk"
        shutil.copy(old, kept)  # what docs/OPENWRT.md asks of an apk router, once
        reply = _update(api, server.url("new.apk"), _sha256(www / "new.apk"))
        assert reply["status"] == "success", reply
        request = json.loads((router.root / "etc/spotfi/update/request.json").read_text())
        helpers.append(request["helperPid"])
        info = _outcome(api, reply["result"]["id"], ("done", "rolled-back", "failed"))
        assert info["update"]["state"] == "done" and info["update"]["manager"] == "apk"
        assert info["version"] == NEW
        assert kept.read_bytes() == (www / "new.apk").read_bytes()
        assert (router.root / "opkg.log").read_text().splitlines() == [
            f"install spotfi-bridge {OLD}-r1", f"install spotfi-bridge {NEW}-r1"]
    finally:
        router.cleanup(tuple(helpers))
        server.close()
