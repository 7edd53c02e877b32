"""One shell under a PTY, driven entirely by the event loop.

The master fd is a loop reader (no thread, no polling) and the child's exit is a
pidfd reader. Output flows PTY → ``_batch`` (raw bytes, coalesced for at most
``batch_delay_ms``) → ``_pending`` (framed ``x-data`` messages with ``seq``, not yet
accepted by the link) → in flight (accepted, ``on_sent`` not yet called). The sum
of the three, in raw terminal bytes, never exceeds ``outbox_bytes``: when it is
reached the reader is removed, the kernel's PTY buffer fills and the writer in the
shell blocks, which is the backpressure. Nothing is dropped while the session
lives, and every message goes through one FIFO, so ``seq`` order is wire order.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import errno
import fcntl
import json
import logging
import os
import signal
import struct
import termios
from base64 import b64encode
from typing import Any, Callable, Optional

from ptyprocess import PtyProcess

from spotfi_bridge import protocol
from spotfi_bridge.config import TerminalConfig
from spotfi_bridge.publish import Publisher
from spotfi_bridge.terminal.members import members, signal_members
from spotfi_bridge.terminal.shell import ShellSpec, reset_child_signals

log = logging.getLogger("spotfi_bridge.terminal")

#: Most raw bytes taken from one PTY per loop wakeup (each read returns at most ~4 KiB).
READ_PER_WAKEUP = 64 * 1024
#: Keystrokes waiting for the shell to read them; beyond this input is refused (counted).
INPUT_CAP = 1024 * 1024
#: Seconds between SIGHUP and SIGKILL when a session ends (the shell's whole session).
KILL_GRACE = 2.0
#: Seconds after SIGKILL the bridge keeps waiting for the session's processes to vanish
#: (a process stuck in the kernel) before it lets the shell's pid go anyway.
KILL_GIVE_UP = 2.0
_SWEEP_MAX = 0.25
_RETRY_MIN, _RETRY_MAX = 0.02, 1.0

OnEnd = Callable[["PtySession", str], None]


class Teardown(enum.Enum):
    """How far ending the processes of the shell's session has gone."""
    RUNNING = "running"   # nothing sent yet
    HUNG_UP = "hung up"   # SIGHUP sent to the whole session; SIGKILL at the deadline
    KILLED = "killed"     # SIGKILL sent to the whole session


def exit_description(code: int) -> tuple[int, dict[str, Any], str]:
    """``(exitCode, extra fields, human text)`` from ``os.waitstatus_to_exitcode``."""
    if code >= 0:
        return code, {}, f"shell exited with code {code}"
    signum = -code
    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = f"signal {signum}"
    return 128 + signum, {"signal": signum}, f"shell killed by {name}"


