"""The wire layer: topics, RPC and x-tunnel parsing/building, against docs/PROTOCOL.md."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spotfi_bridge import protocol
from spotfi_bridge.protocol import (
    ParseError,
    RpcRequest,
    Topics,
    XData,
    XParseError,
    XResize,
    XStart,
    XStop,
    api_rpc_request,
    api_x_data,
    api_x_resize,
    api_x_start,
    api_x_stop,
    parse_rpc_request,
    parse_x_message,
    rpc_error,
    rpc_success,
)


def js(payload: bytes) -> Any:
    return json.loads(payload.decode("utf-8"))


def js_truthy(value: Any) -> bool:
    """JavaScript truthiness of a JSON value (what ``response.result || response`` tests)."""
    if value is None or value is False or value == "":
        return False
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value != 0 and value == value  # 0, -0 and NaN are falsy
    return True  # true, non-empty strings, every object and array (even empty)


# --------------------------------------------------------------------------- topics


def test_topics() -> None:
    t = Topics("router-1")
    assert t.status == "spotfi/router/router-1/status"
    assert t.metrics == "spotfi/router/router-1/metrics"
    assert t.rpc_request == "spotfi/router/router-1/rpc/request"
    assert t.rpc_response == "spotfi/router/router-1/rpc/response"
    assert t.x_in == "spotfi/router/router-1/x/in"
    assert t.x_out == "spotfi/router/router-1/x/out"


@pytest.mark.parametrize("topic", [
    "spotfi/api/api-7f3a/x/out",
    "spotfi/api/instance_1.example/x/out",
    "spotfi/router/router-1/x/out",
])
def test_response_topic_accepted(topic: str) -> None:
    assert Topics("router-1").response_topic_problem(topic) is None


@pytest.mark.parametrize("topic", [
    "#",
    "+",
    "spotfi/api/+/x/out",
    "spotfi/api/#",
    "spotfi/api/inst/x/#",
    "spotfi/api/inst/x/+",
    "$SYS/broker/log",
    "$SYS/spotfi/api/inst/x/out",
    "spotfi/router/other-router/x/out",
    "spotfi/router/router-1/x/in",
    "spotfi/router/router-1/status",
    "spotfi/router/router-1/rpc/response",
    "spotfi/api//x/out",
    "spotfi/api/a/b/x/out",
    "spotfi/api/inst/x/out/extra",
    "/spotfi/api/inst/x/out",
    "spotfi/api/inst/x/out/",
    "spotfi/api/inst/x/out\n",
    "spotfi/api/in\x00st/x/out",
    "SPOTFI/api/inst/x/out",
    "",
])
def test_response_topic_refused(topic: str) -> None:
    problem = Topics("router-1").response_topic_problem(topic)
    assert problem is not None and "responseTopic" in problem


@pytest.mark.parametrize("router_id", ["a/b", "a+b", "a#b", "a b", "a\tb", "a\nb", "", "x" * 129])
def test_router_id_problem(router_id: str) -> None:
    assert protocol.router_id_problem(router_id) is not None


def test_router_id_ok() -> None:
    assert protocol.router_id_problem("cm0abc123-xyz_Router.1") is None


# --------------------------------------------------------------------------- RPC requests


def test_parse_rpc_request_compat() -> None:
    payload = (b'{"type":"rpc","id":"cmd_1700000000_a9f1_1","path":"system","method":"info",'
               b'"args":{},"timeout":30000,"timestamp":"2025-12-19T10:00:00.000Z",'
               b'"expiresAt":"2025-12-19T10:00:30.000Z"}')
    assert parse_rpc_request(payload) == RpcRequest(
        "cmd_1700000000_a9f1_1", "system", "info", {}, 30000, "2025-12-19T10:00:00.000Z",
        "2025-12-19T10:00:30.000Z")


def test_parse_rpc_request_defaults() -> None:
    req = parse_rpc_request(b'{"id":"c1","path":"hostapd","method":"wlan0/get_status"}')
    assert req == RpcRequest("c1", "hostapd", "wlan0/get_status", {})
    req = parse_rpc_request(b'{"id":"c1","path":"system","method":"board","args":null}')
    assert isinstance(req, RpcRequest) and req.args == {}


@pytest.mark.parametrize("req_id", [42, 0, -7, 1.5, "", "x" * 300])
def test_rpc_ids_echoed_unchanged(req_id: Any) -> None:
    req = parse_rpc_request(api_rpc_request(req_id, "system", "info"))
    assert isinstance(req, RpcRequest)
    assert req.id == req_id and type(req.id) is type(req_id)
    assert js(rpc_success(req.id, {"a": 1}))["id"] == req_id
    error = parse_rpc_request(api_rpc_request(req_id, "system", "info", timeout="soon"))
    assert isinstance(error, ParseError) and error.id == req_id and type(error.id) is type(req_id)


@pytest.mark.parametrize(("payload", "fragment"), [
    (b"", "not valid JSON"),
    (b"not json", "not valid JSON"),
    (b'{"id":"c1",', "not valid JSON"),
    (b"\xff\xfe{}", "UTF-8"),
    (b'{"id":"c1","path":"\xc3\x28"}', "UTF-8"),
    (b"[1,2]", "JSON object"),
    (b'"text"', "JSON object"),
    (b"null", "JSON object"),
    (b"42", "JSON object"),
    (b"[" * 100000 + b"]" * 100000, "nested"),
    (b'{"id":' + b"1" * 5000 + b"}", "JSON"),
])
def test_rpc_unparseable_payload_gives_error_without_id(payload: bytes, fragment: str) -> None:
    result = parse_rpc_request(payload)
    assert isinstance(result, ParseError)
    assert result.id is None
    assert fragment in result.error


@pytest.mark.parametrize("obj", [
    {"path": "system", "method": "info"},
    {"id": None, "path": "system", "method": "info"},
    {"id": True, "path": "system", "method": "info"},
    {"id": {"x": 1}, "path": "system", "method": "info"},
    {"id": ["c1"], "path": "system", "method": "info"},
])
def test_rpc_without_usable_id(obj: dict[str, Any]) -> None:
    result = parse_rpc_request(json.dumps(obj).encode())
    assert result == ParseError("missing or invalid 'id'")


@pytest.mark.parametrize(("extra", "fragment"), [
    ({"path": None}, "'path'"),
    ({"path": ""}, "'path'"),
    ({"path": 5}, "'path'"),
    ({"path": ["system"]}, "'path'"),
    ({"method": None}, "'method'"),
    ({"method": ""}, "'method'"),
    ({"method": {"name": "info"}}, "'method'"),
    ({"args": []}, "'args'"),
    ({"args": "x=1"}, "'args'"),
    ({"args": 3}, "'args'"),
    ({"type": "rpc-result"}, "unknown message type"),
    ({"type": None}, "unknown message type"),
    ({"type": 7}, "unknown message type"),
    ({"timeout": 0}, "'timeout'"),
    ({"timeout": -5}, "'timeout'"),
    ({"timeout": "30000"}, "'timeout'"),
    ({"timeout": True}, "'timeout'"),
    ({"timeout": [1]}, "'timeout'"),
    ({"timestamp": 1700000000}, "'timestamp'"),
    ({"expiresAt": 1700000000}, "'expiresAt'"),
])
def test_rpc_bad_field_keeps_the_id(extra: dict[str, Any], fragment: str) -> None:
    obj = {"type": "rpc", "id": "cmd_1", "path": "system", "method": "info", "args": {}, **extra}
    result = parse_rpc_request(json.dumps(obj).encode())
    assert isinstance(result, ParseError)
    assert result.id == "cmd_1"
    assert fragment in result.error


def test_unknown_type_is_shortened() -> None:
    result = parse_rpc_request(json.dumps({"id": "c", "type": "z" * 10000}).encode())
    assert isinstance(result, ParseError) and len(result.error) < 200


# --------------------------------------------------------------------------- RPC replies


@pytest.mark.parametrize(("result", "expected"), [
    (None, {}),
    ("", {"value": ""}),
    (0, {"value": 0}),
    (0.0, {"value": 0.0}),
    (False, {"value": False}),
    ({}, {}),
    ([], []),
    (True, True),
    (1, 1),
    ("ok", "ok"),
    ({"code": 0, "stdout": "", "stderr": ""}, {"code": 0, "stdout": "", "stderr": ""}),
])
def test_rpc_success_result_is_never_falsy_in_javascript(result: Any, expected: Any) -> None:
    message = js(rpc_success("cmd_1", result))
    assert message["type"] == "rpc-result"
    assert message["id"] == "cmd_1"
    assert message["status"] == "success"
    assert message["result"] == expected
    assert js_truthy(message["result"])


def test_rpc_success_extra_fields_and_compact_json() -> None:
    payload = rpc_success("c", {"uptime": 5}, durationMs=12)
    assert payload == (b'{"type":"rpc-result","id":"c","status":"success","result":{"uptime":5},'
                       b'"durationMs":12}')


def test_rpc_error_shape() -> None:
    message = js(rpc_error("c2", "Command failed: Not found", stderr="boom"))
    assert message == {"type": "rpc-result", "id": "c2", "status": "error",
                       "error": "Command failed: Not found", "result": {}, "stderr": "boom"}
    assert "stderr" not in js(rpc_error(7, "x"))
    assert js(rpc_error(7, "x"))["id"] == 7
    assert js(rpc_error(None, "bad request"))["id"] is None


def test_non_ascii_survives() -> None:
    assert js(rpc_success("c", {"name": "Café ☕"}))["result"]["name"] == "Café ☕"


# --------------------------------------------------------------------------- x-tunnel


def test_x_round_trips_with_api_builders() -> None:
    assert parse_x_message(api_x_start("s1", "spotfi/api/i1/x/out")) == XStart(
        "s1", "spotfi/api/i1/x/out", 80, 24)
    assert parse_x_message(api_x_start("s1", None, cols=132, rows=43)) == XStart("s1", None, 132, 43)
    raw = bytes(range(256)) * 3
    assert parse_x_message(api_x_data("s1", raw)) == XData("s1", raw)
    assert parse_x_message(api_x_data("s1", b"")) == XData("s1", b"")
    assert parse_x_message(api_x_stop("s1")) == XStop("s1")
    assert parse_x_message(api_x_resize("s1", 200, 50)) == XResize("s1", 200, 50)
    req = parse_rpc_request(api_rpc_request("cmd_9", "file", "exec",
                                            {"command": "/bin/sh", "params": ["-c", "echo hi"]},
                                            timeout=120000))
    assert req == RpcRequest("cmd_9", "file", "exec",
                             {"command": "/bin/sh", "params": ["-c", "echo hi"]}, 120000)


def test_compat_x_messages_from_the_api() -> None:
    start = (b'{"type":"x-start","sessionId":"router-1-1700000000000-ab12",'
             b'"responseTopic":"spotfi/api/api-1/x/out","timestamp":"2025-12-19T10:00:00.000Z"}')
    assert parse_x_message(start) == XStart("router-1-1700000000000-ab12", "spotfi/api/api-1/x/out",
                                            sent_at=1766138400.0)
    stop = b'{"type":"x-stop","sessionId":"s","timestamp":"2025-12-19T10:00:00.000Z"}'
    assert parse_x_message(stop) == XStop("s")


def test_router_side_builders() -> None:
    assert js(protocol.x_started("s1")) == {"type": "x-started", "sessionId": "s1", "status": "ready",
                                             "capabilities": list(protocol.TERMINAL_CAPABILITIES)}
    message = js(protocol.x_data("s1", b"\x1b[0m\xff", 7))
    assert message == {"type": "x-data", "sessionId": "s1",
                       "data": base64.b64encode(b"\x1b[0m\xff").decode(), "seq": 7}
    assert js(protocol.x_error("s1", "exited", reason="exit", exitCode=3)) == {
        "type": "x-error", "sessionId": "s1", "error": "exited", "reason": "exit", "exitCode": 3}
    assert js(protocol.metrics_message({"uptime": "5"})) == {"type": "metrics",
                                                             "metrics": {"uptime": "5"}}


@pytest.mark.parametrize(("obj", "error", "session_id"), [
    ({"type": "x-stop"}, "'sessionId'", None),
    ({"type": "x-stop", "sessionId": ""}, "'sessionId'", None),
    ({"type": "x-stop", "sessionId": 5}, "'sessionId'", None),
    ({"type": "x-stop", "sessionId": None}, "'sessionId'", None),
    ({"type": "x-stop", "sessionId": "s" * 257}, "'sessionId'", None),
    ({"type": "x-data", "sessionId": "s1"}, "base64", "s1"),
    ({"type": "x-data", "sessionId": "s1", "data": 5}, "base64", "s1"),
    ({"type": "x-data", "sessionId": "s1", "data": ["aGk="]}, "base64", "s1"),
    ({"type": "x-data", "sessionId": "s1", "data": "not base64!"}, "not valid base64", "s1"),
    ({"type": "x-data", "sessionId": "s1", "data": "aGk"}, "not valid base64", "s1"),
    ({"type": "x-data", "sessionId": "s1", "data": "aGk=\n"}, "not valid base64", "s1"),
    ({"type": "x-data", "sessionId": "s1", "data": "é"}, "not valid base64", "s1"),
    ({"type": "x-start", "sessionId": "s1", "cols": 0}, "'cols'", "s1"),
    ({"type": "x-start", "sessionId": "s1", "cols": 100000}, "'cols'", "s1"),
    ({"type": "x-start", "sessionId": "s1", "rows": 1001}, "'rows'", "s1"),
    ({"type": "x-start", "sessionId": "s1", "rows": -1}, "'rows'", "s1"),
    ({"type": "x-start", "sessionId": "s1", "cols": "80"}, "'cols'", "s1"),
    ({"type": "x-start", "sessionId": "s1", "cols": 80.5}, "'cols'", "s1"),
    ({"type": "x-start", "sessionId": "s1", "cols": True}, "'cols'", "s1"),
    ({"type": "x-start", "sessionId": "s1", "cols": None}, "'cols'", "s1"),
    ({"type": "x-start", "sessionId": "s1", "responseTopic": 5}, "'responseTopic'", "s1"),
    ({"type": "x-resize", "sessionId": "s1"}, "'cols'", "s1"),
    ({"type": "x-resize", "sessionId": "s1", "cols": 100}, "'rows'", "s1"),
    ({"type": "x-resize", "sessionId": "s1", "cols": 10 ** 9, "rows": 10 ** 9}, "'cols'", "s1"),
    ({"type": "x-bogus", "sessionId": "s1"}, "unknown message type", "s1"),
    ({"sessionId": "s1"}, "unknown message type", "s1"),
])
def test_x_parse_errors(obj: dict[str, Any], error: str, session_id: Any) -> None:
    result = parse_x_message(json.dumps(obj).encode())
    assert isinstance(result, XParseError)
    assert error in result.error
    assert result.session_id == session_id


def test_x_start_error_keeps_the_response_topic() -> None:
    result = parse_x_message(api_x_start("s1", "spotfi/api/i1/x/out", cols=0))
    assert result == XParseError("'cols' must be an integer from 1 to 1000, got 0", "s1",
                                 "spotfi/api/i1/x/out")


@pytest.mark.parametrize("payload", [b"", b"\xff", b"[]", b"nope", b"{" * 50000,
                                     b'{"sessionId":"s","type":"x-stop","n":' + b"9" * 5000 + b"}"])
def test_x_unparseable_payload(payload: bytes) -> None:
    result = parse_x_message(payload)
    assert isinstance(result, XParseError) and result.session_id is None and result.error


# --------------------------------------------------------------------------- never raise

_json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
_json_values = st.recursive(
    _json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children,
                                                                      max_size=4),
    max_leaves=12)
_keys = st.sampled_from(["type", "id", "path", "method", "args", "timeout", "timestamp", "expiresAt",
                         "sessionId", "data", "cols", "rows", "responseTopic"])
_types = st.sampled_from(["rpc", "x-start", "x-data", "x-stop", "x-resize", "x-bogus"])
_messages = st.dictionaries(_keys, _json_values | _types, max_size=8)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_parsers_never_raise_on_arbitrary_bytes(payload: bytes) -> None:
    assert isinstance(parse_rpc_request(payload), (RpcRequest, ParseError))
    assert isinstance(parse_x_message(payload), (XStart, XData, XStop, XResize, XParseError))


@settings(max_examples=300, deadline=None)
@given(_messages)
def test_parsers_never_raise_on_arbitrary_json_objects(obj: dict[str, Any]) -> None:
    payload = json.dumps(obj).encode()
    rpc = parse_rpc_request(payload)
    assert isinstance(rpc, (RpcRequest, ParseError))
    if isinstance(rpc, ParseError) and rpc.id is not None:
        assert rpc.id == obj["id"]  # an id is only ever echoed as sent
    x = parse_x_message(payload)
    assert isinstance(x, (XStart, XData, XStop, XResize, XParseError))
