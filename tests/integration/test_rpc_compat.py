"""The dashboard's router pages on a router-like userland (issue 12, part 1).

The real daemon on a real Mosquitto, with a fake ``ubus`` on PATH that behaves
like OpenWrt's: ``log read`` without ``"stream": false`` prints nothing, procd's
``service`` object has no start/stop (exit 3, "Method not found"), hostapd answers
only as ``hostapd.wlan0`` (``hostapd`` alone: exit 4). Init scripts live in a fake
/etc/init.d (``[rpc] init_dir``) and record what they were asked to do.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import pytest

from tests.conftest import wait_online
from tests.helpers.apiclient import ApiClient
from tests.helpers.bridge import BridgeProcess
from tests.helpers.fake_ubus import HOSTAPD_STATUS, actions, write_fake_ubus, write_init_dir
from tests.helpers.wait import wait_for

ROUTER = "test-router"


def start(make_bridge: Callable[..., BridgeProcess], tmp_path: Path, *, backend: str = "ubus",
          **env: str) -> tuple[BridgeProcess, Path]:
    """A bridge with the fake ubus and init scripts; returns it and the scripts' state dir."""
    binary = write_fake_ubus(tmp_path / "bin")
    state = tmp_path / "state"
    init_dir = write_init_dir(tmp_path / "init.d", state)
    bridge = make_bridge(env={
        "PATH": f"{binary.parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "SPOTFI_RPC_BACKEND": backend, "SPOTFI_RPC_INIT_DIR": str(init_dir),
        "FAKE_PROCD_STATE": str(state), **env})
    return bridge, state


def test_logs_page_gets_what_logd_returns(api: ApiClient,
                                         make_bridge: Callable[..., BridgeProcess],
                                         tmp_path: Path) -> None:
    start(make_bridge, tmp_path)
    wait_online(api)
    reply = api.rpc(ROUTER, "log", "read", {"lines": 3})  # exactly what the API sends
    assert reply["status"] == "success"
    assert reply["result"] == {"log": [
        {"msg": f"fake logd line {i}", "id": i, "priority": 30, "source": 1,
         "time": 1700000000000 + i} for i in (3, 4, 5)]}
    streaming = api.rpc(ROUTER, "log", "read", {"lines": 3, "stream": True})  # asked for
    assert streaming["status"] == "success" and streaming["result"] == {}


def test_wireless_status_reaches_the_interface_object(
        api: ApiClient, make_bridge: Callable[..., BridgeProcess], tmp_path: Path) -> None:
    start(make_bridge, tmp_path)
    wait_online(api)
    reply = api.rpc(ROUTER, "hostapd", "wlan0/get_status", {})
    assert reply["status"] == "success" and reply["result"] == HOSTAPD_STATUS
    missing = api.rpc(ROUTER, "hostapd", "wlan7/get_status", {})
    assert missing["error"] == "Not found" and missing["exitCode"] == 4


def test_services_page_runs_init_scripts(api: ApiClient,
                                         make_bridge: Callable[..., BridgeProcess],
                                         tmp_path: Path) -> None:
    _, state = start(make_bridge, tmp_path)
    wait_online(api)
    init_dir = tmp_path / "init.d"

    restart = api.rpc(ROUTER, "service", "restart", {"name": "network"})
    assert restart["status"] == "success"
    assert restart["result"] == {"name": "network", "action": "restart", "code": 0,
                                 "stdout": "", "stderr": ""}
    assert api.rpc(ROUTER, "service", "enable", {"name": "network"})["status"] == "success"
    status = api.rpc(ROUTER, "service", "status", {"name": "network"})["result"]
    assert (status["name"], status["running"], status["enabled"]) == ("network", True, True)
    assert status["instances"]["instance1"]["running"] is True

    assert api.rpc(ROUTER, "service", "stop", {"name": "network"})["status"] == "success"
    assert api.rpc(ROUTER, "service", "disable", {"name": "network"})["status"] == "success"
    assert api.rpc(ROUTER, "service", "reload", {"name": "dnsmasq"})["status"] == "success"
    stopped = api.rpc(ROUTER, "service", "status", {"name": "network"})["result"]
    assert (stopped["running"], stopped["enabled"], stopped["instances"]) == (False, False, {})

    broken = api.rpc(ROUTER, "service", "start", {"name": "broken"})
    assert broken["status"] == "error" and broken["exitCode"] == 1
    assert broken["error"] == f"{init_dir}/broken start failed with exit status 1"
    assert "missing /etc/config/broken" in broken["result"]["stderr"]

    # procd's own methods still go to ubus, untouched
    listed = api.rpc(ROUTER, "service", "list", {"name": "dnsmasq"})
    assert listed["result"] == {"dnsmasq": {"instances": {"instance1": {
        "running": True, "pid": 4242, "command": ["/usr/sbin/dnsmasq"], "term_timeout": 5}}}}
    assert actions(state) == ["network restart", "network enable", "network enabled",
                              "network stop", "network disable", "dnsmasq reload",
                              "network enabled", "broken start"]


