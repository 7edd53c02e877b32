"""The real daemon through a flaky WAN, broker maintenance and killed or stopped processes.

The bridge reaches the broker through a loopback :class:`TcpProxy` the test
controls; the API-side client talks to the broker directly, so only the
router's link is broken. Every scenario ends with the same checks: ONLINE
re-published and retained, subscriptions restored (an RPC works), in-flight
RPCs answered exactly once, terminal output complete, gap-free and in order
(QoS 1 duplicates are discarded by ``seq``), no zombie children, and the Last
Will seen when, and only when, the link really died.
"""

from __future__ import annotations

import base64
import os
import re
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import pytest

from tests.conftest import wait_online
from tests.helpers.apiclient import ApiClient
from tests.helpers.bridge import BridgeProcess
from tests.helpers.broker import Mosquitto
from tests.helpers.tcpproxy import TcpProxy
from tests.helpers.wait import wait_for

ROUTER = "test-router"
STATUS = f"spotfi/router/{ROUTER}/status"
RPC_RESPONSE = f"spotfi/router/{ROUTER}/rpc/response"
KEEPALIVE = 5
BRIDGE_TOML = f"""
[metrics]
interval = 30
[mqtt]
keepalive = {KEEPALIVE}
backoff_min = 0.1
backoff_max = 1
connect_timeout = 2
[rpc]
backend = "local"
[terminal]
shell = ["/bin/sh"]
"""


# ---------------------------------------------------------------------- helpers


def counter_script(tag: str, count: int, every: int = 100, pause: float = 0.05,
                   end: str = "END") -> bytes:
    """Shell input printing ``tag:1:`` .. ``tag:count:``, pausing every ``every`` lines, then
    ``end``. The echo of the command itself matches neither pattern (``"tag:$i:"``, ``E""ND``)."""
    return (f'i=0; while [ $i -lt {count} ]; do i=$((i+1)); echo "{tag}:$i:"; '
            f'[ $((i % {every})) -eq 0 ] && sleep {pause}; done; echo {end[0]}""{end[1:]}\n'
            ).encode()


def session_output(api: ApiClient, session_id: str) -> tuple[bytes, int]:
    """The session's output with QoS 1 duplicates removed, and how many there were.

    Fails when a ``seq`` is missing, when a duplicate differs from the first copy, or
    when a new ``seq`` arrives before an older one (out of order)."""
    chunks: dict[int, bytes] = {}
    duplicates = 0
    last_new = -1
    for message in api.x_messages(session_id):
        if message.get("type") != "x-data":
            continue
        seq = message["seq"]
        data = base64.b64decode(message["data"])
        if seq in chunks:
            assert chunks[seq] == data, f"seq {seq} delivered twice with different data"
            duplicates += 1
            continue
        assert seq > last_new, f"seq {seq} arrived after seq {last_new}: out of order"
        last_new = seq
        chunks[seq] = data
    missing = sorted(set(range(len(chunks))) ^ set(chunks))
    assert not missing, f"seq gap in the output of {session_id}: {missing[:20]}"
    return b"".join(chunks[i] for i in range(len(chunks))), duplicates


def wait_session_text(api: ApiClient, session_id: str, needle: bytes, timeout: float) -> bytes:
    def seen() -> Optional[bytes]:
        output, _ = session_output(api, session_id)
        return output if needle in output else None
    return wait_for(seen, timeout, f"{needle!r} in the output of {session_id}")


def assert_counted(output: bytes, tag: str, count: int) -> None:
    numbers = [int(n) for n in re.findall(rb"%s:(\d+):" % tag.encode(), output)]
    assert numbers == list(range(1, count + 1)), (
        f"{tag}: {len(numbers)} lines, first wrong at "
        f"{next((i for i, n in enumerate(numbers) if n != i + 1), len(numbers))}")


def replies(api: ApiClient, req_id: str) -> list[dict[str, Any]]:
    return [m.json() for m in api.matching(RPC_RESPONSE, lambda m: m.json().get("id") == req_id)]


def wait_reply(api: ApiClient, req_id: str, timeout: float = 20.0) -> dict[str, Any]:
    found = wait_for(lambda: replies(api, req_id), timeout, f"the reply to {req_id}")
    return found[0]


def status_since(api: ApiClient, mark: int) -> list[bytes]:
    return [m.payload for m in api.received[mark:] if m.topic == STATUS]


