"""``ctl shell``: an interactive terminal on the router through MQTT, ssh-like.

The main thread owns the local terminal and blocks in one ``select`` over stdin
and a wake-up pipe (written by paho's thread when a message arrives and by the
SIGWINCH handler), so keystrokes, output and resizes are handled in order with
no polling. The local terminal is put in raw mode only once the router said
``x-started``, and restored on every way out: normal return, exception,
signal (handlers raise), and ``atexit`` as a last resort.
"""

from __future__ import annotations

import atexit
import base64
import binascii
import datetime
import os
import secrets
import select
import selectors
import signal
import termios
import time
import tty
from dataclasses import dataclass
from types import FrameType
from typing import IO, Any, Optional

from spotfi_bridge import protocol
from spotfi_bridge.ctl.client import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_TIMEOUT,
    CtlClient,
    CtlError,
    LinkEvent,
    Message,
)
from spotfi_bridge.ctl.settings import Settings
from spotfi_bridge.ctl.stream import ESCAPE_HELP, HELP, QUIT, EscapeParser, SeqReorderer

START_TIMEOUT = 10.0
STOP_FLUSH_TIMEOUT = 2.0
#: Seconds after x-start without any output before the user is told what is going on: a
#: blank screen is indistinguishable from a hung ctl, a slow router or a slow shell profile.
QUIET_NOTICE_AFTER = 3.0
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT, signal.SIGQUIT)


