"""The procd init script and the package's postinst/prerm, run by a real shell.

``/etc/rc.common`` and ``/lib/functions/procd.sh`` are stand-ins written here:
they follow OpenWrt's (rc.common sources the init script, then wraps
``start_service`` in procd_open_service/procd_close_service, which runs
``service_triggers``) and record every ``procd_*`` call, one line each, in the
same log as the fake ``spotfi-bridge`` and ``logger``, so order is visible.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest

from tests.helpers.router import RC_COMMON
from tests.unit.test_packaging import load_builder, shell

ROOT = Path(__file__).resolve().parents[2]
INIT = ROOT / "init.d" / "spotfi-bridge"
PROG = "/usr/bin/spotfi-bridge"
TOKEN = "tok-51c0ffee0b"
CONFIG_ERROR = ("spotfi-bridge: config error: [router] id is not set: expected a non-empty "
                "string; set it in /etc/spotfi/bridge.toml")

PROCD_SH = r"""
# stand-in for /lib/functions/procd.sh: records calls instead of talking to ubus
_rec() {
	local line="$1"; shift
	for arg in "$@"; do line="$line	$arg"; done
	echo "$line" >> "$STUB_LOG"
}
procd_open_service() { _rec procd_open_service "$@"; }
procd_close_service() {
	procd_open_trigger; service_triggers; procd_close_trigger
	_rec procd_close_service "$@"
}
procd_open_instance() { _rec procd_open_instance "$@"; }
procd_close_instance() { _rec procd_close_instance "$@"; }
procd_set_param() { _rec procd_set_param "$@"; }
procd_append_param() { _rec procd_append_param "$@"; }
procd_open_trigger() { _rec procd_open_trigger "$@"; }
procd_close_trigger() { _rec procd_close_trigger "$@"; }
procd_add_reload_trigger() { _rec procd_add_reload_trigger "$@"; }
procd_add_interface_trigger() { _rec procd_add_interface_trigger "$@"; }
procd_add_raw_trigger() { _rec procd_add_raw_trigger "$@"; }
procd_add_validation() { _rec procd_add_validation "$@"; }
procd_send_signal() { _rec procd_send_signal "$@"; }
procd_kill() { _rec procd_kill "$@"; }
procd_running() { _rec procd_running "$@"; [ "${STUB_RUNNING:-0}" = 1 ]; }
"""


FAKE_PROG = r"""#!/bin/sh
# spotfi-bridge-python-launcher
# fake spotfi-bridge, marked as the package's launcher: check-config answers as
# FAKE_CHECK_STATUS / FAKE_CHECK_STDERR say
echo "spotfi-bridge	$*" >> "$STUB_LOG"
if [ "$1" = check-config ]; then
	[ -n "$FAKE_CHECK_STDERR" ] && printf '%s\n' "$FAKE_CHECK_STDERR" >&2
	[ "${FAKE_CHECK_STATUS:-0}" = 0 ] && echo '{"router": {"id": "r1"}}'
	exit "${FAKE_CHECK_STATUS:-0}"