class PtySession:
    """A login shell under a PTY whose output goes, in order, to ``response_topic``.

    ``on_end`` is called exactly once, when the session stops accepting input: the
    shell exited (after its last output was queued), or :meth:`stop`/:meth:`end` were
    called. The process may still be dying then; :meth:`wait_closed` waits until
    every process of the shell's session is gone and the shell reaped, its fds closed
    and every queued message handed to the publisher.

    A closed terminal leaves nothing running: when the session ends for any reason,
    every process of the shell's session (jobs have process groups of their own) gets
    SIGHUP, then SIGKILL after ``kill_grace``. The shell is kept a zombie until they are
    gone, which pins its pid, the session id, against reuse (see ``members.py``).
    """

    def __init__(self, session_id: str, response_topic: str, config: TerminalConfig,
                 publish: Publisher, spec: ShellSpec, *, cols: int = protocol.DEFAULT_COLS,
                 rows: int = protocol.DEFAULT_ROWS, on_end: Optional[OnEnd] = None,
                 on_closed: Optional[Callable[[PtySession], None]] = None,
                 kill_grace: float = KILL_GRACE,
                 loop: Optional[asyncio.AbstractEventLoop] = None) -> None:
        self.id = session_id
        self.topic = response_topic
        self.config = config
        self.spec = spec
        self.cols, self.rows = cols, rows
        self._publish = publish
        self._on_end = on_end
        self._on_closed = on_closed
        self._closed_notified = False
        self._kill_grace = kill_grace
        self._loop = loop or asyncio.get_running_loop()
        self._prefix = (b'{"type":"x-data","sessionId":'
                        + json.dumps(session_id, ensure_ascii=False).encode("utf-8")
                        + b',"data":"')

        self.pid = -1
        self._fd = -1
        self._pidfd = -1
        self._reading = False
        self._writing = False
        self._paused = False
        self._ended = False      # on_end called: no more input, no more output read
        self._eof = False        # master drained (EIO) or given up on
        self._exited = False     # the shell is dead (a zombie until its session is empty)
        self._reaped = False
        self._teardown = Teardown.RUNNING
        self._killed_at = 0.0
        self._exit_code: Optional[int] = None
        self._end_reason = ""
        self._drain_left = 0
        self._drain_scheduled = False

        self._batch = bytearray()
        self._pending: collections.deque[tuple[bytes, int]] = collections.deque()
        self._pending_raw = 0
        self._inflight = 0
        self._pumping = False
        self._inbuf = bytearray()
        self._flush_handle: Optional[asyncio.TimerHandle] = None
        self._retry_handle: Optional[asyncio.TimerHandle] = None
        self._retry_delay = _RETRY_MIN
        self._kill_handle: Optional[asyncio.TimerHandle] = None
        self._poll_handle: Optional[asyncio.TimerHandle] = None
        self._poll_delay = 0.01
        self._closed_waiters: list[asyncio.Future[None]] = []

        now = self._loop.time()
        self.started_at = now
        self.last_input = now
        self._last_flush = now - 1.0
        self.seq = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.max_buffered = 0
        self.pauses = 0
        self.publish_refused = 0
        self.input_dropped = 0

    # ------------------------------------------------------------------ life cycle

    def start(self) -> None:
        """Spawn the shell; raises ``OSError`` (or ``FileNotFoundError``) when it cannot."""
        proc = PtyProcess.spawn(list(self.spec.argv), cwd=self.spec.cwd, env=self.spec.env,
                                dimensions=(self.rows, self.cols),
                                preexec_fn=reset_child_signals)
        self.pid = proc.pid
        try:
            # Own a plain fd (close-on-exec, as every fd Python creates) and retire
            # ptyprocess' file objects, whose __del__ would sleep and kill.
            self._fd = os.dup(proc.fd)
        except OSError:
            self._kill_now()
            raise
        finally:
            proc.fileobj.close()
            proc.closed = True
        try:
            os.set_blocking(self._fd, False)
            try:
                self._pidfd = os.pidfd_open(self.pid)
            except (AttributeError, OSError):  # kernel < 5.3: EIO on the master, then poll
                self._pidfd = -1
            if self._pidfd >= 0:
                self._loop.add_reader(self._pidfd, self._check_child)
            self._enqueue(protocol.x_started(self.id), 0)
            self._pump()
            self._update_reader()
        except BaseException:
            # whatever failed, the shell must not outlive a session nobody tracks
            self._abort_start()
            raise

    def _abort_start(self) -> None:
        self._ended = True
        self._cancel_timers(retry=True)
        self._close_pidfd()
        self._close_master()
        if not self._reaped:
            self._kill_now()

    def send_started(self) -> None:
        """Answer a redelivered ``x-started`` in order with the output."""
        if not self._ended:
            self._enqueue(protocol.x_started(self.id), 0)
            self._pump()

    def stop(self) -> None:
        """``x-stop``: nobody reads the output any more, so drop it and end the shell."""
        if self._ended:
            return
        dropped = len(self._batch) + self._pending_raw
        if dropped:
            log.debug("terminal session %r: %d output bytes not sent after x-stop", self.id,
                      dropped)
        self._batch.clear()
        self._pending.clear()
        self._pending_raw = 0
        self._cancel_timers(retry=True)
        self._finish_session("stop")
        self._terminate()

    def end(self, error: str, reason: str, **extra: Any) -> None:
        """End with an ``x-error`` (idle, shutdown): what was read is sent first."""
        if self._ended:
            return
        self._frame()
        self._enqueue(protocol.x_error(self.id, error, reason=reason, **extra), 0)
        self._finish_session(reason)
        self._pump()
        self._terminate()

    async def wait_closed(self) -> None:
        if self.closed:
            return
        future: asyncio.Future[None] = self._loop.create_future()
        self._closed_waiters.append(future)
        await future

    def force_close(self) -> None:
        """Out of time (shutdown): SIGKILL the whole session now, drop what is queued.

        The loop still reaps the shell, and waits for its session to be gone.
        """
        self._pending.clear()
        self._pending_raw = 0
        self._cancel_timers(retry=True)
        self._ended = True
        if not self._reaped and self.pid > 0:
            self._kill()
        self._close_master()
        self._maybe_closed()

    @property
    def ended(self) -> bool:
        return self._ended

    @property
    def closed(self) -> bool:
        return self._ended and self._reaped and self._fd < 0 and not self._pending

    @property
    def buffered(self) -> int:
        """Raw output bytes held by the bridge for this session (the outbox)."""
        return len(self._batch) + self._pending_raw + self._inflight

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def exit_code(self) -> Optional[int]:
        return self._exit_code

    @property
    def end_reason(self) -> str:
        return self._end_reason

    def fds(self) -> tuple[int, int]:
        return self._fd, self._pidfd

    # ------------------------------------------------------------------ input

    def write(self, data: bytes) -> bool:
        """Keystrokes to the shell; ``False`` when refused (ended or input backlog full)."""
        if self._ended or self._fd < 0:
            return False
        if len(self._inbuf) + len(data) > INPUT_CAP:
            self.input_dropped += len(data)
            log.warning("terminal session %r: shell is not reading its input; %d bytes "
                        "of input dropped (backlog %d bytes)", self.id, len(data),
                        len(self._inbuf))
            return False
        self.bytes_in += len(data)
        self.last_input = self._loop.time()
        if self._inbuf:
            self._inbuf += data
            return True
        written = self._write_some(data)
        if written < len(data):
            self._inbuf += data[written:]
            self._loop.add_writer(self._fd, self._on_writable)
            self._writing = True
        return True

    def _write_some(self, data: bytes | bytearray) -> int:
        try:
            return os.write(self._fd, data)
        except BlockingIOError:
            return 0
        except OSError as exc:  # EIO: the shell is going away; its exit ends the session
            log.debug("terminal session %r: write to PTY failed: %s", self.id, exc)
            return len(data)

    def _on_writable(self) -> None:
        written = self._write_some(self._inbuf)
        del self._inbuf[:written]
        if not self._inbuf:
            self._loop.remove_writer(self._fd)
            self._writing = False

    def resize(self, cols: int, rows: int) -> None:
        """TIOCSWINSZ on the master: the kernel sends SIGWINCH to the foreground job."""
        if self._fd < 0:
            return
        fcntl.ioctl(self._fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        self.cols, self.rows = cols, rows

    # ------------------------------------------------------------------ output

    def _on_readable(self) -> None:
        status = self._read_some()
        if status == "eof":
            self._on_eof()
        self._update_reader()

    def _read_some(self) -> str:
        """Read what the budget allows: ``"eagain"``, ``"eof"`` or ``"budget"``."""
        budget = min(READ_PER_WAKEUP, self.config.outbox_bytes - self.buffered)
        if self._exited:
            budget = min(budget, self._drain_left)
        got = 0
        status = "budget"
        while got < budget:
            try:
                data = os.read(self._fd, budget - got)
            except BlockingIOError:
                status = "eagain"
                break
            except OSError as exc:
                if exc.errno != errno.EIO:  # EIO is the normal "slave closed"
                    log.warning("terminal session %r: PTY read failed: %s", self.id, exc)
                status = "eof"
                break
            if not data:
                status = "eof"
                break
            got += len(data)
            self._batch += data
            if len(self._batch) >= self.config.batch_bytes:
                self._frame(full_only=True)
        if got:
            self.bytes_out += got
            if self._exited:
                self._drain_left -= got
            self.max_buffered = max(self.max_buffered, self.buffered)
            self._schedule_flush()
        return status

    def _schedule_flush(self) -> None:
        """Send at once when the link has taken everything (a lone echo) or the batch
        window has passed; otherwise coalesce for at most ``batch_delay_ms``."""
        if not self._batch or self._flush_handle is not None:
            return
        delay = self.config.batch_delay_ms / 1000.0
        now = self._loop.time()
        link_idle = self._inflight == 0 and not self._pending
        if delay <= 0 or link_idle or now - self._last_flush >= delay:
            self._frame()
        else:
            self._flush_handle = self._loop.call_at(self._last_flush + delay, self._on_flush)

    def _on_flush(self) -> None:
        self._flush_handle = None
        self._frame()

    def _frame(self, full_only: bool = False) -> None:
        size = self.config.batch_bytes
        framed = False
        while len(self._batch) >= size or (self._batch and not full_only):
            chunk = bytes(self._batch[:size])
            del self._batch[:size]
            self._enqueue(self._data_message(chunk), len(chunk))
            framed = True
        if framed:
            self._last_flush = self._loop.time()
            self._pump()

    def _data_message(self, chunk: bytes) -> bytes:
        """Byte for byte ``protocol.x_data``, without a JSON round trip per chunk."""
        seq = self.seq
        self.seq += 1
        return b"".join((self._prefix, b64encode(chunk), b'","seq":', str(seq).encode(), b"}"))

    def _enqueue(self, payload: bytes, raw: int) -> None:
        self._pending.append((payload, raw))
        self._pending_raw += raw

    def _pump(self) -> None:
        """Hand queued messages to the publisher, in order, until it refuses one."""
        if self._pumping or self._retry_handle is not None:
            return
        self._pumping = True
        try:
            while self._pending:
                payload, raw = self._pending.popleft()
                self._pending_raw -= raw
                self._inflight += raw
                if self._publish(self.topic, payload, qos=self.config.qos, retain=False,
                                 on_sent=self._sent_callback(raw)):
                    self._retry_delay = _RETRY_MIN
                    continue
                self._inflight -= raw
                self._pending_raw += raw
                self._pending.appendleft((payload, raw))
                self.publish_refused += 1
                if self.publish_refused == 1 or self._retry_delay >= _RETRY_MAX:
                    log.warning("terminal session %r: link refused output (outbox full); "
                                "holding %d bytes and retrying", self.id, self.buffered)
                self._retry_handle = self._loop.call_later(self._retry_delay, self._retry)
                self._retry_delay = min(self._retry_delay * 2, _RETRY_MAX)
                break
        finally:
            self._pumping = False
        self._maybe_closed()

    def _retry(self) -> None:
        self._retry_handle = None
        self._pump()
        self._update_reader()

    def _sent_callback(self, raw: int) -> Callable[[], None]:
        def sent() -> None:
            self._inflight -= raw
            if self._pending and self._retry_handle is not None:
                # something drained: retry now rather than at the timer
                self._retry_handle.cancel()
                self._retry_handle = None
            self._pump()
            self._update_reader()
        return sent

    def _update_reader(self) -> None:
        """Read while there is room; stop at ``outbox_bytes``, resume below half of it."""
        can_read = self._fd >= 0 and not self._ended and not self._eof
        buffered = self.buffered
        if self._paused and buffered <= self.config.outbox_bytes // 2:
            self._paused = False
        elif not self._paused and buffered >= self.config.outbox_bytes:
            self._paused = True
            self.pauses += 1
        want = can_read and not self._paused and not self._exited
        if want and not self._reading:
            self._loop.add_reader(self._fd, self._on_readable)
            self._reading = True
        elif not want and self._reading:
            self._loop.remove_reader(self._fd)
            self._reading = False
        if (can_read and self._exited and not self._paused
                and not self._drain_scheduled):
            self._drain_scheduled = True
            self._loop.call_soon(self._drain)

    def _drain(self) -> None:
        """After the shell died: read what the PTY still holds, then finish."""
        self._drain_scheduled = False
        if self._fd < 0 or self._ended or self._eof:
            return
        while True:
            status = self._read_some()
            if status != "budget":
                break
            if self._drain_left <= 0:
                # something outside the session keeps the slave open and writing
                log.warning("terminal session %r: output continues after the shell exited; "
                            "closing the terminal", self.id)
                break
            if self.buffered >= self.config.outbox_bytes:
                self._update_reader()  # paused: the next on_sent resumes the drain
                return
        self._on_eof()

    def _on_eof(self) -> None:
        self._eof = True
        self._frame()
        self._close_master()
        if not self._exited:
            if self._pidfd < 0:
                self._poll_child()
            return
        self._finish_exit()

    # ------------------------------------------------------------------ the child

    def _check_child(self) -> None:
        """The pidfd is readable (or the poll timer fired): has the shell exited?"""
        if self._exited or self.pid <= 0:
            return
        try:
            info = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:  # somebody else reaped it: the status is lost
            log.warning("terminal session %r: shell (pid %d) was reaped elsewhere; its "
                        "session's processes are not swept (its pid may be reused)",
                        self.id, self.pid)
            self._reaped = True
            self._on_shell_exit(255)
            return
        if info is None:
            return
        if info.si_code == os.CLD_EXITED:
            self._on_shell_exit(info.si_status)
        else:  # killed or dumped by a signal
            self._on_shell_exit(-info.si_status)

    def _on_shell_exit(self, code: int) -> None:
        """The shell is dead but not reaped: as a zombie it keeps its pid, the session id,
        from reuse while what is left of its session is hung up, killed and waited for."""
        self._exited = True
        self._exit_code = code
        self._close_pidfd()  # readable for good now; the sweep takes over
        if self._reaped:
            self._after_reap()
        else:
            self._hang_up()  # a natural exit: its jobs were the terminal's too
            self._poll_delay = 0.01
            self._sweep()
        if self._ended:
            return
        # Natural exit: drain what the PTY still holds (bounded), then report it.
        self._drain_left = self.config.outbox_bytes + 256 * 1024
        if self._eof:
            self._finish_exit()
        else:
            self._update_reader()  # schedules the drain, or the next on_sent will

    def _sweep(self) -> None:
        """Reap the shell once no process of its session is left; until then look again,
        backing off, SIGKILLing again anything that appeared after the SIGKILL."""
        self._poll_handle = None
        if self._reaped or not self._exited:
            return
        left = members(self.pid)
        if left and self._teardown is Teardown.KILLED:
            if self._loop.time() - self._killed_at >= KILL_GIVE_UP:
                log.warning("terminal session %r: %d processes of its session still there "
                            "%.1f s after SIGKILL (pids %s); giving up on them", self.id,
                            len(left), KILL_GIVE_UP, ", ".join(str(p) for p, _ in left[:10]))
                left = []
            else:
                self._signal_session(signal.SIGKILL, left)
        if not left:
            self._reap()
            return
        self._poll_handle = self._loop.call_later(self._poll_delay, self._sweep)
        self._poll_delay = min(self._poll_delay * 2, _SWEEP_MAX)

    def _reap(self) -> None:
        try:
            os.waitpid(self.pid, os.WNOHANG)  # a zombie: immediate
        except ChildProcessError:
            pass
        self._reaped = True
        self._after_reap()

    def _after_reap(self) -> None:
        self._close_pidfd()
        for handle in (self._kill_handle, self._poll_handle):
            if handle is not None:
                handle.cancel()
        self._kill_handle = self._poll_handle = None
        self._maybe_closed()

    def _close_pidfd(self) -> None:
        if self._pidfd >= 0:
            self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = -1

    def _poll_child(self) -> None:
        """Only without pidfd (kernel < 5.3): poll with a backoff until the shell exits."""
        if self._exited:
            return  # the sweep owns the timer now
        if self._poll_handle is not None:  # one chain of polls, whoever calls
            self._poll_handle.cancel()
            self._poll_handle = None
        self._check_child()
        if not self._exited:
            self._poll_handle = self._loop.call_later(self._poll_delay, self._poll_child)
            self._poll_delay = min(self._poll_delay * 2, 1.0)

    def _finish_exit(self) -> None:
        if self._ended or not self._eof or not self._exited:
            return
        code = self._exit_code if self._exit_code is not None else 255
        exit_code, extra, text = exit_description(code)
        self._frame()
        self._enqueue(protocol.x_error(self.id, text, reason="exit", exitCode=exit_code,
                                       **extra), 0)
        self._finish_session("exit")
        self._pump()
        self._maybe_closed()

    def _finish_session(self, reason: str) -> None:
        self._ended = True
        self._end_reason = reason
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if self._on_end is not None:
            self._on_end(self, reason)

    def _terminate(self) -> None:
        """Hang up the session and the terminal; SIGKILL after the grace period."""
        if not self._reaped and self.pid > 0:
            self._hang_up()
            if self._pidfd < 0 and not self._exited:
                self._poll_child()
        self._close_master()
        self._maybe_closed()

    def _hang_up(self) -> None:
        if self._teardown is not Teardown.RUNNING or self._reaped:
            return
        self._teardown = Teardown.HUNG_UP
        self._signal_session(signal.SIGHUP)
        self._kill_handle = self._loop.call_later(self._kill_grace, self._kill_late)

    def _kill_late(self) -> None:
        self._kill_handle = None
        if self._reaped:
            return
        left = [str(pid) for pid, _ in members(self.pid)]
        if left:
            log.info("terminal session %r: %d processes of its session (pids %s) still "
                     "running %.1f s after SIGHUP: SIGKILL", self.id, len(left),
                     ", ".join(left[:10]), self._kill_grace)
        self._kill()

    def _kill(self) -> None:
        """SIGKILL the whole session now; the sweep waits for it to be gone."""
        if self._kill_handle is not None:
            self._kill_handle.cancel()
            self._kill_handle = None
        if self._teardown is not Teardown.KILLED:
            self._teardown = Teardown.KILLED
            self._killed_at = self._loop.time()
        self._signal_session(signal.SIGKILL)
        if self._exited:
            if self._poll_handle is not None:
                self._poll_handle.cancel()
            self._poll_delay = 0.01
            self._poll_handle = self._loop.call_later(self._poll_delay, self._sweep)
        elif self._pidfd < 0:
            self._poll_child()

    def _kill_now(self) -> None:
        """Spawned but unusable: the child is fresh, so a blocking reap is immediate."""
        self._signal_group(signal.SIGKILL)
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass
        self._reaped = True

    def _signal_session(self, signum: int,
                        found: Optional[list[tuple[int, int]]] = None) -> None:
        """The shell's process group, then every other process of its session (``found``:
        a fresh list from :func:`members`)."""
        self._signal_group(signum)
        signal_members(self.pid, signum, found)

    def _signal_group(self, signum: int) -> None:
        try:
            os.killpg(self.pid, signum)
        except ProcessLookupError:
            pass
        except PermissionError as exc:
            log.warning("terminal session %r: cannot signal process group %d: %s", self.id,
                        self.pid, exc)

    def _close_master(self) -> None:
        if self._fd < 0:
            return
        if self._reading:
            self._loop.remove_reader(self._fd)
            self._reading = False
        if self._writing:
            self._loop.remove_writer(self._fd)
            self._writing = False
        self._inbuf.clear()
        os.close(self._fd)
        self._fd = -1

    def _cancel_timers(self, retry: bool) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if retry and self._retry_handle is not None:
            self._retry_handle.cancel()
            self._retry_handle = None

    def _maybe_closed(self) -> None:
        if not self.closed or self._closed_notified:
            return
        self._closed_notified = True
        self._cancel_timers(retry=True)
        if self._kill_handle is not None:
            self._kill_handle.cancel()
            self._kill_handle = None
        waiters, self._closed_waiters = self._closed_waiters, []
        for future in waiters:
            if not future.done():
                future.set_result(None)
        if self._on_closed is not None:
            self._on_closed(self)
