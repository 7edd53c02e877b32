"""Whether a command's caller is still waiting for it: the age rule for RPCs and ``x-start``.

The API waits a bounded time for each command (30 s for most RPCs, 120 s for
``opkg``) and then forgets it. A command the broker kept queued past that, while the
router was offline, must not run: nobody is waiting, the operator was told it failed,
and a queued ``system reboot`` would reboot the router hours later.

The API stamps commands with its own clock (an RPC id's ``cmd_<epoch ms>_…``,
``timestamp``, ``expiresAt``), but a router's clock is often wrong (no RTC: the time of
the last file written until NTP syncs). So:

- The router's clock is **trusted** while it agrees with the API's: a live message (one
  the broker forwarded while the link was up, not the queue it hands over after a
  reconnect) is at most a moment old, so its stamp within ``clock_skew`` of the
  router's clock makes the clock trusted. Trust ends when the clock steps (NTP sync,
  ``date -s``: seen against the monotonic clock), after ``DISTRUST_AFTER`` live
  messages in a row that disagree (one odd stamp is the stamp's fault, not the
  clock's: it agreed before and has not stepped since), or after ``TRUST_LIFETIME``
  without an agreeing message.
- Trusted: a command is late when its stamp is older than the window of that call plus
  ``clock_skew`` (or its ``expiresAt`` passed ``clock_skew`` ago).
- Not trusted, or no stamp: what the link measured decides. A live message is fresh. A
  message from the queue after a reconnect is at most as old as the outage the link
  measured (monotonic): within the window it runs; after a longer outage, or when the
  outage is unknown (the bridge process started with the broker holding its session),
  it is late.

Either way the time a command then waits in the bridge's own queue counts too.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

#: Trust lapses after this long without a live message that agrees with the router's clock.
TRUST_LIFETIME = 3600.0
#: Live messages in a row whose stamps disagree with a trusted clock that end the trust.
DISTRUST_AFTER = 3


@dataclass(frozen=True)
class Delivery:
    """How the link got a message, as far as its age is concerned."""

    #: part of the queue the broker handed over right after a reconnect that found the
    #: session present (the messages published while the router was away)
    queued: bool = False
    #: seconds the link was away before that queue (monotonic, from the last packet the
    #: broker sent); None when unknown: this process never saw the connection before
    outage: Optional[float] = None
    #: monotonic time the link received the message
    received_at: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class Late:
    """Why a command is not run: its caller stopped waiting."""

    age: Optional[float]  # seconds, when known
    max_age: float
    detail: str

    def as_result(self) -> dict[str, Any]:
        age = None if self.age is None else round(self.age, 1)
        return {"age": age, "maxAge": self.max_age, "detail": self.detail}


class Freshness:
    """The one judge of commands' ages, shared by the RPC executor and the terminals."""

    def __init__(self, clock_skew: float, wall: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.clock_skew = clock_skew
        self._wall = wall
        self._monotonic = monotonic
        #: wall - monotonic when a live message last agreed with the router's clock
        self._anchor: Optional[float] = None
        self._anchored_at = 0.0
        self._disagreements = 0  # live stamped messages in a row that disagreed
        #: router clock minus the API's, as the last live stamped message showed it
        self._last_offset: Optional[float] = None

    def trusted(self) -> bool:
        if self._anchor is None:
            return False
        now = self._monotonic()
        stepped = abs(self._wall() - now - self._anchor) > self.clock_skew
        if stepped or now - self._anchored_at > TRUST_LIFETIME:
            self._anchor = None
            return False
        return True

    def info(self) -> dict[str, Any]:
        offset = None if self._last_offset is None else round(self._last_offset, 3)
        return {"trusted": self.trusted(), "offset": offset, "skew": self.clock_skew}

    def judge(self, sent_at: Optional[float], deadline: Optional[float], max_age: float,
              delivery: Delivery, *, first_look: bool = True) -> Optional[Late]:
        """None when the command may run. ``sent_at`` and ``deadline`` are POSIX seconds by
        the API's clock; ``first_look`` is False when it is judged again after a wait."""
        if first_look and not delivery.queued and sent_at is not None:
            self._observe(sent_at)
        skew = self.clock_skew
        trusted = self.trusted()
        if trusted and (sent_at is not None or deadline is not None):
            now = self._wall()
            if deadline is not None and now > deadline + skew:
                age = None if sent_at is None else now - sent_at
                return Late(age, max_age, f"its expiresAt passed {now - deadline:.1f} s ago")
            if sent_at is not None and now - sent_at > max_age + skew:
                return Late(now - sent_at, max_age,
                            f"sent {now - sent_at:.1f} s ago; its caller waits {max_age:g} s")
            return None
        waited = max(0.0, self._monotonic() - delivery.received_at)
        if not delivery.queued:
            if waited > max_age:
                return Late(waited, max_age, f"waited {waited:.1f} s in the bridge's queue; "
                                             f"its caller waits {max_age:g} s")
            return None
        why = "it carries no send time" if trusted else "the router's clock is not trusted"
        if delivery.outage is None:
            return Late(None, max_age, f"queued by the broker while the bridge was away for an "
                                       f"unknown time, and {why}")
        if delivery.outage + waited > max_age:
            return Late(None, max_age, f"queued by the broker during a {delivery.outage:.1f} s "
                                       f"outage, and {why}; its caller waits {max_age:g} s")
        return None

    def _observe(self, sent_at: float) -> None:
        """A live stamped message: does the router's clock agree with the API's?"""
        wall = self._wall()
        offset = wall - sent_at  # its delivery time when both clocks are right
        self._last_offset = offset
        if -self.clock_skew <= offset <= self.clock_skew:
            self._anchor = wall - self._monotonic()
            self._anchored_at = self._monotonic()
            self._disagreements = 0
            return
        # a stamp that disagrees with a clock that agreed before and has not stepped is
        # the stamp's fault (the command is judged by it); a run of them is the clock's
        # (or the API's clock jumped): trust ends
        self._disagreements += 1
        if self._disagreements >= DISTRUST_AFTER:
            self._anchor = None


__all__ = ["DISTRUST_AFTER", "TRUST_LIFETIME", "Delivery", "Freshness", "Late"]
