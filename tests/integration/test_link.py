"""MqttLink in-process against a real Mosquitto: presence, reconnect, outbox, auth, TLS."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any, Callable, Optional

import pytest

from spotfi_bridge.config import Config, load_config
from spotfi_bridge.link import MqttLink
from tests.helpers.apiclient import ApiClient
from tests.helpers.broker import Mosquitto
from tests.helpers.certs import make_ca, make_server_cert
from tests.helpers.tcpproxy import TcpProxy

ROUTER = "link-router"
TOKEN = "s3cret-token-value"


def make_config(url: str, **env: str) -> Config:
    environ = {"SPOTFI_ROUTER_ID": ROUTER, "SPOTFI_TOKEN": TOKEN, "SPOTFI_MQTT_BROKER": url,
               "SPOTFI_ENV_FILE": os.devnull, "SPOTFI_MQTT_BACKOFF_MIN": "0.05",
               "SPOTFI_MQTT_BACKOFF_MAX": "1"}
    environ.update(env)
    return load_config(environ=environ)


async def until(condition: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = condition()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.01)


class Harness:
    """A link on this test's loop, recording what it receives."""

    def __init__(self, config: Config) -> None:
        self.received: list[tuple[str, bytes]] = []
        self.link = MqttLink(config, lambda t, p, _d: self.received.append((t, p)))
        self.task: Optional[asyncio.Task[None]] = None

    async def __aenter__(self) -> Harness:
        self.task = asyncio.get_running_loop().create_task(self.link.run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.link.close(flush_timeout=1)
        assert self.task is not None
        await asyncio.wait_for(self.task, 5)


def test_online_retained_and_requests_delivered(broker: Mosquitto) -> None:
    api = ApiClient(broker.port)

    async def scenario() -> None:
        async with Harness(make_config(broker.url)) as h:
            assert await h.link.wait_connected(10)
            # a late subscriber still sees ONLINE: it is retained
            await asyncio.to_thread(api.subscribe, f"spotfi/router/{ROUTER}/status")
            message = await asyncio.to_thread(api.wait_message, f"spotfi/router/{ROUTER}/status")
            assert message.payload == b"ONLINE" and message.retain
            await asyncio.to_thread(api.publish, f"spotfi/router/{ROUTER}/rpc/request", b"req-1")
            await asyncio.to_thread(api.publish, f"spotfi/router/{ROUTER}/x/in", b"x-1")
            await until(lambda: len(h.received) == 2, what="both requests")
            assert h.received == [(f"spotfi/router/{ROUTER}/rpc/request", b"req-1"),
                                  (f"spotfi/router/{ROUTER}/x/in", b"x-1")]
        # clean close: OFFLINE retained
        api.wait_message(f"spotfi/router/{ROUTER}/status", lambda m: m.payload == b"OFFLINE")

    asyncio.run(scenario())
    api.close()


def test_reconnect_after_broker_restart_restores_presence_and_subscriptions(
        broker: Mosquitto) -> None:
    async def scenario() -> None:
        async with Harness(make_config(broker.url)) as h:
            assert await h.link.wait_connected(10)
            connects = h.link.counters()["connects"]
            await asyncio.to_thread(broker.restart)
            await until(lambda: h.link.connected and h.link.counters()["connects"] > connects, 15,
                        "reconnect")
            api = await asyncio.to_thread(ApiClient, broker.port)
            try:
                await asyncio.to_thread(api.subscribe, f"spotfi/router/{ROUTER}/status")
                status = await asyncio.to_thread(api.wait_message, f"spotfi/router/{ROUTER}/status")
                assert status.payload == b"ONLINE"
                await asyncio.to_thread(api.publish, f"spotfi/router/{ROUTER}/rpc/request", b"after")
                await until(lambda: (f"spotfi/router/{ROUTER}/rpc/request", b"after") in h.received,
                            10, "request after restart")
            finally:
                api.close()

    asyncio.run(scenario())


def test_broker_down_at_start_then_appears(tmp_path: Path) -> None:
    broker = Mosquitto()  # configured, not started

    async def scenario() -> None:
        async with Harness(make_config(broker.url)) as h:
            await until(lambda: h.link.counters().get("connect_failures", 0) >= 2, 10,
                        "failed attempts while the broker is down")
            assert not h.link.connected
            await asyncio.to_thread(broker.start)
            assert await h.link.wait_connected(15)

    try:
        asyncio.run(scenario())
    finally:
        broker.close()


def test_outage_keeps_qos1_messages_in_order_and_outbox_is_bounded(broker: Mosquitto) -> None:
    api = ApiClient(broker.port)
    api.subscribe(f"spotfi/router/{ROUTER}/x/out")
    proxy = TcpProxy(broker.port)
    config = make_config(proxy.url, SPOTFI_MQTT_OUTBOX_MAX_MESSAGES="50")

    async def scenario() -> None:
        async with Harness(config) as h:
            assert await h.link.wait_connected(10)
            sent: list[int] = []
            for i in range(10):
                assert h.link.publish(f"spotfi/router/{ROUTER}/x/out", b"%d" % i,
                                      on_sent=lambda i=i: sent.append(i))
            proxy.refusing = True
            proxy.cut()
            await until(lambda: not h.link.connected, 10, "link to notice the cut")
            accepted = 10
            for i in range(10, 100):
                if h.link.publish(f"spotfi/router/{ROUTER}/x/out", b"%d" % i,
                                  on_sent=lambda i=i: sent.append(i)):
                    accepted += 1
            counters = h.link.counters()
            assert counters["outbox_refused"] == 100 - accepted > 0
            assert counters["outbox_bulk_messages"] <= 50  # terminal output's own limit
            proxy.refusing = False
            await until(lambda: len(sent) == accepted, 15, "every accepted message acknowledged")
        # the broker acknowledges a message before it forwards it: wait for the last one
        last = b"%d" % (accepted - 1)
        api.wait_message(f"spotfi/router/{ROUTER}/x/out", lambda m: m.payload == last, 10)
        payloads = [int(m.payload) for m in api.matching(f"spotfi/router/{ROUTER}/x/out")]
        # QoS 1 may deliver a message again across a reconnect (a resend of what was in
        # flight), never out of order: keeping only what goes beyond the highest seen so
        # far must give every message exactly once, in order
        deduped: list[int] = []
        for p in payloads:
            if not deduped or p > deduped[-1]:
                deduped.append(p)
        assert deduped == list(range(accepted))

    try:
        asyncio.run(scenario())
    finally:
        proxy.close()
        api.close()


def test_publishing_from_the_loop_writes_inline_without_watching_for_writability(
        broker: Mosquitto) -> None:
    """A message published outside a paho step (a terminal's output) is written at once;
    a writer is added only when the socket is full, never for a small message (it would
    cost two epoll_ctl calls per keystroke echo)."""
    api = ApiClient(broker.port)
    topic = f"spotfi/router/{ROUTER}/x/out"
    api.subscribe(topic)

    async def scenario() -> None:
        async with Harness(make_config(broker.url)) as h:
            assert await h.link.wait_connected(10)
            loop = asyncio.get_running_loop()
            writers: list[int] = []
            add_writer = loop.add_writer

            def watching(fd: Any, callback: Callable[..., Any], *args: Any) -> None:
                writers.append(fd)
                add_writer(fd, callback, *args)

            loop.add_writer = watching  # type: ignore[method-assign]  # observes, still adds
            sent: list[int] = []
            for i in range(20):
                await asyncio.sleep(0)  # each from its own loop turn, as keystroke echoes
                assert h.link.publish(topic, b"%d" % i, on_sent=lambda i=i: sent.append(i))
            await until(lambda: len(sent) == 20, what="every PUBACK")
            assert writers == []
            assert sent == list(range(20))
        assert [int(m.payload) for m in api.matching(topic)] == list(range(20))

    try:
        asyncio.run(scenario())
    finally:
        api.close()


def test_oversized_inbound_payload_is_rejected_before_parsing(broker: Mosquitto,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    api = ApiClient(broker.port)
    config = make_config(broker.url, SPOTFI_MQTT_MAX_INBOUND_BYTES="1024")

    async def scenario() -> None:
        async with Harness(config) as h:
            assert await h.link.wait_connected(10)
            await asyncio.to_thread(api.publish, f"spotfi/router/{ROUTER}/rpc/request", b"x" * 5000)
            await asyncio.to_thread(api.publish, f"spotfi/router/{ROUTER}/rpc/request", b"small")
            await until(lambda: h.received, 10, "the small message")
            assert h.received == [(f"spotfi/router/{ROUTER}/rpc/request", b"small")]
            assert h.link.counters()["inbound_oversized"] == 1

    with caplog.at_level(logging.WARNING, "spotfi_bridge.link"):
        asyncio.run(scenario())
    assert "over max_inbound_bytes" in caplog.text
    api.close()


def test_password_auth_and_bad_token_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    with Mosquitto(users={ROUTER: TOKEN}) as broker:
        async def good() -> None:
            async with Harness(make_config(broker.url)) as h:
                assert await h.link.wait_connected(10)

        asyncio.run(good())

        outcome: dict[str, int] = {}

        async def bad() -> None:
            config = make_config(broker.url, SPOTFI_TOKEN="wrong-token-value")
            async with Harness(config) as h:
                await until(lambda: h.link.counters().get("auth_refused", 0) >= 3, 15,
                            "three refused attempts")
                assert not h.link.connected
                outcome["attempts"] = h.link.counters()["connect_attempts"]

        with caplog.at_level(logging.DEBUG, "spotfi_bridge"):
            asyncio.run(bad())
    refusals = [r for r in caplog.records if "bad token" in r.getMessage()]
    assert len(refusals) == 1, "an authentication refusal is logged once per streak"
    # every refused attempt is followed by a back-off, never by an immediate retry
    backoffs = sum("reconnecting in" in r.getMessage() for r in caplog.records)
    assert backoffs >= outcome["attempts"] - 1 >= 2, (backoffs, outcome)
    assert f"broker refused router id {ROUTER}: bad token" in refusals[0].getMessage()
    assert "wrong-token-value" not in caplog.text and TOKEN not in caplog.text


@pytest.fixture(scope="module")
def tls_material(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("tls")
    ca = make_ca(directory, "ca")
    other_ca = make_ca(directory, "other-ca")
    good = make_server_cert(directory, ca, "IP:127.0.0.1,DNS:localhost", "good")
    wrong_name = make_server_cert(directory, ca, "DNS:not-this-host.example", "wrongname")
    client = make_server_cert(directory, ca, f"DNS:{ROUTER}", "client", usage="clientAuth")
    return {"ca": ca[0], "other_ca": other_ca[0], "cert": good[0], "key": good[1],
            "wrong_cert": wrong_name[0], "wrong_key": wrong_name[1],
            "client_cert": client[0], "client_key": client[1]}


def _tls_broker(material: dict[str, Path], wrong_name: bool = False) -> Mosquitto:
    cert, key = ("wrong_cert", "wrong_key") if wrong_name else ("cert", "key")
    return Mosquitto(tls={"cafile": str(material["ca"]), "certfile": str(material[cert]),
                          "keyfile": str(material[key])})


def _tls_outcome(url: str, ca: Path, caplog: pytest.LogCaptureFixture) -> bool:
    async def scenario() -> bool:
        async with Harness(make_config(url, SPOTFI_TLS_CA_FILE=str(ca))) as h:
            if await h.link.wait_connected(3):
                return True
            await until(lambda: h.link.counters().get("connect_failures", 0) >= 1, 10,
                        "a failed TLS attempt")
            return False

    with caplog.at_level(logging.WARNING, "spotfi_bridge.link"):
        return asyncio.run(scenario())


def test_tls_with_hostname_verification(tls_material: dict[str, Path],
                                        caplog: pytest.LogCaptureFixture) -> None:
    with _tls_broker(tls_material) as broker:
        assert broker.url.startswith("mqtts://")
        assert _tls_outcome(broker.url, tls_material["ca"], caplog)


def test_tls_wrong_ca_is_refused(tls_material: dict[str, Path],
                                 caplog: pytest.LogCaptureFixture) -> None:
    with _tls_broker(tls_material) as broker:
        assert not _tls_outcome(broker.url, tls_material["other_ca"], caplog)
    assert "TLS certificate verification failed" in caplog.text


def test_tls_wrong_hostname_is_refused(tls_material: dict[str, Path],
                                       caplog: pytest.LogCaptureFixture) -> None:
    with _tls_broker(tls_material, wrong_name=True) as broker:
        assert not _tls_outcome(broker.url, tls_material["ca"], caplog)
    assert "TLS certificate verification failed" in caplog.text
    assert "hostname" in caplog.text.lower() or "IP address mismatch" in caplog.text


def test_mqtt5_keeps_the_session_across_a_cut(broker: Mosquitto) -> None:
    """MQTT 5: a session expiry instead of clean_session=false; requests sent while the
    link is down are delivered after it reconnects."""
    api = ApiClient(broker.port)
    proxy = TcpProxy(broker.port)
    config = make_config(proxy.url, SPOTFI_MQTT_PROTOCOL="5")
    assert config.mqtt.protocol == "5"

    async def scenario() -> None:
        async with Harness(config) as h:
            assert await h.link.wait_connected(10)
            await asyncio.to_thread(api.subscribe, f"spotfi/router/{ROUTER}/status")
            status = await asyncio.to_thread(api.wait_message, f"spotfi/router/{ROUTER}/status")
            assert status.payload == b"ONLINE"
            proxy.refusing = True
            proxy.cut()
            await until(lambda: not h.link.connected, 10, "the cut")
            await asyncio.to_thread(api.publish, f"spotfi/router/{ROUTER}/rpc/request",
                                    b"while-down")
            proxy.refusing = False
            await until(lambda: (f"spotfi/router/{ROUTER}/rpc/request", b"while-down")
                        in h.received, 15, "the request queued by the broker for our session")

    try:
        asyncio.run(scenario())
    finally:
        proxy.close()
        api.close()


def test_mqtt_over_websocket() -> None:
    from tests.helpers.ports import free_port

    ws_port = free_port()
    with Mosquitto(extra_config=f"listener {ws_port} 127.0.0.1\nprotocol websockets\n") as broker:
        api = ApiClient(broker.port)
        config = make_config(f"ws://127.0.0.1:{ws_port}/mqtt")
        assert config.mqtt.broker.transport == "websockets"

        async def scenario() -> None:
            async with Harness(config) as h:
                assert await h.link.wait_connected(10)
                await asyncio.to_thread(api.publish, f"spotfi/router/{ROUTER}/x/in", b"over-ws")
                await until(lambda: h.received, 10, "a message over the WebSocket")
                assert h.received == [(f"spotfi/router/{ROUTER}/x/in", b"over-ws")]
                sent: list[int] = []
                assert h.link.publish(f"spotfi/router/{ROUTER}/metrics", b"m", on_sent=lambda:
                                      sent.append(1))
                await until(lambda: sent, 10, "PUBACK over the WebSocket")

        try:
            asyncio.run(scenario())
        finally:
            api.close()


def test_tls_client_certificate(tls_material: dict[str, Path],
                                caplog: pytest.LogCaptureFixture) -> None:
    """A broker that requires client certificates admits the bridge with [tls] cert_file and
    key_file, and refuses it without."""
    broker = Mosquitto(tls={"cafile": str(tls_material["ca"]), "certfile": str(tls_material["cert"]),
                            "keyfile": str(tls_material["key"])},
                       extra_config="require_certificate true\n")
    with broker:
        async def attempt(**env: str) -> bool:
            config = make_config(broker.url, SPOTFI_TLS_CA_FILE=str(tls_material["ca"]), **env)
            async with Harness(config) as h:
                if await h.link.wait_connected(3):
                    return True
                await until(lambda: h.link.counters().get("connect_failures", 0) >= 1, 10,
                            "a refused attempt")
                return False

        assert asyncio.run(attempt(SPOTFI_TLS_CERT_FILE=str(tls_material["client_cert"]),
                                   SPOTFI_TLS_KEY_FILE=str(tls_material["client_key"])))
        with caplog.at_level(logging.WARNING, "spotfi_bridge.link"):
            assert not asyncio.run(attempt())
