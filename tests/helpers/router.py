"""A scratch OpenWrt tree whose procd really runs the service: for package and update tests.

``SPOTFI_BRIDGE_ROOT`` points the init script, the update helper, the bridge's
update paths and the fake ``opkg`` (tests/helpers/fake_opkg.py) at the tree.
``/etc/rc.common`` and ``/lib/functions/procd.sh`` are stand-ins after
OpenWrt's: ``procd_close_instance`` starts the instance's command in its own
session (pid in ``var/procd/pid``, output in ``var/procd/service.log``),
``procd_kill`` sends SIGTERM and waits for it to end (SIGKILL after 10 s), as
procd does with ``term_timeout``. No respawn: a crashed bridge stays down, which
is what an update must recover from.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Optional

from tests.helpers.wait import wait_for
from tests.unit.test_packaging import shell

ROOT = Path(__file__).resolve().parents[2]

PROCD_SH = r"""
# stand-in for /lib/functions/procd.sh that runs one instance for real
_dir="$SPOTFI_BRIDGE_ROOT/var/procd"
_alive() {  # a zombie (nobody reaps orphans in a container) is not alive
	[ -r "/proc/$1/stat" ] && ! grep -q '^[0-9]* ([^)]*) Z' "/proc/$1/stat"
}
procd_open_service() { :; }
procd_close_service() { :; }
procd_open_trigger() { :; }
procd_close_trigger() { :; }
procd_add_reload_trigger() { :; }
procd_open_instance() { _cmd=""; }
procd_set_param() {
	[ "$1" = command ] || return 0
	shift
	_cmd="$*"
}
procd_append_param() { :; }
procd_running() { [ -f "$_dir/pid" ] && _alive "$(cat "$_dir/pid")"; }
procd_close_instance() {
	mkdir -p "$_dir"
	procd_running && return 0
	echo "$_cmd" > "$_dir/command"
	setsid $_cmd < /dev/null >> "$_dir/service.log" 2>&1 &
	echo $! > "$_dir/pid"
}
procd_kill() {
	procd_running || return 0
	local pid n=0
	pid=$(cat "$_dir/pid")
	kill -TERM "$pid"
	while _alive "$pid" && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
	kill -KILL "$pid" 2>/dev/null
	# what it left behind in its session (its pid is the process group): nothing may
	# outlive a test
	kill -KILL -- -"$pid" 2>/dev/null
	rm -f "$_dir/pid"
}
procd_send_signal() { procd_running && kill -"$3" "$(cat "$_dir/pid")"; }
"""

RC_COMMON = r"""
# stand-in for /etc/rc.common (procd part), after OpenWrt's; STUB_LOG records
# enable/disable, STUB_PROCD_SH is the procd.sh stand-in to source
initscript=$1
action=${2:-help}
shift 2

extra_command() { EXTRA_COMMANDS="${EXTRA_COMMANDS} $1"; }
start_service() { return 0; }
stop_service() { return 0; }
service_triggers() { return 0; }
enable() { echo "rc.common	enable" >> "$STUB_LOG"; }
disable() { echo "rc.common	disable" >> "$STUB_LOG"; }
enabled() { [ "${STUB_ENABLED:-0}" = 1 ]; }
restart() { stop "$@"; start "$@"; }

. "$initscript"

[ -n "$USE_PROCD" ] || { echo "stub rc.common: USE_PROCD not set" >&2; exit 90; }
. "$STUB_PROCD_SH"
rc_procd() {
	procd_open_service "$(basename "$initscript")" "$initscript"
	"$@"
	procd_close_service set
}
start() { rc_procd start_service "$@"; }
stop() { stop_service "$@"; procd_kill "$(basename "$initscript")" "$1"; }
reload() {
	if type reload_service >/dev/null 2>&1; then reload_service "$@"; else start; fi
}

case " start stop reload restart enable disable enabled ${EXTRA_COMMANDS} " in
*" $action "*) ;;
*) echo "stub rc.common: unknown command $action" >&2; exit 91 ;;
esac
$action "$@"
"""

LOGGER = r"""#!/bin/sh
# logger: appends to var/log/messages what logd would keep
shift_tag=""
while [ $# -gt 0 ]; do
	case "$1" in -t) shift_tag="$2"; shift 2 ;; -p) shift 2 ;; *) break ;; esac
