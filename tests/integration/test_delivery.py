"""Terminal output as the unmodified API sees it: no duplicated, no missing byte across faults.

The API subscribes to ``x/out`` at QoS 0 with a clean session and never looks at
``seq``: every copy the broker forwards is shown to the operator. So these tests
count the lines of ``seq 1 N`` in the raw concatenation of every ``x-data`` the
subscriber received, in arrival order, and want each number exactly once, in order.
The bridge reaches the broker through a :class:`TcpProxy`; the subscriber talks to
the broker directly, as the API does.
"""

from __future__ import annotations

import base64
import re
import shutil
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from spotfi_bridge import protocol
from tests.helpers.apiclient import ApiClient
from tests.helpers.bridge import BridgeProcess
from tests.helpers.broker import Mosquitto
from tests.helpers.tcpproxy import TcpProxy
from tests.helpers.wait import wait_for

ROUTER = "test-router"
STATUS = f"spotfi/router/{ROUTER}/status"
METRICS = f"spotfi/router/{ROUTER}/metrics"
RPC_RESPONSE = f"spotfi/router/{ROUTER}/rpc/response"
KEEPALIVE = 5


def bridge_toml(token: str, backoff_min: float = 0.1, extra: str = "", interval: int = 30,
                keepalive: int = KEEPALIVE) -> str:
    return f"""
[router]
token = "{token}"
[metrics]
interval = {interval}
[mqtt]
keepalive = {keepalive}
backoff_min = {backoff_min}
backoff_max = 3
connect_timeout = 2
{extra}
[rpc]
backend = "local"
[terminal]
shell = ["/bin/sh"]
"""


@dataclass
class Lines:
    """What a subscriber that ignores ``seq`` shows for ``seq 1 count``."""

    count: int
    duplicated: int
    missing: int
    out_of_order: int

    @property
    def exact(self) -> bool:
        return self.duplicated == 0 and self.missing == 0 and self.out_of_order == 0


def raw_output(api: ApiClient, session_id: str) -> bytes:
    """Every x-data of the session in arrival order: no dedupe, no sort by ``seq``."""
    return b"".join(base64.b64decode(m["data"]) for m in api.x_messages(session_id)
                    if m.get("type") == "x-data")


def count_lines(output: bytes, count: int) -> Lines:
    numbers = [int(n) for n in re.findall(rb"(?m)^(\d+)\r?$", output)]
    seen: set[int] = set()
    duplicated = out_of_order = 0
    last = 0
    for number in numbers:
        if number in seen:
            duplicated += 1
            continue
        seen.add(number)
        if number != last + 1:
            out_of_order += 1
        last = number
    missing = len(set(range(1, count + 1)) - seen)
    return Lines(count, duplicated, missing, out_of_order)


@dataclass
class Stream:
    broker: Mosquitto
    proxy: TcpProxy
    api: ApiClient
    bridge: BridgeProcess
    config: Path

    def start(self, count: int) -> str:
        session_id = self.api.x_start(ROUTER)
        self.api.wait_x(session_id, "x-started", 15)
        self.api.x_send(ROUTER, session_id, f"seq 1 {count}; echo E\"\"ND\n".encode())
        return session_id

    def wait_flowing(self, session_id: str, lines: int) -> None:
        wait_for(lambda: raw_output(self.api, session_id).count(b"\n") > lines, 30,
                 f"{lines} lines of output")

    def finish(self, session_id: str, count: int, timeout: float = 90.0) -> Lines:
        wait_for(lambda: b"\nEND" in raw_output(self.api, session_id), timeout, "END")
        return count_lines(raw_output(self.api, session_id), count)

    def statuses(self, mark: int) -> list[bytes]:
        return [m.payload for m in self.api.received[mark:] if m.topic == STATUS]


def _stream(broker: Mosquitto, toml: str) -> Iterator[Stream]:
    with TcpProxy(broker.port) as proxy:
        proxy.latency = 0.03  # a WAN: acknowledgements are on the wire when it breaks
        api = ApiClient(broker.port)
        api.subscribe(STATUS, 0)
        api.subscribe(METRICS, 0)
        api.subscribe(RPC_RESPONSE, 0)
        api.subscribe(api.out_topic, 0)  # as the API: QoS 0, clean session
        bridge = BridgeProcess(proxy.url, toml=toml)
        del bridge.env["SPOTFI_TOKEN"]  # from the file, so that a reload can change it
        bridge.start()
        try:
            api.wait_message(STATUS, lambda m: m.payload == b"ONLINE", 20)
            yield Stream(broker, proxy, api, bridge, bridge.dir / "bridge.toml")
        finally:
            bridge.close()
            api.close()
    log = bridge.log()
    shutil.rmtree(bridge.dir, ignore_errors=True)
    assert "Traceback" not in log, log[-3000:]
    assert "token-one" not in log and "token-two" not in log