fi
exit 0
"""

FAKE_LOGGER = r"""#!/bin/sh
{ printf 'logger'; for arg in "$@"; do printf '\t%s' "$arg"; done; echo; } >> "$STUB_LOG"
"""


@dataclass
class Run:
    status: int
    stdout: str
    stderr: str
    calls: list[list[str]]

    def named(self, name: str) -> list[list[str]]:
        return [call[1:] for call in self.calls if call[0] == name]

    def index(self, name: str, *args: str) -> int:
        for position, call in enumerate(self.calls):
            if call[0] == name and tuple(call[1:1 + len(args)]) == args:
                return position
        raise AssertionError(f"no call {name} {args} in {self.calls}")


class Router:
    """A scratch directory standing in for the router's / with the stubs in place."""

    def __init__(self, root: Path, prog: Optional[Path] = None) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.log = root / "calls.log"
        self.log.write_text("")
        bin_dir = root / "bin"
        bin_dir.mkdir()
        (root / "lib/functions").mkdir(parents=True)
        (root / "etc/init.d").mkdir(parents=True)
        (root / "lib/functions/procd.sh").write_text(PROCD_SH)
        (root / "etc/rc.common").write_text(RC_COMMON)
        for name, body in (("logger", FAKE_LOGGER), ("spotfi-bridge", FAKE_PROG)):
            (bin_dir / name).write_text(body)
            (bin_dir / name).chmod(0o755)
        self.prog = prog or bin_dir / "spotfi-bridge"
        text = INIT.read_text()
        assert f"PROG={PROG}\n" in text
        self.init = root / "etc/init.d/spotfi-bridge"
        self.init.write_text(text.replace(f"PROG={PROG}\n", f"PROG={self.prog}\n"))
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("SPOTFI_", "FAKE_", "STUB_", "IPKG_", "PKG_"))}
        self.env.update({"PATH": f"{bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}",
                         "STUB_LOG": str(self.log),
                         "STUB_PROCD_SH": str(root / "lib/functions/procd.sh")})

    def calls(self) -> list[list[str]]:
        return [line.split("\t") for line in self.log.read_text().splitlines()]

    def service(self, action: str, **env: str) -> Run:
        self.log.write_text("")
        result = subprocess.run([*shell(), str(self.root / "etc/rc.common"), str(self.init),
                                 action], env={**self.env, **env}, capture_output=True,
                                text=True, timeout=30)
        assert "not found" not in result.stderr, result.stderr  # every call is stubbed
        return Run(result.returncode, result.stdout, result.stderr, self.calls())


@pytest.fixture
def router(tmp_path: Path) -> Router:
    return Router(tmp_path)


# --------------------------------------------------------------------------- start

def test_start_opens_one_respawning_instance_after_checking_the_config(router: Router) -> None:
    run = router.service("start")
    assert run.status == 0, run.stderr
    assert run.named("procd_open_service") == [["spotfi-bridge", str(router.init)]]
    assert len(run.named("procd_open_instance")) == 1
    assert len(run.named("procd_close_instance")) == 1
    assert run.index("spotfi-bridge", "check-config") < run.index("procd_open_instance")

    params = {call[0]: call[1:] for call in run.named("procd_set_param")}
    assert params["command"] == [str(router.prog), "run", "--logd"]  # logd stamps the lines
    threshold, timeout, retry = (int(value) for value in params["respawn"])
    assert threshold > 0 and timeout > 0 and retry > 0  # retry 0 would respawn forever
    assert params["file"] == ["/etc/spotfi/bridge.toml", "/etc/spotfi.env"]
    assert params["stdout"] == ["1"] and params["stderr"] == ["1"]
    assert int(params["term_timeout"][0]) > 3  # the bridge needs up to 3 s to say OFFLINE
    # every parameter is set inside the instance
    assert run.index("procd_open_instance") < run.index("procd_set_param", "command") \
        < run.index("procd_close_instance")
    assert run.named("procd_add_reload_trigger") == [["spotfi-bridge"]]
    assert run.index("procd_add_reload_trigger") < run.index("procd_close_service")
    assert run.named("logger") == []


def test_an_invalid_config_opens_no_instance_and_says_why(router: Router) -> None:
    run = router.service("start", FAKE_CHECK_STATUS="78",
                         FAKE_CHECK_STDERR=f"warning: something minor\n{CONFIG_ERROR}")
    assert run.named("procd_open_instance") == []
    assert run.named("procd_set_param") == []
    reason = CONFIG_ERROR.removeprefix("spotfi-bridge: ")
    assert run.named("logger") == [["-t", "spotfi-bridge", "-p", "daemon.err",
                                    f"not started: {reason}"]]
    assert run.stderr.strip() == f"spotfi-bridge: not started: {reason}"


