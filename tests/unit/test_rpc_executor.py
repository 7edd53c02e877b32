"""The executor: validation, one reply per id, dedup, expiry, policy, limits, shutdown."""

from __future__ import annotations

import json
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Optional

import pytest

from spotfi_bridge.config import RpcConfig
from spotfi_bridge.freshness import Freshness
from spotfi_bridge.protocol import api_rpc_request
from spotfi_bridge.rpc import LocalBackend, RpcExecutor, UbusBackend
from spotfi_bridge.rpc.backend import Call, Outcome
from spotfi_bridge.rpc.executor import parse_iso8601, salvage_id
from tests.helpers.fake_ubus import (
    SYSTEM_INFO,
    Collector,
    process_gone,
    run,
    write_fake_ubus,
)
from tests.helpers.wait import until, wait_for

DEFAULTS = RpcConfig()
TOPIC = "spotfi/router/r1/rpc/response"


@pytest.fixture
def fake_ubus(tmp_path: Path) -> Path:
    return write_fake_ubus(tmp_path / "bin")


def iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def exchange(payloads: list[bytes], backend_binary: Optional[Path] = None,
             config: RpcConfig = DEFAULTS, **kwargs: Any) -> tuple[Collector, dict[str, int]]:
    """Feed ``payloads`` in one go, wait until everything is answered."""
    collector = Collector()

    async def body() -> dict[str, int]:
        backend = (UbusBackend(config, str(backend_binary)) if backend_binary
                   else LocalBackend(config))
        executor = RpcExecutor(config, collector, TOPIC, backend, **kwargs)
        for payload in payloads:
            executor.handle(payload)
        await executor.wait_idle()
        await executor.close()
        return executor.counters()

    return collector, run(body)


def request(req_id: Any, path: str = "bridge", method: str = "ping", args: Any = None,
            **extra: Any) -> bytes:
    return api_rpc_request(req_id, path, method, args, **extra)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(("payload", "req_id", "error"), [
    (b'{"id":"a","path":5,"method":"info"}', "a", "'path' must be a non-empty string"),
    (b'{"id":"a","path":"system"}', "a", "'method' must be a non-empty string"),
    (b'{"id":"a","path":"system","method":""}', "a", "'method' must be a non-empty string"),
    (b'{"id":"a","path":"system","method":"info","args":[1]}', "a",
     "'args' must be a JSON object"),
    (b'{"id":"a","type":"x-start","path":"system","method":"info"}', "a",
     "unknown message type 'x-start', expected 'rpc'"),
    (b'{"id":7,"path":"system","method":"info","timeout":-5}', 7,
     "'timeout' must be a positive number of milliseconds"),
    (b'{"id":7.5,"path":"system","method":"info","timeout":NaN}', 7.5,
     "'timeout' must be a positive number of milliseconds"),
    (b'{"id":"a","path":"system","method":"info","timestamp":"yesterday"}', "a",
     "'timestamp' is not an ISO 8601 date-time: 'yesterday'"),
    (b'{"id":"a","path":"system","method":"info","timestamp":12}', "a",
     "'timestamp' must be an ISO 8601 string"),
    (b'{"id":"cmd_1","path":"system","method":"info","args":{"x":', "cmd_1",
     "payload is not valid JSON: Expecting value at position 58"),
    (b'{"type":"rpc","id":-12,"path":"sys\xfftem"', -12, "payload is not valid UTF-8"),
])
def test_bad_input_gets_a_specific_error_carrying_the_id(payload: bytes, req_id: Any,
                                                         error: str) -> None:
    collector, counters = exchange([payload])
    assert collector.replies() == [{"type": "rpc-result", "id": req_id, "status": "error",
                                    "error": error, "result": {}}]
    assert counters["invalid"] == 1 and counters["unroutable"] == 0 and counters["errors"] == 1


@pytest.mark.parametrize("payload", [
    b"", b"not json", b"\xff\xfe\x00", b"[1,2,3]", b'"id"', b"{}", b'{"id":null,"path":"x"}',
    b'{"id":true,"path":"system","method":"info"}', b'{"id":[1],"path":"system","method":"info"}',
    b'{"id":{"a":1},"path":"system","method":"info"}',
    b'{"id":NaN,"path":"system","method":"info"}', b'{"id":"\\ud800","path":"s","method":"m"}',
    # valid JSON without a top-level id: an "id" inside args is not the request's
    b'{"path":"system","method":"info","args":{"id":"inner"}}',
])
def test_no_readable_id_publishes_nothing_and_counts(payload: bytes) -> None:
    collector, counters = exchange([payload])
    assert collector.messages == []
    assert counters["unroutable"] == 1 and counters["invalid"] == 1 and counters["requests"] == 1