@pytest.fixture
def stream(broker: Mosquitto) -> Iterator[Stream]:
    yield from _stream(broker, bridge_toml("token-one"))


@pytest.fixture
def stock_stream() -> Iterator[Stream]:
    # Mosquitto's defaults: 20 QoS 1/2 messages in flight per client (the tests' broker
    # otherwise allows any number)
    with Mosquitto(extra_config="max_inflight_messages 20") as broker:
        # small frames: many messages in flight at once, as interactive output makes
        yield from _stream(broker, bridge_toml("token-one") + "batch_bytes = 512\n")


@pytest.fixture
def persistent_stream() -> Iterator[Stream]:
    with Mosquitto(persistence=True) as broker:
        # the bridge comes back after the API side (on the same LAN as the broker) did
        yield from _stream(broker, bridge_toml("token-one", backoff_min=2.0))


COUNT = 150_000


def test_reload_that_reconnects_neither_duplicates_nor_flaps(stream: Stream) -> None:
    session = stream.start(COUNT)
    stream.wait_flowing(session, 20_000)
    mark = stream.api.mark()
    stream.config.write_text(bridge_toml("token-two"))
    stream.bridge.signal(signal.SIGHUP)
    stream.bridge.wait_log("config reloaded (reconnecting)", 20)
    lines = stream.finish(session, COUNT)
    assert lines.exact, lines
    assert b"OFFLINE" not in stream.statuses(mark), stream.statuses(mark)


def test_a_stock_mosquitto_gets_every_message(stock_stream: Stream) -> None:
    """Beyond its in-flight limit Mosquitto acknowledges a QoS 2 PUBLISH and drops it."""
    session = stock_stream.start(COUNT)
    lines = stock_stream.finish(session, COUNT)
    assert lines.exact, lines


def test_tcp_reset_mid_stream(stream: Stream) -> None:
    session = stream.start(COUNT)
    stream.wait_flowing(session, 20_000)
    mark = stream.api.mark()
    stream.proxy.cut()
    stream.api.wait_message(STATUS, lambda m: m.payload == b"ONLINE" and not m.retain, 30, mark)
    lines = stream.finish(session, COUNT)
    assert lines.exact, lines


def test_black_hole_past_the_keepalive(stream: Stream) -> None:
    session = stream.start(COUNT)
    stream.wait_flowing(session, 20_000)
    mark = stream.api.mark()
    stream.proxy.blackholed = True
    stream.api.wait_message(STATUS, lambda m: m.payload == b"OFFLINE", 30, mark)
    stream.bridge.wait_log("connection lost", 30)
    stream.proxy.blackholed = False
    stream.api.wait_message(STATUS, lambda m: m.payload == b"ONLINE" and not m.retain, 30, mark)
    lines = stream.finish(session, COUNT)
    assert lines.exact, lines


def test_broker_restart_with_persistence(persistent_stream: Stream) -> None:
    stream = persistent_stream
    session = stream.start(COUNT)
    stream.wait_flowing(session, 20_000)
    mark = stream.api.mark()
    stream.broker.restart()  # SIGTERM: Mosquitto saves its sessions, in-flight QoS 2 included
    stream.api.wait_message(STATUS, lambda m: m.payload == b"ONLINE" and not m.retain, 40, mark)
    lines = stream.finish(session, COUNT)
    assert lines.exact, lines


# ---------------------------------------------------------------------- priorities


@pytest.fixture
def slow_stream(broker: Mosquitto) -> Iterator[Stream]:
    # a small outbox, so that terminal output fills it: replies must still get through
    toml = bridge_toml("token-one", interval=5, keepalive=30,
                       extra="outbox_max_messages = 10")
    yield from _stream(broker, toml)


def test_heartbeat_and_replies_overtake_output_on_a_64_kbit_link(slow_stream: Stream) -> None:
    stream, api = slow_stream, slow_stream.api
    stream.proxy.rate_bps = 64_000 / 8
    session = stream.start(10_000_000)  # far more than the link carries in this test
    stream.wait_flowing(session, 2_000)
    mark = api.mark()
    # metrics keep their 5 s interval: each waits behind at most the bulk window
    # (64 KiB, 8 s at this rate), never behind the outbox (8 MiB: minutes)
    metrics = wait_for(lambda: [m.at for m in api.received[mark:] if m.topic == METRICS][:4]
                       if len([m for m in api.received[mark:] if m.topic == METRICS]) >= 4
                       else None, 60, "four metrics while the terminal streams")
    gaps = [later - earlier for earlier, later in zip(metrics, metrics[1:])]
    assert max(gaps) < 15, gaps
    reply = api.rpc(ROUTER, "bridge", "info", timeout=30)
    assert reply["status"] == "success", reply
    info = reply["result"]
    assert info["counters"]["publish_refused"] == 0, info["counters"]
    assert info["metrics"]["skipped"] == 0, info["metrics"]
    assert info["link"].get("outbox_refused_control", 0) == 0, info["link"]
    assert info["link"]["outbox_refused"] > 0, info["link"]  # the output did fill its lane
    assert info["terminal"]["sessions"] == 1
    assert info["link"]["bulk_inflight_bytes"] <= 64 * 1024, info["link"]
    api.x_stop(ROUTER, session)