done
echo "$shift_tag: $*" >> "$SPOTFI_BRIDGE_ROOT/var/log/messages"
"""


class ScratchRouter:
    def __init__(self, root: Path, broker_url: str, router_id: str = "test-router",
                 token: str = "test-token", config_extra: str = "",
                 manager: str = "opkg") -> None:
        """``manager``: opkg (OpenWrt 23.05, 24.10) or apk (25.12) on PATH, a fake of it."""
        self.root = root
        self.bin = root / "test-bin"
        for directory in (self.bin, root / "etc/spotfi", root / "lib/functions", root / "tmp",
                          root / "var/log", root / "var/run"):
            directory.mkdir(parents=True, exist_ok=True)
        (root / "etc/rc.common").write_text(RC_COMMON)
        (root / "lib/functions/procd.sh").write_text(PROCD_SH)
        self.manager = self.bin / manager
        self.manager.write_text(f'#!/bin/sh\nexec "{sys.executable}" '
                                f'"{ROOT / f"tests/helpers/fake_{manager}.py"}" "$@"\n')
        (self.bin / "logger").write_text(LOGGER)
        for script in (self.manager, self.bin / "logger"):
            script.chmod(0o755)
        self.config = root / "etc/spotfi/bridge.toml"
        self.config.write_text(f'[router]\nid = "{router_id}"\ntoken = "{token}"\n'
                               f'[mqtt]\nbroker = "{broker_url}"\nkeepalive = 5\n'
                               f'backoff_min = 0.1\nbackoff_max = 1\n[log]\nlevel = "debug"\n'
                               + config_extra)
        self.config.chmod(0o600)
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("SPOTFI_", "PYTHON"))}
        ash = self.bin / "ash"  # the update helper runs in OpenWrt's shell when we have it
        ash.write_text('#!/bin/sh\nexec ' + " ".join(shell()) + ' "$@"\n')
        ash.chmod(0o755)
        self.env.update({
            "PATH": f"{self.bin}:/usr/sbin:/usr/bin:/sbin:/bin",
            "SPOTFI_BRIDGE_SHELL": str(ash),
            "SPOTFI_BRIDGE_ROOT": str(root),
            "SPOTFI_BRIDGE_LIB": str(root / "usr/lib/spotfi-bridge"),
            "SPOTFI_BRIDGE_PYTHON": sys.executable,
            "SPOTFI_CONFIG": str(self.config),
            "SPOTFI_ENV_FILE": os.devnull,  # not this machine's /etc/spotfi.env
            "STUB_LOG": str(root / "var/rc.log"),
            "STUB_PROCD_SH": str(root / "lib/functions/procd.sh"),
        })

    def install(self, package: Path) -> str:
        """Install as the owner would by hand: opkg install FILE, apk add --allow-untrusted."""
        argv = ["install"] if self.manager.name == "opkg" else ["add", "--allow-untrusted"]
        result = subprocess.run([str(self.manager), *argv, str(package)], env=self.env,
                                capture_output=True, text=True, timeout=60, check=True)
        return result.stdout

    def service(self, action: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*shell(), str(self.root / "etc/rc.common"),
                               str(self.root / "etc/init.d/spotfi-bridge"), action],
                              env=self.env, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)

    def service_pid(self) -> Optional[int]:
        try:
            pid = int((self.root / "var/procd/pid").read_text())
        except (OSError, ValueError):
            return None
        return pid if alive(pid) else None

    def command(self) -> str:
        return (self.root / "var/procd/command").read_text().strip()

    def messages(self) -> str:
        path = self.root / "var/log/messages"
        return path.read_text() if path.exists() else ""

    def service_log(self) -> str:
        path = self.root / "var/procd/service.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def cleanup(self, extra_pids: tuple[int, ...] = ()) -> None:
        """Stop the service and whatever the test started (an update helper)."""
        for pid in extra_pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        if self.service_pid() is not None:
            self.service("stop", timeout=30)
        pid = self.service_pid()
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            wait_for(lambda: not alive(pid), 10, "the service to die")


def alive(pid: int) -> bool:
    """Running (a zombie nobody reaped does not count)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(") ", 1)[1][:1] != "Z"
    except (OSError, IndexError):
        return False
