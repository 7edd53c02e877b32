"""Terminal sessions end to end: the API side on a real Mosquitto, the real daemon, real shells."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
from pathlib import Path
from typing import Any, Callable, Optional

from tests.conftest import wait_online
from tests.fuzz.procfs import comm
from tests.helpers.apiclient import ApiClient
from tests.helpers.bridge import BridgeProcess
from tests.helpers.broker import Mosquitto
from tests.helpers.wait import wait_for

ROUTER = "test-router"
OWN_OUT = f"spotfi/router/{ROUTER}/x/out"
BASE = ("[metrics]\ninterval = 30\n[mqtt]\nkeepalive = 10\nbackoff_min = 0.1\n"
        "backoff_max = 1\n[terminal]\nshell = \"/bin/sh\"\n")


def chunks(api: ApiClient, session_id: str, topic: Optional[str] = None) -> list[dict[str, Any]]:
    """x-data in arrival order, QoS 1 duplicates (same seq) removed; asserts no gap."""
    seen: dict[int, dict[str, Any]] = {}
    order = []
    for message in api.x_messages(session_id, topic):
        if message.get("type") == "x-data" and message["seq"] not in seen:
            seen[message["seq"]] = message
            order.append(message["seq"])
    assert sorted(order) == list(range(len(order))), "gap in seq"
    return [seen[seq] for seq in sorted(order)]


def output(api: ApiClient, session_id: str, topic: Optional[str] = None) -> bytes:
    return b"".join(base64.b64decode(m["data"]) for m in chunks(api, session_id, topic))


def sessions(api: ApiClient) -> list[dict[str, Any]]:
    reply = api.rpc(ROUTER, "bridge", "sessions")
    assert reply["status"] == "success", reply
    result: list[dict[str, Any]] = reply["result"]["sessions"]
    return result


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    fields = handle.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry))
    return found


def state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return ""


def test_echo_size_resize_exit_and_no_leaked_socket(
        api: ApiClient, make_bridge: Callable[..., BridgeProcess]) -> None:
    bridge = make_bridge(toml=BASE)
    wait_online(api)
    sid = api.x_start(ROUTER, cols=100, rows=30)
    started = api.wait_x(sid, "x-started")
    assert "seq" in started["capabilities"]
    api.x_send(ROUTER, sid, b"stty size; echo echo-$((6*7))\n")
    api.wait_output(sid, b"echo-42")
    assert b"30 100" in output(api, sid)
    info = sessions(api)
    assert [s["id"] for s in info] == [sid]
    shell = info[0]["pid"]
    assert shell in children(bridge.pid)
    # the daemon's MQTT socket (and every other fd of it) stays out of the shell
    targets = [os.readlink(f"/proc/{shell}/fd/{fd}") for fd in os.listdir(f"/proc/{shell}/fd")]
    assert all(t.startswith(("/dev/pts/", "/dev/tty")) for t in targets), targets
    api.x_resize(ROUTER, sid, 150, 50)
    api.x_send(ROUTER, sid, b"stty size; exit 5\n")
    error = api.wait_x(sid, "x-error")
    assert error["reason"] == "exit" and error["exitCode"] == 5
    assert b"50 150" in output(api, sid)
    wait_for(lambda: state(shell) == "", 10, "shell reaped")
    assert "test-token" not in bridge.log()


def test_eight_sessions_on_their_own_topics_without_crosstalk(
        api: ApiClient, make_bridge: Callable[..., BridgeProcess]) -> None:
    make_bridge(toml=BASE)
    wait_online(api)
    ids = []
    for i in range(8):
        topic = f"spotfi/api/instance{i}/x/out"
        ids.append(api.x_start(ROUTER, f"{ROUTER}-{i}-e2e", topic))
    for i, sid in enumerate(ids):
        api.wait_x(sid, "x-started", topic=f"spotfi/api/instance{i}/x/out")
    for i, sid in enumerate(ids):
        api.x_send(ROUTER, sid, f"echo from-{i}-$((100+{i}))\n".encode())
    for i, sid in enumerate(ids):
        api.wait_output(sid, f"from-{i}-{100 + i}".encode(), topic=f"spotfi/api/instance{i}/x/out")
    for i, sid in enumerate(ids):
        on_topic = api.matching(f"spotfi/api/instance{i}/x/out")
        assert {m.json()["sessionId"] for m in on_topic} == {sid}
        text = output(api, sid, f"spotfi/api/instance{i}/x/out")
        assert all(f"from-{j}-{100 + j}".encode() not in text for j in range(8) if j != i)
    # a ninth is refused with the default limit, and nobody else is touched
    ninth = api.x_start(ROUTER, "ninth")
    assert api.wait_x("ninth", "x-error")["error"] == "too many sessions (8)"
    assert ninth == "ninth" and len(sessions(api)) == 8


def test_bulk_output_complete_and_in_order_through_the_broker(
        api: ApiClient, make_bridge: Callable[..., BridgeProcess]) -> None:
    argv = ["seq", "1", "600000"]
    make_bridge(toml=BASE.replace('"/bin/sh"', repr(argv).replace("'", '"')))
    wait_online(api)
    sid = api.x_start(ROUTER)
    error = api.wait_x(sid, "x-error", timeout=60)
    assert error["exitCode"] == 0
    expected = subprocess.run(argv, capture_output=True, check=True).stdout
    arrived = [m["seq"] for m in api.x_messages(sid) if m.get("type") == "x-data"]
    assert arrived == sorted(arrived), "x-data arrived out of order"
    assert output(api, sid).replace(b"\r\n", b"\n") == expected


def test_paused_broker_blocks_the_writer_and_loses_nothing(
        broker: Mosquitto, api: ApiClient, make_bridge: Callable[..., BridgeProcess]) -> None:
    bridge = make_bridge(toml=BASE + "outbox_bytes = 262144\n")
    wait_online(api)
    sid = api.x_start(ROUTER)
    api.wait_x(sid, "x-started")
    shell = sessions(api)[0]["pid"]
    api.x_send(ROUTER, sid, b"seq 1 1000000; echo end-$((7*7))\n")
    api.wait_output(sid, b"\r\n1\r\n")  # seq is running
    broker.pause()
    try:
        writer = wait_for(lambda: next((p for p in children(shell) if comm(p) == "seq"), None),
                          10, "seq process")

        def blocked() -> bool:
            try:
                with open(f"/proc/{writer}/syscall") as handle:
                    first = handle.read().split()[0]
            except OSError:
                return False
            return state(writer) == "S" and first not in ("running", "-1")

        wait_for(blocked, 20, "seq blocked writing to the PTY while the broker is paused")
    finally:
        broker.resume()
    api.wait_output(sid, b"end-49", timeout=60)
    expected = subprocess.run(["seq", "1", "1000000"], capture_output=True, check=True).stdout
    text = output(api, sid).replace(b"\r\n", b"\n")
    assert expected in text
    info = sessions(api)[0]
    assert info["maxBuffered"] <= 262144, info
    assert bridge.proc is not None and bridge.proc.poll() is None


def test_session_survives_a_broker_restart_with_output_from_the_outage(
        tmp_path: Path) -> None:
    broker = Mosquitto(persistence=True).start()
    api = ApiClient(broker.port, clean_session=False, client_id="api-persistent")
    bridge = BridgeProcess(broker.url, toml=BASE).start()
    marker = tmp_path / "produced"
    try:
        wait_online(api)
        sid = api.x_start(ROUTER)
        api.wait_x(sid, "x-started")
        api.x_send(ROUTER, sid, f"sleep 1; seq 1 3000; touch {marker}; echo out-$((8*8))\n"
                   .encode())
        api.wait_output(sid, str(marker).encode())  # the command line echoed back
        broker.stop()
        wait_for(marker.exists, 15, "the shell to produce output during the outage")
        broker.start()
        api.wait_output(sid, b"out-64", timeout=30)
        text = output(api, sid).replace(b"\r\n", b"\n")
        expected = subprocess.run(["seq", "1", "3000"], capture_output=True, check=True).stdout
        assert expected in text
        api.x_send(ROUTER, sid, b"echo still-$((9*9))\n")
        api.wait_output(sid, b"still-81", timeout=15)
        assert not [m for m in api.x_messages(sid) if m.get("type") == "x-error"]
    finally:
        bridge.close()
        api.close()
        broker.close()


def test_refused_topics_duplicate_start_idle_and_unknown(
        api: ApiClient, make_bridge: Callable[..., BridgeProcess]) -> None:
    make_bridge(toml=BASE + "idle_timeout = 1\n")
    wait_online(api)
    api.subscribe(OWN_OUT)
    for n, topic in enumerate(("#", "spotfi/router/other/x/out", "$SYS/x", "spotfi/api/+/x/out",
                               "spotfi/api//x/out")):
        sid = f"bad-{n}"
        api.publish(f"spotfi/router/{ROUTER}/x/in",
                    b'{"type":"x-start","sessionId":"%s","responseTopic":"%s"}'
                    % (sid.encode(), topic.encode()))
        error = api.wait_x(sid, "x-error", topic=OWN_OUT)
        assert error["reason"] == "bad-topic"
    assert sessions(api) == []
    sid = api.x_start(ROUTER, "dup-session")
    api.wait_x(sid, "x-started")
    pid = sessions(api)[0]["pid"]
    api.x_start(ROUTER, "dup-session")
    wait_for(lambda: len([m for m in api.x_messages(sid) if m["type"] == "x-started"]) == 2,
             10, "second x-started")
    assert [s["pid"] for s in sessions(api)] == [pid]
    api.x_send(ROUTER, "no-such-session", b"ls\n")
    assert api.wait_x("no-such-session", "x-error", topic=OWN_OUT)["error"] == "unknown session"
    # nothing typed, nothing printed: the idle timeout closes it
    error = api.wait_x(sid, "x-error", timeout=15)
    assert error["reason"] == "idle"
    wait_for(lambda: state(pid) == "", 10, "idle shell reaped")


def test_sigterm_tells_sessions_before_offline_and_start_stop_leaks_nothing(
        api: ApiClient, make_bridge: Callable[..., BridgeProcess]) -> None:
    bridge = make_bridge(toml=BASE)
    wait_online(api)
    api.subscribe(f"spotfi/router/{ROUTER}/status")
    warm = api.x_start(ROUTER, "warm-up")
    api.wait_x(warm, "x-started")
    api.x_stop(ROUTER, warm)
    wait_for(lambda: not children(bridge.pid), 10, "warm-up shell reaped")
    fds = len(os.listdir(f"/proc/{bridge.pid}/fd"))
    for n in range(40):
        sid = api.x_start(ROUTER, f"cycle-{n}")
        api.wait_x(sid, "x-started")
        api.x_stop(ROUTER, sid)
    wait_for(lambda: sessions(api) == [] and not children(bridge.pid), 15,
             "every cycled shell reaped")
    assert len(os.listdir(f"/proc/{bridge.pid}/fd")) == fds
    keep = [api.x_start(ROUTER, f"open-{n}") for n in range(3)]
    for sid in keep:
        api.wait_x(sid, "x-started")
    mark = api.mark()
    bridge.signal(signal.SIGTERM)
    offline = api.wait_message(f"spotfi/router/{ROUTER}/status",
                               lambda m: m.payload == b"OFFLINE", 10, mark)
    assert bridge.proc is not None and bridge.proc.wait(10) == 0
    for sid in keep:
        error = api.wait_x(sid, "x-error", timeout=5)
        assert error["error"] == "bridge shutting down"
        told = next(m for m in api.received[mark:] if m.topic == api.out_topic
                    and m.json().get("sessionId") == sid and m.json()["type"] == "x-error")
        assert told.at <= offline.at


def test_a_test_bridge_runs_a_pinned_shell_not_the_users_login_shell(
        api: ApiClient, make_bridge: Callable[..., BridgeProcess]) -> None:
    # A login shell reads ~/.bashrc and ~/.profile: what the host user keeps there (a slow
    # pyenv init, a prompt that prints) must not decide whether a test passes.
    bridge = make_bridge()
    wait_online(api)
    session_id = api.x_start(ROUTER)
    api.wait_x(session_id, "x-started")
    assert [s["shell"] for s in sessions(api)] == [["/bin/sh"]], bridge.log()
    api.x_stop(ROUTER, session_id)
