"""Metrics: the compat fields the API reads, the extensions, failing collectors, the timer.

ubus is a real /bin/sh script on PATH that answers from JSON files the test writes,
so each test can make ``system info`` or ``uspot client_list`` fail or recover.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Awaitable, Callable, Optional, TypeVar

import pytest

from spotfi_bridge import __version__
from spotfi_bridge.metrics import (
    MetricsCollector,
    MetricsPublisher,
    count_uspot_clients,
    cpu_times,
    meminfo,
    net_counters,
    own_rss,
)

T = TypeVar("T")

SYSTEM_INFO = {
    "localtime": 1734602400, "uptime": 123456, "load": [13824, 9600, 7744],
    "memory": {"total": 128974848, "free": 45678592, "shared": 94208, "buffered": 4096,
               "available": 60112896, "cached": 20480000},
    "root": {"total": 4608, "free": 3540, "used": 1068, "avail": 3540},
    "tmp": {"total": 62976, "free": 62800, "used": 176, "avail": 62800},
    "swap": {"total": 0, "free": 0},
}
USPOT_CLIENTS = {
    "hotspot": {
        "AA:BB:CC:00:00:01": {"ip4addr": "10.0.0.23", "state": 1, "idle": 12, "seen": 300,
                              "bytes_ul": 1234, "bytes_dl": 56789, "username": "guest1"},
        "AA:BB:CC:00:00:02": {"ip4addr": "10.0.0.31", "state": 1, "idle": 0, "seen": 40,
                              "bytes_ul": 0, "bytes_dl": 0},
    },
    "hotspot5g": {
        "AA:BB:CC:00:00:03": {"ip4addr": "10.0.1.8", "state": 1, "idle": 3, "seen": 75},
    },
    "lobby": {},
}

_UBUS = r"""#!/bin/sh
# fake ubus written by tests/unit/test_metrics.py: answers from @DIR@/<path>.<method>.json
printf '%s\n' "$*" >> "@DIR@/calls.log"
env > "@DIR@/env.log"
while [ $# -gt 0 ]; do
  case "$1" in
    -S) shift ;;
    -t) shift 2 ;;
    *) break ;;
  esac
done
[ "$1" = call ] || { echo "usage: ubus call <path> <method>" >&2; exit 1; }
answer="@DIR@/$2.$3"
if [ -f "$answer.status" ]; then
  echo "Command failed: $(cat "$answer.status")" >&2
  exit 4
fi
[ -f "$answer.json" ] || { echo "Command failed: Not found" >&2; exit 4; }
cat "$answer.json"
"""


class FakeUbus:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        directory.mkdir()
        script = directory / "ubus"
        script.write_text(_UBUS.replace("@DIR@", str(directory)))
        script.chmod(0o755)

    def answer(self, path: str, method: str, value: Any) -> None:
        (self.dir / f"{path}.{method}.json").write_text(json.dumps(value))
        (self.dir / f"{path}.{method}.status").unlink(missing_ok=True)

    def fail(self, path: str, method: str, reason: str = "Not found") -> None:
        (self.dir / f"{path}.{method}.status").write_text(reason)

    def calls(self) -> list[str]:
        log = self.dir / "calls.log"
        return log.read_text().splitlines() if log.exists() else []


@pytest.fixture
def ubus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeUbus:
    fake = FakeUbus(tmp_path / "ubus-bin")
    monkeypatch.setenv("PATH", f"{fake.dir}{os.pathsep}{os.environ.get('PATH', '')}")
    fake.answer("system", "info", SYSTEM_INFO)
    fake.answer("uspot", "client_list", USPOT_CLIENTS)
    return fake


def run(coro_fn: Callable[[], Awaitable[T]], timeout: float = 10.0) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro_fn(), timeout)
    return asyncio.run(bounded())


async def until(condition: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    """Bounded wait on a condition inside the loop (the asyncio twin of tests.helpers.wait)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.005)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# --------------------------------------------------------------------------- uspot counting


