"""The real daemon as a process against a real Mosquitto: presence, metrics, signals, config."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable

from spotfi_bridge import link
from spotfi_bridge.rpc import executor
from spotfi_bridge.terminal import manager
from tests.conftest import wait_online
from tests.helpers.apiclient import ApiClient
from tests.helpers.bridge import ROOT, BridgeProcess
from tests.helpers.broker import Mosquitto
from tests.helpers.tcpproxy import TcpProxy
from tests.helpers.wait import wait_for

ROUTER = "test-router"
STATUS = f"spotfi/router/{ROUTER}/status"
METRICS = f"spotfi/router/{ROUTER}/metrics"
FAST = "[metrics]\ninterval = 5\n[mqtt]\nkeepalive = 5\nbackoff_min = 0.1\nbackoff_max = 1\n"


def _metrics(api: ApiClient) -> list[dict]:
    return [m.json()["metrics"] for m in api.matching(METRICS)]


def test_online_first_metrics_schema_and_clean_sigterm(
        broker: Mosquitto, api: ApiClient, make_bridge: Callable[..., BridgeProcess]) -> None:
    api.subscribe(f"spotfi/router/{ROUTER}/#")
    bridge = make_bridge(toml=FAST, token="very-secret-token-123")
    wait_online(api)
    first = api.wait_message(METRICS, timeout=10)
    body = first.json()
    assert body["type"] == "metrics"
    metrics = body["metrics"]
    # compat fields exactly as the Go bridge sends them
    assert isinstance(metrics["uptime"], str) and metrics["uptime"].isdigit()
    assert isinstance(metrics["cpuLoad"], (int, float))
    assert isinstance(metrics["totalMemory"], int) and isinstance(metrics["freeMemory"], int)
    assert isinstance(metrics["activeUsers"], int)
    # extensions beside them
    for key in ("cpuPercent", "loadAvg", "availableMemory", "tmp", "interfaces", "bridgeVersion",
                "bridgeRss", "sessions"):
        assert key in metrics, key
    assert "lo" in metrics["interfaces"]
    # cadence: a second heartbeat comes, not sooner than the interval allows
    second = api.wait_message(METRICS, timeout=12, start=api.received.index(first) + 1)
    assert second.at - first.at > 4.0
    assert "rxRate" in second.json()["metrics"]["interfaces"]["lo"]
    mark = api.mark()
    assert bridge.terminate(timeout=3) == 0
    api.wait_message(STATUS, lambda m: m.payload == b"OFFLINE", 5, mark)
    late = ApiClient(broker.port)  # a late subscriber gets the retained OFFLINE
    try:
        late.subscribe(STATUS)
        retained = late.wait_message(STATUS, timeout=5)
        assert retained.payload == b"OFFLINE" and retained.retain
    finally:
        late.close()
    log = bridge.log()
    assert "very-secret-token-123" not in log
    assert "starting" in log and "stopped" in log


def test_last_will_after_kill_9(api: ApiClient, make_bridge: Callable[..., BridgeProcess]) -> None:
    bridge = make_bridge(toml=FAST)
    wait_online(api)
    mark = api.mark()
    bridge.kill()
    message = api.wait_message(STATUS, lambda m: m.payload == b"OFFLINE", 15, mark)
    assert message.payload == b"OFFLINE"


def test_silent_network_cut_fires_will_then_recovers(
        broker: Mosquitto, api: ApiClient, make_bridge: Callable[..., BridgeProcess]) -> None:
    with TcpProxy(broker.port) as proxy:
        bridge = make_bridge(toml=FAST, broker_url=proxy.url)
        wait_online(api)
        mark = api.mark()
        proxy.blackholed = True  # packets vanish; no FIN, no RST
        api.wait_message(STATUS, lambda m: m.payload == b"OFFLINE", 20, mark)
        bridge.wait_log("connection lost", 20)
        proxy.cut()
        proxy.blackholed = False
        wait_online(api, timeout=20, start=mark)


def test_broker_restart_republishes_online(
        broker: Mosquitto, make_bridge: Callable[..., BridgeProcess]) -> None:
    bridge = make_bridge(toml=FAST)
    api = ApiClient(broker.port)
    wait_online(api)
    api.close()
    broker.restart()
    api = ApiClient(broker.port)
    try:
        wait_online(api, timeout=15)  # retained ONLINE again on the fresh broker
        reply = api.rpc(ROUTER, "bridge", "ping", timeout=10)
        assert reply["status"] == "success", reply  # subscriptions restored
    finally:
        api.close()
    assert bridge.proc is not None and bridge.proc.poll() is None


def test_config_error_exits_78_with_one_clear_line(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "SPOTFI_ROUTER_ID": "r1",
           "SPOTFI_TOKEN": "tok-abcdef", "SPOTFI_MQTT_BROKER": "mqtt://127.0.0.1:1",
           "SPOTFI_ENV_FILE": os.devnull, "SPOTFI_METRICS_INTERVAL": "90"}
    proc = subprocess.run([sys.executable, "-m", "spotfi_bridge", "run"], env=env,
                          capture_output=True, text=True, timeout=20)
    assert proc.returncode == 78
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "SPOTFI_METRICS_INTERVAL" in lines[0] and "interval" in lines[0] and "'90'" in lines[0]
    assert "tok-abcdef" not in proc.stderr


def test_sighup_reloads_and_reconnects_only_when_needed(
        api: ApiClient, make_bridge: Callable[..., BridgeProcess]) -> None:
    bridge = make_bridge(toml=FAST)
    wait_online(api)
    config = bridge.dir / "bridge.toml"
    config.write_text(FAST.replace("interval = 5", "interval = 7"))
    bridge.signal(signal.SIGHUP)
    bridge.wait_log("config reloaded\n")
    info = api.rpc(ROUTER, "bridge", "info")["result"]
    assert info["metrics"]["interval"] == 7.0
    connects = info["link"]["connects"]
    assert connects == 1
    # a connection setting changes: a new connection, ONLINE again
    mark = api.mark()
    config.write_text(FAST.replace("keepalive = 5", "keepalive = 6"))
    bridge.signal(signal.SIGHUP)
    bridge.wait_log("config reloaded (reconnecting)")
    wait_online(api, start=mark)
    info = wait_for(lambda: (lambda i: i if i["link"]["connects"] == 2 else None)(
        api.rpc(ROUTER, "bridge", "info")["result"]), 10, "second connect")
    assert info["link"]["connects"] == 2
    # a broken config keeps the running one
    config.write_text("[metrics]\ninterval = 500\n")
    bridge.signal(signal.SIGHUP)
    bridge.wait_log("reload failed, keeping the running config")
    assert api.rpc(ROUTER, "bridge", "ping")["status"] == "success"


def test_check_config_masks_token(tmp_path: Path) -> None:
    config = tmp_path / "bridge.toml"
    config.write_text('[router]\nid = "r9"\ntoken = "tok-zyxwvu"\n[mqtt]\nbroker = "mqtts://example.net"\n')
    config.chmod(0o600)
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT),
           "SPOTFI_ENV_FILE": os.devnull}
    proc = subprocess.run([sys.executable, "-m", "spotfi_bridge", "check-config", "--config",
                           str(config)], env=env, capture_output=True, text=True, timeout=20)
    assert proc.returncode == 0, proc.stderr
    effective = json.loads(proc.stdout)
    assert effective["router"]["id"] == "r9"
    assert effective["mqtt"]["broker"] == "mqtts://example.net"
    assert "tok-zyxwvu" not in proc.stdout + proc.stderr


def test_a_keystroke_the_broker_delivers_twice_is_typed_once(
        broker: Mosquitto, api: ApiClient, make_bridge: Callable[..., BridgeProcess],
        tmp_path: Path) -> None:
    """QoS 1 is at least once: the bridge's PUBACK is lost, so after the reconnect the broker
    sends the x-data again (DUP set, same packet id). The shell must run it once."""
    runs = tmp_path / "runs.log"
    with TcpProxy(broker.port) as proxy:
        bridge = make_bridge(toml=FAST, broker_url=proxy.url)
        wait_online(api)
        session = api.x_start(ROUTER)
        api.wait_x(session, "x-started")
        proxy.blackholed_up = True  # the bridge hears the broker; nothing it says arrives
        mark = api.mark()
        api.x_send(ROUTER, session, f"echo run >> {runs}\n".encode())
        wait_for(lambda: runs.exists() and runs.read_text() == "run\n", 10,
                 "the shell to run the command once")
        proxy.blackholed_up = False
        proxy.cut()  # the PUBACK is gone: the broker still owes us that message
        wait_online(api, timeout=20, start=mark)
        api.x_send(ROUTER, session, f"echo done >> {runs}\n".encode())
        wait_for(lambda: runs.read_text().endswith("done\n"), 10, "the next command")
        assert runs.read_text() == "run\ndone\n"
        bridge.wait_log("ignored the broker's resend of a message already handled")


def test_bridge_info_lists_every_counter_zeros_included(
        api: ApiClient, make_bridge: Callable[..., BridgeProcess]) -> None:
    # an operator reading `bridge info` must see auth_refused: 0, not wonder whether the
    # counter exists; a counter that shows up only once it moved reads as "not counted"
    make_bridge(toml=FAST)
    wait_online(api)
    info = api.rpc(ROUTER, "bridge", "info")["result"]
    for part, names in (("link", link.COUNTER_NAMES), ("counters", executor.COUNTER_NAMES),
                        ("terminal", manager.COUNTERS)):
        missing = [name for name in names if name not in info[part]]
        assert not missing, f"{part}: {missing} not listed"
    assert info["link"]["auth_refused"] == 0 and info["link"]["dropped_qos0"] == 0
    assert {"sent", "skipped", "interval"} <= set(info["metrics"])
    # and the link counts nothing it does not declare
    source = Path(link.__file__).read_text()
    assert set(re.findall(r'stats\["(\w+)"\]', source)) <= set(link.COUNTER_NAMES)
