"""The age rule: trusted and untrusted router clocks, live and queued deliveries."""

from __future__ import annotations

from typing import Optional

import pytest

from spotfi_bridge.freshness import DISTRUST_AFTER, TRUST_LIFETIME, Delivery, Freshness
from spotfi_bridge.protocol import id_sent_at

API_NOW = 1_800_000_000.0  # the API's clock (right)


class Clocks:
    """The router's wall clock (``offset`` off the API's) and its monotonic clock."""

    def __init__(self, offset: float = 0.0) -> None:
        self.mono = 1000.0
        self.offset = offset

    def api(self) -> float:
        return API_NOW + self.mono

    def wall(self) -> float:
        return self.api() + self.offset

    def monotonic(self) -> float:
        return self.mono


def judge(freshness: Freshness, clocks: Clocks, sent_ago: Optional[float], *,
          queued: bool = False, outage: Optional[float] = None,
          max_age: float = 30.0) -> Optional[str]:
    sent_at = None if sent_ago is None else clocks.api() - sent_ago
    late = freshness.judge(sent_at, None, max_age, Delivery(queued, outage, clocks.mono))
    return None if late is None else late.detail


def make(offset: float = 0.0) -> tuple[Freshness, Clocks]:
    clocks = Clocks(offset)
    return Freshness(5.0, wall=clocks.wall, monotonic=clocks.monotonic), clocks


def test_a_live_message_that_agrees_makes_the_clock_trusted() -> None:
    freshness, clocks = make()
    assert not freshness.trusted()
    assert judge(freshness, clocks, 0.2) is None
    assert freshness.trusted()
    # trusted: a stale stamp is refused, even live, and trust is kept
    assert "sent 40.0 s ago" in (judge(freshness, clocks, 40) or "")
    assert freshness.trusted()
    # and the queue after a long outage is aged by the stamps: a recent one runs
    assert judge(freshness, clocks, 3, queued=True, outage=600) is None
    assert judge(freshness, clocks, 300, queued=True, outage=600) is not None


@pytest.mark.parametrize("offset", [-3600.0, 3600.0])
def test_a_wrong_router_clock_is_not_trusted_and_the_outage_decides(offset: float) -> None:
    freshness, clocks = make(offset)
    for _ in range(3):  # live messages run whatever the router's clock says
        assert judge(freshness, clocks, 0.1) is None
    assert not freshness.trusted()
    assert freshness.info()["offset"] == pytest.approx(offset + 0.1)
    # the queue after a 2 s blip runs; after a long outage it does not, even stamped recent
    assert judge(freshness, clocks, 1, queued=True, outage=2.0) is None
    assert "during a 45.0 s outage" in (judge(freshness, clocks, 1, queued=True, outage=45)
                                          or "")
    # the bridge process just started: the outage is unknown
    assert "unknown time" in (judge(freshness, clocks, 1, queued=True, outage=None) or "")


def test_a_clock_step_or_a_long_silence_ends_trust() -> None:
    freshness, clocks = make()
    judge(freshness, clocks, 0.0)
    assert freshness.trusted()
    clocks.offset = -7200.0  # NTP, or someone, sets the clock
    assert not freshness.trusted()
    clocks.offset = 0.0
    judge(freshness, clocks, 0.0)
    clocks.mono += TRUST_LIFETIME + 1
    assert not freshness.trusted()


@pytest.mark.parametrize("odd", [-7200.0, 7200.0], ids=["from-the-future", "stale"])
def test_one_odd_stamp_keeps_trust_a_run_of_them_ends_it(odd: float) -> None:
    freshness, clocks = make()
    judge(freshness, clocks, 0.0)
    for _ in range(DISTRUST_AFTER - 1):
        judge(freshness, clocks, odd)
        assert freshness.trusted()
    judge(freshness, clocks, 0.0)  # an agreeing one in between: the run starts again
    for _ in range(DISTRUST_AFTER - 1):
        judge(freshness, clocks, odd)
    assert freshness.trusted()
    judge(freshness, clocks, odd)  # the API's clock jumped, or the router's is off
    assert not freshness.trusted()
    assert judge(freshness, clocks, odd) is None  # live, untrusted: it runs


def test_time_waited_in_the_bridge_counts() -> None:
    freshness, clocks = make(-3600)
    delivery = Delivery(received_at=clocks.mono)
    assert freshness.judge(None, None, 30.0, delivery) is None
    clocks.mono += 31
    late = freshness.judge(None, None, 30.0, delivery, first_look=False)
    assert late is not None and late.age == pytest.approx(31)


def test_expires_at_is_read_with_a_trusted_clock() -> None:
    freshness, clocks = make()
    judge(freshness, clocks, 0.0)
    late = freshness.judge(None, clocks.api() - 10, 30.0, Delivery(received_at=clocks.mono))
    assert late is not None and "expiresAt passed 10.0 s ago" in late.detail
    assert freshness.judge(None, clocks.api() - 2, 30.0, Delivery(received_at=clocks.mono)) \
        is None  # within the skew


@pytest.mark.parametrize(("req_id", "expected"), [
    ("cmd_1764470000123_a9f1_7", 1764470000.123),  # the API: epoch ms
    ("cmd_1700000000_a9f1_1", 1700000000.0),       # epoch seconds
    ("cmd_1", None), ("cmd_12345678901_x", None), ("dup-1", None), (1764470000123, None),
    ("xcmd_1764470000123_a", None),
])
def test_send_time_from_the_api_id(req_id: object, expected: Optional[float]) -> None:
    assert id_sent_at(req_id) == expected
