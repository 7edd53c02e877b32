"""The compat layer: the API's calls real ubus does not answer, mapped to what does."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, Optional

import pytest

from spotfi_bridge.config import RpcConfig
from spotfi_bridge.protocol import api_rpc_request
from spotfi_bridge.rpc import LocalBackend, RpcExecutor, UbusBackend, ubus
from spotfi_bridge.rpc.backend import Call, Outcome, ServiceAction
from spotfi_bridge.rpc.compat import HOSTAPD, LOG_READ, RULES, SERVICE, CompatBackend, route
from tests.helpers.fake_ubus import (
    HOSTAPD_STATUS,
    Collector,
    actions,
    run,
    write_fake_ubus,
    write_init_dir,
)

TOPIC = "spotfi/router/r1/rpc/response"


def call(path: str, method: str, args: Any = None) -> Call:
    return Call(path, method, args or {}, 30.0, 1 << 20)


@pytest.fixture
def init_dir(tmp_path: Path) -> Path:
    return write_init_dir(tmp_path / "init.d", tmp_path / "state")


def test_log_read_without_stream_asks_logd_for_a_snapshot() -> None:
    rule, target = route(call("log", "read", {"lines": 3}), "/nonexistent")
    assert rule is LOG_READ
    assert target == call("log", "read", {"lines": 3, "stream": False})


@pytest.mark.parametrize("args", [{"lines": 3, "stream": True}, {"stream": False}])
def test_log_read_that_names_stream_passes_untouched(args: dict[str, Any]) -> None:
    assert route(call("log", "read", args), "/nonexistent") == (None, call("log", "read", args))


def test_hostapd_iface_slash_method_becomes_the_iface_object() -> None:
    rule, target = route(call("hostapd", "wlan1-1/get_status"), "/nonexistent")
    assert rule is HOSTAPD and target == call("hostapd.wlan1-1", "get_status")


@pytest.mark.parametrize(("path", "method"), [("hostapd", "get_status"),
                                              ("hostapd", "/get_status"),
                                              ("hostapd", "wlan0/del_client"),
                                              ("hostapd.wlan0", "get_status")])
def test_other_hostapd_calls_pass_untouched(path: str, method: str) -> None:
    assert route(call(path, method), "/nonexistent") == (None, call(path, method))


@pytest.mark.parametrize("action", ["start", "stop", "restart", "reload", "enable", "disable",
                                    "status"])
def test_service_actions_become_init_script_actions(init_dir: Path, action: str) -> None:
    rule, target = route(call("service", action, {"name": "network"}), str(init_dir))
    assert rule is SERVICE
    assert target == ServiceAction("network", action, str(init_dir / "network"), 30.0, 1 << 20)


@pytest.mark.parametrize("method", ["list", "set", "delete", "signal", "event"])
def test_procds_own_service_methods_pass_untouched(init_dir: Path, method: str) -> None:
    request = call("service", method, {"name": "network"})
    assert route(request, str(init_dir)) == (None, request)


@pytest.mark.parametrize(("name", "why"), [
    ("../network", "invalid service name '../network'"),
    ("init.d/network", "invalid service name"),
    ("/etc/init.d/network", "invalid service name"),
    ("network.sh", "invalid service name"),
    ("..", "invalid service name"),
    ("-network", "invalid service name"),
    ("--help", "invalid service name"),
    ("net work", "invalid service name"),
    ("", "'name' must be the name of a service"),
    (None, "'name' must be the name of a service"),
    (["network"], "'name' must be the name of a service"),
    ("nosuch", "no such service: {dir}/nosuch does not exist"),
])
def test_service_names_that_are_not_a_script_in_the_dir_are_refused(
        init_dir: Path, name: Any, why: str) -> None:
    rule, target = route(call("service", "restart", {"name": name}), str(init_dir))
    assert rule is SERVICE and isinstance(target, Outcome)
    assert target.error is not None and target.error.startswith("service restart: ")
    assert why.replace("{dir}", str(init_dir)) in target.error


def test_a_directory_in_the_init_dir_is_not_a_service(init_dir: Path) -> None:
    (init_dir / "subdir").mkdir()
    _, target = route(call("service", "start", {"name": "subdir"}), str(init_dir))
    assert isinstance(target, Outcome) and "no such service" in str(target.error)


class Recorder:
    """A backend that records what reaches it."""

    name = "recorder"

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.services: list[ServiceAction] = []

    async def call(self, request: Call) -> Outcome:
        self.calls.append(request)
        return Outcome(result={}, exit_code=0)

    async def service(self, action: ServiceAction) -> Outcome:
        self.services.append(action)
        return Outcome(result={}, exit_code=0)

    def reconfigure(self, config: RpcConfig) -> None:
        pass


def test_compat_off_passes_every_call_untouched(init_dir: Path) -> None:
    inner = Recorder()
    backend = CompatBackend(inner, RpcConfig(compat=False, init_dir=str(init_dir)))
    requests = [call("log", "read", {"lines": 3}), call("service", "start", {"name": "network"}),
                call("service", "stop", {"name": "../x"}), call("hostapd", "wlan0/get_status")]
    for request in requests:
        run(lambda request=request: backend.call(request))  # type: ignore[misc]
    assert inner.calls == requests and inner.services == []
    assert backend.describe()["enabled"] is False
    assert all(rule["used"] == 0 for rule in backend.describe()["rules"])


def test_reload_turns_compat_off_and_on(init_dir: Path) -> None:
    inner = Recorder()
    backend = CompatBackend(inner, RpcConfig(init_dir=str(init_dir)))
    request = call("service", "start", {"name": "network"})
    run(lambda: backend.call(request))
    backend.reconfigure(RpcConfig(compat=False))
    run(lambda: backend.call(request))
    assert len(inner.services) == 1 and inner.calls == [request]
    used = {rule["rule"]: rule["used"] for rule in backend.describe()["rules"]}
    assert used == {"log-read": 0, "service-action": 1, "hostapd-get-status": 0}


def executor_replies(backend: Any, config: RpcConfig,
                     requests: list[tuple[str, str, str, dict[str, Any]]],
                     collector: Optional[Collector] = None) -> Collector:
    collector = collector or Collector()

    async def body() -> None:
        executor = RpcExecutor(config, collector, TOPIC, backend)
        for req_id, path, method, args in requests:
            executor.handle(api_rpc_request(req_id, path, method, args))
        await executor.wait_idle()
        await executor.close()

    run(body)
    return collector


def test_ubus_backend_runs_init_scripts_and_reports_their_result(
        tmp_path: Path, init_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = tmp_path / "state"
    monkeypatch.setenv("FAKE_PROCD_STATE", str(state))
    config = RpcConfig(init_dir=str(init_dir))
    binary = write_fake_ubus(tmp_path / "bin")
    collector = executor_replies(UbusBackend(config, str(binary)), config, [
        ("a", "service", "restart", {"name": "network"})])
    collector2 = executor_replies(UbusBackend(config, str(binary)), config, [
        ("b", "service", "status", {"name": "network"}),
        ("c", "service", "status", {"name": "dnsmasq"}),
        ("d", "service", "start", {"name": "broken"}),
        ("e", "hostapd", "wlan0/get_status", {}),
        ("f", "log", "read", {"lines": 2}),
    ])
    assert collector.reply("a") == {
        "type": "rpc-result", "id": "a", "status": "success",
        "result": {"name": "network", "action": "restart", "code": 0, "stdout": "",
                   "stderr": ""}}
    status = collector2.reply("b")["result"]
    assert status["running"] is True and status["enabled"] is False
    assert status["instances"]["instance1"]["pid"] == 4242
    assert collector2.reply("c")["result"] == {"name": "dnsmasq", "running": False,
                                               "enabled": False, "instances": {}}
    broken = collector2.reply("d")
    assert broken["status"] == "error" and broken["exitCode"] == 1
    assert broken["error"] == f"{init_dir}/broken start failed with exit status 1"
    assert broken["result"]["stderr"] == "broken: cannot start: missing /etc/config/broken\n"
    assert collector2.reply("e")["result"] == HOSTAPD_STATUS
    assert [e["msg"] for e in collector2.reply("f")["result"]["log"]] == [
        "fake logd line 4", "fake logd line 5"]
    recorded = actions(state)
    assert recorded[0] == "network restart"  # then, in any order (they ran at once):
    assert sorted(recorded[1:]) == ["broken start", "dnsmasq enabled", "network enabled"]


def test_acting_on_the_bridge_itself_waits_for_the_reply_to_leave(
        init_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The reply is published first; the script runs only once the link says it left."""
    config = RpcConfig(init_dir=str(init_dir))
    events: list[str] = []
    spawned: list[ServiceAction] = []

    class Publisher(Collector):
        def __call__(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False,
                     on_sent: Any = None) -> bool:
            events.append(f"published {json.loads(payload)['id']}")

            def sent() -> None:
                events.append("sent")
                if on_sent is not None:
                    on_sent()
            return super().__call__(topic, payload, qos, retain, sent)

    collector = Publisher()

    async def body() -> None:
        acted = asyncio.Event()

        def act(action: ServiceAction) -> None:
            events.append("acted")
            spawned.append(action)
            acted.set()

        monkeypatch.setattr(ubus, "act_on_self", act)
        executor = RpcExecutor(config, collector, TOPIC, UbusBackend(config, "/nonexistent"))
        executor.handle(api_rpc_request("self", "service", "restart", {"name": "spotfi-bridge"}))
        await asyncio.wait_for(acted.wait(), 10)
        await executor.close()

    run(body)
    assert collector.reply("self")["result"] == {"name": "spotfi-bridge", "action": "restart",
                                                 "scheduled": True}
    assert events == ["published self", "sent", "acted"]
    assert spawned[0].script == str(init_dir / "spotfi-bridge")