@pytest.mark.parametrize("name", ["../network", "init.d/network", "network.sh", "..",
                                  "-network", "--help", "nosuch"])
def test_names_that_are_not_a_script_in_init_d_are_refused(
        api: ApiClient, make_bridge: Callable[..., BridgeProcess], tmp_path: Path,
        name: str) -> None:
    bridge, state = start(make_bridge, tmp_path)
    wait_online(api)
    reply = api.rpc(ROUTER, "service", "restart", {"name": name})
    assert reply["status"] == "error" and reply["error"].startswith("service restart: ")
    assert ("no such service" if name == "nosuch" else "invalid service name") in reply["error"]
    bridge.wait_log(f"service.restart refused: {reply['error']}")
    assert actions(state) == []


def test_restarting_the_bridge_itself_replies_first_and_outlives_it(
        api: ApiClient, make_bridge: Callable[..., BridgeProcess], tmp_path: Path) -> None:
    bridge, state = start(make_bridge, tmp_path)
    wait_online(api)
    reply = api.rpc(ROUTER, "service", "restart", {"name": "spotfi-bridge"})
    assert reply["status"] == "success"
    assert reply["result"] == {"name": "spotfi-bridge", "action": "restart", "scheduled": True}
    assert bridge.proc is not None
    assert bridge.proc.wait(timeout=30) == 0  # the script's SIGTERM: an orderly stop
    wait_for(lambda: "spotfi-bridge restart outlived its parent" in actions(state), 30,
             "the init script to outlive the bridge it stopped")
    assert actions(state) == [f"spotfi-bridge restart (parent {bridge.pid})",
                              "spotfi-bridge restart outlived its parent"]


def test_compat_off_passes_calls_to_ubus_untouched(
        api: ApiClient, make_bridge: Callable[..., BridgeProcess], tmp_path: Path) -> None:
    calls = tmp_path / "calls"
    _, state = start(make_bridge, tmp_path, SPOTFI_RPC_COMPAT="false",
                     FAKE_UBUS_CALLS=str(calls))
    wait_online(api)
    logs = api.rpc(ROUTER, "log", "read", {"lines": 3})
    assert logs["status"] == "success" and logs["result"] == {}  # what the real CLI gives
    start_reply = api.rpc(ROUTER, "service", "start", {"name": "network"})
    assert start_reply["error"] == "Method not found" and start_reply["exitCode"] == 3
    wifi = api.rpc(ROUTER, "hostapd", "wlan0/get_status", {})
    assert wifi["error"] == "Not found" and wifi["exitCode"] == 4
    ran = [line for line in calls.read_text().splitlines()
           if line.split()[0] in ("log", "service", "hostapd", "hostapd.wlan0")]
    assert ran == ['log read {"lines":3}', 'service start {"name":"network"}',
                   "hostapd wlan0/get_status {}"]
    assert actions(state) == []
    compat: dict[str, Any] = api.rpc(ROUTER, "bridge", "info")["result"]["rpc"]["compat"]
    assert compat["enabled"] is False and all(rule["used"] == 0 for rule in compat["rules"])


def test_dry_run_answers_the_same_calls(api: ApiClient,
                                        make_bridge: Callable[..., BridgeProcess],
                                        tmp_path: Path) -> None:
    log = tmp_path / "messages"
    log.write_text("".join(f"dry run line {i}\n" for i in range(5)))
    _, state = start(make_bridge, tmp_path, backend="local", SPOTFI_RPC_LOG_FILE=str(log))
    wait_online(api)
    logs = api.rpc(ROUTER, "log", "read", {"lines": 2})["result"]["log"]
    assert [entry["msg"] for entry in logs] == ["dry run line 3", "dry run line 4"]
    wifi = api.rpc(ROUTER, "hostapd", "wlan0/get_status", {})["result"]
    assert wifi["status"] == "ENABLED" and wifi["ssid"] and wifi["channel"] == 6
    stop = api.rpc(ROUTER, "service", "stop", {"name": "network"})
    assert stop["result"]["emulated"] is True and stop["result"]["code"] == 0
    status = api.rpc(ROUTER, "service", "status", {"name": "network"})["result"]
    assert (status["running"], status["enabled"]) == (False, True)
    refused = api.rpc(ROUTER, "service", "stop", {"name": "../network"})
    assert refused["status"] == "error"
    assert actions(state) == []  # emulated: no script ran
    info = api.rpc(ROUTER, "bridge", "info")["result"]
    used = {rule["rule"]: rule["used"] for rule in info["rpc"]["compat"]["rules"]}
    assert info["backend"] == "local"
    assert used == {"log-read": 1, "service-action": 3, "hostapd-get-status": 1}