@pytest.mark.parametrize(("client_list", "expected"), [
    (USPOT_CLIENTS, 3),
    ({}, 0),
    ({"hotspot": {}}, 0),
    ({"hotspot": {"AA:BB:CC:00:00:01": {"state": 1}}}, 1),
    ({"a": {"m1": {}, "m2": {}}, "b": {"m3": {}, "m4": {}, "m5": {}}}, 5),
    ({"hotspot": [{"mac": "m1"}, {"mac": "m2"}]}, 2),        # list-shaped answers count too
    ({"hotspot": {"m1": {}}, "broken": 7, "odd": "text"}, 1),  # non-containers ignored
    (None, 0),
    ([], 0),
    ("Command failed", 0),
])
def test_count_uspot_clients(client_list: Any, expected: int) -> None:
    assert count_uspot_clients(client_list) == expected


# --------------------------------------------------------------------------- local (psutil)


def test_local_collection_has_compat_fields_with_the_right_types() -> None:
    collector = MetricsCollector(use_ubus=False, extra=lambda: {"openSessions": 2})
    metrics = run(collector.collect)

    assert isinstance(metrics["uptime"], str) and metrics["uptime"].isdigit()
    assert int(metrics["uptime"]) > 0
    assert is_number(metrics["cpuLoad"]) and metrics["cpuLoad"] >= 0
    assert is_int(metrics["totalMemory"]) and metrics["totalMemory"] > 0
    assert is_int(metrics["freeMemory"]) and 0 <= metrics["freeMemory"] <= metrics["totalMemory"]
    assert metrics["activeUsers"] == 0 and is_int(metrics["activeUsers"])

    # extensions beside them
    assert is_number(metrics["cpuPercent"])
    assert len(metrics["loadAvg"]) == 3 and all(is_number(v) for v in metrics["loadAvg"])
    assert metrics["cpuLoad"] == pytest.approx(metrics["loadAvg"][0] * 100, abs=1)
    assert is_int(metrics["availableMemory"]) and is_int(metrics["cachedMemory"])
    for disk in ("overlay", "tmp"):
        assert set(metrics[disk]) == {"total", "used", "free"}
        assert all(is_int(v) for v in metrics[disk].values())
    assert "lo" in metrics["interfaces"]
    assert all(is_int(v) for v in metrics["interfaces"]["lo"].values())
    assert metrics["bridgeVersion"] == __version__
    assert is_int(metrics["bridgeRss"]) and metrics["bridgeRss"] > 0
    assert metrics["openSessions"] == 2
    # the whole thing is JSON as the API receives it
    assert json.loads(json.dumps(metrics)) == metrics


def test_rates_appear_on_the_second_collection() -> None:
    collector = MetricsCollector(use_ubus=False)

    async def twice() -> tuple[dict[str, Any], dict[str, Any]]:
        return await collector.collect(), await collector.collect()

    first, second = run(twice)
    assert all("rxRate" not in entry and "txRate" not in entry
               for entry in first["interfaces"].values())
    lo = second["interfaces"]["lo"]
    assert is_number(lo["rxRate"]) and lo["rxRate"] >= 0
    assert is_number(lo["txRate"]) and lo["txRate"] >= 0
    assert lo["rxBytes"] >= first["interfaces"]["lo"]["rxBytes"]


def test_proc_readings_agree_with_psutil() -> None:
    """The extensions are read from /proc as psutil reads them (psutil stays for no-ubus)."""
    import psutil

    counters = net_counters()
    later = psutil.net_io_counters(pernic=True)
    assert set(counters) == set(later)
    for name, (received, sent) in counters.items():
        assert received <= later[name].bytes_recv and sent <= later[name].bytes_sent
    busy, total = cpu_times()
    times = psutil.cpu_times()
    ps_total = sum(times) - times.guest - times.guest_nice
    ps_busy = ps_total - times.idle - times.iowait
    assert busy / total == pytest.approx(ps_busy / ps_total, abs=0.002)
    memory, virtual = meminfo(), psutil.virtual_memory()
    assert memory["MemAvailable"] == pytest.approx(virtual.available, abs=64 << 20)
    assert memory["Cached"] + memory["SReclaimable"] == pytest.approx(virtual.cached, abs=64 << 20)
    assert own_rss() == pytest.approx(psutil.Process().memory_info().rss, abs=4 << 20)


