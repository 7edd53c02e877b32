"""The replies of recent requests by id, so a redelivered request is not run twice.

The broker delivers at least once (QoS 1, persistent session): the same
``system reboot`` may arrive twice. The table is bounded by age, by entries and
by bytes; when a reply is too old to keep in full only the fact that it was
answered is remembered, which is enough never to run the request again.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from typing import Any, Callable, Optional

logger = logging.getLogger("spotfi_bridge.rpc")


def id_key(req_id: Any) -> str:
    """A key that tells ``1``, ``1.0`` and ``"1"`` apart, as the API does."""
    return json.dumps(req_id, sort_keys=True)


class _Entry:
    __slots__ = ("at", "reply")

    def __init__(self, at: float, reply: Optional[bytes]) -> None:
        self.at = at
        self.reply = reply


class DedupTable:
    def __init__(self, window: float, clock: Callable[[], float], *, max_entries: int = 4096,
                 max_bytes: int = 2 * 1024 * 1024) -> None:
        self.window = window
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._bytes = 0
        #: replies given up to stay within the bounds (their ids are still remembered)
        self.dropped_replies = 0
        #: ids forgotten before the window ended (entry bound): a redelivery would run again
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def stored_bytes(self) -> int:
        return self._bytes

    def lookup(self, key: str) -> tuple[bool, Optional[bytes]]:
        """``(seen, reply)``: whether ``key`` was answered within the window, and the
        stored reply when it is still kept."""
        self.purge()
        entry = self._entries.get(key)
        if entry is None:
            return False, None
        return True, entry.reply

    def remember(self, key: str, reply: bytes) -> None:
        if self.window <= 0:
            return
        old = self._entries.pop(key, None)
        if old is not None and old.reply is not None:
            self._bytes -= len(old.reply)
        stored: Optional[bytes] = reply
        if len(reply) > self.max_bytes:
            stored = None
            self.dropped_replies += 1
        self._entries[key] = _Entry(self._clock(), stored)
        if stored is not None:
            self._bytes += len(stored)
        self._enforce_bounds()

    def purge(self) -> None:
        """Forget entries older than the window (oldest first: the table is in time order)."""
        limit = self._clock() - self.window
        while self._entries:
            key, entry = next(iter(self._entries.items()))
            if entry.at > limit:
                break
            self._forget(key)

    def _forget(self, key: str) -> None:
        entry = self._entries.pop(key)
        if entry.reply is not None:
            self._bytes -= len(entry.reply)

    def _enforce_bounds(self) -> None:
        self.purge()
        while len(self._entries) > self.max_entries:
            self._forget(next(iter(self._entries)))
            self.evicted += 1
            if self.evicted == 1 or self.evicted % 1000 == 0:
                logger.warning("rpc: dedup table full (%d ids): forgot an id before its %g s "
                               "window ended (%d so far)", self.max_entries, self.window,
                               self.evicted)
        if self._bytes > self.max_bytes:
            for entry in self._entries.values():
                if self._bytes <= self.max_bytes:
                    break
                if entry.reply is not None:
                    self._bytes -= len(entry.reply)
                    entry.reply = None
                    self.dropped_replies += 1