def test_non_string_ids_are_echoed_unchanged() -> None:
    ids: list[Any] = [0, 42, -1, 2**70, 1.5, "", "1", "é✓"]
    collector, _ = exchange([request(i) for i in ids])
    for req_id in ids:
        reply = collector.reply(req_id)
        assert reply["id"] == req_id and type(reply["id"]) is type(req_id)
        assert reply["status"] == "success" and reply["result"]["pong"] is True


def test_salvage_reads_only_a_plausible_id() -> None:
    assert salvage_id(b'{"id": "abc\\"d", "path":') == 'abc"d'
    assert salvage_id(b'{"id":12e3,') == 12000.0
    assert salvage_id(b'{"id":"x"}') is None  # valid JSON: nothing to salvage
    assert salvage_id(b'{"path":"system",') is None


# --------------------------------------------------------------------------- results


def test_success_result_is_never_missing_or_falsy(fake_ubus: Path) -> None:
    collector, counters = exchange([request("e", "echo", "empty"), request("i", "system", "info")],
                                   fake_ubus)
    assert collector.reply("e")["result"] == {}
    assert collector.reply("i")["result"] == SYSTEM_INFO
    assert counters["ok"] == 2 and counters["errors"] == 0


class ExplodingBackend:
    name = "exploding"

    async def call(self, call: Call) -> Outcome:
        raise RuntimeError("boom")

    def reconfigure(self, config: RpcConfig) -> None:
        pass


def test_a_backend_bug_is_an_error_reply_not_a_crash() -> None:
    collector = Collector()

    async def body() -> dict[str, int]:
        executor = RpcExecutor(RpcConfig(), collector, TOPIC, ExplodingBackend())
        executor.handle(request("x", "system", "info"))
        await executor.wait_idle()
        executor.handle(request("y"))  # still answering
        return executor.counters()

    counters = run(body)
    assert collector.reply("x")["error"] == "internal error: RuntimeError"
    assert collector.reply("y")["status"] == "success"
    assert counters["internal"] == 1


def test_failing_info_or_publish_never_stalls_the_executor(fake_ubus: Path) -> None:
    sent: list[bytes] = []
    config = RpcConfig(max_concurrent=1)

    def flaky_publish(topic: str, payload: bytes, qos: int = 1, retain: bool = False,
                      on_sent: Any = None) -> bool:
        sent.append(payload)
        if len(sent) == 1:
            raise RuntimeError("link bug")
        return True

    def broken_info() -> dict[str, Any]:
        raise KeyError("boom")

    async def body() -> dict[str, int]:
        executor = RpcExecutor(config, flaky_publish, TOPIC, UbusBackend(config, str(fake_ubus)),
                               info=broken_info)
        executor.handle(request("first", "system", "info"))  # its publish raises
        executor.handle(request("second", "system", "info"))  # queued behind it
        executor.handle(request("info", "bridge", "info"))
        await executor.wait_idle()
        return executor.counters()

    counters = run(body)
    replies = {json.loads(p)["id"]: json.loads(p) for p in sent}
    assert replies["info"]["error"] == "internal error: KeyError"
    assert replies["second"]["result"] == SYSTEM_INFO
    assert counters["internal"] == 2 and counters["running"] == 0


def test_refused_publish_is_counted() -> None:
    collector = Collector()
    collector.refuse = True

    async def body() -> dict[str, int]:
        executor = RpcExecutor(RpcConfig(), collector, TOPIC, LocalBackend(RpcConfig()))
        executor.handle(request("a"))
        return executor.counters()

    assert run(body)["publish_refused"] == 1
    assert len(collector.messages) == 1


# --------------------------------------------------------------------------- at-least-once


def test_duplicate_while_running_is_ignored_and_after_reply_the_reply_is_resent(
        fake_ubus: Path) -> None:
    collector = Collector()
    config = RpcConfig()

    async def body() -> dict[str, int]:
        executor = RpcExecutor(config, collector, TOPIC, UbusBackend(config, str(fake_ubus)))
        executor.handle(request("d", "slow", "short"))
        executor.handle(request("d", "slow", "short"))  # redelivered while running
        await executor.wait_idle()
        assert len(collector.messages) == 1
        executor.handle(request("d", "slow", "short"))  # redelivered after the reply
        assert executor.counters()["running"] == 0  # not run again
        return executor.counters()

    counters = run(body)
    assert len(collector.messages) == 2
    assert collector.messages[0][1] == collector.messages[1][1]
    assert json.loads(collector.messages[0][1])["result"] == {"slept": True}
    assert counters["duplicates"] == 2 and counters["ok"] == 1


