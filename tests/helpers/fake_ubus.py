"""RPC test kit: a fake ``ubus`` executable, a collecting publisher, an asyncio runner.

The fake ``ubus`` is a real /bin/sh script on PATH that parses the same argv as
OpenWrt's CLI (``ubus -S -t N -- call path method json``) and answers the way
ubus does: JSON on stdout and exit 0, or a ``UBUS_STATUS_*`` exit code.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any, Awaitable, Callable, Optional, TypeVar

from spotfi_bridge import aio
from spotfi_bridge.publish import OnSent

T = TypeVar("T")

SYSTEM_INFO = {"uptime": 4242, "localtime": 1700000000, "load": [6553, 3276, 0],
               "memory": {"total": 134217728, "free": 67108864, "shared": 0, "buffered": 0,
                          "available": 80000000, "cached": 1000000},
               "swap": {"total": 0, "free": 0}}

_SCRIPT = r"""#!/bin/sh
# fake ubus written by the tests (tests/helpers/fake_ubus.py)
[ -n "$FAKE_UBUS_ARGV" ] && printf '%s\0' "$@" > "$FAKE_UBUS_ARGV"
timeout=30
while [ $# -gt 0 ]; do
  case "$1" in
    -S) shift ;;
    -t) timeout="$2"; shift 2 ;;
    --) shift; break ;;
    call) break ;;
    *) echo "fake ubus: unexpected option $1" >&2; exit 1 ;;
  esac
done
[ "$1" = call ] || { echo "fake ubus: expected 'call', got '$1'" >&2; exit 1; }
path="$2"; method="$3"; args="$4"
[ -n "$FAKE_UBUS_RUNS" ] && echo "$path $method" >> "$FAKE_UBUS_RUNS"
[ -n "$FAKE_UBUS_CALLS" ] && printf '%s %s %s\n' "$path" "$method" "$args" >> "$FAKE_UBUS_CALLS"
case "$path.$method" in
  system.info) echo '@SYSTEM_INFO@' ;;
  file.exec) echo '{"code":0,"stdout":"","stderr":""}' ;;
  system.*) exit 3 ;;
  echo.args) printf '{"timeout":%s,"args":%s}\n' "$timeout" "$args" ;;
  echo.empty) ;;
  echo.text) echo "hello, not json" ;;
  echo.stderr) echo '{"ok":1}'; echo "a warning" >&2 ;;
  slow.call) sleep 60 ;;
  slow.short) sleep 0.2; echo '{"slept":true}' ;;
  fork.grandchild)
    sleep 300 &
    echo $! > "$FAKE_UBUS_PIDFILE"
    wait ;;
  huge.stdout) head -c 3000000 /dev/zero | tr '\0' 'x' ;;
  huge.json) printf '{"data":"'; head -c 3000000 /dev/zero | tr '\0' 'x'; printf '"}\n' ;;
  huge.stderr) head -c 3000000 /dev/zero | tr '\0' 'e' >&2; echo '{}' ;;
  fail.denied) echo "access denied by ACL" >&2; exit 6 ;;
  fail.invalid) exit 2 ;;
  fail.timeout) sleep 0.01; exit 7 ;;
  fail.unreachable) exit 255 ;;
  fail.killed) kill -TERM $$ ;;
  fail.partial) echo '{"partial":true}'; exit 9 ;;
  fail.weird) exit 42 ;;
  log.read)
    # logd streams unless "stream": false, through a file descriptor the CLI ignores
    case "$args" in *'"stream":false'*) ;; *) exit 0 ;; esac
    lines=$(printf '%s' "$args" | sed -n 's/.*"lines":\([0-9][0-9]*\).*/\1/p')
    total=5
    { [ -n "$lines" ] && [ "$lines" -gt 0 ] && [ "$lines" -lt $total ]; } || lines=$total
    i=$((total - lines + 1)); sep=''
    printf '{"log":['
    while [ $i -le $total ]; do
      printf '%s{"msg":"fake logd line %d","id":%d,"priority":30,"source":1,"time":%d}' \
        "$sep" $i $i $((1700000000000 + i)); sep=','; i=$((i + 1))
    done
    printf ']}\n' ;;
  service.list)
    # procd: {} for a service it does not run; its instances for one it does
    name=$(printf '%s' "$args" | sed -n 's/.*"name":"\([^"]*\)".*/\1/p')
    if [ -n "$name" ] && [ -n "$FAKE_PROCD_STATE" ] && [ -e "$FAKE_PROCD_STATE/$name.running" ]; then
      instance='"instance1":{"running":true,"pid":%s,"command":["/usr/sbin/%s"],"term_timeout":5}'
      printf "{\"%s\":{\"instances\":{$instance}}}\n" \
        "$name" "$(cat "$FAKE_PROCD_STATE/$name.running")" "$name"
    else
      echo '{}'
    fi ;;
  service.set|service.add|service.delete|service.signal|service.update_start) ;;
  service.update_complete|service.event|service.validate|service.get_data) ;;
  service.state|service.watchdog) ;;
  service.*) exit 3 ;;
  hostapd.wlan0.get_status) echo '@HOSTAPD_STATUS@' ;;
  hostapd.wlan0.*) exit 3 ;;
  *) exit 4 ;;
