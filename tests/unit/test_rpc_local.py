"""The local backend for real: psutil, /proc, files and children of this machine."""

from __future__ import annotations

import base64
import os
import time
from pathlib import Path
from typing import Any

import pytest

from spotfi_bridge.config import RpcConfig
from spotfi_bridge.protocol import api_rpc_request
from spotfi_bridge.rpc import LocalBackend, RpcExecutor, UbusBackend
from tests.helpers.fake_ubus import Collector, run, write_fake_ubus

DEFAULTS = RpcConfig()
TOPIC = "spotfi/router/r1/rpc/response"


def call(path: str, method: str, args: Any = None, config: RpcConfig = DEFAULTS,
         **extra: Any) -> dict[str, Any]:
    collector = Collector()

    async def body() -> None:
        executor = RpcExecutor(config, collector, TOPIC, LocalBackend(config))
        executor.handle(api_rpc_request("L", path, method, args, **extra))
        await executor.wait_idle()

    run(body)
    return collector.reply("L")


def result(path: str, method: str, args: Any = None, **kwargs: Any) -> Any:
    reply = call(path, method, args, **kwargs)
    assert reply["status"] == "success", reply
    return reply["result"]


# --------------------------------------------------------------------------- system


def test_system_info_has_openwrt_shape() -> None:
    info = result("system", "info")
    assert set(info) == {"localtime", "uptime", "load", "memory", "root", "tmp", "swap"}
    assert info["uptime"] > 0 and abs(info["localtime"] - time.time()) < 2 * 86400
    assert len(info["load"]) == 3 and all(isinstance(v, int) and v >= 0 for v in info["load"])
    assert set(info["memory"]) == {"total", "free", "shared", "buffered", "available", "cached"}
    assert 0 < info["memory"]["free"] <= info["memory"]["total"]
    for fs in ("root", "tmp"):
        assert set(info[fs]) == {"total", "free", "used", "avail"} and info[fs]["total"] > 0
    assert set(info["swap"]) == {"total", "free"}


def test_system_board_has_openwrt_shape() -> None:
    board = result("system", "board")
    assert board["kernel"] == os.uname().release and board["hostname"]
    for key in ("system", "model", "board_name"):
        assert isinstance(board[key], str) and board[key]
    assert {"distribution", "version", "revision", "target", "description"} <= set(
        board["release"])
    assert board["release"]["distribution"]


# --------------------------------------------------------------------------- file exec


def test_file_exec_answers_like_rpcd_without_a_shell() -> None:
    out = result("file", "exec", {"command": "/bin/echo", "params": ["$(id)", "a;b", "*"]})
    assert out == {"code": 0, "stdout": "$(id) a;b *\n", "stderr": ""}


def test_file_exec_script_code_stderr_and_env() -> None:
    out = result("file", "exec", {"command": "sh", "params": ["-c", 'echo "$GREETING"; '
                                                              "echo oops >&2; exit 3"],
                                  "env": {"GREETING": "hello"}})
    assert out == {"code": 3, "stdout": "hello\n", "stderr": "oops\n"}


def test_file_exec_errors() -> None:
    missing = call("file", "exec", {"command": "/no/such/binary"})
    assert missing == {"type": "rpc-result", "id": "L", "status": "error", "error": "Not found",
                       "result": {}, "exitCode": 4}
    assert call("file", "exec", {})["error"] == "Invalid argument"
    assert call("file", "exec", {"command": "/bin/echo", "params": "x"})["error"] == \
        "Invalid argument"
    assert call("file", "exec", {"command": "/bin/echo", "params": ["a\x00b"]})["error"] == \
        "Invalid argument"


def test_file_exec_timeout_and_truncation() -> None:
    slow = call("file", "exec", {"command": "sleep", "params": ["30"]}, timeout=300)
    assert slow["status"] == "error" and slow["error"] == "timeout after 0.3 s"
    big = call("file", "exec", {"command": "sh", "params": ["-c", "yes | head -c 100000"]},
               config=RpcConfig(output_cap=4096))
    assert big["status"] == "success" and big["truncated"] is True
    assert big["result"]["stdout"] == "y\n" * 2048 and big["result"]["code"] == 0


def test_file_exec_uses_the_pattern_timeout(tmp_path: Path) -> None:
    config = RpcConfig(timeouts=(("file.exec", 0.3),))
    slow = call("file", "exec", {"command": "sleep", "params": ["30"]}, config=config)
    assert slow["error"] == "timeout after 0.3 s"


# --------------------------------------------------------------------------- files


