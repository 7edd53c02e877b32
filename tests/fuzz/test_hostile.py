"""Hostile and broken input through a real Mosquitto to the real daemon.

* The flood: >= 10,000 hostile messages (Hypothesis corpus, recombined and damaged,
  see ``strategies.py``) on ``rpc/request``, ``x/in`` and stray topics of the
  router's tree, while a probe keeps checking that ``bridge ping`` answers and the
  daemon's RSS, fds and threads stay flat. Soak: ``FUZZ_MESSAGES=200000``, ``-m soak``.
* ``responseTopic`` pointing anywhere but an API instance's ``x/out`` or the
  router's own is refused, and nothing is published there.
* Floods of ``x-start`` and of RPCs are bounded by ``[terminal] max_sessions`` and
  ``[rpc] max_concurrent``/``queue_size``, with the refusals counted in ``bridge info``.
"""

from __future__ import annotations

import collections
import fcntl
import json
import os
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import pytest

from spotfi_bridge import mqtt_compat
from tests.conftest import wait_online
from tests.fuzz import procfs
from tests.fuzz.flood import (
    FUZZ_ENV,
    FUZZ_ROUTER,
    FUZZ_TOML,
    FUZZ_TOPICS,
    MAX_INBOUND,
    Flooder,
    draw_corpus,
)
from tests.fuzz.strategies import Message, Recombiner, explicit_messages, render
from tests.helpers.apiclient import ApiClient, Received
from tests.helpers.bridge import BridgeProcess
from tests.helpers.broker import Mosquitto
from tests.helpers.wait import wait_for

ROUTER = FUZZ_ROUTER
TOPICS = FUZZ_TOPICS
#: A probe that takes longer than this means the bridge stopped serving (not a timing test:
#: a healthy bridge answers in milliseconds; this only bounds the wait).
PING_BOUND = 10.0
RSS_GROWTH_KIB = 10 * 1024
FD_GROWTH = 10
CHUNK = 500


