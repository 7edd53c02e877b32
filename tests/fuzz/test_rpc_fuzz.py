"""Fuzz the request parser and the executor with arbitrary JSON and bytes.

Properties: every reply is well-formed JSON the API can read; a request with a
readable id gets exactly one reply (a repeated id gets the same reply again or
nothing); a request without one gets nothing; the executor never fails
internally and still answers ``bridge ping`` afterwards.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections import Counter
from typing import Any, Iterator, Optional

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spotfi_bridge import aio
from spotfi_bridge.config import RpcConfig
from spotfi_bridge.rpc import LocalBackend, RpcExecutor
from spotfi_bridge.rpc.executor import routable, salvage_id
from tests.helpers.fake_ubus import Collector

TOPIC = "spotfi/router/fuzz/rpc/response"
# no children and no file access from fuzzed input: the properties are about the executor
CONFIG = RpcConfig(deny=("file.*",), max_concurrent=1, queue_size=1)

scalars = (st.none() | st.booleans() | st.integers() | st.text(max_size=12)
           | st.floats(allow_nan=False, allow_infinity=False))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                           max_leaves=8)
odd_ids: list[Any] = [None, True, [], {}, "cmd_1700000000_a9f1_1", 0, 1, "1", 1.0]
ids: st.SearchStrategy[Any] = (st.text(max_size=16) | st.integers()
                               | st.floats(allow_nan=False, allow_infinity=False)
                               | st.sampled_from(odd_ids))
path_names = st.sampled_from(["system", "bridge", "network.device", "network.interface",
                              "service", "log", "file", "uci", "nosuch"])
method_names = st.sampled_from(["info", "board", "ping", "sessions", "status", "dump", "list",
                                "read", "exec", "nope"])
stamps = st.sampled_from(["2020-01-01T00:00:00Z", "2999-01-01T00:00:00.000Z", "garbage"]) \
    | st.text(max_size=30) | json_values
extensions = {"type": st.sampled_from(["rpc", "x-start", "rpc-result"]) | json_values,
              "args": json_values | st.just({}), "timeout": st.integers(-5, 10**7) | json_values,
              "timestamp": stamps, "expiresAt": stamps}
# mostly plausible requests (so calls really run, queue up and get refused as busy)...
known_calls = st.sampled_from([
    ("system", "info"), ("system", "board"), ("bridge", "ping"), ("bridge", "info"),
    ("bridge", "sessions"), ("network.device", "status"), ("network.interface", "dump"),
    ("network.interface", "status"), ("service", "list"), ("log", "read"), ("file", "read"),
    ("uci", "get"), ("system", "nope")])
plausible = st.tuples(
    known_calls | st.tuples(path_names | st.text(max_size=8), method_names | st.text(max_size=8)),
    st.fixed_dictionaries(
        {"type": st.just("rpc"), "id": st.sampled_from(["a", "b", 7]) | ids},
        optional={"args": st.dictionaries(st.sampled_from(["name", "interface", "lines", "x"]),
                                          scalars, max_size=2),
                  "timeout": st.integers(1, 10**6),
                  "timestamp": st.sampled_from(["2020-01-01T00:00:00Z",
                                                "2999-01-01T00:00:00Z"])}),
).map(lambda pair: {**pair[1], "path": pair[0][0], "method": pair[0][1]})
# ...and anything shaped like an object with an id
anything = st.fixed_dictionaries(
    {"id": ids}, optional={"path": path_names | json_values, "method": method_names | json_values,
                           **extensions})
requests = plausible | anything


@st.composite
def payloads(draw: st.DrawFn) -> bytes:
    kind = draw(st.integers(0, 5))
    if kind <= 1:
        return json.dumps(draw(plausible)).encode()
    if kind == 2:
        return json.dumps(draw(anything)).encode()
    if kind == 3:
        text = json.dumps(draw(requests)).encode()
        return text[:draw(st.integers(0, max(0, len(text) - 1)))]  # cut short
    if kind == 4:
        return json.dumps(draw(json_values)).encode()
    return draw(st.binary(max_size=64))


def expected_id(payload: bytes) -> tuple[bool, Any]:
    """(answerable, id) for one payload, as the contract defines it."""
    try:
        obj = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        req_id = salvage_id(payload)
        return routable(req_id), req_id
    if not isinstance(obj, dict):
        return False, None
    req_id = obj.get("id")
    if isinstance(req_id, float) and not math.isfinite(req_id):
        return False, None
    return routable(req_id), req_id


def strict_json(payload: bytes) -> Any:
    def no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")
    return json.loads(payload.decode("utf-8"), parse_constant=no_constants)


def check_reply(reply: dict[str, Any]) -> None:
    assert reply["type"] == "rpc-result"
    assert reply["status"] in ("success", "error")
    assert "result" in reply
    if reply["status"] == "success":
        # falsy in JavaScript would make the API return the whole envelope
        assert reply["result"] not in (None, False, 0, "")
    else:
        assert isinstance(reply["error"], str) and reply["error"]
    if "stderr" in reply:
        assert isinstance(reply["stderr"], str)


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    loop.run_until_complete(_install(loop))
    yield loop
    loop.close()


async def _install(loop: asyncio.AbstractEventLoop) -> None:
    aio.install_child_watcher()


def exercise(loop: asyncio.AbstractEventLoop, batch: list[bytes]
             ) -> tuple[Collector, dict[str, int], Optional[dict[str, Any]]]:
    collector = Collector()

    async def body() -> tuple[dict[str, int], Optional[dict[str, Any]]]:
        executor = RpcExecutor(CONFIG, collector, TOPIC, LocalBackend(CONFIG))
        for payload in batch:
            executor.handle(payload)
        await asyncio.wait_for(executor.wait_idle(), 10)
        mark = len(collector.messages)
        executor.handle(b'{"type":"rpc","id":"__ping__","path":"bridge","method":"ping"}')
        ping = None
        if len(collector.messages) > mark:
            ping = json.loads(collector.messages[-1][1])
            del collector.messages[mark:]
        await executor.close()
        return executor.counters(), ping

    counters, ping = loop.run_until_complete(body())
    return collector, counters, ping


@settings(max_examples=400, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(batch=st.lists(payloads(), min_size=1, max_size=8))
def test_every_readable_id_gets_exactly_one_well_formed_reply(
        loop: asyncio.AbstractEventLoop, batch: list[bytes]) -> None:
    collector, counters, ping = exercise(loop, batch)

    occurrences: Counter[str] = Counter()
    ids_by_key: dict[str, Any] = {}
    for payload in batch:
        answerable, req_id = expected_id(payload)
        if answerable and json.dumps(req_id) != '"__ping__"':
            occurrences[json.dumps(req_id)] += 1
            ids_by_key[json.dumps(req_id)] = req_id

    replies: dict[str, list[bytes]] = {}
    for topic, payload, qos in collector.messages:
        assert topic == TOPIC and qos == 1
        reply = strict_json(payload)
        check_reply(reply)
        replies.setdefault(json.dumps(reply["id"]), []).append(payload)

    assert set(replies) == set(occurrences), (batch, collector.messages)
    for key, sent in replies.items():
        # the first delivery is answered; a repeat gets the same bytes again or nothing
        assert 1 <= len(sent) <= occurrences[key]
        assert all(payload == sent[0] for payload in sent)
        reply_id = strict_json(sent[0])["id"]
        assert reply_id == ids_by_key[key] and type(reply_id) is type(ids_by_key[key])

    unanswerable = len(batch) - sum(occurrences.values())
    assert counters["unroutable"] == unanswerable
    assert counters["internal"] == 0
    assert ping is not None and ping["id"] == "__ping__" and ping["status"] == "success"


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=256) | st.text(max_size=128).map(str.encode))
def test_arbitrary_bytes_never_break_the_executor(loop: asyncio.AbstractEventLoop,
                                                  raw: bytes) -> None:
    collector, counters, ping = exercise(loop, [raw])
    assert len(collector.messages) <= 1
    for _, payload, _ in collector.messages:
        check_reply(strict_json(payload))
    assert counters["internal"] == 0 and counters["requests"] == 2
    assert ping is not None and ping["status"] == "success"
