"""The SpotFi wire contract (``docs/PROTOCOL.md``), pure: no I/O, no clock, no state.

Inbound payloads are parsed into small typed messages or a :class:`ParseError`
that still carries whatever id could be read, so callers can answer the sender.
Outbound messages are built here so that the daemon and ``spotfi-bridge-ctl``
speak exactly the same bytes.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Optional, Union

STATUS_ONLINE = b"ONLINE"
STATUS_OFFLINE = b"OFFLINE"

#: Extensions this bridge announces in ``x-started``.
TERMINAL_CAPABILITIES = ("resize", "seq", "exit-code", "initial-size")

_FORBIDDEN_ID_CHARS = re.compile(r"[/+#\s\x00]")
#: one topic level, no wildcard, NUL or C0/C1 control character (Mosquitto drops a client that
#: publishes one), at most 128 characters
_API_OUT_TOPIC = re.compile(r"^spotfi/api/([^/+#\x00-\x1f\x7f-\x9f]{1,128})/x/out$")
#: MQTT's limit on a topic's UTF-8 length.
MAX_TOPIC_BYTES = 65535


def topic_problem(topic: str) -> Optional[str]:
    """Why a PUBLISH to ``topic`` would be refused by paho or make the broker drop the
    connection, or ``None``. MQTT forbids NUL, wildcards and more than 65535 bytes;
    Mosquitto also disconnects a client for control characters (U+0001-U+001F,
    U+007F-U+009F) and non-characters; a lone surrogate cannot be encoded at all."""
    if not topic:
        return "empty topic"
    if "+" in topic or "#" in topic:
        return "wildcard in topic"
    try:
        size = len(topic.encode("utf-8"))
    except UnicodeEncodeError:
        return "topic is not valid Unicode (lone surrogate)"
    if size > MAX_TOPIC_BYTES:
        return f"topic is {size} bytes long, over MQTT's {MAX_TOPIC_BYTES}"
    for char in topic:
        code = ord(char)
        if code <= 0x1F or 0x7F <= code <= 0x9F:
            return f"control character U+{code:04X} in topic"
        if 0xFDD0 <= code <= 0xFDEF or (code & 0xFFFE) == 0xFFFE:
            return f"non-character U+{code:04X} in topic"
    return None


def _encodable(text: str) -> bool:
    """Whether ``text`` can go out as UTF-8 (JSON from the network may hold lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def router_id_problem(router_id: str) -> Optional[str]:
    """Why ``router_id`` cannot be used in the topic tree, or ``None`` when it can."""
    if not router_id:
        return "must not be empty"
    if _FORBIDDEN_ID_CHARS.search(router_id):
        return "must not contain '/', '+', '#', NUL or whitespace"
    if len(router_id.encode()) > 128:
        return "must be at most 128 bytes"
    return None


@dataclass(frozen=True)
class Topics:
    """Every topic of one router, derived from its id."""

    router_id: str

    @property
    def base(self) -> str:
        return f"spotfi/router/{self.router_id}"

    @property
    def status(self) -> str:
        return f"{self.base}/status"

    @property
    def metrics(self) -> str:
        return f"{self.base}/metrics"

    @property
    def rpc_request(self) -> str:
        return f"{self.base}/rpc/request"

    @property
    def rpc_response(self) -> str:
        return f"{self.base}/rpc/response"

    @property
    def x_in(self) -> str:
        return f"{self.base}/x/in"

    @property
    def x_out(self) -> str:
        return f"{self.base}/x/out"

    def response_topic_problem(self, topic: str) -> Optional[str]:
        """Why output must not go to ``topic``, or ``None`` when it may.

        Only an API instance's ``spotfi/api/<one level>/x/out`` or this router's own
        ``x/out`` are accepted: anything else could be used to make the router spray
        terminal output onto another router's topics, a wildcard or ``$SYS``.
        """
        if topic == self.x_out:
            return None
        if _API_OUT_TOPIC.fullmatch(topic) and topic_problem(topic) is None:
            return None  # fullmatch: '$' alone lets a trailing newline in
        return "responseTopic must be spotfi/api/<instance>/x/out or this router's x/out"


# --------------------------------------------------------------------------- JSON


def encode(message: dict[str, Any]) -> bytes:
    """Compact JSON, as every SpotFi component expects."""
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def decode_object(payload: bytes) -> Union[dict[str, Any], str]:
    """The JSON object in ``payload``, or a human reason why there is none."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        return "payload is not valid UTF-8"
    try:
        value = json.loads(text)
    except RecursionError:
        return "payload JSON is nested too deeply"
    except json.JSONDecodeError as exc:
        return f"payload is not valid JSON: {exc.msg} at position {exc.pos}"
    except ValueError as exc:  # e.g. an integer over Python's 4300-digit conversion limit
        return f"payload is not usable JSON: {str(exc)[:100]}"
    if not isinstance(value, dict):
        return f"payload must be a JSON object, got {type(value).__name__}"
    return value


def _readable_id(obj: dict[str, Any], key: str) -> Any:
    """The id as sent, when it is usable to route a reply (JSON scalar, not null)."""
    value = obj.get(key)
    if isinstance(value, float) and not math.isfinite(value):
        return None  # NaN/Infinity cannot be echoed back as JSON
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return value
    return None


@dataclass(frozen=True)
class ParseError:
    """A message that could not be understood; ``id`` is set when a reply can be routed."""

    error: str
    id: Any = None


# --------------------------------------------------------------------------- send times

_ISO_8601 = re.compile(
    r"^(\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(?::\d{2})?)(?:[.,](\d+))?(Z|[+-]\d{2}(?::?\d{2})?)?$",
    re.IGNORECASE)
#: The API's request ids: ``cmd_<epoch ms>_<instance prefix>_<n>`` (``Date.now()``); ids with
#: 10 digits there are read as epoch seconds (older tools and this page's examples).
_API_ID_TIME = re.compile(r"^cmd_(\d{13}|\d{10})_")


def parse_iso8601(text: str) -> Optional[float]:
    """POSIX seconds of an ISO 8601 date-time (``Z``, offsets, any fraction; naive is UTC),
    on every Python from 3.9 (whose ``fromisoformat`` takes neither ``Z`` nor 3 digits)."""
    match = _ISO_8601.match(text.strip())
    if not match:
        return None
    base, fraction, zone = match.groups()
    if fraction:
        base += "." + (fraction + "000000")[:6]
    if zone and zone.upper() != "Z":
        digits = zone[1:].replace(":", "")
        zone = f"{zone[0]}{digits[:2]}:{digits[2:4] or '00'}"
    else:
        zone = "+00:00"
    from datetime import datetime  # 0.46 MB: on the first x-start, not at start-up

    try:
        return datetime.fromisoformat(base.replace(" ", "T") + zone).timestamp()
    except (ValueError, OverflowError):
        return None


def id_sent_at(req_id: Any) -> Optional[float]:
    """When the API sent a request, by the API's clock, read from its id; None for other ids."""
    if not isinstance(req_id, str):
        return None
    match = _API_ID_TIME.match(req_id)
    if match is None:
        return None
    digits = match.group(1)
    return int(digits) / 1000.0 if len(digits) == 13 else float(digits)


def _sent_at(value: Any) -> Optional[float]:
    """An ``x-start`` ``timestamp``: ISO 8601 (the API today) or epoch milliseconds."""
    if isinstance(value, str):
        return parse_iso8601(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
            and value > 0:
        return float(value) / 1000.0
    return None


# --------------------------------------------------------------------------- RPC


@dataclass(frozen=True)
class RpcRequest:
    id: Any
    path: str
    method: str
    args: dict[str, Any] = field(default_factory=dict)
    timeout_ms: Optional[float] = None
    timestamp: Optional[str] = None
    expires_at: Optional[str] = None


def parse_rpc_request(payload: bytes) -> Union[RpcRequest, ParseError]:
    obj = decode_object(payload)
    if isinstance(obj, str):
        return ParseError(obj)
    req_id = _readable_id(obj, "id")
    if req_id is None:
        return ParseError("missing or invalid 'id'")
    kind = obj.get("type", "rpc")
    if kind != "rpc":
        return ParseError(f"unknown message type {str(kind)[:64]!r}, expected 'rpc'", req_id)
    path, method = obj.get("path"), obj.get("method")
    if not isinstance(path, str) or not path:
        return ParseError("'path' must be a non-empty string", req_id)
    if not isinstance(method, str) or not method:
        return ParseError("'method' must be a non-empty string", req_id)
    args = obj.get("args", {})
    if args is None:
        args = {}
    if not isinstance(args, dict):
        return ParseError("'args' must be a JSON object", req_id)
    timeout = obj.get("timeout")
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0
    ):
        return ParseError("'timeout' must be a positive number of milliseconds", req_id)
    timestamp = obj.get("timestamp")
    expires_at = obj.get("expiresAt")
    for key, value in (("timestamp", timestamp), ("expiresAt", expires_at)):
        if value is not None and not isinstance(value, str):
            return ParseError(f"'{key}' must be an ISO 8601 string", req_id)
    return RpcRequest(req_id, path, method, args, timeout, timestamp, expires_at)


def rpc_success(req_id: Any, result: Any, **extra: Any) -> bytes:
    """A success reply whose ``result`` is never falsy in JavaScript (the API would hand back
    the whole envelope instead)."""
    if result is None:
        result = {}
    elif result is False or result == "" or (isinstance(result, (int, float)) and result == 0):
        # falsy in JavaScript: wrap it so ``response.result || response`` keeps it
        result = {"value": result}
    message: dict[str, Any] = {"type": "rpc-result", "id": req_id, "status": "success"}
    message["result"] = result
    message.update(extra)
    return encode(message)


def rpc_error(
    req_id: Any,
    error: str,
    *,
    result: Any = None,
    stderr: Optional[str] = None,
    **extra: Any,
) -> bytes:
    message: dict[str, Any] = {
        "type": "rpc-result",
        "id": req_id,
        "status": "error",
        "error": error,
        "result": result if result is not None else {},
    }
    if stderr:
        message["stderr"] = stderr
    message.update(extra)
    return encode(message)


# --------------------------------------------------------------------------- x-tunnel

DEFAULT_COLS, DEFAULT_ROWS = 80, 24
MAX_COLS, MAX_ROWS = 1000, 1000


@dataclass(frozen=True)
class XStart:
    session_id: str
    response_topic: Optional[str]
    cols: int = DEFAULT_COLS
    rows: int = DEFAULT_ROWS
    #: when the API sent it (POSIX seconds, the API's clock); None when it did not say, or
    #: said it in a form this bridge cannot read (the terminal then opens as before)
    sent_at: Optional[float] = None


@dataclass(frozen=True)
class XData:
    session_id: str
    data: bytes


@dataclass(frozen=True)
class XStop:
    session_id: str


@dataclass(frozen=True)
class XResize:
    session_id: str
    cols: int
    rows: int


XMessage = Union[XStart, XData, XStop, XResize]


@dataclass(frozen=True)
class XParseError:
    """An x/in message that cannot be acted on.

    ``session_id`` is set when the sender's session can be told; ``response_topic``
    when the message named one (the caller still validates it before use).
    """

    error: str
    session_id: Optional[str] = None
    response_topic: Optional[str] = None


def _window_size(obj: dict[str, Any], default_cols: Optional[int], default_rows: Optional[int]
                 ) -> Union[tuple[int, int], str]:
    sizes = []
    for key, default, limit in (("cols", default_cols, MAX_COLS), ("rows", default_rows, MAX_ROWS)):
        value = obj.get(key, default)
        if value is None or isinstance(value, bool) or not isinstance(value, int):
            return f"'{key}' must be an integer from 1 to {limit}"
        if not 1 <= value <= limit:
            return f"'{key}' must be an integer from 1 to {limit}, got {value}"
        sizes.append(value)
    return sizes[0], sizes[1]


def parse_x_message(payload: bytes) -> Union[XMessage, XParseError]:
    obj = decode_object(payload)
    if isinstance(obj, str):
        return XParseError(obj)
    session_id = obj.get("sessionId")
    if not isinstance(session_id, str) or not session_id or len(session_id) > 256 \
            or not _encodable(session_id):
        return XParseError("missing or invalid 'sessionId'")
    kind = obj.get("type")
    response_topic = obj.get("responseTopic")
    if response_topic is not None and not isinstance(response_topic, str):
        return XParseError("'responseTopic' must be a string", session_id)
    if kind == "x-start":
        size = _window_size(obj, DEFAULT_COLS, DEFAULT_ROWS)
        if isinstance(size, str):
            return XParseError(size, session_id, response_topic)
        return XStart(session_id, response_topic, size[0], size[1], _sent_at(obj.get("timestamp")))
    if kind == "x-data":
        data = obj.get("data")
        if not isinstance(data, str):
            return XParseError("'data' must be a base64 string", session_id)
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            return XParseError("'data' is not valid base64", session_id)
        return XData(session_id, raw)
    if kind == "x-stop":
        return XStop(session_id)
    if kind == "x-resize":
        size = _window_size(obj, None, None)
        if isinstance(size, str):
            return XParseError(size, session_id)
        return XResize(session_id, size[0], size[1])
    return XParseError(f"unknown message type {str(kind)[:64]!r}", session_id)


def x_started(session_id: str, capabilities: tuple[str, ...] = TERMINAL_CAPABILITIES) -> bytes:
    return encode({"type": "x-started", "sessionId": session_id, "status": "ready",
                   "capabilities": list(capabilities)})


def x_data(session_id: str, data: bytes, seq: int) -> bytes:
    return encode({"type": "x-data", "sessionId": session_id,
                   "data": base64.b64encode(data).decode("ascii"), "seq": seq})


def x_error(session_id: Optional[str], error: str, **extra: Any) -> bytes:
    message: dict[str, Any] = {"type": "x-error", "sessionId": session_id, "error": error}
    message.update(extra)
    return encode(message)


# API side (used by spotfi-bridge-ctl and the tests): the same bytes the SpotFi API sends.


def api_rpc_request(req_id: Any, path: str, method: str, args: Optional[dict[str, Any]] = None,
                    **extra: Any) -> bytes:
    message: dict[str, Any] = {"type": "rpc", "id": req_id, "path": path, "method": method,
                               "args": args or {}}
    message.update(extra)
    return encode(message)


def api_x_start(session_id: str, response_topic: Optional[str], **extra: Any) -> bytes:
    message: dict[str, Any] = {"type": "x-start", "sessionId": session_id}
    if response_topic is not None:
        message["responseTopic"] = response_topic
    message.update(extra)
    return encode(message)


def api_x_data(session_id: str, data: bytes) -> bytes:
    return encode({"type": "x-data", "sessionId": session_id,
                   "data": base64.b64encode(data).decode("ascii")})


def api_x_stop(session_id: str) -> bytes:
    return encode({"type": "x-stop", "sessionId": session_id})


def api_x_resize(session_id: str, cols: int, rows: int) -> bytes:
    return encode({"type": "x-resize", "sessionId": session_id, "cols": cols, "rows": rows})


# --------------------------------------------------------------------------- metrics


def metrics_message(metrics: dict[str, Any]) -> bytes:
    return encode({"type": "metrics", "metrics": metrics})
