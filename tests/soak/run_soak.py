"""Soak: the real daemon under continuous random load and faults, for minutes or hours.

Run by ``make soak`` (``SOAK_MINUTES``, default 60), never by ``make test`` (pytest
does not collect this file). One broker, a loopback proxy in front of it for the
bridge, the API side on the broker directly, and:

- terminal workers: sessions opened, driven through rounds (counted output,
  bursts, echoes, resizes), ended by ``x-stop`` or ``exit N``; every round's
  output is checked complete and in order, every session's ``seq`` gap-free;
- RPC workers: pings, ``file exec`` of commands with known output, sleeps,
  timeouts, reads, unknown objects; every reply checked, counted once;
- a fault thread: connection resets, black holes longer than the keepalive,
  latency with jitter, a 64 kbit/s throttle (none of which may lose anything),
  and broker restarts, killed or graceful (taken while the workers hold still,
  as the broker itself loses what it holds when killed);
- a sampler: RSS, open fds, threads, zombie children of the bridge.

Idle CPU is measured over the same window before the load and after it. The
summary table is printed and written as JSON to ``tests/soak/results/latest.json``.
Exit status 0 when nothing failed, no zombie and no fd or thread leak is left and
idle CPU did not grow.

    SOAK_MINUTES=2 python -m tests.soak.run_soak [--seed N] [--json PATH]
"""

from __future__ import annotations

import argparse
import base64
import collections
import json
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from spotfi_bridge import mqtt_compat, protocol
from tests.helpers.bridge import BridgeProcess
from tests.helpers.broker import Mosquitto
from tests.helpers.tcpproxy import TcpProxy

ROUTER = "soak-router"
TOKEN = "soak-token-9f3b2c"
TOPICS = protocol.Topics(ROUTER)
KEEPALIVE = 5
BRIDGE_TOML = f"""
[metrics]
interval = 10
[mqtt]
keepalive = {KEEPALIVE}
backoff_min = 0.1
backoff_max = 2
connect_timeout = 3
[rpc]
backend = "local"
max_concurrent = 4
# this API side waits OP_TIMEOUT (90 s) for every answer: the bridge's windows say so
max_age = 90
[terminal]
shell = ["/bin/sh"]
max_sessions = 8
start_max_age = 90
"""
OP_TIMEOUT = 90.0  # a round may wait out a black hole and a reconnect
RESULTS = Path(__file__).resolve().parent / "results"
CLK_TCK = os.sysconf("SC_CLK_TCK")


class SoakError(Exception):
    """One failed check; ``kind`` is the key it is counted under."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


# ---------------------------------------------------------------------- bookkeeping


class Stats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ops: collections.Counter[str] = collections.Counter()
        self.errors: collections.Counter[str] = collections.Counter()
        self.faults: collections.Counter[str] = collections.Counter()
        self.samples: list[str] = []  # the first error messages, for the report
        self.recoveries: list[float] = []

    def op(self, kind: str, n: int = 1) -> None:
        with self.lock:
            self.ops[kind] += n

    def error(self, kind: str, detail: str) -> None:
        with self.lock:
            self.errors[kind] += 1
            if len(self.samples) < 40:
                self.samples.append(f"{time.strftime('%H:%M:%S')} {kind}: {detail[:300]}")
        print(f"  ! {kind}: {detail[:200]}", flush=True)

    def fault(self, kind: str) -> None:
        with self.lock:
            self.faults[kind] += 1


class Gate:
    """Workers pass one at a time per operation; a broker restart closes the gate and
    waits for the operations in progress (a reader-writer lock, writer first)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._active = 0
        self._closed = False

    def enter(self, stop: threading.Event) -> bool:
        with self._cond:
            while self._closed and not stop.is_set():
                self._cond.wait(0.5)
            if stop.is_set():
                return False
            self._active += 1
            return True

    def leave(self) -> None:
        with self._cond:
            self._active -= 1
            self._cond.notify_all()

    def close(self, timeout: float) -> bool:
        with self._cond:
            self._closed = True
            deadline = time.monotonic() + timeout
            while self._active:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def open(self) -> None:
        with self._cond:
            self._closed = False
            self._cond.notify_all()


# ---------------------------------------------------------------------- the API side


@dataclass
class SessionRecord:
    """What one terminal session sent back, reassembled by ``seq`` as it arrives."""

    id: str
    output: bytearray = field(default_factory=bytearray)
    next_seq: int = 0
    held: dict[int, bytes] = field(default_factory=dict)  # arrived ahead of a missing seq
    crcs: dict[int, int] = field(default_factory=dict)
    duplicates: int = 0
    disorder: int = 0
    bad_duplicates: int = 0
    others: list[dict[str, Any]] = field(default_factory=list)  # x-started, x-error

    def add(self, body: dict[str, Any]) -> None:
        if body.get("type") != "x-data":
            self.others.append(body)
            return
        seq = body.get("seq")
        data = base64.b64decode(body.get("data", ""))
        if not isinstance(seq, int):
            self.disorder += 1
            return
        crc = zlib.crc32(data)
        if seq in self.crcs:
            self.duplicates += 1
            if self.crcs[seq] != crc:
                self.bad_duplicates += 1
            return
        self.crcs[seq] = crc
        if seq != self.next_seq:
            self.disorder += 1
            self.held[seq] = data
            return
        self.output += data
        self.next_seq += 1
        while self.next_seq in self.held:
            self.output += self.held.pop(self.next_seq)
            self.next_seq += 1


