"""spotfi-bridge-ctl end to end: the real ctl process, a real Mosquitto, the real daemon,
and for ``ctl shell`` a real PTY standing in for the operator's terminal."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import signal
import struct
import subprocess
import sys
import termios
import threading
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Optional

import pytest

from tests.conftest import wait_online
from tests.helpers.apiclient import ApiClient
from tests.helpers.bridge import ROOT, BridgeProcess
from tests.helpers.broker import Mosquitto
from tests.helpers.certs import make_ca, make_server_cert
from tests.helpers.wait import WaitTimeout, wait_for

ROUTER = "test-router"
BASE = ("[metrics]\ninterval = 30\n[mqtt]\nkeepalive = 10\nbackoff_min = 0.1\n"
        "backoff_max = 1\n[rpc]\nbackend = \"local\"\n[terminal]\nshell = \"/bin/sh\"\n")
CTL_OUT = re.compile(r"^spotfi/api/ctl-[0-9a-f]{8}/x/out$")

pytestmark = pytest.mark.timeout(60)


def ctl_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The test's environment without any SPOTFI_* and with no real ~/.config in reach."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPOTFI_")}
    env.update({"XDG_CONFIG_HOME": str(tmp_path / "xdg"), "PYTHONPATH": str(ROOT)})
    env.update(extra)
    return env


def ctl_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "spotfi_bridge.ctl", *args]


def run_ctl(broker: Mosquitto, tmp_path: Path, *args: str, router: str = ROUTER,
            timeout: float = 15) -> subprocess.CompletedProcess[str]:
    return subprocess.run(ctl_argv("--broker", broker.url, "--router", router, *args),
                          env=ctl_env(tmp_path), capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


class Lines:
    """Every line a pipe produced, collected by a thread so tests can wait on them."""

    def __init__(self, stream: IO[str]) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self.lines.append(line.rstrip("\n"))

    def json(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in list(self.lines) if line.startswith("{")]

    def wait(self, predicate: Callable[[dict[str, Any]], bool], what: str,
             timeout: float = 10) -> dict[str, Any]:
        try:
            return wait_for(lambda: next((r for r in self.json() if predicate(r)), None), timeout,
                            what)
        except WaitTimeout as exc:
            raise WaitTimeout(f"{exc}; got {self.lines[-5:]}") from None


# --------------------------------------------------------------------------- rpc


def test_rpc_success_error_timeout_and_config_file(
        api: ApiClient, broker: Mosquitto, make_bridge: Callable[..., BridgeProcess],
        tmp_path: Path) -> None:
    make_bridge(toml=BASE)
    wait_online(api)
    api.subscribe(f"spotfi/router/{ROUTER}/rpc/request")

    ok = run_ctl(broker, tmp_path, "rpc", "bridge", "ping")
    assert ok.returncode == 0, ok.stderr
    assert len(ok.stdout.splitlines()) == 1, "not a tty: one compact line"
    assert json.loads(ok.stdout)["pong"] is True
    request = api.matching(f"spotfi/router/{ROUTER}/rpc/request")[-1].json()
    assert request["type"] == "rpc" and request["path"] == "bridge" and request["args"] == {}
    assert re.match(r"^cmd_\d+_[0-9a-f]{4}_1$", request["id"])

    run = run_ctl(broker, tmp_path, "rpc", "file", "exec",
                  '{"command": "/bin/sh", "params": ["-c", "echo out; exit 2"]}', "--pretty")
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == {"code": 2, "stdout": "out\n", "stderr": ""}
    assert run.stdout.startswith("{\n  "), "--pretty indents"

    missing = run_ctl(broker, tmp_path, "rpc", "nosuch", "thing")
    assert missing.returncode == 1
    assert "error: nosuch.thing: Not found" in missing.stderr and missing.stdout == ""

    ghost = run_ctl(broker, tmp_path, "rpc", "bridge", "ping", "--timeout", "1", router="ghost")
    assert ghost.returncode == 124
    assert "no reply from router ghost within 1 s" in ghost.stderr
    assert "never announced itself" in ghost.stderr

    # the dry run's way: a config file named by SPOTFI_CTL_CONFIG, no flags at all
    config = tmp_path / "ctl.toml"
    config.write_text(f'broker = "{broker.url}"\nrouter = "{ROUTER}"\n')
    flagless = subprocess.run(ctl_argv("rpc", "bridge", "ping"), capture_output=True, text=True,
                              env=ctl_env(tmp_path, SPOTFI_CTL_CONFIG=str(config)), timeout=15)
    assert flagless.returncode == 0 and json.loads(flagless.stdout)["pong"] is True


def test_rpc_errors_name_the_call(api: ApiClient, broker: Mosquitto,
                                  make_bridge: Callable[..., BridgeProcess],
                                  tmp_path: Path) -> None:
    make_bridge(toml=BASE)
    wait_online(api)
    nomethod = run_ctl(broker, tmp_path, "rpc", "system", "nomethod")
    assert nomethod.returncode == 1
    assert nomethod.stderr.splitlines()[-1] == "error: system.nomethod: Method not found"


@pytest.mark.parametrize("command", [("rpc", "system", "info"), ("sessions",)])
def test_a_router_the_broker_never_saw_is_reported_without_waiting_the_timeout(
        broker: Mosquitto, tmp_path: Path, command: tuple[str, ...]) -> None:
    # no retained status: the router never connected to this broker (a typo in --router or
    # --broker), so no reply will come; the default timeout is 30 s, the run is bounded at 20
    ghost = run_ctl(broker, tmp_path, *command, router="ghost", timeout=20)
    assert ghost.returncode == 124
    call = "bridge.sessions" if command == ("sessions",) else "system.info"
    assert ghost.stderr.strip() == (
        f"spotfi-bridge-ctl: router ghost has never announced itself on {broker.url} (no "
        f"retained status after 2 s): no reply to {call} will come; check --router and "
        "--broker"), ghost.stderr


def test_unreachable_broker_is_a_clear_error(tmp_path: Path) -> None:
    from tests.helpers.ports import free_port

    result = subprocess.run(ctl_argv("--broker", f"mqtt://127.0.0.1:{free_port()}", "--router",
                                     ROUTER, "rpc", "bridge", "ping"),
                            env=ctl_env(tmp_path), capture_output=True, text=True, timeout=15)
    assert result.returncode == 3
    assert "cannot connect to mqtt://127.0.0.1:" in result.stderr
    assert "connection refused" in result.stderr and "Traceback" not in result.stderr


def test_tls_and_credentials(tmp_path: Path) -> None:
    """An operator's setup: mqtts with a private CA and a username/password for ctl."""
    ca = make_ca(tmp_path / "tls")
    other_ca = make_ca(tmp_path / "tls", "other-ca")
    cert, key = make_server_cert(tmp_path / "tls", ca, "IP:127.0.0.1,DNS:localhost")
    users = {ROUTER: "router-token-1", "operator": "op-secret-77"}
    with Mosquitto(users=users, tls={"cafile": str(ca[0]), "certfile": str(cert),
                                     "keyfile": str(key)}) as broker, \
            BridgeProcess(broker.url, toml=BASE, token="router-token-1",
                          env={"SPOTFI_TLS_CA_FILE": str(ca[0])}) as bridge:

        def ctl(cafile: Path, password: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                ctl_argv("--broker", broker.url, "--router", ROUTER, "--cafile", str(cafile),
                         "--username", "operator", "rpc", "bridge", "ping", "--timeout", "10"),
                env=ctl_env(tmp_path, SPOTFI_CTL_PASSWORD=password), capture_output=True,
                text=True, timeout=15)

        bridge.wait_log("connected to")
        ok = ctl(ca[0], "op-secret-77")
        assert ok.returncode == 0, ok.stderr
        assert json.loads(ok.stdout)["pong"] is True
        refused = ctl(ca[0], "wrong-pass-123")
        assert refused.returncode == 3
        assert "refused the connection" in refused.stderr and "--password" in refused.stderr
        assert "wrong-pass-123" not in refused.stderr + refused.stdout
        untrusted = ctl(other_ca[0], "op-secret-77")
        assert untrusted.returncode == 3
        assert "TLS certificate verification failed" in untrusted.stderr


