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
from typing import Any, Callable, Optional

from spotfi_bridge import __version__, aio, logs, mqtt_compat
from spotfi_bridge.config import Config, ConfigError, load_config
from spotfi_bridge.freshness import Delivery, Freshness
from spotfi_bridge.link import MqttLink
from spotfi_bridge.metrics import MetricsCollector, MetricsPublisher
from spotfi_bridge.protocol import Topics
from spotfi_bridge.rpc import RpcExecutor, make_backend
from spotfi_bridge.terminal import SessionManager
from spotfi_bridge.update import UpdatePaths, Updater

log = logging.getLogger("spotfi_bridge.daemon")

#: SIGTERM to exit: the whole shutdown must fit in procd's term_timeout.
SHUTDOWN_BUDGET = 2.5
#: sysexits.h EX_SOFTWARE: the exit status after an unexpected failure (procd respawns).
EX_SOFTWARE = 70
#: Tests only: seconds added to the router's wall clock as the age rule reads it, to play a
#: router whose clock is wrong (no RTC, NTP not synced yet). Never set on a router.
TEST_CLOCK_OFFSET_ENV = "SPOTFI_TEST_WALL_CLOCK_OFFSET"


def _wall_clock() -> Callable[[], float]:
    try:
        offset = float(os.environ.get(TEST_CLOCK_OFFSET_ENV, "0") or 0)
    except ValueError:
        offset = 0.0
    if not offset:
        return time.time
    log.warning("%s=%g: the age rule reads a wall clock %g s off (tests only)",
                TEST_CLOCK_OFFSET_ENV, offset, offset)
    return lambda: time.time() + offset


