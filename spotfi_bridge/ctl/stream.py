"""Pure byte-stream logic of ``ctl shell``: the ssh-style escape and output reordering.

Both are state machines with no I/O and no clock of their own, so they are
tested exhaustively without a terminal.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

ESCAPE = 0x7E  # "~"
_LINE_ENDS = (0x0D, 0x0A)

QUIT = "quit"
HELP = "help"

ESCAPE_HELP = (b"\r\nSupported escape sequences (after Enter):\r\n"
               b"  ~.  - end the session\r\n"
               b"  ~~  - send a literal ~\r\n"
               b"  ~?  - this message\r\n")


@dataclass
class EscapeParser:
    """Keystrokes in, bytes to send and local commands out, as ssh does it.

    ``~`` is held back only at the start of a line (after Enter, or first thing
    in the session); the next key decides: ``.`` quits, ``~`` sends one ``~``,
    ``?`` shows help, anything else sends both.
    """

    at_line_start: bool = True
    pending: bool = False

    def feed(self, data: bytes) -> tuple[bytes, list[str]]:
        """What to send, and the commands seen; after QUIT the rest of ``data`` is dropped."""
        out = bytearray()
        commands: list[str] = []
        for byte in data:
            if self.pending:
                self.pending = False
                if byte == 0x2E:  # "."
                    commands.append(QUIT)
                    return bytes(out), commands
                if byte == ESCAPE:
                    out.append(ESCAPE)
                    self.at_line_start = False
                    continue
                if byte == 0x3F:  # "?"
                    commands.append(HELP)
                    self.at_line_start = True
                    continue
                out.append(ESCAPE)
                out.append(byte)
                self.at_line_start = byte in _LINE_ENDS
                continue
            if self.at_line_start and byte == ESCAPE:
                self.pending = True
                continue
            out.append(byte)
            self.at_line_start = byte in _LINE_ENDS
        return bytes(out), commands


@dataclass
class SeqReorderer:
    """Terminal output in ``seq`` order: duplicates dropped, early chunks held back.

    A gap that is not filled within ``gap_timeout`` seconds (a message lost for
    good, e.g. QoS 0 across a reconnect) or that holds more than ``max_held``
    bytes is skipped, and the number of missing chunks is reported, never hidden.
    """

    gap_timeout: float = 2.0
    max_held: int = 4 * 1024 * 1024
    expected: int = 0
    held: dict[int, bytes] = field(default_factory=dict)
    held_bytes: int = 0
    gap_since: Optional[float] = None
    duplicates: int = 0
    lost: int = 0

    def push(self, seq: Optional[int], data: bytes, now: float) -> list[bytes]:
        """Chunks that can be written now, in order."""
        if seq is None:  # a bridge without the seq extension: arrival order is all there is
            return [data]
        if seq < self.expected or seq in self.held:
            self.duplicates += 1
            return []
        if seq > self.expected:
            self.held[seq] = data
            self.held_bytes += len(data)
            if self.gap_since is None:
                self.gap_since = now
            if self.held_bytes > self.max_held:
                return self._skip(now)
            return []
        self.expected += 1
        return [data, *self._drain(now)]

    def deadline(self) -> Optional[float]:
        """When :meth:`expire` must next be called (``None``: no gap open)."""
        return None if self.gap_since is None else self.gap_since + self.gap_timeout

    def expire(self, now: float) -> tuple[list[bytes], int]:
        """Skip a gap older than ``gap_timeout``: (chunks now writable, chunks given up)."""
        deadline = self.deadline()
        if deadline is None or now < deadline:
            return [], 0
        before = self.lost
        chunks = self._skip(now)
        return chunks, self.lost - before

    def _skip(self, now: float) -> list[bytes]:
        first = min(self.held)
        self.lost += first - self.expected
        self.expected = first
        return self._drain(now)

    def _drain(self, now: float) -> list[bytes]:
        """Release what follows ``expected``; a gap still open restarts its timer now."""
        out = []
        while self.expected in self.held:
            data = self.held.pop(self.expected)
            self.held_bytes -= len(data)
            out.append(data)
            self.expected += 1
        self.gap_since = now if self.held else None
        return out
