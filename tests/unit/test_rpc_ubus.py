"""The ubus backend through the executor, against a fake ``ubus`` executable (real children)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import psutil
import pytest

from spotfi_bridge.config import RpcConfig
from spotfi_bridge.protocol import api_rpc_request
from spotfi_bridge.rpc import LocalBackend, RpcExecutor, UbusBackend, make_backend
from spotfi_bridge.rpc.backend import Call, ubus_status_text
from spotfi_bridge.rpc.child import MAX_ARG_STRLEN
from tests.helpers.fake_ubus import SYSTEM_INFO, Collector, process_gone, run, write_fake_ubus
from tests.helpers.wait import wait_for

DEFAULTS = RpcConfig()
TOPIC = "spotfi/router/r1/rpc/response"


@pytest.fixture
def fake_ubus(tmp_path: Path) -> Path:
    return write_fake_ubus(tmp_path / "bin")


def call_all(binary: Path, requests: list[tuple[Any, str, str, dict[str, Any], dict[str, Any]]],
             config: RpcConfig = DEFAULTS) -> tuple[Collector, dict[str, int]]:
    """Send every ``(id, path, method, args, extra)`` at once, wait until all are answered."""
    collector = Collector()

    async def body() -> dict[str, int]:
        executor = RpcExecutor(config, collector, TOPIC, UbusBackend(config, str(binary)))
        for req_id, path, method, args, extra in requests:
            executor.handle(api_rpc_request(req_id, path, method, args, **extra))
        await executor.wait_idle()
        await executor.close()
        return executor.counters()

    counters = run(body)
    return collector, counters


def one(binary: Path, path: str, method: str, args: Any = None, **extra: Any) -> dict[str, Any]:
    collector, _ = call_all(binary, [("r1", path, method, args or {}, extra)])
    assert all(topic == TOPIC and qos == 1 for topic, _, qos in collector.messages)
    return collector.reply("r1")


def test_json_result_is_parsed(fake_ubus: Path) -> None:
    reply = one(fake_ubus, "system", "info")
    assert reply == {"type": "rpc-result", "id": "r1", "status": "success", "result": SYSTEM_INFO}


def test_argv_is_the_ubus_cli_shape_without_a_shell(fake_ubus: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    argv_file = tmp_path / "argv"
    monkeypatch.setenv("FAKE_UBUS_ARGV", str(argv_file))
    args = {"command": "/bin/sh", "params": ["-c", "echo $HOME; rm -rf / ; `x`"], "n": 1.5}
    reply = one(fake_ubus, "-weird path'\"", "$(method)", args, timeout=2500)
    assert reply["status"] == "error" and reply["error"] == "Not found"
    argv = argv_file.read_bytes().split(b"\0")[:-1]
    assert argv[:5] == [b"-S", b"-t", b"3", b"--", b"call"]
    assert argv[5:7] == [b"-weird path'\"", b"$(method)"]
    import json
    assert json.loads(argv[7]) == args


def test_timeout_from_config_pattern_reaches_ubus(fake_ubus: Path) -> None:
    config = RpcConfig(timeouts=(("echo.*", 7.0),))
    collector, _ = call_all(fake_ubus, [("a", "echo", "args", {"x": [1, 2]}, {})], config)
    assert collector.reply("a")["result"] == {"timeout": 7, "args": {"x": [1, 2]}}


def test_request_timeout_is_capped_by_max_timeout(fake_ubus: Path) -> None:
    config = RpcConfig(max_timeout=40.0)
    collector, _ = call_all(fake_ubus, [("a", "echo", "args", {}, {"timeout": 3_600_000})],
                            config)
    assert collector.reply("a")["result"]["timeout"] == 40


def test_non_json_output_is_returned_as_text(fake_ubus: Path) -> None:
    reply = one(fake_ubus, "echo", "text")
    assert reply["status"] == "success" and reply["result"] == "hello, not json\n"


def test_empty_output_is_an_empty_object_not_a_falsy_result(fake_ubus: Path) -> None:
    reply = one(fake_ubus, "echo", "empty")
    assert reply["status"] == "success" and reply["result"] == {}


def test_stderr_kept_on_success(fake_ubus: Path) -> None:
    reply = one(fake_ubus, "echo", "stderr")
    assert reply["result"] == {"ok": 1} and reply["stderr"] == "a warning\n"


@pytest.mark.parametrize(("path", "method", "error", "code"), [
    ("nosuch", "object", "Not found", 4),
    ("system", "nosuchmethod", "Method not found", 3),
    ("fail", "invalid", "Invalid argument", 2),
    ("fail", "weird", "ubus failed with exit status 42", 42),
    ("fail", "unreachable", "Failed to connect to ubus or to parse message data", 255),
])
def test_exit_codes_map_to_ubus_errors(fake_ubus: Path, path: str, method: str, error: str,
                                       code: int) -> None:
    reply = one(fake_ubus, path, method)
    assert reply == {"type": "rpc-result", "id": "r1", "status": "error", "error": error,
                     "result": {}, "exitCode": code}


def test_permission_denied_keeps_stderr_and_status(fake_ubus: Path) -> None:
    reply = one(fake_ubus, "fail", "denied")
    assert reply["error"] == "Permission denied"
    assert reply["stderr"] == "access denied by ACL\n" and reply["exitCode"] == 6


def test_failure_with_output_keeps_the_output(fake_ubus: Path) -> None:
    reply = one(fake_ubus, "fail", "partial")
    assert reply["error"] == "Unknown error" and reply["result"] == {"partial": True}


def test_ubus_own_timeout_is_reported_in_ubus_words_not_as_ours(fake_ubus: Path) -> None:
    collector, counters = call_all(fake_ubus, [("t", "fail", "timeout", {}, {"timeout": 5000})])
    reply = collector.reply("t")
    assert reply["error"] == "Request timed out" and reply["exitCode"] == 7
    assert counters["timeouts"] == 1


def test_death_by_signal_has_no_exit_status(fake_ubus: Path) -> None:
    reply = one(fake_ubus, "fail", "killed")
    assert reply["error"] == "ubus killed by signal 15 (SIGTERM)"
    assert reply["signal"] == 15 and "exitCode" not in reply


def test_every_ubus_status_has_its_libubus_words() -> None:
    words = [ubus_status_text(status) for status in range(1, 11)]
    assert words == ["Invalid command", "Invalid argument", "Method not found", "Not found",
                     "No response", "Permission denied", "Request timed out",
                     "Operation not supported", "Unknown error", "Connection failed"]
    assert ubus_status_text(None) == "ubus ended without an exit status"
    assert ubus_status_text(-1) == "ubus failed with exit status -1"


def test_args_over_the_kernel_argument_limit_never_exec(fake_ubus: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    runs = tmp_path / "runs"
    monkeypatch.setenv("FAKE_UBUS_RUNS", str(runs))
    fits = {"data": "x" * (MAX_ARG_STRLEN - 1 - len('{"data":""}'))}
    too_big = {"data": "x" * (MAX_ARG_STRLEN - len('{"data":""}'))}
    collector, _ = call_all(fake_ubus, [("fits", "echo", "empty", fits, {}),
                                        ("big", "echo", "empty", too_big, {})])
    assert collector.reply("fits")["status"] == "success"
    reply = collector.reply("big")
    assert reply["error"] == ("args (as JSON) too large for ubus: 131072 bytes, over the kernel's "
                              "limit of 131071 bytes for one command-line argument "
                              "(MAX_ARG_STRLEN); not run")
    assert runs.read_text().splitlines() == ["echo empty"]  # only the one that fits ran


def test_slow_call_is_killed_at_the_timeout(fake_ubus: Path) -> None:
    collector, counters = call_all(fake_ubus, [("s", "slow", "call", {}, {"timeout": 300})])
    assert collector.reply("s")["error"] == "timeout after 0.3 s"
    assert collector.reply("s")["status"] == "error"
    assert counters["timeouts"] == 1 and counters["running"] == 0


def test_timeout_kills_the_whole_process_group(fake_ubus: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    pidfile = tmp_path / "grandchild.pid"
    monkeypatch.setenv("FAKE_UBUS_PIDFILE", str(pidfile))
    collector, _ = call_all(fake_ubus, [("g", "fork", "grandchild", {}, {"timeout": 500})])
    assert collector.reply("g")["error"] == "timeout after 0.5 s"
    pid = int(pidfile.read_text())
    wait_for(lambda: process_gone(pid), 5, f"grandchild {pid} to die")


def test_huge_output_is_capped_and_flagged(fake_ubus: Path) -> None:
    config = RpcConfig(output_cap=64 * 1024)
    collector, counters = call_all(fake_ubus, [("h", "huge", "stdout", {}, {}),
                                               ("j", "huge", "json", {}, {}),
                                               ("e", "huge", "stderr", {}, {})], config)
    text = collector.reply("h")
    assert text["status"] == "success" and text["truncated"] is True
    assert text["result"] == "x" * 64 * 1024
    cut_json = collector.reply("j")
    assert cut_json["truncated"] is True and isinstance(cut_json["result"], str)
    assert len(cut_json["result"]) == 64 * 1024
    err = collector.reply("e")
    assert err["result"] == {} and len(err["stderr"]) == 64 * 1024 and err["truncated"] is True
    assert counters["truncated"] == 3


def test_missing_binary_is_a_clear_error(tmp_path: Path) -> None:
    reply = one(tmp_path / "no-such-ubus", "system", "info")
    assert reply["status"] == "error"
    assert reply["error"].startswith(f"cannot run {tmp_path / 'no-such-ubus'}:")


def test_nul_in_method_is_invalid_argument(fake_ubus: Path) -> None:
    reply = one(fake_ubus, "system", "in\x00fo")
    assert reply["error"] == "Invalid argument" and reply["exitCode"] == 2


def test_children_are_not_left_behind(fake_ubus: Path) -> None:
    before = set(os.listdir("/proc/self/task"))
    call_all(fake_ubus, [(i, "slow", "short", {}, {}) for i in range(8)])
    assert set(os.listdir("/proc/self/task")) == before  # no thread per child
    assert psutil.Process().children() == []  # every child reaped


def test_make_backend_picks_ubus_only_when_on_path(fake_ubus: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    assert isinstance(make_backend(RpcConfig()), LocalBackend)
    forced = make_backend(RpcConfig(backend="ubus"))
    assert isinstance(forced, UbusBackend)
    monkeypatch.setenv("PATH", str(fake_ubus.parent))
    auto = make_backend(RpcConfig())
    assert isinstance(auto, UbusBackend) and auto.binary == str(fake_ubus)
    assert isinstance(make_backend(RpcConfig(backend="local")), LocalBackend)
    argv = auto.argv(Call("system", "info", {}, 0.2, 1024))
    assert argv == [str(fake_ubus), "-S", "-t", "1", "--", "call", "system", "info", "{}"]
