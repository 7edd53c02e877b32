"""The command line: ``--version``, ``check-config``, config errors (exit 78, one line)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from spotfi_bridge import __version__
from spotfi_bridge import config as config_module
from spotfi_bridge.cli import main
from tests.helpers.ports import free_port
from tests.helpers.wait import wait_for

TOKEN = "tok-0a1b2c3d4e5f-SECRET"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def clean_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No SPOTFI_* from the caller's shell and no /etc files of this machine."""
    for name in list(os.environ):
        if name.startswith("SPOTFI_"):
            monkeypatch.delenv(name)
    monkeypatch.setattr(config_module, "DEFAULT_TOML_PATH", str(tmp_path / "nowhere" / "bridge.toml"))
    monkeypatch.setattr(config_module, "DEFAULT_ENV_FILE", str(tmp_path / "nowhere" / "spotfi.env"))


@pytest.fixture
def base_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPOTFI_ROUTER_ID", "router-1")
    monkeypatch.setenv("SPOTFI_TOKEN", TOKEN)
    monkeypatch.setenv("SPOTFI_MQTT_BROKER", "mqtts://broker.example.com")


def write(path: Path, text: str, mode: int = 0o600) -> str:
    path.write_text(text)
    os.chmod(path, mode)
    return str(path)


# --------------------------------------------------------------------------- in process


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"spotfi-bridge {__version__}"


