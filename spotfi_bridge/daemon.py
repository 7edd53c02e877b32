"""The daemon: builds every part from the Config, runs them on one loop, handles signals.

Only this module knows every part. Data flows one way: broker → link →
(rpc | terminal) → link.publish.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from typing import Any, Optional

from spotfi_bridge import __version__, aio, logs, mqtt_compat
from spotfi_bridge.config import Config, ConfigError, load_config
from spotfi_bridge.link import MqttLink
from spotfi_bridge.metrics import MetricsCollector, MetricsPublisher
from spotfi_bridge.protocol import Topics
from spotfi_bridge.rpc import RpcExecutor, make_backend
from spotfi_bridge.terminal import SessionManager

log = logging.getLogger("spotfi_bridge.daemon")

#: SIGTERM to exit: the whole shutdown must fit in procd's term_timeout.
SHUTDOWN_BUDGET = 2.5


class Daemon:
    def __init__(self, config: Config, config_path: Optional[str] = None,
                 log_level_override: Optional[str] = None) -> None:
        self.config = config
        self.config_path = config_path
        self.log_level_override = log_level_override
        self.started = time.monotonic()
        self.stats: dict[str, int] = {"unexpected_topic": 0, "reloads": 0, "reload_errors": 0}

    async def run(self) -> int:
        aio.install_child_watcher()
        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        config = self.config
        self.topics = Topics(config.router.id)
        self.link = MqttLink(config, self._dispatch, on_connected=self._on_connected,
                             on_subscribers=self._on_subscribers)
        self._build_workers(config)
        self.collector = MetricsCollector(extra=self._metrics_extra)
        self.metrics = MetricsPublisher(self.collector, self._publish_metrics,
                                        lambda: self.link.connected, config.metrics.interval)
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(self.reload()))
        log.info("spotfi-bridge %s starting: router %s, broker %s, rpc backend %s, config from %s",
                 __version__, config.router.id, _public_url(config), self.rpc_backend_name,
                 ", ".join(config.sources) or "environment only")
        link_task = loop.create_task(self.link.run())
        await self._stop.wait()
        log.info("stopping")
        try:
            await asyncio.wait_for(self.shutdown(), SHUTDOWN_BUDGET + 1)
        except asyncio.TimeoutError:
            log.warning("shutdown took longer than %.1f s; exiting anyway", SHUTDOWN_BUDGET + 1)
        link_task.cancel()
        log.info("stopped")
        return 0

    def _build_workers(self, config: Config) -> None:
        backend = make_backend(config.rpc)
        self.rpc_backend_name = getattr(backend, "name", type(backend).__name__)
        self.terminal = SessionManager(config.terminal, self.link.publish, self.topics)
        self.rpc = RpcExecutor(config.rpc, self.link.publish, self.topics.rpc_response, backend,
                               info=self.info, sessions=self.terminal.sessions,
                               secrets=lambda: (self.config.router.token,))

    async def shutdown(self) -> None:
        """Sessions end (each told why), RPC children die, OFFLINE goes out, then disconnect."""
        self.metrics.stop()
        budget = SHUTDOWN_BUDGET
        started = time.monotonic()
        for name, coro in (("terminal sessions", self.terminal.shutdown()),
                           ("rpc", self.rpc.close())):
            try:
                await asyncio.wait_for(coro, max(0.1, budget / 2 - (time.monotonic() - started)))
            except asyncio.TimeoutError:
                log.warning("shutdown: %s did not finish in time", name)
            except Exception:
                log.exception("shutdown: %s failed", name)
        await self.link.close(flush_timeout=max(0.3, budget - (time.monotonic() - started)))

    def request_stop(self) -> None:
        self._stop.set()

    # ------------------------------------------------------------------ wiring

    def _dispatch(self, topic: str, payload: bytes) -> None:
        if topic == self.topics.rpc_request:
            self.rpc.handle(payload)
        elif topic == self.topics.x_in:
            self.terminal.handle(payload)
        else:
            self.stats["unexpected_topic"] += 1
            log.debug("ignored a message on unexpected topic %s", topic)

    def _on_connected(self) -> None:
        self.metrics.on_connected()

    def _on_subscribers(self, topic: str, present: bool) -> None:
        self.terminal.subscribers(topic, present)

    def _publish_metrics(self, payload: bytes) -> bool:
        return self.link.publish(self.topics.metrics, payload, qos=self.config.metrics.qos)

    def _metrics_extra(self) -> dict[str, Any]:
        return {"sessions": len(self.terminal), "bridgeUptime": int(time.monotonic() - self.started)}

    def info(self) -> dict[str, Any]:
        """What ``bridge info`` adds about the daemon (never the token)."""
        return {
            "version": __version__,
            "uptime": round(time.monotonic() - self.started, 1),
            "pid": os.getpid(),
            "python": sys.version.split()[0],
            "paho": mqtt_compat.PAHO_VERSION,
            "router": {"id": self.config.router.id, "name": self.config.router.name},
            "broker": _public_url(self.config),
            "backend": self.rpc_backend_name,
            "link": self.link.counters(),
            "terminal": {"sessions": len(self.terminal), **self.terminal.counters()},
            "metrics": {"sent": self.metrics.sent, "skipped": self.metrics.skipped,
                        "interval": self.metrics.interval},
            "daemon": dict(self.stats),
        }

    # ------------------------------------------------------------------ reload

    async def reload(self) -> None:
        """SIGHUP: re-read the config; reconnect only if connection settings changed."""
        try:
            config = load_config(self.config_path)
        except ConfigError as exc:
            self.stats["reload_errors"] += 1
            log.error("reload failed, keeping the running config: %s", exc)
            return
        self.stats["reloads"] += 1
        # the old token stays redacted too: it may still show up in late log lines
        logs.setup_logging(self.log_level_override or config.log_level,
                           [config.router.token, self.config.router.token])
        for warning in config.warnings:
            log.warning("%s", warning)
        if config.router.id != self.config.router.id:
            log.info("router id changed from %s to %s: ending sessions", self.config.router.id,
                     config.router.id)
            await self.terminal.shutdown("router id changed")
            await self.rpc.close()
            self.topics = Topics(config.router.id)
            self._build_workers(config)
        else:
            self.rpc.reconfigure(config.rpc)
            self.terminal.reconfigure(config.terminal)
        self.metrics.interval = config.metrics.interval
        changed = self.link.reconfigure(config)
        self.config = config
        log.info("config reloaded%s", " (reconnecting)" if changed else "")


def _public_url(config: Config) -> str:
    broker = config.mqtt.broker
    return f"{broker.scheme}://{broker.host}:{broker.port}{broker.ws_path}"


def run_daemon(config: Config, config_path: Optional[str], log_level: Optional[str]) -> int:
    daemon = Daemon(config, config_path, log_level)
    return asyncio.run(daemon.run())
