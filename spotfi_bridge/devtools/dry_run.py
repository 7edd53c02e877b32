"""``make dry-run``: the whole bridge on a developer's machine, no router and no SpotFi API.

Starts Mosquitto on a free loopback port with a throw-away config (or uses
``--broker``), starts the real daemon (``python -m spotfi_bridge run``) as router
``dev-router`` with the local RPC backend, prints the ``spotfi-bridge-ctl``
commands to try, streams both logs, and on Ctrl-C / SIGTERM / SIGHUP stops
what it started (bridge first, so it can say OFFLINE) and removes its files.

Children run in their own process groups so that Ctrl-C reaches only this
script, which then stops them in order; each also gets SIGTERM from the kernel
should this script die without cleaning up (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import IO, Optional, Sequence

from spotfi_bridge.config import parse_broker_url
from spotfi_bridge.ctl.settings import write_config
from spotfi_bridge.devtools.loopback import free_port, mosquitto_binary, port_open

ROOT = Path(__file__).resolve().parents[2]
ROUTER_ID = "dev-router"
STOP_TIMEOUT = 5.0
BROKER_START_TIMEOUT = 5.0
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM it when the dry run itself dies."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the normal clean-up path still stops the children


def bridge_toml(router_id: str, broker: str, metrics_interval: float, log_level: str) -> str:
    return (
        "# spotfi-bridge dry-run config: written and removed by `make dry-run`\n"
        "[router]\n"
        f'id = "{router_id}"\n'
        'token = "dry-run-token"\n'
        'name = "dry run"\n'
        "[mqtt]\n"
        f'broker = "{broker}"\n'
        "backoff_max = 5\n"
        "[metrics]\n"
        f"interval = {metrics_interval:g}\n"
        "[rpc]\n"
        'backend = "local"\n'
        "[log]\n"
        f'level = "{log_level}"\n'
    )


class Child:
    """A started process whose merged output is streamed line by line with a prefix."""

    def __init__(self, name: str, proc: subprocess.Popen[bytes]) -> None:
        self.name = name
        self.proc = proc
        assert proc.stdout is not None
        self.fd = proc.stdout.fileno()
        os.set_blocking(self.fd, False)
        self.partial = b""
        self.open = True
        #: set once a line containing ``ready_marker`` was seen
        self.ready_marker = b""
        self.ready = False


class DryRun:
    def __init__(self, broker: Optional[str], router_id: str, metrics_interval: float,
                 log_level: str, out: IO[str]) -> None:
        self.external_broker = broker
        self.router_id = router_id
        self.metrics_interval = metrics_interval
        self.log_level = log_level
        self.out = out
        self.dir = Path(tempfile.mkdtemp(prefix="spotfi-dry-run-"))
        self.children: list[Child] = []
        self.selector = selectors.DefaultSelector()
        self.stop_signal: Optional[int] = None
        self._wake_r, self._wake_w = os.pipe()
        for fd in (self._wake_r, self._wake_w):
            os.set_blocking(fd, False)
        self.selector.register(self._wake_r, selectors.EVENT_READ, None)

    # ------------------------------------------------------------------ output

    def say(self, text: str = "") -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def _pump(self, child: Child, final: bool = False) -> None:
        while child.open:
            try:
                data = os.read(child.fd, 65536)
            except BlockingIOError:
                break
            if not data:
                child.open = False
                self.selector.unregister(child.fd)
                break
            child.partial += data
        *lines, child.partial = child.partial.split(b"\n")
        if (final or not child.open) and child.partial:
            lines.append(child.partial)
            child.partial = b""
        for line in lines:
            if child.ready_marker and child.ready_marker in line:
                child.ready = True
            self.say(f"{child.name:>9} | {line.decode('utf-8', 'replace').rstrip()}")

    # ------------------------------------------------------------------ signals

    def _on_signal(self, signum: int, _frame: Optional[FrameType]) -> None:
        if self.stop_signal is None:
            self.stop_signal = signum
        self._wake()

    def _on_child(self, _signum: int, _frame: Optional[FrameType]) -> None:
        self._wake()  # a child exited: the loop looks at every child's status

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"!")
        except OSError:
            pass  # a wake-up is already pending

    def _service(self, timeout: Optional[float]) -> None:
        """Wait for output, a signal or a child's exit (at most ``timeout`` s) and handle it."""
        for key, _ in self.selector.select(timeout):
            if key.data is None:
                try:
                    while os.read(self._wake_r, 4096):
                        pass
                except BlockingIOError:
                    pass
            else:
                self._pump(key.data)

    # ------------------------------------------------------------------ start

    def _spawn(self, name: str, argv: list[str], env: Optional[dict[str, str]] = None) -> Child:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, env=env, cwd=str(self.dir),
                                start_new_session=True, preexec_fn=_die_with_parent)
        child = Child(name, proc)
        self.children.append(child)
        self.selector.register(child.fd, selectors.EVENT_READ, child)
        return child

    def _start_broker(self) -> str:
        binary = mosquitto_binary()
        if binary is None:
            raise RuntimeError("mosquitto is not installed: `make dry-run` installs it "
                               "(or pass BROKER=mqtt://host:port to use another broker)")
        port = free_port()
        conf = self.dir / "mosquitto.conf"
        conf.write_text(
            f"listener {port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "persistence false\n"
            "set_tcp_nodelay true\n"
            "log_dest stderr\n"
            "log_timestamp_format %H:%M:%S\n"
            "log_type error\nlog_type warning\nlog_type notice\nlog_type information\n")
        child = self._spawn("mosquitto", [binary, "-c", str(conf)])
        # Mosquitto logs "mosquitto version X running" once its listeners are open: wait for that
        # line; only if it never comes (another version's wording) probe the port once
        child.ready_marker = b" running"
        deadline = time.monotonic() + BROKER_START_TIMEOUT
        while not child.ready and time.monotonic() < deadline:
            if child.proc.poll() is not None or self.stop_signal is not None:
                break
            self._service(max(0.0, deadline - time.monotonic()))
        if child.proc.poll() is not None:
            self._pump(child, final=True)
            raise RuntimeError(f"mosquitto exited with status {child.proc.returncode}")
        if self.stop_signal is not None:
            raise RuntimeError("stopped while starting mosquitto")
        if not child.ready and not port_open(port):
            raise RuntimeError(f"mosquitto did not listen on 127.0.0.1:{port} within "
                               f"{BROKER_START_TIMEOUT:g} s")
        self.broker_pid = child.proc.pid
        return f"mqtt://127.0.0.1:{port}"

    def _start_bridge(self, broker: str) -> Child:
        config = self.dir / "bridge.toml"
        fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(bridge_toml(self.router_id, broker, self.metrics_interval, self.log_level))
        env = {k: v for k, v in os.environ.items() if not k.startswith("SPOTFI_")}
        pythonpath = [str(ROOT), *filter(None, [env.get("PYTHONPATH")])]
        env.update({
            "SPOTFI_CONFIG": str(config),
            # never read the host's /etc/spotfi.env (it may belong to a real router)
            "SPOTFI_ENV_FILE": os.devnull,  # not this machine's /etc/spotfi.env
            "PYTHONPATH": os.pathsep.join(pythonpath),
            "PYTHONUNBUFFERED": "1",
        })
        return self._spawn("bridge", [sys.executable, "-m", "spotfi_bridge", "run"], env)

    # ------------------------------------------------------------------ run

    def run(self) -> int:
        handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        previous = {signum: signal.signal(signum, self._on_signal) for signum in handled}
        previous[signal.SIGCHLD] = signal.signal(signal.SIGCHLD, self._on_child)
        status = 0
        try:
            if self.external_broker:
                broker = self.external_broker
                broker_line = f"{broker} (existing broker)"
            else:
                broker = self._start_broker()
                broker_line = f"{broker} (Mosquitto pid {self.broker_pid}, started for this run)"
            ctl_config = self.dir / "ctl.toml"
            write_config(str(ctl_config), broker, self.router_id)
            bridge = self._start_bridge(broker)
            self._banner(broker, broker_line, bridge.proc.pid, ctl_config)
            status = self._stream(bridge)
        except RuntimeError as exc:
            self.say(f"dry run: {exc}")
            status = 1
        finally:
            self._stop_all()
            shutil.rmtree(self.dir, ignore_errors=True)
            self.selector.close()
            os.close(self._wake_r)
            os.close(self._wake_w)
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            self.say(f"dry run stopped; removed {self.dir}")
        return status

    def _stream(self, bridge: Child) -> int:
        """Stream logs until a stop signal (status 0) or a child dies on its own (status 1)."""
        while self.stop_signal is None:
            self._service(None)
            for child in self.children:
                if child.proc.poll() is not None:
                    self._pump(child, final=True)
                    self.say(f"dry run: {child.name} exited with status {child.proc.returncode}; "
                             "stopping")
                    return 1
        name = signal.Signals(self.stop_signal).name
        self.say(f"dry run: {name} received; stopping the bridge"
                 f"{'' if self.external_broker else ' and the broker'}")
        return 0

    def _stop_all(self) -> None:
        """Bridge first (it publishes OFFLINE on its way out), then the broker."""
        for child in sorted(self.children, key=lambda c: c.name != "bridge"):
            proc = child.proc
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                deadline = time.monotonic() + STOP_TIMEOUT
                while proc.poll() is None and time.monotonic() < deadline:
                    self._service(max(0.0, deadline - time.monotonic()))
                if proc.poll() is None:
                    self.say(f"dry run: {child.name} did not stop within {STOP_TIMEOUT:g} s; "
                             "killing it")
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            if child.open:
                self._pump(child, final=True)
            if proc.stdout is not None:
                proc.stdout.close()

    def _banner(self, broker: str, broker_line: str, bridge_pid: int, ctl_config: Path) -> None:
        ctl = _ctl_command()
        lines = [
            "",
            "spotfi-bridge dry run",
            f"  broker   {broker_line}",
            f"  bridge   pid {bridge_pid}: router {self.router_id}, local RPC backend, "
            f"metrics every {self.metrics_interval:g} s",
            f"  files    {self.dir} (removed on exit)",
            "",
            "Try it from another terminal, in this directory:",
            "",
            f"  export SPOTFI_CTL_CONFIG={ctl_config}",
            f"  {ctl} rpc bridge ping        # a round trip through the broker",
            f"  {ctl} rpc system info        # a ubus call, answered by the local backend",
            f"  {ctl} shell                  # a terminal on the bridge; ~. quits",
            f"  {ctl} watch                  # presence and metrics, live",
            f"  {ctl} sessions               # open terminal sessions",
            "",
            f"  (or, without the export: {ctl} --broker {broker} --router {self.router_id} shell)",
            "",
            "Ctrl-C here stops everything this dry run started and removes its files.",
            "",
        ]
        self.say("\n".join(lines))