def test_check_config_prints_effective_config_with_token_masked(
        base_env: None, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config"]) == 0
    out, err = capsys.readouterr()
    data = json.loads(out)
    assert data["router"]["id"] == "router-1"
    assert data["router"]["token"] == f"<set, {len(TOKEN)} characters>"
    assert data["mqtt"]["broker"] == "mqtts://broker.example.com"
    assert data["metrics"]["interval"] == 30.0
    assert "config OK" in err
    assert TOKEN not in out and TOKEN not in err


def test_check_config_with_config_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    toml = write(tmp_path / "bridge.toml", f"""\
[router]
id = "from-file"
token = "{TOKEN}"

[mqtt]
broker = "ws://broker.example.com:8080/mqtt"

[metrics]
interval = 10
""")
    assert main(["check-config", "--config", toml]) == 0
    out, err = capsys.readouterr()
    data = json.loads(out)
    assert data["router"]["id"] == "from-file"
    assert data["metrics"]["interval"] == 10.0
    assert data["sources"] == [toml]
    assert TOKEN not in out and TOKEN not in err


def test_check_config_prints_warnings_on_stderr(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    env_file = write(tmp_path / "spotfi.env",
                     f"SPOTFI_ROUTER_ID=r1\nSPOTFI_TOKEN={TOKEN}\nSPOTFI_MQTT_BROKER=b\n"
                     "SPOTFI_WS_URL=wss://api.example.com/ws\n", mode=0o644)
    monkeypatch.setenv("SPOTFI_ENV_FILE", env_file)
    assert main(["check-config"]) == 0
    out, err = capsys.readouterr()
    warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert any("SPOTFI_WS_URL" in line for line in warnings)
    assert any("chmod 600" in line for line in warnings)
    assert TOKEN not in out and TOKEN not in err
    assert json.loads(out)["router"]["id"] == "r1"


@pytest.mark.parametrize("command", [["check-config"], ["run"], []])
def test_config_error_exits_78_with_one_line(
        tmp_path: Path, base_env: None, command: list[str],
        capsys: pytest.CaptureFixture[str]) -> None:
    toml = write(tmp_path / "bridge.toml", "[metrics]\ninterval = 90\n")
    assert main([*command, "--config", toml]) == 78
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1
    line = err.strip()
    assert line.startswith("spotfi-bridge: config error: ")
    assert toml in line and "[metrics] interval = 90" in line and "5 to 55" in line
    assert TOKEN not in err


def test_bad_token_type_error_never_shows_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    toml = write(tmp_path / "bridge.toml", "[router]\nid = 'r1'\ntoken = 31415926535\n")
    monkeypatch.setenv("SPOTFI_MQTT_BROKER", "b")
    assert main(["check-config", "--config", toml]) == 78
    err = capsys.readouterr().err
    assert "31415926535" not in err and "[router] token" in err and toml in err


def test_missing_config_file(tmp_path: Path, base_env: None, capsys: pytest.CaptureFixture[str]) -> None:
    missing = str(tmp_path / "absent.toml")
    assert main(["check-config", "--config", missing]) == 78
    assert capsys.readouterr().err == f"spotfi-bridge: config error: {missing}: config file not found\n"


def test_missing_required_setting(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config"]) == 78
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "[router] id is not set" in err and "SPOTFI_ROUTER_ID" in err


def test_unknown_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["frobnicate"])
    assert info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


# --------------------------------------------------------------------------- as a process


def spotfi_bridge(args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SPOTFI_")}
    environ["SPOTFI_ENV_FILE"] = os.devnull
    environ.update(env)
    return subprocess.run([sys.executable, "-m", "spotfi_bridge", *args], cwd=REPO, env=environ,
                          capture_output=True, text=True, timeout=60, check=False)


def test_process_version(tmp_path: Path) -> None:
    proc = spotfi_bridge(["--version"], tmp_path)
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"spotfi-bridge {__version__}"


@pytest.mark.skipif(os.path.exists(config_module.DEFAULT_TOML_PATH),
                    reason="this machine has a system-wide bridge.toml")
def test_process_check_config_from_environment_alone(tmp_path: Path) -> None:
    proc = spotfi_bridge(["check-config"], tmp_path, SPOTFI_ROUTER_ID="router-env",
                         SPOTFI_TOKEN=TOKEN, SPOTFI_MQTT_BROKER="tcp://127.0.0.1:1883")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["router"]["id"] == "router-env"
    assert data["sources"] == []
    assert TOKEN not in proc.stdout and TOKEN not in proc.stderr


def test_process_check_config_with_config_file(tmp_path: Path) -> None:
    toml = write(tmp_path / "bridge.toml",
                 f'[router]\nid = "r-file"\ntoken = "{TOKEN}"\n[mqtt]\nbroker = "mqtt://127.0.0.1"\n')
    proc = spotfi_bridge(["--config", toml, "check-config"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["router"]["id"] == "r-file"
    assert TOKEN not in proc.stdout and TOKEN not in proc.stderr


def test_process_config_error_exits_78_with_one_line(tmp_path: Path) -> None:
    toml = write(tmp_path / "bridge.toml", '[router]\nid = "bad/id"\n')
    proc = spotfi_bridge(["run", "--config", toml], tmp_path, SPOTFI_TOKEN=TOKEN,
                         SPOTFI_MQTT_BROKER="mqtt://127.0.0.1")
    assert proc.returncode == 78
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1
    assert toml in proc.stderr and "[router] id = 'bad/id'" in proc.stderr
    assert TOKEN not in proc.stderr


def test_process_config_from_spotfi_config(tmp_path: Path) -> None:
    toml = write(tmp_path / "bridge.toml", "[mqtt]\nkeepalive = 1\n")
    proc = spotfi_bridge(["check-config"], tmp_path, SPOTFI_CONFIG=toml, SPOTFI_ROUTER_ID="r1",
                         SPOTFI_TOKEN=TOKEN, SPOTFI_MQTT_BROKER="b")
    assert proc.returncode == 78
    assert proc.stderr.count("\n") == 1 and toml in proc.stderr and "[mqtt] keepalive = 1" in proc.stderr


@pytest.mark.parametrize(("args", "stamped"), [((), True), (("--logd",), False)])
def test_process_log_lines_are_stamped_unless_logd_stamps_them(
        tmp_path: Path, args: tuple[str, ...], stamped: bool) -> None:
    # procd hands stderr to logd, which adds the time (the init script passes --logd);
    # run by hand, the line itself must say when
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SPOTFI_")}
    environ.update(SPOTFI_ENV_FILE=write(tmp_path / "spotfi.env", ""), SPOTFI_ROUTER_ID="r1",
                   SPOTFI_TOKEN=TOKEN, SPOTFI_MQTT_BROKER=f"mqtt://127.0.0.1:{free_port()}")
    log_path = tmp_path / "stderr.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "spotfi_bridge", "run", *args], cwd=REPO,
                                env=environ, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    try:
        text = wait_for(lambda: "starting" in log_path.read_text() and log_path.read_text(), 30,
                        "the start-up line")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    first = text.splitlines()[0]
    assert first.startswith("INFO spotfi_bridge.daemon: spotfi-bridge") != stamped, first
    assert bool(re.match(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}\.\d{3} INFO ", first)) == stamped
