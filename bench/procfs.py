"""What a process costs, read from ``/proc``: CPU time and context switches of every thread, RSS."""

from __future__ import annotations

import os
from dataclasses import dataclass

CLOCK_TICK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class ThreadCost:
    cpu_ns: int  # schedstat's on-CPU time when the kernel has it, else utime+stime
    switches: int  # voluntary + nonvoluntary context switches


@dataclass(frozen=True)
class Snapshot:
    threads: dict[int, ThreadCost]
    #: utime+stime of the whole process (dead threads included), in ns, tick resolution
    process_cpu_ns: int
    #: CPU time of reaped children (cutime+cstime), in ns
    children_cpu_ns: int


def _stat_fields(path: str) -> list[str]:
    with open(path) as handle:
        text = handle.read()
    # the command name may contain spaces and parentheses: split after the last ')'
    return text[text.rindex(")") + 2:].split()


def _thread_cost(task_dir: str) -> ThreadCost:
    fields = _stat_fields(f"{task_dir}/stat")
    ticks_ns = (int(fields[11]) + int(fields[12])) * 1_000_000_000 // CLOCK_TICK
    try:
        with open(f"{task_dir}/schedstat") as handle:
            cpu_ns = int(handle.read().split()[0])
    except (OSError, ValueError, IndexError):
        cpu_ns = ticks_ns
    switches = 0
    with open(f"{task_dir}/status") as handle:
        for line in handle:
            if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                switches += int(line.split()[1])
    return ThreadCost(cpu_ns, switches)


def snapshot(pid: int) -> Snapshot:
    threads: dict[int, ThreadCost] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            threads[int(tid)] = _thread_cost(f"/proc/{pid}/task/{tid}")
        except (OSError, ValueError):  # the thread ended while we looked
            continue
    fields = _stat_fields(f"/proc/{pid}/stat")
    tick = 1_000_000_000 // CLOCK_TICK
    return Snapshot(threads, (int(fields[11]) + int(fields[12])) * tick,
                    (int(fields[13]) + int(fields[14])) * tick)


@dataclass(frozen=True)
class Cost:
    cpu_s: float
    switches: int
    threads: int
    children_cpu_s: float


def cost_between(before: Snapshot, after: Snapshot) -> Cost:
    """Threads born in between count from zero; threads that died take their switches along."""
    cpu = 0
    switches = 0
    for tid, now in after.threads.items():
        was = before.threads.get(tid, ThreadCost(0, 0))
        cpu += now.cpu_ns - was.cpu_ns
        switches += now.switches - was.switches
    return Cost(cpu / 1e9, switches, len(after.threads),
                (after.children_cpu_ns - before.children_cpu_ns) / 1e9)


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS (now) and VmHWM (peak since start) in KiB."""
    values: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            key = line.split(":", 1)[0]
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(line.split()[1])
    return values


def thread_names(pid: int) -> list[str]:
    names = []
    for tid in sorted(os.listdir(f"/proc/{pid}/task")):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as handle:
                names.append(handle.read().strip())
        except OSError:
            continue
    return names
