"""RPC requests in, exactly one ``rpc-result`` per request id out.

Order of checks for each ``rpc/request`` payload: parse (a reply for every
readable id, even out of broken JSON), dedup by id (at-least-once delivery),
expiry, policy, then the ``bridge`` object in-process or a backend call behind
the concurrency limit and its bounded queue. Everything refused is counted and
logged; nothing raises into the loop.
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import logging
import math
import re
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Iterable, Mapping, Optional

from spotfi_bridge.config import RpcConfig
from spotfi_bridge.freshness import Delivery, Freshness
from spotfi_bridge.protocol import (
    ParseError,
    RpcRequest,
    id_sent_at,
    parse_iso8601,
    parse_rpc_request,
    rpc_error,
    rpc_success,
)
from spotfi_bridge.publish import Publisher
from spotfi_bridge.rpc import bridge_ns
from spotfi_bridge.rpc.backend import Backend, Call, Outcome
from spotfi_bridge.rpc.compat import CompatBackend
from spotfi_bridge.rpc.dedup import DedupTable, id_key

logger = logging.getLogger("spotfi_bridge.rpc")

BRIDGE_OBJECT = "bridge"
#: the one ``bridge`` method that runs as a job (it downloads): the others answer at once
BRIDGE_UPDATE = "update"
ERROR_BUSY = "busy"
ERROR_EXPIRED = "expired"
ERROR_SHUTDOWN = "cancelled: bridge shutting down"

COUNTER_NAMES = (
    "requests", "ok", "errors", "invalid", "unroutable", "duplicates", "expired", "denied",
    "busy", "timeouts", "truncated", "too_large", "publish_refused", "internal",
)

# An "id" in a payload that is not JSON: answering it beats leaving the API waiting 30 s.
_SALVAGE_ID = re.compile(
    r'"id"\s*:\s*("(?:[^"\\\x00-\x1f]|\\.){0,1024}"|-?\d{1,30}(?:\.\d{1,30})?(?:[eE][+-]?\d{1,4})?)')
def salvage_id(payload: bytes) -> Any:
    """The ``id`` of a payload that is not JSON at all, when one can be read."""
    try:
        json.loads(payload)
        return None  # valid JSON: a missing or unusable id really is missing
    except (ValueError, RecursionError):
        pass
    match = _SALVAGE_ID.search(payload.decode("utf-8", errors="replace"))
    if not match:
        return None
    try:
        return json.loads(match.group(1))
    except ValueError:
        return None


def routable(req_id: Any) -> bool:
    """Whether a reply can carry ``req_id`` back as valid JSON the API can match."""
    if req_id is None or isinstance(req_id, bool):
        return False
    if isinstance(req_id, float):
        return math.isfinite(req_id)
    if isinstance(req_id, str):
        try:
            req_id.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogate: no UTF-8 reply can echo it
            return False
        return True
    return isinstance(req_id, int)


def _scrub(value: Any) -> Any:
    """``value`` with strings made UTF-8 encodable (a backend may hand back lone surrogates)."""
    if isinstance(value, str):
        return value.encode("utf-8", errors="replace").decode("utf-8")
    if isinstance(value, dict):
        return {_scrub(key): _scrub(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_scrub(item) for item in value]
    return value


def outcome_reply(req_id: Any, outcome: Outcome) -> bytes:
    extra: dict[str, Any] = {}
    if outcome.truncated:
        extra["truncated"] = True
    if outcome.ok:
        if outcome.stderr:
            extra["stderr"] = outcome.stderr
        return rpc_success(req_id, outcome.result, **extra)
    if outcome.exit_code is not None:
        extra["exitCode"] = outcome.exit_code
    if outcome.signal is not None:
        extra["signal"] = outcome.signal
    return rpc_error(req_id, outcome.error or "error", result=outcome.result,
                     stderr=outcome.stderr or None, **extra)


def _show_id(req_id: Any) -> str:
    text = repr(req_id)
    return text if len(text) <= 80 else text[:77] + "..."


@dataclass(eq=False)
class _Job:
    key: str
    request: RpcRequest
    call: Call
    delivery: Delivery
    task: Optional[asyncio.Task[None]] = None
    answered: bool = False


def _no_info() -> dict[str, Any]:
    return {}


def _no_sessions() -> list[dict[str, Any]]:
    return []


def _no_secrets() -> Iterable[str]:
    return ()


#: ``bridge update``: (args, timeout) -> outcome
Updater = Callable[[Mapping[str, Any], float], Awaitable[Outcome]]


class RpcExecutor:
    def __init__(
        self,
        config: RpcConfig,
        publish: Publisher,
        response_topic: str,
        backend: Backend,
        info: Callable[[], dict[str, Any]] = _no_info,
        sessions: Callable[[], list[dict[str, Any]]] = _no_sessions,
        *,
        secrets: Callable[[], Iterable[str]] = _no_secrets,
        update: Optional[Updater] = None,
        clock: Callable[[], float] = time.time,
        freshness: Optional[Freshness] = None,
        dedup_max_entries: int = 4096,
        dedup_max_bytes: int = 2 * 1024 * 1024,
    ) -> None:
        """``secrets`` returns strings (the router token) that must never appear in a
        ``bridge`` answer; ``freshness`` judges requests' ages (the daemon shares one with
        the terminals), else one is made on ``clock``, the router's wall clock."""
        self._config = config
        self._publish = publish
        self._topic = response_topic
        # the one compat hook: the API's calls that real ubus does not answer become ones it
        # does (or init script actions) on their way to the backend; see rpc/compat.py
        self._backend = CompatBackend(backend, config)
        self._update = update
        self._freshness = freshness or Freshness(config.clock_skew, wall=clock)
        self._started = time.monotonic()
        self._dedup = DedupTable(config.dedup_window, time.monotonic,
                                 max_entries=dedup_max_entries, max_bytes=dedup_max_bytes)
        self._active: dict[str, _Job] = {}  # running or queued, by id key
        self._running: set[_Job] = set()
        self._queue: deque[_Job] = deque()
        self._counts: Counter[str] = Counter()
        self._closed = False
        self._idle_waiters: list[asyncio.Future[None]] = []
        self._bridge = bridge_ns.BridgeView(
            backend=backend.name,
            uptime=lambda: time.monotonic() - self._started,
            counters=self.counters,
            limits=self._limits,
            info=info,
            sessions=sessions,
            secrets=secrets,
        )

    # ------------------------------------------------------------------ public

    def handle(self, payload: bytes, delivery: Optional[Delivery] = None) -> None:
        """Take one ``rpc/request`` payload. Called on the loop; never raises, never blocks."""
        try:
            self._handle(payload, delivery or Delivery())
        except Exception:
            self._counts["internal"] += 1
            logger.exception("rpc: unexpected failure handling a request (%d bytes)",
                             len(payload))

    def counters(self) -> dict[str, int]:
        counts = {name: self._counts[name] for name in COUNTER_NAMES}
        counts["running"] = len(self._running)
        counts["queued"] = len(self._queue)
        counts["dedup_entries"] = len(self._dedup)
        counts["dedup_evicted"] = self._dedup.evicted
        counts["dedup_replies_dropped"] = self._dedup.dropped_replies
        return counts

    def reconfigure(self, config: RpcConfig) -> None:
        """New limits, policy and timeouts apply to requests from now on; running ones keep
        theirs."""
        self._config = config
        self._freshness.clock_skew = config.clock_skew
        self._dedup.window = config.dedup_window
        self._backend.reconfigure(config)
        self._pump()

    async def close(self) -> None:
        """Answer queued and running requests as cancelled, kill and reap their children."""
        self._closed = True
        while self._queue:
            job = self._queue.popleft()
            self._active.pop(job.key, None)
            self._answer(job.key, job.request.id, Outcome(error=ERROR_SHUTDOWN))
        tasks = [job.task for job in self._running if job.task is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for job in list(self._running):  # cancelled before it ever ran
            self._finish(job, Outcome(error=ERROR_SHUTDOWN))
        self._wake_idle()

    async def wait_idle(self) -> None:
        """Until no request is running or queued (tests, orderly shutdown)."""
        while self._active:
            waiter = asyncio.get_running_loop().create_future()
            self._idle_waiters.append(waiter)
            await waiter

    # ------------------------------------------------------------------ intake

    def _handle(self, payload: bytes, delivery: Delivery) -> None:
        self._counts["requests"] += 1
        parsed = parse_rpc_request(payload)
        if isinstance(parsed, ParseError):
            req_id = parsed.id if parsed.id is not None else salvage_id(payload)
            self._counts["invalid"] += 1
            if not routable(req_id):
                self._counts["unroutable"] += 1
                logger.warning("rpc: dropped a request without a usable id (%d bytes): %s",
                               len(payload), parsed.error)
                return
            key = id_key(req_id)
            if self._duplicate(key, req_id):
                return
            logger.info("rpc %s: invalid request: %s", _show_id(req_id), parsed.error)
            self._answer(key, req_id, Outcome(error=parsed.error))
            return
        req_id = parsed.id
        if not routable(req_id):
            self._counts["invalid"] += 1
            self._counts["unroutable"] += 1
            logger.warning("rpc: dropped a request whose id cannot be echoed back: %s",
                           _show_id(req_id))
            return
        key = id_key(req_id)
        if self._duplicate(key, req_id):
            return
        if self._closed:
            self._answer(key, req_id, Outcome(error=ERROR_SHUTDOWN))
            return
        refusal = self._expiry_refusal(parsed, delivery)
        if refusal is not None:
            self._answer(key, req_id, refusal)
            return
        problem = self._check(parsed)
        if problem is not None:
            self._answer(key, req_id, Outcome(error=problem))
            return
        if parsed.path == BRIDGE_OBJECT and not (parsed.method == BRIDGE_UPDATE and
                                                 self._update is not None):
            self._answer(key, req_id, self._bridge_answer(parsed))
            return
        job = _Job(key, parsed, Call(parsed.path, parsed.method, parsed.args,
                                     self._timeout(parsed), self._config.output_cap), delivery)
        if len(self._running) < self._config.max_concurrent:
            self._start(job)
        elif len(self._queue) < self._config.queue_size:
            self._active[key] = job
            self._queue.append(job)
        else:
            self._counts["busy"] += 1
            logger.warning("rpc %s: %s.%s refused: busy (%d running, %d queued)",
                           _show_id(req_id), parsed.path, parsed.method, len(self._running),
                           len(self._queue))
            self._answer(key, req_id, Outcome(error=ERROR_BUSY))

    def _duplicate(self, key: str, req_id: Any) -> bool:
        if key in self._active:
            self._counts["duplicates"] += 1
            logger.info("rpc %s: duplicate of a request still running, ignored", _show_id(req_id))
            return True
        seen, reply = self._dedup.lookup(key)
        if not seen:
            return False
        self._counts["duplicates"] += 1
        logger.info("rpc %s: duplicate of an answered request, reply re-sent", _show_id(req_id))
        if reply is None:
            reply = rpc_error(req_id, "duplicate request: already answered, reply no longer kept")
        self._send(reply)
        return True

    def _check(self, request: RpcRequest) -> Optional[str]:
        """Why ``request`` must not run (invalid extension field, denied), or None."""
        if request.timeout_ms is not None and not math.isfinite(request.timeout_ms):
            self._counts["invalid"] += 1
            return "'timeout' must be a positive number of milliseconds"
        name = f"{request.path}.{request.method}"
        denied = any(fnmatch.fnmatchcase(name, pattern) for pattern in self._config.deny)
        # the bridge's own diagnostics are always allowed; its update (a package installed
        # as root) only when an allow list names it
        if not denied and self._config.allow and (request.path != BRIDGE_OBJECT or
                                                  request.method == BRIDGE_UPDATE):
            denied = not any(fnmatch.fnmatchcase(name, pattern) for pattern in self._config.allow)
        if denied:
            self._counts["denied"] += 1
            logger.warning("rpc %s: %s denied by policy", _show_id(request.id), name)
            return f"denied by policy: {name}"
        return None

    def _expiry_refusal(self, request: RpcRequest, delivery: Delivery,
                        first_look: bool = True) -> Optional[Outcome]:
        """The ``expired`` answer when the caller stopped waiting (or an unreadable stamp)."""
        stamps: dict[str, float] = {}
        for field, text in (("timestamp", request.timestamp), ("expiresAt", request.expires_at)):
            if text is None:
                continue
            moment = parse_iso8601(text)
            if moment is None:
                self._counts["invalid"] += 1
                return Outcome(error=f"'{field}' is not an ISO 8601 date-time: {text[:64]!r}")
            stamps[field] = moment
        sent_at = stamps.get("timestamp", id_sent_at(request.id))
        max_age = self._config.max_age_for(request.path, request.method)
        late = self._freshness.judge(sent_at, stamps.get("expiresAt"), max_age, delivery,
                                     first_look=first_look)
        if late is None:
            return None
        self._counts["expired"] += 1
        logger.warning("rpc %s: %s.%s expired, not run: %s", _show_id(request.id),
                       request.path, request.method, late.detail)
        return Outcome(error=ERROR_EXPIRED, result=late.as_result())

    def _bridge_answer(self, request: RpcRequest) -> Outcome:
        try:
            return bridge_ns.answer(request.method, self._bridge)
        except Exception as exc:  # the daemon's info() or sessions() failed
            self._counts["internal"] += 1
            logger.error("rpc %s: bridge.%s failed inside the bridge", _show_id(request.id),
                         request.method, exc_info=True)
            return Outcome(error=f"internal error: {type(exc).__name__}")

    def _timeout(self, request: RpcRequest) -> float:
        if request.timeout_ms is not None:
            return min(request.timeout_ms / 1000.0, self._config.max_timeout)
        return self._config.timeout_for(request.path, request.method)

    # ------------------------------------------------------------------ running

    def _start(self, job: _Job) -> None:
        loop = asyncio.get_running_loop()
        self._active[job.key] = job
        self._running.add(job)
        job.task = loop.create_task(self._run(job))

    def _pump(self) -> None:
        while self._queue and len(self._running) < self._config.max_concurrent:
            job = self._queue.popleft()
            refusal = self._expiry_refusal(job.request, job.delivery, first_look=False)
            if refusal is not None:  # it waited too long in the queue
                self._active.pop(job.key, None)
                self._answer(job.key, job.request.id, refusal)
                continue
            self._start(job)
        if not self._active:
            self._wake_idle()

    async def _run(self, job: _Job) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            if job.call.path == BRIDGE_OBJECT and self._update is not None:
                outcome = await self._update(job.call.args, job.call.timeout)
            else:
                outcome = await self._backend.call(job.call)
        except asyncio.CancelledError:
            self._finish(job, Outcome(error=ERROR_SHUTDOWN))
            raise
        except Exception as exc:
            self._counts["internal"] += 1
            logger.error("rpc %s: %s.%s failed inside the bridge", _show_id(job.request.id),
                         job.call.path, job.call.method, exc_info=True)
            outcome = Outcome(error=f"internal error: {type(exc).__name__}")
        logger.debug("rpc %s: %s.%s %s in %.0f ms", _show_id(job.request.id), job.call.path,
                     job.call.method, "ok" if outcome.ok else repr(outcome.error),
                     (loop.time() - started) * 1000)
        self._finish(job, outcome)

    def _finish(self, job: _Job, outcome: Outcome) -> None:
        if job.answered:
            return
        self._running.discard(job)
        self._active.pop(job.key, None)
        if outcome.timed_out:
            self._counts["timeouts"] += 1
            logger.warning("rpc %s: %s.%s: %s", _show_id(job.request.id), job.call.path,
                           job.call.method, outcome.error)
        self._answer(job.key, job.request.id, outcome)
        job.answered = True
        if not self._closed:
            self._pump()
        elif not self._active:
            self._wake_idle()

    # ------------------------------------------------------------------ replies

    def _answer(self, key: str, req_id: Any, outcome: Outcome) -> None:
        self._counts["ok" if outcome.ok else "errors"] += 1
        if outcome.truncated:
            self._counts["truncated"] += 1
        try:
            reply = outcome_reply(req_id, outcome)
        except UnicodeEncodeError:
            reply = outcome_reply(req_id, Outcome(
                result=_scrub(outcome.result), error=_scrub(outcome.error),
                stderr=_scrub(outcome.stderr), exit_code=outcome.exit_code,
                truncated=outcome.truncated, timed_out=outcome.timed_out))
        limit = self._config.max_reply_bytes
        if len(reply) > limit:
            self._counts["too_large"] += 1
            logger.warning("rpc %s: reply of %d bytes is over max_reply_bytes (%d): answered "
                           "with an error instead", _show_id(req_id), len(reply), limit)
            reply = rpc_error(req_id, f"reply too large: {len(reply)} bytes, over the "
                              f"{limit}-byte limit; ask for less (fewer lines, a smaller file)",
                              result={"size": len(reply), "limit": limit}, truncated=True)
        self._dedup.remember(key, reply)
        self._send(reply, outcome.after_reply)

    def _send(self, reply: bytes, after: Optional[Callable[[], None]] = None) -> None:
        """Publish ``reply``; ``after`` runs once it has left, or at once if it cannot leave
        (the caller asked for that action: a lost reply must not cancel it)."""
        try:
            accepted = self._publish(self._topic, reply, qos=1, on_sent=after)
        except Exception:  # a link bug must not stall the queue behind this reply
            self._counts["internal"] += 1
            logger.exception("rpc: publishing a reply of %d bytes failed", len(reply))
            accepted = None
        if accepted is False:
            self._counts["publish_refused"] += 1
            logger.warning("rpc: reply of %d bytes refused by the link (outbox full), lost",
                           len(reply))
        if not accepted and after is not None:
            after()

    def _limits(self) -> dict[str, Any]:
        return {"running": len(self._running), "queued": len(self._queue),
                "max_concurrent": self._config.max_concurrent,
                "queue_size": self._config.queue_size, "compat": self._backend.describe()}

    def _wake_idle(self) -> None:
        waiters, self._idle_waiters = self._idle_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)


__all__ = ["RpcExecutor", "outcome_reply", "parse_iso8601", "routable", "salvage_id"]
