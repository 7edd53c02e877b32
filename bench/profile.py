"""Optional py-spy sampling of the bridge, one profile per bench phase (``BENCH_PROFILE=1``).

Sampling from outside (``--nonblocking``: the bridge is never paused) keeps the
figures close to an unprofiled run, and tells where a missed target's time goes,
function by function, without touching the daemon's code.
"""

from __future__ import annotations

import collections
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Optional

RATE = 1000  # samples per second


def find_py_spy() -> Optional[str]:
    explicit = os.environ.get("BENCH_PY_SPY")
    if explicit:
        return explicit
    beside = Path(os.path.dirname(os.path.abspath(__import__("sys").executable))) / "py-spy"
    if beside.exists():
        return str(beside)
    return shutil.which("py-spy")


class Recording:
    """``py-spy record`` of one process until :meth:`stop`."""

    def __init__(self, py_spy: str, pid: int, out: Path) -> None:
        self.out = out
        self.proc = subprocess.Popen(
            [py_spy, "record", "--pid", str(pid), "--rate", str(RATE), "--nonblocking",
             "--format", "raw", "--threads", "-o", str(out)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)

    def stop(self) -> Optional[Path]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # py-spy writes its file on Ctrl-C
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            return None
        return self.out if self.out.exists() else None


_FRAME = re.compile(r"^(?P<func>.+?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def _name(frame: str) -> str:
    """``func (path/to/module.py:12)`` → ``func (module.py)``: one row per function."""
    match = _FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    path = match.group("file")
    parts = path.split("/")
    short = "/".join(parts[-2:]) if "spotfi_bridge" in path else parts[-1]
    return f"{match.group('func')} ({short})"


def summarize(path: Path, top: int = 15) -> dict[str, object]:
    """Self and inclusive share of on-CPU samples per function, from py-spy's raw stacks."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_name(f) for f in stack.split(";") if f and not f.startswith("thread (")
                  and not f.startswith("process ")]
        if not frames:
            continue
        total += count
        own[frames[-1]] += count
        for name in set(frames):
            inclusive[name] += count
    return {
        "samples": total,
        "cpu_seconds": round(total / RATE, 3),
        "self": [(name, round(100 * n / total, 1)) for name, n in own.most_common(top)] if total else [],
        "inclusive": [(name, round(100 * n / total, 1)) for name, n in inclusive.most_common(top)]
        if total else [],
    }


def render(name: str, summary: dict[str, object]) -> str:
    lines = [f"== {name}: {summary['samples']} on-CPU samples (~{summary['cpu_seconds']} s CPU)"]
    for title in ("self", "inclusive"):
        lines.append(f"   {title}:")
        rows = summary[title]
        assert isinstance(rows, list)
        for func, share in rows:
            lines.append(f"     {share:5.1f}%  {func}")
    return "\n".join(lines)
