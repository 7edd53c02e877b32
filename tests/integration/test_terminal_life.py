"""A closed terminal leaves nothing running; an unattended terminal ends.

Real daemon, real Mosquitto, real PTYs, and the shells a router (busybox ash) or a
developer's machine (dash, bash) runs. An interactive shell with job control puts each
background job in its own process group, so signalling the shell's group is not enough:
every process of the shell's session must go, whatever its group, including a job that
ignores SIGHUP. A process that left the session on purpose (``setsid``) is not the
terminal's and stays.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
from pathlib import Path
from typing import Callable, Iterator, Optional

import pytest

from tests.conftest import wait_online
from tests.fuzz.procfs import alive, comm, session_id, session_members, start_time
from tests.helpers.apiclient import ApiClient
from tests.helpers.bridge import BridgeProcess
from tests.helpers.broker import Mosquitto
from tests.helpers.wait import WaitTimeout, wait_for

ROUTER = "test-router"
# OpenWrt's shell first; never a shell that reads the host's rc files
SHELLS = {
    "busybox-ash": ("busybox", "ash"),
    "dash": ("dash",),
    "bash": ("bash", "--norc", "--noprofile"),
}
#: Type these into the terminal: a background job, and one that ignores SIGHUP. Each
#: reports its pid (the ``sh -c`` execs ``sleep``, keeping its pid and the ignored HUP).
JOBS = (b"sleep 1000 & echo \"bg=$!\"\n"
        b"sh -c 'trap \"\" HUP; exec sleep 1001' & echo \"nohup=$!\"\n")
#: Generous for a loaded 2-core machine; the bridge's own bound is 3 s.
GONE_TIMEOUT = 15.0
#: (pid, start time) of what a test started
Leftovers = list[tuple[int, Optional[str]]]


def toml(argv: tuple[str, ...], extra: str = "") -> str:
    path = shutil.which(argv[0])
    assert path, f"{argv[0]} is not installed (make test installs it)"
    shell = ", ".join(f'"{word}"' for word in (path, *argv[1:]))
    return ("[metrics]\ninterval = 30\n[mqtt]\nkeepalive = 10\nbackoff_min = 0.1\n"
            f"backoff_max = 1\n[terminal]\nshell = [{shell}]\n{extra}")


def ignores_hup(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = re.search(r"^SigIgn:\s*([0-9a-f]+)", status, re.M)
    return mask is not None and int(mask.group(1), 16) & (1 << (signal.SIGHUP - 1)) != 0


class Terminal:
    """One session with two jobs running in it, as an operator leaves it; every pid it
    learns goes to ``leftovers`` (the fixture kills what is still alive at teardown)."""

    def __init__(self, api: ApiClient, name: str, leftovers: Leftovers,
                 router: str = ROUTER) -> None:
        self.api, self.id, self.router = api, name, router
        self.leftovers = leftovers
        api.x_start(router, name)
        api.wait_x(name, "x-started", timeout=15)
        self.shell = self.pid_of(b"sh", b"echo \"sh=$$\"\n")
        self.jobs: list[int] = []

    def pid_of(self, name: bytes, command: bytes) -> int:
        self.api.x_send(self.router, self.id, command)
        pattern = re.compile(name + rb"=(\d+)")  # the typed line has `$`, not digits
        output = wait_for(lambda: pattern.search(self.api.x_output(self.id)), 15,
                          f"{name.decode()}=<pid> in the terminal")
        pid = int(output.group(1))
        self.leftovers.append((pid, start_time(pid)))
        return pid

    def start_jobs(self) -> None:
        self.api.x_send(self.router, self.id, JOBS)
        self.jobs = [self.pid_of(b"bg", b""), self.pid_of(b"nohup", b"")]
        wait_for(lambda: all(comm(pid) == "sleep" for pid in self.jobs), 15, "jobs running")
        assert ignores_hup(self.jobs[1]) and not ignores_hup(self.jobs[0])
        # the premise: each job has a process group of its own, in the shell's session
        for pid in self.jobs:
            assert session_id(pid) == self.shell and os.getpgid(pid) == pid
        assert session_id(self.shell) == self.shell
        assert set(self.jobs) <= set(session_members(self.shell))


@pytest.fixture
def leftovers() -> Iterator[Leftovers]:
    """Pids a test started; whatever is still alive at teardown is killed (if its start
    time says the pid was not reused by somebody else's process meanwhile)."""
    pids: Leftovers = []
    yield pids
    for pid, start in pids:
        if alive(pid) and start_time(pid) == start:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def wait_gone(terminal: Terminal) -> None:
    sid = terminal.shell
    try:
        wait_for(lambda: not session_members(sid)
                 and not any(alive(pid) for pid in terminal.jobs),
                 GONE_TIMEOUT, f"every process of session {sid} gone")
    except WaitTimeout as exc:
        raise AssertionError(f"{exc}; still alive: {session_members(sid)} "
                             f"(jobs {terminal.jobs}, shell {sid})") from None


@pytest.mark.parametrize("shell", SHELLS)
def test_x_stop_ends_every_process_of_the_session(
        shell: str, api: ApiClient, make_bridge: Callable[..., BridgeProcess],
        leftovers: Leftovers) -> None:
    bridge = make_bridge(toml=toml(SHELLS[shell]))
    wait_online(api)
    terminal = Terminal(api, f"stop-{shell}", leftovers)
    terminal.start_jobs()
    kept = 0
    if shell == "busybox-ash":
        # a process that left the session on purpose is not the terminal's: it stays
        kept = terminal.pid_of(b"kept", b"setsid sh -c 'echo kept=$$; exec sleep 1002' &\n")
        wait_for(lambda: comm(kept) == "sleep", 15, "the setsid job running")
    api.x_stop(ROUTER, terminal.id)
    wait_gone(terminal)
    assert bridge.proc is not None and bridge.proc.poll() is None
    if kept:
        assert alive(kept), "a process that left the session was killed"
    bridge.wait_log("SIGKILL")  # the job that ignores SIGHUP needed it


def test_the_shell_s_own_exit_ends_every_process_of_its_session(
        api: ApiClient, make_bridge: Callable[..., BridgeProcess],
        leftovers: Leftovers) -> None:
    make_bridge(toml=toml(SHELLS["busybox-ash"]))
    wait_online(api)
    terminal = Terminal(api, "exit-ash", leftovers)
    terminal.start_jobs()
    api.x_send(ROUTER, terminal.id, b"exit 3\n")
    error = api.wait_x(terminal.id, "x-error", timeout=15)
    assert error["reason"] == "exit" and error["exitCode"] == 3
    wait_gone(terminal)


@pytest.mark.parametrize("shell", SHELLS)
def test_idle_timeout_ends_every_process_of_the_session(
        shell: str, api: ApiClient, make_bridge: Callable[..., BridgeProcess],
        leftovers: Leftovers) -> None:
    make_bridge(toml=toml(SHELLS[shell], "idle_timeout = 3\n"))
    wait_online(api)
    terminal = Terminal(api, f"idle-{shell}", leftovers)
    terminal.start_jobs()
    assert api.wait_x(terminal.id, "x-error", timeout=20)["reason"] == "idle"
    wait_gone(terminal)


@pytest.mark.parametrize("shell", SHELLS)
def test_sigterm_of_the_daemon_ends_every_process_of_its_sessions(
        shell: str, api: ApiClient, make_bridge: Callable[..., BridgeProcess],
        leftovers: Leftovers) -> None:
    bridge = make_bridge(toml=toml(SHELLS[shell]))
    wait_online(api)
    terminals = [Terminal(api, f"term-{shell}-{n}", leftovers) for n in range(2)]
    for terminal in terminals:
        terminal.start_jobs()
    bridge.signal(signal.SIGTERM)
    assert bridge.proc is not None and bridge.proc.wait(15) == 0
    # the daemon waited for them: nothing of its sessions outlives it
    for terminal in terminals:
        assert not any(alive(pid) for pid in terminal.jobs), (terminal.jobs, bridge.log())
        assert not session_members(terminal.shell)


@pytest.mark.parametrize("shell", SHELLS)
def test_reload_changing_the_router_id_ends_every_process_of_its_sessions(
        shell: str, api: ApiClient, broker: Mosquitto, leftovers: Leftovers) -> None:
    config = toml(SHELLS[shell]) + '[router]\nid = "%s"\n'
    bridge = BridgeProcess(broker.url, toml=config % ROUTER)
    del bridge.env["SPOTFI_ROUTER_ID"]  # the id comes from the file, so a reload changes it
    try:
        bridge.start()
        wait_online(api)
        terminal = Terminal(api, f"reload-{shell}", leftovers)
        terminal.start_jobs()
        (bridge.dir / "bridge.toml").write_text(config % "test-router-2")
        bridge.signal(signal.SIGHUP)
        bridge.wait_log("router id changed", 15)
        assert api.wait_x(terminal.id, "x-error", timeout=15)["error"] == "router id changed"
        wait_gone(terminal)
        bridge.wait_log("config reloaded", 15)
        assert bridge.proc is not None and bridge.proc.poll() is None
    finally:
        bridge.close()


def test_idle_timeout_counts_input_not_output(
        api: ApiClient, make_bridge: Callable[..., BridgeProcess],
        leftovers: Leftovers) -> None:
    """An orphaned session that keeps printing (``logread -f``) still ends."""
    make_bridge(toml=toml(SHELLS["busybox-ash"], "idle_timeout = 3\n"))
    wait_online(api)
    terminal = Terminal(api, "printing", leftovers)
    api.x_send(ROUTER, terminal.id, b"while :; do echo tick-$((40+2)); sleep 1; done\n")
    api.wait_output(terminal.id, b"tick-42\r\n", 15)
    error = api.wait_x(terminal.id, "x-error", timeout=20)
    assert error["reason"] == "idle" and error["idleTimeout"] == 3
    # it was printing all along: ticks after the last keystroke, up to the end
    assert api.x_output(terminal.id).count(b"tick-42\r\n") >= 2
    wait_gone(terminal)