def test_ids_of_different_json_types_are_different_requests() -> None:
    collector, counters = exchange([request(1), request("1"), request(1.0), request(1)])
    assert len(collector.messages) == 4  # the last one is the re-sent reply of id 1
    assert counters["duplicates"] == 1 and counters["ok"] == 3


def test_zero_dedup_window_runs_a_repeated_id_again() -> None:
    collector, counters = exchange([request("a"), request("a")], config=RpcConfig(dedup_window=0))
    assert len(collector.messages) == 2 and counters["duplicates"] == 0 and counters["ok"] == 2


def test_dedup_table_is_bounded_and_never_runs_an_answered_id_twice() -> None:
    collector, counters = exchange(
        [request(i) for i in range(50)] + [request(40), request(49), request(0)],
        dedup_max_entries=10, dedup_max_bytes=300)
    assert counters["dedup_entries"] == 10
    first_49 = collector.messages[49][1]
    resent_40, _, again_0 = (json.loads(m[1]) for m in collector.messages[-3:])
    # 40 is still remembered but its reply was given up (byte bound): told, not re-run
    assert resent_40 == {"type": "rpc-result", "id": 40, "status": "error",
                         "error": "duplicate request: already answered, reply no longer kept",
                         "result": {}}
    assert collector.messages[-2][1] == first_49  # recent enough to be kept whole
    # 0 fell out of the table (entry bound): it is answered afresh
    assert again_0["status"] == "success" and again_0["id"] == 0
    assert counters["duplicates"] == 2 and counters["ok"] == 51
    assert counters["dedup_evicted"] == 41 and counters["dedup_replies_dropped"] > 0


# --------------------------------------------------------------------------- expiry


def fresh_ping() -> bytes:
    """A live request stamped now, as the API sends them: it shows the clock agrees."""
    return request(f"cmd_{int(time.time() * 1000)}_test_1")


def test_expired_requests_are_answered_and_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    touch = {"command": "/bin/sh", "params": ["-c", f"echo ran >> {marker}"]}
    now = datetime.now(timezone.utc)
    collector, counters = exchange([
        fresh_ping(),  # the router's clock agrees with the API's: it is trusted
        request("old", "file", "exec", touch, timestamp=iso(now - timedelta(minutes=10))),
        request("late", "file", "exec", touch, expiresAt=iso(now - timedelta(seconds=5))),
        request("fresh", "file", "exec", touch, timestamp=iso(now - timedelta(seconds=5)),
                expiresAt=iso(now + timedelta(minutes=1))),
    ])
    assert collector.reply("old")["error"] == "expired"
    assert collector.reply("late")["error"] == "expired"
    assert collector.reply("fresh")["result"]["code"] == 0
    assert marker.read_text() == "ran\n"  # only the fresh one ran
    assert counters["expired"] == 2


def test_max_age_is_configurable() -> None:
    stamp = iso(datetime.now(timezone.utc) - timedelta(seconds=30))
    collector, _ = exchange([fresh_ping(), request("a", timestamp=stamp)],
                            config=RpcConfig(max_age=10))
    assert collector.reply("a")["error"] == "expired"
    assert collector.reply("a")["result"]["maxAge"] == 10
    assert 29 < collector.reply("a")["result"]["age"] < 60
    collector, _ = exchange([fresh_ping(), request("a", timestamp=stamp)],
                            config=RpcConfig(max_age=60))
    assert collector.reply("a")["status"] == "success"


def test_a_request_that_expires_while_queued_is_not_run(fake_ubus: Path) -> None:
    now = [time.time()]
    collector = Collector()
    config = RpcConfig(max_concurrent=1)

    async def body() -> dict[str, int]:
        start = now[0]  # the wall and monotonic clocks advance together: no clock step
        clock = Freshness(config.clock_skew, wall=lambda: now[0],
                          monotonic=lambda: time.monotonic() + now[0] - start)
        executor = RpcExecutor(config, collector, TOPIC, UbusBackend(config, str(fake_ubus)),
                               freshness=clock)
        executor.handle(request("first", "slow", "short"))
        executor.handle(request("queued", "system", "info",
                                timestamp=iso(datetime.fromtimestamp(now[0], timezone.utc))))
        now[0] += 600  # the queued one waits past max_age
        await executor.wait_idle()
        return executor.counters()

    counters = run(body)
    assert collector.reply("first")["status"] == "success"
    assert collector.reply("queued")["error"] == "expired"
    assert counters["expired"] == 1