class Daemon:
    def __init__(self, config: Config, config_path: Optional[str] = None,
                 log_level_override: Optional[str] = None) -> None:
        self.config = config
        self.config_path = config_path
        self.log_level_override = log_level_override
        self.started = time.monotonic()
        self.stats: dict[str, int] = {"unexpected_topic": 0, "reloads": 0, "reload_errors": 0,
                                      "router_id_changes": 0}

    async def run(self) -> int:
        """Until SIGTERM (0) or a long-lived part fails (:data:`EX_SOFTWARE`, logged with its
        traceback): exiting non-zero is what makes procd respawn the bridge."""
        aio.install_child_watcher()
        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._failure: Optional[str] = None
        loop.set_exception_handler(self._loop_exception)
        config = self.config
        self.topics = Topics(config.router.id)
        self.freshness = Freshness(config.rpc.clock_skew, wall=_wall_clock())
        self.link = MqttLink(config, self._dispatch, on_connected=self._on_connected,
                             on_subscribers=self._on_subscribers)
        self.updater = Updater(config.update, UpdatePaths.from_environ(os.environ))
        self._build_workers(config)
        self.collector = MetricsCollector(extra=self._metrics_extra)
        self.metrics = MetricsPublisher(self.collector, self._publish_metrics,
                                        lambda: self.link.connected, config.metrics.interval,
                                        on_failure=self._task_failed)
        self._reload_wanted = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload_wanted.set)
        log.info("spotfi-bridge %s starting: router %s, broker %s, rpc backend %s, config from %s",
                 __version__, config.router.id, _public_url(config), self.rpc_backend_name,
                 ", ".join(config.sources) or "environment only")
        self.updater.log_last()
        long_lived = [self._supervise(loop.create_task(self.link.run(), name="link")),
                      self._supervise(loop.create_task(self._reloader(), name="reload"))]
        await self._stop.wait()
        log.info("stopping")
        try:
            await asyncio.wait_for(self.shutdown(), SHUTDOWN_BUDGET + 1)
        except asyncio.TimeoutError:
            log.warning("shutdown took longer than %.1f s; exiting anyway", SHUTDOWN_BUDGET + 1)
        for task in long_lived:
            task.cancel()
        if self._failure is not None:
            log.critical("stopped after a failure (%s): exit status %d, procd restarts the "
                         "bridge", self._failure, EX_SOFTWARE)
            return EX_SOFTWARE
        log.info("stopped")
        return 0

    # ------------------------------------------------------------------ failures

    def _supervise(self, task: asyncio.Task[None]) -> asyncio.Task[None]:
        """A task that must live as long as the daemon: its end, before a stop, is fatal."""
        task.add_done_callback(self._long_lived_done)
        return task

    def _long_lived_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or self._stop.is_set():
            if not task.cancelled() and task.exception() is not None:
                log.error("%s task failed while stopping", task.get_name(),
                          exc_info=task.exception())
            return
        exc = task.exception()
        if exc is None:
            exc = RuntimeError(f"the {task.get_name()} task ended on its own")
        self._task_failed(task.get_name(), exc)

    def _task_failed(self, what: str, exc: BaseException) -> None:
        """Log with the traceback and stop the daemon: a half-working bridge looks alive to
        procd but never reconnects, so it must die loudly instead."""
        if self._failure is None:
            self._failure = f"{what}: {type(exc).__name__}: {exc}"
            log.critical("unexpected failure in %s; stopping", what, exc_info=exc)
        else:
            log.error("another failure in %s", what, exc_info=exc)
        self._stop.set()

    def _loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """An exception that escaped a loop callback (a timer, a socket reader) is a bug in a
        long-lived part; anything else the loop reports is only logged."""
        exc = context.get("exception")
        if isinstance(exc, Exception) and "handle" in context:
            self._task_failed(f"callback {context['handle']!r}", exc)
            return
        loop.default_exception_handler(context)

    def _build_workers(self, config: Config) -> None:
        backend = make_backend(config.rpc)
        self.rpc_backend_name = getattr(backend, "name", type(backend).__name__)
        self.terminal = SessionManager(config.terminal, self.link.publish, self.topics,
                                       freshness=self.freshness)
        self.rpc = RpcExecutor(config.rpc, self.link.publish, self.topics.rpc_response, backend,
                               info=self.info, sessions=self.terminal.sessions,
                               secrets=lambda: (self.config.router.token,),
                               update=self.updater.start,
                               freshness=self.freshness)

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

    def _dispatch(self, topic: str, payload: bytes, delivery: Delivery) -> None:
        if topic == self.topics.rpc_request:
            self.rpc.handle(payload, delivery)
        elif topic == self.topics.x_in:
            self.terminal.handle(payload, delivery)
        else:
            self.stats["unexpected_topic"] += 1
            log.debug("ignored a message on unexpected topic %s", topic)

    def _on_connected(self) -> None:
        self.updater.mark_connected()
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
            "clock": self.freshness.info(),
            "terminal": {"sessions": len(self.terminal), **self.terminal.counters()},
            "metrics": {"sent": self.metrics.sent, "skipped": self.metrics.skipped,
                        "interval": self.metrics.interval},
            "daemon": dict(self.stats),
            "update": self.updater.info(),
        }

    # ------------------------------------------------------------------ reload

    async def _reloader(self) -> None:
        """One reload at a time: a SIGHUP during a reload asks for one more after it (signals
        that arrive meanwhile merge into that one; it reads the file as it is by then)."""
        while True:
            await self._reload_wanted.wait()
            self._reload_wanted.clear()
            await self.reload()

    async def reload(self) -> None:
        """SIGHUP: re-read the config; reconnect only if connection settings changed.
        Only :meth:`_reloader` calls it, so two reloads never interleave."""
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
            self.stats["router_id_changes"] += 1
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
        self.updater.config = config.update
        self.freshness.clock_skew = config.rpc.clock_skew
        changed = self.link.reconfigure(config)
        self.config = config
        log.info("config reloaded%s", " (reconnecting)" if changed else "")


def _public_url(config: Config) -> str:
    broker = config.mqtt.broker
    return f"{broker.scheme}://{broker.host}:{broker.port}{broker.ws_path}"


def run_daemon(config: Config, config_path: Optional[str], log_level: Optional[str]) -> int:
    daemon = Daemon(config, config_path, log_level)
    return asyncio.run(daemon.run())
