"""Two brokers joined by a Mosquitto bridge, standing in for a clustered EMQX.

The router's bridge daemon connects to broker A; the API-side client connects to
broker B; every message crosses the broker-to-broker bridge (``topic spotfi/#
both 1``, persistent session). RPC, presence, metrics and a terminal session
must work across the two, and so after a restart of broker A.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.conftest import wait_online
from tests.helpers.apiclient import ApiClient
from tests.helpers.bridge import BridgeProcess
from tests.helpers.broker import Mosquitto
from tests.helpers.wait import wait_for
from tests.integration.test_faults import (
    BRIDGE_TOML,
    ROUTER,
    RPC_RESPONSE,
    STATUS,
    assert_counted,
    cmdline,
    counter_script,
    proc_children,
    replies,
    retained_status,
    session_output,
    status_since,
    wait_reply,
    wait_session_text,
    zombies,
)

METRICS = f"spotfi/router/{ROUTER}/metrics"
CLUSTER_TOML = BRIDGE_TOML.replace("interval = 30", "interval = 5")


def bridge_config(remote_port: int) -> str:
    """Broker B's side of the broker-to-broker link (Mosquitto's ``connection`` block)."""
    return "\n".join([
        "connection cluster-a",
        f"address 127.0.0.1:{remote_port}",
        "topic spotfi/# both 1",
        "cleansession false",
        "remote_clientid cluster-b",
        "restart_timeout 1 1",
        "keepalive_interval 5",
        "notifications false",
        "try_private true",
        # Only A ever holds the router's retained status first-hand. Without this, B would
        # push its own retained copy back on every reconnect of the link, and after a
        # restart of A its stale OFFLINE overwrote the router's fresh ONLINE on A (seen
        # in this test). EMQX keeps one retained store for the whole cluster, so it has
        # no such echo to stand in for.
        "bridge_outgoing_retain false",
    ])


@dataclass
class Cluster:
    a: Mosquitto
    b: Mosquitto
    api: ApiClient      # on B
    bridge: BridgeProcess  # on A

    def wait_linked(self, timeout: float = 20.0) -> None:
        """Until a message published on A reaches B and one published on B reaches A."""
        on_a = ApiClient(self.a.port)
        try:
            topic_a = f"spotfi/api/{on_a.instance}/probe"
            topic_b = f"spotfi/api/{self.api.instance}/probe"
            on_a.subscribe(topic_b)
            self.api.subscribe(topic_a)

            def crossed() -> bool:
                token = f"p{time.monotonic()}".encode()
                start_a, start_b = on_a.mark(), self.api.mark()
                on_a.publish(topic_a, token)
                self.api.publish(topic_b, token)
                try:
                    self.api.wait_message(topic_a, lambda m: m.payload == token, 0.5, start_b)
                    on_a.wait_message(topic_b, lambda m: m.payload == token, 0.5, start_a)
                except AssertionError:
                    return False
                return True

            wait_for(crossed, timeout, "the broker-to-broker bridge to carry both ways")
        finally:
            on_a.close()


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    a = Mosquitto(persistence=True).start()  # a cluster node keeps its sessions over a restart
    b = Mosquitto(extra_config=bridge_config(a.port)).start()
    api = ApiClient(b.port)
    bridge = BridgeProcess(a.url, toml=CLUSTER_TOML)
    try:
        for topic in (STATUS, METRICS, RPC_RESPONSE, api.out_topic):
            api.subscribe(topic)
        scene = Cluster(a, b, api, bridge)
        scene.wait_linked()
        bridge.start()
        yield scene
    finally:
        bridge.close()
        api.close()
        b.close()
        a.close()
    assert "Traceback" not in bridge.log()


def test_rpc_presence_metrics_and_terminal_across_two_brokers(cluster: Cluster) -> None:
    api = cluster.api
    wait_online(api, timeout=20)
    assert retained_status(cluster.b.port) == b"ONLINE"  # B keeps the retained status too
    metrics = api.wait_message(METRICS, timeout=15).json()["metrics"]
    assert metrics["uptime"].isdigit() and isinstance(metrics["activeUsers"], int)
    assert api.rpc(ROUTER, "bridge", "ping", timeout=15)["status"] == "success"
    reply = api.rpc(ROUTER, "file", "exec", {"command": "/bin/sh", "params": ["-c", "echo across"]},
                    timeout=15)
    assert reply["result"]["stdout"] == "across\n", reply
    session = api.x_start(ROUTER, cols=100, rows=30)
    api.wait_x(session, "x-started", 15)
    api.x_send(ROUTER, session, b"stty size; " + counter_script("C", 500, every=250, pause=0.02))
    output = wait_session_text(api, session, b"END", 20)
    assert b"30 100" in output
    assert_counted(output, "C", 500)
    api.x_send(ROUTER, session, b"exit 3\n")
    ended = api.wait_x(session, "x-error", 15)
    assert ended["reason"] == "exit" and ended["exitCode"] == 3, ended
    # a second heartbeat crosses too, then a clean stop is seen on B
    first = api.matching(METRICS)[0]
    api.wait_message(METRICS, lambda m: m is not first, 15, api.received.index(first) + 1)
    mark = api.mark()
    assert cluster.bridge.terminate(5) == 0
    api.wait_message(STATUS, lambda m: m.payload == b"OFFLINE", 15, mark)
    assert retained_status(cluster.b.port) == b"OFFLINE"


def test_restart_of_broker_a_is_survived(cluster: Cluster) -> None:
    api = cluster.api
    wait_online(api, timeout=20)
    assert api.rpc(ROUTER, "bridge", "ping", timeout=15)["status"] == "success"
    session = api.x_start(ROUTER)
    api.wait_x(session, "x-started", 15)
    api.x_send(ROUTER, session, counter_script("A1", 200, every=200, pause=0, end="MID")[:-1]
               + b"; sleep 1; " + counter_script("A2", 300, every=50, pause=0.05))
    wait_session_text(api, session, b"MID", 15)
    slow = api.rpc_send(ROUTER, "file", "exec",
                        {"command": "/bin/sh", "params": ["-c", "sleep 1; echo survived"]})
    wait_for(lambda: any(cmdline(pid)[-1:] == ["sleep 1; echo survived"]
                         for pid, _, _ in proc_children(cluster.bridge.pid)), 15,
             "the slow RPC to be running")
    mark = api.mark()
    cluster.a.restart()  # graceful: A saves the sessions (the router's and B's link) on exit
    cluster.wait_linked(30)
    api.wait_message(STATUS, lambda m: m.payload == b"ONLINE" and not m.retain, 30, mark)
    output = wait_session_text(api, session, b"END", 30)
    assert_counted(output, "A1", 200)
    assert_counted(output, "A2", 300)
    reply = wait_reply(api, slow, 30)
    assert reply["status"] == "success" and reply["result"]["stdout"] == "survived\n", reply
    assert api.rpc(ROUTER, "bridge", "ping", timeout=15)["status"] == "success"
    info = api.rpc(ROUTER, "bridge", "info", timeout=15)["result"]
    assert info["link"]["connects"] == 2 and info["terminal"]["sessions"] == 1
    assert len(replies(api, slow)) == 1
    session_output(api, session)  # gap-free, in order
    assert status_since(api, mark)[-1] == b"ONLINE"
    assert retained_status(cluster.b.port) == b"ONLINE"
    assert retained_status(cluster.a.port) == b"ONLINE"
    assert zombies(cluster.bridge.pid) == []