@pytest.mark.parametrize(("text", "expected"), [
    ("2025-12-19T10:00:00.000Z", datetime(2025, 12, 19, 10, tzinfo=timezone.utc)),
    ("2025-12-19T10:00:00Z", datetime(2025, 12, 19, 10, tzinfo=timezone.utc)),
    ("2025-12-19T10:00:00.123456789z", datetime(2025, 12, 19, 10, 0, 0, 123456,
                                                tzinfo=timezone.utc)),
    ("2025-12-19T12:00:00+02:00", datetime(2025, 12, 19, 10, tzinfo=timezone.utc)),
    ("2025-12-19T12:00:00+0200", datetime(2025, 12, 19, 10, tzinfo=timezone.utc)),
    ("2025-12-19 10:00", datetime(2025, 12, 19, 10, tzinfo=timezone.utc)),
])
def test_iso8601_forms_the_api_may_send(text: str, expected: datetime) -> None:
    assert parse_iso8601(text) == expected.timestamp()


@pytest.mark.parametrize("text", ["", "yesterday", "2025-13-01T00:00:00Z", "2025-12-19",
                                  "2025-12-19T10:00:00+25:00", "1700000000"])
def test_iso8601_rejects_what_it_cannot_read(text: str) -> None:
    assert parse_iso8601(text) is None


# --------------------------------------------------------------------------- policy


def test_deny_and_allow_patterns() -> None:
    config = RpcConfig(allow=("system.*", "network.*"), deny=("system.reboot",))
    collector, counters = exchange([
        request("reboot", "system", "reboot"),
        request("exec", "file", "exec", {"command": "/bin/true"}),
        request("board", "system", "board"),
        request("ping"),  # the bridge's own object is not subject to the allow list
    ], config=config)
    assert collector.reply("reboot")["error"] == "denied by policy: system.reboot"
    assert collector.reply("exec")["error"] == "denied by policy: file.exec"
    assert collector.reply("board")["status"] == "success"
    assert collector.reply("ping")["status"] == "success"
    assert counters["denied"] == 2


def test_bridge_update_runs_as_a_job_and_only_if_an_allow_list_names_it() -> None:
    calls: list[tuple[dict[str, Any], float]] = []

    async def update(args: Any, timeout: float) -> Outcome:
        calls.append((dict(args), timeout))
        return Outcome(result={"accepted": True, "id": "upd-1"}, exit_code=0)

    args = {"url": "http://127.0.0.1/p.ipk", "sha256": "0" * 64}
    collector, _ = exchange([request("u", "bridge", "update", args)], update=update)
    assert collector.reply("u")["result"] == {"accepted": True, "id": "upd-1"}
    assert calls == [(args, 30.0)]
    collector, counters = exchange([request("u", "bridge", "update", args), request("p")],
                                   config=RpcConfig(allow=("system.*",)), update=update)
    assert collector.reply("u")["error"] == "denied by policy: bridge.update"
    assert counters["denied"] == 1
    assert collector.reply("p")["status"] == "success" and len(calls) == 1
    collector, _ = exchange([request("u", "bridge", "update", args)],
                            config=RpcConfig(allow=("bridge.update",)), update=update)
    assert collector.reply("u")["status"] == "success" and len(calls) == 2


def test_deny_applies_to_the_bridge_object_when_named() -> None:
    collector, _ = exchange([request("p")], config=RpcConfig(deny=("bridge.*",)))
    assert collector.reply("p")["error"] == "denied by policy: bridge.ping"


# --------------------------------------------------------------------------- limits


def test_burst_of_200_every_id_answered_exactly_once_and_busy_counted(fake_ubus: Path) -> None:
    ids = [f"cmd_{i}" for i in range(200)]
    collector, counters = exchange([request(i, "system", "info") for i in ids], fake_ubus)
    grouped = collector.by_id()
    assert sorted(grouped) == sorted(json.dumps(i) for i in ids)
    assert all(len(replies) == 1 for replies in grouped.values())
    busy = [r for r in collector.replies() if r.get("error") == "busy"]
    ok = [r for r in collector.replies() if r["status"] == "success"]
    # all 200 arrive before any runs: 4 run, 64 wait, the rest are refused at once
    assert len(ok) == 4 + 64 and len(busy) == 200 - 68
    assert all(r["result"] == SYSTEM_INFO for r in ok)
    assert counters["busy"] == 132 and counters["ok"] == 68


