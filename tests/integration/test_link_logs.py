"""What an operator reads while the link cannot connect: steady lines, no retry storm.

A real Mosquitto (with a password file where a token is refused) and the real link.
"""

from __future__ import annotations

import asyncio
import logging
import re

import pytest

from spotfi_bridge import link as link_module
from tests.helpers.broker import Mosquitto
from tests.helpers.ports import free_port
from tests.integration.test_link import ROUTER, TOKEN, Harness, make_config, until

#: "not authorised.)", "lost.;", "'127.0.0.1'. (attempt": a full stop followed by more
DOUBLED = re.compile(r"[.!?][).;,:]|\.\s\(")


def link_lines(caplog: pytest.LogCaptureFixture, level: int = logging.INFO) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "spotfi_bridge.link" and r.levelno >= level]


def test_refused_token_gets_no_quick_retry_window(caplog: pytest.LogCaptureFixture) -> None:
    """With the default back-off, a refused token used to make ~26 attempts in 10 s."""
    with Mosquitto(users={ROUTER: TOKEN}) as broker:
        config = make_config(broker.url, SPOTFI_TOKEN="wrong-token-value",
                             SPOTFI_MQTT_BACKOFF_MIN="0.5", SPOTFI_MQTT_BACKOFF_MAX="60")
        attempts: dict[str, int] = {}

        async def scenario() -> None:
            async with Harness(config) as h:
                await until(lambda: h.link.counters().get("auth_refused", 0) >= 1, 15,
                            "the first refusal")
                await asyncio.sleep(10)  # the window the attempts are counted in
                attempts.update(h.link.counters())

        with caplog.at_level(logging.DEBUG, "spotfi_bridge"):
            asyncio.run(scenario())
    assert 1 <= attempts["auth_refused"] <= 4, attempts
    lines = link_lines(caplog)
    refusal = [line for line in lines if "bad token" in line]
    # paho 1.6.1's words, then 2.x's
    assert refusal and re.fullmatch(rf"broker refused router id {ROUTER}: bad token "
                                    r"\((Connection Refused: not authorised|Not authorized)\)",
                                    refusal[0]), refusal
    assert not [line for line in lines if DOUBLED.search(line)], lines
    assert "wrong-token-value" not in caplog.text


def test_a_line_at_least_every_interval_while_disconnected(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """Scaled down: the product says it at least once a minute (PROGRESS_LOG_INTERVAL)."""
    interval = 3.0
    monkeypatch.setattr(link_module, "PROGRESS_LOG_INTERVAL", interval)
    port = free_port()  # nothing listens: every attempt is refused at once
    config = make_config(f"mqtt://127.0.0.1:{port}", SPOTFI_MQTT_BACKOFF_MIN="0.5",
                         SPOTFI_MQTT_BACKOFF_MAX="2", SPOTFI_MQTT_CONNECT_TIMEOUT="1")

    async def scenario() -> None:
        async with Harness(config):
            await until(lambda: sum("still not connected" in line
                                    for line in link_lines(caplog)) >= 3, 30,
                        "three progress lines")

    with caplog.at_level(logging.INFO, "spotfi_bridge"):
        asyncio.run(scenario())
    records = [r for r in caplog.records if r.name == "spotfi_bridge.link"]
    progress = [r for r in records if "still not connected" in r.getMessage()]
    first = progress[0].getMessage()
    assert re.fullmatch(
        rf"still not connected to 127\.0\.0\.1:{port} after \d+ attempts \(last error: "
        rf"cannot connect to 127\.0\.0\.1:{port}: connection refused \(no broker listening "
        rf"on that port\)\); next attempt in \d+ s", first), first
    counts = [int(re.search(r"after (\d+) attempts", r.getMessage()).group(1))  # type: ignore[union-attr]
              for r in progress]
    assert counts == sorted(counts) and counts[0] < counts[-1], counts
    # never silent for longer than the interval (plus one attempt, scheduling slack)
    times = [r.created for r in records]
    gaps = [later - earlier for earlier, later in zip(times, times[1:])]
    assert max(gaps) <= interval + 2.0, gaps
    assert not [line for line in link_lines(caplog) if DOUBLED.search(line)]
