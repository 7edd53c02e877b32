"""Shared fixtures: a real Mosquitto, an API-side client, the real daemon.

The run's temporary files go to a private directory (``TMPDIR``, inherited by the xdist
workers and every child): what the suite leaves there is its own leak, whatever else
runs on the machine, and is reported, failing the run for ``spotfi-*`` entries, before
the directory is removed, so /tmp is left as it was found.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Callable, Iterator

import pytest

from tests.helpers.apiclient import ApiClient
from tests.helpers.bridge import BridgeProcess
from tests.helpers.broker import Mosquitto

#: What tools other than the suite's own code keep in the temporary directory on purpose.
_EXPECTED_TEMP = ("pytest-of-",)
_run_tmpdir: str = ""


def _is_controller(config: pytest.Config) -> bool:
    return not hasattr(config, "workerinput")  # xdist workers only inherit the directory


def pytest_configure(config: pytest.Config) -> None:
    global _run_tmpdir
    if not _is_controller(config):
        return
    _run_tmpdir = tempfile.mkdtemp(prefix="spotfi-test-run-")
    os.environ["TMPDIR"] = _run_tmpdir
    tempfile.tempdir = _run_tmpdir


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not _run_tmpdir or not _is_controller(session.config):
        return
    left = sorted(name for name in os.listdir(_run_tmpdir)
                  if not name.startswith(_EXPECTED_TEMP))
    shutil.rmtree(_run_tmpdir, ignore_errors=True)
    if not left:
        return
    ours = [name for name in left if name.startswith("spotfi-")]
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    text = (f"the test run left {len(left)} entries in its temporary directory "
            f"(removed now): {', '.join(left[:20])}{' ...' if len(left) > 20 else ''}")
    if reporter is not None:
        reporter.write_sep("!", "temporary files left behind", red=bool(ours), yellow=not ours)
        reporter.write_line(text)
    if ours and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


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
