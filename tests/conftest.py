"""Shared fixtures: a real Mosquitto, an API-side client, the real daemon."""

from __future__ import annotations

from typing import Callable, Iterator

import pytest

from tests.helpers.apiclient import ApiClient
from tests.helpers.bridge import BridgeProcess
from tests.helpers.broker import Mosquitto


@pytest.fixture
def broker() -> Iterator[Mosquitto]:
    with Mosquitto() as mosq:
        yield mosq


@pytest.fixture
def api(broker: Mosquitto) -> Iterator[ApiClient]:
    client = ApiClient(broker.port)
    yield client
    client.close()


@pytest.fixture
def make_bridge(broker: Mosquitto) -> Iterator[Callable[..., BridgeProcess]]:
    """Start bridges against the test broker; every one is stopped at teardown."""
    started: list[BridgeProcess] = []

    def make(**kwargs: object) -> BridgeProcess:
        url = str(kwargs.pop("broker_url", broker.url))
        bridge = BridgeProcess(url, **kwargs)  # type: ignore[arg-type]
        started.append(bridge.start())
        return bridge

    yield make
    for bridge in started:
        bridge.close()


def wait_online(api: ApiClient, router_id: str = "test-router", timeout: float = 15.0,
                start: int = 0) -> None:
    """Wait for the router's ONLINE status (subscribing first if needed)."""
    topic = f"spotfi/router/{router_id}/status"
    if (topic, 1) not in api._subscriptions:
        api.subscribe(topic)
    api.wait_message(topic, lambda m: m.payload == b"ONLINE", timeout, start)