def test_concurrency_limit_is_respected(fake_ubus: Path) -> None:
    collector = Collector()
    config = RpcConfig(max_concurrent=2, queue_size=10)
    peak = [0]

    async def body() -> None:
        executor = RpcExecutor(config, collector, TOPIC, UbusBackend(config, str(fake_ubus)))
        for i in range(6):
            executor.handle(request(i, "slow", "short"))
            peak[0] = max(peak[0], executor.counters()["running"])
        assert executor.counters()["queued"] == 4
        await executor.wait_idle()

    run(body)
    assert peak[0] == 2
    assert len(collector.messages) == 6


def test_reconfigure_raises_the_limit_and_applies_new_policy(fake_ubus: Path) -> None:
    collector = Collector()
    config = RpcConfig(max_concurrent=1)

    async def body() -> None:
        executor = RpcExecutor(config, collector, TOPIC, UbusBackend(config, str(fake_ubus)))
        for i in range(3):
            executor.handle(request(i, "slow", "short"))
        assert executor.counters()["running"] == 1
        executor.reconfigure(RpcConfig(max_concurrent=3, deny=("system.*",)))
        assert executor.counters()["running"] == 3
        executor.handle(request("d", "system", "info"))
        await executor.wait_idle()

    run(body)
    assert collector.reply("d")["error"] == "denied by policy: system.info"
    assert all(collector.reply(i)["status"] == "success" for i in range(3))


def test_close_answers_and_kills_running_and_queued(fake_ubus: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    pidfile = tmp_path / "grandchild.pid"
    monkeypatch.setenv("FAKE_UBUS_PIDFILE", str(pidfile))
    collector = Collector()
    config = RpcConfig(max_concurrent=1)

    async def body() -> dict[str, int]:
        executor = RpcExecutor(config, collector, TOPIC, UbusBackend(config, str(fake_ubus)))
        executor.handle(request("run", "fork", "grandchild"))
        executor.handle(request("wait", "system", "info"))
        await until(lambda: pidfile.exists() and pidfile.read_text().strip(),
                    "the grandchild to start", 10)
        await executor.close()
        executor.handle(request("late"))
        return executor.counters()

    counters = run(body)
    for req_id in ("run", "wait", "late"):
        assert collector.reply(req_id)["error"] == "cancelled: bridge shutting down"
    assert counters["running"] == 0 and counters["queued"] == 0
    pid = int(pidfile.read_text())
    wait_for(lambda: process_gone(pid), 5, f"grandchild {pid} to die")


# --------------------------------------------------------------------------- bridge object


def test_bridge_ping_needs_no_backend(tmp_path: Path) -> None:
    collector, _ = exchange([request("p")], backend_binary=tmp_path / "no-ubus")
    assert collector.reply("p")["result"]["pong"] is True


def test_bridge_info_and_sessions() -> None:
    sessions = [{"sessionId": "s1", "age": 3}]
    collector, _ = exchange(
        [request("i0"), request("i", "bridge", "info"), request("s", "bridge", "sessions"),
         request("x", "bridge", "nosuch")],
        info=lambda: {"link": {"connected": True, "url": "mqtt://u:s3cr3t-token@h"},
                      "router": {"token": "s3cr3t-token"}},
        sessions=lambda: sessions, secrets=lambda: ["s3cr3t-token"])
    info = collector.reply("i")["result"]
    assert info["backend"] == "local" and info["sessions"] == 1
    assert info["counters"]["requests"] == 2 and info["counters"]["ok"] == 1
    assert info["rpc"]["max_concurrent"] == 4 and info["link"]["connected"] is True
    assert "version" in info and "uptime" in info
    raw = [payload for _, payload, _ in collector.messages]
    assert not any(b"s3cr3t-token" in payload for payload in raw)
    assert info["router"]["token"] == "<redacted>"
    assert collector.reply("s")["result"] == {"sessions": sessions}
    assert collector.reply("x") == {"type": "rpc-result", "id": "x", "status": "error",
                                    "error": "Method not found", "result": {}, "exitCode": 3}


def test_a_reply_over_max_reply_bytes_becomes_an_error(tmp_path: Path) -> None:
    """A broker drops a client that publishes past its packet limit; the QoS 1 resend after
    the reconnect would do it again. So an oversized reply is an error reply instead."""
    big = tmp_path / "big.log"
    big.write_bytes(b"x" * 50_000)
    config = RpcConfig(max_reply_bytes=8192)
    collector, counters = exchange([request("big", "file", "read", {"path": str(big)}),
                                    request("ok")], config=config)
    reply = collector.reply("big")
    assert reply["status"] == "error" and reply["error"].startswith("reply too large: ")
    assert reply["result"]["limit"] == 8192 and reply["result"]["size"] > 50_000
    assert all(len(payload) <= 8192 for _, payload, _ in collector.messages)
    assert collector.reply("ok")["status"] == "success"
    assert counters["too_large"] == 1
