"""The daemon as the .ipk installs it: unpacked data.tar.gz, started through the packaged
launcher as procd would start it, serving presence, RPC and a terminal through a real broker.

This is what the unit tests of the package cannot show: that the files it ships (the
bundled ptyprocess included) are enough to run the whole bridge.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests.conftest import wait_online
from tests.helpers.apiclient import ApiClient
from tests.helpers.broker import Mosquitto
from tests.unit.test_packaging import load_builder, open_ipk, shell

ROUTER = "packaged-router"


@pytest.fixture(scope="module")
def installed_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    built = load_builder().build_ipk(tmp_path_factory.mktemp("dist"))
    root = tmp_path_factory.mktemp("root")
    with tarfile.open(fileobj=io.BytesIO(open_ipk(built.path).data_tar)) as archive:
        if hasattr(tarfile, "data_filter"):  # keep the modes as shipped, refuse odd paths
            archive.extractall(root, filter="tar")
        else:  # pragma: no cover - Python without extraction filters
            archive.extractall(root)
    return root


def test_packaged_daemon_serves_rpc_and_a_terminal(installed_root: Path, broker: Mosquitto,
                                                   api: ApiClient, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SPOTFI_", "PYTHON"))}
    env_file = tmp_path / "spotfi.env"  # the legacy file, as SpotFi's setup script writes it
    env_file.write_text(f"SPOTFI_ROUTER_ID={ROUTER}\nSPOTFI_TOKEN=tok-packaged\n"
                        f"SPOTFI_MQTT_BROKER={broker.url}\n")
    env_file.chmod(0o600)
    env.update({"SPOTFI_BRIDGE_LIB": str(installed_root / "usr/lib/spotfi-bridge"),
                "SPOTFI_BRIDGE_PYTHON": sys.executable, "SPOTFI_ENV_FILE": str(env_file),
                "SPOTFI_CONFIG": str(tmp_path / "bridge.toml")})
    # the shell pinned: the default is the user's login shell, which reads ~/.bashrc
    (tmp_path / "bridge.toml").write_text("[rpc]\nbackend = \"local\"\n"
                                          "[terminal]\nshell = [\"/bin/sh\"]\n")
    log = open(tmp_path / "bridge.log", "wb")
    proc = subprocess.Popen([*shell(), str(installed_root / "usr/bin/spotfi-bridge"), "run"],
                            env=env, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                            cwd=str(tmp_path))
    log.close()
    try:
        wait_online(api, ROUTER)
        info = api.rpc(ROUTER, "bridge", "info")
        assert info["status"] == "success", info
        assert info["result"]["backend"] == "local"
        session = api.x_start(ROUTER, cols=100, rows=30)
        api.wait_x(session, "x-started")
        api.x_send(ROUTER, session, b"echo pkg-$((6*7)); stty size\n")
        output = api.wait_output(session, b"30 100")
        assert b"pkg-42" in output
        assert not list(installed_root.rglob("__pycache__")), "nothing written beside the code"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0, (tmp_path / "bridge.log").read_text()
    assert "tok-packaged" not in (tmp_path / "bridge.log").read_text()
