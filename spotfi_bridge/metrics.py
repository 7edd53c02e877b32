"""The metrics payload (the API's heartbeat) and the timer that publishes it.

Compat fields come from ``ubus call system info`` / ``uspot client_list`` when
ubus exists (as the Go bridge sends them), else from psutil and ``/proc``.
Extensions sit beside them. Each collector fails alone: its fields are left
out, it is logged once, and the heartbeat still goes out.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import time
from typing import Any, Callable, Optional

import psutil

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


class MetricsCollector:
    """Builds one metrics dict; keeps the previous counters to turn them into rates."""

    def __init__(self, use_ubus: Optional[bool] = None,
                 extra: Optional[Callable[[], dict[str, Any]]] = None) -> None:
        self.use_ubus = shutil.which("ubus") is not None if use_ubus is None else use_ubus
        self._extra = extra
        self._failed: set[str] = set()
        self._last_net: Optional[tuple[float, dict[str, Any]]] = None
        self._process = psutil.Process()
        psutil.cpu_percent(interval=None)  # prime: the first real reading covers one interval

    async def collect(self) -> dict[str, Any]:
        metrics: dict[str, Any] = {}
        if self.use_ubus:
            await self._guard("system info (ubus)", self._ubus_system, metrics)
            await self._guard("uspot clients (ubus)", self._ubus_uspot, metrics)
            metrics.setdefault("activeUsers", 0)  # no uspot: no hotspot clients
        else:
            await self._guard("system (psutil)", self._local_system, metrics)
            metrics.setdefault("activeUsers", 0)
        await self._guard("host (psutil)", self._host, metrics)
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
        memory = psutil.virtual_memory()
        metrics["uptime"] = str(int(time.time() - psutil.boot_time()))
        metrics["cpuLoad"] = round(os.getloadavg()[0] * 100, 2)
        metrics["totalMemory"] = memory.total
        metrics["freeMemory"] = memory.free

    def _host(self, metrics: dict[str, Any]) -> None:
        memory = psutil.virtual_memory()
        metrics["cpuPercent"] = psutil.cpu_percent(interval=None)
        metrics["loadAvg"] = [round(value, 2) for value in os.getloadavg()]
        metrics["availableMemory"] = memory.available
        metrics["cachedMemory"] = getattr(memory, "cached", 0)
        overlay = _disk("/overlay") or _disk("/")
        if overlay:
            metrics["overlay"] = overlay
        tmp = _disk("/tmp")
        if tmp:
            metrics["tmp"] = tmp

    def _interfaces(self, metrics: dict[str, Any]) -> None:
        now = time.monotonic()
        counters = psutil.net_io_counters(pernic=True)
        previous = self._last_net
        self._last_net = (now, {name: (c.bytes_recv, c.bytes_sent) for name, c in counters.items()})
        interfaces: dict[str, Any] = {}
        for name, c in counters.items():
            entry: dict[str, Any] = {"rxBytes": c.bytes_recv, "txBytes": c.bytes_sent}
            if previous is not None and name in previous[1] and now > previous[0]:
                elapsed = now - previous[0]
                rx, tx = previous[1][name]
                entry["rxRate"] = max(0, round((c.bytes_recv - rx) / elapsed, 1))
                entry["txRate"] = max(0, round((c.bytes_sent - tx) / elapsed, 1))
            interfaces[name] = entry
        metrics["interfaces"] = interfaces

    def _bridge(self, metrics: dict[str, Any]) -> None:
        metrics["bridgeVersion"] = __version__
        metrics["bridgeRss"] = self._process.memory_info().rss
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
