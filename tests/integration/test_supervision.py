"""The daemon never lingers half alive: a link or task that dies ends it with a non-zero
status (procd respawns it), TLS files are checked before they are used, reloads never overlap.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from spotfi_bridge.devtools.loopback import port_open
from tests.conftest import wait_online
from tests.helpers.apiclient import ApiClient
from tests.helpers.bridge import ROOT, BridgeProcess
from tests.helpers.broker import Mosquitto
from tests.helpers.certs import make_ca, make_server_cert
from tests.helpers.ports import free_port
from tests.helpers.wait import wait_for

ROUTER = "test-router"
FAST = "[metrics]\ninterval = 5\n[mqtt]\nkeepalive = 5\nbackoff_min = 0.1\nbackoff_max = 1\n"
EX_CONFIG = 78
EX_SOFTWARE = 70


@pytest.fixture(scope="module")
def tls_material(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("tls")
    ca = make_ca(directory, "ca")
    server = make_server_cert(directory, ca, "IP:127.0.0.1,DNS:localhost", "server")
    client = make_server_cert(directory, ca, f"DNS:{ROUTER}", "client", usage="clientAuth")
    other = make_server_cert(directory, ca, f"DNS:{ROUTER}", "other", usage="clientAuth")
    not_pem = directory / "not-pem.crt"
    not_pem.write_text("this is not a certificate\n")
    return {"ca": ca[0], "cert": server[0], "key": server[1], "client_cert": client[0],
            "client_key": client[1], "other_key": other[1], "not_pem": not_pem}


@pytest.fixture
def tls_broker(tls_material: dict[str, Path]) -> Iterator[Mosquitto]:
    """TLS for the bridge, and a plain listener (``plain_port``) for the API client."""
    plain = free_port()
    with Mosquitto(tls={"cafile": str(tls_material["ca"]),
                        "certfile": str(tls_material["cert"]),
                        "keyfile": str(tls_material["key"])},
                   extra_config=f"listener {plain} 127.0.0.1") as broker:
        wait_for(lambda: port_open(plain), 10, "the plain listener")
        broker.plain_port = plain  # type: ignore[attr-defined]
        yield broker


def _tls_toml(ca: Path, extra: str = "") -> str:
    return f'{FAST}[tls]\nca_file = "{ca}"\n{extra}'


def _exit_status(bridge: BridgeProcess, timeout: float = 20.0) -> int:
    assert bridge.proc is not None
    return bridge.proc.wait(timeout)


# --------------------------------------------------------------------------- TLS files

def test_run_with_a_ca_file_that_is_not_pem_exits_78_naming_it(
        tls_broker: Mosquitto, tls_material: dict[str, Path]) -> None:
    bridge = BridgeProcess(tls_broker.url, toml=_tls_toml(tls_material["not_pem"])).start()
    try:
        status = _exit_status(bridge)
    finally:
        bridge.close()
    assert status == EX_CONFIG
    log = bridge.log()
    assert f"[tls] ca_file = '{tls_material['not_pem']}' is invalid" in log
    assert "PEM certificates" in log and str(bridge.dir / "bridge.toml") in log


@pytest.mark.parametrize("key, expected", [
    ("other_key", "does not match cert_file: expected the private key of the certificate"),
    ("not_pem", "is invalid: expected an unencrypted PEM private key"),
])
def test_check_config_loads_the_client_certificate_and_key(
        tmp_path: Path, tls_material: dict[str, Path], key: str, expected: str) -> None:
    config = tmp_path / "bridge.toml"
    config.write_text(f'[router]\nid = "r1"\ntoken = "tok-123456"\n[mqtt]\n'
                      f'broker = "mqtts://127.0.0.1:1"\n[tls]\n'
                      f'ca_file = "{tls_material["ca"]}"\n'
                      f'cert_file = "{tls_material["client_cert"]}"\n'
                      f'key_file = "{tls_material[key]}"\n')
    config.chmod(0o600)
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT),
           "SPOTFI_ENV_FILE": os.devnull}
    proc = subprocess.run([sys.executable, "-m", "spotfi_bridge", "check-config", "--config",
                           str(config)], env=env, capture_output=True, text=True, timeout=20)
    assert proc.returncode == EX_CONFIG, proc.stderr
    assert f"{config}: [tls] key_file = '{tls_material[key]}' {expected}" in proc.stderr
    good = config.read_text().replace(str(tls_material[key]), str(tls_material["client_key"]))
    config.write_text(good)
    proc = subprocess.run([sys.executable, "-m", "spotfi_bridge", "check-config", "--config",
                           str(config)], env=env, capture_output=True, text=True, timeout=20)
    assert proc.returncode == 0, proc.stderr


def test_reload_to_a_ca_file_that_is_not_pem_keeps_the_running_link(
        tls_broker: Mosquitto, tls_material: dict[str, Path]) -> None:
    api = ApiClient(tls_broker.plain_port)  # type: ignore[attr-defined]
    bridge = BridgeProcess(tls_broker.url, toml=_tls_toml(tls_material["ca"])).start()
    try:
        wait_online(api)
        (bridge.dir / "bridge.toml").write_text(_tls_toml(tls_material["not_pem"]))
        bridge.signal(signal.SIGHUP)
        bridge.wait_log("reload failed, keeping the running config")
        assert "[tls] ca_file" in bridge.log()
        reply = api.rpc(ROUTER, "bridge", "info", timeout=10)
        assert reply["status"] == "success", reply
        assert reply["result"]["link"]["connects"] == 1
        assert bridge.terminate() == 0
    finally:
        bridge.close()
        api.close()


# --------------------------------------------------------------------------- failing parts

_PRELUDE = "import asyncio, sys\n"
_MAIN = "from spotfi_bridge.cli import main\nsys.exit(main(sys.argv[1:]))\n"
#: a bug injected in one long-lived part, once the bridge is ONLINE
FAULTS = {
    # an exception escaping a loop callback of the link
    "link callback": """