class TopicWatch:
    """Every topic published on the broker (``#`` and ``$SYS/#``), counted, nothing kept."""

    def __init__(self, port: int) -> None:
        self.topics: collections.Counter[str] = collections.Counter()
        self.payloads_with: dict[str, list[tuple[str, bytes]]] = {}
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self.client = mqtt_compat.new_client(f"watch-{uuid.uuid4().hex[:6]}", clean_session=True)
        mqtt_compat.bind_callbacks(self.client, on_connect=self._on_connect,
                                   on_disconnect=lambda rc: None, on_message=self._on_message,
                                   on_publish=lambda mid: None)
        self.client.on_subscribe = lambda *args: self._ready.set()
        self.client.connect("127.0.0.1", port, keepalive=60)
        self.client.loop_start()
        assert self._ready.wait(10), "watch client could not subscribe"

    def _on_connect(self, result: mqtt_compat.ConnectResult) -> None:
        self.client.subscribe([("#", 0), ("$SYS/#", 0)])

    def _on_message(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        with self._lock:
            self.topics[topic] += 1
            for needle, hits in self.payloads_with.items():
                if needle.encode() in payload:
                    hits.append((topic, payload))

    def look_for(self, needle: str) -> None:
        with self._lock:
            self.payloads_with[needle] = []

    def hits(self, needle: str) -> list[tuple[str, bytes]]:
        with self._lock:
            return list(self.payloads_with[needle])

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def watch(broker: Mosquitto) -> Iterator[TopicWatch]:
    client = TopicWatch(broker.port)
    yield client
    client.close()


def _body(message: Received) -> Any:
    try:
        return json.loads(message.payload)
    except (ValueError, RecursionError):  # the flood writes garbage on rpc/response too
        return None


def rpc_call(api: ApiClient, path: str, method: str, args: Optional[dict[str, Any]] = None,
             timeout: float = PING_BOUND, id_prefix: str = "probe", **extra: Any
             ) -> dict[str, Any]:
    topic = TOPICS.rpc_response
    if (topic, 1) not in api._subscriptions:
        api.subscribe(topic)
    start = api.mark()
    # stamped like the API's ids: the bridge's clock agrees, so stale stamps are refused
    req_id = api.rpc_send(ROUTER, path, method, args, **extra,
                          req_id=f"cmd_{int(time.time() * 1000)}_{id_prefix}-{uuid.uuid4().hex}")
    needle = req_id.encode()
    reply = api.wait_message(topic, lambda m: needle in m.payload and isinstance(_body(m), dict)
                             and _body(m).get("id") == req_id, timeout, start)
    result: dict[str, Any] = reply.json()
    return result


# --------------------------------------------------------------------------- the flood


class Probe:
    """The API side's view of the daemon during the flood: ping, info, /proc."""

    def __init__(self, api: ApiClient, bridge: BridgeProcess) -> None:
        self.api = api
        self.bridge = bridge
        self.rpcs = 0  # requests this probe published on rpc/request
        self.stops = 0  # x-stops it published on x/in
        self.pings: list[float] = []
        self.rss: list[int] = []

    @property
    def sent(self) -> int:
        return self.rpcs + self.stops

    def rpc(self, method: str, path: str = "bridge") -> dict[str, Any]:
        """Like ``ApiClient.rpc``, but robust to the garbage the flood puts on rpc/response."""
        self.rpcs += 1
        reply = rpc_call(self.api, path, method, timeout=PING_BOUND)
        assert reply["status"] == "success", reply
        result: dict[str, Any] = reply["result"]
        return result

    def ping(self) -> None:
        started = time.monotonic()
        assert self.rpc("ping")["pong"] is True
        self.pings.append(time.monotonic() - started)
        self.rss.append(procfs.rss_kib(self.bridge.pid))
        assert self.bridge.proc is not None and self.bridge.proc.poll() is None, \
            f"bridge died: {self.bridge.log()[-3000:]}"

    def info(self) -> dict[str, Any]:
        return self.rpc("info")

    def stop_sessions(self) -> None:
        """x-stop every open session and wait until each is reaped and closed."""
        for session in self.rpc("sessions")["sessions"]:
            self.stops += 1
            self.api.x_stop(ROUTER, session["id"])
        wait_for(lambda: (lambda t: t["active"] == 0 and t["closing"] == 0)(
            self.info()["terminal"]), 20, "every fuzzed session closed")

    def settle(self, flood_delivered: int) -> dict[str, Any]:
        """Wait until the daemon has taken every message sent so far; return ``bridge info``."""
        def taken() -> Any:
            info = self.info()
            return info if info["link"]["received"] >= flood_delivered + self.sent else None
        info: dict[str, Any] = wait_for(taken, 60, "the daemon to receive the whole flood",
                                        interval=0.2)
        return info

    def snapshot(self) -> dict[str, int]:
        pid = self.bridge.pid
        return {"rss_kib": procfs.rss_kib(pid), "fds": len(procfs.fd_targets(pid)),
                "threads": procfs.threads(pid), "children": len(procfs.children(pid))}


class Tally:
    """What the flood sent, by destination, so the daemon's counters can be checked."""

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        self.topics: set[str] = set()

    def add(self, messages: list[Message]) -> None:
        for topic, payload in messages:
            self.topics.add(topic)
            where = {TOPICS.rpc_request: "rpc", TOPICS.x_in: "x"}.get(topic, "stray")
            big = len(payload) > MAX_INBOUND
            self.counts[where + ("_oversized" if big else "")] += 1

    @property
    def delivered(self) -> int:
        """Messages on the two topics the daemon subscribes to."""
        return sum(self.counts[k] for k in ("rpc", "rpc_oversized", "x", "x_oversized"))


def run_flood(broker: Mosquitto, api: ApiClient, watch: TopicWatch,
              make_bridge: Callable[..., BridgeProcess], total: int, seed: int) -> dict[str, Any]:
    bridge = make_bridge(router_id=ROUTER, toml=FUZZ_TOML, env=FUZZ_ENV)
    corpus = draw_corpus(TOPICS, examples=120, seed=seed)  # while the daemon starts
    wait_online(api, ROUTER)
    recombiner = Recombiner(corpus, seed, MAX_INBOUND)
    messages = explicit_messages(TOPICS) + [render(drawn, MAX_INBOUND) for drawn in corpus]
    messages += [recombiner.next() for _ in range(total - len(messages))]
    probe = Probe(api, bridge)
    tally = Tally()
    flooder = Flooder(broker.port)
    try:
        # warm-up: the first chunk loads every lazily imported module and fills caches
        warmup, rest = messages[:CHUNK], messages[CHUNK:]
        flooder.publish(warmup)
        tally.add(warmup)
        flooder.flush()
        probe.settle(tally.delivered)
        probe.stop_sessions()
        before = probe.snapshot()
        started = time.monotonic()
        for start in range(0, len(rest), CHUNK):
            chunk = rest[start:start + CHUNK]
            flooder.publish(chunk)
            tally.add(chunk)
            flooder.flush()
            probe.ping()
        elapsed = time.monotonic() - started
        info = probe.settle(tally.delivered)
        probe.stop_sessions()
        info = probe.info()
        after = probe.snapshot()
    finally:
        flooder.close()
    log = bridge.log()
    figures = {
        "messages": flooder.sent, "seconds": round(elapsed, 1), "tally": dict(tally.counts),
        "ping_max_s": round(max(probe.pings), 3), "pings": len(probe.pings),
        "rss_max_kib": max(probe.rss), "before": before, "after": after,
        "log_bytes": len(log.encode()), "rpc": info["counters"], "terminal": info["terminal"],
        "link": info["link"], "damage": dict(recombiner.damage_counts),
    }
    print(f"fuzz flood (FUZZ_SEED={seed}):", json.dumps(figures, sort_keys=True))

    # every message reached the daemon and was accounted for, nothing crashed inside
    link, rpc, terminal = info["link"], info["counters"], info["terminal"]
    assert flooder.sent >= total
    assert link["received"] == tally.delivered + probe.sent
    assert link.get("inbound_oversized", 0) == tally.counts["rpc_oversized"] + \
        tally.counts["x_oversized"]
    assert rpc["requests"] == tally.counts["rpc"] + probe.rpcs
    assert link.get("handler_errors", 0) == 0
    assert rpc["internal"] == 0 and terminal["internal_error"] == 0, figures
    assert rpc["publish_refused"] == 0 and terminal["publish_refused"] == 0
    assert link.get("outbox_refused", 0) == 0
    assert link["connects"] == 1 and link.get("disconnects", 0) == 0  # never kicked off
    assert info["daemon"]["unexpected_topic"] == 0  # stray topics never reach it
    assert "Traceback" not in log, log[log.index("Traceback") - 500:][:3000]
    # the input was hostile enough to reach every refusal path
    assert rpc["invalid"] > 0 and rpc["unroutable"] > 0 and rpc["denied"] > 0
    # stale stamps are refused while the router's clock is trusted (the probe's stamped ids
    # agree with it); the flood's own odd stamps end that trust after 3 in a row, so which
    # of RPC or x-start gets refused depends on the seed (tests/unit/test_freshness.py)
    assert rpc["expired"] + terminal["expired"] > 0
    assert not os.path.exists("/tmp/spotfi-fuzz-pwned")
    assert terminal["bad_topic"] > 0 and terminal["bad_message"] > 0 and \
        terminal["bad_data"] > 0 and terminal["started"] > 0
    # the bridge published only where it may; never a hostile responseTopic
    bridge_topics = set(watch.topics) - tally.topics - {TOPICS.rpc_request, TOPICS.x_in}
    bridge_topics = {t for t in bridge_topics if not t.startswith("$SYS/broker/")}
    assert bridge_topics <= {TOPICS.rpc_response, TOPICS.x_out, TOPICS.status, TOPICS.metrics,
                             "spotfi/api/fuzz/x/out"}, bridge_topics
    # flat: no leak of memory, fds, threads or children
    assert after["children"] == 0
    assert after["fds"] - before["fds"] < FD_GROWTH, figures
    assert after["threads"] <= before["threads"], figures
    assert after["rss_kib"] - before["rss_kib"] < RSS_GROWTH_KIB, figures
    return figures


def test_flood_of_hostile_messages_leaves_the_bridge_serving_and_flat(
        broker: Mosquitto, api: ApiClient, watch: TopicWatch,
        make_bridge: Callable[..., BridgeProcess]) -> None:
    run_flood(broker, api, watch, make_bridge, total=10_000,
              seed=int(os.environ.get("FUZZ_SEED", "7")))


@pytest.mark.soak
@pytest.mark.timeout(7200)
def test_soak_flood_of_hostile_messages(
        broker: Mosquitto, api: ApiClient, watch: TopicWatch,
        make_bridge: Callable[..., BridgeProcess]) -> None:
    total = int(os.environ.get("FUZZ_MESSAGES", "200000"))
    run_flood(broker, api, watch, make_bridge, total=total,
              seed=int(os.environ.get("FUZZ_SEED", str(int(time.time())))))


# --------------------------------------------------------------------------- responseTopic

#: x-start responseTopics the bridge must refuse. Besides the wildcard and foreign-tree cases,
#: topics that MQTT or Mosquitto reject (control characters, non-characters, lone surrogates,
#: over 65535 bytes): publishing one makes the broker drop the bridge's connection.
BAD_RESPONSE_TOPICS = {
    "other-router": "spotfi/router/other-router/x/out",
    "hash": "#",
    "plus": "+",
    "api-plus": "spotfi/api/+/x/out",
    "api-hash": "spotfi/api/#",
    "trailing-hash": "spotfi/api/inst/x/out/#",
    "sys": "$SYS/broker/spotfi",
    "sys-hash": "$SYS/#",
    "own-status": f"{TOPICS.base}/status",
    "own-rpc-response": f"{TOPICS.base}/rpc/response",
    "own-x-in": TOPICS.x_in,
    "two-levels": "spotfi/api/a/b/x/out",
    "empty-instance": "spotfi/api//x/out",
    "trailing-newline": "spotfi/api/inst/x/out\n",
    "nul": "spotfi/api/in\x00st/x/out",
    "newline-inside": "spotfi/api/a\nb/x/out",
    "control": "spotfi/api/a\x01b/x/out",
    "c1-control": "spotfi/api/a\x85b/x/out",
    "noncharacter": "spotfi/api/a\ufffeb/x/out",
    "surrogate": "spotfi/api/a\ud800b/x/out",
    "too-long": "spotfi/api/" + "a" * 70000 + "/x/out",
    "empty": "",
}


def test_hostile_response_topics_are_refused_and_nothing_is_published_there(
        api: ApiClient, watch: TopicWatch, make_bridge: Callable[..., BridgeProcess]) -> None:
    bridge = make_bridge(router_id=ROUTER, env={"SPOTFI_TERMINAL_SHELL": "/bin/cat"})
    wait_online(api, ROUTER)
    api.subscribe(TOPICS.x_out)
    run = uuid.uuid4().hex[:8]
    ids = {name: f"bad-{name}-{run}" for name in BAD_RESPONSE_TOPICS}
    for session_id in ids.values():
        watch.look_for(session_id)
    for name, topic in BAD_RESPONSE_TOPICS.items():
        api.publish(TOPICS.x_in, json.dumps({"type": "x-start", "sessionId": ids[name],
                                             "responseTopic": topic}).encode())
    # a good one afterwards: it starts (the test is not vacuous) and, x/in being handled in
    # order, its x-started means every refusal above has been published already
    good = api.x_start(ROUTER, f"good-{run}")
    api.wait_x(good, "x-started")
    for name, session_id in ids.items():
        reply = api.wait_x(session_id, "x-error", topic=TOPICS.x_out, timeout=5)
        assert reply.get("reason") == "bad-topic", (name, reply)
    wait_for(lambda: all(len(watch.hits(session_id)) >= 2 for session_id in ids.values()), 5,
             "the watcher to see every refusal")
    for name, session_id in ids.items():
        hits = [(topic, body) for topic, body in watch.hits(session_id) if topic != TOPICS.x_in]
        assert [topic for topic, _ in hits] == [TOPICS.x_out], (name, hits)  # one x-error
    info = rpc_call(api, "bridge", "info")["result"]
    terminal, link = info["terminal"], info["link"]
    assert terminal["bad_topic"] == len(BAD_RESPONSE_TOPICS)
    assert terminal["started"] == 1 and terminal["spawn_failed"] == 0
    assert terminal["internal_error"] == 0
    assert link["connects"] == 1 and link.get("disconnects", 0) == 0  # never kicked off
    assert [procfs.cmdline(pid) for pid in procfs.children(bridge.pid)] == [["/bin/cat"]]
    api.x_stop(ROUTER, good)
    wait_for(lambda: rpc_call(api, "bridge", "info")["result"]["link"]["outbox_messages"] == 0,
             10, "an empty outbox")
    assert "Traceback" not in bridge.log()


def test_rpc_replies_ignore_a_response_topic_in_the_request(
        api: ApiClient, watch: TopicWatch, make_bridge: Callable[..., BridgeProcess]) -> None:
    """RPC has no responseTopic: one in a request must not redirect the reply."""
    make_bridge(router_id=ROUTER)
    wait_online(api, ROUTER)
    watch.look_for("redirect-probe")
    reply = rpc_call(api, "bridge", "ping", responseTopic="spotfi/router/other/rpc/response",
                     id_prefix="redirect-probe")
    assert reply["status"] == "success"
    hits = wait_for(lambda: (lambda h: h if len(h) >= 2 else None)(watch.hits("redirect-probe")),
                    5, "the watcher to see request and reply")
    assert {topic for topic, _ in hits} == {TOPICS.rpc_request, TOPICS.rpc_response}, hits


# --------------------------------------------------------------------------- limits


def _x_reply(api: ApiClient, session_id: str, timeout: float = 10.0) -> dict[str, Any]:
    message = api.wait_message(api.out_topic, lambda m: isinstance(_body(m), dict) and (
        _body(m).get("sessionId") == session_id
        and _body(m).get("type") in ("x-started", "x-error")), timeout)
    body: dict[str, Any] = message.json()
    return body


def test_x_start_flood_is_bounded_by_max_sessions_and_counted(
        api: ApiClient, make_bridge: Callable[..., BridgeProcess]) -> None:
    bridge = make_bridge(router_id=ROUTER,
                         toml='[terminal]\nmax_sessions = 3\nshell = ["/bin/cat"]\n')
    wait_online(api, ROUTER)
    api.subscribe(api.out_topic)
    run = uuid.uuid4().hex[:6]
    ids = [f"flood-{n}-{run}" for n in range(25)]
    for session_id in ids:
        api.publish(TOPICS.x_in, json.dumps({"type": "x-start", "sessionId": session_id,
                                             "responseTopic": api.out_topic}).encode())
    replies = {session_id: _x_reply(api, session_id) for session_id in ids}
    started = [s for s in ids if replies[s]["type"] == "x-started"]
    refused = [s for s in ids if replies[s]["type"] == "x-error"]
    assert started == ids[:3]  # x/in is handled in order
    assert all(replies[s].get("reason") == "limit" for s in refused), replies
    assert len(refused) == 22
    info = rpc_call(api, "bridge", "info")["result"]["terminal"]
    assert info["refused_limit"] == 22 and info["active"] == 3 and info["started"] == 3
    shells = [procfs.cmdline(pid) for pid in procfs.children(bridge.pid)]
    assert shells == [["/bin/cat"]] * 3
    # a stopped session frees its slot
    api.x_stop(ROUTER, started[0])
    wait_for(lambda: rpc_call(api, "bridge", "info")["result"]["terminal"]["active"] == 2, 10,
             "the stopped session to end")
    again = api.x_start(ROUTER, f"again-{run}")
    assert _x_reply(api, again)["type"] == "x-started"


def _mentions(req_id: str) -> Callable[[Received], bool]:
    needle = req_id.encode()
    return lambda message: needle in message.payload


def test_rpc_flood_is_bounded_by_concurrency_and_queue_and_counted(
        api: ApiClient, make_bridge: Callable[..., BridgeProcess], tmp_path: Path) -> None:
    flock = shutil.which("flock")
    assert flock, "flock (util-linux) is needed to hold RPC children without timing"
    bridge = make_bridge(router_id=ROUTER, toml='[rpc]\nbackend = "local"\nmax_concurrent = 2\n'
                                                'queue_size = 3\n')
    wait_online(api, ROUTER)
    api.subscribe(TOPICS.rpc_response)
    gate = tmp_path / "gate"
    gate.touch()
    run = uuid.uuid4().hex[:6]
    ids = [f"flood-{n}-{run}" for n in range(20)]
    with open(gate) as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # every child blocks on it until released
        for n, req_id in enumerate(ids):
            api.rpc_send(ROUTER, "file", "exec", {"command": flock, "params": [
                "-s", str(gate), "/bin/echo", f"ran-{n}"]}, req_id=req_id)
        busy = [api.wait_message(TOPICS.rpc_response, _mentions(req_id))
                for req_id in ids[5:]]
        assert all(m.json()["status"] == "error" and m.json()["error"] == "busy" for m in busy)
        # the bridge object is answered in-process: ping works while the executor is full
        assert rpc_call(api, "bridge", "ping")["status"] == "success"
        info = rpc_call(api, "bridge", "info")["result"]
        counters = info["counters"]
        assert counters["busy"] == 15 and counters["running"] == 2 and counters["queued"] == 3
        children = procfs.children(bridge.pid)
        assert [procfs.cmdline(pid)[0] for pid in children] == [flock, flock]
        fcntl.flock(held, fcntl.LOCK_UN)
    done = [api.wait_message(TOPICS.rpc_response, _mentions(req_id))
            for req_id in ids[:5]]
    for n, message in enumerate(done):
        body = message.json()
        assert body["status"] == "success" and body["result"]["stdout"] == f"ran-{n}\n", body
    rpc_call(api, "bridge", "ping")  # a sentinel: anything still to come has come
    for req_id in ids:  # exactly one reply each
        assert len(api.matching(TOPICS.rpc_response, _mentions(req_id))) == 1
    counters = rpc_call(api, "bridge", "info")["result"]["counters"]
    assert counters["busy"] == 15 and counters["running"] == 0 and counters["queued"] == 0