def _ctl_command() -> str:
    """How to run ctl from the current directory: the venv's console script when present."""
    script = Path(sys.executable).parent / "spotfi-bridge-ctl"
    if not script.exists():
        return f"{sys.executable} -m spotfi_bridge.ctl"
    try:
        return os.path.relpath(script) if not os.path.relpath(script).startswith("..") else str(script)
    except ValueError:
        return str(script)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m spotfi_bridge.devtools.dry_run",
        description="Run the bridge locally against a throw-away Mosquitto (or --broker).")
    parser.add_argument("--broker", metavar="URL", help="use this broker instead of starting one")
    parser.add_argument("--router-id", default=ROUTER_ID, help=f"router id (default {ROUTER_ID})")
    parser.add_argument("--metrics-interval", type=float, default=5.0, metavar="S",
                        help="seconds between metrics (5 to 55, default 5)")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    args = parser.parse_args(argv)
    if args.broker:
        try:
            parse_broker_url(args.broker)
        except ValueError:
            parser.error(f"--broker {args.broker!r} is not a broker URL like mqtt://host:1883")
    if not 5 <= args.metrics_interval <= 55:
        parser.error("--metrics-interval must be from 5 to 55 seconds")
    from spotfi_bridge.protocol import router_id_problem

    problem = router_id_problem(args.router_id)
    if problem:
        parser.error(f"--router-id {args.router_id!r} {problem}")
    return DryRun(args.broker, args.router_id, args.metrics_interval, args.log_level,
                  sys.stdout).run()


if __name__ == "__main__":
    raise SystemExit(main())