def test_a_check_that_dies_silently_still_leaves_a_log_line(router: Router) -> None:
    run = router.service("start", FAKE_CHECK_STATUS="1")
    assert run.named("procd_open_instance") == []
    (logged,) = run.named("logger")
    assert logged[-1] == "not started: check-config failed with exit status 1"


def test_a_missing_python_or_launcher_is_reported(tmp_path: Path) -> None:
    router = Router(tmp_path, prog=tmp_path / "nowhere" / "spotfi-bridge")
    run = subprocess.run([*shell(), str(router.root / "etc/rc.common"), str(router.init),
                          "start"], env=router.env, capture_output=True, text=True,
                         timeout=30)
    calls = router.calls()
    assert not [call for call in calls if call[0] == "procd_open_instance"]
    (logged,) = [call for call in calls if call[0] == "logger"]
    assert logged[-1].startswith("not started: ") and "nowhere" in logged[-1], logged
    assert "not started" in run.stderr


# --------------------------------------------------------------------------- reload, stop, check

def test_reload_sends_sighup_to_a_running_bridge(router: Router) -> None:
    run = router.service("reload", STUB_RUNNING="1")
    assert run.named("procd_send_signal") == [["spotfi-bridge", "*", "HUP"]]
    assert run.named("procd_open_instance") == []
    assert run.index("spotfi-bridge", "check-config") < run.index("procd_send_signal")


def test_reload_starts_a_bridge_that_is_not_running(router: Router) -> None:
    # e.g. procd gave up after a run-time config error that is now fixed
    run = router.service("reload", STUB_RUNNING="0")
    assert run.named("procd_send_signal") == []
    assert len(run.named("procd_open_instance")) == 1


def test_reload_keeps_the_running_bridge_on_an_invalid_config(router: Router) -> None:
    run = router.service("reload", STUB_RUNNING="1", FAKE_CHECK_STATUS="78",
                         FAKE_CHECK_STDERR=CONFIG_ERROR)
    assert run.named("procd_send_signal") == []
    assert run.named("procd_kill") == []
    assert run.named("procd_open_instance") == []
    (logged,) = run.named("logger")
    assert logged[-1].startswith("config not reloaded: config error: [router] id")


def test_stop_asks_procd_to_kill_the_service(router: Router) -> None:
    run = router.service("stop")
    assert run.named("procd_kill") == [["spotfi-bridge", ""]]  # "": every instance


def test_check_prints_the_config_and_returns_its_status(router: Router) -> None:
    good = router.service("check")
    assert good.status == 0 and '"router"' in good.stdout
    bad = router.service("check", FAKE_CHECK_STATUS="78", FAKE_CHECK_STDERR=CONFIG_ERROR)
    assert bad.status == 78 and CONFIG_ERROR in bad.stderr


# --------------------------------------------------------------------------- another bridge

#: what the API's /bridge/update leaves at /usr/bin/spotfi-bridge: the Go bridge's binary
#: (here a script without the launcher's mark): one ignores its arguments and runs (a
#: daemon: it would never return from check-config), one refuses them
IGNORES_ARGS = r"""#!/bin/sh
echo "gobridge	$*" >> "$STUB_LOG"
exec sleep 2
"""
REFUSES_ARGS = r"""#!/bin/sh
echo "gobridge	$*" >> "$STUB_LOG"
[ $# -eq 0 ] && exec sleep 2
echo "flag provided but not defined: $1" >&2
exit 2
"""


def _replaced(tmp_path: Path, body: str) -> Router:
    binary = tmp_path / "go" / "spotfi-bridge"
    binary.parent.mkdir()
    binary.write_text(body)
    binary.chmod(0o755)
    return Router(tmp_path / "router", prog=binary)


