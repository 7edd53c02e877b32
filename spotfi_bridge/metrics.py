"""The metrics payload (the API's heartbeat) and the timer that publishes it.

Compat fields come from ``ubus call system info`` / ``uspot client_list`` when
ubus exists (as the Go bridge sends them), else from psutil. Extensions sit
beside them, read from ``/proc`` the way psutil reads them, so that a router,
where ubus answers, never loads psutil (about 1 MB of RSS). Each collector
fails alone: its fields are left out, it is logged once, and the heartbeat
still goes out.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import time
from typing import Any, Callable, Optional

from spotfi_bridge import __version__
from spotfi_bridge.aio import child_environment
from spotfi_bridge.protocol import metrics_message

log = logging.getLogger("spotfi_bridge.metrics")

UBUS_TIMEOUT = 5.0


async def ubus_call(path: str, method: str, timeout: float = UBUS_TIMEOUT) -> Any:
    """``ubus call`` as a child the loop waits on (never a blocking subprocess.run)."""
    proc = await asyncio.create_subprocess_exec(
        "ubus", "-S", "-t", str(int(timeout)), "call", path, method,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, start_new_session=True, env=child_environment())
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout + 1)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise RuntimeError(f"ubus call {path} {method} timed out") from None
    if proc.returncode != 0:
        raise RuntimeError(f"ubus call {path} {method} failed with status {proc.returncode}: "
                           f"{err.decode(errors='replace').strip()[:200]}")
    return json.loads(out or b"{}")


def count_uspot_clients(client_list: Any) -> int:
    """Sum of entries over interfaces: ``{"iface": {"mac": {...}, ...}, ...}``."""
    if not isinstance(client_list, dict):
        return 0
    total = 0
    for clients in client_list.values():
        if isinstance(clients, (dict, list)):
            total += len(clients)
    return total


def _disk(path: str) -> Optional[dict[str, int]]:
    if not os.path.isdir(path):
        return None
    usage = shutil.disk_usage(path)
    return {"total": usage.total, "used": usage.used, "free": usage.free}


# --------------------------------------------------------------------------- /proc, as psutil


def cpu_times() -> tuple[int, int]:
    """``(busy, total)`` jiffies of all CPUs from ``/proc/stat``, counted as psutil's
    ``cpu_percent`` counts them: guest time is already in user and nice, iowait is idle."""
    with open("/proc/stat", "rb") as handle:
        fields = [int(value) for value in handle.readline().split()[1:]]
    total = sum(fields) - sum(fields[8:10])  # minus guest, guest_nice
    idle = sum(fields[3:5])  # idle, iowait
    return total - idle, total


def cpu_percent(before: tuple[int, int], after: tuple[int, int]) -> float:
    busy = max(0, after[0] - before[0])
    total = max(0, after[1] - before[1])
    return round(busy / total * 100, 1) if total else 0.0


def meminfo() -> dict[str, int]:
    """``/proc/meminfo`` in bytes."""
    values: dict[str, int] = {}
    with open("/proc/meminfo", "rb") as handle:
        for line in handle:
            name, _, rest = line.partition(b":")
            fields = rest.split()
            if fields:
                values[name.decode()] = int(fields[0]) * 1024
    return values


def net_counters() -> dict[str, tuple[int, int]]:
    """``{interface: (received bytes, sent bytes)}`` from ``/proc/net/dev``."""
    counters = {}
    with open("/proc/net/dev", "rb") as handle:
        for line in handle.readlines()[2:]:
            name, _, rest = line.rpartition(b":")
            fields = rest.split()
            counters[name.strip().decode(errors="replace")] = (int(fields[0]), int(fields[8]))
    return counters


def own_rss() -> int:
    """This process's resident set in bytes (``/proc/self/statm``)."""
    with open("/proc/self/statm", "rb") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class MetricsCollector:
    """Builds one metrics dict; keeps the previous counters to turn them into rates."""

    def __init__(self, use_ubus: Optional[bool] = None,
                 extra: Optional[Callable[[], dict[str, Any]]] = None) -> None:
        self.use_ubus = shutil.which("ubus") is not None if use_ubus is None else use_ubus
        self._extra = extra
        self._failed: set[str] = set()
        self._last_net: Optional[tuple[float, dict[str, Any]]] = None
        self._cpu_times = cpu_times()  # the first reading covers the time since start

    async def collect(self) -> dict[str, Any]:
        metrics: dict[str, Any] = {}
        if self.use_ubus:
            await self._guard("system info (ubus)", self._ubus_system, metrics)
            await self._guard("uspot clients (ubus)", self._ubus_uspot, metrics)
            metrics.setdefault("activeUsers", 0)  # no uspot: no hotspot clients
        else:
            await self._guard("system (psutil)", self._local_system, metrics)
            metrics.setdefault("activeUsers", 0)
        await self._guard("host", self._host, metrics)
        await self._guard("interfaces", self._interfaces, metrics)
        await self._guard("bridge", self._bridge, metrics)
        return metrics

    async def _guard(self, name: str, collector: Callable[[dict[str, Any]], Any],
                     metrics: dict[str, Any]) -> None:
        try:
            result = collector(metrics)
            if asyncio.iscoroutine(result):
                await result
        except Exception as exc:
            if name not in self._failed:
                self._failed.add(name)
                log.warning("metrics collector %s failed, its fields are left out: %s", name, exc)
        else:
            if name in self._failed:
                self._failed.discard(name)
                log.info("metrics collector %s works again", name)

    async def _ubus_system(self, metrics: dict[str, Any]) -> None:
        info = await ubus_call("system", "info")
        memory = info.get("memory", {})
        metrics["uptime"] = str(int(info["uptime"]))
        metrics["cpuLoad"] = round(info["load"][0] / 65535 * 100, 2)
        metrics["totalMemory"] = memory["total"]
        metrics["freeMemory"] = memory["free"]

    async def _ubus_uspot(self, metrics: dict[str, Any]) -> None:
        metrics["activeUsers"] = count_uspot_clients(await ubus_call("uspot", "client_list"))

    def _local_system(self, metrics: dict[str, Any]) -> None:
        import psutil  # no ubus to ask (a dry run on a PC): only then

        memory = psutil.virtual_memory()
        metrics["uptime"] = str(int(time.time() - psutil.boot_time()))
        metrics["cpuLoad"] = round(os.getloadavg()[0] * 100, 2)
        metrics["totalMemory"] = memory.total
        metrics["freeMemory"] = memory.free

    def _host(self, metrics: dict[str, Any]) -> None:
        memory = meminfo()
        now = cpu_times()
        metrics["cpuPercent"] = cpu_percent(self._cpu_times, now)
        self._cpu_times = now
        metrics["loadAvg"] = [round(value, 2) for value in os.getloadavg()]
        metrics["availableMemory"] = memory["MemAvailable"]
        metrics["cachedMemory"] = memory.get("Cached", 0) + memory.get("SReclaimable", 0)
        overlay = _disk("/overlay") or _disk("/")
        if overlay:
            metrics["overlay"] = overlay
        tmp = _disk("/tmp")
        if tmp:
            metrics["tmp"] = tmp

    def _interfaces(self, metrics: dict[str, Any]) -> None:
        now = time.monotonic()
        counters = net_counters()
        previous = self._last_net
        self._last_net = (now, counters)
        interfaces: dict[str, Any] = {}
        for name, (received, sent) in counters.items():
            entry: dict[str, Any] = {"rxBytes": received, "txBytes": sent}
            if previous is not None and name in previous[1] and now > previous[0]:
                elapsed = now - previous[0]
                rx, tx = previous[1][name]
                entry["rxRate"] = max(0, round((received - rx) / elapsed, 1))
                entry["txRate"] = max(0, round((sent - tx) / elapsed, 1))
            interfaces[name] = entry
        metrics["interfaces"] = interfaces

    def _bridge(self, metrics: dict[str, Any]) -> None:
        metrics["bridgeVersion"] = __version__
        metrics["bridgeRss"] = own_rss()
        if self._extra is not None:
            metrics.update(self._extra())


