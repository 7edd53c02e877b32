"""SessionManager: terminal sessions by id, their limits, and where their output goes.

Every ``x/in`` payload comes through :meth:`SessionManager.handle`. Replies that
belong to no live session (refused ``responseTopic``, unknown session, malformed
message) go to the router's own ``x/out`` and never to a session's topic: the API
closes a browser's terminal on any ``x-error`` it sees there.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import Any, Optional

from spotfi_bridge import protocol
from spotfi_bridge.config import TerminalConfig
from spotfi_bridge.freshness import Delivery, Freshness
from spotfi_bridge.protocol import Topics, XData, XParseError, XResize, XStart, XStop
from spotfi_bridge.publish import Publisher
from spotfi_bridge.terminal.session import KILL_GRACE, PtySession
from spotfi_bridge.terminal.shell import shell_spec

log = logging.getLogger("spotfi_bridge.terminal")

#: Seconds the processes of a session get to exit after SIGHUP at shutdown (or a router id
#: change) before SIGKILL: the daemon gives the terminal part half of its shutdown budget,
#: which must fit in procd's term_timeout.
SHUTDOWN_GRACE = 0.8
#: Ended session ids remembered so a redelivered ``x-start`` does not respawn them.
RECENTLY_ENDED = 256
COUNTERS = (
    "started", "ended", "exited", "stopped", "idle_closed", "shutdown_closed",
    "refused_limit", "refused_ended", "spawn_failed", "duplicate_start", "unknown_session",
    "stop_unknown", "bad_data", "bad_topic", "bad_resize", "bad_message", "input_dropped",
    "publish_refused", "internal_error", "expired", "no_subscriber_closed",
)


def _short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


class SessionManager:
    def __init__(self, config: TerminalConfig, publish: Publisher, topics: Topics, *,
                 kill_grace: float = KILL_GRACE, freshness: Optional[Freshness] = None) -> None:
        """``freshness`` judges ``x-start`` ages (the daemon shares one with RPC)."""
        self._config = config
        self._freshness = freshness or Freshness(0.0)
        self._publish = publish
        self._topics = topics
        self._kill_grace = kill_grace
        self._sessions: dict[str, PtySession] = {}
        self._closing: set[PtySession] = set()
        self._recently_ended: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._counters = dict.fromkeys(COUNTERS, 0)
        self._idle_handle: Optional[asyncio.TimerHandle] = None
        self._idle_at = 0.0
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._unread_since: dict[str, float] = {}  # topic → first "no subscribers" ack

    # ------------------------------------------------------------------ the daemon's API

    def handle(self, payload: bytes, delivery: Optional[Delivery] = None) -> None:
        """One ``x/in`` message. Never raises: a bug here must not take the link down."""
        try:
            self._handle(payload, delivery or Delivery())
        except Exception:
            self._counters["internal_error"] += 1
            log.exception("terminal: internal error handling an x/in message")

    def sessions(self) -> list[dict[str, Any]]:
        now = self._now()
        return [{
            "id": s.id,
            "pid": s.pid,
            "responseTopic": s.topic,
            "cols": s.cols,
            "rows": s.rows,
            "age": round(now - s.started_at, 3),
            "idle": round(now - s.last_input, 3),
            "bytesIn": s.bytes_in,
            "bytesOut": s.bytes_out,
            "seq": s.seq,
            "buffered": s.buffered,
            "maxBuffered": s.max_buffered,
            "paused": s.paused,
            "shell": list(s.spec.argv),
        } for s in self._sessions.values()]

    def counters(self) -> dict[str, int]:
        counters = dict(self._counters)
        live = list(self._sessions.values()) + list(self._closing)
        counters["publish_refused"] += sum(s.publish_refused for s in live)
        counters["active"] = len(self._sessions)
        counters["closing"] = len(self._closing)
        return counters

    def __len__(self) -> int:
        return len(self._sessions)

    def reconfigure(self, config: TerminalConfig) -> None:
        """SIGHUP: the new limits apply to sessions started from now on."""
        self._config = config

    async def shutdown(self, reason: str = "bridge shutting down", *,
                       grace: float = SHUTDOWN_GRACE) -> None:
        """``x-error`` to every session, SIGHUP, SIGKILL after ``grace``; about grace + 0.3 s.

        The ``x-error`` messages are handed to the publisher before the first await, and
        if the caller's own timeout cancels this, whatever is left is SIGKILLed anyway.
        """
        if self._idle_handle is not None:
            self._idle_handle.cancel()
            self._idle_handle = None
        for session in list(self._sessions.values()):
            session.end(reason, "shutdown")
        try:
            if not await self._wait_closed(grace):
                for session in list(self._closing):
                    log.warning("terminal session %r: shell (pid %d) still running at "
                                "shutdown: SIGKILL", session.id, session.pid)
                    session.force_close()
                await self._wait_closed(0.3)
        finally:
            for session in list(self._closing):
                session.force_close()

    async def _wait_closed(self, timeout: float) -> bool:
        """Whether every ending session closed within ``timeout`` seconds."""
        waiting = [session for session in self._closing if not session.closed]
        if not waiting:
            return True
        loop = self._get_loop()
        tasks = [loop.create_task(session.wait_closed()) for session in waiting]
        try:
            _, not_done = await asyncio.wait(tasks, timeout=timeout)
        finally:  # also when the caller cancels us: leave no task behind
            for task in tasks:
                task.cancel()
        return not not_done

    # ------------------------------------------------------------------ dispatch

    def _handle(self, payload: bytes, delivery: Delivery) -> None:
        message = protocol.parse_x_message(payload)
        if isinstance(message, XParseError):
            self._bad_message(payload, message)
        elif isinstance(message, XData):
            session = self._sessions.get(message.session_id)
            if session is None:
                self._unknown(message.session_id, "x-data")
            elif not session.write(message.data):
                self._counters["input_dropped"] += 1
        elif isinstance(message, XStart):
            self._start(message, delivery)
        elif isinstance(message, XResize):
            session = self._sessions.get(message.session_id)
            if session is None:
                self._unknown(message.session_id, "x-resize")
            else:
                session.resize(message.cols, message.rows)
                log.debug("terminal session %r: window %dx%d", session.id, message.cols,
                          message.rows)
        elif isinstance(message, XStop):
            session = self._sessions.get(message.session_id)
            if session is None:
                self._counters["stop_unknown"] += 1
                log.debug("terminal: x-stop for %r, which is not open", message.session_id)
            else:
                session.stop()

    def _start(self, message: XStart, delivery: Delivery) -> None:
        session_id = message.session_id
        topic = self._topics.x_out if message.response_topic is None else message.response_topic
        problem = self._topics.response_topic_problem(topic)
        if problem is not None:
            self._counters["bad_topic"] += 1
            log.warning("terminal: x-start %r refused: responseTopic %r: %s", session_id,
                        _short(topic), problem)
            self._reply(self._topics.x_out, protocol.x_error(
                session_id, f"refused responseTopic {_short(topic)!r}: {problem}",
                reason="bad-topic"))
            return
        existing = self._sessions.get(session_id)
        if existing is not None:
            self._counters["duplicate_start"] += 1
            log.info("terminal session %r: x-start repeated; session already open",
                     session_id)
            existing.send_started()
            return
        late = self._freshness.judge(message.sent_at, None, self._config.start_max_age, delivery)
        if late is not None:
            self._counters["expired"] += 1
            log.warning("terminal: x-start %r expired, no shell started: %s", session_id,
                        late.detail)
            self._reply(topic, protocol.x_error(session_id, f"expired: {late.detail}",
                                                reason="expired", **late.as_result()))
            return
        if session_id in self._recently_ended:
            self._counters["refused_ended"] += 1
            log.info("terminal: x-start %r refused: that session already ended", session_id)
            self._reply(topic, protocol.x_error(session_id, "session already ended",
                                                reason="ended"))
            return
        config = self._config
        if len(self._sessions) >= config.max_sessions:
            self._counters["refused_limit"] += 1
            log.warning("terminal: x-start %r refused: too many sessions (%d)", session_id,
                        config.max_sessions)
            self._reply(topic, protocol.x_error(
                session_id, f"too many sessions ({config.max_sessions})", reason="limit"))
            return
        spec = shell_spec(config)
        session = PtySession(session_id, topic, config, self._publish, spec,
                             cols=message.cols, rows=message.rows, on_end=self._on_end,
                             on_closed=self._on_closed, kill_grace=self._kill_grace, loop=self._get_loop())
        try:
            session.start()
        except Exception as exc:  # OSError, FileNotFoundError, ptyprocess' own errors
            self._counters["spawn_failed"] += 1
            log.error("terminal: x-start %r: cannot start %s: %s", session_id,
                      " ".join(spec.argv), exc)
            self._reply(topic, protocol.x_error(session_id, f"cannot start shell: {exc}",
                                                reason="spawn"))
            return
        self._sessions[session_id] = session
        self._counters["started"] += 1
        log.info("terminal session %r started: pid %d, %s, %dx%d, output to %s", session_id,
                 session.pid, " ".join(spec.argv), message.cols, message.rows, topic)
        self._schedule_idle(session.last_input + config.idle_timeout)

    def _on_end(self, session: PtySession, reason: str) -> None:
        if self._sessions.get(session.id) is session:
            del self._sessions[session.id]
        self._recently_ended[session.id] = None
        while len(self._recently_ended) > RECENTLY_ENDED:
            self._recently_ended.popitem(last=False)
        self._counters["ended"] += 1
        key = {"exit": "exited", "stop": "stopped", "idle": "idle_closed",
               "shutdown": "shutdown_closed"}.get(reason)
        if key:
            self._counters[key] += 1
        if not session.closed:
            self._closing.add(session)
        if not self._sessions and self._idle_handle is not None:
            self._idle_handle.cancel()  # nothing left to sweep: an idle bridge stays asleep
            self._idle_handle = None
        detail = ""
        if reason == "exit" and session.exit_code is not None:
            detail = f", exit status {session.exit_code}"
        log.info("terminal session %r ended (%s%s) after %.1f s: %d bytes in, %d bytes out, "
                 "%d messages", session.id, reason, detail, self._now() - session.started_at,
                 session.bytes_in, session.bytes_out, session.seq)

    def _on_closed(self, session: PtySession) -> None:
        """Reaped, fds closed, every message handed over: keep only its counts."""
        self._closing.discard(session)
        self._counters["publish_refused"] += session.publish_refused

    def subscribers(self, topic: str, present: bool) -> None:
        """The link's MQTT 5 report on ``topic``: output nobody reads for
        ``no_subscriber_timeout`` (an API instance that died without x-stop) ends its
        sessions with reason ``no-subscriber``."""
        if present:
            self._unread_since.pop(topic, None)
            return
        now = self._now()
        since = self._unread_since.setdefault(topic, now)
        timeout = self._config.no_subscriber_timeout
        if now - since < timeout:
            return
        del self._unread_since[topic]
        for session in [s for s in self._sessions.values() if s.topic == topic]:
            self._counters["no_subscriber_closed"] += 1
            log.warning("terminal session %r: no subscriber on %s for %g s: ending it",
                        session.id, topic, timeout)
            session.end(f"no subscriber for the output for {timeout:g} s: closed",
                        "no-subscriber")

    # ------------------------------------------------------------------ bad input

    def _bad_message(self, payload: bytes, error: XParseError) -> None:
        obj = protocol.decode_object(payload)
        kind = obj.get("type") if isinstance(obj, dict) else None
        session_id = error.session_id
        if kind == "x-data" and session_id is not None:
            # Never an x-error here: the API would close the operator's terminal.
            self._counters["bad_data"] += 1
            log.warning("terminal session %r: x-data dropped: %s", session_id, error.error)
            return
        if kind == "x-resize" and session_id is not None:
            self._counters["bad_resize"] += 1
            log.warning("terminal session %r: x-resize ignored: %s", session_id, error.error)
            session = self._sessions.get(session_id)
            if session is None or session.topic != self._topics.x_out:
                self._reply(self._topics.x_out, protocol.x_error(
                    session_id, f"x-resize ignored: {error.error}", reason="bad-request"))
            return
        self._counters["bad_message"] += 1
        log.warning("terminal: bad x/in message (session %r): %s", session_id, error.error)
        topic = self._topics.x_out
        if (kind == "x-start" and error.response_topic is not None
                and self._topics.response_topic_problem(error.response_topic) is None):
            topic = error.response_topic
        live = self._sessions.get(session_id) if session_id is not None else None
        if kind == "x-start" or live is None or live.topic != topic:
            # (a live session whose own topic this is would be closed by the API)
            self._reply(topic, protocol.x_error(session_id, error.error, reason="bad-request"))

    def _unknown(self, session_id: str, kind: str) -> None:
        self._counters["unknown_session"] += 1
        log.info("terminal: %s for unknown session %r", kind, session_id)
        self._reply(self._topics.x_out, protocol.x_error(session_id, "unknown session",
                                                        reason="unknown-session"))

    def _reply(self, topic: str, payload: bytes) -> None:
        if not self._publish(topic, payload, qos=self._config.qos, retain=False):
            self._counters["publish_refused"] += 1
            log.warning("terminal: reply to %s refused by the link (outbox full)", topic)

    # ------------------------------------------------------------------ idle sweep

    def _schedule_idle(self, when: float) -> None:
        """One timer at the earliest idle deadline; never a periodic tick."""
        if self._idle_handle is not None:
            if self._idle_at <= when:
                return
            self._idle_handle.cancel()
        self._idle_at = when
        self._idle_handle = self._get_loop().call_at(when, self._idle_sweep)

    def _idle_sweep(self) -> None:
        self._idle_handle = None
        now = self._now()
        next_at: Optional[float] = None
        for session in list(self._sessions.values()):
            timeout = session.config.idle_timeout
            deadline = session.last_input + timeout
            if deadline <= now + 0.001:
                log.info("terminal session %r: no input for %g s", session.id, timeout)
                session.end(f"session idle (no input) for {timeout:g} s: closed", "idle",
                            idleTimeout=timeout)
            elif next_at is None or deadline < next_at:
                next_at = deadline
        if next_at is not None:
            self._schedule_idle(next_at)

    # ------------------------------------------------------------------ helpers

    def _get_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    def _now(self) -> float:
        return self._get_loop().time() if self._loop is not None else 0.0
