"""What the tests read about a live process from /proc: memory, fds, children, fd flags,
state and session."""

from __future__ import annotations

import os
from typing import Optional

O_CLOEXEC = 0o2000000


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def threads(pid: int) -> int:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    raise AssertionError(f"no Threads for pid {pid}")


def fd_targets(pid: int) -> dict[int, str]:
    """fd number → what it points at (``socket:[123]``, ``/dev/pts/3``, ``pipe:[9]``...)."""
    targets = {}
    directory = f"/proc/{pid}/fd"
    for name in os.listdir(directory):
        try:
            targets[int(name)] = os.readlink(f"{directory}/{name}")
        except FileNotFoundError:  # closed while we looked
            continue
    return targets


def fd_flags(pid: int, fd: int) -> Optional[int]:
    """The open flags of ``fd`` (``O_CLOEXEC`` among them), None when it is gone."""
    try:
        with open(f"/proc/{pid}/fdinfo/{fd}") as handle:
            for line in handle:
                if line.startswith("flags:"):
                    return int(line.split()[1], 8)
    except FileNotFoundError:
        return None
    return None


def _stat_fields(pid: int) -> Optional[list[str]]:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            text = handle.read()
    except OSError:
        return None
    # comm may hold spaces and parentheses: split after the last ')'
    return text[text.rindex(")") + 2:].split()


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (zombies included)."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        fields = _stat_fields(int(name))
        if fields is not None and int(fields[1]) == pid:
            found.append(int(name))
    return found


def state(pid: int) -> Optional[str]:
    """One-letter process state (``Z`` for a zombie), None when it is gone."""
    fields = _stat_fields(pid)
    return fields[0] if fields else None


def alive(pid: int) -> bool:
    """Running or sleeping: neither gone nor a zombie (which no signal reaches)."""
    return state(pid) not in (None, "Z", "X")


def session_id(pid: int) -> Optional[int]:
    fields = _stat_fields(pid)
    return int(fields[3]) if fields else None


def start_time(pid: int) -> Optional[str]:
    """Clock ticks after boot: with the pid, names one process (pids get reused)."""
    fields = _stat_fields(pid)
    return fields[19] if fields else None


def session_members(sid: int) -> list[int]:
    """Live processes of session ``sid``, whatever their process group."""
    return [int(name) for name in os.listdir("/proc")
            if name.isdigit() and session_id(int(name)) == sid and alive(int(name))]


def comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as handle:
            return handle.read().strip()
    except OSError:
        return ""


def cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return [part.decode(errors="replace") for part in handle.read().split(b"\0") if part]
    except OSError:
        return []