def barrier(api: ApiClient, timeout: float = 15.0) -> None:
    """Return once the broker has handled everything this client sent before.

    A probe published to a topic the client subscribes to comes back only after the
    broker processed the client's earlier packets (one client's packets are handled in
    order): its (re)subscriptions are in force and retained messages already arrived.
    Retries while the client is still reconnecting."""
    probe = f"spotfi/api/{api.instance}/probe"
    if (probe, 1) not in api._subscriptions:
        api.subscribe(probe)

    def probed() -> bool:
        start = api.mark()
        token = f"probe-{time.monotonic()}".encode()
        api.publish(probe, token)
        try:
            api.wait_message(probe, lambda m: m.payload == token, 0.5, start)
        except AssertionError:
            return False
        return True

    wait_for(probed, timeout, "the broker to answer a probe")


def retained_status(port: int) -> Optional[bytes]:
    """What a dashboard connecting now would read: the retained status, if any."""
    late = ApiClient(port)
    try:
        late.subscribe(STATUS)
        barrier(late)
        retained = late.matching(STATUS, lambda m: m.retain)
        return retained[-1].payload if retained else None
    finally:
        late.close()


def proc_children(pid: int) -> list[tuple[int, str, str]]:
    """(pid, state, comm) of every process whose parent is ``pid``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        comm_end = stat.rfind(")")
        fields = stat[comm_end + 2:].split()
        if int(fields[1]) == pid:
            found.append((int(entry), fields[0], stat[stat.find("(") + 1:comm_end]))
    return found


def zombies(pid: int) -> list[tuple[int, str, str]]:
    return [child for child in proc_children(pid) if child[1] == "Z"]


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return []


@dataclass
class Scene:
    """One broker, a proxy in front of it for the bridge, the API client on the broker."""

    broker: Mosquitto
    proxy: TcpProxy
    api: ApiClient
    bridge: BridgeProcess

    def rpc_send(self, path: str, method: str, args: Optional[dict[str, Any]] = None) -> str:
        req_id: str = self.api.rpc_send(ROUTER, path, method, args)
        return req_id

    def slow_rpc(self, seconds: float, text: str) -> str:
        return self.rpc_send("file", "exec", {"command": "/bin/sh",
                                              "params": ["-c", f"sleep {seconds}; echo {text}"]})

    def ping(self, timeout: float = 20.0) -> dict[str, Any]:
        reply = self.api.rpc(ROUTER, "bridge", "ping", timeout=timeout)
        assert reply["status"] == "success", reply
        return reply

    def info(self) -> dict[str, Any]:
        reply = self.api.rpc(ROUTER, "bridge", "info", timeout=20)
        assert reply["status"] == "success", reply
        result: dict[str, Any] = reply["result"]
        return result

    def start_session(self) -> str:
        session_id = self.api.x_start(ROUTER)
        self.api.wait_x(session_id, "x-started", 10)
        return session_id

    def type(self, session_id: str, data: bytes) -> None:
        self.api.x_send(ROUTER, session_id, data)

    def wait_online_after(self, mark: int, timeout: float = 25.0) -> None:
        """A live ONLINE (not the retained copy a resubscription brings) after ``mark``."""
        self.api.wait_message(STATUS, lambda m: m.payload == b"ONLINE" and not m.retain,
                              timeout, mark)

    def wait_offline_after(self, mark: int, timeout: float = 25.0) -> None:
        self.api.wait_message(STATUS, lambda m: m.payload == b"OFFLINE", timeout, mark)

    def check_healthy(self, *, connects: Optional[int] = None) -> dict[str, Any]:
        """After a fault: subscriptions work, presence is right, no zombie, no leak."""
        self.ping()
        assert retained_status(self.broker.port) == b"ONLINE"
        info = self.info()
        if connects is not None:
            assert info["link"]["connects"] == connects, info["link"]
        assert info["link"]["connected"] is True
        assert self.bridge.proc is not None and self.bridge.proc.poll() is None
        assert zombies(self.bridge.pid) == []
        return info


@pytest.fixture
def scene(broker: Mosquitto) -> Iterator[Scene]:
    with TcpProxy(broker.port) as proxy:
        api = ApiClient(broker.port)
        api.subscribe(STATUS)
        api.subscribe(RPC_RESPONSE)
        api.subscribe(api.out_topic)
        bridge = BridgeProcess(proxy.url, toml=BRIDGE_TOML).start()
        try:
            wait_online(api)
            scene = Scene(broker, proxy, api, bridge)
            scene.ping()  # settled: subscriptions in force before any fault
            yield scene
        finally:
            bridge.close()
            api.close()
    log = bridge.log()
    assert "Traceback" not in log, log[-3000:]
    assert "test-token" not in log


# ---------------------------------------------------------------------- the WAN


def test_connection_reset_mid_terminal_output(scene: Scene) -> None:
    api = scene.api
    session = scene.start_session()
    scene.type(session, counter_script("R", 4000, every=100, pause=0.05))
    wait_session_text(api, session, b"R:800:", 15)  # output is flowing
    slow = scene.slow_rpc(1.0, "slow-done")  # still running when the link is reset
    mark = api.mark()
    scene.proxy.cut()
    scene.wait_offline_after(mark)  # the link really died: the broker fired the Will
    scene.wait_online_after(mark)
    output = wait_session_text(api, session, b"END", 20)
    assert_counted(output, "R", 4000)
    reply = wait_reply(api, slow)
    assert reply["status"] == "success" and reply["result"]["stdout"] == "slow-done\n", reply
    info = scene.check_healthy(connects=2)
    assert len(replies(api, slow)) == 1
    statuses = status_since(api, mark)
    assert statuses[-1] == b"ONLINE" and statuses.count(b"OFFLINE") == 1, statuses
    assert info["terminal"]["sessions"] == 1  # the session lived through it
    scene.type(session, b"echo AF\"\"TER\n")
    wait_session_text(api, session, b"AFTER", 10)


def test_blackhole_longer_than_keepalive(scene: Scene) -> None:
    api = scene.api
    session = scene.start_session()
    slow = scene.slow_rpc(0.5, "answered-into-the-hole")
    scene.type(session, counter_script("B", 300, every=10, pause=0.1))  # ~3 s of output
    wait_session_text(api, session, b"B:20:", 10)
    mark = api.mark()
    scene.proxy.blackholed = True  # packets vanish, FIN and RST included
    scene.wait_offline_after(mark, 20)  # the broker gave up after 1.5 x keepalive
    scene.bridge.wait_log("connection lost", 20)  # and the bridge noticed by itself
    assert status_since(api, mark) == [b"OFFLINE"]
    scene.proxy.blackholed = False  # the bridge recovers with no further help
    scene.wait_online_after(mark, 25)
    output = wait_session_text(api, session, b"END", 20)
    assert_counted(output, "B", 300)
    reply = wait_reply(api, slow)
    assert reply["result"]["stdout"] == "answered-into-the-hole\n", reply
    scene.check_healthy()
    assert len(replies(api, slow)) == 1
    assert status_since(api, mark)[-1] == b"ONLINE"


def test_latency_and_jitter_50_to_300_ms(scene: Scene) -> None:
    api = scene.api
    scene.proxy.latency, scene.proxy.jitter = 0.175, 0.125
    mark = api.mark()
    session = scene.start_session()
    scene.type(session, counter_script("J", 1500, every=500, pause=0.05))
    pending = [scene.slow_rpc(0.2, f"j{i}") for i in range(4)]
    pending += [scene.rpc_send("bridge", "ping") for _ in range(4)]
    output = wait_session_text(api, session, b"END", 30)
    assert_counted(output, "J", 1500)
    for i, req_id in enumerate(pending):
        reply = wait_reply(api, req_id)
        assert reply["status"] == "success", reply
        if i < 4:
            assert reply["result"]["stdout"] == f"j{i}\n"
    for n in range(5):  # keystrokes and their echo, one by one, in order
        scene.type(session, f"echo K{n}-$((40+{n}))\n".encode())
    wait_session_text(api, session, b"K4-44", 20)
    assert re.findall(rb"K(\d)-4\1", session_output(api, session)[0]) == [b"0", b"1", b"2", b"3", b"4"]
    scene.check_healthy(connects=1)  # a slow link is not a dead link
    assert all(len(replies(api, r)) == 1 for r in pending)
    assert b"OFFLINE" not in status_since(api, mark)


def test_throttled_to_64_kbit(scene: Scene) -> None:
    api = scene.api
    scene.proxy.rate_bps = 64_000 / 8
    mark = api.mark()
    session = scene.start_session()
    scene.type(session, counter_script("T", 1500, every=1500, pause=0))  # ~12 KB raw, ~3 s
    wait_session_text(api, session, b"T:200:", 15)
    ping = scene.rpc_send("bridge", "ping")  # behind the terminal flood, still answered
    output = wait_session_text(api, session, b"END", 30)
    assert_counted(output, "T", 1500)
    assert wait_reply(api, ping)["status"] == "success"
    scene.check_healthy(connects=1)
    assert len(replies(api, ping)) == 1
    assert b"OFFLINE" not in status_since(api, mark)
    assert scene.proxy.bytes_up > 12_000


# ---------------------------------------------------------------------- broker maintenance


def test_broker_killed_and_restarted_without_persistence(scene: Scene) -> None:
    api, proxy = scene.api, scene.proxy
    session = scene.start_session()
    # phase 1 is seen in full before the kill; phase 2 is produced during the outage
    scene.type(session, counter_script("P1", 200, every=200, pause=0, end="MID")[:-1]
                + b"; sleep 1.5; " + counter_script("P2", 200, every=50, pause=0.05))
    wait_session_text(api, session, b"MID", 10)
    slow = scene.slow_rpc(1.0, "after-the-crash")
    wait_for(lambda: any("sleep 1.0" in " ".join(cmdline(c[0]))
                         for c in proc_children(scene.bridge.pid)), 10, "the slow RPC to run")
    mark = api.mark()
    proxy.refusing = True  # the bridge comes back only once the API side is resubscribed
    scene.broker.restart(kill=True)
    barrier(api)  # the API client reconnected by itself, subscriptions back
    assert retained_status(scene.broker.port) is None  # a fresh broker knows nothing
    proxy.refusing = False
    scene.wait_online_after(mark)
    output = wait_session_text(api, session, b"END", 20)
    assert_counted(output, "P1", 200)
    assert_counted(output, "P2", 200)
    assert wait_reply(api, slow)["result"]["stdout"] == "after-the-crash\n"
    scene.check_healthy(connects=2)
    assert len(replies(api, slow)) == 1
    # the killed broker could not fire the Will, and the new one never had it
    assert b"OFFLINE" not in status_since(api, mark)


@pytest.fixture
def persistent_broker() -> Iterator[Mosquitto]:
    with Mosquitto(persistence=True, extra_config="autosave_interval 1") as mosq:
        yield mosq


def test_broker_killed_and_restarted_with_persistence(persistent_broker: Mosquitto) -> None:
    broker = persistent_broker
    # the API side keeps a session too, as a persistent subscriber would
    api = ApiClient(broker.port, client_id="api-persistent", clean_session=False)
    proxy = TcpProxy(broker.port)
    bridge = BridgeProcess(proxy.url, toml=BRIDGE_TOML).start()
    scene = Scene(broker, proxy, api, bridge)
    try:
        api.subscribe(STATUS)
        api.subscribe(RPC_RESPONSE)
        api.subscribe(api.out_topic)
        wait_online(api)
        session = scene.start_session()
        scene.type(session, counter_script("Q1", 200, every=200, pause=0, end="MID")[:-1]
                   + b"; sleep 1.5; " + counter_script("Q2", 200, every=50, pause=0.05))
        wait_session_text(api, session, b"MID", 10)
        slow = scene.slow_rpc(1.0, "persisted")
        db = broker.dir / "mosquitto.db"
        saved_after = time.time() + 0.05
        wait_for(lambda: db.exists() and db.stat().st_mtime > saved_after, 10,
                 "the broker to save both sessions")
        mark = api.mark()
        proxy.refusing = True
        broker.restart(kill=True)
        barrier(api)  # the API client reconnected by itself, its session restored
        assert retained_status(broker.port) == b"ONLINE"  # the retained status was saved
        # the API's request, queued by the broker for the router's offline session
        queued = scene.rpc_send("bridge", "ping")
        proxy.refusing = False
        scene.wait_online_after(mark)
        assert wait_reply(api, queued)["status"] == "success"
        output = wait_session_text(api, session, b"END", 20)
        assert_counted(output, "Q1", 200)
        assert_counted(output, "Q2", 200)
        assert wait_reply(api, slow)["result"]["stdout"] == "persisted\n"
        scene.check_healthy(connects=2)
        assert len(replies(api, slow)) == 1 and len(replies(api, queued)) == 1
        # the killed broker could not fire the Will; the restarted one resumed the
        # router's session when it came back, so it never did either
        assert b"OFFLINE" not in status_since(api, mark)
        assert status_since(api, mark)[-1] == b"ONLINE"
    finally:
        bridge.close()
        api.close()
        proxy.close()


# ---------------------------------------------------------------------- killed and stopped processes


def test_sigkill_of_pty_children(scene: Scene) -> None:
    api = scene.api
    mark = api.mark()
    session = scene.start_session()
    shell_pid = scene.api.rpc(ROUTER, "bridge", "sessions")["result"]["sessions"][0]["pid"]
    # a foreground command killed: the shell survives and carries on
    scene.type(session, b"sleep 300; echo SUR\"\"VIVED\n")
    sleeper = wait_for(lambda: next((c[0] for c in proc_children(shell_pid)
                                     if cmdline(c[0])[:2] == ["sleep", "300"]), None),
                       10, "sleep 300 under the shell")
    os.kill(sleeper, signal.SIGKILL)
    wait_session_text(api, session, b"SURVIVED", 10)
    # the shell itself killed: the session ends with reason exit, reaped
    os.kill(shell_pid, signal.SIGKILL)
    ended = api.wait_x(session, "x-error", 10)
    assert ended["reason"] == "exit" and ended["exitCode"] == 128 + 9, ended
    assert ended.get("signal") == 9
    wait_for(lambda: shell_pid not in [c[0] for c in proc_children(scene.bridge.pid)], 10,
             "the shell to be reaped")
    again = scene.start_session()  # the bridge is unharmed
    scene.type(again, b"echo NE\"\"XT\n")
    wait_session_text(api, again, b"NEXT", 10)
    scene.check_healthy(connects=1)
    assert b"OFFLINE" not in status_since(api, mark)


def test_sigkill_of_an_rpc_child(scene: Scene) -> None:
    api = scene.api
    req = scene.rpc_send("file", "exec", {"command": "/bin/sleep", "params": ["300"]})
    child = wait_for(lambda: next((c[0] for c in proc_children(scene.bridge.pid)
                                   if cmdline(c[0]) == ["/bin/sleep", "300"]), None),
                     10, "the RPC child")
    os.kill(child, signal.SIGKILL)
    reply = wait_reply(api, req, 10)
    # rpcd's file exec reports a killed command as its exit code (128 + signal)
    if reply["status"] == "success":
        assert reply["result"]["code"] == 128 + 9, reply
    else:
        assert reply["status"] == "error" and reply["error"], reply
    wait_for(lambda: child not in [c[0] for c in proc_children(scene.bridge.pid)], 10,
             "the RPC child to be reaped")
    scene.check_healthy(connects=1)
    assert len(replies(api, req)) == 1


def test_sigkill_of_an_rpc_shell_leaves_no_orphan(scene: Scene) -> None:
    api = scene.api
    req = scene.rpc_send("file", "exec", {"command": "/bin/sh",
                                          "params": ["-c", "sleep 300; echo never"]})
    shell = wait_for(lambda: next((c[0] for c in proc_children(scene.bridge.pid)
                                   if cmdline(c[0])[:2] == ["/bin/sh", "-c"]), None),
                     10, "the RPC shell")
    sleeper = wait_for(lambda: next((c[0] for c in proc_children(shell)
                                     if cmdline(c[0]) == ["sleep", "300"]), None),
                       10, "its sleep 300")
    try:
        os.kill(shell, signal.SIGKILL)
        reply = wait_reply(api, req, 10)
        assert reply["status"] == "error" or reply["result"]["code"] == 128 + 9, reply
        assert len(replies(api, req)) == 1
        # nobody waits for that group any more: nothing of it may outlive the request
        wait_for(lambda: not Path(f"/proc/{sleeper}").exists(), 3, "the orphaned sleep to die")
    finally:
        try:
            os.killpg(shell, signal.SIGKILL)  # the group keeps the dead leader's id
        except ProcessLookupError:
            pass


def test_sigstop_of_the_bridge_longer_than_keepalive(scene: Scene) -> None:
    api, bridge = scene.api, scene.bridge
    session = scene.start_session()
    scene.type(session, b"echo BE\"\"FORE\n")
    wait_session_text(api, session, b"BEFORE", 10)
    mark = api.mark()
    bridge.signal(signal.SIGSTOP)
    try:
        scene.wait_offline_after(mark, 20)  # the broker's keepalive expired: the Will
        # while it sleeps: the broker keeps these for the router's persistent session
        queued = scene.rpc_send("bridge", "ping")
        scene.type(session, b"echo WH\"\"ILE-STOPPED\n")
    finally:
        bridge.signal(signal.SIGCONT)
    scene.wait_online_after(mark)
    assert wait_reply(api, queued)["status"] == "success"
    wait_session_text(api, session, b"WHILE-STOPPED", 15)
    info = scene.check_healthy(connects=2)
    assert info["terminal"]["sessions"] == 1
    assert len(replies(api, queued)) == 1
    statuses = status_since(api, mark)
    assert statuses.count(b"OFFLINE") == 1 and statuses[-1] == b"ONLINE", statuses
    session_output(api, session)  # gap-free and in order