esac
"""

#: ``ubus call hostapd.wlan0 get_status`` on an OpenWrt 23.05 access point
HOSTAPD_STATUS = {"status": "ENABLED", "bssid": "02:11:22:33:44:55", "ssid": "SpotFi",
                  "freq": 2437, "channel": 6, "op_class": 81, "beacon_interval": 100,
                  "phy": "phy0", "rrm": {"neighbor_report_tx": 0},
                  "airtime": {"time": 123, "time_busy": 45, "utilization": 12}}

_INIT_SCRIPT = r"""#!/bin/sh
# fake OpenWrt init script written by the tests (tests/helpers/fake_ubus.py): records each
# action and keeps the state procd and /etc/rc.d would keep, where the fake ubus reads it
name="${0##*/}"
state="@STATE@"
echo "$name $*" >> "$state/actions"
case "$1" in
  start|restart|reload) echo 4242 > "$state/$name.running" ;;
  stop) rm -f "$state/$name.running" ;;
  enable) : > "$state/$name.enabled" ;;
  disable) rm -f "$state/$name.enabled" ;;
  enabled) [ -e "$state/$name.enabled" ] ;;
  *) echo "Syntax: /etc/init.d/$name [command]" >&2; exit 1 ;;
esac
"""

_FAILING_INIT_SCRIPT = r"""#!/bin/sh
echo "${0##*/} $*" >> "@STATE@/actions"
echo "${0##*/}: cannot $1: missing /etc/config/${0##*/}" >&2
exit 1
"""

#: the bridge's own script: like procd, stop and restart end the bridge that runs it (its
#: parent); then it waits (bounded) until that bridge is gone and says it outlived it
_SELF_INIT_SCRIPT = r"""#!/bin/sh
state="@STATE@"
echo "spotfi-bridge $* (parent $PPID)" >> "$state/actions"
case "$1" in
  stop|restart)
    kill -TERM "$PPID"
    n=0
    while kill -0 "$PPID" 2>/dev/null && [ $n -lt 300 ]; do sleep 0.1; n=$((n + 1)); done
    echo "spotfi-bridge $1 outlived its parent" >> "$state/actions" ;;
esac
"""


def write_init_dir(directory: Path, state: Path) -> Path:
    """A fake /etc/init.d: ``network`` and ``dnsmasq`` (well-behaved), ``broken`` (exits 1),
    ``spotfi-bridge`` (stops its parent, the bridge); actions go to ``state/actions``."""
    directory.mkdir(parents=True, exist_ok=True)
    state.mkdir(parents=True, exist_ok=True)
    scripts = {"network": _INIT_SCRIPT, "dnsmasq": _INIT_SCRIPT,
               "broken": _FAILING_INIT_SCRIPT, "spotfi-bridge": _SELF_INIT_SCRIPT}
    for name, text in scripts.items():
        path = directory / name
        path.write_text(text.replace("@STATE@", str(state)))
        path.chmod(0o755)
    return directory


def actions(state: Path) -> list[str]:
    """What the fake init scripts recorded, in order."""
    path = state / "actions"
    return path.read_text().splitlines() if path.exists() else []


def write_fake_ubus(directory: Path) -> Path:
    """Write ``directory/ubus`` (executable) and return its path."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "ubus"
    path.write_text(_SCRIPT.replace("@SYSTEM_INFO@", json.dumps(SYSTEM_INFO, separators=(",", ":")))
                    .replace("@HOSTAPD_STATUS@", json.dumps(HOSTAPD_STATUS,
                                                            separators=(",", ":"))))
    path.chmod(0o755)
    return path


class Collector:
    """A :class:`~spotfi_bridge.publish.Publisher` that keeps what it is given."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, bytes, int]] = []
        self.refuse = False

    def __call__(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False,
                 on_sent: Optional[OnSent] = None) -> bool:
        self.messages.append((topic, payload, qos))
        if self.refuse:
            return False
        if on_sent is not None:
            asyncio.get_running_loop().call_soon(on_sent)
        return True

    def replies(self) -> list[dict[str, Any]]:
        return [json.loads(payload) for _, payload, _ in self.messages]

    def by_id(self) -> dict[str, list[dict[str, Any]]]:
        """Replies grouped by the JSON text of their id (so 1 and "1" stay apart)."""
        grouped: dict[str, list[dict[str, Any]]] = {}
        for reply in self.replies():
            grouped.setdefault(json.dumps(reply.get("id")), []).append(reply)
        return grouped

    def reply(self, req_id: Any) -> dict[str, Any]:
        matches = self.by_id().get(json.dumps(req_id), [])
        assert len(matches) == 1, f"expected one reply for {req_id!r}, got {matches!r}"
        return matches[0]


def run(body: Callable[[], Awaitable[T]]) -> T:
    """Run ``body()`` on a fresh loop with the daemon's child watcher installed."""
    async def main() -> T:
        aio.install_child_watcher()
        return await body()
    return asyncio.run(main())


def process_gone(pid: int) -> bool:
    """Dead: no such process, or a zombie waiting for init (it can no longer run)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            state = handle.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state in ("Z", "X")


def path_with(directory: Path) -> str:
    return f"{directory}{os.pathsep}{os.environ.get('PATH', '')}"


