"""ubus exit statuses reach the API in ubus's own words (issue 11, item 9).

The real daemon on a real Mosquitto runs a fake ``ubus`` on PATH that ends the
way the real CLI does: 255 with nothing on stderr (ubusd unreachable, or message
data it cannot parse), its own timeout status 7 at once, or a death by signal.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from tests.conftest import wait_online
from tests.helpers.apiclient import ApiClient
from tests.helpers.bridge import BridgeProcess
from tests.helpers.fake_ubus import write_fake_ubus

ROUTER = "test-router"


def start(make_bridge: Callable[..., BridgeProcess], tmp_path: Path, **env: str) -> None:
    binary = write_fake_ubus(tmp_path / "bin")
    make_bridge(env={"PATH": f"{binary.parent}{os.pathsep}{os.environ.get('PATH', '')}",
                     "SPOTFI_RPC_BACKEND": "ubus", **env})


def test_silent_exit_255_is_ubusd_unreachable_not_a_signal(
        api: ApiClient, make_bridge: Callable[..., BridgeProcess], tmp_path: Path) -> None:
    start(make_bridge, tmp_path)
    wait_online(api)
    silent = api.rpc(ROUTER, "fail", "unreachable")
    assert silent["status"] == "error"
    assert silent["error"] == "Failed to connect to ubus or to parse message data"
    assert silent["exitCode"] == 255 and "signal" not in silent


def test_ubus_own_timeout_status_is_not_our_timeout(
        api: ApiClient, make_bridge: Callable[..., BridgeProcess], tmp_path: Path) -> None:
    start(make_bridge, tmp_path)
    wait_online(api)
    own_timeout = api.rpc(ROUTER, "fail", "timeout")  # status 7 after 10 ms, not after 30 s
    assert own_timeout["error"] == "Request timed out" and own_timeout["exitCode"] == 7
    not_found = api.rpc(ROUTER, "hostapd", "wlan9/get_status", {})
    assert not_found["error"] == "Not found" and not_found["exitCode"] == 4


def test_death_by_signal_is_reported_as_one_without_an_exit_status(
        api: ApiClient, make_bridge: Callable[..., BridgeProcess], tmp_path: Path) -> None:
    start(make_bridge, tmp_path)
    wait_online(api)
    killed = api.rpc(ROUTER, "fail", "killed")
    assert killed["error"] == "ubus killed by signal 15 (SIGTERM)"
    assert killed["signal"] == 15 and "exitCode" not in killed


def test_args_over_the_kernel_limit_are_refused_before_exec(
        api: ApiClient, make_bridge: Callable[..., BridgeProcess], tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    start(make_bridge, tmp_path, FAKE_UBUS_RUNS=str(runs))
    wait_online(api)
    script = "echo " + "x" * 200_000
    reply = api.rpc(ROUTER, "file", "exec", {"command": "/bin/sh", "params": ["-c", script]})
    assert reply["status"] == "error"
    assert reply["error"].startswith("args (as JSON) too large for ubus: 200")
    assert "limit of 131071 bytes for one command-line argument (MAX_ARG_STRLEN)" in reply["error"]
    assert api.rpc(ROUTER, "bridge", "ping")["status"] == "success"
    ran = runs.read_text().splitlines() if runs.exists() else []
    assert "file exec" not in ran
