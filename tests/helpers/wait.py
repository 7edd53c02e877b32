"""Bounded waiting on conditions: the only synchronisation the tests use."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable, Optional, TypeVar

T = TypeVar("T")


class WaitTimeout(AssertionError):
    pass


def wait_for(condition: Callable[[], Optional[T]], timeout: float = 10.0,
             what: str = "condition", interval: float = 0.01) -> T:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise WaitTimeout(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


async def until(condition: Callable[[], Any], what: str = "condition", timeout: float = 10.0,
                interval: float = 0.005) -> Any:
    """The async twin of :func:`wait_for`, for tests that run on the event loop."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = condition()
        if value:
            return value
        if loop.time() > deadline:
            raise WaitTimeout(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(interval)
