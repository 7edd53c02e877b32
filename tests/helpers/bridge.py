"""The real daemon as a subprocess (``python -m spotfi_bridge run``), configured per test."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

from spotfi_bridge.config import ConfigError, read_toml
from tests.helpers.wait import wait_for

ROOT = Path(__file__).resolve().parents[2]
#: The terminal shell of every test bridge that does not choose one: without it the daemon
#: runs the host user's login shell (``bash -l``), which reads ~/.bashrc and ~/.profile.
PINNED_SHELL = "/bin/sh"


class BridgeProcess:
    """One daemon with its own temporary directory (config, log), removed by :meth:`close`."""

    def __init__(self, broker_url: str, *, router_id: str = "test-router", token: str = "test-token",
                 toml: Optional[str] = None, env: Optional[dict[str, str]] = None,
                 args: tuple[str, ...] = (), python_code: Optional[str] = None) -> None:
        """``python_code``: run that instead of ``-m spotfi_bridge run`` (a fault injected
        before ``spotfi_bridge.cli.main()``)."""
        self.router_id = router_id
        self.token = token
        self.dir = Path(tempfile.mkdtemp(prefix="spotfi-bridge-"))
        self.log_path = self.dir / "bridge.log"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("SPOTFI_")}
        self.env.update({
            "SPOTFI_ENV_FILE": os.devnull,  # not this machine's /etc/spotfi.env
            "SPOTFI_ROUTER_ID": router_id,
            "SPOTFI_TOKEN": token,
            "SPOTFI_MQTT_BROKER": broker_url,
            "SPOTFI_LOG_LEVEL": "debug",
            "PYTHONPATH": str(ROOT),
            "PYTHONUNBUFFERED": "1",
        })
        if toml is not None:
            config = self.dir / "bridge.toml"
            config.write_text(toml)
            config.chmod(0o600)
            self.env["SPOTFI_CONFIG"] = str(config)
        self.env.update(env or {})
        if not _chooses_shell(self.env):
            self.env["SPOTFI_TERMINAL_SHELL"] = PINNED_SHELL
        self.args = args
        self.python_code = python_code
        self.proc: Optional[subprocess.Popen[bytes]] = None
        self._final_log: Optional[str] = None

    def start(self) -> BridgeProcess:
        log = open(self.log_path, "ab")
        command = ["-c", self.python_code] if self.python_code else ["-m", "spotfi_bridge"]
        self.proc = subprocess.Popen([sys.executable, *command, "run", *self.args],
                                     env=self.env, stdout=log, stderr=log,
                                     stdin=subprocess.DEVNULL, cwd=str(self.dir))
        log.close()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log(self) -> str:
        if self._final_log is not None:
            return self._final_log
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_log(self, needle: str, timeout: float = 10.0) -> str:
        return wait_for(lambda: needle in self.log() and self.log(), timeout,
                        f"{needle!r} in bridge log")

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def terminate(self, timeout: float = 10.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def close(self) -> None:
        """Stop the daemon and remove its directory; :meth:`log` still answers afterwards."""
        if self.proc and self.proc.poll() is None:
            try:
                self.terminate(5)
            except subprocess.TimeoutExpired:
                self.kill()
        if self._final_log is None and self.dir.exists():
            self._final_log = self.log()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> BridgeProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def _chooses_shell(env: dict[str, str]) -> bool:
    """Whether the test set ``[terminal] shell`` itself (environment or its TOML file)."""
    if "SPOTFI_TERMINAL_SHELL" in env:
        return True
    config = env.get("SPOTFI_CONFIG")
    if config is None:
        return False
    try:
        terminal = read_toml(config).get("terminal")
    except ConfigError:
        return False  # the test is about a broken file: leave it exactly as written
    return isinstance(terminal, dict) and "shell" in terminal
