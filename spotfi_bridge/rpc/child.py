"""One RPC child process on the loop: bounded output, bounded time, killed as a group.

The child is started in its own session (so its own process group): on a
timeout or a cancellation the whole group is killed, so a shell script's
grandchildren die with it, and the child is reaped by the loop's child watcher
(no thread, no zombie).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

from spotfi_bridge.aio import child_environment

#: After the child itself exited, how long to keep reading pipes that a background
#: grandchild may still hold open before replying without waiting for it.
EXIT_GRACE = 1.0
#: After a group kill, how long to wait for the pipes to report EOF.
KILL_GRACE = 2.0
#: The kernel's limit on one argument, its NUL included (MAX_ARG_STRLEN, 32 pages):
#: execve fails with E2BIG past it, whatever the total size.
MAX_ARG_STRLEN = 131072


class ArgumentTooLong(ValueError):
    """An argument the kernel would refuse (E2BIG): said before any exec, with its size."""

    def __init__(self, index: int, size: int) -> None:
        super().__init__(f"argument {index} is {size} bytes, over the kernel's limit of "
                         f"{MAX_ARG_STRLEN - 1} bytes per argument (MAX_ARG_STRLEN)")
        self.index = index
        self.size = size


@dataclass(frozen=True)
class ChildResult:
    #: exit status; ``128 + signal`` when a signal ended it; ``None`` when killed on timeout
    returncode: Optional[int]
    stdout: bytes
    stderr: bytes
    truncated: bool
    timed_out: bool
    #: the signal that ended it, when one did (not on our timeout kill); ``returncode`` alone
    #: cannot tell ``exit 255`` from a death by signal 127
    signal: Optional[int] = None


class _Capture:
    """Keeps the first ``cap`` bytes of a stream and discards the rest, so the child never
    blocks on a full pipe."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.chunks: list[bytes] = []
        self.size = 0
        self.truncated = False

    def feed(self, data: bytes) -> None:
        room = self.cap - self.size
        if len(data) > room:
            data = data[:max(0, room)]
            self.truncated = True
        if data:
            self.chunks.append(data)
            self.size += len(data)

    def value(self) -> bytes:
        return b"".join(self.chunks)


class _ChildProtocol(asyncio.SubprocessProtocol):
    def __init__(self, loop: asyncio.AbstractEventLoop, cap: int) -> None:
        self.out = _Capture(cap)
        self.err = _Capture(cap)
        self.exited: asyncio.Future[None] = loop.create_future()
        self.pipes_closed: asyncio.Future[None] = loop.create_future()
        self._open_pipes = 2

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        (self.out if fd == 1 else self.err).feed(data)

    def pipe_connection_lost(self, fd: int, exc: Optional[Exception]) -> None:
        self._open_pipes -= 1
        if self._open_pipes <= 0 and not self.pipes_closed.done():
            self.pipes_closed.set_result(None)

    def process_exited(self) -> None:
        if not self.exited.done():
            self.exited.set_result(None)


def kill_group(pid: int) -> None:
    """SIGKILL the process group led by ``pid`` (the child started with a new session)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


async def _wait(future: asyncio.Future[None], timeout: float) -> bool:
    """Whether ``future`` completed within ``timeout`` (it is never cancelled)."""
    if future.done():
        return True
    if timeout <= 0:
        return False
    done, _ = await asyncio.wait([future], timeout=timeout)
    return bool(done)


def spawn_detached(argv: Sequence[str]) -> int:
    """Start ``argv`` in its own session with no pipe to us and never kill it: it must outlive
    the bridge (an init script that stops or restarts the bridge itself). Reaped through a
    pidfd if the bridge outlives it, else by init. Raises ``OSError`` when it cannot start."""
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True,
                            env=child_environment())
    loop = asyncio.get_running_loop()
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # no pidfd: subprocess reaps it at a later Popen
        return proc.pid

    def reap() -> None:
        loop.remove_reader(pidfd)
        os.close(pidfd)
        proc.wait()

    loop.add_reader(pidfd, reap)
    return proc.pid


async def run_child(argv: Sequence[str], *, timeout: float, output_cap: int,
                    env: Optional[Mapping[str, str]] = None) -> ChildResult:
    """Run ``argv`` (never through a shell). Raises ``OSError`` when it cannot start,
    :class:`ArgumentTooLong` for an argument over the kernel's limit and ``ValueError`` for
    one that cannot be passed (NUL byte)."""
    for index, arg in enumerate(argv):
        size = len(os.fsencode(arg))
        if size >= MAX_ARG_STRLEN:
            raise ArgumentTooLong(index, size)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    protocol = _ChildProtocol(loop, output_cap)
    starting = asyncio.ensure_future(loop.subprocess_exec(
        lambda: protocol,
        *argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        close_fds=True,
        env=dict(env) if env is not None else child_environment(),
    ))
    try:
        transport, _ = await asyncio.shield(starting)
    except asyncio.CancelledError:
        # cancelled while asyncio connects the pipes: its own clean-up then kills only the
        # leader (a grandchild lives on) and, on 3.11, can wait for it forever. Let the start
        # finish, then end the group as for any cancellation.
        with contextlib.suppress(Exception):
            transport, _ = await starting
            kill_group(transport.get_pid())
            await asyncio.shield(protocol.exited)
            transport.close()
        raise
    pid = transport.get_pid()
    timed_out = False
    try:
        if await _wait(protocol.exited, deadline - loop.time()):
            code = transport.get_returncode()
            if code is not None and code < 0:
                # the leader was killed (OOM killer, an operator): what it started is
                # orphaned and nobody will ever wait for it. A leader that exited on its own
                # may leave background work on purpose (`(sleep 5; reboot) &`): spared.
                kill_group(pid)
            await _wait(protocol.pipes_closed, min(EXIT_GRACE, deadline - loop.time()))
        else:
            timed_out = True
            kill_group(pid)
            await protocol.exited
            await _wait(protocol.pipes_closed, KILL_GRACE)
    finally:
        if transport.get_returncode() is None:  # cancelled: the group must not outlive us
            kill_group(pid)
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(protocol.exited)
        transport.close()
    code = transport.get_returncode()
    killed_by = -code if code is not None and code < 0 and not timed_out else None
    returncode = None if timed_out else (128 + killed_by if killed_by else code)
    return ChildResult(returncode, protocol.out.value(), protocol.err.value(),
                       protocol.out.truncated or protocol.err.truncated, timed_out, killed_by)