@pytest.mark.parametrize("body", [IGNORES_ARGS, REFUSES_ARGS], ids=["ignores", "refuses"])
def test_a_replaced_binary_starts_like_the_go_bridge(tmp_path: Path, body: str) -> None:
    router = _replaced(tmp_path, body)
    run = router.service("start")
    assert run.status == 0, run.stderr
    assert run.named("gobridge") == []  # never run with check-config (or anything)
    assert len(run.named("procd_open_instance")) == 1
    params = {call[0]: call[1:] for call in run.named("procd_set_param")}
    assert params["command"] == [str(router.prog)]  # no "run"
    assert "respawn" in params
    (logged,) = run.named("logger")
    assert "not the spotfi-bridge package's launcher" in logged[-1]
    assert "reinstall the package" in logged[-1]


def test_reload_of_a_replaced_binary_starts_it_without_the_gate(tmp_path: Path) -> None:
    router = _replaced(tmp_path, REFUSES_ARGS)
    run = router.service("reload", STUB_RUNNING="1")
    assert run.named("gobridge") == []
    assert run.named("procd_send_signal") == []
    params = {call[0]: call[1:] for call in run.named("procd_set_param")}
    assert params["command"] == [str(router.prog)]


def test_check_of_a_replaced_binary_says_so_without_running_it(tmp_path: Path) -> None:
    router = _replaced(tmp_path, IGNORES_ARGS)
    run = router.service("check")
    assert run.status == 1
    assert run.named("gobridge") == []
    assert "not this package's launcher" in run.stderr and "reinstall" in run.stderr


# --------------------------------------------------------------------------- the real bridge

@pytest.fixture
def staged(tmp_path: Path) -> Path:
    root = tmp_path / "staged"
    load_builder().stage(root)
    return root


@pytest.mark.skipif(sys.version_info < (3, 10), reason="the ipk builder needs Python 3.10+")
def test_init_script_with_the_packaged_launcher(tmp_path: Path, staged: Path) -> None:
    router = Router(tmp_path / "router", prog=staged / "usr/bin/spotfi-bridge")
    env_file = tmp_path / "spotfi.env"
    env = {"SPOTFI_BRIDGE_LIB": str(staged / "usr/lib/spotfi-bridge"),
           "SPOTFI_BRIDGE_PYTHON": sys.executable, "SPOTFI_ENV_FILE": str(env_file)}

    env_file.write_text(f"SPOTFI_TOKEN={TOKEN}\nSPOTFI_MQTT_BROKER=mqtt://127.0.0.1:1883\n")
    env_file.chmod(0o600)
    run = router.service("start", **env)
    assert run.named("procd_open_instance") == []
    (logged,) = run.named("logger")
    assert logged[-1].startswith("not started: config error: ") and \
        "[router] id is not set" in logged[-1], logged
    assert TOKEN not in router.log.read_text() + run.stderr

    env_file.write_text(f"SPOTFI_ROUTER_ID=router-9\nSPOTFI_TOKEN={TOKEN}\n"
                        "SPOTFI_MQTT_BROKER=mqtt://127.0.0.1:1883\n")
    run = router.service("start", **env)
    assert run.status == 0, run.stderr
    params = {call[0]: call[1:] for call in run.named("procd_set_param")}
    assert params["command"] == [str(staged / "usr/bin/spotfi-bridge"), "run", "--logd"]
    assert run.named("logger") == []


# --------------------------------------------------------------------------- postinst, prerm

