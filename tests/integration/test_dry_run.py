"""``make dry-run`` as make runs it: the dry-run script starts a broker and the bridge,
ctl reaches the bridge with only the exported config path, and SIGINT (Ctrl-C)
leaves no process and no file behind."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO, Optional

import pytest

from tests.helpers.bridge import ROOT
from tests.helpers.broker import Mosquitto
from tests.helpers.wait import WaitTimeout, wait_for

pytestmark = pytest.mark.timeout(60)


class Output:
    def __init__(self, stream: IO[str]) -> None:
        self.text = ""
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self.text += line

    def wait(self, pattern: str, timeout: float = 15) -> re.Match[str]:
        try:
            return wait_for(lambda: re.search(pattern, self.text, re.M), timeout, repr(pattern))
        except WaitTimeout as exc:
            raise WaitTimeout(f"{exc}; dry run said:\n{self.text[-2000:]}") from None


def env_without_spotfi(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPOTFI_")}
    env.update({"XDG_CONFIG_HOME": str(tmp_path / "xdg"), "PYTHONPATH": str(ROOT),
                "PYTHONUNBUFFERED": "1"})
    return env


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def start_dry_run(tmp_path: Path, *args: str) -> tuple[subprocess.Popen[str], Output]:
    proc = subprocess.Popen([sys.executable, "-m", "spotfi_bridge.devtools.dry_run", *args],
                            env=env_without_spotfi(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
                            cwd=str(ROOT))
    assert proc.stdout is not None
    return proc, Output(proc.stdout)


def ping(tmp_path: Path, ctl_config: str) -> subprocess.CompletedProcess[str]:
    env = env_without_spotfi(tmp_path)
    env["SPOTFI_CTL_CONFIG"] = ctl_config
    return subprocess.run([sys.executable, "-m", "spotfi_bridge.ctl", "rpc", "bridge", "ping",
                           "--timeout", "10"],
                          env=env, capture_output=True, text=True, timeout=15,
                          stdin=subprocess.DEVNULL)


def stop(proc: subprocess.Popen[str]) -> Optional[int]:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            return proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode


def test_dry_run_answers_ping_and_stops_clean_on_sigint(tmp_path: Path) -> None:
    proc, out = start_dry_run(tmp_path)
    try:
        ctl_config = out.wait(r"export SPOTFI_CTL_CONFIG=(\S+)").group(1)
        broker_pid = int(out.wait(r"Mosquitto pid (\d+)").group(1))
        bridge_pid = int(out.wait(r"bridge +pid (\d+)").group(1))
        files = Path(out.wait(r"files +(\S+)").group(1))
        assert files.is_dir() and Path(ctl_config).parent == files
        for command in ("rpc bridge ping", "shell", "watch", "sessions"):
            assert f"spotfi-bridge-ctl {command}" in out.text, command
        out.wait(r"bridge \| .*connected to 127\.0\.0\.1:")  # the bridge's log is streamed

        answer = ping(tmp_path, ctl_config)
        assert answer.returncode == 0, answer.stderr
        assert json.loads(answer.stdout)["pong"] is True

        assert stop(proc) == 0
        assert "SIGINT received" in out.text
        assert not alive(bridge_pid) and not alive(broker_pid)
        assert not files.exists(), "temporary files removed"
        assert f"removed {files}" in out.text
    finally:
        stop(proc)


def test_dry_run_uses_an_existing_broker(tmp_path: Path, broker: Mosquitto) -> None:
    proc, out = start_dry_run(tmp_path, "--broker", broker.url)
    try:
        ctl_config = out.wait(r"export SPOTFI_CTL_CONFIG=(\S+)").group(1)
        assert f"{broker.url} (existing broker)" in out.text
        assert "Mosquitto pid" not in out.text
        out.wait(r"bridge \| .*connected to 127\.0\.0\.1:")
        answer = ping(tmp_path, ctl_config)
        assert answer.returncode == 0, answer.stderr
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        assert broker.proc is not None and broker.proc.poll() is None, "not ours: left running"
        assert not Path(ctl_config).exists()
    finally:
        stop(proc)


def test_dry_run_reports_a_bridge_that_dies(tmp_path: Path) -> None:
    proc, out = start_dry_run(tmp_path)
    try:
        bridge_pid = int(out.wait(r"bridge +pid (\d+)").group(1))
        broker_pid = int(out.wait(r"Mosquitto pid (\d+)").group(1))
        os.kill(bridge_pid, signal.SIGKILL)
        assert proc.wait(15) == 1
        assert "bridge exited with status -9" in out.text
        assert not alive(broker_pid), "the broker is stopped too"
    finally:
        stop(proc)
