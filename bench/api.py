"""The API side for the benchmarks: one paho client driven in the calling thread.

No network thread: the bench pumps the socket itself while it waits, so the
time a message arrives is taken the moment paho parses it, with no hand-over
between threads (the GIL hand-over alone would blur sub-millisecond figures).
The same client measures the bridge and the floors, so its own costs cancel.
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import paho.mqtt.client as paho

from spotfi_bridge import mqtt_compat

Handler = Callable[[bytes, float], None]


class BenchTimeout(RuntimeError):
    pass


set_nodelay = mqtt_compat.set_nodelay


class Api:
    def __init__(self, port: int, client_id: str) -> None:
        self.port = port
        self.handlers: dict[str, Handler] = {}
        self.subscriptions: dict[str, int] = {}
        self.connected = False
        self._suback: set[int] = set()
        self.client = mqtt_compat.new_client(client_id, clean_session=True)
        mqtt_compat.bind_callbacks(self.client, on_connect=self._on_connect,
                                   on_disconnect=self._on_disconnect,
                                   on_message=self._on_message, on_publish=lambda mid: None)
        self.client.on_subscribe = self._on_subscribe
        self.client.on_socket_open = lambda _c, _u, sock: set_nodelay(sock)
        self.client.max_inflight_messages_set(0)  # unlimited: the bench paces itself
        self.connect()

    # ------------------------------------------------------------------ connection

    def connect(self, timeout: float = 10.0) -> None:
        self.client.connect("127.0.0.1", self.port, keepalive=60)
        self.pump(lambda: self.connected, timeout, "CONNACK")

    def reconnect(self, timeout: float = 10.0) -> None:
        """Connect again after a broker outage, retrying until the broker listens."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.client.reconnect()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.002)
        self.pump(lambda: self.connected, max(0.1, deadline - time.monotonic()), "CONNACK")

    def _on_connect(self, result: mqtt_compat.ConnectResult) -> None:
        if result.ok:
            self.connected = True
            for topic, qos in self.subscriptions.items():
                self.client.subscribe(topic, qos)

    def _on_disconnect(self, rc: int) -> None:
        self.connected = False

    def _on_subscribe(self, _client: Any, _userdata: Any, mid: int, *_rest: Any) -> None:
        self._suback.add(mid)

    def _on_message(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        at = time.perf_counter()
        handler = self.handlers.get(topic)
        if handler is not None:
            handler(payload, at)

    def close(self) -> None:
        try:
            self.client.disconnect()
        except Exception:
            pass

    # ------------------------------------------------------------------ use

    def on(self, topic: str, handler: Handler, qos: int = 1) -> None:
        """Route ``topic`` to ``handler(payload, arrival_time)``; subscribe and wait for SUBACK."""
        self.handlers[topic] = handler
        if topic in self.subscriptions:
            return
        self.subscriptions[topic] = qos
        _rc, mid = self.client.subscribe(topic, qos)
        self.pump(lambda: mid in self._suback, 10, f"SUBACK for {topic}")

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> float:
        """Returns the time just before the message was handed to the socket."""
        at = time.perf_counter()
        self.client.publish(topic, payload, qos=qos, retain=retain)
        return at

    def pump(self, until: Optional[Callable[[], bool]], timeout: float, what: str = "") -> None:
        """Serve the socket until ``until()`` is true (or for ``timeout`` s when it is None)."""
        deadline = time.monotonic() + timeout
        while until is None or not until():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if until is None:
                    return
                raise BenchTimeout(f"timed out after {timeout:.1f} s waiting for {what}")
            rc = self.client.loop(min(remaining, 0.5))
            if rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_AGAIN) and not self.connected:
                time.sleep(min(0.01, max(0.0, remaining)))


# ---------------------------------------------------------------------- terminal output


@dataclass
class Chunk:
    seq: int
    data: bytes
    at: float


@dataclass
class SessionSink:
    """Everything one session sent back, with arrival times."""

    session_id: str
    end_marker: bytes = b"BENCH-END"
    started_at: Optional[float] = None
    chunks: list[Chunk] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    nbytes: int = 0
    end_at: Optional[float] = None
    watch_from: int = 0  # chunk index after which the end marker counts
    _tail: bytes = b""

    def feed(self, message: dict[str, Any], at: float) -> None:
        kind = message.get("type")
        if kind == "x-data":
            data = base64.b64decode(message.get("data", ""))
            self.chunks.append(Chunk(int(message.get("seq", -1)), data, at))
            self.nbytes += len(data)
            if self.end_at is None and len(self.chunks) > self.watch_from:
                window = self._tail + data
                if self.end_marker in window:
                    self.end_at = at
                self._tail = window[-len(self.end_marker):]
        elif kind == "x-started":
            self.started_at = at
        elif kind == "x-error":
            self.errors.append(message)

    def arm(self) -> None:
        """Look for the end marker only in output that arrives from now on."""
        self.watch_from = len(self.chunks)
        self.end_at = None
        self._tail = b""

    def output(self, start: int = 0) -> bytes:
        return b"".join(chunk.data for chunk in self.chunks[start:])

    def seq_problems(self) -> list[str]:
        """Gaps, repeats or reordering of ``seq`` in arrival order."""
        problems = []
        expected = 0
        for chunk in self.chunks:
            if chunk.seq != expected:
                problems.append(f"seq {chunk.seq} arrived where {expected} was expected")
                if len(problems) > 5:
                    break
            expected = chunk.seq + 1
        return problems


class Sinks:
    """Routes an out topic's messages to sessions by ``sessionId``."""

    def __init__(self) -> None:
        self.by_id: dict[str, SessionSink] = {}
        self.unrouted = 0

    def add(self, sink: SessionSink) -> SessionSink:
        self.by_id[sink.session_id] = sink
        return sink

    def __call__(self, payload: bytes, at: float) -> None:
        try:
            message = json.loads(payload)
        except ValueError:
            self.unrouted += 1
            return
        sink = self.by_id.get(str(message.get("sessionId"))) if isinstance(message, dict) else None
        if sink is None:
            self.unrouted += 1
            return
        sink.feed(message, at)