class SoakApi:
    """The API side: one paho client, replies and output routed by id as they arrive, so
    memory stays bounded however long the soak runs."""

    def __init__(self, port: int, stats: Stats) -> None:
        self.stats = stats
        self.instance = f"soak-{uuid.uuid4().hex[:6]}"
        self.out_topic = f"spotfi/api/{self.instance}/x/out"
        self.probe_topic = f"spotfi/api/{self.instance}/probe"
        self.cond = threading.Condition()
        self.connected = threading.Event()
        self.status: list[tuple[float, bytes, bool]] = []
        self.last_metrics = 0.0
        self.max_metrics_gap = 0.0
        self._waiting: dict[str, list[bytes]] = {}
        self._done: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        self.sessions: dict[str, SessionRecord] = {}
        self.closed: collections.OrderedDict[str, SessionRecord] = collections.OrderedDict()
        self.router_errors: collections.OrderedDict[str, dict[str, Any]] = collections.OrderedDict()
        self.probes: set[bytes] = set()
        self._ids = 0
        self.subscriptions = [(TOPICS.status, 1), (TOPICS.metrics, 1), (TOPICS.rpc_response, 1),
                              (self.out_topic, 1), (TOPICS.x_out, 1), (self.probe_topic, 1)]
        self.client = mqtt_compat.new_client(f"api-{self.instance}", clean_session=True)
        mqtt_compat.bind_callbacks(self.client, on_connect=self._on_connect,
                                   on_disconnect=lambda rc: self.connected.clear(),
                                   on_message=self._on_message, on_publish=lambda mid: None)
        self.client.reconnect_delay_set(0.05, 0.5)
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()
        if not self.connected.wait(10):
            raise RuntimeError("the API client could not connect")

    def _on_connect(self, result: mqtt_compat.ConnectResult) -> None:
        if result.ok:
            for topic, qos in self.subscriptions:
                self.client.subscribe(topic, qos)
            self.connected.set()

    def _on_message(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        now = time.monotonic()
        with self.cond:
            try:
                self._route(topic, payload, retain, now)
            except Exception as exc:  # a malformed message from the bridge is a finding
                self.stats.error("api_bad_message", f"{topic}: {exc!r}: {payload[:200]!r}")
            self.cond.notify_all()

    def _route(self, topic: str, payload: bytes, retain: bool, now: float) -> None:
        if topic == TOPICS.status:
            self.status.append((now, payload, retain))
        elif topic == TOPICS.metrics:
            if self.last_metrics:
                self.max_metrics_gap = max(self.max_metrics_gap, now - self.last_metrics)
            self.last_metrics = now
            if not isinstance(json.loads(payload)["metrics"]["uptime"], str):
                self.stats.error("metrics_schema", payload[:200].decode(errors="replace"))
        elif topic == TOPICS.rpc_response:
            req_id = json.loads(payload)["id"]
            if req_id in self._waiting:
                self._waiting[req_id].append(payload)
            elif req_id in self._done:
                if self._done[req_id] == payload:
                    self.stats.op("rpc_transport_duplicates")
                else:
                    self.stats.error("rpc_second_answer", f"{req_id}: {payload[:200]!r}")
            else:
                self.stats.error("rpc_unknown_reply", payload[:200].decode(errors="replace"))
        elif topic == self.out_topic:
            body = json.loads(payload)
            session_id = body.get("sessionId")
            record = self.sessions.get(session_id)
            if record is not None:
                record.add(body)
            elif body.get("type") == "x-data":
                closed = self.closed.get(session_id)
                if closed is not None and body.get("seq") in closed.crcs:
                    self.stats.op("x_transport_duplicates")  # a QoS 1 copy arriving late
                else:
                    self.stats.error("x_data_after_end", f"{session_id} seq {body.get('seq')}")
        elif topic == TOPICS.x_out:
            body = json.loads(payload)
            self.router_errors[str(body.get("sessionId"))] = body
            while len(self.router_errors) > 1000:
                self.router_errors.popitem(last=False)
        elif topic == self.probe_topic:
            self.probes.add(payload)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def publish(self, topic: str, payload: bytes, timeout: float = 30.0) -> None:
        if not self.connected.wait(timeout):
            raise SoakError("api_not_connected", f"publish to {topic}")
        info = self.client.publish(topic, payload, qos=1)
        info.wait_for_publish(timeout)
        if not info.is_published():
            raise SoakError("api_publish_timeout", topic)

    def wait(self, predicate: Callable[[], Any], timeout: float, kind: str, detail: str) -> Any:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                value = predicate()
                if value:
                    return value
                left = deadline - time.monotonic()
                if left <= 0:
                    raise SoakError(kind, detail)
                self.cond.wait(min(left, 1.0))

    def barrier(self, timeout: float = 30.0) -> None:
        """Until this client's subscriptions are in force (after a reconnect of its own)."""
        deadline = time.monotonic() + timeout
        while True:
            token = f"probe-{uuid.uuid4().hex}".encode()

            def back(token: bytes = token) -> bool:
                return token in self.probes

            try:
                self.publish(self.probe_topic, token, 5)
                self.wait(back, 1.0, "probe", "")
                return
            except SoakError:
                if time.monotonic() > deadline:
                    raise SoakError("api_resync", "the API client did not come back") from None

    # -------------------------------------------------------------- RPC

    def rpc(self, path: str, method: str, args: Optional[dict[str, Any]] = None,
            wait_s: float = OP_TIMEOUT, **extra: Any) -> dict[str, Any]:
        with self.cond:
            self._ids += 1
            req_id = f"cmd_{int(time.time())}_{self._ids}"
            self._waiting[req_id] = []
        try:
            self.publish(TOPICS.rpc_request, protocol.api_rpc_request(req_id, path, method, args,
                                                                      **extra))
            first: bytes = self.wait(lambda: self._waiting[req_id] and self._waiting[req_id][0],
                                     wait_s, "rpc_no_reply", f"{path}.{method} {req_id}")
        finally:
            with self.cond:
                replies = self._waiting.pop(req_id)
                if replies:
                    self._done[req_id] = replies[0]
                    while len(self._done) > 20000:
                        self._done.popitem(last=False)
        for extra_reply in replies[1:]:
            if extra_reply == first:
                self.stats.op("rpc_transport_duplicates")
            else:
                self.stats.error("rpc_second_answer", f"{req_id}: {extra_reply[:200]!r}")
        reply: dict[str, Any] = json.loads(first)
        return reply

    # -------------------------------------------------------------- terminal

    def x_start(self, cols: int, rows: int) -> SessionRecord:
        record = SessionRecord(f"{ROUTER}-{int(time.time() * 1000)}-{uuid.uuid4().hex[:6]}")
        with self.cond:
            self.sessions[record.id] = record
        self.publish(TOPICS.x_in, protocol.api_x_start(record.id, self.out_topic, cols=cols,
                                                       rows=rows))
        self.wait(lambda: any(m.get("type") in ("x-started", "x-error") for m in record.others),
                  OP_TIMEOUT, "x_start_no_answer", record.id)
        first = next(m for m in record.others if m.get("type") in ("x-started", "x-error"))
        if first["type"] != "x-started":
            raise SoakError("x_start_refused", json.dumps(first))
        return record

    def x_send(self, record: SessionRecord, data: bytes) -> None:
        self.publish(TOPICS.x_in, protocol.api_x_data(record.id, data))

    def wait_output(self, record: SessionRecord, needle: bytes, start: int, what: str) -> bytes:
        def found() -> Optional[bytes]:
            return bytes(record.output) if record.output.find(needle, start) >= 0 else None
        output: bytes = self.wait(found, OP_TIMEOUT, "x_output_timeout",
                                  f"{what}: {needle!r} not seen in {record.id}")
        return output

    def forget(self, record: SessionRecord) -> None:
        with self.cond:
            self.sessions.pop(record.id, None)
            record.output = bytearray()  # keep only the seq checksums, for late duplicates
            self.closed[record.id] = record
            while len(self.closed) > 200:
                self.closed.popitem(last=False)


# ---------------------------------------------------------------------- workers


def terminal_worker(wid: int, api: SoakApi, stats: Stats, gate: Gate, stop: threading.Event,
                    rng: random.Random) -> None:
    number = 0
    while not stop.is_set():
        number += 1
        if not gate.enter(stop):
            return
        record: Optional[SessionRecord] = None
        try:
            record = api.x_start(rng.randint(40, 200), rng.randint(10, 60))
            stats.op("terminal_sessions")
        except SoakError as exc:
            stats.error(exc.kind, exc.detail)
        finally:
            gate.leave()
        if record is None:
            stop.wait(1)
            continue
        try:
            for rnd in range(rng.randint(1, 6)):
                if stop.is_set() or not gate.enter(stop):
                    break
                try:
                    terminal_round(f"w{wid}s{number}r{rnd}", api, record, stats, rng)
                finally:
                    gate.leave()
            entered = gate.enter(stop)  # False once stopping: end it anyway, no restart runs
            try:
                end_session(api, record, stats, rng)
            finally:
                if entered:
                    gate.leave()
        except SoakError as exc:
            stats.error(exc.kind, exc.detail)
            try:
                api.publish(TOPICS.x_in, protocol.api_x_stop(record.id), 10)
            except SoakError:
                pass
        finally:
            check_session(record, stats)
            api.forget(record)


def terminal_round(tag: str, api: SoakApi, record: SessionRecord, stats: Stats,
                   rng: random.Random) -> None:
    kind = rng.choices(["count", "burst", "echo", "resize"], [5, 2, 3, 1])[0]
    start = len(record.output)
    end = f"Z{tag}Z"
    end_cmd = f'echo Z""{tag}Z'
    if kind in ("count", "burst"):
        lines = rng.randint(20, 2000) if kind == "count" else rng.randint(2000, 8000)
        every = rng.choice([10, 50, 200]) if kind == "count" else lines
        pause = rng.choice([0.01, 0.05]) if kind == "count" else 0
        api.x_send(record, (f'i=0; while [ $i -lt {lines} ]; do i=$((i+1)); echo "{tag}:$i:"; '
                            f'[ $((i % {every})) -eq 0 ] && sleep {pause}; done; {end_cmd}\n'
                            ).encode())
        output = api.wait_output(record, end.encode(), start, kind)
        numbers = [int(n) for n in re.findall(rb"%s:(\d+):" % tag.encode(), output[start:])]
        if numbers != list(range(1, lines + 1)):
            wrong = next((i for i, n in enumerate(numbers) if n != i + 1), len(numbers))
            raise SoakError("x_output_mismatch",
                            f"{record.id} {tag}: {len(numbers)} of {lines} lines, first wrong at {wrong}")
        stats.op("terminal_lines_verified", lines)
    elif kind == "echo":
        token = uuid.uuid4().hex[:12]
        api.x_send(record, f'echo {token[:3]}""{token[3:]}; {end_cmd}\n'.encode())
        output = api.wait_output(record, end.encode(), start, kind)
        if token.encode() not in output[start:]:
            raise SoakError("x_output_mismatch", f"{record.id}: echo {token} missing")
    else:
        cols, rows = rng.randint(40, 250), rng.randint(10, 80)
        api.publish(TOPICS.x_in, protocol.api_x_resize(record.id, cols, rows))
        api.x_send(record, f"stty size; {end_cmd}\n".encode())
        output = api.wait_output(record, end.encode(), start, kind)
        if f"{rows} {cols}".encode() not in output[start:]:
            raise SoakError("x_resize_mismatch", f"{record.id}: {rows} {cols} not reported")
    stats.op(f"terminal_round_{kind}")


def end_session(api: SoakApi, record: SessionRecord, stats: Stats, rng: random.Random) -> None:
    if rng.random() < 0.5:
        code = rng.randint(0, 120)
        api.x_send(record, f"exit {code}\n".encode())
        ended = api.wait(lambda: next((m for m in record.others if m.get("type") == "x-error"),
                                      None), OP_TIMEOUT, "x_exit_no_error", record.id)
        if ended.get("reason") != "exit" or ended.get("exitCode") != code:
            raise SoakError("x_exit_mismatch", f"{record.id}: exit {code} → {json.dumps(ended)}")
        stats.op("terminal_end_exit")
    else:
        api.publish(TOPICS.x_in, protocol.api_x_stop(record.id))
        # handled in order: input after the x-stop finds no session
        api.x_send(record, b"echo after-stop\n")
        gone = api.wait(lambda: api.router_errors.get(record.id), OP_TIMEOUT,
                        "x_stop_not_effective", record.id)
        if gone.get("reason") != "unknown-session":
            raise SoakError("x_stop_not_effective", f"{record.id}: {json.dumps(gone)}")
        stats.op("terminal_end_stop")


def check_session(record: SessionRecord, stats: Stats) -> None:
    with_gap = record.held
    if with_gap:
        stats.error("x_seq_gap", f"{record.id}: stuck at seq {record.next_seq}, "
                                 f"holding {sorted(with_gap)[:5]}")
    if record.disorder:
        stats.error("x_out_of_order", f"{record.id}: {record.disorder} messages ahead of a missing seq")
    if record.bad_duplicates:
        stats.error("x_duplicate_differs", f"{record.id}: {record.bad_duplicates}")
    stats.op("terminal_bytes_verified", len(record.output))
    stats.op("x_transport_duplicates", record.duplicates)
    errors = [m for m in record.others if m.get("type") == "x-error"]
    if len(errors) > 1:
        stats.error("x_error_twice", f"{record.id}: {errors}")


def rpc_worker(api: SoakApi, stats: Stats, gate: Gate, stop: threading.Event, rng: random.Random,
               read_path: str, read_data: str) -> None:
    ops: list[tuple[str, int]] = [("ping", 6), ("echo", 4), ("sleep", 2), ("info", 1),
                                  ("sysinfo", 1), ("read", 2), ("missing", 1), ("timeout", 1)]
    names, weights = zip(*ops)
    while not stop.is_set():
        if not gate.enter(stop):
            return
        op = rng.choices(names, weights)[0]
        try:
            rpc_op(op, api, rng, read_path, read_data)
            stats.op(f"rpc_{op}")
        except SoakError as exc:
            stats.error(exc.kind, exc.detail)
        finally:
            gate.leave()
        stop.wait(rng.uniform(0, 0.2))


def rpc_op(op: str, api: SoakApi, rng: random.Random, read_path: str, read_data: str) -> None:
    def expect(reply: dict[str, Any], ok: bool, check: Callable[[Any], bool] = lambda r: True
               ) -> None:
        good = (reply.get("status") == "success") == ok
        if not good or not check(reply.get("result") if ok else reply):
            raise SoakError(f"rpc_wrong_{op}", json.dumps(reply)[:300])
        if TOKEN in json.dumps(reply):
            raise SoakError("token_leaked", op)

    if op == "ping":
        expect(api.rpc("bridge", "ping"), True, lambda r: r.get("pong") is True)
    elif op == "echo":
        token = uuid.uuid4().hex
        expect(api.rpc("file", "exec", {"command": "/bin/echo", "params": [token]}), True,
               lambda r: r["stdout"] == token + "\n" and r["code"] == 0)
    elif op == "sleep":
        seconds = round(rng.uniform(0.1, 2.0), 2)
        expect(api.rpc("file", "exec", {"command": "/bin/sh",
                                        "params": ["-c", f"sleep {seconds}; echo slept"]}),
               True, lambda r: r["stdout"] == "slept\n")
    elif op == "info":
        expect(api.rpc("bridge", "info"), True, lambda r: "link" in r)
    elif op == "sysinfo":
        expect(api.rpc("system", "info"), True, lambda r: "memory" in r)
    elif op == "read":
        expect(api.rpc("file", "read", {"path": read_path}), True,
               lambda r: r["data"] == read_data)
    elif op == "missing":
        expect(api.rpc("no.such.object", "method"), False)
    elif op == "timeout":
        expect(api.rpc("file", "exec", {"command": "/bin/sleep", "params": ["30"]}, timeout=300),
               False)


# ---------------------------------------------------------------------- faults


class Faults:
    def __init__(self, broker: Mosquitto, proxy: TcpProxy, api: SoakApi, stats: Stats,
                 gate: Gate, rng: random.Random) -> None:
        self.broker, self.proxy, self.api, self.stats = broker, proxy, api, stats
        self.gate, self.rng = gate, rng

    def status_mark(self) -> int:
        with self.api.cond:
            return len(self.api.status)

    def wait_status(self, payload: bytes, mark: int, timeout: float, what: str) -> float:
        """Seconds until a live (not retained) ``payload`` after ``mark``."""
        started = time.monotonic()
        self.api.wait(lambda: any(p == payload and not r for _, p, r in self.api.status[mark:]),
                      timeout, f"fault_{what}", f"no {payload.decode()} within {timeout} s")
        return time.monotonic() - started

    def offline_since(self, mark: int) -> bool:
        with self.api.cond:
            return any(p == protocol.STATUS_OFFLINE for _, p, _ in self.api.status[mark:])

    def run(self, kind: str) -> None:
        print(f"  fault: {kind}", flush=True)
        self.stats.fault(kind)
        mark = self.status_mark()
        try:
            getattr(self, f"_{kind}")(mark)
        except SoakError as exc:
            self.stats.error(exc.kind, exc.detail)
        finally:
            self.proxy.clear_faults()

    def _reset(self, mark: int) -> None:
        self.proxy.cut()
        self.stats.recoveries.append(self.wait_status(protocol.STATUS_ONLINE, mark, 60, "reset"))

    def _blackhole(self, mark: int) -> None:
        self.proxy.blackholed = True
        self.wait_status(protocol.STATUS_OFFLINE, mark, 60, "blackhole_no_will")
        self.proxy.blackholed = False
        self.stats.recoveries.append(self.wait_status(protocol.STATUS_ONLINE, mark, 60,
                                                      "blackhole"))

    def _spell(self, mark: int, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            time.sleep(0.5)
            if self.offline_since(mark):
                raise SoakError("unexpected_offline", "the link died during a slow-link spell")

    def _latency(self, mark: int) -> None:
        self.proxy.latency, self.proxy.jitter = 0.175, 0.125
        self._spell(mark, 20)

    def _throttle(self, mark: int) -> None:
        self.proxy.rate_bps = 64_000 / 8
        self._spell(mark, 15)

    def _restart(self, mark: int, kill: bool) -> None:
        if not self.gate.close(OP_TIMEOUT * 2):
            self.gate.open()
            raise SoakError("fault_quiesce", "workers did not pause for the broker restart")
        try:
            self.proxy.refusing = True
            self.broker.restart(kill=kill)
            self.api.barrier()
            self.proxy.refusing = False
            self.stats.recoveries.append(self.wait_status(protocol.STATUS_ONLINE, mark, 60,
                                                          "broker_restart"))
        finally:
            self.gate.open()

    def _broker_kill(self, mark: int) -> None:
        self._restart(mark, True)

    def _broker_restart(self, mark: int) -> None:
        self._restart(mark, False)


# ---------------------------------------------------------------------- process figures


def proc_status(pid: int) -> dict[str, int]:
    fields: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "Threads"):
            fields[key] = int(value.split()[0])
    fields["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    fields["zombies"] = len([c for c in children(pid) if c[1] == "Z"])
    fields["children"] = len(children(pid))
    return fields


def children(pid: int) -> list[tuple[int, str]]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rfind(")") + 2:].split()
            if int(fields[1]) == pid:
                found.append((int(entry), fields[0]))
    return found


def cpu_seconds(pid: int) -> float:
    """CPU time of every thread, in ns from schedstat (clock ticks are too coarse for an
    idle process: one 10 ms tick in a 20 s window would read as 30 ms per minute)."""
    total_ns = 0
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            total_ns += int(Path(f"/proc/{pid}/task/{task}/schedstat").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        total_ns = 0
    if total_ns:
        return total_ns / 1e9
    else:  # schedstats off (or a sandbox kernel reporting zeros): 10 ms clock ticks
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rfind(")") + 2:].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def context_switches(pid: int) -> int:
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            text = Path(f"/proc/{pid}/task/{task}/status").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                total += int(line.split()[1])
    return total


def measure_idle(pid: int, seconds: float) -> dict[str, float]:
    cpu0, ctx0, t0 = cpu_seconds(pid), context_switches(pid), time.monotonic()
    time.sleep(seconds)  # the measurement window itself
    elapsed = time.monotonic() - t0
    return {"seconds": round(elapsed, 1),
            "cpu_ms_per_min": round((cpu_seconds(pid) - cpu0) * 1000 * 60 / elapsed, 1),
            "wakeups_per_s": round((context_switches(pid) - ctx0) / elapsed, 2)}


class Sampler(threading.Thread):
    def __init__(self, pid: int, stats: Stats, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.pid, self.stats, self.stop = pid, stats, stop
        self.max: dict[str, int] = collections.defaultdict(int)
        self.series: list[dict[str, Any]] = []
        self.started = time.monotonic()
        self._zombie_seen: set[int] = set()

    def sample(self) -> dict[str, int]:
        figures = proc_status(self.pid)
        for key, value in figures.items():
            self.max[key] = max(self.max[key], value)
        zombies = {pid for pid, state in children(self.pid) if state == "Z"}
        for pid in zombies & self._zombie_seen:
            self.stats.error("zombie", f"child {pid} of the bridge unreaped for more than one sample")
        self._zombie_seen = zombies
        return figures

    def run(self) -> None:
        last_series = 0.0
        while not self.stop.wait(2.0):
            try:
                figures = self.sample()
            except OSError:
                return
            now = time.monotonic()
            if now - last_series >= 30:
                last_series = now
                self.series.append({"t": round(now - self.started), **figures})


# ---------------------------------------------------------------------- the run


@dataclass
class Settings:
    minutes: float
    seed: int
    terminal_workers: int = 3
    rpc_workers: int = 2
    fault_every: float = 60.0
    idle_seconds: float = 30.0
    json_path: Path = RESULTS / "latest.json"


def run(settings: Settings) -> dict[str, Any]:
    rng = random.Random(settings.seed)
    stats = Stats()
    workdir = Path(tempfile.mkdtemp(prefix="spotfi-soak-"))
    read_path = workdir / "known.txt"
    read_data = "known content " + uuid.uuid4().hex + "\n"
    read_path.write_text(read_data)
    broker = Mosquitto().start()
    proxy = TcpProxy(broker.port)
    bridge = BridgeProcess(proxy.url, router_id=ROUTER, token=TOKEN, toml=BRIDGE_TOML,
                           env={"SPOTFI_LOG_LEVEL": "info"}).start()
    api: Optional[SoakApi] = None
    report: dict[str, Any] = {"settings": {"minutes": settings.minutes, "seed": settings.seed,
                                           "terminal_workers": settings.terminal_workers,
                                           "rpc_workers": settings.rpc_workers,
                                           "fault_every": settings.fault_every,
                                           "idle_seconds": settings.idle_seconds}}
    try:
        api = SoakApi(broker.port, stats)
        api.barrier()
        api.wait(lambda: any(p == protocol.STATUS_ONLINE for _, p, _ in api.status), 30,
                 "startup", "the bridge never came ONLINE")
        api.rpc("bridge", "ping", wait_s=10)
        pid = bridge.pid
        print(f"soak: bridge pid {pid}, {settings.minutes:g} min of load, seed {settings.seed}; "
              f"measuring idle CPU for {settings.idle_seconds:g} s", flush=True)
        time.sleep(2)  # let the start-up metrics and first wakeups pass before measuring
        start_figures = proc_status(pid)
        report["idle_before"] = measure_idle(pid, settings.idle_seconds)
        stop = threading.Event()
        gate = Gate()
        sampler = Sampler(pid, stats, stop)
        sampler.sample()
        sampler.start()
        threads = [threading.Thread(target=_guard(terminal_worker, stats), daemon=True,
                                    args=(i, api, stats, gate, stop, random.Random(rng.random())))
                   for i in range(settings.terminal_workers)]
        threads += [threading.Thread(target=_guard(rpc_worker, stats), daemon=True,
                                     args=(api, stats, gate, stop, random.Random(rng.random()),
                                           str(read_path), read_data))
                    for _ in range(settings.rpc_workers)]
        for thread in threads:
            thread.start()
        faults = Faults(broker, proxy, api, stats, gate, rng)
        kinds = ["reset", "blackhole", "latency", "throttle", "broker_kill", "broker_restart"]
        cycle: list[str] = []
        load_started = time.monotonic()
        load_end = load_started + settings.minutes * 60
        next_fault = load_started + min(settings.fault_every, settings.minutes * 60 / 8)
        every = min(settings.fault_every, settings.minutes * 60 / 8)
        last_progress = load_started
        while time.monotonic() < load_end:
            now = time.monotonic()
            if now >= next_fault:
                if not cycle:
                    cycle = kinds[:]
                    rng.shuffle(cycle)
                faults.run(cycle.pop())
                next_fault = time.monotonic() + every
            if now - last_progress >= 30:
                last_progress = now
                with stats.lock:
                    done = sum(v for k, v in stats.ops.items() if k.startswith(("rpc_", "terminal_round")))
                    errs = sum(stats.errors.values())
                print(f"  {int(now - load_started)} s: {done} operations, {errs} errors, "
                      f"RSS {sampler.max['VmRSS']} KiB max", flush=True)
            time.sleep(min(1.0, max(0.05, min(next_fault, load_end) - time.monotonic())))
        print("soak: load done; stopping the workers", flush=True)
        stop.set()
        for thread in threads:
            thread.join(OP_TIMEOUT * 2)
            if thread.is_alive():
                stats.error("worker_stuck", thread.name)
        report["load_seconds"] = round(time.monotonic() - load_started, 1)
        proxy.clear_faults()
        # back to idle: no session, no RPC left in the bridge
        try:
            deadline = time.monotonic() + 30
            while True:
                info = api.rpc("bridge", "info", wait_s=30)["result"]
                if (info["terminal"]["sessions"] == 0 and info["terminal"]["closing"] == 0
                        and info["counters"]["running"] == 0 and info["counters"]["queued"] == 0):
                    break
                if time.monotonic() > deadline:
                    stats.error("not_idle_after_load", json.dumps(info["terminal"]))
                    break
                time.sleep(0.5)
        except SoakError as exc:
            stats.error(exc.kind, exc.detail)
            info = {}
        report["bridge_info"] = {key: info.get(key) for key in ("link", "terminal", "counters")}
        time.sleep(2)
        report["idle_after"] = measure_idle(pid, settings.idle_seconds)
        end_figures = sampler.sample()
        report["resources"] = {
            key: {"start": start_figures[key], "max": sampler.max[key], "final": end_figures[key]}
            for key in ("VmRSS", "fds", "Threads", "zombies", "children")}
        report["series"] = sampler.series
        # a clean stop ends with the retained OFFLINE
        mark = len(api.status)
        code = bridge.terminate(10)
        report["exit_code"] = code
        try:
            api.wait(lambda: any(p == protocol.STATUS_OFFLINE for _, p, _ in api.status[mark:]),
                     10, "no_offline_at_stop", "SIGTERM did not publish OFFLINE")
        except SoakError as exc:
            stats.error(exc.kind, exc.detail)
        if code != 0:
            stats.error("bad_exit", f"exit status {code}")
        log = bridge.log()
        if TOKEN in log:
            stats.error("token_in_log", "the router token appears in the bridge log")
        for marker in ("Traceback", "internal error"):
            if marker in log:
                stats.error("bridge_log", f"{marker!r} in the bridge log")
        report["max_metrics_gap"] = round(api.max_metrics_gap, 1)
    finally:
        stop_all = [bridge.close, proxy.close, broker.close]
        if api is not None:
            stop_all.insert(0, api.close)
        for closer in stop_all:
            try:
                closer()
            except Exception:
                traceback.print_exc()
        log_copy = RESULTS / "latest-bridge.log"
        try:
            RESULTS.mkdir(exist_ok=True)
            log_copy.write_text(bridge.log())  # closed: its directory is gone, its log kept
        except OSError:
            pass
        shutil.rmtree(workdir, ignore_errors=True)
    report["operations"] = dict(sorted(stats.ops.items()))
    report["faults"] = dict(sorted(stats.faults.items()))
    report["errors"] = dict(sorted(stats.errors.items()))
    report["error_samples"] = stats.samples
    report["recovery_seconds"] = {
        "count": len(stats.recoveries),
        "max": round(max(stats.recoveries), 2) if stats.recoveries else None,
        "mean": round(sum(stats.recoveries) / len(stats.recoveries), 2) if stats.recoveries else None}
    report["verdict"] = verdict(report)
    return report


def _guard(target: Callable[..., None], stats: Stats) -> Callable[..., None]:
    """A worker that dies of a bug in the soak itself is reported, not silent."""
    def run(*args: Any) -> None:
        try:
            target(*args)
        except Exception as exc:
            stats.error("soak_worker_crashed", f"{target.__name__}: {exc!r}")
            traceback.print_exc()
    return run


def verdict(report: dict[str, Any]) -> dict[str, Any]:
    problems = []
    if report["errors"]:
        problems.append(f"{sum(report['errors'].values())} errors")
    res = report.get("resources", {})
    if res:
        if res["zombies"]["final"]:
            problems.append(f"{res['zombies']['final']} zombies left")
        if res["fds"]["final"] > res["fds"]["start"] + 2:
            problems.append(f"open fds {res['fds']['start']} → {res['fds']['final']}")
        if res["Threads"]["final"] > res["Threads"]["start"] + 1:
            problems.append(f"threads {res['Threads']['start']} → {res['Threads']['final']}")
    before, after = report.get("idle_before"), report.get("idle_after")
    if before and after and after["cpu_ms_per_min"] > max(2 * before["cpu_ms_per_min"],
                                                          before["cpu_ms_per_min"] + 60):
        problems.append(f"idle CPU {before['cpu_ms_per_min']} → {after['cpu_ms_per_min']} ms/min")
    return {"ok": not problems, "problems": problems}


def table(report: dict[str, Any]) -> str:
    lines = []

    def row(name: str, *values: Any) -> None:
        lines.append(f"  {name:<34}" + "".join(f"{v!s:>12}" for v in values))

    s = report["settings"]
    lines.append(f"spotfi-bridge soak: {report.get('load_seconds', 0):g} s of load "
                 f"(SOAK_MINUTES={s['minutes']:g}), seed {s['seed']}, "
                 f"{s['terminal_workers']} terminal + {s['rpc_workers']} RPC workers")
    lines.append("operations")
    for name, count in report["operations"].items():
        row(name, count)
    lines.append("faults injected")
    for name, count in report["faults"].items():
        row(name, count)
    rec = report["recovery_seconds"]
    row("recovery to ONLINE (mean / max s)", rec["mean"], rec["max"])
    lines.append(f"errors: {sum(report['errors'].values())}")
    for name, count in report["errors"].items():
        row(name, count)
    if "resources" in report:
        lines.append("bridge process" + " " * 22 + f"{'start':>12}{'max':>12}{'final':>12}")
        labels = {"VmRSS": "RSS (KiB)", "fds": "open fds", "Threads": "threads",
                  "zombies": "zombie children", "children": "children"}
        for key, label in labels.items():
            figures = report["resources"][key]
            row(label, figures["start"], figures["max"], figures["final"])
    if "idle_before" in report and "idle_after" in report:
        lines.append("idle" + " " * 32 + f"{'before':>12}{'after':>12}")
        for key, label in (("cpu_ms_per_min", "CPU (ms per minute)"),
                           ("wakeups_per_s", "context switches per s")):
            row(label, report["idle_before"][key], report["idle_after"][key])
    link = (report.get("bridge_info") or {}).get("link") or {}
    if link:
        lines.append("bridge's own counters (bridge info)")
        for key in ("connects", "disconnects", "connect_failures", "outbox_refused",
                    "dropped_qos0", "dropped_send_error", "published", "received"):
            row(key, link.get(key, 0))
    row("max gap between metrics (s)", report.get("max_metrics_gap"))
    row("exit status after SIGTERM", report.get("exit_code"))
    v = report["verdict"]
    lines.append("verdict: " + ("PASS" if v["ok"] else "FAIL: " + "; ".join(v["problems"])))
    if report["error_samples"]:
        lines.append("first errors:")
        lines.extend(f"  {sample}" for sample in report["error_samples"][:10])
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=float(os.environ.get("SOAK_MINUTES", "60")))
    parser.add_argument("--seed", type=int, default=int(os.environ.get("SOAK_SEED", "0")) or None)
    parser.add_argument("--json", type=Path, default=RESULTS / "latest.json")
    parser.add_argument("--idle-seconds", type=float, default=None)
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1, 1 << 30)
    idle = args.idle_seconds if args.idle_seconds is not None else (
        60.0 if args.minutes >= 10 else 30.0)
    settings = Settings(minutes=args.minutes, seed=seed, idle_seconds=idle, json_path=args.json)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    report = run(settings)
    print()
    print(table(report))
    settings.json_path.parent.mkdir(parents=True, exist_ok=True)
    settings.json_path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nJSON: {settings.json_path}")
    return 0 if report["verdict"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
