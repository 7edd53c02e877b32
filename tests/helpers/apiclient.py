"""The API side of the wire, as the tests drive it: a real paho client on a real broker.

It speaks the bytes the SpotFi API speaks (built by ``spotfi_bridge.protocol``)
and records everything it receives so tests can wait on conditions.
"""

from __future__ import annotations

import base64
import itertools
import json
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Optional

from paho.mqtt.client import topic_matches_sub

from spotfi_bridge import mqtt_compat, protocol
from tests.helpers.wait import WaitTimeout


@dataclass
class Received:
    topic: str
    payload: bytes
    retain: bool
    at: float

    def json(self) -> Any:
        return json.loads(self.payload)


class ApiClient:
    def __init__(self, broker_port: int, *, username: Optional[str] = None,
                 password: Optional[str] = None, instance: Optional[str] = None,
                 client_id: Optional[str] = None, clean_session: bool = True) -> None:
        self.instance = instance or f"test-{uuid.uuid4().hex[:8]}"
        self.out_topic = f"spotfi/api/{self.instance}/x/out"
        self._cond = threading.Condition()
        self.received: list[Received] = []
        self._ids = itertools.count(1)
        self._connected = threading.Event()
        self.client = mqtt_compat.new_client(client_id or f"api-{self.instance}",
                                             clean_session=clean_session)
        if username is not None:
            self.client.username_pw_set(username, password)
        mqtt_compat.bind_callbacks(self.client, on_connect=self._on_connect,
                                   on_disconnect=lambda rc: self._connected.clear(),
                                   on_message=self._on_message, on_publish=lambda mid: None)
        self._subscriptions: list[tuple[str, int]] = []
        self.client.reconnect_delay_set(0.05, 0.5)
        self.client.connect("127.0.0.1", broker_port, keepalive=30)
        self.client.loop_start()
        if not self._connected.wait(10):
            raise WaitTimeout("api client could not connect")

    def _on_connect(self, result: mqtt_compat.ConnectResult) -> None:
        if result.ok:
            for topic, qos in self._subscriptions:
                self.client.subscribe(topic, qos)
            self._connected.set()

    def _on_message(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        with self._cond:
            self.received.append(Received(topic, payload, retain, time.monotonic()))
            self._cond.notify_all()

    def subscribe(self, topic: str, qos: int = 1) -> None:
        """Subscribe and wait until the broker acknowledged it (so nothing is missed)."""
        done = threading.Event()
        previous = self.client.on_subscribe
        self.client.on_subscribe = lambda *args: done.set()
        self._subscriptions.append((topic, qos))
        self.client.subscribe(topic, qos)
        if not done.wait(10):
            raise WaitTimeout(f"subscribe {topic} not acknowledged")
        self.client.on_subscribe = previous

    def wait_connected(self, timeout: float = 15.0) -> None:
        if not self._connected.wait(timeout):
            raise WaitTimeout("api client is not connected")

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        self.wait_connected()
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if qos:
            info.wait_for_publish(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    # ------------------------------------------------------------------ waiting

    def matching(self, topic_filter: str, predicate: Callable[[Received], bool] = lambda m: True
                 ) -> list[Received]:
        with self._cond:
            return [m for m in self.received
                    if topic_matches_sub(topic_filter, m.topic) and predicate(m)]

    def wait_message(self, topic_filter: str, predicate: Callable[[Received], bool] = lambda m: True,
                     timeout: float = 10.0, start: int = 0) -> Received:
        """The first message (from index ``start`` on) matching filter and predicate."""
        deadline = time.monotonic() + timeout
        with self._cond:
            index = start
            while True:
                while index < len(self.received):
                    message = self.received[index]
                    index += 1
                    if topic_matches_sub(topic_filter, message.topic) and predicate(message):
                        return message
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise WaitTimeout(f"no message on {topic_filter} matching within {timeout} s")
                self._cond.wait(remaining)

    def mark(self) -> int:
        with self._cond:
            return len(self.received)

    def clear(self) -> None:
        with self._cond:
            self.received.clear()

    # ------------------------------------------------------------------ RPC

    def rpc_send(self, router_id: str, path: str, method: str, args: Optional[dict[str, Any]] = None,
                 req_id: Optional[Any] = None, **extra: Any) -> Any:
        if req_id is None:  # the API's shape: cmd_<epoch ms>_<instance prefix>_<n>
            req_id = f"cmd_{int(time.time() * 1000)}_{self.instance}_{next(self._ids)}"
        self.publish(f"spotfi/router/{router_id}/rpc/request",
                     protocol.api_rpc_request(req_id, path, method, args, **extra))
        return req_id

    def rpc(self, router_id: str, path: str, method: str, args: Optional[dict[str, Any]] = None,
            timeout: float = 15.0, **extra: Any) -> dict[str, Any]:
        response_topic = f"spotfi/router/{router_id}/rpc/response"
        if (response_topic, 1) not in self._subscriptions:
            self.subscribe(response_topic)
        start = self.mark()
        req_id = self.rpc_send(router_id, path, method, args, **extra)
        reply = self.wait_message(response_topic, lambda m: m.json().get("id") == req_id,
                                  timeout, start)
        result: dict[str, Any] = reply.json()
        return result

    # ------------------------------------------------------------------ terminal

    def x_start(self, router_id: str, session_id: Optional[str] = None,
                response_topic: Optional[str] = "default", **extra: Any) -> str:
        if response_topic == "default":
            response_topic = self.out_topic
        if response_topic and (response_topic, 1) not in self._subscriptions:
            self.subscribe(response_topic)
        session_id = session_id or f"{router_id}-{int(time.time() * 1000)}-{uuid.uuid4().hex[:6]}"
        self.publish(f"spotfi/router/{router_id}/x/in",
                     protocol.api_x_start(session_id, response_topic, **extra))
        return session_id

    def x_send(self, router_id: str, session_id: str, data: bytes) -> None:
        self.publish(f"spotfi/router/{router_id}/x/in", protocol.api_x_data(session_id, data))

    def x_stop(self, router_id: str, session_id: str) -> None:
        self.publish(f"spotfi/router/{router_id}/x/in", protocol.api_x_stop(session_id))

    def x_resize(self, router_id: str, session_id: str, cols: int, rows: int) -> None:
        self.publish(f"spotfi/router/{router_id}/x/in",
                     protocol.api_x_resize(session_id, cols, rows))

    def x_messages(self, session_id: str, topic: Optional[str] = None) -> list[dict[str, Any]]:
        out = []
        for message in self.matching(topic or self.out_topic):
            try:
                body = message.json()
            except ValueError:
                continue
            if body.get("sessionId") == session_id:
                out.append(body)
        return out

    def x_output(self, session_id: str, topic: Optional[str] = None) -> bytes:
        """Concatenated output of a session, in ``seq`` order (asserting no gap)."""
        chunks = [m for m in self.x_messages(session_id, topic) if m.get("type") == "x-data"]
        chunks.sort(key=lambda m: m.get("seq", 0))
        return b"".join(base64.b64decode(m["data"]) for m in chunks)

    def wait_output(self, session_id: str, needle: bytes, timeout: float = 10.0,
                    topic: Optional[str] = None) -> bytes:
        deadline = time.monotonic() + timeout
        while True:
            output = self.x_output(session_id, topic)
            if needle in output:
                return output
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WaitTimeout(f"{needle!r} not seen in output of {session_id} within "
                                  f"{timeout} s; got {output[-400:]!r}")
            with self._cond:
                self._cond.wait(min(remaining, 0.2))

    def wait_x(self, session_id: str, kind: str, timeout: float = 10.0,
               topic: Optional[str] = None) -> dict[str, Any]:
        message = self.wait_message(
            topic or self.out_topic,
            lambda m: _is_x(m, session_id, kind), timeout)
        result: dict[str, Any] = message.json()
        return result


def _is_x(message: Received, session_id: str, kind: str) -> bool:
    try:
        body = message.json()
    except ValueError:
        return False
    return isinstance(body, dict) and body.get("sessionId") == session_id and body.get("type") == kind