def test_a_refused_reply_does_not_cancel_the_action(init_dir: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    config = RpcConfig(init_dir=str(init_dir))
    spawned: list[str] = []
    monkeypatch.setattr(ubus, "act_on_self", lambda action: spawned.append(action.action))
    collector = Collector()
    collector.refuse = True
    executor_replies(UbusBackend(config, "/nonexistent"), config,
                     [("s", "service", "stop", {"name": "spotfi-bridge"})], collector)
    assert spawned == ["stop"]


def test_local_backend_emulates_the_same_calls(init_dir: Path, tmp_path: Path) -> None:
    log = tmp_path / "messages"
    log.write_text("".join(f"line {i}\n" for i in range(10)))
    config = RpcConfig(init_dir=str(init_dir), log_file=str(log))
    collector = executor_replies(LocalBackend(config), config, [
        ("log", "log", "read", {"lines": 2}),
        ("wifi", "hostapd", "wlan0/get_status", {}),
        ("stop", "service", "stop", {"name": "network"}),
        ("bad", "service", "stop", {"name": "../network"}),
    ])
    assert [e["msg"] for e in collector.reply("log")["result"]["log"]] == ["line 8", "line 9"]
    wifi = collector.reply("wifi")["result"]
    assert wifi["status"] == "ENABLED" and wifi["channel"] == 6 and wifi["ssid"]
    assert collector.reply("stop")["result"] == {"name": "network", "action": "stop", "code": 0,
                                                 "stdout": "", "stderr": "", "emulated": True}
    assert collector.reply("bad")["status"] == "error"
    assert actions(tmp_path / "state") == []  # emulated: no script ran


def test_local_backend_without_compat_behaves_like_ubus(init_dir: Path, tmp_path: Path) -> None:
    log = tmp_path / "messages"
    log.write_text("line\n")
    config = RpcConfig(init_dir=str(init_dir), log_file=str(log), compat=False)
    collector = executor_replies(LocalBackend(config), config, [
        ("log", "log", "read", {"lines": 2}),
        ("wifi", "hostapd", "wlan0/get_status", {}),
        ("start", "service", "start", {"name": "network"}),
    ])
    assert collector.reply("log") == {"type": "rpc-result", "id": "log", "status": "success",
                                      "result": {}}
    assert collector.reply("wifi")["error"] == "Not found"
    assert collector.reply("start")["error"] == "Method not found"


def test_local_service_status_follows_the_emulated_actions(init_dir: Path) -> None:
    backend = LocalBackend(RpcConfig(init_dir=str(init_dir)))
    action = ServiceAction("network", "status", str(init_dir / "network"), 5.0, 1024)

    async def body() -> list[Any]:
        seen = [(await backend.service(action)).result]
        await backend.service(ServiceAction("network", "stop", "", 5.0, 1024))
        await backend.service(ServiceAction("network", "disable", "", 5.0, 1024))
        seen.append((await backend.service(action)).result)
        return seen

    first, after = run(body)
    assert (first["running"], first["enabled"]) == (True, True)
    assert (after["running"], after["enabled"]) == (False, False)


def test_rules_are_listed_in_bridge_info() -> None:
    collector = executor_replies(LocalBackend(RpcConfig()), RpcConfig(),
                                 [("i", "bridge", "info", {})])
    compat = collector.reply("i")["result"]["rpc"]["compat"]
    assert compat["enabled"] is True
    assert [rule["rule"] for rule in compat["rules"]] == [rule.name for rule in RULES]
    assert all(rule["call"] and rule["runs"] and rule["serves"] for rule in compat["rules"])
