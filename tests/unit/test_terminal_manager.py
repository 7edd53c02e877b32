"""SessionManager and PtySession on a real asyncio loop with real PTYs and shells.

The publisher is the one thing faked: a recorder that acknowledges on the loop like
the link does (``on_sent`` later, exactly once), and can hold acknowledgements (a
stalled broker) or refuse messages (a full link outbox).
"""

from __future__ import annotations

import asyncio
import base64
import errno
import json
import os
import platform
import re
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, replace
from typing import Any, Awaitable, Callable, Optional

import pytest

from spotfi_bridge import protocol
from spotfi_bridge.config import TerminalConfig
from spotfi_bridge.freshness import Delivery, Freshness
from spotfi_bridge.protocol import Topics
from spotfi_bridge.publish import OnSent
from spotfi_bridge.terminal import SessionManager
from tests.fuzz.procfs import alive, comm
from tests.helpers.wait import until

ROUTER = "r1"
TOPICS = Topics(ROUTER)
OWN_OUT = TOPICS.x_out
SH = ("/bin/sh",)
CONFIG = TerminalConfig(shell=SH)


@dataclass
class Sent:
    topic: str
    body: dict[str, Any]
    qos: int
    payload: bytes


class FakeLink:
    """Records what would be published; acknowledges on the loop unless told to hold."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.sent: list[Sent] = []
        self.hold = False
        self.ack_delay = 0.0
        self.held: list[OnSent] = []
        self.refuse: Optional[Callable[[], bool]] = None
        self.refused = 0
        self._waiters: list[tuple[Callable[[], Any], asyncio.Future[Any]]] = []

    def __call__(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False,
                 on_sent: Optional[OnSent] = None) -> bool:
        assert not retain
        if self.refuse is not None and self.refuse():
            self.refused += 1
            return False
        self.sent.append(Sent(topic, json.loads(payload), qos, payload))
        if on_sent is not None:
            if self.hold:
                self.held.append(on_sent)
            elif self.ack_delay:
                self.loop.call_later(self.ack_delay, on_sent)
            else:
                self.loop.call_soon(on_sent)
        self._notify()
        return True

    def release(self, count: Optional[int] = None) -> None:
        batch = self.held if count is None else self.held[:count]
        self.held = [] if count is None else self.held[count:]
        for callback in batch:
            self.loop.call_soon(callback)

    def _notify(self) -> None:
        for condition, future in list(self._waiters):
            if not future.done():
                value = condition()
                if value:
                    future.set_result(value)

    async def wait(self, condition: Callable[[], Any], what: str, timeout: float = 10.0) -> Any:
        value = condition()
        if value:
            return value
        future: asyncio.Future[Any] = self.loop.create_future()
        entry = (condition, future)
        self._waiters.append(entry)
        try:
            return await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}; last "
                                 f"messages: {[m.body for m in self.sent[-5:]]}") from None
        finally:
            self._waiters.remove(entry)

    # ------------------------------------------------------------------ reading

    def of(self, session_id: str, kind: Optional[str] = None) -> list[Sent]:
        return [m for m in self.sent if m.body.get("sessionId") == session_id
                and (kind is None or m.body.get("type") == kind)]

    def output(self, session_id: str) -> bytes:
        chunks = self.of(session_id, "x-data")
        assert [m.body["seq"] for m in chunks] == list(range(len(chunks))), "seq gap or reorder"
        return b"".join(base64.b64decode(m.body["data"]) for m in chunks)

    async def wait_output(self, session_id: str, needle: bytes, timeout: float = 10.0) -> bytes:
        output: bytes = await self.wait(lambda: needle in self.output(session_id) and
                                        self.output(session_id),
                                        f"{needle!r} from {session_id}", timeout)
        return output

    async def wait_x(self, session_id: str, kind: str, timeout: float = 10.0) -> dict[str, Any]:
        message = await self.wait(lambda: next(iter(self.of(session_id, kind)), None),
                                  f"{kind} for {session_id}", timeout)
        body: dict[str, Any] = message.body
        return body


def run(test: Callable[[], Awaitable[None]], timeout: float = 60.0) -> None:
    async def main() -> None:
        await asyncio.wait_for(test(), timeout)
    asyncio.run(main())




def proc_state(pid: int) -> Optional[tuple[str, int]]:
    """(state, ppid) of a process, or None when it is gone (reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return fields[0], int(fields[1])


def my_zombies() -> list[int]:
    zombies = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            state = proc_state(int(entry))
            if state is not None and state[0] == "Z" and state[1] == os.getpid():
                zombies.append(int(entry))
    return zombies


def gone(pid: int) -> bool:
    return proc_state(pid) is None


def new_manager(config: TerminalConfig = CONFIG, **kwargs: Any) -> tuple[SessionManager,
                                                                           FakeLink]:
    link = FakeLink()
    return SessionManager(config, link, TOPICS, **kwargs), link


async def start(manager: SessionManager, link: FakeLink, session_id: str,
                topic: Optional[str] = "spotfi/api/i1/x/out", **extra: Any) -> dict[str, Any]:
    manager.handle(protocol.api_x_start(session_id, topic, **extra))
    return await link.wait_x(session_id, "x-started")


def send(manager: SessionManager, session_id: str, data: bytes) -> None:
    manager.handle(protocol.api_x_data(session_id, data))


def session_info(manager: SessionManager, session_id: str) -> dict[str, Any]:
    return next(s for s in manager.sessions() if s["id"] == session_id)


# --------------------------------------------------------------------------- basics


def test_echo_round_trip_in_order_with_started_first() -> None:
    async def body() -> None:
        manager, link = new_manager()
        started = await start(manager, link, "s1")
        assert started["status"] == "ready"
        assert {"resize", "seq", "exit-code"} <= set(started["capabilities"])
        send(manager, "s1", b"echo mark-$((40+2))\n")
        await link.wait_output("s1", b"mark-42")
        messages = link.of("s1")
        assert messages[0].body["type"] == "x-started"
        assert all(m.topic == "spotfi/api/i1/x/out" and m.qos == 2 for m in messages)
        info = session_info(manager, "s1")
        assert info["bytesIn"] == len(b"echo mark-$((40+2))\n") and info["bytesOut"] > 0
        assert info["responseTopic"] == "spotfi/api/i1/x/out" and len(manager) == 1
        await manager.shutdown()
    run(body)


def test_lone_keystroke_echo_is_sent_at_once_and_bulk_is_coalesced() -> None:
    async def body() -> None:
        config = replace(CONFIG, batch_delay_ms=60_000.0, batch_bytes=4096)
        manager, link = new_manager(config)
        await start(manager, link, "s1")
        await link.wait_output("s1", b"# ")  # the prompt
        before = len(link.of("s1", "x-data"))
        send(manager, "s1", b"x")
        # with a one-minute batching window, only an immediate send arrives in time
        await link.wait(lambda: len(link.of("s1", "x-data")) > before, "echo of x", 20)
        await manager.shutdown()

        manager, link = new_manager(replace(CONFIG, shell=("seq", "1", "200000")))
        link.ack_delay = 0.001  # a PUBACK takes a round trip
        await start(manager, link, "bulk")
        await link.wait_x("bulk", "x-error")
        chunks = [base64.b64decode(m.body["data"]) for m in link.of("bulk", "x-data")]
        total = sum(map(len, chunks))
        assert max(map(len, chunks)) <= CONFIG.batch_bytes
        assert len(chunks) < total / 4096, "bulk output was not coalesced beyond one read"
        await manager.shutdown()
    run(body)


def test_x_data_frames_are_the_protocol_bytes() -> None:
    async def body() -> None:
        manager, link = new_manager(replace(CONFIG, shell=("printf", "h\\303\\251\\001")))
        await start(manager, link, 'id "quoted" é')
        await link.wait_x('id "quoted" é', "x-error")
        first = link.of('id "quoted" é', "x-data")[0]
        assert first.payload == protocol.x_data('id "quoted" é', "hé\x01".encode(), 0)
    run(body)


def test_window_size_from_start_then_resize_reaches_the_shell() -> None:
    async def body() -> None:
        manager, link = new_manager()
        await start(manager, link, "w", cols=132, rows=43)
        send(manager, "w", b"trap 'echo got-$((1))-winch' WINCH; stty size\n")
        await link.wait_output("w", b"43 132\r\n# ")  # stty done: the shell is in front
        manager.handle(protocol.api_x_resize("w", 120, 40))
        send(manager, "w", b"stty size\n")
        output = await link.wait_output("w", b"40 120")
        output = await link.wait_output("w", b"got-1-winch")
        assert session_info(manager, "w")["cols"] == 120
        assert b"24 80" not in output
        await manager.shutdown()
    run(body)


def test_default_window_size_is_80x24() -> None:
    async def body() -> None:
        manager, link = new_manager(replace(CONFIG, shell=("stty", "size")))
        await start(manager, link, "d")
        await link.wait_x("d", "x-error")
        assert link.output("d").strip() == b"24 80"
    run(body)


def test_absurd_sizes_are_refused_with_an_error() -> None:
    async def body() -> None:
        manager, link = new_manager()
        manager.handle(protocol.api_x_start("big", "spotfi/api/i1/x/out", cols=100000, rows=5))
        error = await link.wait_x("big", "x-error")
        assert "'cols'" in error["error"] and len(manager) == 0
        assert link.of("big")[0].topic == "spotfi/api/i1/x/out"
        await start(manager, link, "ok")
        manager.handle(protocol.encode({"type": "x-resize", "sessionId": "ok", "cols": 0,
                                        "rows": 24}))
        error = await link.wait_x("ok", "x-error")
        assert link.of("ok", "x-error")[0].topic == OWN_OUT  # not the session's topic
        assert "x-resize ignored" in error["error"]
        assert manager.counters()["bad_resize"] == 1
        send(manager, "ok", b"echo still-$((1+1))\n")
        await link.wait_output("ok", b"still-2")
        await manager.shutdown()
    run(body)


# --------------------------------------------------------------------------- exit


def test_exit_code_after_all_output() -> None:
    async def body() -> None:
        manager, link = new_manager()
        await start(manager, link, "e")
        pid = session_info(manager, "e")["pid"]
        send(manager, "e", b"echo bye-$((2*3)); exit 7\n")
        error = await link.wait_x("e", "x-error")
        assert error["reason"] == "exit" and error["exitCode"] == 7
        assert "7" in error["error"]
        assert b"bye-6" in link.output("e")
        assert link.of("e")[-1].body["type"] == "x-error"
        assert len(manager) == 0 and manager.counters()["exited"] == 1
        await until(lambda: gone(pid), "shell reaped")
        assert not my_zombies()
    run(body)


def test_exit_by_signal_is_reported() -> None:
    async def body() -> None:
        manager, link = new_manager()
        await start(manager, link, "k")
        send(manager, "k", b"kill -9 $$\n")
        error = await link.wait_x("k", "x-error")
        assert error["exitCode"] == 128 + 9 and error["signal"] == 9
        assert "SIGKILL" in error["error"]
    run(body)


def test_output_written_just_before_exit_is_not_lost() -> None:
    async def body() -> None:
        manager, link = new_manager(replace(CONFIG, shell=("seq", "1", "30000")))
        await start(manager, link, "tail")
        await link.wait_x("tail", "x-error")
        expected = subprocess.run(["seq", "1", "30000"], capture_output=True,
                                  check=True).stdout
        assert link.output("tail").replace(b"\r\n", b"\n") == expected
    run(body)


# --------------------------------------------------------------------------- several


@pytest.mark.parametrize("count", [2, 8])
def test_concurrent_sessions_do_not_cross_talk(count: int) -> None:
    async def body() -> None:
        manager, link = new_manager()
        ids = [f"c{i}" for i in range(count)]
        for i, sid in enumerate(ids):
            await start(manager, link, sid, f"spotfi/api/inst{i}/x/out")
        assert len(manager) == count
        for i, sid in enumerate(ids):
            send(manager, sid, f"echo out-{i}-$((1000+{i}))\n".encode())
        for i, sid in enumerate(ids):
            await link.wait_output(sid, f"out-{i}-{1000 + i}".encode())
        for i, sid in enumerate(ids):
            topic = f"spotfi/api/inst{i}/x/out"
            on_topic = [m for m in link.sent if m.topic == topic]
            assert {m.body["sessionId"] for m in on_topic} == {sid}
            text = link.output(sid)
            for j in range(count):
                if j != i:
                    assert f"out-{j}-{1000 + j}".encode() not in text
        await manager.shutdown()
        assert all(m.body["reason"] == "shutdown" for m in link.sent
                   if m.body["type"] == "x-error")
    run(body)


def test_limit_refuses_new_sessions_and_keeps_existing_ones() -> None:
    async def body() -> None:
        manager, link = new_manager(replace(CONFIG, max_sessions=2))
        await start(manager, link, "a")
        await start(manager, link, "b")
        manager.handle(protocol.api_x_start("c", "spotfi/api/i2/x/out"))
        error = await link.wait_x("c", "x-error")
        assert error["error"] == "too many sessions (2)"
        assert link.of("c")[0].topic == "spotfi/api/i2/x/out"
        assert not link.of("c", "x-started") and len(manager) == 2
        assert manager.counters()["refused_limit"] == 1
        for sid in ("a", "b"):
            send(manager, sid, b"echo alive-$((5+5))\n")
            await link.wait_output(sid, b"alive-10")
        assert not link.of("a", "x-error") and not link.of("b", "x-error")
        # SIGHUP reload: a higher limit applies to the next x-start
        manager.reconfigure(replace(CONFIG, max_sessions=3))
        await start(manager, link, "c2")
        assert len(manager) == 3
        await manager.shutdown()
    run(body)


def test_duplicate_start_resends_started_and_spawns_nothing() -> None:
    async def body() -> None:
        manager, link = new_manager()
        await start(manager, link, "dup")
        pid = session_info(manager, "dup")["pid"]
        manager.handle(protocol.api_x_start("dup", "spotfi/api/i1/x/out"))
        await link.wait(lambda: len(link.of("dup", "x-started")) == 2, "second x-started")
        assert link.of("dup", "x-started")[1].body["capabilities"]
        assert len(manager) == 1 and session_info(manager, "dup")["pid"] == pid
        assert manager.counters()["duplicate_start"] == 1
        await manager.shutdown()
        # a redelivered x-start of a session that already ended does not respawn it
        manager.handle(protocol.api_x_start("dup", "spotfi/api/i1/x/out"))
        await link.wait(lambda: link.of("dup")[-1].body.get("reason") == "ended", "refusal")
        assert len(manager) == 0
    run(body)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("topic", [
    "#", "spotfi/api/+/x/out", "spotfi/api/#", "spotfi/router/other/x/out",
    "spotfi/router/r1/status", "$SYS/broker/x/out", "spotfi/api//x/out",
    "spotfi/api/a/b/x/out", "", "spotfi/api/i1/x/out/", "spotfi/api/i1/x/in",
])
def test_response_topic_injection_is_refused(topic: str) -> None:
    async def body() -> None:
        manager, link = new_manager()
        manager.handle(protocol.api_x_start("bad", topic))
        error = await link.wait_x("bad", "x-error")
        assert error["reason"] == "bad-topic" and "responseTopic" in error["error"]
        assert [m.topic for m in link.sent] == [OWN_OUT]
        assert len(manager) == 0 and manager.counters()["bad_topic"] == 1
        assert manager.counters()["started"] == 0
    run(body)


def test_absent_response_topic_means_the_routers_own_x_out() -> None:
    async def body() -> None:
        manager, link = new_manager()
        await start(manager, link, "own", None)
        assert link.of("own")[0].topic == OWN_OUT
        send(manager, "own", b"echo here-$((3+3))\n")
        await link.wait_output("own", b"here-6")
        assert {m.topic for m in link.of("own")} == {OWN_OUT}
        await manager.shutdown()
    run(body)


def test_unknown_session_and_bad_data() -> None:
    async def body() -> None:
        manager, link = new_manager()
        send(manager, "ghost", b"ls\n")
        error = await link.wait_x("ghost", "x-error")
        assert error["error"] == "unknown session" and link.of("ghost")[0].topic == OWN_OUT
        manager.handle(protocol.api_x_resize("ghost", 80, 24))
        manager.handle(protocol.api_x_stop("ghost"))  # quietly ignored
        counters = manager.counters()
        assert counters["unknown_session"] == 2 and counters["stop_unknown"] == 1

        await start(manager, link, "s")
        for bad in ({"data": "%%%not base64"}, {"data": 12}, {"data": None}, {}):
            manager.handle(protocol.encode({"type": "x-data", "sessionId": "s", **bad}))
        assert manager.counters()["bad_data"] == 4
        send(manager, "s", b"echo fine-$((4+4))\n")
        await link.wait_output("s", b"fine-8")
        assert not link.of("s", "x-error") and len(manager) == 1
        for junk in (b"", b"\xff\xfe", b"[]", b'{"type":"x-data"}', b"{" * 100000,
                     b'{"type":"nope","sessionId":"s"}'):
            manager.handle(junk)
        assert manager.counters()["bad_message"] == 6
        assert manager.counters()["internal_error"] == 0
        # nothing of that went to the live session's topic (the API would close it)
        assert all(m.topic == OWN_OUT for m in link.of("s", "x-error"))
        await manager.shutdown()
    run(body)


# --------------------------------------------------------------------------- stop, idle


def test_stop_hangs_up_reaps_and_closes_fds() -> None:
    async def body() -> None:
        manager, link = new_manager()
        await start(manager, link, "st")
        pid = session_info(manager, "st")["pid"]
        manager.handle(protocol.api_x_stop("st"))
        assert len(manager) == 0
        await until(lambda: gone(pid), "shell reaped")
        await until(lambda: manager.counters()["closing"] == 0, "session closed")
        assert manager.counters()["stopped"] == 1 and not my_zombies()
        send(manager, "st", b"x")
        assert (await link.wait_x("st", "x-error"))["error"] == "unknown session"
    run(body)


def test_stop_kills_a_shell_that_ignores_sighup() -> None:
    async def body() -> None:
        config = replace(CONFIG, shell=("/bin/sh", "-c", "trap '' HUP; echo ready; "
                                        "while :; do sleep 1; done"))
        manager, link = new_manager(config, kill_grace=0.2)
        await start(manager, link, "stubborn")
        await link.wait_output("stubborn", b"ready")
        pid = session_info(manager, "stubborn")["pid"]
        manager.handle(protocol.api_x_stop("stubborn"))
        await until(lambda: gone(pid), "SIGKILLed shell reaped")
        await until(lambda: manager.counters()["closing"] == 0, "session closed")
        assert not my_zombies()
    run(body)


def test_without_pidfd_a_job_that_ignores_sighup_still_ends(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel older than 5.3 (no pidfd): polls instead of pidfds, the same outcome."""
    def no_pidfd(pid: int, flags: int = 0) -> int:
        raise OSError(errno.ENOSYS, "pidfd_open")
    monkeypatch.setattr(os, "pidfd_open", no_pidfd)

    async def body() -> None:
        manager, link = new_manager(replace(CONFIG, shell=("/bin/sh", "-i")), kill_grace=0.3)
        await start(manager, link, "old-kernel")
        send(manager, "old-kernel", b"sh -c 'trap \"\" HUP; exec sleep 1001' & "
                                    b"echo \"job=$!\"\n")
        found = await until(lambda: re.search(rb"job=(\d+)", link.output("old-kernel")),
                            "the job's pid")
        job = int(found.group(1))
        shell = session_info(manager, "old-kernel")["pid"]
        try:
            await until(lambda: comm(job) == "sleep" and os.getpgid(job) == job, "job running")
            manager.handle(protocol.api_x_stop("old-kernel"))
            await until(lambda: not alive(job) and gone(shell), "job and shell gone")
            await until(lambda: manager.counters()["closing"] == 0, "session closed")
            assert not my_zombies()
        finally:
            if alive(job) and os.getsid(job) == shell:
                os.kill(job, signal.SIGKILL)
    run(body)


def test_idle_timeout_counts_keystrokes_not_output() -> None:
    """An orphaned session that keeps printing ends; one somebody types into stays."""
    async def body() -> None:
        manager, link = new_manager(replace(CONFIG, idle_timeout=1.0))
        for session_id in ("quiet", "printer", "typist"):
            await start(manager, link, session_id)
        send(manager, "printer", b"while :; do echo tick; sleep 0.05; done\n")
        error = await link.wait_x("quiet", "x-error", timeout=10)
        assert error["reason"] == "idle" and "idle" in error["error"]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 15
        while not link.of("printer", "x-error") and loop.time() < deadline:
            send(manager, "typist", b"\n")  # somebody at the keyboard, every 0.2 s
            await asyncio.sleep(0.2)
        error = await link.wait_x("printer", "x-error", timeout=1)
        assert error["reason"] == "idle" and error["idleTimeout"] == 1.0
        assert link.output("printer").count(b"tick") > 10  # it printed all along
        assert [s["id"] for s in manager.sessions()] == ["typist"]
        assert not link.of("typist", "x-error")
        assert manager.counters()["idle_closed"] == 2
        await manager.shutdown()
    run(body)


# --------------------------------------------------------------------------- bulk, backpressure


def test_20_mb_of_output_complete_in_order_gap_free() -> None:
    async def body() -> None:
        argv = ("seq", "1", "2500000")
        manager, link = new_manager(replace(CONFIG, shell=argv))
        await start(manager, link, "bulk")
        error = await link.wait_x("bulk", "x-error", timeout=40)
        assert error["exitCode"] == 0
        expected = subprocess.run(argv, capture_output=True, check=True).stdout
        output = link.output("bulk")  # asserts gap-free seq from 0
        assert len(output) > 20_000_000
        assert output.replace(b"\r\n", b"\n") == expected
        assert link.of("bulk")[-1].body["type"] == "x-error"
    run(body)


def _write_syscall() -> Optional[int]:
    return {"x86_64": 1, "aarch64": 64, "armv7l": 4, "mips": 4004}.get(platform.machine())


def _blocked_in_write(pid: int) -> bool:
    number = _write_syscall()
    try:
        with open(f"/proc/{pid}/syscall") as handle:
            fields = handle.read().split()
    except OSError:
        return False
    state = proc_state(pid)
    return bool(fields) and state is not None and state[0] == "S" and (
        number is None or fields[0] == str(number))


def test_stalled_link_blocks_the_writer_without_loss() -> None:
    async def body() -> None:
        argv = ("seq", "1", "300000")
        outbox = 64 * 1024
        manager, link = new_manager(replace(CONFIG, shell=argv, outbox_bytes=outbox,
                                            batch_bytes=8192))
        link.hold = True
        await start(manager, link, "slow")
        pid = session_info(manager, "slow")["pid"]
        await until(lambda: session_info(manager, "slow")["paused"], "reading paused")
        await until(lambda: _blocked_in_write(pid), "seq blocked in write(2) on the PTY")
        info = session_info(manager, "slow")
        assert info["buffered"] <= outbox and info["maxBuffered"] <= outbox
        assert info["bytesOut"] <= outbox
        # the broker comes back: acknowledge slowly, a few messages at a time
        link.hold = False
        while not link.of("slow", "x-error"):
            link.release(3)
            await asyncio.sleep(0)
            await asyncio.sleep(0)
        expected = subprocess.run(argv, capture_output=True, check=True).stdout
        assert link.output("slow").replace(b"\r\n", b"\n") == expected
        assert manager.counters()["exited"] == 1
    run(body)


def test_refusing_link_loses_nothing_and_keeps_order() -> None:
    async def body() -> None:
        argv = ("seq", "1", "100000")
        manager, link = new_manager(replace(CONFIG, shell=argv, batch_bytes=4096))
        calls = [0]

        def refuse() -> bool:
            calls[0] += 1
            return calls[0] % 3 == 0  # every third publish is refused

        link.refuse = refuse
        await start(manager, link, "ref")
        await link.wait_x("ref", "x-error", timeout=30)
        expected = subprocess.run(argv, capture_output=True, check=True).stdout
        assert link.output("ref").replace(b"\r\n", b"\n") == expected
        assert link.refused > 0 and manager.counters()["publish_refused"] == link.refused
    run(body)


def test_qos0_and_acknowledgements_inside_publish() -> None:
    async def body() -> None:
        argv = ("seq", "1", "50000")
        link = FakeLink()
        recorder = link

        def publish(topic: str, payload: bytes, qos: int = 1, retain: bool = False,
                    on_sent: Optional[OnSent] = None) -> bool:
            # paho may report a QoS 0 write before publish() returns: on_sent re-enters
            accepted = recorder(topic, payload, qos, retain)
            if on_sent is not None:
                on_sent()
            return accepted

        config = replace(CONFIG, shell=argv, qos=0, batch_bytes=2048)
        manager = SessionManager(config, publish, TOPICS)
        await start(manager, link, "q0")
        await link.wait_x("q0", "x-error")
        assert {m.qos for m in link.of("q0")} == {0}
        expected = subprocess.run(argv, capture_output=True, check=True).stdout
        assert link.output("q0").replace(b"\r\n", b"\n") == expected
    run(body)


def test_large_input_is_written_in_order_when_the_pty_is_full(tmp_path: Any) -> None:
    async def body() -> None:
        target = tmp_path / "got"
        size = 300_000
        script = f"stty raw -echo; head -c {size} > {target}; echo done-$((1+1))"
        manager, link = new_manager(replace(CONFIG, shell=("/bin/sh", "-c", script)))
        await start(manager, link, "in")
        data = bytes((i * 7) % 251 for i in range(size))
        for offset in range(0, size, 30_000):
            send(manager, "in", data[offset:offset + 30_000])
        await link.wait_output("in", b"done-2")
        assert target.read_bytes() == data
        await manager.shutdown()
    run(body)


# --------------------------------------------------------------------------- the child


def test_child_gets_a_clean_environment_and_no_daemon_fds(monkeypatch: Any) -> None:
    monkeypatch.setenv("SPOTFI_TOKEN", "s3cret-token-value")
    leaky = socket.socket()  # stands in for the MQTT socket, deliberately inheritable
    leaky.set_inheritable(True)

    async def body() -> None:
        manager, link = new_manager()
        await start(manager, link, "env")
        pid = session_info(manager, "env")["pid"]
        targets = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        assert targets and all(t.startswith(("/dev/pts/", "/dev/tty")) for t in targets), \
            targets
        send(manager, "env", b"env; echo pwd=$(pwd); echo end-$((9*9))\n")
        output = await link.wait_output("env", b"end-81")
        assert b"s3cret-token-value" not in output and b"SPOTFI" not in output
        assert b"TERM=xterm-256color" in output
        home = os.path.expanduser("~")
        assert f"HOME={home}".encode() in output and f"pwd={home}".encode() in output
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        pgrp, session = int(fields[2]), int(fields[3])
        assert pgrp == pid and session == pid  # own session and process group
        await manager.shutdown()

    try:
        run(body)
    finally:
        leaky.close()


def test_child_starts_with_default_signal_dispositions() -> None:
    # Python ignores SIGPIPE; a shell must not inherit that (``yes | head`` would break).
    assert signal.getsignal(signal.SIGPIPE) == signal.SIG_IGN

    async def body() -> None:
        manager, link = new_manager(replace(CONFIG, shell=("grep", "SigIgn",
                                                           "/proc/self/status")))
        await start(manager, link, "sig")
        await link.wait_x("sig", "x-error")
        mask = int(link.output("sig").split()[-1], 16)
        assert not mask & (1 << (signal.SIGPIPE - 1))
    run(body)


def test_spawn_failure_is_reported() -> None:
    async def body() -> None:
        manager, link = new_manager(replace(CONFIG, shell=("/nonexistent/shell",)))
        manager.handle(protocol.api_x_start("nf", "spotfi/api/i1/x/out"))
        error = await link.wait_x("nf", "x-error")
        assert error["reason"] == "spawn" and "cannot start shell" in error["error"]
        assert len(manager) == 0 and manager.counters()["spawn_failed"] == 1
    run(body)


# --------------------------------------------------------------------------- shutdown, soak


def test_shutdown_tells_every_session_and_reaps_them() -> None:
    async def body() -> None:
        config = replace(CONFIG, shell=("/bin/sh", "-c", "trap '' HUP; echo up; "
                                        "while :; do sleep 1; done"))
        manager, link = new_manager(config, kill_grace=0.3)
        for sid in ("x", "y", "z"):
            await start(manager, link, sid, f"spotfi/api/{sid}/x/out")
            await link.wait_output(sid, b"up")
        pids = [s["pid"] for s in manager.sessions()]
        await manager.shutdown()
        for sid in ("x", "y", "z"):
            error = link.of(sid)[-1].body
            assert error["type"] == "x-error" and error["error"] == "bridge shutting down"
        assert len(manager) == 0 and manager.counters()["closing"] == 0
        await until(lambda: all(gone(pid) for pid in pids), "every shell reaped")
        assert not my_zombies()
    run(body)


def test_shutdown_is_bounded_even_when_cut_short() -> None:
    async def body() -> None:
        config = replace(CONFIG, shell=("/bin/sh", "-c", "trap '' HUP; echo up; "
                                        "while :; do sleep 1; done"))
        manager, link = new_manager(config, kill_grace=60.0)  # x-stop's grace is not used
        await start(manager, link, "a")
        await link.wait_output("a", b"up")
        pid_a = session_info(manager, "a")["pid"]
        await manager.shutdown(grace=0.1)
        await until(lambda: gone(pid_a), "shell SIGKILLed at shutdown")

        manager, link = new_manager(config, kill_grace=60.0)
        await start(manager, link, "b")
        await link.wait_output("b", b"up")
        pid_b = session_info(manager, "b")["pid"]
        with pytest.raises(asyncio.TimeoutError):  # the daemon's own budget runs out first
            await asyncio.wait_for(manager.shutdown(), 0.05)
        assert link.of("b")[-1].body["error"] == "bridge shutting down"
        await until(lambda: gone(pid_b), "shell SIGKILLed when shutdown was cancelled")
        await until(lambda: manager.counters()["closing"] == 0, "session closed")
    run(body)


def test_500_start_stop_cycles_leave_nothing_behind() -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        manager, link = new_manager(replace(CONFIG, max_sessions=10))
        fds_before = sorted(os.listdir("/proc/self/fd"))
        selector_before = set(loop._selector.get_map())  # type: ignore[attr-defined]
        for batch in range(50):
            ids = [f"cycle-{batch}-{i}" for i in range(10)]
            for sid in ids:
                manager.handle(protocol.api_x_start(sid, "spotfi/api/i1/x/out"))
            assert len(manager) == 10
            for sid in ids:
                manager.handle(protocol.api_x_stop(sid))
            await until(lambda: manager.counters()["closing"] < 20, "sessions closing")
        await until(lambda: manager.counters()["closing"] == 0, "all sessions closed")
        assert len([m for m in link.sent if m.body["type"] == "x-started"]) == 500
        counters = manager.counters()
        assert counters["started"] == 500 and counters["stopped"] == 500
        assert not my_zombies()
        assert sorted(os.listdir("/proc/self/fd")) == fds_before
        assert set(loop._selector.get_map()) == selector_before  # type: ignore[attr-defined]
        timers = [h for h in loop._scheduled  # type: ignore[attr-defined]
                  if not h.cancelled() and "spotfi_bridge" in repr(h)]
        assert timers == [], "an idle manager must leave no timer running"
    run(body, timeout=90)


def test_a_failing_start_leaves_no_shell_behind() -> None:
    """If anything after the spawn raises (here the publish of x-started), the shell dies."""

    def exploding_publish(topic: str, payload: bytes, qos: int = 1, retain: bool = False,
                          on_sent: Optional[OnSent] = None) -> bool:
        raise RuntimeError("link exploded")

    def my_sleepers() -> list[int]:
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as handle:
                    argv = handle.read().split(b"\0")
                with open(f"/proc/{entry}/stat") as handle:
                    ppid = int(handle.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            if argv[:2] == [b"sleep", b"4321"] and ppid == os.getpid():
                found.append(int(entry))
        return found

    async def body() -> None:
        config = replace(CONFIG, shell=("/bin/sh", "-c", "exec sleep 4321"))
        manager = SessionManager(config, exploding_publish, Topics("test-router"))
        manager.handle(protocol.api_x_start("boom", "spotfi/api/i1/x/out"))
        assert len(manager) == 0
        assert manager.counters()["internal_error"] == 1
        await until(lambda: not my_sleepers(), "no shell left running")
        assert not my_zombies()
    run(body)


def test_output_without_subscriber_ends_only_that_topics_sessions() -> None:
    """The link's MQTT 5 reports: a subscriber seen again resets the clock; output
    nobody reads for no_subscriber_timeout ends the sessions on that topic."""
    async def body() -> None:
        loop = asyncio.get_running_loop()
        manager, link = new_manager(replace(CONFIG, no_subscriber_timeout=0.2))
        await start(manager, link, "orphan", "spotfi/api/gone/x/out")
        await start(manager, link, "read", "spotfi/api/i1/x/out")
        manager.subscribers("spotfi/api/gone/x/out", False)
        manager.subscribers("spotfi/api/gone/x/out", True)  # back: the clock starts over
        manager.subscribers("spotfi/api/gone/x/out", False)
        deadline = loop.time() + 0.2
        await until(lambda: loop.time() >= deadline, "the timeout to pass")
        assert not link.of("orphan", "x-error")  # 0.2 s since the reset, not yet checked
        manager.subscribers("spotfi/api/i1/x/out", True)
        manager.subscribers("spotfi/api/gone/x/out", False)
        error = await link.wait_x("orphan", "x-error")
        assert error["reason"] == "no-subscriber", error
        assert not link.of("read", "x-error") and len(manager) == 1
        assert manager.counters()["no_subscriber_closed"] == 1
        await manager.shutdown()
    run(body)


# --------------------------------------------------------------------------- stale x-start


def test_a_stale_x_start_opens_nothing_a_fresh_one_opens() -> None:
    async def body() -> None:
        freshness = Freshness(5.0)
        manager, link = new_manager(freshness=freshness)
        now_ms = int(time.time() * 1000)
        # epoch ms (the API's x-start may carry either): the clock agrees, so it is trusted
        await start(manager, link, "fresh", timestamp=now_ms)
        assert freshness.trusted()
        manager.handle(protocol.api_x_start("stale", "spotfi/api/i1/x/out",
                                            timestamp="2025-12-19T10:00:00.000Z"))
        error = await link.wait_x("stale", "x-error")
        assert error["reason"] == "expired" and error["age"] > 3600 and error["maxAge"] == 30
        assert manager.counters()["expired"] == 1 and len(manager) == 1
        assert [s["id"] for s in manager.sessions()] == ["fresh"]
        # queued by the broker during an outage of unknown length, untrusted: refused too
        manager.handle(protocol.api_x_start("queued", "spotfi/api/i1/x/out"),
                       Delivery(queued=True, outage=None))
        assert (await link.wait_x("queued", "x-error"))["reason"] == "expired"
        await manager.shutdown()
    run(body)
