"""Commands whose caller gave up never run; retained commands never run (issue 11, 1 and 2).

A real Mosquitto keeps the router's persistent session and QoS 1 queue while the
router is offline (the bridge's connection cut and refused by a loopback proxy);
the real daemon runs ``ubus`` from PATH: a fake that records every call it gets.
The API side publishes exactly what the SpotFi API does: ids
``cmd_<epoch ms>_<prefix>_<n>`` and no ``timestamp`` on RPCs, ``timestamp`` on
``x-start``.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import wait_online
from tests.helpers.apiclient import ApiClient
from tests.helpers.bridge import BridgeProcess
from tests.helpers.broker import Mosquitto
from tests.helpers.fake_ubus import path_with, write_fake_ubus
from tests.helpers.tcpproxy import TcpProxy
from tests.helpers.wait import wait_for

ROUTER = "test-router"
STATUS = f"spotfi/router/{ROUTER}/status"
REQUEST = f"spotfi/router/{ROUTER}/rpc/request"
RESPONSE = f"spotfi/router/{ROUTER}/rpc/response"
X_IN = f"spotfi/router/{ROUTER}/x/in"
#: the window of file.exec and x-start in these tests, and the clock skew allowed
WINDOW, SKEW = 4, 1
#: longer than the window plus the skew: the API has given up on what was sent at its start
LONG_OUTAGE = WINDOW + SKEW + 2.5
TOML = f"""
[mqtt]
keepalive = 5
backoff_min = 0.1
backoff_max = 1
connect_timeout = 2
[rpc]
backend = "ubus"
clock_skew = {SKEW}
[rpc.max_ages]
"file.exec" = {WINDOW}
[terminal]
shell = ["/bin/sh"]
start_max_age = {WINDOW}
"""
EXEC = {"command": "/sbin/reboot", "params": []}


def iso_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@dataclass
class Router:
    """The bridge behind a proxy the test cuts; the API client on the broker directly."""

    broker: Mosquitto
    proxy: TcpProxy
    api: ApiClient
    bridge: BridgeProcess
    runs: Path

    def execs(self) -> int:
        """How many times ``ubus call file exec`` ran (metrics call ubus too)."""
        text = self.runs.read_text() if self.runs.exists() else ""
        return text.splitlines().count("file exec")

    def info(self) -> dict[str, Any]:
        reply = self.api.rpc(ROUTER, "bridge", "info", timeout=20)
        assert reply["status"] == "success", reply
        result: dict[str, Any] = reply["result"]
        return result

    def go_offline(self) -> None:
        """Cut the router's link and keep it out; return once the broker has noticed (its
        Last Will went out), so what the API sends now is queued in the session."""
        mark = self.api.mark()
        self.proxy.refusing = True
        self.proxy.cut()
        self.api.wait_message(STATUS, lambda m: m.payload == b"OFFLINE", 15, mark)

    def come_back(self) -> None:
        mark = self.api.mark()
        self.proxy.refusing = False
        self.api.wait_message(STATUS, lambda m: m.payload == b"ONLINE" and not m.retain, 20,
                              mark)

    def reply(self, req_id: str, timeout: float = 20.0) -> dict[str, Any]:
        def found() -> Any:
            return [m.json() for m in self.api.matching(RESPONSE)
                    if m.json().get("id") == req_id]
        result: dict[str, Any] = wait_for(found, timeout, f"the reply to {req_id}")[0]
        return result


def offline_for(seconds: float) -> None:
    """The router stays offline this long: the outage itself, not a synchronisation."""
    time.sleep(seconds)


@pytest.fixture
def make_router(broker: Mosquitto, tmp_path: Path) -> Iterator[Any]:
    made: list[tuple[TcpProxy, ApiClient, BridgeProcess]] = []

    def make(clock_offset: float = 0.0, toml: str = TOML) -> Router:
        write_fake_ubus(tmp_path / "bin")
        runs = tmp_path / "runs"
        proxy = TcpProxy(broker.port)
        api = ApiClient(broker.port)
        env = {"PATH": path_with(tmp_path / "bin"), "FAKE_UBUS_RUNS": str(runs)}
        if clock_offset:
            env["SPOTFI_TEST_WALL_CLOCK_OFFSET"] = str(clock_offset)
        bridge = BridgeProcess(proxy.url, toml=toml, env=env)
        made.append((proxy, api, bridge))
        api.subscribe(STATUS)
        api.subscribe(RESPONSE)
        api.subscribe(api.out_topic)
        bridge.start()
        wait_online(api)
        return Router(broker, proxy, api, bridge, runs)

    yield make
    for proxy, api, bridge in made:
        bridge.close()
        api.close()
        proxy.close()
        log = bridge.log()
        shutil.rmtree(bridge.dir, ignore_errors=True)
        assert "Traceback" not in log, log[-3000:]


def test_trusted_clock_a_request_older_than_its_window_never_runs(make_router: Any) -> None:
    router: Router = make_router()
    # a live request stamped by the API's clock agrees with the router's: trusted
    assert router.api.rpc(ROUTER, "bridge", "ping")["status"] == "success"
    assert router.info()["clock"]["trusted"] is True
    router.go_offline()
    stale = router.api.rpc_send(ROUTER, "file", "exec", EXEC)
    stale_session = router.api.x_start(ROUTER, timestamp=iso_now())
    offline_for(LONG_OUTAGE)
    recent = router.api.rpc_send(ROUTER, "file", "exec", EXEC)  # sent just before it is back
    router.come_back()

    refused = router.reply(stale)
    assert refused["status"] == "error" and refused["error"] == "expired", refused
    assert refused["result"]["age"] > WINDOW + SKEW and refused["result"]["maxAge"] == WINDOW
    x_error = router.api.wait_x(stale_session, "x-error", 20)
    assert x_error["reason"] == "expired" and x_error["age"] > WINDOW + SKEW, x_error
    # the trusted clock ages each request by its own stamp: the recent one still runs
    assert router.reply(recent)["status"] == "success"
    assert router.execs() == 1
    info = router.info()
    assert info["counters"]["expired"] == 1
    assert info["terminal"]["expired"] == 1 and info["terminal"]["started"] == 0
    assert router.api.x_messages(stale_session)[0]["type"] == "x-error"  # no x-started
    assert router.bridge.log().count("expired, not run") == 1


@pytest.mark.parametrize("offset", [-3600.0, 3600.0], ids=["clock-behind", "clock-ahead"])
def test_untrusted_clock_nothing_queued_across_a_long_outage_runs(make_router: Any,
                                                                   offset: float) -> None:
    # an hour behind, the stamps of stale requests look fresh to the router's clock
    router: Router = make_router(clock_offset=offset)
    assert router.api.rpc(ROUTER, "bridge", "ping")["status"] == "success"  # live: runs
    clock = router.info()["clock"]
    assert clock["trusted"] is False and abs(clock["offset"] - offset) < 60, clock
    router.go_offline()
    stale = router.api.rpc_send(ROUTER, "file", "exec", EXEC)
    stale_session = router.api.x_start(ROUTER, timestamp=iso_now())
    offline_for(LONG_OUTAGE)
    recent = router.api.rpc_send(ROUTER, "file", "exec", EXEC)
    router.come_back()

    for req_id in (stale, recent):  # without a clock, the link's outage says: too long
        refused = router.reply(req_id)
        assert refused["error"] == "expired" and "outage" in refused["result"]["detail"], refused
    assert router.api.wait_x(stale_session, "x-error", 20)["reason"] == "expired"
    # live requests still run, whatever the router's clock says
    assert router.api.rpc(ROUTER, "file", "exec", EXEC)["status"] == "success"
    assert router.execs() == 1
    info = router.info()
    assert info["counters"]["expired"] == 2 and info["terminal"]["started"] == 0
    assert info["link"]["inbound_queued"] >= 3


def test_a_request_queued_during_a_two_second_blip_runs_exactly_once(
        make_router: Any) -> None:
    # the default windows (file.exec: 120 s) and an untrusted clock: the outage decides
    router: Router = make_router(clock_offset=-3600, toml=TOML.replace(
        f'"file.exec" = {WINDOW}', '"file.exec" = 120').replace(
        f"start_max_age = {WINDOW}", "start_max_age = 30"))
    router.go_offline()
    req_id = router.api.rpc_send(ROUTER, "file", "exec", EXEC)
    session = router.api.x_start(ROUTER, timestamp=iso_now())
    offline_for(2)
    router.come_back()
    assert router.reply(req_id)["status"] == "success"
    router.api.wait_x(session, "x-started", 20)
    info = router.info()  # answered after anything the broker still had for the router
    assert router.execs() == 1
    assert len([m for m in router.api.matching(RESPONSE) if m.json().get("id") == req_id]) == 1
    assert info["counters"]["expired"] == 0 and info["terminal"]["started"] == 1
    assert info["link"]["inbound_queued"] == 2 and 2 <= info["link"]["last_outage"] < 30


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_retained_commands_never_run(broker: Mosquitto, api: ApiClient, tmp_path: Path,
                                     protocol: str) -> None:
    write_fake_ubus(tmp_path / "bin")
    runs = tmp_path / "runs"
    api.subscribe(STATUS)
    api.subscribe(RESPONSE)
    api.subscribe(api.out_topic)
    # fresh, well-formed commands, but retained: a reboot would run at every start
    req_id = f"cmd_{int(time.time() * 1000)}_{api.instance}_1"
    api.publish(REQUEST, b'{"type":"rpc","id":"%s","path":"file","method":"exec","args":'
                b'{"command":"/sbin/reboot"}}' % req_id.encode(), retain=True)
    session = f"{ROUTER}-{int(time.time() * 1000)}-retained"
    api.publish(X_IN, b'{"type":"x-start","sessionId":"%s","responseTopic":"%s",'
                b'"timestamp":"%s"}' % (session.encode(), api.out_topic.encode(),
                                        iso_now().encode()), retain=True)
    toml = TOML.replace("[mqtt]\n", f'[mqtt]\nprotocol = "{protocol}"\n')
    for _ in range(3):
        bridge = BridgeProcess(broker.url, toml=toml, env={
            "PATH": path_with(tmp_path / "bin"), "FAKE_UBUS_RUNS": str(runs)}).start()
        try:
            mark = api.mark()
            wait_online(api, start=mark)
            # answered after the broker handed over the retained messages of the subscriptions
            info = api.rpc(ROUTER, "bridge", "info", timeout=20)["result"]
            assert info["link"]["inbound_retained"] == 2, info["link"]
            assert info["terminal"]["started"] == 0 and info["counters"]["requests"] == 1
        finally:
            status = bridge.terminate()
            log = bridge.log()
            shutil.rmtree(bridge.dir, ignore_errors=True)
        assert status == 0
        for topic in (REQUEST, X_IN):
            assert log.count(f"ignored a retained message on {topic}") == 1, log[-3000:]
    assert "file exec" not in (runs.read_text() if runs.exists() else "")
    assert api.x_messages(session) == []
    assert [m for m in api.matching(RESPONSE) if m.json().get("id") == req_id] == []