class MetricsPublisher:
    """First metrics right after every connect, then every ``interval`` seconds.

    Nothing is queued while disconnected: a stale backlog of heartbeats is worse
    than one fresh message on reconnect.
    """

    def __init__(self, collector: MetricsCollector, publish: Callable[[bytes], bool],
                 is_connected: Callable[[], bool], interval: float,
                 on_failure: Optional[Callable[[str, BaseException], None]] = None) -> None:
        """``on_failure(what, exc)``: an unexpected exception in a publishing task (the daemon
        ends on it; without it, it is only logged)."""
        self._collector = collector
        self._on_failure = on_failure
        self._publish = publish
        self._is_connected = is_connected
        self.interval = interval
        self._timer: Optional[asyncio.TimerHandle] = None
        self._task: Optional[asyncio.Task[None]] = None
        self.sent = 0
        self.skipped = 0

    def on_connected(self) -> None:
        self._publish_soon()

    def _publish_soon(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._publish_once())
            self._task.add_done_callback(self._publish_done)
        self._timer = asyncio.get_running_loop().call_later(self.interval, self._publish_soon)

    async def _publish_once(self) -> None:
        if not self._is_connected():
            self.skipped += 1
            return
        try:
            metrics = await self._collector.collect()
        except Exception:  # pragma: no cover - collect() guards each collector
            log.exception("metrics collection failed")
            return
        if self._is_connected() and self._publish(metrics_message(metrics)):
            self.sent += 1
        else:
            self.skipped += 1

    def _publish_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        exc = task.exception()
        assert exc is not None
        if self._on_failure is not None:
            self._on_failure("metrics", exc)
        else:
            log.error("metrics publishing failed", exc_info=exc)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._task is not None:
            self._task.cancel()
