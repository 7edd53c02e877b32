"""Security properties of the real daemon, end to end.

* TLS is required when the URL says so: never a plaintext fallback, never the token in
  clear. (A wrong CA and a wrong hostname are refused: ``test_link.py``,
  ``test_tls_wrong_ca_is_refused`` and ``test_tls_wrong_hostname_is_refused``.)
* The token never appears in the debug log, ``check-config`` output, anything the bridge
  publishes (error replies, ``bridge info``) or a terminal's environment.
* A config file holding the token and readable by group or others is warned about.
* PTY children and RPC children inherit no daemon fd (MQTT socket, pidfds, other PTYs),
  and every daemon fd is close-on-exec.
* RPC arguments never pass through a shell unless the caller runs ``/bin/sh -c`` itself.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import pytest

from tests.conftest import wait_online
from tests.fuzz import procfs
from tests.helpers.apiclient import ApiClient
from tests.helpers.bridge import ROOT, BridgeProcess
from tests.helpers.broker import Mosquitto
from tests.helpers.fake_ubus import path_with, write_fake_ubus
from tests.helpers.ports import free_port
from tests.helpers.wait import wait_for

ROUTER = "sec-router"
TOKEN = "tok-S3CRET-7f3a9c21"
TOPICS_BASE = f"spotfi/router/{ROUTER}"
FAST = "[mqtt]\nbackoff_min = 0.1\nbackoff_max = 1\nconnect_timeout = 2\n"


def _rpc(api: ApiClient, path: str, method: str, args: Optional[dict[str, Any]] = None,
         **extra: Any) -> dict[str, Any]:
    return api.rpc(ROUTER, path, method, args, **extra)


# --------------------------------------------------------------------------- TLS


class RecordingListener:
    """A plaintext TCP server that records what each client sends and answers like an MQTT
    broker accepting the connection, until the client hangs up."""

    def __init__(self) -> None:
        self.port = free_port()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", self.port))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.connections: list[bytes] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:  # accept timeout: check whether to stop
                continue
            with conn:
                conn.settimeout(5)
                data = b""
                try:
                    data = conn.recv(65536)
                    # CONNACK (accepted) and a SUBACK: what a plaintext broker would say
                    conn.sendall(b"\x20\x02\x00\x00\x90\x03\x00\x01\x01")
                    while True:
                        more = conn.recv(65536)
                        if not more:
                            break
                        data += more
                except OSError:
                    pass
            with self._lock:
                self.connections.append(data)

    def seen(self) -> list[bytes]:
        with self._lock:
            return list(self.connections)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@pytest.fixture
def listener() -> Iterator[RecordingListener]:
    server = RecordingListener()
    yield server
    server.close()


def test_mqtts_url_to_a_plaintext_server_never_falls_back(
        listener: RecordingListener, make_bridge: Callable[..., BridgeProcess]) -> None:
    bridge = make_bridge(router_id=ROUTER, token=TOKEN, toml=FAST,
                         broker_url=f"mqtts://127.0.0.1:{listener.port}")
    wait_for(lambda: len(listener.seen()) >= 3, 20, "three connection attempts")
    for data in listener.seen():
        # each attempt opened with a TLS handshake record, never an MQTT CONNECT (0x10)
        assert data[:1] == b"\x16" and data[1:2] == b"\x03", data[:16]
        assert TOKEN.encode() not in data and ROUTER.encode() not in data
    log = bridge.wait_log("TLS")
    assert "connected to" not in log
    assert TOKEN not in log


def test_mqtts_url_to_plaintext_mosquitto_never_connects(
        broker: Mosquitto, api: ApiClient, make_bridge: Callable[..., BridgeProcess]) -> None:
    api.subscribe(f"{TOPICS_BASE}/status")
    bridge = make_bridge(router_id=ROUTER, token=TOKEN, toml=FAST,
                         broker_url=f"mqtts://127.0.0.1:{broker.port}")
    bridge.wait_log("(attempt 2)", 20)  # debug level logs every failed attempt
    assert "connected to" not in bridge.log()
    assert f"as router-{ROUTER}" not in broker.log_path.read_text(errors="replace")
    assert not api.matching(f"{TOPICS_BASE}/status")


# --------------------------------------------------------------------------- the token


def test_token_never_in_log_replies_or_bridge_info(
        broker: Mosquitto, api: ApiClient, tmp_path: Path) -> None:
    api.subscribe("#")
    toml = (f'[router]\nid = "{ROUTER}"\ntoken = "{TOKEN}"\n[rpc]\nbackend = "local"\n'
            'deny = ["file.write"]\n[terminal]\nshell = ["/bin/sh"]\n')
    bridge = BridgeProcess(broker.url, router_id=ROUTER, toml=toml)
    del bridge.env["SPOTFI_TOKEN"]  # from the TOML file only, as on a router
    with bridge:
        wait_online(api, ROUTER)
        replies = [
            _rpc(api, "bridge", "info"),
            _rpc(api, "bridge", "sessions"),
            _rpc(api, "nonexistent", "call"),
            _rpc(api, "file", "write", {"path": "/tmp/x", "data": "x"}),  # denied
            _rpc(api, "file", "read", {"path": str(tmp_path / "absent")}),
            _rpc(api, "file", "exec", {"command": "/nonexistent"}),
            _rpc(api, "system", "info", timestamp="not a date"),
        ]
        assert replies[0]["status"] == "success" and replies[2]["status"] == "error"
        api.publish(f"{TOPICS_BASE}/rpc/request", b'{"id":"broken-json", "path": ')
        api.wait_message(f"{TOPICS_BASE}/rpc/response", lambda m: b"broken-json" in m.payload)
        # a terminal: its environment does not carry the token either
        session = api.x_start(ROUTER)
        api.wait_x(session, "x-started")
        # (the marker is computed so that the echo of the typed line does not match it)
        api.x_send(ROUTER, session, b"env; echo END-OF-ENV-$((40+2))\n")
        output = api.wait_output(session, b"END-OF-ENV-42", timeout=10)
        assert b"HOME=" in output  # env ran
        assert b"SPOTFI" not in output and TOKEN.encode() not in output
        api.x_stop(ROUTER, session)
        bad = api.x_start(ROUTER, response_topic="#")
        api.wait_x(bad, "x-error", topic=f"{TOPICS_BASE}/x/out")
        # a reload re-reads the token from the file
        bridge.signal(signal.SIGHUP)
        bridge.wait_log("config reloaded")
        _rpc(api, "bridge", "ping")
    everything = b"\n".join(m.payload for m in api.received)
    assert TOKEN.encode() not in everything
    log = bridge.log()
    assert "DEBUG" in log and "config reloaded" in log
    assert TOKEN not in log


def test_token_never_in_check_config_output(tmp_path: Path) -> None:
    env_file = tmp_path / "spotfi.env"
    env_file.write_text(f"SPOTFI_TOKEN={TOKEN}\nSPOTFI_ROUTER_ID={ROUTER}\n"
                        "SPOTFI_MQTT_BROKER=mqtts://broker.example:8883\n")
    env_file.chmod(0o600)
    toml = tmp_path / "bridge.toml"
    toml.write_text(f'[router]\ntoken = "{TOKEN}x"\n')
    toml.chmod(0o600)
    base = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "SPOTFI_ENV_FILE": str(env_file)}
    runs = [
        (["check-config"], {}),  # token from the legacy env file
        (["check-config", "--config", str(toml)], {}),  # from TOML
        (["check-config"], {"SPOTFI_TOKEN": TOKEN + "y"}),  # from the environment
    ]
    for args, extra in runs:
        proc = subprocess.run([sys.executable, "-m", "spotfi_bridge", *args],
                              env={**base, **extra}, capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["router"]["token"].startswith("<set, ")
        assert TOKEN not in proc.stdout + proc.stderr
    # a config error about the token itself shows it hidden
    toml.write_text("[router]\ntoken = 123456789\n")
    proc = subprocess.run([sys.executable, "-m", "spotfi_bridge", "check-config", "--config",
                           str(toml)], env=base, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 78 and "(hidden)" in proc.stderr and "123456789" not in proc.stderr


def test_wrong_token_refusal_logs_no_token(make_bridge: Callable[..., BridgeProcess]) -> None:
    with Mosquitto(users={ROUTER: TOKEN}) as secured:
        bridge = make_bridge(router_id=ROUTER, token="wrong-" + TOKEN, toml=FAST,
                             broker_url=secured.url)
        log = bridge.wait_log("bad token", 15)
        bridge.close()
    assert TOKEN not in log


def test_rpc_children_do_not_inherit_the_token_from_the_environment(
        api: ApiClient, make_bridge: Callable[..., BridgeProcess]) -> None:
    make_bridge(router_id=ROUTER, token=TOKEN, env={"SPOTFI_RPC_BACKEND": "local"})
    wait_online(api, ROUTER)
    reply = _rpc(api, "file", "exec", {"command": "/usr/bin/env"})
    assert reply["status"] == "success"
    assert TOKEN not in json.dumps(reply)


# --------------------------------------------------------------------------- config file mode


def _bridge_with_token_in(path_kind: str, mode: int, broker: Mosquitto) -> BridgeProcess:
    bridge = BridgeProcess(broker.url, router_id=ROUTER)
    del bridge.env["SPOTFI_TOKEN"]
    if path_kind == "toml":
        config = bridge.dir / "bridge.toml"
        config.write_text(f'[router]\ntoken = "{TOKEN}"\n')
        bridge.env["SPOTFI_CONFIG"] = str(config)
    else:
        config = bridge.dir / "spotfi.env"
        config.write_text(f"SPOTFI_TOKEN={TOKEN}\n")
        bridge.env["SPOTFI_ENV_FILE"] = str(config)
    config.chmod(mode)
    return bridge


@pytest.mark.parametrize(("kind", "mode", "warned"), [
    ("toml", 0o644, True), ("toml", 0o640, True), ("toml", 0o600, False),
    ("env", 0o604, True), ("env", 0o600, False),
], ids=["toml-0644", "toml-0640", "toml-0600", "env-0604", "env-0600"])
def test_config_file_readable_by_others_is_warned_about(
        broker: Mosquitto, api: ApiClient, kind: str, mode: int, warned: bool) -> None:
    with _bridge_with_token_in(kind, mode, broker) as bridge:
        wait_online(api, ROUTER)  # it runs either way: a warning, not a refusal
        log = bridge.log()
    warning = "holds the router token but is readable by group or others"
    assert (warning in log) == warned, log
    if warned:
        assert f"(mode {mode:04o}); run: chmod 600" in log
    assert TOKEN not in log


# --------------------------------------------------------------------------- fds


def _daemon_fds_are_cloexec(pid: int) -> dict[int, str]:
    targets = procfs.fd_targets(pid)
    for fd, target in targets.items():
        if fd <= 2:
            continue
        flags = procfs.fd_flags(pid, fd)
        assert flags is None or flags & procfs.O_CLOEXEC, f"daemon fd {fd} ({target}) inheritable"
    return targets


def test_pty_and_rpc_children_inherit_no_daemon_fd(
        api: ApiClient, make_bridge: Callable[..., BridgeProcess], tmp_path: Path) -> None:
    flock = shutil.which("flock")
    assert flock, "flock (util-linux) is needed to hold an RPC child without timing"
    bridge = make_bridge(router_id=ROUTER, toml='[rpc]\nbackend = "local"\n'
                                                '[terminal]\nshell = ["/bin/sh"]\n')
    wait_online(api, ROUTER)
    sessions = [api.x_start(ROUTER), api.x_start(ROUTER)]  # two: neither sees the other's PTY
    for session in sessions:
        api.wait_x(session, "x-started")
    gate = tmp_path / "gate"
    gate.touch()
    with open(gate) as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        api.rpc_send(ROUTER, "file", "exec", {"command": flock, "params": [
            "-s", str(gate), "/bin/true"]}, req_id=f"held-{uuid.uuid4().hex}")
        rpc_child = wait_for(lambda: [p for p in procfs.children(bridge.pid)
                                      if procfs.cmdline(p)[:1] == [flock]], 10, "the RPC child")[0]
        daemon = _daemon_fds_are_cloexec(bridge.pid)
        sockets = {t for t in daemon.values() if t.startswith("socket:")}
        assert sockets, "the daemon holds its MQTT socket"
        child_fds = procfs.fd_targets(rpc_child)
        fcntl.flock(held, fcntl.LOCK_UN)
    assert child_fds.pop(3, None) == str(gate), child_fds  # flock's own lock file
    assert sorted(child_fds) == [0, 1, 2], child_fds
    assert child_fds[0] == "/dev/null" and all(child_fds[fd].startswith("pipe:") for fd in (1, 2))
    infos = _rpc(api, "bridge", "sessions")["result"]["sessions"]
    ptys = set()
    for info in infos:
        fds = procfs.fd_targets(info["pid"])
        assert set(fds) >= {0, 1, 2}, fds
        pty = fds[0]
        # its terminal, and /dev/tty (the same PTY: an interactive sh opens it for job control)
        assert pty.startswith("/dev/pts/") and set(fds.values()) <= {pty, "/dev/tty"}, fds
        assert not set(fds.values()) & sockets
        ptys.add(pty)
    assert len(ptys) == 2
    # what the shell itself runs sees only its terminal too
    api.x_send(ROUTER, sessions[0], b"ls -l /proc/self/fd; echo END-OF-FDS-$((40+2))\n")
    output = api.wait_output(sessions[0], b"END-OF-FDS-42").decode(errors="replace")
    listed = [line for line in output.splitlines() if " -> " in line]
    assert listed and all("/dev/pts/" in line or "/proc/" in line for line in listed), output


def test_ubus_children_inherit_no_daemon_fd(
        api: ApiClient, make_bridge: Callable[..., BridgeProcess], tmp_path: Path) -> None:
    write_fake_ubus(tmp_path / "bin")
    bridge = make_bridge(router_id=ROUTER, toml='[rpc]\nbackend = "ubus"\n',
                         env={"PATH": path_with(tmp_path / "bin")})
    wait_online(api, ROUTER)
    api.rpc_send(ROUTER, "slow", "call", timeout=30000)  # the fake ubus sleeps

    def ubus_child() -> Optional[int]:
        for pid in procfs.children(bridge.pid):
            if any(part.endswith("/ubus") for part in procfs.cmdline(pid)):
                return pid
        return None
    child = wait_for(ubus_child, 10, "the ubus child")
    fds = procfs.fd_targets(child)
    assert set(fds) <= {0, 1, 2, 10}, fds  # 10: sh keeps its script open (dash)
    assert all(not target.startswith(("socket:", "anon_inode:", "/dev/pts", "/dev/ptmx"))
               for target in fds.values()), fds


# --------------------------------------------------------------------------- no shell


def test_rpc_arguments_never_pass_through_a_shell(
        api: ApiClient, make_bridge: Callable[..., BridgeProcess], tmp_path: Path) -> None:
    make_bridge(router_id=ROUTER, toml='[rpc]\nbackend = "local"\n')
    wait_online(api, ROUTER)
    marks = {name: tmp_path / name for name in ("semi", "subst", "tick", "pipe", "and", "cmd")}
    params = [f"; touch {marks['semi']}", f"$(touch {marks['subst']})",
              f"`touch {marks['tick']}`", f"| touch {marks['pipe']}", f"&& touch {marks['and']}"]
    reply = _rpc(api, "file", "exec", {"command": "/bin/echo", "params": params})
    assert reply["status"] == "success", reply
    assert reply["result"]["stdout"] == " ".join(params) + "\n"  # verbatim, one argv each
    # a command line is not split into words either
    reply = _rpc(api, "file", "exec", {"command": f"touch {marks['cmd']}"})
    assert reply["status"] == "error", reply
    # the environment is not a way in: no shell reads it
    reply = _rpc(api, "file", "exec", {"command": "/bin/echo", "params": ["x"],
                                       "env": {"BASH_ENV": f"touch {marks['semi']}"}})
    assert reply["status"] == "success"
    assert not [path for path in marks.values() if path.exists()]
    # the control: asked for explicitly, a shell does run (so the test could see one)
    explicit = tmp_path / "explicit"
    reply = _rpc(api, "file", "exec", {"command": "/bin/sh", "params": ["-c", f"touch {explicit}"]})
    assert reply["status"] == "success" and explicit.exists()


def test_ubus_call_arguments_stay_single_argv_words(
        api: ApiClient, make_bridge: Callable[..., BridgeProcess], tmp_path: Path) -> None:
    write_fake_ubus(tmp_path / "bin")
    argv_file = tmp_path / "argv"
    make_bridge(router_id=ROUTER, toml='[rpc]\nbackend = "ubus"\n',
                env={"PATH": path_with(tmp_path / "bin"), "FAKE_UBUS_ARGV": str(argv_file)})
    wait_online(api, ROUTER)
    mark = tmp_path / "pwned"
    path, method = f"system; touch {mark}", f"$(touch {mark})"
    args = {"a": f"`touch {mark}`", "b": f"'; touch {mark}; '"}
    reply = _rpc(api, path, method, args)
    assert reply["status"] == "error"  # the fake ubus: "not found"
    argv = argv_file.read_bytes().split(b"\0")[:-1]
    assert argv[-4:] == [b"call", path.encode(), method.encode(),
                         json.dumps(args, separators=(",", ":")).encode()]
    assert not mark.exists()


def test_tls_verification_turned_off_is_warned_about(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "SPOTFI_ENV_FILE": os.devnull,
           "SPOTFI_ROUTER_ID": ROUTER, "SPOTFI_TOKEN": TOKEN,
           "SPOTFI_MQTT_BROKER": "mqtts://broker.example", "SPOTFI_TLS_INSECURE": "true"}
    proc = subprocess.run([sys.executable, "-m", "spotfi_bridge", "check-config"], env=env,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert "warning: environment variable SPOTFI_TLS_INSECURE: [tls] insecure = true: the " \
           "broker's certificate and host name are NOT verified" in proc.stderr
    assert TOKEN not in proc.stdout + proc.stderr
