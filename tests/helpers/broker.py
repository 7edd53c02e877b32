"""A real Mosquitto on a free loopback port, started and stopped by the tests."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

from spotfi_bridge.devtools.loopback import mosquitto_binary as find_mosquitto
from spotfi_bridge.devtools.loopback import port_open
from tests.helpers.ports import free_port
from tests.helpers.wait import wait_for


def mosquitto_binary() -> str:
    found = find_mosquitto()
    if found is None:
        raise RuntimeError("mosquitto not found: run `make test`, which installs it")
    return found


class Mosquitto:
    """One broker process. ``restart()`` keeps the port (and persistence, if enabled)."""

    def __init__(self, port: Optional[int] = None, *, users: Optional[dict[str, str]] = None,
                 tls: Optional[dict[str, str]] = None, persistence: bool = False,
                 extra_config: str = "", workdir: Optional[str] = None) -> None:
        self.port = port or free_port()
        self.dir = Path(workdir or tempfile.mkdtemp(prefix="spotfi-mosq-"))
        self.users = users
        self.tls = tls
        self.persistence = persistence
        self.extra_config = extra_config
        self.proc: Optional[subprocess.Popen[bytes]] = None
        self.log_path = self.dir / "mosquitto.log"
        self._write_config()

    @property
    def url(self) -> str:
        scheme = "mqtts" if self.tls else "mqtt"
        return f"{scheme}://127.0.0.1:{self.port}"

    def _write_config(self) -> None:
        lines = [
            f"listener {self.port} 127.0.0.1",
            "set_tcp_nodelay true",
            "max_queued_messages 100000",
            "max_inflight_messages 0",
            "persistent_client_expiration 1h",
            f"persistence {'true' if self.persistence else 'false'}",
            f"persistence_location {self.dir}/",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
        ]
        if os.geteuid() == 0:
            lines.append("user root")  # else it drops to 'mosquitto', who cannot read our 0600 files
        if self.users is not None:
            pwfile = self.dir / "passwd"
            pwfile.write_text("".join(f"{user}:{password}\n" for user, password in self.users.items()))
            pwfile.chmod(0o600)
            subprocess.run(["mosquitto_passwd", "-U", str(pwfile)], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            lines += ["allow_anonymous false", f"password_file {pwfile}"]
        else:
            lines.append("allow_anonymous true")
        if self.tls:
            lines += [f"cafile {self.tls['cafile']}", f"certfile {self.tls['certfile']}",
                      f"keyfile {self.tls['keyfile']}"]
        lines.append(self.extra_config)
        (self.dir / "mosquitto.conf").write_text("\n".join(lines) + "\n")

    def start(self) -> Mosquitto:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([mosquitto_binary(), "-c", str(self.dir / "mosquitto.conf")],
                                     stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        log.close()
        wait_for(lambda: port_open(self.port) or self.proc.poll() is not None, 10,
                 "mosquitto to listen")
        if self.proc.poll() is not None:
            raise RuntimeError(f"mosquitto exited: {self.log_path.read_text()[-2000:]}")
        return self

    def stop(self, kill: bool = False) -> None:
        if self.proc and self.proc.poll() is None:
            if kill:
                self.proc.kill()
            else:
                self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(19)  # SIGSTOP

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(18)  # SIGCONT

    def restart(self, kill: bool = False) -> None:
        self.stop(kill=kill)
        wait_for(lambda: not port_open(self.port), 10, "old broker to release the port")
        self.start()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Mosquitto:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