def test_a_router_where_ubus_answers_never_loads_psutil(ubus: FakeUbus) -> None:
    code = ("import asyncio, sys\n"
            "from spotfi_bridge.metrics import MetricsCollector\n"
            "metrics = asyncio.run(MetricsCollector().collect())\n"
            "assert metrics['uptime'] == '123456' and 'cpuPercent' in metrics, metrics\n"
            "print('psutil' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         check=True).stdout
    assert out.strip() == "False"


# --------------------------------------------------------------------------- ubus


@pytest.mark.parametrize("load1", [13824, 0, 655350, 1234567])
def test_ubus_compat_fields_match_the_go_bridge(ubus: FakeUbus, load1: int) -> None:
    ubus.answer("system", "info", {**SYSTEM_INFO, "load": [load1, 9600, 7744]})
    metrics = run(MetricsCollector(use_ubus=True).collect)
    assert metrics["uptime"] == "123456"
    assert metrics["cpuLoad"] == pytest.approx(load1 / 65535 * 100, abs=0.005)
    assert metrics["totalMemory"] == 128974848
    assert metrics["freeMemory"] == 45678592
    assert metrics["activeUsers"] == 3
    assert metrics["bridgeVersion"] == __version__  # extensions still there
    assert "interfaces" in metrics
    assert "-S -t 5 call system info" in ubus.calls()
    assert "-S -t 5 call uspot client_list" in ubus.calls()


def test_ubus_is_found_on_path_by_default(ubus: FakeUbus) -> None:
    assert MetricsCollector().use_ubus is True


def test_failing_collector_is_left_out_logged_once_and_recovers(
        ubus: FakeUbus, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="spotfi_bridge.metrics")
    ubus.fail("system", "info", "Not found")
    collector = MetricsCollector(use_ubus=True)

    async def collect_three() -> list[dict[str, Any]]:
        return [await collector.collect() for _ in range(3)]

    for metrics in run(collect_three):
        for field in ("uptime", "cpuLoad", "totalMemory", "freeMemory"):
            assert field not in metrics
        assert metrics["activeUsers"] == 3          # the other collectors still report
        assert metrics["bridgeVersion"] == __version__
        assert "cpuPercent" in metrics and "interfaces" in metrics
    failures = [r for r in caplog.records if "system info" in r.getMessage()]
    assert len(failures) == 1, [r.getMessage() for r in failures]
    assert failures[0].levelno == logging.WARNING
    assert "status 4" in failures[0].getMessage() and "Not found" in failures[0].getMessage()

    caplog.clear()
    ubus.answer("system", "info", SYSTEM_INFO)
    metrics = run(collector.collect)
    assert metrics["uptime"] == "123456"
    recovered = [r for r in caplog.records if "works again" in r.getMessage()]
    assert len(recovered) == 1 and "system info" in recovered[0].getMessage()


def test_missing_uspot_counts_zero_active_users(ubus: FakeUbus,
                                               caplog: pytest.LogCaptureFixture) -> None:
    # no uspot means no hotspot clients; the API must not read `undefined`
    ubus.fail("uspot", "client_list", "Not found")
    metrics = run(MetricsCollector(use_ubus=True).collect)
    assert metrics["activeUsers"] == 0
    assert metrics["uptime"] == "123456"
    assert any("uspot" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


@pytest.mark.parametrize("answer", ["not json at all", {"uptime": 5}, {"load": [], "uptime": 1}])
def test_unusable_ubus_answer_is_a_failing_collector(ubus: FakeUbus, answer: Any) -> None:
    if isinstance(answer, str):
        (ubus.dir / "system.info.json").write_text(answer)
    else:
        ubus.answer("system", "info", answer)
    metrics = run(MetricsCollector(use_ubus=True).collect)
    assert "cpuLoad" not in metrics and "totalMemory" not in metrics
    assert metrics["activeUsers"] == 3


def test_extra_callback_failure_keeps_the_rest(caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> dict[str, Any]:
        raise RuntimeError("terminal manager gone")

    metrics = run(MetricsCollector(use_ubus=False, extra=broken).collect)
    assert "uptime" in metrics and "interfaces" in metrics
    assert any("terminal manager gone" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------- publisher


class FakeLink:
    """What the daemon hands MetricsPublisher: a publish callable and a connected flag."""

    def __init__(self, connected: bool, accept: bool = True) -> None:
        self.connected = connected
        self.accept = accept
        self.published: list[dict[str, Any]] = []
        self.publish_calls_while_disconnected = 0

    def publish(self, payload: bytes) -> bool:
        if not self.connected:
            self.publish_calls_while_disconnected += 1
        message = json.loads(payload)
        assert message["type"] == "metrics"
        if self.accept:
            self.published.append(message["metrics"])
        return self.accept

    def is_connected(self) -> bool:
        return self.connected


class CountingCollector(MetricsCollector):
    def __init__(self) -> None:
        super().__init__(use_ubus=False)
        self.calls = 0

    async def collect(self) -> dict[str, Any]:
        self.calls += 1
        return await super().collect()


def make_publisher(link: FakeLink, interval: float) -> MetricsPublisher:
    return MetricsPublisher(CountingCollector(), link.publish, link.is_connected, interval)


def test_publishes_right_away_on_every_connect() -> None:
    link = FakeLink(connected=True)

    async def scenario() -> None:
        publisher = make_publisher(link, interval=3600)  # the timer never fires in this test
        try:
            publisher.on_connected()
            await until(lambda: len(link.published) == 1, what="first metrics")
            assert "uptime" in link.published[0] and "activeUsers" in link.published[0]
            # a reconnect: a fresh message at once, not after the interval
            link.connected = False
            link.connected = True
            publisher.on_connected()
            await until(lambda: len(link.published) == 2, what="metrics after reconnect")
            assert publisher.sent == 2 and publisher.skipped == 0
        finally:
            publisher.stop()

    run(scenario)


def test_skips_when_not_connected() -> None:
    link = FakeLink(connected=False)

    async def scenario() -> None:
        publisher = make_publisher(link, interval=3600)
        collector = publisher._collector
        assert isinstance(collector, CountingCollector)
        try:
            publisher.on_connected()
            await until(lambda: publisher.skipped == 1, what="a skipped round")
        finally:
            publisher.stop()
        assert link.published == [] and link.publish_calls_while_disconnected == 0
        assert publisher.sent == 0
        assert collector.calls == 0  # no ubus children spawned for a message nobody can get

    run(scenario)


def test_cadence_no_queueing_while_disconnected_and_fresh_on_reconnect() -> None:
    link = FakeLink(connected=True)

    async def scenario() -> None:
        publisher = make_publisher(link, interval=0.02)
        try:
            publisher.on_connected()
            await until(lambda: len(link.published) >= 3, what="three timer rounds")

            link.connected = False
            sent_before, skipped_before = publisher.sent, publisher.skipped
            await until(lambda: publisher.skipped >= skipped_before + 3, what="skipped rounds")
            assert publisher.sent == sent_before            # nothing went out, nothing was kept
            assert link.publish_calls_while_disconnected == 0

            link.connected = True
            publisher.on_connected()
            await until(lambda: publisher.sent > sent_before, what="metrics after reconnect")
            assert len(link.published) == publisher.sent
        finally:
            publisher.stop()

    run(scenario)


def test_refused_publish_is_counted_as_skipped() -> None:
    link = FakeLink(connected=True, accept=False)

    async def scenario() -> None:
        publisher = make_publisher(link, interval=3600)
        try:
            publisher.on_connected()
            await until(lambda: publisher.skipped == 1, what="refused publish")
            assert publisher.sent == 0
        finally:
            publisher.stop()

    run(scenario)


def test_stop_is_safe_before_start() -> None:
    link = FakeLink(connected=True)
    publisher: Optional[MetricsPublisher] = None

    async def scenario() -> None:
        nonlocal publisher
        publisher = make_publisher(link, interval=3600)
        publisher.stop()
        publisher.stop()

    run(scenario)
    assert publisher is not None and publisher.sent == 0


def test_ubus_children_do_not_see_the_token(ubus: FakeUbus,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPOTFI_TOKEN", "tok-from-the-environment")
    run(MetricsCollector(use_ubus=True).collect)
    seen = (ubus.dir / "env.log").read_text()
    assert "PATH=" in seen  # the rest of the environment is there
    assert "SPOTFI_" not in seen and "tok-from-the-environment" not in seen