class _Signalled(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@dataclass(frozen=True)
class Ending:
    """Why the session ended, for the last line the user reads, and the exit status."""

    reason: str
    exit_code: int
    #: the router already forgot the session: no x-stop to send
    router_closed: bool = False


class TerminalMode:
    """Raw mode on a local terminal that is restored whatever happens."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.saved: Optional[list[Any]] = None

    def enter_raw(self) -> None:
        self.saved = termios.tcgetattr(self.fd)
        atexit.register(self.restore)
        tty.setraw(self.fd, termios.TCSANOW)

    def restore(self) -> None:
        """Idempotent; TCSANOW so a stuck output queue can never block the way out."""
        saved, self.saved = self.saved, None
        if saved is not None:
            try:
                termios.tcsetattr(self.fd, termios.TCSANOW, saved)
            except termios.error:
                pass  # the terminal is gone: nothing left to restore
            atexit.unregister(self.restore)


def window_size(fd: Optional[int]) -> tuple[int, int]:
    """(cols, rows) of the local terminal, clamped to what the protocol accepts; 80x24 if unknown."""
    if fd is not None:
        try:
            size = os.get_terminal_size(fd)
        except OSError:
            pass
        else:
            if size.columns > 0 and size.lines > 0:
                return (min(size.columns, protocol.MAX_COLS), min(size.lines, protocol.MAX_ROWS))
    return protocol.DEFAULT_COLS, protocol.DEFAULT_ROWS


def new_session_id(router: str) -> str:
    """Shaped like the API's ``{routerId}-{ms}-{rand}``."""
    return f"{router}-{int(time.time() * 1000)}-{secrets.token_hex(3)}"


def _iso_now() -> str:
    now = datetime.datetime.now(datetime.timezone.utc)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except BlockingIOError:
            select.select([], [fd], [])  # stdout was left non-blocking by someone: wait for room
            continue
        view = view[written:]


class ShellSession:
    def __init__(self, settings: Settings, stdin_fd: int, stdout_fd: int, err: IO[str],
                 start_timeout: float = START_TIMEOUT) -> None:
        self.router = settings.require_router()
        self.settings = settings
        self.topics = protocol.Topics(self.router)
        self.stdin_fd = stdin_fd
        self.stdout_fd = stdout_fd
        self.err = err
        self.start_timeout = start_timeout
        self.interactive = os.isatty(stdin_fd)
        size_fd = stdin_fd if self.interactive else (stdout_fd if os.isatty(stdout_fd) else None)
        self.size_fd = size_fd
        self.mode = TerminalMode(stdin_fd)
        self.escape = EscapeParser()
        self.reorder = SeqReorderer()
        self.session_id = new_session_id(self.router)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._resize_pending = False
        self._sent_size = (0, 0)
        self.client = CtlClient(settings, wake=self._wake)
        self._backlog: list[Message] = []
        self._last_status = ""
        #: when to say that nothing came yet; None once output came or the notice was given
        self._quiet_due: Optional[float] = None

    # ------------------------------------------------------------------ plumbing

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"!")
        except (BlockingIOError, OSError):
            pass  # a wake-up is already pending (or we are closing)

    def _on_winch(self, _signum: int, _frame: Optional[FrameType]) -> None:
        self._resize_pending = True
        self._wake()

    @staticmethod
    def _on_stop_signal(signum: int, _frame: Optional[FrameType]) -> None:
        raise _Signalled(signum)

    def _out(self, data: bytes) -> None:
        _write_all(self.stdout_fd, data)

    def _notice(self, text: str) -> None:
        """A ctl line in the middle of the remote output (raw mode: CR LF by hand); on stderr
        when stdin is not a terminal, so piped output stays the remote output alone."""
        if self.interactive:
            self._out(f"\r\n[ctl: {text}]\r\n".encode())
        else:
            self.err.write(f"[ctl: {text}]\n")
            self.err.flush()

    def _quiet_notice(self) -> None:
        """Called when QUIET_NOTICE_AFTER passed with no output at all: say why it may be."""
        self._quiet_due = None
        if self._last_status and self._last_status != "ONLINE":
            state = f"router {self.router} is {self._last_status}"
        elif not self._last_status:
            state = f"router {self.router} has never announced itself on this broker"
        else:
            state = "the router is ONLINE; its shell may be slow to start"
        self._notice(f"no output after {QUIET_NOTICE_AFTER:g} s ({state}); still waiting, "
                     "~. quits")

    def _next_wait(self, deadline: Optional[float]) -> Optional[float]:
        """Seconds until ``deadline`` or the quiet notice, whichever is first (None: no limit)."""
        moments = [m for m in (deadline, self._quiet_due) if m is not None]
        return max(0.0, min(moments) - time.monotonic()) if moments else None

    def _send(self, payload: bytes) -> int:
        return self.client.publish(self.topics.x_in, payload)

    # ------------------------------------------------------------------ life cycle

    def run(self) -> int:
        previous = {signum: signal.signal(signum, self._on_stop_signal) for signum in _STOP_SIGNALS}
        previous_winch = signal.signal(signal.SIGWINCH, self._on_winch) if self.interactive else None
        ending: Optional[Ending] = None
        started = False
        self.err.write(f"spotfi-bridge-ctl: shell on router {self.router} via "
                       f"{self.settings.public_broker}; ~. quits, ~? for help\n")
        self.err.flush()
        try:
            try:
                self.client.connect()
                self.client.subscribe([self.client.out_topic])
                # presence for notices, and the router's own x/out: where a bridge that no
                # longer knows this session (it restarted) says so; both optional under an ACL
                self.client.subscribe([self.topics.status, self.topics.x_out], required=False)
                cols, rows = window_size(self.size_fd)
                self._sent_size = (cols, rows)
                self._send(protocol.api_x_start(self.session_id, self.client.out_topic,
                                                timestamp=_iso_now(), cols=cols, rows=rows))
                started = True
                self._quiet_due = time.monotonic() + QUIET_NOTICE_AFTER
                ending = self._wait_started()
                if ending is None:
                    if self.interactive:
                        self.mode.enter_raw()
                    ending = self._loop()
            except _Signalled as exc:
                ending = Ending(f"interrupted by {signal.Signals(exc.signum).name}", 128 + exc.signum)
            except CtlError as exc:
                ending = Ending(str(exc), exc.exit_code)
            except OSError as exc:  # the local terminal went away under us (EIO, EBADF)
                ending = Ending(f"local terminal error: {exc.strerror or exc}", EXIT_FAILED)
        finally:
            self.mode.restore()
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            if previous_winch is not None:
                signal.signal(signal.SIGWINCH, previous_winch)
            if started and not (ending and ending.router_closed):
                self._stop_remote()
            self.client.close()
            os.close(self._wake_r)
            os.close(self._wake_w)
        assert ending is not None
        self.err.write(f"\nspotfi-bridge-ctl: session on {self.router} ended: {ending.reason}\n")
        self.err.flush()
        return ending.exit_code

    def _stop_remote(self) -> None:
        """x-stop, as the API sends when its browser goes away; bounded wait for the PUBACK."""
        try:
            mid = self._send(protocol.api_x_stop(self.session_id))
            self.client.wait_published(mid, STOP_FLUSH_TIMEOUT)
        except CtlError:
            pass  # the broker is gone: the bridge's idle timeout will end the session

    def _wait_started(self) -> Optional[Ending]:
        deadline = time.monotonic() + self.start_timeout
        while True:
            event = self.client.get(self._next_wait(deadline))
            if event is None and self._quiet_due is not None and time.monotonic() < deadline:
                self._quiet_notice()
                continue
            if event is None:
                status = (f"its last status is {self._last_status!r}" if self._last_status
                          else "it has never announced itself on this broker")
                return Ending(f"no answer to x-start from router {self.router} within "
                              f"{self.start_timeout:g} s ({status})", EXIT_TIMEOUT)
            if not isinstance(event, Message):
                continue
            if event.topic == self.topics.status:
                self._last_status = event.payload.decode("utf-8", "replace")
                continue
            body = self._session_message(event)
            if body is None:
                continue
            if body.get("type") == "x-started":
                return None
            if body.get("type") == "x-error":
                return self._error_ending(body)
            self._backlog.append(event)  # output before x-started: shown once running

    def _loop(self) -> Ending:
        selector = selectors.DefaultSelector()
        selector.register(self.stdin_fd, selectors.EVENT_READ, "stdin")
        selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        try:
            for message in self._backlog:
                ending = self._on_message(message)
                if ending:
                    return ending
            while True:
                ready = {key.data for key, _ in selector.select(
                    self._next_wait(self.reorder.deadline()))}
                if self._quiet_due is not None and time.monotonic() >= self._quiet_due:
                    self._quiet_notice()
                if "wake" in ready:
                    try:
                        while os.read(self._wake_r, 4096):
                            pass
                    except BlockingIOError:
                        pass
                # resize first: a SIGWINCH that came before a keystroke must reach the router first
                if self._resize_pending:
                    self._resize_pending = False
                    self._send_resize()
                while True:
                    event = self.client.get_nowait()
                    if event is None:
                        break
                    ending = self._on_event(event)
                    if ending:
                        return ending
                chunks, lost = self.reorder.expire(time.monotonic())
                self._write_chunks(chunks, lost)
                if "stdin" in ready:
                    ending = self._on_stdin(selector)
                    if ending:
                        return ending
        finally:
            selector.close()

    # ------------------------------------------------------------------ input

    def _on_stdin(self, selector: selectors.BaseSelector) -> Optional[Ending]:
        try:
            data = os.read(self.stdin_fd, 65536)
        except BlockingIOError:
            return None
        except OSError as exc:  # EIO: the terminal hung up
            return Ending(f"local terminal error: {exc.strerror}", EXIT_FAILED)
        if not data:
            if self.interactive:
                return Ending("local terminal closed", EXIT_FAILED)
            # piped input ended: Ctrl-D lets the remote shell end on its own
            selector.unregister(self.stdin_fd)
            self._send(protocol.api_x_data(self.session_id, b"\x04"))
            return None
        if not self.interactive:
            self._send(protocol.api_x_data(self.session_id, data))
            return None
        to_send, commands = self.escape.feed(data)
        if to_send:
            self._send(protocol.api_x_data(self.session_id, to_send))
        if HELP in commands:
            self._out(ESCAPE_HELP)
        if QUIT in commands:
            return Ending("closed with ~.", EXIT_OK)
        return None

    def _send_resize(self) -> None:
        size = window_size(self.size_fd)
        if size != self._sent_size:
            self._sent_size = size
            self._send(protocol.api_x_resize(self.session_id, size[0], size[1]))

    # ------------------------------------------------------------------ output

    def _on_event(self, event: Any) -> Optional[Ending]:
        if isinstance(event, LinkEvent):
            self._notice("broker connection back; session resumed" if event.up else
                         f"broker connection lost ({event.detail}); reconnecting")
            return None
        if isinstance(event, Message):
            return self._on_message(event)
        return None

    def _on_message(self, message: Message) -> Optional[Ending]:
        if message.topic == self.topics.status:
            # only news: a router that drops off the broker keeps its sessions and may be back
            # in a moment; ``~.`` is the way out if it is not
            status = message.payload.decode("utf-8", "replace")
            if status != self._last_status:
                self._last_status = status
                self._notice(f"router {self.router} is {status}"
                             f"{'' if status == 'ONLINE' else '; ~. quits'}")
            return None
        body = self._session_message(message)
        if body is None:
            return None
        kind = body.get("type")
        if kind == "x-data":
            data = body.get("data")
            try:
                raw = base64.b64decode(data if isinstance(data, str) else "", validate=True)
            except (binascii.Error, ValueError):
                self._notice("ignored an output message that is not valid base64")
                return None
            self._quiet_due = None
            seq = body.get("seq")
            seq = seq if isinstance(seq, int) and not isinstance(seq, bool) and seq >= 0 else None
            self._write_chunks(self.reorder.push(seq, raw, time.monotonic()), 0)
        elif kind == "x-error":
            return self._error_ending(body)
        return None

    def _write_chunks(self, chunks: list[bytes], lost: int) -> None:
        if lost:
            self._notice(f"{lost} output message(s) never arrived; output skipped ahead")
        if chunks:
            self._out(b"".join(chunks))

    def _session_message(self, message: Message) -> Optional[dict[str, Any]]:
        if message.topic not in (self.client.out_topic, self.topics.x_out):
            return None
        body = protocol.decode_object(message.payload)
        if not isinstance(body, dict) or body.get("sessionId") != self.session_id:
            return None
        if message.topic == self.topics.x_out and body.get("type") != "x-error":
            return None  # output only ever comes on our own topic
        return body

    @staticmethod
    def _error_ending(body: dict[str, Any]) -> Ending:
        if body.get("reason") == "exit":
            code = body.get("exitCode")
            if isinstance(code, int) and not isinstance(code, bool):
                status = code if 0 <= code <= 255 else EXIT_FAILED
                return Ending(f"the shell exited with code {code}", status, router_closed=True)
            return Ending("the shell exited", EXIT_OK, router_closed=True)
        error = body.get("error") or "unknown error"
        return Ending(f"the bridge ended it: {error}", EXIT_FAILED, router_closed=True)


def run_shell(settings: Settings, err: IO[str], stdin_fd: int = 0, stdout_fd: int = 1,
              start_timeout: float = START_TIMEOUT) -> int:
    return ShellSession(settings, stdin_fd, stdout_fd, err, start_timeout).run()
