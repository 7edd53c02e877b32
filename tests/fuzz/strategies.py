"""Hostile inbound traffic: every message the router accepts, broken in every way we know.

Two stages, because Hypothesis costs several milliseconds per drawn message and
the quick variant publishes at least 10,000:

1. Hypothesis strategies (:func:`x_message`, :func:`rpc_message`, :func:`damage_plans`)
   draw a corpus of structured messages: the fields the bridge expects, some
   with the wrong type, missing, extra, huge, deeply nested or absurd.
2. :class:`Recombiner` (seeded :mod:`random`, microseconds per message) builds
   the flood from that corpus: templates whose fields are swapped with values
   other messages drew, then byte-level damage (truncation, invalid UTF-8, NUL
   bytes, non-objects, deep nesting, oversized padding, garbage).

Nothing here can make the bridge do harm on the test machine: the daemon under
fuzz runs ``/bin/cat`` as its shell and its RPC policy denies ``file.exec`` and
``file.write`` (``FUZZ_TOML`` in ``tests/fuzz/flood.py``).
"""

from __future__ import annotations

import base64
import json
import random
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Optional

from hypothesis import strategies as st

from spotfi_bridge.protocol import Topics

Message = tuple[str, bytes]

#: Session ids shared by x-start, x-data, x-resize and x-stop so that some of them meet.
SESSION_POOL = tuple(f"fuzz-{n}" for n in range(40))
API_OUT = "spotfi/api/fuzz/x/out"
DAMAGES = ("truncate", "bad-utf8", "nul", "not-object", "deep", "oversized", "empty",
           "garbage", "surrogate")


# --------------------------------------------------------------------------- field values


def _huge_text(low: int = 300, high: int = 6000) -> st.SearchStrategy[str]:
    """A long string, drawn as a length and a character (cheap for Hypothesis)."""
    return st.tuples(st.integers(low, high), st.sampled_from("aé\x00\u2028😀/#+\\\"")).map(
        lambda pair: pair[1] * pair[0])


def _nested(args: tuple[int, bool]) -> Any:
    depth, as_dict = args
    value: Any = 1
    for _ in range(depth):
        value = {"a": value} if as_dict else [value]
    return value


def _deep(low: int = 5, high: int = 60) -> st.SearchStrategy[Any]:
    return st.tuples(st.integers(low, high), st.booleans()).map(_nested)


json_scalar = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=16),
)
json_value: st.SearchStrategy[Any] = st.recursive(
    json_scalar,
    lambda children: st.one_of(st.lists(children, max_size=3),
                               st.dictionaries(st.text(max_size=6), children, max_size=3)),
    max_leaves=5,
)