from spotfi_bridge import link
original = link.MqttLink._after_connect
def broken(self, client):
    original(self, client)
    raise RuntimeError("injected fault in a link callback")
link.MqttLink._after_connect = broken
""",
    # the link's run() task raising
    "link task": """
from spotfi_bridge import link
original = link.MqttLink.run
async def broken(self):
    task = asyncio.ensure_future(original(self))
    await self.wait_connected()
    await asyncio.sleep(0.5)
    raise RuntimeError("injected fault in the link task")
link.MqttLink.run = broken
""",
    # a metrics publishing task raising
    "metrics task": """
from spotfi_bridge import metrics
async def broken(self):
    raise RuntimeError("injected fault in the metrics task")
metrics.MetricsPublisher._publish_once = broken
""",
    # a reload raising
    "reload": """
from spotfi_bridge import daemon
async def broken(self):
    raise RuntimeError("injected fault in the reload")
daemon.Daemon.reload = broken
""",
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_an_unexpected_exception_in_a_long_lived_part_ends_the_daemon_loudly(
        api: ApiClient, broker: Mosquitto, fault: str) -> None:
    bridge = BridgeProcess(broker.url, toml=FAST,
                           python_code=_PRELUDE + FAULTS[fault] + _MAIN).start()
    try:
        wait_online(api)
        if fault == "reload":
            bridge.signal(signal.SIGHUP)
        status = _exit_status(bridge)
    finally:
        bridge.close()
    log = bridge.log()
    assert status == EX_SOFTWARE, log[-2000:]
    assert "Traceback (most recent call last)" in log
    injected = re.search(r'"(injected fault[^"]*)"', FAULTS[fault])
    assert injected is not None and f"RuntimeError: {injected.group(1)}" in log
    assert re.search(r"stopped after a failure .*: exit status 70", log), log[-2000:]


# --------------------------------------------------------------------------- reloads

def test_two_sighups_changing_the_router_id_leave_one_set_of_workers(
        api: ApiClient, broker: Mosquitto) -> None:
    """The second SIGHUP arrives while the first reload is still ending the old id's sessions
    (the shell became a ``sleep`` that ignores SIGHUP, so that takes the kill grace): it waits for it."""
    terminal = '[terminal]\nshell = "/bin/sh"\n'
    bridge = BridgeProcess(broker.url, toml=FAST + f'[router]\nid = "{ROUTER}"\n' + terminal)
    bridge.env.pop("SPOTFI_ROUTER_ID")  # the environment would override the file's id
    try:
        bridge.start()
        wait_online(api)
        session = api.x_start(ROUTER)
        api.x_send(ROUTER, session, b"trap '' HUP; echo trapped-$((6*7)); exec sleep 60\n")
        api.wait_output(session, b"trapped-42")
        config = bridge.dir / "bridge.toml"
        config.write_text(FAST + '[router]\nid = "renamed-router"\n' + terminal)
        bridge.signal(signal.SIGHUP)
        bridge.wait_log("router id changed from test-router to renamed-router")
        bridge.signal(signal.SIGHUP)
        wait_online(api, "renamed-router", timeout=20)
        info = wait_for(lambda: (lambda i: i if i["daemon"]["reloads"] == 2 else None)(
            api.rpc("renamed-router", "bridge", "info")["result"]), 20, "both reloads done")
        assert bridge.log().count("router id changed from") == 1
        assert info["daemon"]["router_id_changes"] == 1
        assert info["terminal"]["sessions"] == 0
        # the workers in use are the ones the reload built: a new session is seen and listed
        fresh = api.x_start("renamed-router")
        api.x_send("renamed-router", fresh, b"echo fresh-$((2*3))\n")
        api.wait_output(fresh, b"fresh-6")
        listed = api.rpc("renamed-router", "bridge", "sessions")["result"]["sessions"]
        assert [entry["id"] for entry in listed] == [fresh], listed
    finally:
        bridge.close()