# --------------------------------------------------------------------------- sessions


def test_sessions_lists_an_open_session(api: ApiClient, broker: Mosquitto,
                                        make_bridge: Callable[..., BridgeProcess],
                                        tmp_path: Path) -> None:
    make_bridge(toml=BASE)
    wait_online(api)
    empty = run_ctl(broker, tmp_path, "sessions")
    assert empty.returncode == 0 and json.loads(empty.stdout) == {"sessions": []}
    session_id = api.x_start(ROUTER, cols=90, rows=20)
    api.wait_x(session_id, "x-started")
    listed = run_ctl(broker, tmp_path, "sessions")
    assert listed.returncode == 0, listed.stderr
    sessions = json.loads(listed.stdout)["sessions"]
    assert [(s["id"], s["cols"], s["rows"]) for s in sessions] == [(session_id, 90, 20)]
    api.x_stop(ROUTER, session_id)


# --------------------------------------------------------------------------- shell


class Terminal:
    """The operator's terminal: a PTY whose slave is ctl's controlling tty."""

    def __init__(self, cols: int = 80, rows: int = 24) -> None:
        self.master, self.slave = os.openpty()
        self.resize(cols, rows)
        #: the modes before ctl touched them, which it must restore on every way out
        self.initial_modes = termios.tcgetattr(self.slave)
        os.set_blocking(self.master, False)
        self.output = b""

    def resize(self, cols: int, rows: int) -> None:
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def spawn(self, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        def controlling_tty() -> None:
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        return subprocess.Popen(argv, stdin=self.slave, stdout=self.slave, stderr=self.slave,
                                env=env, start_new_session=True, preexec_fn=controlling_tty)

    def pump(self) -> bytes:
        try:
            while True:
                data = os.read(self.master, 65536)
                if not data:
                    break
                self.output += data
        except (BlockingIOError, OSError):
            pass
        return self.output

    def wait_for(self, needle: bytes, timeout: float = 10) -> None:
        try:
            wait_for(lambda: needle in self.pump(), timeout, f"{needle!r} on the terminal")
        except WaitTimeout as exc:
            raise WaitTimeout(f"{exc}; got {self.output[-300:]!r}") from None

    def type(self, data: bytes) -> None:
        os.write(self.master, data)

    def close(self) -> None:
        os.close(self.master)
        os.close(self.slave)


def sessions_of(api: ApiClient) -> list[dict[str, Any]]:
    reply = api.rpc(ROUTER, "bridge", "sessions")
    result: list[dict[str, Any]] = reply["result"]["sessions"]
    return result


@contextlib.contextmanager
def ctl_shell(broker: Mosquitto, tmp_path: Path, cols: int = 80, rows: int = 24
              ) -> Iterator[tuple[Terminal, subprocess.Popen[bytes]]]:
    """``ctl shell`` on a fresh terminal; killed and the terminal closed whatever happens."""
    term = Terminal(cols, rows)
    proc = term.spawn(ctl_argv("--broker", broker.url, "--router", ROUTER, "shell"),
                      ctl_env(tmp_path))
    try:
        yield term, proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        term.close()


def wait_exit(proc: subprocess.Popen[bytes], term: Terminal, timeout: float = 10) -> int:
    wait_for(lambda: term.pump() is not None and proc.poll() is not None, timeout, "ctl to exit")
    term.pump()
    return proc.returncode


def test_shell_echo_resize_quit_and_terminal_restored(
        api: ApiClient, broker: Mosquitto, make_bridge: Callable[..., BridgeProcess],
        tmp_path: Path) -> None:
    make_bridge(toml=BASE)
    wait_online(api)
    x_in = f"spotfi/router/{ROUTER}/x/in"
    api.subscribe(x_in)
    with ctl_shell(broker, tmp_path, 80, 24) as (term, proc):
        start = api.wait_message(x_in, lambda m: m.json().get("type") == "x-start").json()
        assert (start["cols"], start["rows"]) == (80, 24), "the local size goes in x-start"
        assert CTL_OUT.match(start["responseTopic"]), start
        session_id = start["sessionId"]
        assert session_id.startswith(f"{ROUTER}-")

        term.type(b"echo ctl-$((6*7))\r")
        term.wait_for(b"ctl-42")
        assert termios.tcgetattr(term.slave)[3] & termios.ECHO == 0, "raw mode while running"

        term.resize(100, 30)  # the kernel sends SIGWINCH to ctl, its terminal's foreground
        api.wait_message(x_in, lambda m: m.json().get("type") == "x-resize")
        wait_for(lambda: [(s["cols"], s["rows"]) for s in sessions_of(api)] == [(100, 30)], 10,
                 "the bridge to apply the new size")
        term.type(b"stty size\r")
        term.wait_for(b"30 100")

        term.type(b"\r~.")
        assert wait_exit(proc, term) == 0
        assert b"ended: closed with ~." in term.output
        stop = api.wait_message(x_in, lambda m: m.json().get("type") == "x-stop").json()
        assert stop["sessionId"] == session_id
        wait_for(lambda: sessions_of(api) == [], 10, "the bridge to close the session")
        assert termios.tcgetattr(term.slave) == term.initial_modes, "terminal modes restored"


def test_shell_says_where_it_goes_and_when_nothing_comes_back(
        api: ApiClient, broker: Mosquitto, make_bridge: Callable[..., BridgeProcess],
        tmp_path: Path) -> None:
    # a shell that is slow to say anything, as one with a heavy profile is
    make_bridge(toml=BASE.replace('shell = "/bin/sh"',
                                  'shell = ["/bin/sh", "-c", "sleep 6; echo late-$((6*7)); '
                                  'exec /bin/sh"]'))
    wait_online(api)
    with ctl_shell(broker, tmp_path) as (term, proc):
        term.wait_for(f"spotfi-bridge-ctl: shell on router {ROUTER} via {broker.url}; "
                      "~. quits, ~? for help".encode())
        term.wait_for(b"[ctl: no output after 3 s (the router is ONLINE; its shell may be slow "
                      b"to start); still waiting, ~. quits]")
        term.wait_for(b"late-42", 15)
        assert term.output.count(b"no output after") == 1, "said once"
        term.type(b"\r~.")
        assert wait_exit(proc, term) == 0


def test_shell_exit_code_and_reason_when_the_remote_shell_exits(
        api: ApiClient, broker: Mosquitto, make_bridge: Callable[..., BridgeProcess],
        tmp_path: Path) -> None:
    make_bridge(toml=BASE)
    wait_online(api)
    with ctl_shell(broker, tmp_path) as (term, proc):
        term.type(b"echo rea''dy\r")
        term.wait_for(b"ready")
        term.type(b"exit 7\r")
        assert wait_exit(proc, term) == 7
        assert b"ended: the shell exited with code 7" in term.output
        assert termios.tcgetattr(term.slave) == term.initial_modes


def test_shell_restores_the_terminal_on_sigterm(
        api: ApiClient, broker: Mosquitto, make_bridge: Callable[..., BridgeProcess],
        tmp_path: Path) -> None:
    make_bridge(toml=BASE)
    wait_online(api)
    with ctl_shell(broker, tmp_path) as (term, proc):
        term.type(b"echo rea''dy\r")
        term.wait_for(b"ready")
        assert termios.tcgetattr(term.slave) != term.initial_modes
        proc.send_signal(signal.SIGTERM)
        assert wait_exit(proc, term) == 128 + signal.SIGTERM
        assert b"interrupted by SIGTERM" in term.output
        assert termios.tcgetattr(term.slave) == term.initial_modes
        wait_for(lambda: sessions_of(api) == [], 10, "x-stop to close the session")


# --------------------------------------------------------------------------- watch


def test_watch_sees_online_metrics_and_offline(
        api: ApiClient, broker: Mosquitto, make_bridge: Callable[..., BridgeProcess],
        tmp_path: Path) -> None:
    status = f"spotfi/router/{ROUTER}/status"
    # a retained status first: when watch prints it, its subscription is in place
    api.publish(status, b"OFFLINE", retain=True)
    # SIGINT as a Ctrl-C would send it: a test runner started in the background (as CI
    # may be) hands its children SIGINT ignored, and Python then leaves it ignored
    watch = subprocess.Popen(ctl_argv("--broker", broker.url, "--router", ROUTER, "watch"),
                             env=ctl_env(tmp_path), stdout=subprocess.PIPE, text=True,
                             stdin=subprocess.DEVNULL,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines: Optional[Lines] = None
    try:
        assert watch.stdout is not None
        lines = Lines(watch.stdout)
        lines.wait(lambda r: r.get("status") == "OFFLINE" and bool(r.get("retained")),
                   "retained status")
        bridge = make_bridge(toml=BASE)
        lines.wait(lambda r: r["event"] == "status" and r["status"] == "ONLINE", "ONLINE")
        metrics = lines.wait(lambda r: r["event"] == "metrics", "metrics")
        assert metrics["router"] == ROUTER and int(metrics["metrics"]["uptime"]) > 0
        assert {"cpuLoad", "totalMemory", "freeMemory", "activeUsers"} <= set(metrics["metrics"])
        bridge.terminate()
        offline = lines.wait(lambda r: r["event"] == "status" and r["status"] == "OFFLINE"
                             and not r.get("retained"), "OFFLINE after SIGTERM")
        assert offline == {"router": ROUTER, "event": "status", "status": "OFFLINE"}
        assert all(line.startswith("{") for line in lines.lines), "one JSON object per line"
    finally:
        watch.send_signal(signal.SIGINT)
        assert watch.wait(10) == 130


def test_watch_all_routers_with_count(api: ApiClient, broker: Mosquitto, tmp_path: Path) -> None:
    for router in ("r1", "r2"):
        api.publish(f"spotfi/router/{router}/status", b"ONLINE", retain=True)
    result = run_ctl(broker, tmp_path, "watch", "--all", "--count", "2", "--timeout", "10")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert sorted(r["router"] for r in records) == ["r1", "r2"]
    short = run_ctl(broker, tmp_path, "watch", "--all", "--count", "3", "--timeout", "1")
    assert short.returncode == 124 and "saw 2 of 3 events" in short.stderr


def test_shell_survives_a_broker_restart(
        api: ApiClient, broker: Mosquitto, make_bridge: Callable[..., BridgeProcess],
        tmp_path: Path) -> None:
    make_bridge(toml=BASE)
    wait_online(api)
    with ctl_shell(broker, tmp_path) as (term, proc):
        term.type(b"echo before-$((1+1))\r")
        term.wait_for(b"before-2")
        mark = len(term.output)
        broker.restart()
        term.wait_for(b"broker connection lost")
        term.wait_for(b"broker connection back; session resumed")
        # the router's ONLINE (live or retained) tells ctl, and the user, that both ends are back
        wait_for(lambda: b"is ONLINE" in term.pump()[mark:], 15, "the router back ONLINE")
        mark = len(term.output)
        term.type(b"echo after-$((2+3))\r")
        term.wait_for(b"after-5")
        assert b"before-2" not in term.output[mark:], "no replay of old output"
        term.type(b"\r~.")
        assert wait_exit(proc, term) == 0


def test_shell_ends_when_a_restarted_bridge_no_longer_knows_the_session(
        api: ApiClient, broker: Mosquitto, make_bridge: Callable[..., BridgeProcess],
        tmp_path: Path) -> None:
    first = make_bridge(toml=BASE)
    wait_online(api)
    with ctl_shell(broker, tmp_path) as (term, proc):
        term.type(b"echo rea''dy\r")
        term.wait_for(b"ready")
        first.kill()  # a crash: the broker publishes the Last Will
        term.wait_for(b"is OFFLINE; ~. quits")
        make_bridge(toml=BASE)
        term.wait_for(b"is ONLINE")
        term.type(b"echo lost\r")  # to a session the new bridge never had
        assert wait_exit(proc, term) == 1
        assert b"ended: the bridge ended it: unknown session" in term.output
        assert termios.tcgetattr(term.slave) == term.initial_modes
