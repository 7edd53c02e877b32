"""The flood harness: a fire-hose MQTT publisher, the Hypothesis corpus, the fuzz config."""

from __future__ import annotations

import threading
from typing import Any, Optional

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from spotfi_bridge import mqtt_compat
from spotfi_bridge.protocol import Topics
from tests.fuzz.strategies import Drawn, Message, drawn_message
from tests.helpers.wait import WaitTimeout

FUZZ_ROUTER = "fuzz-router"
FUZZ_TOPICS = Topics(FUZZ_ROUTER)
MAX_INBOUND = 32768

#: The daemon under fuzz: a harmless shell, no RPC that writes or executes, small inbound cap
#: (oversized messages stay cheap to send), production log level.
FUZZ_TOML = f"""\
[mqtt]
max_inbound_bytes = {MAX_INBOUND}
keepalive = 30
[metrics]
interval = 55
[rpc]
backend = "local"
deny = ["file.exec", "file.write"]
[terminal]
shell = ["/bin/cat"]
max_sessions = 4
idle_timeout = 600
[log]
level = "info"
"""
FUZZ_ENV = {"SPOTFI_LOG_LEVEL": "info"}


def draw_corpus(topics: Topics, examples: int, seed: int, per_example: int = 3) -> list[Drawn]:
    """Structured hostile messages drawn by Hypothesis, the same for the same ``seed``
    (generate phase only: the daemon, not this function, is what a failure is about)."""
    corpus: list[Drawn] = []

    @hypothesis_seed(seed)
    @settings(max_examples=examples, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(st.lists(drawn_message(topics), min_size=per_example, max_size=per_example))
    def collect(batch: list[Drawn]) -> None:
        corpus.extend(batch)

    collect()
    return corpus


class Flooder:
    """A bare paho client that publishes as fast as the broker takes it (QoS 0), recording
    nothing it receives, so the API-side test client stays responsive."""

    def __init__(self, port: int) -> None:
        self._connected = threading.Event()
        self.client = mqtt_compat.new_client(f"fuzz-flooder-{port}", clean_session=True)
        mqtt_compat.bind_callbacks(self.client, on_connect=self._on_connect,
                                   on_disconnect=lambda rc: self._connected.clear(),
                                   on_message=lambda *a: None, on_publish=lambda mid: None)
        self.disconnects = 0
        self.sent = 0
        self._last: Optional[Any] = None
        self.client.connect("127.0.0.1", port, keepalive=60)
        self.client.loop_start()
        if not self._connected.wait(10):
            raise WaitTimeout("flooder could not connect")

    def _on_connect(self, result: mqtt_compat.ConnectResult) -> None:
        if result.ok:
            self._connected.set()

    def publish(self, messages: list[Message]) -> None:
        for topic, payload in messages:
            info = self.client.publish(topic, payload, qos=0)
            if mqtt_compat.publish_rc(info) != 0:
                raise AssertionError(f"flooder publish failed: rc {mqtt_compat.publish_rc(info)}")
            self._last = info
            self.sent += 1

    def flush(self, timeout: float = 60.0) -> None:
        """Until everything published so far is written to the broker's socket."""
        if self._last is not None:
            self._last.wait_for_publish(timeout)
            if not self._last.is_published():
                raise WaitTimeout(f"flooder: messages still queued after {timeout} s")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
