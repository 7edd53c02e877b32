"""RPC end to end: the API side on a real Mosquitto, the real daemon, real children."""

from __future__ import annotations

import json
import os
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable

from tests.conftest import wait_online
from tests.helpers.apiclient import ApiClient
from tests.helpers.bridge import BridgeProcess
from tests.helpers.fake_ubus import SYSTEM_INFO, process_gone, write_fake_ubus
from tests.helpers.wait import wait_for

ROUTER = "test-router"
REQUEST = f"spotfi/router/{ROUTER}/rpc/request"
RESPONSE = f"spotfi/router/{ROUTER}/rpc/response"
TOKEN = "e2e-secret-token-4711"


def ubus_bridge(make_bridge: Callable[..., BridgeProcess], tmp_path: Path,
                **env: str) -> BridgeProcess:
    binary = write_fake_ubus(tmp_path / "bin")
    return make_bridge(token=TOKEN, env={
        "PATH": f"{binary.parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "SPOTFI_RPC_BACKEND": "auto", **env})


def replies_for(api: ApiClient, req_id: Any) -> list[dict[str, Any]]:
    out = []
    for message in api.matching(RESPONSE):
        body = message.json()
        if json.dumps(body.get("id")) == json.dumps(req_id):
            out.append(body)
    return out


def test_local_backend_through_the_broker(api: ApiClient,
                                          make_bridge: Callable[..., BridgeProcess]) -> None:
    bridge = make_bridge(token=TOKEN, env={"SPOTFI_RPC_BACKEND": "local"})
    wait_online(api)
    info = api.rpc(ROUTER, "system", "info")
    assert info["status"] == "success" and info["result"]["memory"]["total"] > 0
    assert len(info["result"]["load"]) == 3
    board = api.rpc(ROUTER, "system", "board")
    assert board["result"]["kernel"] == os.uname().release
    run = api.rpc(ROUTER, "file", "exec", {"command": "/bin/sh",
                                           "params": ["-c", "echo out; echo err >&2; exit 2"]})
    assert run["result"] == {"code": 2, "stdout": "out\n", "stderr": "err\n"}
    missing = api.rpc(ROUTER, "uspot", "client_list")
    assert missing == {"type": "rpc-result", "id": missing["id"], "status": "error",
                       "error": "Not found", "result": {}, "exitCode": 4}
    assert api.rpc(ROUTER, "bridge", "ping")["result"]["pong"] is True
    sessions = api.rpc(ROUTER, "bridge", "sessions")
    assert sessions["result"] == {"sessions": []}
    about = api.rpc(ROUTER, "bridge", "info")
    result = about["result"]
    assert result["backend"] == "local" and result["counters"]["ok"] >= 5
    assert result["counters"]["errors"] == 1
    raw = b"".join(m.payload for m in api.matching(RESPONSE))
    assert TOKEN.encode() not in raw
    assert TOKEN not in bridge.log()


def test_bad_requests_through_the_broker(api: ApiClient,
                                         make_bridge: Callable[..., BridgeProcess]) -> None:
    make_bridge(env={"SPOTFI_RPC_BACKEND": "local"})
    wait_online(api)
    api.subscribe(RESPONSE)
    api.publish(REQUEST, b'{"type":"rpc","id":"broken-1","path":"system","meth')
    api.publish(REQUEST, b'{"type":"rpc","path":"system","method":"info"}')  # no id
    api.publish(REQUEST, json.dumps({"type": "rpc", "id": 99, "path": "system",
                                     "method": "info", "args": [1]}).encode())
    broken = api.wait_message(RESPONSE, lambda m: m.json()["id"] == "broken-1").json()
    assert broken["status"] == "error" and broken["error"].startswith("payload is not valid JSON")
    numeric = api.wait_message(RESPONSE, lambda m: m.json()["id"] == 99).json()
    assert numeric["error"] == "'args' must be a JSON object"
    counters = api.rpc(ROUTER, "bridge", "info")["result"]["counters"]
    assert counters["unroutable"] == 1 and counters["invalid"] == 3
    assert len(api.matching(RESPONSE)) == 3  # nothing for the request without an id


def test_ubus_backend_timeout_kills_the_group_and_daemon_stays_responsive(
        api: ApiClient, make_bridge: Callable[..., BridgeProcess], tmp_path: Path) -> None:
    pidfile = tmp_path / "grandchild.pid"
    ubus_bridge(make_bridge, tmp_path, FAKE_UBUS_PIDFILE=str(pidfile))
    wait_online(api)
    assert api.rpc(ROUTER, "system", "info")["result"] == SYSTEM_INFO
    assert api.rpc(ROUTER, "bridge", "info")["result"]["backend"] == "ubus"
    api.subscribe(RESPONSE)
    slow_id = api.rpc_send(ROUTER, "fork", "grandchild", timeout=1500)
    # while it runs, other calls are answered
    assert api.rpc(ROUTER, "bridge", "ping")["status"] == "success"
    assert api.rpc(ROUTER, "nosuch", "thing")["error"] == "Not found"
    reply = api.wait_message(RESPONSE, lambda m: m.json()["id"] == slow_id, 10).json()
    assert reply["status"] == "error" and reply["error"] == "timeout after 1.5 s"
    pid = int(pidfile.read_text())
    wait_for(lambda: process_gone(pid), 5, f"grandchild {pid} to die")
    assert api.rpc(ROUTER, "bridge", "info")["result"]["counters"]["timeouts"] == 1


def test_redelivered_and_expired_requests(api: ApiClient,
                                          make_bridge: Callable[..., BridgeProcess],
                                          tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    ubus_bridge(make_bridge, tmp_path, FAKE_UBUS_RUNS=str(runs))
    wait_online(api)
    api.subscribe(RESPONSE)
    for _ in range(3):  # the broker may deliver a request more than once
        api.rpc_send(ROUTER, "slow", "short", req_id="dup-1")
    wait_for(lambda: replies_for(api, "dup-1"), 10, "a reply to dup-1")
    api.rpc_send(ROUTER, "slow", "short", req_id="dup-1")  # after the reply: re-sent
    counters = wait_for(lambda: (c := api.rpc(ROUTER, "bridge", "info")["result"]["counters"])
                        ["duplicates"] == 3 and c, 10, "three duplicates counted")
    replies = replies_for(api, "dup-1")
    assert all(r == replies[0] for r in replies) and replies[0]["result"] == {"slept": True}
    assert 2 <= len(replies) <= 4
    old = (datetime.now(timezone.utc) - timedelta(hours=1)).isoformat().replace("+00:00", "Z")
    expired = api.rpc(ROUTER, "system", "reboot", timestamp=old)
    assert expired["status"] == "error" and expired["error"] == "expired"
    # (metrics call ubus too: look only at these two calls)
    calls = [line for line in runs.read_text().splitlines()
             if line in ("slow short", "system reboot")]
    assert calls == ["slow short"]  # ran once; the expired reboot never ran
    assert counters["ok"] >= 1


def test_burst_of_200_requests_each_answered_exactly_once(
        api: ApiClient, make_bridge: Callable[..., BridgeProcess], tmp_path: Path) -> None:
    ubus_bridge(make_bridge, tmp_path)
    wait_online(api)
    api.subscribe(RESPONSE)
    ids = [f"burst-{i}" for i in range(200)]
    for req_id in ids:
        api.client.publish(REQUEST, json.dumps({"type": "rpc", "id": req_id, "path": "system",
                                                "method": "info", "args": {}}).encode(), qos=1)
    wait_for(lambda: len(api.matching(RESPONSE)) >= 200, 60, "200 replies")
    counted = Counter(m.json()["id"] for m in api.matching(RESPONSE))
    assert set(counted) == set(ids) and set(counted.values()) == {1}
    replies = [m.json() for m in api.matching(RESPONSE)]
    busy = sum(1 for r in replies if r.get("error") == "busy")
    assert all(r["result"] == SYSTEM_INFO for r in replies if r["status"] == "success")
    assert all(r["status"] == "success" or r["error"] == "busy" for r in replies)
    counters = api.rpc(ROUTER, "bridge", "info")["result"]["counters"]
    assert counters["busy"] == busy and counters["ok"] == 200 - busy


def test_sigterm_answers_the_running_call_and_kills_it(
        api: ApiClient, make_bridge: Callable[..., BridgeProcess], tmp_path: Path) -> None:
    pidfile = tmp_path / "grandchild.pid"
    bridge = ubus_bridge(make_bridge, tmp_path, FAKE_UBUS_PIDFILE=str(pidfile))
    wait_online(api)
    api.subscribe(RESPONSE)
    req_id = api.rpc_send(ROUTER, "fork", "grandchild")
    wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), 10, "the call to start")
    assert bridge.terminate(timeout=10) == 0
    reply = api.wait_message(RESPONSE, lambda m: m.json()["id"] == req_id, 10).json()
    assert reply["error"] == "cancelled: bridge shutting down"
    pid = int(pidfile.read_text())
    wait_for(lambda: process_gone(pid), 5, f"grandchild {pid} to die")