# ---------------------------------------------------------------------- nobody reads


def test_mqtt5_output_without_subscriber_ends_the_session(broker: Mosquitto) -> None:
    """An API instance that died sends no x-stop: its sessions' output finds no
    subscriber (PUBACK reason code 16) and they end after no_subscriber_timeout."""
    api = ApiClient(broker.port)
    api.subscribe(STATUS, 0)
    api.subscribe(api.out_topic, 0)
    # QoS 1: Mosquitto 2.0 says "no matching subscribers" in PUBACK, not in PUBREC (QoS 2
    # is released on PUBREL, after the PUBREC); EMQX says it in both
    toml = bridge_toml("token-one", extra='protocol = "5"') + "no_subscriber_timeout = 3\nqos = 1\n"
    bridge = BridgeProcess(broker.url, toml=toml)
    del bridge.env["SPOTFI_TOKEN"]
    ticking = b"while :; do echo tick; sleep 0.3; done\n"
    try:
        bridge.start()
        api.wait_message(STATUS, lambda m: m.payload == b"ONLINE", 20)
        read = stream_session(api)  # its API instance is alive and subscribed
        api.x_send(ROUTER, read, ticking)
        orphan = f"{ROUTER}-orphan"
        gone = "spotfi/api/gone-instance/x/out"  # nobody subscribes: the instance died
        api.publish(f"spotfi/router/{ROUTER}/x/in", protocol.api_x_start(orphan, gone))
        bridge.wait_log(f"terminal session {orphan!r} started", 15)
        api.x_send(ROUTER, orphan, ticking)
        log = bridge.wait_log(f"terminal session {orphan!r} ended (no-subscriber)", 30)
        assert f"no subscriber on {gone} for 3 s" in log
        info = api.rpc(ROUTER, "bridge", "info", timeout=20)["result"]
        assert info["terminal"]["no_subscriber_closed"] == 1, info["terminal"]
        assert info["terminal"]["sessions"] == 1  # the read one lives on
        assert info["link"]["acked_no_subscriber"] >= 3, info["link"]
        assert f"terminal session {read!r} ended" not in bridge.log()
    finally:
        bridge.close()
        api.close()
        log = bridge.log()
        shutil.rmtree(bridge.dir, ignore_errors=True)
    assert "Traceback" not in log


def stream_session(api: ApiClient) -> str:
    session_id = api.x_start(ROUTER)
    api.wait_x(session_id, "x-started", 15)
    return session_id


@pytest.mark.xfail(strict=False, reason="known: OFFLINE was missing in 2 of 5 loaded "
                   "clean-clone runs (a SIGTERM between the reload's two connections?); "
                   "see the closing note of issue 11")
def test_sigterm_while_a_reload_waits_for_acknowledgements_still_says_offline(
        slow_stream: Stream) -> None:
    """On a slow link a reload waits for the output in flight; a SIGTERM then must still
    publish OFFLINE (retained), not leave the router ONLINE with a clean DISCONNECT."""
    stream, api = slow_stream, slow_stream.api
    stream.proxy.rate_bps = 64_000 / 8
    session = stream.start(10_000_000)
    stream.wait_flowing(session, 2_000)
    mark = api.mark()
    stream.config.write_text(bridge_toml("token-two", interval=5, keepalive=30))
    stream.bridge.signal(signal.SIGHUP)
    stream.bridge.wait_log("config reloaded (reconnecting)", 20)
    assert stream.bridge.terminate(15) == 0
    # OFFLINE (published, or the Will once the broker sees the socket end) queues behind what
    # the 64 kbit/s proxy still holds of both connections: up to two bulk windows, 16 s+
    api.wait_message(STATUS, lambda m: m.payload == b"OFFLINE", 60, mark)
    late = ApiClient(stream.broker.port)  # what a dashboard connecting now reads
    try:
        late.subscribe(STATUS, 0)
        retained = late.wait_message(STATUS, lambda m: m.retain, 10)
        assert retained.payload == b"OFFLINE"
    finally:
        late.close()