def test_file_write_read_stat_list(tmp_path: Path) -> None:
    target = tmp_path / "note.txt"
    assert result("file", "write", {"path": str(target), "data": "one\n"}) == {}
    assert result("file", "write", {"path": str(target), "data": "two\n", "append": True}) == {}
    assert target.read_text() == "one\ntwo\n"
    assert result("file", "read", {"path": str(target)}) == {"data": "one\ntwo\n"}
    encoded = base64.b64encode(b"\x00\xffbin").decode()
    result("file", "write", {"path": str(tmp_path / "bin"), "data": encoded, "base64": True})
    assert (tmp_path / "bin").read_bytes() == b"\x00\xffbin"
    assert result("file", "read", {"path": str(tmp_path / "bin"), "base64": True}) == \
        {"data": encoded}
    stat = result("file", "stat", {"path": str(target)})
    assert stat["type"] == "file" and stat["size"] == 8 and stat["path"] == str(target)
    assert result("file", "stat", {"path": str(tmp_path)})["type"] == "directory"
    listing = result("file", "list", {"path": str(tmp_path)})
    assert [(e["name"], e["type"]) for e in listing["entries"]] == [("bin", "file"),
                                                                     ("note.txt", "file")]


def test_file_read_is_capped() -> None:
    reply = call("file", "read", {"path": "/proc/self/maps"}, config=RpcConfig(output_cap=1024))
    assert reply["truncated"] is True and len(reply["result"]["data"]) == 1024


def test_file_errors_follow_rpcd(tmp_path: Path) -> None:
    assert call("file", "read", {"path": str(tmp_path / "absent")})["exitCode"] == 4
    assert call("file", "read", {"path": str(tmp_path)})["error"] == "Invalid argument"
    assert call("file", "stat", {"path": str(tmp_path / "absent")})["error"] == "Not found"
    assert call("file", "list", {"path": str(tmp_path / "absent")})["error"] == "Not found"
    assert call("file", "read", {})["error"] == "Invalid argument"


def test_a_fifo_never_blocks_the_loop(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert call("file", "read", {"path": str(fifo)})["error"] == "Invalid argument"
    assert call("file", "write", {"path": str(fifo), "data": "x"})["status"] == "error"


# --------------------------------------------------------------------------- log


def test_log_read_tails_the_configured_file(tmp_path: Path) -> None:
    log = tmp_path / "messages"
    log.write_text("".join(f"line {i}\n" for i in range(1000)))
    config = RpcConfig(log_file=str(log))
    entries = result("log", "read", {"lines": 3}, config=config)["log"]
    assert [e["msg"] for e in entries] == ["line 997", "line 998", "line 999"]
    assert all({"msg", "id", "priority", "source", "time"} <= set(e) for e in entries)
    assert len(result("log", "read", {}, config=config)["log"]) == 1000
    assert call("log", "read", {"lines": "3"}, config=config)["error"] == "Invalid argument"


def test_log_read_without_a_log_file_says_so() -> None:
    reply = call("log", "read", {"lines": 10})
    assert reply["status"] == "error" and "set [rpc] log_file" in reply["error"]


# --------------------------------------------------------------------------- network, service


def test_network_device_status() -> None:
    devices = result("network.device", "status")
    assert "lo" in devices and devices["lo"]["up"] is True
    assert {"type", "up", "carrier", "mtu", "macaddr", "statistics"} <= set(devices["lo"])
    assert "rx_bytes" in devices["lo"]["statistics"]
    assert result("network.device", "status", {"name": "lo"})["mtu"] == devices["lo"]["mtu"]
    assert call("network.device", "status", {"name": "nope0"})["error"] == "Invalid argument"


def test_network_interface_dump_and_status() -> None:
    dump = result("network.interface", "dump")["interface"]
    loopback = next(i for i in dump if i["interface"] == "loopback")
    assert {"address": "127.0.0.1", "mask": 8} in loopback["ipv4-address"]
    assert loopback["l3_device"] == "lo" and loopback["up"] is True
    status = result("network.interface", "status", {"interface": "loopback"})
    assert "interface" not in status and status["ipv4-address"] == loopback["ipv4-address"]
    assert call("network.interface", "status", {"interface": "nope"})["error"] == "Not found"


def test_service_list_is_an_object() -> None:
    services = result("service", "list")
    assert isinstance(services, dict)
    assert all(isinstance(v, dict) for v in services.values())


# --------------------------------------------------------------------------- parity


@pytest.mark.parametrize(("path", "method"), [("uspot", "client_list"), ("system", "reboot"),
                                              ("file", "remove")])
def test_unknown_calls_fail_exactly_as_ubus_reports_them(tmp_path: Path, path: str,
                                                         method: str) -> None:
    local = call(path, method)
    binary = write_fake_ubus(tmp_path / "bin")
    collector = Collector()

    async def body() -> None:
        executor = RpcExecutor(RpcConfig(), collector, TOPIC, UbusBackend(RpcConfig(),
                                                                          str(binary)))
        executor.handle(api_rpc_request("L", path if path != "file" else "system", method))
        await executor.wait_idle()

    run(body)
    assert local == collector.reply("L")
    assert local["error"] == ("Not found" if path == "uspot" else "Method not found")
