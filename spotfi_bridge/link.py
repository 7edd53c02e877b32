"""MqttLink: the bridge's one MQTT connection, driven by paho-mqtt on the asyncio loop.

paho runs without its own thread: the broker socket is a reader on the loop
(``loop_read``), a writer only while paho has bytes queued (``loop_write``),
and ``loop_misc`` is a loop timer scheduled from what the keepalive needs.
Only ``reconnect()`` (DNS, TCP connect, TLS/WebSocket handshake, all bounded)
runs in a one-thread executor so it cannot stall terminals; while it runs the
loop thread leaves paho alone and publishes wait in the link's own backlog.

Presence: Last Will ``OFFLINE`` (retained, QoS 1); retained ``ONLINE`` after every
successful connect; subscriptions restored every time; clean session off.

Delivery: the outbox has two lanes. Control (status, metrics, RPC replies: the
router's own topics) goes to paho at once; bulk (terminal traffic, on the sessions'
response topics) goes only while the bulk bytes paho holds unacknowledged stay under
``[mqtt] bulk_window_bytes``, so a heartbeat or a reply waits behind at most that
much output. One paho client lives as long as the connection settings: after a cut
it resends what the broker has not acknowledged with the same packet ids, which at
QoS 2 (terminal output) the broker recognises, so nothing is forwarded twice. A
reload that must reconnect first lets the broker acknowledge what is in flight, then
sends DISCONNECT (no Will, so no OFFLINE) before the new client connects.

Inbound: retained messages never reach the handler (a retained command would run at
every start); each message goes with a :class:`~spotfi_bridge.freshness.Delivery`
saying whether it came live or from the queue the broker kept during an outage, and
how long that outage was (monotonic), which the age rule needs.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import random
import socket
import threading
import time
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Optional

import paho.mqtt.client as paho

from spotfi_bridge import mqtt_compat
from spotfi_bridge.config import Config
from spotfi_bridge.freshness import Delivery
from spotfi_bridge.protocol import STATUS_OFFLINE, STATUS_ONLINE, Topics, topic_problem
from spotfi_bridge.publish import OnSent

log = logging.getLogger("spotfi_bridge.link")

#: (topic, payload, how it was delivered); retained messages never reach it.
MessageHandler = Callable[[str, bytes, Delivery], None]

#: ``(topic, present)``: MQTT 5 only, whether the broker found a subscriber for terminal
#: output on ``topic``: each acknowledgement saying "no matching subscribers", and the
#: first one after those that does not.
SubscribersHandler = Callable[[str, bool], None]

#: Recent inbound QoS 1 deliveries remembered to recognise the broker's resends.
RECENT_INBOUND = 1024

#: For this long after the link went down, retry at ``backoff_min``; exponential after.
QUICK_RETRY_WINDOW = 10.0

#: While disconnected, an info line at least this often says the link is still trying.
PROGRESS_LOG_INTERVAL = 60.0

#: A refused token is not fixed in seconds: its retries back off from here, with no
#: quick-retry window (a reload with a new token reconnects at once anyway).
AUTH_RETRY_MIN = 5.0

#: Messages paho may have on the wire unacknowledged; more wait, in order, inside paho.
#: Mosquitto's default ``max_inflight_messages`` is 20, and beyond it Mosquitto 2.0
#: answers a QoS 2 PUBLISH with PUBREC and drops it (400 of 2,000 delivered in a test):
#: never more than 20.
MAX_INFLIGHT = 20

#: Of those, bulk messages take at most this many, so control ones never queue in paho.
BULK_INFLIGHT_MESSAGES = 16

#: A reload that reconnects waits this long for the broker to acknowledge what is in flight.
RELOAD_DRAIN_TIMEOUT = 5.0

#: Every counter ``bridge info`` shows under ``link``, zeros included: a counter that appears
#: only once it moved cannot be told apart from one that does not exist.
COUNTER_NAMES = (
    "connect_attempts", "connects", "connect_failures", "connect_refused", "auth_refused",
    "disconnects", "socket_errors", "published", "received", "inbound_redelivered",
    "inbound_oversized", "inbound_queued", "inbound_retained", "handler_errors",
    "outbox_refused", "dropped_qos0", "dropped_send_error", "dropped_invalid_topic",
    "dropped_at_close", "outbox_refused_control", "resent_unacknowledged",
    "acked_no_subscriber",
)


@dataclass
class _CatchUp:
    """The broker is handing over what it queued for us while we were away: everything it
    sends after a CONNACK with the session present and before it acknowledges our
    re-subscription (it sends the queue first; a broker's in-flight window can hold part
    of a large queue back past that point, see freshness.py)."""

    outage: Optional[float]  # seconds away (monotonic); None: this process never was connected
    subscribe_mids: set[int]
    messages: int = 0


@dataclass
class _Outgoing:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    on_sent: Optional[OnSent]
    bulk: bool = False


class _Lane:
    """Messages accepted but not yet handed to paho, with their totals for the limits."""

    def __init__(self) -> None:
        self.waiting: collections.deque[_Outgoing] = collections.deque()
        self.messages = 0  # accepted and not yet completed, waiting or in flight
        self.bytes = 0

    def full(self, size: int, max_messages: int, max_bytes: int) -> bool:
        return self.messages >= max_messages or self.bytes + size > max_bytes


class LinkClosed(Exception):
    pass


class MqttLink:
    """One MQTT connection with presence, reconnect, backoff and a bounded outbox."""

    def __init__(
        self,
        config: Config,
        on_message: MessageHandler,
        on_connected: Optional[Callable[[], None]] = None,
        subscriptions: Optional[list[tuple[str, int]]] = None,
        on_subscribers: Optional[SubscribersHandler] = None,
    ) -> None:
        self._config = config
        self._topics = Topics(config.router.id)
        self._on_message_handler = on_message
        self._on_connected = on_connected
        self._on_subscribers = on_subscribers
        self._unread_topics: set[str] = set()  # last acknowledged with "no subscribers"
        self._subscriptions = subscriptions if subscriptions is not None else [
            (self._topics.rpc_request, 1), (self._topics.x_in, 1)]
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._executor = concurrent.futures.ThreadPoolExecutor(1, "spotfi-connect")
        self._client: Optional[paho.Client] = None
        self._connected = False
        self._connecting = False  # reconnect() running in the executor
        self._handshake = False  # CONNECT sent, waiting for CONNACK
        self._closing = False
        self._sock_fd: Optional[int] = None
        self._writing = False
        # True while paho is running our callbacks: paho is not re-entrant there
        self._in_paho = False
        self._loop_thread: Optional[int] = None
        self._misc_timer: Optional[asyncio.TimerHandle] = None
        self._connack_timer: Optional[asyncio.TimerHandle] = None
        self._wake = asyncio.Event()
        self._connected_event = asyncio.Event()
        self._connected_since = 0.0
        self._attempt = 0
        self._down_since: Optional[float] = None  # when the current outage began
        # inbound: when the broker last sent us anything before the link went down, and
        # the queue it hands over after a reconnect
        self._lost_at: Optional[float] = None
        self._last_heard: Optional[float] = None  # monotonic: the broker's last packet
        self._catch_up: Optional[_CatchUp] = None
        self._last_outage: Optional[float] = None
        self._retained_logged: set[tuple[str, int]] = set()
        self._refused_streak = False
        self._failure_streak = 0
        self._last_error = ""
        self._progress_logged_at = 0.0  # when a line last said how connecting goes
        # outbox: accepted but not yet handed to paho (each lane's waiting queue) or not
        # yet acknowledged (inflight); terminal output never fills the control lane
        self._control = _Lane()
        self._bulk = _Lane()
        self._bulk_inflight_bytes = 0
        self._bulk_inflight = 0
        self._pumping = False
        self._drained: Optional[asyncio.Event] = None  # set while a reload waits for acks
        self._emptied: Optional[asyncio.Event] = None  # set while close() waits for a flush
        self._inflight: dict[int, _Outgoing] = {}
        self._early_acks: set[int] = set()
        self._recent_inbound: collections.OrderedDict[tuple[int, int, int], None] = \
            collections.OrderedDict()
        self._drop_logged_at = 0.0
        self._invalid_logged_at = 0.0
        # the next attempt goes out at once: a stable connection just ended, or the
        # settings changed; every other failure backs off first
        self._reconnect_now = False
        self.stats: dict[str, int] = collections.defaultdict(int, dict.fromkeys(COUNTER_NAMES, 0))

    # ------------------------------------------------------------------ public

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def topics(self) -> Topics:
        return self._topics

    def counters(self) -> dict[str, Any]:
        data: dict[str, Any] = dict(self.stats)
        data.update(connected=self._connected, outbox_messages=self._pending_msgs,
                    outbox_bytes=self._pending_bytes,
                    backlog=len(self._control.waiting) + len(self._bulk.waiting),
                    outbox_bulk_messages=self._bulk.messages,
                    outbox_bulk_bytes=self._bulk.bytes,
                    bulk_inflight_bytes=self._bulk_inflight_bytes)
        if self._connected:
            data["connected_for"] = round(time.monotonic() - self._connected_since, 1)
        if self._last_outage is not None:
            data["last_outage"] = round(self._last_outage, 1)
        return data

    @property
    def _pending_msgs(self) -> int:
        return self._control.messages + self._bulk.messages

    @property
    def _pending_bytes(self) -> int:
        return self._control.bytes + self._bulk.bytes

    def _is_bulk(self, topic: str) -> bool:
        """Terminal traffic is bulk: every topic but the router's own control topics."""
        topics = self._topics
        return topic not in (topics.status, topics.metrics, topics.rpc_response)

    async def wait_connected(self, timeout: Optional[float] = None) -> bool:
        try:
            await asyncio.wait_for(self._connected_event.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False,
                on_sent: Optional[OnSent] = None) -> bool:
        """See :class:`spotfi_bridge.publish.Publisher`.

        A topic MQTT cannot carry (:func:`~spotfi_bridge.protocol.topic_problem`) is given
        up on at once, so that it never costs the router its connection:
        counted, logged, ``on_sent`` called soon, and True returned (it is not a full
        outbox, so the caller must not wait and retry)."""
        problem = topic_problem(topic)
        if problem is not None:
            self._give_up_invalid(topic, problem, on_sent)
            return True
        mqtt = self._config.mqtt
        size = len(payload)
        bulk = self._is_bulk(topic)
        lane = self._bulk if bulk else self._control
        if lane.full(size, mqtt.outbox_max_messages, mqtt.outbox_max_bytes):
            self.stats["outbox_refused"] += 1
            if not bulk:
                self.stats["outbox_refused_control"] += 1
            now = time.monotonic()
            if now - self._drop_logged_at > 10:
                self._drop_logged_at = now
                log.warning("outbox full (%d messages, %d bytes): refused a message for %s "
                            "(%d refused so far)", self._pending_msgs, self._pending_bytes, topic,
                            self.stats["outbox_refused"])
            return False
        lane.messages += 1
        lane.bytes += size
        lane.waiting.append(_Outgoing(topic, payload, qos, retain, on_sent, bulk))
        self._pump()
        return True

    def _pump(self) -> None:
        """Hand waiting messages to paho: all control ones, bulk ones within the window."""
        if self._pumping:
            return  # an on_sent callback published: the loop below picks it up
        self._pumping = True
        window = self._config.mqtt.bulk_window_bytes
        try:
            while self._connected and self._drained is None:
                if self._control.waiting:
                    self._send(self._control.waiting.popleft())
                elif self._bulk.waiting and self._bulk_fits(window):
                    self._send(self._bulk.waiting.popleft())
                else:
                    break
        finally:
            self._pumping = False

    def _give_up_invalid(self, topic: str, problem: str, on_sent: Optional[OnSent]) -> None:
        self.stats["dropped_invalid_topic"] += 1
        now = time.monotonic()
        if now - self._invalid_logged_at > 10:
            self._invalid_logged_at = now
            log.warning("not published: %s: %r (%d such messages dropped so far)", problem,
                        topic[:200], self.stats["dropped_invalid_topic"])
        if on_sent is not None:
            if self._loop is not None:
                self._loop.call_soon(_call_safely, on_sent)
            else:
                _call_safely(on_sent)

    def _bulk_fits(self, window: int) -> bool:
        """Whether the next bulk message stays within the window (one always may go)."""
        if not self._bulk_inflight:
            return True
        return (self._bulk_inflight < BULK_INFLIGHT_MESSAGES and self._bulk_inflight_bytes
                + len(self._bulk.waiting[0].payload) <= window)

    def reconfigure(self, config: Config) -> bool:
        """Apply a reloaded config; returns True when a new connection is needed.

        The new connection is made once the broker has acknowledged what is in flight
        (bounded by :data:`RELOAD_DRAIN_TIMEOUT`) and the old one ended with DISCONNECT:
        nothing is sent twice, and the broker drops the Will, so no OFFLINE goes out."""
        reconnect = config.connection_settings() != self._config.connection_settings()
        self._config = config
        if reconnect:
            log.info("connection settings changed: reconnecting")
            old_topics = self._topics
            self._topics = Topics(config.router.id)
            if old_topics != self._topics:
                self._subscriptions = [(self._topics.rpc_request, 1), (self._topics.x_in, 1)]
            if self._connected and self._client is not None and self._loop is not None:
                if self._drained is None:
                    self._drained = asyncio.Event()
                    self._loop.create_task(self._drain_then_switch(self._client))
            else:
                self._switch_client()
        return reconnect

    async def _drain_then_switch(self, client: paho.Client) -> None:
        drained = self._drained
        assert drained is not None
        if self._inflight:
            try:
                await asyncio.wait_for(drained.wait(), RELOAD_DRAIN_TIMEOUT)
            except asyncio.TimeoutError:
                pass
        if self._drained is not drained:
            return  # close() took over: this connection is the last one
        self._drained = None
        if not self._is_current(client) or self._closing:
            return
        if self._connected:
            client.on_disconnect = None
            client.disconnect()  # the broker drops the Will: no OFFLINE between the two
            self._paho(client.loop_write, client, flush=False)
        self._switch_client()

    def _switch_client(self) -> None:
        """Start over with a client made from the current settings."""
        self._requeue_inflight()
        self._drop_client()
        self._attempt = 0
        self._reconnect_now = True
        self._wake.set()

    async def run(self) -> None:
        """Connect, and reconnect with backoff, until :meth:`close`."""
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        while not self._closing:
            if self._client is None:
                self._client = self._new_client()
            if not (self._connected or self._handshake):
                await self._connect_once()
            self._wake.clear()
            if self._closing:
                break
            if self._connected or self._handshake:
                await self._wake.wait()  # set when the connection ends, on reconfigure, on close
                self._wake.clear()
                if self._closing or self._connected or self._handshake:
                    continue
            if self._reconnect_now:
                self._reconnect_now = False
                continue
            # a refused or failed attempt, or a connection the broker dropped at once (a
            # packet it refuses, a session taken over by another client with our id):
            # never retried in a tight loop
            try:  # back off; a reconfigure or close cuts it short
                await asyncio.wait_for(self._wake.wait(), self._next_delay())
            except asyncio.TimeoutError:
                pass

    async def close(self, flush_timeout: float = 1.5) -> None:
        """Flush what is queued, then OFFLINE (retained), all bounded; disconnect.

        OFFLINE is a control message and would overtake terminal output: it waits until
        the sessions' last output and x-error went out, or half the time ran out. If the
        broker has not acknowledged OFFLINE in time (a slow link still full of output), the
        connection ends without DISCONNECT, so the broker publishes the Will, the same
        retained OFFLINE, instead of leaving the router ONLINE."""
        if self._closing:
            return
        offline_acknowledged = False
        drained, self._drained = self._drained, None
        if drained is not None:  # a reload was waiting to reconnect: this connection is the last
            drained.set()
            self._pump()
        if not self._connected and (self._handshake or self._connecting):
            # between two connections (a reload reconnecting): the old one ended with a clean
            # DISCONNECT, so no Will speaks for us; let the new one come up to say OFFLINE
            try:
                await asyncio.wait_for(self._connected_event.wait(), flush_timeout / 2)
            except asyncio.TimeoutError:
                pass
        if self._connected and self._client is not None:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + flush_timeout
            if self._pending_msgs:
                self._emptied = asyncio.Event()
                try:
                    await asyncio.wait_for(self._emptied.wait(), flush_timeout / 2)
                except asyncio.TimeoutError:
                    pass
                self._emptied = None
            done = asyncio.Event()
            self.publish(self._topics.status, STATUS_OFFLINE, 1, True, done.set)
            try:
                await asyncio.wait_for(done.wait(), max(0.05, deadline - loop.time()))
                offline_acknowledged = True
            except asyncio.TimeoutError:
                log.warning("shutdown: %d messages still unsent after %.1f s; leaving OFFLINE "
                            "to the Last Will", self._pending_msgs, flush_timeout)
        self._closing = True
        self._wake.set()
        if self._client is not None:
            if self._connected and offline_acknowledged:
                self._client.disconnect()
                self._client.loop_write()  # DISCONNECT now, so the broker skips the Will
            self._drop_client()
        self._executor.shutdown(wait=False)
        lost = self._pending_msgs
        if lost:
            self.stats["dropped_at_close"] += lost
            log.warning("shutdown: %d queued messages were not delivered", lost)

    # ------------------------------------------------------------------ client

    def _new_client(self) -> paho.Client:
        cfg = self._config
        client = mqtt_compat.new_client(f"router-{cfg.router.id}",
                                        clean_session=cfg.mqtt.clean_session,
                                        protocol=cfg.mqtt.protocol,
                                        transport=cfg.mqtt.broker.transport)
        client.username_pw_set(cfg.router.id, cfg.router.token)
        client.will_set(self._topics.status, STATUS_OFFLINE, qos=1, retain=True)
        client.max_inflight_messages_set(MAX_INFLIGHT)
        client.max_queued_messages_set(0)
        mqtt_compat.set_connect_timeout(client, cfg.mqtt.connect_timeout)
        if cfg.mqtt.broker.tls:
            tls = cfg.tls
            client.tls_set_context(mqtt_compat.tls_context(tls.ca_file, tls.cert_file,
                                                           tls.key_file, tls.insecure))
            if cfg.tls.insecure:
                client.tls_insecure_set(True)
        if cfg.mqtt.broker.transport == "websockets":
            client.ws_set_options(path=cfg.mqtt.broker.ws_path)
        mqtt_compat.bind_callbacks(client, on_connect=self._on_connect,
                                   on_disconnect=self._on_disconnect,
                                   on_message=None, on_publish=self._on_publish)
        client.on_message = self._on_paho_message  # it needs the DUP flag and the packet id
        client.on_subscribe = self._on_paho_subscribe  # (client, userdata, mid, ...) in every paho
        if cfg.mqtt.protocol == "5":
            mqtt_compat.watch_publish_acks(client, self._on_publish_ack)
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_socket_register_write
        client.on_socket_unregister_write = self._on_socket_unregister_write
        kwargs: dict[str, Any] = {}
        if cfg.mqtt.protocol == "5":
            kwargs["clean_start"] = cfg.mqtt.clean_session
            kwargs["properties"] = mqtt_compat.connect_properties("5", cfg.mqtt.clean_session)
        client.connect_async(cfg.mqtt.broker.host, cfg.mqtt.broker.port,
                             keepalive=cfg.mqtt.keepalive, **kwargs)
        return client

    def _drop_client(self) -> None:
        """Forget the current client and its socket (a new one is made on the next attempt)."""
        client, self._client = self._client, None
        was_connected = self._connected
        self._connected = self._handshake = False
        self._connected_event.clear()
        self._cancel_timers()
        self._unwatch_socket()
        if client is not None:
            client.on_disconnect = None
            client.on_socket_close = None
            sock = client.socket()
            if sock is not None:
                try:
                    sock.close()
                except OSError:
                    pass
        if was_connected:
            self.stats["disconnects"] += 1
            self._mark_lost()
        self._fail_unreliable()

    # ------------------------------------------------------------------ connecting

    async def _connect_once(self) -> None:
        assert self._loop is not None and self._client is not None
        client = self._client
        broker = self._config.mqtt.broker
        self._unwatch_socket()
        self._connecting = True
        self.stats["connect_attempts"] += 1
        mqtt_compat.keep_release_state(client)
        try:
            await self._loop.run_in_executor(self._executor, client.reconnect)
        except Exception as exc:
            self._connecting = False
            if client is not self._client:
                return
            self._connect_failed(f"cannot connect to {broker.host}:{broker.port}: "
                                 f"{mqtt_compat.describe_error(exc)}")
            return
        self._connecting = False
        if client is not self._client or self._closing:
            sock = client.socket()
            if sock is not None:
                sock.close()
            return
        # paho's on_socket_open ran in the executor; make sure the loop watches the socket
        self._handshake = True
        self._watch_socket(client)
        self._connack_timer = self._loop.call_later(self._config.mqtt.connect_timeout,
                                                    self._connack_timeout, client)
        self._on_readable()  # CONNACK may already be buffered (TLS)

    def _connack_timeout(self, client: paho.Client) -> None:
        if client is self._client and not self._connected:
            self._handshake = False
            self._connect_failed(f"no CONNACK within {self._config.mqtt.connect_timeout} s")
            self._reset_socket()

    def _connect_failed(self, reason: str) -> None:
        self.stats["connect_failures"] += 1
        self._failure_streak += 1
        self._last_error = reason
        if self._failure_streak == 1:
            log.warning("%s (attempt 1)", reason)
            self._progress_logged_at = time.monotonic()
        else:
            log.debug("%s (attempt %d)", reason, self._failure_streak)
        self._wake.set()

    def _next_delay(self) -> float:
        mqtt = self._config.mqtt
        now = time.monotonic()
        if self._down_since is None:
            self._down_since = now
        if self._refused_streak:
            first = max(AUTH_RETRY_MIN, mqtt.backoff_min)
            base = min(mqtt.backoff_max, first * (2 ** min(self._attempt, 16)))
            self._attempt += 1
        elif now - self._down_since < QUICK_RETRY_WINDOW:
            # a broker restart or a WAN flap is over in seconds: retry fast at first
            base = mqtt.backoff_min
        else:
            base = min(mqtt.backoff_max, mqtt.backoff_min * (2 ** min(self._attempt, 16)))
            self._attempt += 1
        delay: float = base * random.uniform(0.5, 1.0)
        log.debug("reconnecting in %.2f s", delay)
        # the line after the next attempt might come too late: say now that it goes on
        if self._failure_streak and (now + delay + mqtt.connect_timeout
                                     - self._progress_logged_at >= PROGRESS_LOG_INTERVAL):
            self._progress_logged_at = now
            log.info("still not connected to %s:%d after %d attempts (last error: %s); "
                     "next attempt in %.0f s", mqtt.broker.host, mqtt.broker.port,
                     self._failure_streak, self._last_error, delay)
        return delay

    def _on_connect(self, result: mqtt_compat.ConnectResult) -> None:
        assert self._loop is not None
        if self._connack_timer is not None:
            self._connack_timer.cancel()
            self._connack_timer = None
        self._handshake = False
        cfg = self._config
        if not result.ok:
            self.stats["connect_refused"] += 1
            if result.auth_refused:
                self.stats["auth_refused"] += 1
                self._last_error = f"bad token ({result.reason})"
                if not self._refused_streak:
                    log.error("broker refused router id %s: %s", cfg.router.id,
                              self._last_error)
                    self._refused_streak = True
                    self._attempt = 0
                    self._progress_logged_at = time.monotonic()
                self._failure_streak += 1
                self._wake.set()
            else:
                self._connect_failed(f"broker refused the connection: {result.reason}")
            return
        client = self._client
        assert client is not None
        self._connected = True
        self._connected_since = time.monotonic()
        self._refused_streak = False
        if self._failure_streak:
            log.info("connected to %s after %d failed attempts", cfg.mqtt.broker.host,
                     self._failure_streak)
        else:
            log.info("connected to %s:%d as router-%s (session present: %s)",
                     cfg.mqtt.broker.host, cfg.mqtt.broker.port, cfg.router.id,
                     result.session_present)
        self._failure_streak = 0
        self.stats["connects"] += 1
        self._early_acks.clear()
        # SUBSCRIBE before ONLINE: the broker handles them in order, so whoever reacts to
        # ONLINE with a request finds the subscriptions already in force
        mids = {mqtt_compat.subscribe_mid(client.subscribe(topic, qos))
                for topic, qos in self._subscriptions}
        self._start_catch_up(result.session_present, mids)
        self._control.messages += 1
        self._control.bytes += len(STATUS_ONLINE)
        self._send(_Outgoing(self._topics.status, STATUS_ONLINE, 1, True, None))
        # after paho has re-queued its unacknowledged messages (it does so when this
        # callback returns), so that what waited in the backlog goes out after them
        self._loop.call_soon(self._after_connect, client)

    def _after_connect(self, client: paho.Client) -> None:
        if client is not self._client or not self._connected:
            return
        self._connected_event.set()
        self._pump()
        self._schedule_misc()
        if self._on_connected is not None:
            try:
                self._on_connected()
            except Exception:
                log.exception("on_connected handler failed")

    def _on_disconnect(self, rc: int) -> None:
        was_connected = self._connected
        was_handshake = self._handshake
        self._handshake = False
        self._connected = False
        self._connected_event.clear()
        self._cancel_timers()
        if was_connected:
            self.stats["disconnects"] += 1
            self._mark_lost()
            lasted = time.monotonic() - self._connected_since
            if lasted >= self._config.mqtt.stable_after:
                self._attempt = 0
                self._down_since = None  # a new outage: fast retries again
                self._reconnect_now = True
            # else a flapping link stays in the outage it was in, and backs off
            if not self._closing:
                log.warning("connection lost (%s) after %.0f s; reconnecting",
                            mqtt_compat.error_string(rc) if rc else "closed", lasted)
            self._fail_unreliable()
        elif was_handshake and not self._closing:
            self._connect_failed("the broker closed the connection before its CONNACK")
        if was_connected or was_handshake:
            self._wake.set()
        if self._drained is not None:
            self._drained.set()  # a reload waiting for acknowledgements: they will not come

    def _fail_unreliable(self) -> None:
        """QoS 0 messages die with the connection: count them and release their owners."""
        lost = [mid for mid, entry in self._inflight.items() if entry.qos == 0]
        for mid in lost:
            self.stats["dropped_qos0"] += 1
            self._complete(self._inflight.pop(mid))
        if lost:
            log.warning("%d QoS 0 messages were lost with the connection", len(lost))

    def _requeue_inflight(self) -> None:
        """A new client does not know the old one's unacknowledged messages: resend them.

        The broker may already have some of them (the reload could not wait for their
        acknowledgement): those are counted as ``resent_unacknowledged``."""
        entries = [e for e in self._inflight.values() if e.qos > 0]
        self._inflight = {mid: e for mid, e in self._inflight.items() if e.qos == 0}
        if entries:
            self.stats["resent_unacknowledged"] += len(entries)
            log.warning("%d messages the broker had not acknowledged are sent again by the "
                        "new connection: the broker may forward them twice", len(entries))
        for entry in reversed(entries):
            if entry.bulk:
                self._bulk_inflight_bytes -= len(entry.payload)
                self._bulk_inflight -= 1
            (self._bulk if entry.bulk else self._control).waiting.appendleft(entry)

    # ------------------------------------------------------------------ sending

    def _send(self, entry: _Outgoing) -> None:
        client = self._client
        assert client is not None
        if entry.bulk:  # until _complete
            self._bulk_inflight_bytes += len(entry.payload)
            self._bulk_inflight += 1
        try:
            info = self._queue_in_paho(client, entry)
        except (ValueError, TypeError, UnicodeError) as exc:  # paho refuses before queueing
            self.stats["dropped_send_error"] += 1
            log.warning("publish to %r refused by paho: %s", entry.topic[:200], exc)
            self._complete(entry)
            return
        rc = mqtt_compat.publish_rc(info)
        mid = mqtt_compat.message_mid(info)
        if rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN) or (
                rc == paho.MQTT_ERR_NO_CONN and entry.qos == 0):
            self.stats["dropped_send_error"] += 1
            log.warning("publish to %s failed: %s", entry.topic, mqtt_compat.error_string(rc))
            self._complete(entry)
            return
        self.stats["published"] += 1
        if mid in self._early_acks:
            self._early_acks.discard(mid)
            self._complete(entry)
        else:
            self._inflight[mid] = entry
        if not self._in_paho:
            # write now rather than one loop turn later: a keystroke echo is latency-bound
            self._flush(client)

    def _queue_in_paho(self, client: paho.Client, entry: _Outgoing) -> Any:
        """``client.publish``, whose bytes :meth:`_send` (or the paho step we are in) then
        writes inline: meanwhile paho's register-write hook must not add a writer, which
        would cost two ``epoll_ctl`` calls per message."""
        outer, self._in_paho = self._in_paho, True
        try:
            return client.publish(entry.topic, entry.payload, qos=entry.qos, retain=entry.retain)
        finally:
            self._in_paho = outer

    def _on_publish(self, mid: int) -> None:
        entry = self._inflight.pop(mid, None)
        if entry is None:
            # paho can report a QoS 0 write before publish() returned its mid
            self._early_acks.add(mid)
            return
        self._complete(entry)

    def _on_publish_ack(self, mid: int, code: int) -> None:
        """Report whether terminal output on a topic has a reader (MQTT 5 reason codes)."""
        entry = self._inflight.get(mid)
        if entry is None or not entry.bulk or self._on_subscribers is None:
            return
        unread = code == mqtt_compat.NO_MATCHING_SUBSCRIBERS
        if unread:
            self.stats["acked_no_subscriber"] += 1
            self._unread_topics.add(entry.topic)
        elif entry.topic in self._unread_topics:
            self._unread_topics.discard(entry.topic)
        else:
            return
        try:
            self._on_subscribers(entry.topic, not unread)
        except Exception:
            log.exception("subscribers handler failed")

    def _complete(self, entry: _Outgoing) -> None:
        size = len(entry.payload)
        lane = self._bulk if entry.bulk else self._control
        lane.messages -= 1
        lane.bytes -= size
        if entry.bulk:
            self._bulk_inflight_bytes -= size
            self._bulk_inflight -= 1
        if self._drained is not None and not self._inflight:
            self._drained.set()
        if self._emptied is not None and not self._pending_msgs:
            self._emptied.set()
        if entry.on_sent is not None:
            try:
                entry.on_sent()
            except Exception:
                log.exception("on_sent callback failed")
        self._pump()

    # ------------------------------------------------------------------ receiving

    def _mark_lost(self) -> None:
        """The connection ended: the outage began when the broker last sent us anything
        (a black hole or a stopped process is noticed only later)."""
        self._catch_up = None
        if self._lost_at is not None:
            return  # a connection that flapped: the outage goes on from the first loss
        now = time.monotonic()
        heard = self._last_heard
        self._lost_at = now if heard is None else min(now, heard)

    def _start_catch_up(self, session_present: bool, subscribe_mids: set[int]) -> None:
        now = time.monotonic()
        outage = None if self._lost_at is None else now - self._lost_at
        self._lost_at = None
        self._last_outage = outage
        if session_present:
            self._catch_up = _CatchUp(outage, subscribe_mids)
        else:  # a new session: the broker kept nothing for us
            self._catch_up = None

    def _on_paho_subscribe(self, _client: Any, _userdata: Any, mid: int, *_rest: Any) -> None:
        catch_up = self._catch_up
        if catch_up is None:
            return
        catch_up.subscribe_mids.discard(mid)
        if catch_up.subscribe_mids:
            return
        self._catch_up = None
        if catch_up.messages:
            away = "an unknown time" if catch_up.outage is None else f"{catch_up.outage:.1f} s"
            log.info("received %d messages the broker queued while the link was away (%s)",
                     catch_up.messages, away)

    def _on_paho_message(self, _client: Any, _userdata: Any, message: Any) -> None:
        self._on_message(message.topic, message.payload, message.qos, bool(message.retain),
                         bool(message.dup), int(message.mid))

    def _redelivered(self, payload: bytes, dup: bool, mid: int) -> bool:
        """Whether a QoS 1 message is the broker's resend of one already handled.

        QoS 1 is at least once: when our PUBACK is lost with the connection, the broker
        sends the message again after the reconnect, with the DUP flag and its original
        packet id. Handled twice, a keystroke would be typed twice. A resend is recognised
        by DUP plus (packet id, payload) among the recent deliveries; a first delivery
        (DUP clear) is always handled, so identical keystrokes typed twice are not lost.
        """
        key = (mid, zlib.crc32(payload), len(payload))
        if dup and key in self._recent_inbound:
            return True
        self._recent_inbound[key] = None
        self._recent_inbound.move_to_end(key)
        while len(self._recent_inbound) > RECENT_INBOUND:
            self._recent_inbound.popitem(last=False)
        return False

    def _on_message(self, topic: str, payload: bytes, qos: int, retain: bool,
                    dup: bool = False, mid: int = 0) -> None:
        self.stats["received"] += 1
        if retain:
            self._ignore_retained(topic, payload)
            return
        if qos > 0 and self._redelivered(payload, dup, mid):
            self.stats["inbound_redelivered"] += 1
            log.info("ignored the broker's resend of a message already handled on %s "
                     "(packet id %d)", topic, mid)
            return
        limit = self._config.mqtt.max_inbound_bytes
        if len(payload) > limit:
            self.stats["inbound_oversized"] += 1
            log.warning("rejected a %d-byte message on %s: over max_inbound_bytes (%d)",
                        len(payload), topic, limit)
            return
        catch_up = self._catch_up
        if catch_up is not None:
            catch_up.messages += 1
            self.stats["inbound_queued"] += 1
            delivery = Delivery(queued=True, outage=catch_up.outage)
        else:
            delivery = Delivery()
        try:
            self._on_message_handler(topic, payload, delivery)
        except Exception:
            self.stats["handler_errors"] += 1
            log.exception("handler failed for a message on %s", topic)

    def _ignore_retained(self, topic: str, payload: bytes) -> None:
        """A command must never be retained: the broker would hand it over at every
        (re)subscription, and a retained reboot is a boot loop. A message forwarded live
        carries retain=0 (MQTT 3.1.1; MQTT 5 without retain-as-published), so retain=1
        means the broker's stored copy."""
        self.stats["inbound_retained"] += 1
        key = (topic, zlib.crc32(payload))
        if key in self._retained_logged:
            return
        if len(self._retained_logged) < RECENT_INBOUND:
            self._retained_logged.add(key)
        log.warning("ignored a retained message on %s (%d bytes): commands are never taken "
                    "from retained messages; clear it with an empty retained publish",
                    topic, len(payload))

    # ------------------------------------------------------------------ socket on the loop

    def _in_loop(self, callback: Callable[[], None]) -> None:
        """Run a paho socket hook, unless paho calls it from the connect thread.

        During ``reconnect()`` (in the executor) the loop already stopped watching the
        old socket, and :meth:`_connect_once` starts watching the new one when it
        returns; acting on those calls from the other thread would race with that.
        """
        if threading.get_ident() == self._loop_thread:  # no syscall, unlike get_running_loop
            callback()

    def _on_socket_open(self, client: Any, userdata: Any, sock: Any) -> None:
        mqtt_compat.set_nodelay(sock)

    def _watch_socket(self, client: paho.Client) -> None:
        sock = client.socket()
        if sock is None or self._loop is None:
            return
        fd = sock.fileno()
        if fd == self._sock_fd:
            return
        self._unwatch_socket()
        self._sock_fd = fd
        self._loop.add_reader(fd, self._on_readable)
        if client.want_write():
            self._start_writing()

    def _unwatch_socket(self) -> None:
        if self._loop is None or self._sock_fd is None:
            return
        self._loop.remove_reader(self._sock_fd)
        if self._writing:
            self._loop.remove_writer(self._sock_fd)
            self._writing = False
        self._sock_fd = None

    def _on_socket_close(self, client: Any, userdata: Any, sock: Any) -> None:
        self._in_loop(self._unwatch_socket)

    def _on_socket_register_write(self, client: Any, userdata: Any, sock: Any) -> None:
        # Inside a paho step or a publish the bytes are written inline right after it
        # (_paho, _send): a writer is only added when the socket is full. That saves
        # two epoll_ctl calls and a loop turn per packet.
        if not self._in_paho:
            self._in_loop(self._start_writing)

    def _on_socket_unregister_write(self, client: Any, userdata: Any, sock: Any) -> None:
        self._in_loop(self._stop_writing)

    def _start_writing(self) -> None:
        if self._loop is None or self._sock_fd is None or self._writing or self._connecting:
            return
        self._writing = True
        self._loop.add_writer(self._sock_fd, self._on_writable)

    def _stop_writing(self) -> None:
        if self._loop is None or self._sock_fd is None or not self._writing:
            return
        self._writing = False
        self._loop.remove_writer(self._sock_fd)

    def _is_current(self, client: paho.Client) -> bool:
        return client is self._client

    def _paho(self, step: Callable[[], Any], client: paho.Client, flush: bool = True) -> bool:
        """Run one paho loop step, marking that its callbacks must not re-enter it; then
        write what it queued (PUBACKs, replies) in the same turn. False if the socket died."""
        outer, self._in_paho = self._in_paho, True
        failure: Optional[BaseException] = None
        try:
            step()
        except (OSError, ValueError) as exc:
            # paho lets some socket errors out (a TLS alert after the handshake, such as
            # "certificate required"): the connection is dead, and is treated so
            failure = exc
        finally:
            self._in_paho = outer
        if failure is not None:
            self._socket_failed(client, failure)
            return False
        if flush and not outer and self._is_current(client):
            self._flush(client)
        return True

    def _flush(self, client: paho.Client) -> None:
        """Write queued packets now; watch for writability only if the socket is full."""
        if not client.want_write():
            return
        if (self._paho(client.loop_write, client, flush=False) and client.want_write()
                and self._is_current(client)):
            self._start_writing()

    def _socket_failed(self, client: paho.Client, exc: BaseException) -> None:
        if not self._is_current(client):
            return
        self.stats["socket_errors"] += 1
        reason = mqtt_compat.describe_error(exc)
        self._unwatch_socket()
        sock = client.socket()
        if sock is not None:
            try:
                sock.close()  # paho's next reconnect() starts from a fresh socket
            except OSError:
                pass
        if self._handshake and not self._connected:
            self._handshake = False
            self._cancel_timers()
            self._connect_failed(f"connection failed during the handshake: {reason}")
        else:
            log.warning("connection error: %s", reason)
            self._on_disconnect(paho.MQTT_ERR_CONN_LOST)

    def _on_readable(self) -> None:
        client = self._client
        if client is None or self._connecting:
            return
        if not self._read(client):
            return
        sock = client.socket()
        # TLS may hold decrypted bytes that the socket no longer signals
        while sock is not None and _pending(sock) and self._is_current(client):
            if not self._read(client):
                return
            sock = client.socket()

    def _read(self, client: paho.Client) -> bool:
        """One paho read step; notes when a packet from the broker last came in (paho's own
        ``_last_msg_in`` also moves when it sends a PINGREQ, so it alone cannot say)."""
        before = _last_msg_in(client)
        ok = self._paho(lambda: client.loop_read(max_packets=256), client)
        after = _last_msg_in(client)
        if after is not None and after != before:
            self._last_heard = after
        return ok

    def _on_writable(self) -> None:
        client = self._client
        if client is None:
            return
        self._paho(client.loop_write, client)
        if not client.want_write() and self._is_current(client):
            self._stop_writing()

    def _reset_socket(self) -> None:
        """Make paho notice a dead connection through its normal read path."""
        client = self._client
        sock = client.socket() if client is not None else None
        if sock is None:
            self._wake.set()
            return
        try:
            raw = getattr(sock, "_socket", sock)
            raw.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._on_readable()

    # ------------------------------------------------------------------ keepalive

    def _schedule_misc(self) -> None:
        if self._loop is None:
            return
        if self._misc_timer is not None:
            self._misc_timer.cancel()
        self._misc_timer = self._loop.call_later(self._misc_delay(), self._misc)

    def _misc_delay(self) -> float:
        """Seconds until paho's keepalive check has something to do."""
        keepalive = float(self._config.mqtt.keepalive)
        client = self._client
        try:
            last_in = float(client._last_msg_in)  # type: ignore[union-attr]
            last_out = float(client._last_msg_out)  # type: ignore[union-attr]
        except (AttributeError, TypeError, ValueError):
            return keepalive / 2
        deadline: float = min(last_in, last_out) + keepalive
        return max(0.05, deadline - time.monotonic() + 0.02)

    def _misc(self) -> None:
        self._misc_timer = None
        client = self._client
        if client is None or not self._connected:
            return
        self._paho(client.loop_misc, client)
        if self._is_current(client) and self._connected:
            self._schedule_misc()

    def _cancel_timers(self) -> None:
        for timer in (self._misc_timer, self._connack_timer):
            if timer is not None:
                timer.cancel()
        self._misc_timer = self._connack_timer = None


def _call_safely(callback: Callable[[], None]) -> None:
    try:
        callback()
    except Exception:
        log.exception("on_sent callback failed")


def _running_loop() -> Optional[asyncio.AbstractEventLoop]:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _last_msg_in(client: paho.Client) -> Optional[float]:
    try:
        return float(client._last_msg_in)  # type: ignore[attr-defined]
    except (AttributeError, TypeError, ValueError):
        return None


def _pending(sock: Any) -> bool:
    pending = getattr(sock, "pending", None)
    try:
        return bool(pending()) if pending is not None else False
    except (OSError, ValueError):
        return False