class Package:
    """postinst/prerm with the init script and library paths pointed into a scratch dir."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.log = root / "calls.log"
        self.init = root / "init.d" / "spotfi-bridge"
        self.lib = root / "lib" / "spotfi-bridge"
        self.init.parent.mkdir(parents=True)
        self.init.write_text('#!/bin/sh\necho "init\t$*" >> "$STUB_LOG"\n'
                             'case "$1" in enabled) [ "$STUB_ENABLED" = 1 ];; '
                             'check) [ "${STUB_CHECK:-0}" = 0 ];; esac\n')
        self.init.chmod(0o755)
        for name in ("postinst", "prerm"):
            text = (ROOT / "packaging" / "control" / name).read_text()
            assert "INIT=/etc/init.d/spotfi-bridge\n" in text
            text = text.replace("INIT=/etc/init.d/spotfi-bridge\n", f"INIT={self.init}\n")
            text = text.replace("LIB=/usr/lib/spotfi-bridge\n", f"LIB={self.lib}\n")
            (root / name).write_text(text)
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("STUB_", "IPKG_", "PKG_"))}
        self.env["STUB_LOG"] = str(self.log)

    def run(self, script: str, *args: str, **env: str) -> tuple[int, str, list[str]]:
        self.log.write_text("")
        result = subprocess.run([*shell(), str(self.root / script), *args],
                                env={**self.env, **env}, capture_output=True, text=True,
                                timeout=30)
        return result.returncode, result.stderr, self.log.read_text().splitlines()


@pytest.fixture
def package(tmp_path: Path) -> Package:
    return Package(tmp_path)


def test_postinst_enables_and_starts_on_install(package: Package) -> None:
    status, stderr, calls = package.run("postinst", "configure", PKG_UPGRADE="0")
    assert status == 0
    assert calls[:2] == ["init\tenable", "init\tstart"]
    assert stderr == ""


def test_postinst_explains_a_bridge_that_cannot_start_yet(package: Package) -> None:
    status, stderr, calls = package.run("postinst", "configure", PKG_UPGRADE="0",
                                        STUB_CHECK="78")
    assert status == 0  # the package stays installed
    assert "init\tenable" in calls
    assert "/etc/spotfi/bridge.toml" in stderr and "/etc/spotfi.env" in stderr


def test_postinst_upgrade_restarts_an_enabled_bridge(package: Package) -> None:
    status, _, calls = package.run("postinst", "configure", PKG_UPGRADE="1", STUB_ENABLED="1")
    assert status == 0
    assert calls == ["init\tenabled", "init\trestart"]


def test_postinst_upgrade_leaves_a_disabled_bridge_alone(package: Package) -> None:
    status, _, calls = package.run("postinst", "configure", PKG_UPGRADE="1", STUB_ENABLED="0")
    assert status == 0
    assert calls == ["init\tenabled"]


def test_postinst_in_an_image_build_only_enables(package: Package, tmp_path: Path) -> None:
    instroot = tmp_path / "instroot"
    (instroot / "etc").mkdir(parents=True)
    (instroot / "etc/rc.common").write_text(
        '{ printf rc.common; printf "\\t%s" "$@"; echo; } >> "$STUB_LOG"\n')
    status, _, calls = package.run("postinst", "configure", IPKG_INSTROOT=str(instroot))
    assert status == 0
    assert calls == [f"rc.common\t{instroot}{package.init}\tenable"]


def test_postinst_does_nothing_when_scripts_are_off(package: Package) -> None:
    status, _, calls = package.run("postinst", "configure", IPKG_NO_SCRIPT="1")
    assert status == 0 and calls == []


def test_prerm_stops_disables_and_removes_byte_code(package: Package) -> None:
    cache = package.lib / "spotfi_bridge" / "rpc" / "__pycache__"
    cache.mkdir(parents=True)
    (cache / "executor.cpython-311.pyc").write_bytes(b"\0")
    source = package.lib / "spotfi_bridge" / "rpc" / "executor.py"
    source.write_text("")
    status, _, calls = package.run("prerm", "remove")
    assert status == 0
    assert calls == ["init\tstop", "init\tdisable"]
    assert not cache.exists() and source.exists()


@pytest.mark.parametrize("env", [{"PKG_UPGRADE": "1"}, {"IPKG_INSTROOT": "/tmp/image"}])
def test_prerm_leaves_the_service_alone_on_upgrade_and_image_builds(
        package: Package, env: dict[str, str]) -> None:
    status, _, calls = package.run("prerm", "remove", **env)
    assert status == 0 and calls == []