def _maybe(good: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Usually a plausible value, otherwise anything: wrong type, huge, deeply nested."""
    return st.one_of(good, good, good, json_value, _huge_text(), _deep())


def response_topics(topics: Topics) -> st.SearchStrategy[Any]:
    hostile = st.sampled_from([
        "#", "+", "$SYS/broker/x", "$SYS/#", "spotfi/router/other-router/x/out",
        "spotfi/router/+/x/out", "spotfi/api/+/x/out", "spotfi/api/#", "spotfi/api/a/b/x/out",
        "spotfi/api//x/out", "spotfi/api/fuzz/x/out\n", "spotfi/api/fu\x00zz/x/out",
        f"{topics.base}/status", f"{topics.base}/rpc/response", f"{topics.base}/x/in", "",
        "/", "spotfi/api/fuzz/x/out/#", "spotfi/api/a\nb/x/out", "spotfi/api/a\x01b/x/out",
        "spotfi/api/a\x85b/x/out", "spotfi/api/a\ufffeb/x/out", "spotfi/api/a\ud800b/x/out",
        "spotfi/api/" + "a" * 70000 + "/x/out",
    ])
    return st.one_of(st.sampled_from([API_OUT, topics.x_out]), hostile, st.text(max_size=40),
                     json_value)


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


x_data_field = st.one_of(
    st.binary(max_size=48).map(_b64),
    st.sampled_from(["!!!!", "abc", "YQ", "YQ==\n", "Y Q = =", "====", "é", "\x00", "YQ==YQ=="]),
    st.integers(100, 6000).map(lambda n: _b64(b"y" * n)),  # large, still valid
    st.text(max_size=16),
    json_value,
)
_window = st.one_of(st.integers(1, 300), st.integers(-5, 2000), st.integers(2**31, 2**70))


def _with_extras(draw: st.DrawFn, fields: dict[str, Any]) -> dict[str, Any]:
    """Drop some fields (never all) and add unknown ones."""
    gone = draw(st.sets(st.sampled_from(sorted(fields)), max_size=max(0, len(fields) - 1)))
    kept = {key: value for key, value in fields.items() if key not in gone}
    kept.update(draw(st.dictionaries(st.text(max_size=10), json_value, max_size=2)))
    return kept


@st.composite
def x_message(draw: st.DrawFn, topics: Topics) -> dict[str, Any]:
    kind = draw(st.sampled_from(["x-start", "x-data", "x-stop", "x-resize", "x-data"]))
    fields: dict[str, Any] = {
        "type": draw(st.one_of(st.just(kind), st.just(kind), st.just(kind), json_value,
                               st.sampled_from(["x-started", "x-error", "X-START", "rpc"]))),
        "sessionId": draw(_maybe(st.one_of(st.sampled_from(SESSION_POOL),
                                           st.text(min_size=1, max_size=30)))),
    }
    if kind == "x-start":
        fields["responseTopic"] = draw(response_topics(topics))
        fields["timestamp"] = draw(_maybe(st.just("2025-12-19T10:00:00.000Z")))
    if kind in ("x-start", "x-resize"):
        fields["cols"] = draw(_maybe(_window))
        fields["rows"] = draw(_maybe(_window))
    if kind == "x-data":
        fields["data"] = draw(x_data_field)
    return _with_extras(draw, fields)


RPC_PATHS = ["bridge", "system", "file", "network.interface", "network.device", "log",
             "service", "uspot", "hostapd", "uci", "", "bridge ", "BRIDGE", "../", "-h"]
RPC_METHODS = ["ping", "info", "sessions", "board", "read", "stat", "list", "dump", "status",
               "exec", "write", "wlan0/get_status", "", "-v", "x" * 300]
RPC_ARG_KEYS = ["path", "command", "params", "lines", "interface", "name", "base64", "data",
                "env", "config"]
RPC_PATH_ARGS = ["/", "/proc/self/status", "/etc/hostname", "/dev/zero", "/nonexistent",
                 "../../etc/passwd", "", "a\x00b", "/proc"]
_TIMESTAMPS = ["2025-12-19T10:00:00.000Z", "2999-01-01T00:00:00Z", "1970-01-01T00:00:00Z",
               "yesterday", "2025-13-45T99:99:99Z", "9" * 40]


@st.composite
def rpc_message(draw: st.DrawFn) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "type": draw(st.one_of(st.just("rpc"), st.just("rpc"), json_value,
                               st.sampled_from(["rpc-result", "RPC"]))),
        "id": draw(st.one_of(
            st.integers(0, 10**6).map(lambda n: f"cmd_fuzz_{n}"), st.integers(),
            st.floats(allow_nan=True), st.text(max_size=30), _huge_text(300, 2000),
            json_value)),
        "path": draw(_maybe(st.sampled_from(RPC_PATHS))),
        "method": draw(_maybe(st.sampled_from(RPC_METHODS))),
        "args": draw(st.one_of(
            st.dictionaries(st.sampled_from(RPC_ARG_KEYS),
                            st.one_of(st.sampled_from(RPC_PATH_ARGS), json_value), max_size=3),
            json_value)),
    }
    optional = draw(st.sets(st.sampled_from(["timeout", "timestamp", "expiresAt",
                                             "responseTopic"]), max_size=2))
    if "timeout" in optional:
        fields["timeout"] = draw(_maybe(st.one_of(st.integers(-10, 10**9),
                                                  st.floats(allow_nan=True))))
    for key in ("timestamp", "expiresAt"):
        if key in optional:
            fields[key] = draw(_maybe(st.sampled_from(_TIMESTAMPS)))
    if "responseTopic" in optional:  # not part of RPC: a bridge that honoured it would be wrong
        fields["responseTopic"] = draw(st.sampled_from(["#", "spotfi/router/other/rpc/response"]))
    return _with_extras(draw, fields)


@st.composite
def plausible_rpc_message(draw: st.DrawFn) -> dict[str, Any]:
    """Well-formed up to the arguments, so the backends' own validation meets the junk."""
    return {"type": "rpc", "id": draw(st.integers(0, 10**9).map(lambda n: f"cmd_p{n}")),
            "path": draw(st.sampled_from(RPC_PATHS[:10])),
            "method": draw(st.sampled_from(RPC_METHODS)),
            "args": draw(st.dictionaries(st.sampled_from(RPC_ARG_KEYS), st.one_of(
                st.sampled_from(RPC_PATH_ARGS), st.lists(st.sampled_from(RPC_PATH_ARGS)),
                json_value), max_size=3))}


@st.composite
def plausible_x_message(draw: st.DrawFn, topics: Topics) -> dict[str, Any]:
    """Well-formed x-tunnel traffic on the shared session ids: sessions start, take input,
    resize and stop, while the rest of the flood hits them."""
    kind = draw(st.sampled_from(["x-start", "x-data", "x-data", "x-stop", "x-resize"]))
    body: dict[str, Any] = {"type": kind, "sessionId": draw(st.sampled_from(SESSION_POOL))}
    if kind == "x-start":
        body["responseTopic"] = draw(st.sampled_from([API_OUT, topics.x_out]))
    if kind in ("x-start", "x-resize"):
        body["cols"], body["rows"] = draw(st.integers(1, 1000)), draw(st.integers(1, 1000))
    if kind == "x-data":
        body["data"] = draw(x_data_field)
    return body


def _topic_level() -> st.SearchStrategy[str]:
    # what Mosquitto accepts in a PUBLISH topic (else it drops the publisher): UTF-8 without
    # surrogates, control characters, non-characters (unassigned, Cn), NUL or wildcards
    return st.text(st.characters(blacklist_categories=("Cs", "Cc", "Cn"),
                                 blacklist_characters="+#/"),
                   max_size=10)


def stray_topics(topics: Topics) -> st.SearchStrategy[str]:
    """Topics in the router's tree other than the two it subscribes to."""
    return st.one_of(
        st.lists(_topic_level(), min_size=1, max_size=4).map(
            lambda levels: topics.base + "/" + "/".join(levels)),
        st.sampled_from([topics.rpc_request + "/", topics.rpc_request + "/x", topics.x_in + "/",
                         topics.base + "/X/IN", topics.base + "/rpc/Request", topics.base + "/",
                         topics.status, topics.metrics, topics.rpc_response, topics.x_out,
                         topics.base + "//x/in"]),
    )


#: (damage or None, seed for its random choices): None most of the time
damage_plans = st.tuples(st.one_of(*[st.none()] * 6, st.sampled_from(DAMAGES)),
                         st.integers(0, 2**32))


# --------------------------------------------------------------------------- bytes


def encode(obj: Any, ascii_only: bool = False) -> bytes:
    """JSON as a sloppy sender would write it: NaN/Infinity allowed; lone surrogates kept,
    as ``\\ud800`` escapes (``ascii_only``) or as raw, invalid UTF-8 bytes."""
    try:
        return json.dumps(obj, ensure_ascii=ascii_only, allow_nan=True).encode(
            "utf-8", "surrogatepass")
    except (RecursionError, ValueError):
        return b'{"type":'


def damage(payload: bytes, kind: Optional[str], rng: random.Random, max_inbound_bytes: int
           ) -> bytes:
    """``payload`` broken at the byte level in the way ``kind`` names (None: untouched)."""
    if kind is None:
        return payload
    if kind == "truncate":
        return payload[:rng.randrange(len(payload))] if payload else payload
    if kind in ("bad-utf8", "nul"):
        where = rng.randint(0, len(payload))
        bad = b"\x00" if kind == "nul" else rng.choice(
            [b"\xff", b"\xc0\xaf", b"\xe2\x82", b"\x80", b"\xf8\x88\x80\x80", b"\xed\xa0\x80"])
        return payload[:where] + bad + payload[where:]
    if kind == "not-object":
        return rng.choice([b"[]", b"null", b"42", b'"x-start"', b"true", b"NaN", b"-Infinity",
                           b"1e999999", b"9" * 5000, b"[" + payload + b"]"])
    if kind == "deep":
        # below max_inbound_bytes, so the parser (not the size check) meets it
        if rng.random() < 0.5:
            depth = rng.randint(500, max_inbound_bytes // 2 - 2)
            return b"[" * depth + b"]" * depth
        depth = rng.randint(500, max_inbound_bytes // 6 - 2)
        return b'{"a":' * depth + b"1" + b"}" * depth
    if kind == "oversized":
        return payload + b" " * (max_inbound_bytes + rng.randint(1, 4096) - len(payload))
    if kind == "empty":
        return b""
    if kind == "garbage":
        return rng.randbytes(rng.randint(1, 200))
    if kind == "surrogate":
        return payload.replace(b'"', b'"\\ud800', 1) if rng.random() < 0.5 else \
            b'{"type":"x-start","sessionId":"\xed\xa0\x80"}'
    raise ValueError(kind)


# --------------------------------------------------------------------------- corpus


@dataclass(frozen=True)
class Drawn:
    """One message as Hypothesis drew it: where it goes, its fields, how to break it."""

    topic: str
    body: dict[str, Any]
    damage: Optional[str]
    seed: int


@st.composite
def drawn_message(draw: st.DrawFn, topics: Topics) -> Drawn:
    where = draw(st.sampled_from(["x", "x", "x-plausible", "rpc", "rpc", "rpc-plausible",
                                  "stray"]))
    if where == "x":
        topic, body = topics.x_in, draw(x_message(topics))
    elif where == "x-plausible":
        topic, body = topics.x_in, draw(plausible_x_message(topics))
    elif where == "rpc":
        topic, body = topics.rpc_request, draw(rpc_message())
    elif where == "rpc-plausible":
        topic, body = topics.rpc_request, draw(plausible_rpc_message())
    else:
        topic = draw(stray_topics(topics))
        body = draw(st.one_of(x_message(topics), rpc_message()))
    kind, seed = draw(damage_plans)
    return Drawn(topic, body, kind, seed)


def render(message: Drawn, max_inbound_bytes: int) -> Message:
    payload = damage(encode(message.body, bool(message.seed % 2)), message.damage,
                     random.Random(message.seed), max_inbound_bytes)
    return message.topic, payload


class Recombiner:
    """Many more messages from a Hypothesis corpus: fields crossed over between messages
    of the same topic, then damaged; deterministic for a given seed."""

    def __init__(self, corpus: list[Drawn], seed: int, max_inbound_bytes: int) -> None:
        if not corpus:
            raise ValueError("empty corpus")
        self.corpus = corpus
        self.rng = random.Random(seed)
        self.limit = max_inbound_bytes
        self.values: dict[tuple[str, str], list[Any]] = defaultdict(list)
        for message in corpus:
            for key, value in message.body.items():
                self.values[(message.topic, key)].append(value)
        self.keys: dict[str, list[tuple[str, str]]] = defaultdict(list)
        for topic, key in self.values:
            self.keys[topic].append((topic, key))
        self.damage_counts: dict[str, int] = defaultdict(int)
        self.serial = 0

    def next(self) -> Message:
        rng = self.rng
        template = rng.choice(self.corpus)
        body = dict(template.body)
        for key in list(body):
            roll = rng.random()
            if roll < 0.25:
                body[key] = rng.choice(self.values[(template.topic, key)])
            elif roll < 0.3:
                del body[key]
        if rng.random() < 0.2:
            other = rng.choice(self.keys[template.topic])
            body[other[1]] = rng.choice(self.values[other])
        self.serial += 1
        # fresh ids, or every RPC past the first few would only exercise the dedup table
        # and every session id would soon be one that already ended
        if "id" in body and rng.random() < 0.8:
            body["id"] = f"cmd_r{self.serial}" if rng.random() < 0.8 else self.serial
        if "sessionId" in body and rng.random() < 0.3:  # shared by ~6 messages: start, stop...
            body["sessionId"] = f"fuzz-r{self.serial // 20}"
        kind = rng.choice(DAMAGES) if rng.random() < 0.25 else None
        self.damage_counts[kind or "none"] += 1
        return template.topic, damage(encode(body, rng.random() < 0.5), kind, rng, self.limit)


def explicit_messages(topics: Topics) -> list[Message]:
    """Always in the flood, whatever Hypothesis draws: one message per refusal path the
    flood test asserts was reached (like Hypothesis' ``@example``)."""
    def rpc(body: dict[str, Any]) -> Message:
        return topics.rpc_request, encode({"type": "rpc", **body})

    def x(body: dict[str, Any]) -> Message:
        return topics.x_in, encode(body)

    session = "fuzz-explicit"
    return [
        rpc({"id": "explicit-exec", "path": "file", "method": "exec",
             "args": {"command": "/bin/touch", "params": ["/tmp/spotfi-fuzz-pwned"]}}),
        rpc({"id": "explicit-write", "path": "file", "method": "write",
             "args": {"path": "/tmp/spotfi-fuzz-pwned", "data": "x"}}),
        rpc({"id": "explicit-expired", "path": "system", "method": "info",
             "timestamp": "2000-01-01T00:00:00Z"}),
        rpc({"path": "system", "method": "info"}),  # no id: unroutable
        rpc({"id": "explicit-invalid", "path": 5, "method": "info"}),
        x({"type": "x-start", "sessionId": "fuzz-explicit-bad-topic", "responseTopic": "#"}),
        x({"type": "x-start", "sessionId": session, "responseTopic": API_OUT}),
        x({"type": "x-data", "sessionId": session, "data": _b64(b"echo hostile\n")}),
        x({"type": "x-data", "sessionId": session, "data": "!!not base64!!"}),
        x({"type": "x-resize", "sessionId": session, "cols": 0, "rows": 10**9}),
        x({"type": "x-stop"}),
        x({"type": "x-stop", "sessionId": session}),
    ]
