"""The API side of the wire for a command-line tool: one paho client on its own thread.

``spotfi-bridge-ctl`` is a separate API "instance" (client id ``api-ctl-<random>``,
terminal output on ``spotfi/api/ctl-<random>/x/out``), so it can run beside the
real API against the same broker. Unlike the daemon it is a short-lived CLI
with a blocking main thread, so paho's own network thread (``loop_start``) is
the simplest correct design: callbacks only put events on a queue and wake the
main thread, which does all the work.
"""

from __future__ import annotations

import queue
import secrets
import ssl
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Union

import paho.mqtt.client as paho

from spotfi_bridge import mqtt_compat
from spotfi_bridge.ctl.settings import Settings

EXIT_OK = 0
#: the router answered with an error, or the terminal session ended with one
EXIT_FAILED = 1
#: bad command line or settings (argparse uses 2 as well)
EXIT_USAGE = 2
#: the broker could not be reached or refused us
EXIT_BROKER = 3
#: no answer in time (as timeout(1))
EXIT_TIMEOUT = 124

KEEPALIVE = 30
#: Seconds close() waits for paho's network thread to stop.
CLOSE_TIMEOUT = 2.0


class CtlError(Exception):
    """A failure to report in one line and exit with ``exit_code``."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class Message:
    topic: str
    payload: bytes
    retain: bool


@dataclass(frozen=True)
class LinkEvent:
    """The broker connection dropped (``up=False``) or came back (``up=True``)."""

    up: bool
    detail: str


Event = Union[Message, LinkEvent]


def new_instance_id() -> str:
    return f"ctl-{secrets.token_hex(4)}"


class CtlClient:
    def __init__(self, settings: Settings, *, instance: Optional[str] = None,
                 wake: Optional[Callable[[], None]] = None) -> None:
        self.settings = settings
        self.instance = instance or new_instance_id()
        self.client_id = f"api-{self.instance}"
        self.out_topic = f"spotfi/api/{self.instance}/x/out"
        self.inbox: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self._wake = wake or (lambda: None)
        self._cond = threading.Condition()
        self._connect_result: Optional[mqtt_compat.ConnectResult] = None
        self._connected = False
        self._closing = False
        self._topics: list[str] = []
        self._subacks: dict[int, list[int]] = {}
        self._published: set[int] = set()
        self._client = self._new_client()

    # ------------------------------------------------------------------ set-up

    def _new_client(self) -> paho.Client:
        s = self.settings
        client = mqtt_compat.new_client(self.client_id, clean_session=True,
                                        transport=s.broker.transport)
        if s.username:
            client.username_pw_set(s.username, s.password or None)
        if s.broker.tls:
            client.tls_set_context(self._ssl_context())
            if s.insecure:
                client.tls_insecure_set(True)
        if s.broker.transport == "websockets":
            client.ws_set_options(path=s.broker.ws_path)
        client.reconnect_delay_set(0.2, 5)
        mqtt_compat.bind_callbacks(client, on_connect=self._on_connect,
                                   on_disconnect=self._on_disconnect,
                                   on_message=self._on_message, on_publish=self._on_publish)
        client.on_subscribe = self._on_subscribe
        client.on_socket_open = lambda _client, _userdata, sock: mqtt_compat.set_nodelay(sock)
        return client

    def _ssl_context(self) -> ssl.SSLContext:
        s = self.settings
        return mqtt_compat.tls_context(s.cafile or "", s.cert or "", s.key or "", s.insecure)

    def connect(self, timeout: float = 10.0) -> None:
        """Connect and wait for the CONNACK; raises :class:`CtlError` (EXIT_BROKER) on failure."""
        broker = self.settings.broker
        where = self.settings.public_broker
        mqtt_compat.set_connect_timeout(self._client, timeout)
        try:
            self._client.connect(broker.host, broker.port, keepalive=KEEPALIVE)
        except Exception as exc:  # every failure of the first connect is reported, never a trace
            raise CtlError(f"cannot connect to {where}: {mqtt_compat.describe_error(exc)}",
                           EXIT_BROKER) from None
        self._client.loop_start()
        with self._cond:
            self._cond.wait_for(lambda: self._connect_result is not None, timeout)
            result = self._connect_result
        if result is None:
            self.close()
            raise CtlError(f"no answer (CONNACK) from {where} within {timeout:g} s", EXIT_BROKER)
        if not result.ok:
            self.close()
            hint = " (check --username/--password)" if result.auth_refused else ""
            raise CtlError(f"{where} refused the connection: {result.reason}{hint}", EXIT_BROKER)

    def subscribe(self, topics: Iterable[str], timeout: float = 10.0,
                  required: bool = True) -> list[str]:
        """Subscribe at QoS 1 and wait for the SUBACK, so no reply can arrive unseen.

        A topic the broker's ACL refuses is an error when ``required``; otherwise the
        refused topics are returned (the caller does without them).
        """
        wanted = [topic for topic in topics if topic not in self._topics]
        if not wanted:
            return []
        self._topics.extend(wanted)
        rc, mid = self._client.subscribe([(topic, 1) for topic in wanted])
        if rc != paho.MQTT_ERR_SUCCESS:
            raise CtlError(f"cannot subscribe to {', '.join(wanted)}: "
                           f"{mqtt_compat.error_string(rc)}", EXIT_BROKER)
        with self._cond:
            if not self._cond.wait_for(lambda: mid in self._subacks, timeout):
                raise CtlError(f"the broker did not acknowledge the subscription to "
                               f"{', '.join(wanted)} within {timeout:g} s", EXIT_BROKER)
            codes = self._subacks.pop(mid)
        refused = [topic for topic, code in zip(wanted, codes) if code >= 0x80]
        for topic in refused:
            self._topics.remove(topic)
        if refused and required:
            raise CtlError(f"the broker refused the subscription to {', '.join(refused)} "
                           "(not allowed by its ACL?)", EXIT_BROKER)
        return refused

    # ------------------------------------------------------------------ use

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> int:
        """Queue a message; QoS 1 messages published while disconnected go out after reconnect."""
        info = self._client.publish(topic, payload, qos=qos)
        rc = mqtt_compat.publish_rc(info)
        if rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN):
            raise CtlError(f"cannot publish to {topic}: {mqtt_compat.error_string(rc)}",
                           EXIT_BROKER)
        return mqtt_compat.message_mid(info)

    def wait_published(self, mid: int, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: mid in self._published, timeout)

    def get(self, timeout: Optional[float]) -> Optional[Event]:
        """The next event, or ``None`` when ``timeout`` passed first."""
        try:
            if timeout is not None and timeout <= 0:
                return self.inbox.get_nowait()
            return self.inbox.get(timeout=timeout)
        except queue.Empty:
            return None

    def get_nowait(self) -> Optional[Event]:
        try:
            return self.inbox.get_nowait()
        except queue.Empty:
            return None

    @property
    def connected(self) -> bool:
        return self._connected

    def close(self) -> None:
        """Disconnect cleanly (idempotent); paho's thread is a daemon, so nothing can hang exit."""
        if self._closing:
            return
        self._closing = True
        try:
            self._client.disconnect()
        except Exception:
            pass
        # Bounded: a Ctrl-C that landed inside a queue's lock (an asynchronous
        # KeyboardInterrupt can leave it held) would otherwise leave paho's thread blocked
        # on that lock and loop_stop() joining it forever. Its thread is a daemon.
        stopper = threading.Thread(target=self._client.loop_stop, daemon=True)
        stopper.start()
        stopper.join(CLOSE_TIMEOUT)

    # ------------------------------------------------------------------ paho thread

    def _on_connect(self, result: mqtt_compat.ConnectResult) -> None:
        first = self._connect_result is None
        with self._cond:
            self._connect_result = result
            self._connected = result.ok
            self._cond.notify_all()
        if not result.ok or first:
            return
        # a clean session forgets subscriptions: renew them before telling the main thread
        if self._topics:
            self._client.subscribe([(topic, 1) for topic in self._topics])
        self._post(LinkEvent(True, "reconnected"))

    def _on_disconnect(self, rc: int) -> None:
        was = self._connected
        with self._cond:
            self._connected = False
            self._cond.notify_all()
        if was and not self._closing:
            self._post(LinkEvent(False, mqtt_compat.error_string(rc) if rc else "disconnected"))

    def _on_message(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        self._post(Message(topic, bytes(payload), retain))

    def _on_publish(self, mid: int) -> None:
        with self._cond:
            self._published.add(mid)
            self._cond.notify_all()

    def _on_subscribe(self, _client: Any, _userdata: Any, mid: int, granted: Any,
                      *_rest: Any) -> None:
        codes = [_code(item) for item in (granted or [])]
        with self._cond:
            self._subacks[mid] = codes
            self._cond.notify_all()

    def _post(self, event: Event) -> None:
        self.inbox.put(event)
        self._wake()


def _code(value: Any) -> int:
    """A SUBACK code from paho 1.x (int) or 2.x (ReasonCode)."""
    if isinstance(value, int):
        return value
    return int(getattr(value, "value", 0) or 0)
