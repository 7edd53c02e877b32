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
  fail.timeout) exit 7 ;;
  fail.partial) echo '{"partial":true}'; exit 9 ;;
  fail.weird) exit 42 ;;
  *) exit 4 ;;
esac
"""


def write_fake_ubus(directory: Path) -> Path:
    """Write ``directory/ubus`` (executable) and return its path."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "ubus"
    path.write_text(_SCRIPT.replace("@SYSTEM_INFO@", json.dumps(SYSTEM_INFO,
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


