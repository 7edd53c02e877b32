"""``make bench``: the bridge measured against floors taken in the same run, as ratios.

One Mosquitto on loopback (``set_tcp_nodelay true``), the real daemon as a
subprocess with a fake ``ubus`` on PATH, a minimal MQTT client as the floor,
and a single-threaded API-side client that measures both. Every figure is the
median over ``BENCH_REPS`` (default 5, quick 3) repetitions, floors and bridge
interleaved inside each repetition so that machine noise hits both alike.

Environment: ``BENCH_QUICK=1`` (a ~1 minute smoke run), ``BENCH_IDLE_SECONDS``
(idle window, default 60), ``BENCH_REPS``, ``BENCH_SET`` (bridge config
overrides, e.g. ``terminal.batch_bytes=65536,terminal.qos=0``),
``BENCH_STRICT=1`` (exit 1 when a target is missed), ``BENCH_PROFILE=1`` (py-spy
profiles of the bridge, one per phase, summarised in the output and the JSON),
``BENCH_KEEP=1`` (keep the work directory with the bridge's and broker's logs),
``BENCH_ONLY=keys,bulk`` (some phases only: start, keys, bulk, rpc, concurrent,
multi, idle, outage), ``BENCH_BRIDGE_SRC=/path`` (run the bridge from another
source tree, e.g. a fix being tried, against the same floors).
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import os
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/run.py` as well as `python -m bench.run`
    sys.path.insert(0, str(ROOT))

from bench import procfs  # noqa: E402
from bench.api import Api, SessionSink, Sinks  # noqa: E402
from bench.fakeubus import write_fake_ubus  # noqa: E402
from bench.floors import (  # noqa: E402
    RELAY_STREAM_TOPIC,
    STREAM_CONTROL_TOPIC,
    FloorProcess,
    PtyEcho,
    drain_pty,
    drain_ptys,
    exec_floor,
    import_floor,
)
from bench.profile import Recording, find_py_spy, render, summarize  # noqa: E402
from bench.stats import Figure, compare, median, percentile, table  # noqa: E402
from spotfi_bridge import mqtt_compat, protocol  # noqa: E402
from spotfi_bridge.config import TerminalConfig  # noqa: E402
from spotfi_bridge.devtools.loopback import port_open  # noqa: E402
from spotfi_bridge.protocol import Topics  # noqa: E402
from tests.helpers.bridge import BridgeProcess  # noqa: E402
from tests.helpers.broker import Mosquitto  # noqa: E402

RESULTS = ROOT / "bench" / "results"
ROUTER_ID = "bench-router"
FLOOR_ID = "bench-floor"
API_OUT = "spotfi/api/bench/x/out"
FLOOR_OUT = "spotfi/api/bench-floor/x/out"
FLOOR_STREAM_OUT = "spotfi/api/bench-floor-stream/x/out"
RELAY_ID = "bench-relay"
RELAY_OUT = "spotfi/api/bench-relay/x/out"
RELAY_SESSION = "relay-keys"
SHELL = "/bin/sh"
END_COMMAND = 'echo BENCH-""END'  # the typed line's echo does not contain the marker
MB = 1e6
PHASES = ("start", "keys", "bulk", "rpc", "concurrent", "multi", "idle", "outage")


# --------------------------------------------------------------------------- settings


@dataclass
class Settings:
    quick: bool
    reps: int
    start_reps: int
    idle_seconds: float
    bulk_bytes: int
    multi_sessions: int
    multi_bytes: int
    keystrokes: int
    rpc_calls: int
    concurrent_rpcs: int
    outage_seconds: float
    outage_reps: int
    profile: bool = False
    only: tuple[str, ...] = ()
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)

    def wants(self, phase: str) -> bool:
        return not self.only or phase in self.only

    @classmethod
    def from_env(cls, quick_flag: bool = False) -> Settings:
        env = os.environ
        quick = quick_flag or env.get("BENCH_QUICK", "") not in ("", "0")
        settings = cls(
            quick=quick,
            reps=max(1, int(env.get("BENCH_REPS", "3" if quick else "5"))),
            start_reps=max(1, int(env.get("BENCH_REPS", "3" if quick else "9"))),
            idle_seconds=float(env.get("BENCH_IDLE_SECONDS", "10" if quick else "60")),
            bulk_bytes=(5 if quick else 20) * 1_000_000,
            multi_sessions=8,
            multi_bytes=(600_000 if quick else 2_500_000),
            keystrokes=100 if quick else 200,
            rpc_calls=50 if quick else 200,
            concurrent_rpcs=50,
            outage_seconds=3.0,
            outage_reps=1 if quick else 5,
        )
        settings.overrides = parse_overrides(env.get("BENCH_SET", ""))
        settings.profile = env.get("BENCH_PROFILE", "") not in ("", "0")
        settings.only = tuple(p.strip() for p in env.get("BENCH_ONLY", "").split(",") if p.strip())
        unknown = set(settings.only) - set(PHASES)
        if unknown:
            raise SystemExit(f"BENCH_ONLY: unknown phase(s) {', '.join(sorted(unknown))}; "
                             f"expected some of {', '.join(PHASES)}")
        return settings

    def terminal(self) -> TerminalConfig:
        """The terminal settings the bridge runs with (for the floors of the same shape)."""
        knobs = {k: v for k, v in self.overrides.get("terminal", {}).items()
                 if k in ("batch_bytes", "batch_delay_ms", "outbox_bytes", "qos")}
        return TerminalConfig(**knobs)


def parse_overrides(text: str) -> dict[str, dict[str, Any]]:
    """``section.key=value,...`` into TOML tables (ints, floats and booleans typed)."""
    result: dict[str, dict[str, Any]] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, raw = part.partition("=")
        section, dot, key = name.strip().partition(".")
        if not sep or not dot:
            raise SystemExit(f"BENCH_SET: expected section.key=value, got {part!r}")
        value: Any = raw.strip()
        for convert in (int, float):
            try:
                value = convert(value)
                break
            except ValueError:
                continue
        if value in ("true", "false"):
            value = value == "true"
        result.setdefault(section, {})[key] = value
    return result


def toml_text(tables: dict[str, dict[str, Any]]) -> str:
    lines = []
    for section, values in tables.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            lines.append(f"{key} = {json.dumps(value)}")
        lines.append("")
    return "\n".join(lines)


def seq_count_for(nbytes: int) -> int:
    """The N for which ``seq 1 N`` prints about ``nbytes`` bytes."""
    total, n, digits = 0, 0, 1
    while True:
        count = 9 * 10 ** (digits - 1)
        size = digits + 1
        if total + count * size >= nbytes:
            return n + (nbytes - total) // size
        total += count * size
        n += count
        digits += 1


def seq_bytes(n: int) -> bytes:
    """What ``seq 1 N`` looks like through a PTY in cooked mode (ONLCR: CR LF)."""
    out = subprocess.run(["seq", "1", str(n)], capture_output=True, check=True).stdout
    return out.replace(b"\n", b"\r\n")


def log(text: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {text}", flush=True)


def _children(pid: int) -> list[int]:
    found = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as handle:
                found += [int(p) for p in handle.read().split()]
    except OSError:
        pass
    return found


class BenchBridge(BridgeProcess):
    """The harness's bridge, optionally started under a wrapper (py-spy)."""

    prefix: tuple[str, ...] = ()

    def start(self) -> BenchBridge:
        if not self.prefix:
            super().start()
            return self
        with open(self.log_path, "ab") as log_file:
            self.proc = subprocess.Popen(
                [*self.prefix, sys.executable, "-m", "spotfi_bridge", "run", *self.args],
                env=self.env, stdout=log_file, stderr=log_file, stdin=subprocess.DEVNULL,
                cwd=str(self.dir))
        return self


# --------------------------------------------------------------------------- the bench


class Bench:
    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self.figures: list[Figure] = []
        self.raw: dict[str, Any] = {}
        self.problems: list[str] = []
        self.work = Path(tempfile.mkdtemp(prefix="spotfi-bench-"))
        self.ubus = write_fake_ubus(self.work / "bin")
        self.bridge_src = self.work / "src"
        self.profiles = self.work / "profiles"  # py-spy's raw stacks; the work dir is then kept
        self.profiles.mkdir()
        self.path = f"{self.ubus.parent}:/usr/sbin:{os.environ.get('PATH', '/usr/bin:/bin')}"
        self.topics = Topics(ROUTER_ID)
        self.floor_topics = Topics(FLOOR_ID)
        self.ids = itertools.count(1)
        self.broker: Optional[Mosquitto] = None
        self.api: Optional[Api] = None
        self.floor: Optional[FloorProcess] = None
        self.relay: Optional[FloorProcess] = None
        self.bridge: Optional[BridgeProcess] = None
        self.sinks = Sinks()
        self.floor_stream = Sinks()
        self.relay_sinks = Sinks()
        self.floor_echoes: list[float] = []
        self.status: list[tuple[bytes, float]] = []
        self.metrics_at: list[float] = []
        self.rpc_replies: dict[str, list[tuple[float, dict[str, Any]]]] = {}
        self.terminal = settings.terminal()
        tables: dict[str, dict[str, Any]] = {"terminal": {"shell": SHELL}, "rpc": {"backend": "ubus"}}
        for section, values in settings.overrides.items():
            tables.setdefault(section, {}).update(values)
        self.toml = toml_text(tables)
        self.cpu_at_online = math.nan
        self.fresh_rss_mb = math.nan  # the workload's bridge, idle after its first metrics
        self.py_spy: Optional[str] = None
        if settings.profile:
            self.py_spy = find_py_spy()
            if self.py_spy is None:
                raise SystemExit("BENCH_PROFILE=1 needs py-spy (pip install py-spy, or set "
                                 "BENCH_PY_SPY=/path/to/py-spy)")

    # ------------------------------------------------------------------ plumbing

    @property
    def a(self) -> Api:
        assert self.api is not None
        return self.api

    def bridge_env(self) -> dict[str, str]:
        return {"PATH": self.path, "SPOTFI_ENV_FILE": os.devnull, "SPOTFI_LOG_LEVEL": "info",
                "PYTHONPATH": str(self.bridge_src)}

    def new_bridge(self) -> BenchBridge:
        assert self.broker is not None
        return BenchBridge(self.broker.url, router_id=ROUTER_ID, token="bench-token",
                           toml=self.toml, env=self.bridge_env())

    def start_bridge(self) -> tuple[BridgeProcess, float]:
        """Start a bridge; returns it and the seconds from spawn to its retained ONLINE."""
        bridge = self.new_bridge()
        mark = len(self.status)
        started = time.perf_counter()
        bridge.start()
        try:
            at = self.wait_online(mark, 20, bridge)
        except Exception:
            bridge.close()
            raise
        self.cpu_at_online = procfs.cost_between(procfs.Snapshot({}, 0, 0),
                                                 procfs.snapshot(bridge.pid)).cpu_s
        return bridge, at - started

    def wait_online(self, mark: int, timeout: float, bridge: Optional[BridgeProcess] = None
                    ) -> float:
        """When the first ONLINE after ``self.status[mark]`` arrived."""
        def exited() -> bool:
            return bridge is not None and bridge.proc is not None and bridge.proc.poll() is not None

        self.a.pump(lambda: exited() or any(p == b"ONLINE" for p, _ in self.status[mark:]),
                    timeout, "ONLINE")
        if exited():
            assert bridge is not None
            raise RuntimeError(f"the bridge exited: {bridge.log()[-3000:]}")
        return next(t for p, t in self.status[mark:] if p == b"ONLINE")

    def wait_count(self, items: list[Any], mark: int, timeout: float, what: str) -> None:
        self.a.pump(lambda: len(items) > mark, timeout, what)

    def wait_replies(self, ids: list[str], timeout: float) -> None:
        self.a.pump(lambda: all(i in self.rpc_replies for i in ids), timeout, "every reply")

    def wait_ends(self, sinks: list[SessionSink], timeout: float) -> None:
        self.a.pump(lambda: all(s.end_at is not None for s in sinks), timeout,
                    "the end of every session's output")

    def stop_bridge(self, bridge: BridgeProcess) -> None:
        try:
            bridge.terminate(10)
        except subprocess.TimeoutExpired:
            bridge.kill()
            self.problems.append("the bridge did not exit within 10 s of SIGTERM")

    def setup(self) -> None:
        os.environ["PATH"] = self.path
        # Every bridge of the run comes from one snapshot of the source, taken now: the work
        # tree may be edited while the bench runs. Byte-compiled, because with
        # PYTHONDONTWRITEBYTECODE set (as in some CI and developer shells) each start would
        # compile it from source while the import floor's packages come precompiled from
        # pip; a router runs from .pyc too.
        source = Path(os.environ.get("BENCH_BRIDGE_SRC") or ROOT) / "spotfi_bridge"
        shutil.copytree(source, self.bridge_src / "spotfi_bridge",
                        ignore=shutil.ignore_patterns("__pycache__"))
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(self.bridge_src)],
                       check=True, stdout=subprocess.DEVNULL)
        (self.work / "broker").mkdir()
        self.broker = Mosquitto(workdir=str(self.work / "broker")).start()
        self.api = Api(self.broker.port, "bench-api")
        self.a.on(self.topics.status, lambda p, at: self.status.append((p, at)))
        self.a.on(self.topics.metrics, lambda p, at: self.metrics_at.append(at))
        self.a.on(API_OUT, self.sinks)
        self.a.on(self.topics.x_out, self.sinks)
        self.a.on(self.topics.rpc_response, self._rpc_reply)
        self.a.on(self.floor_topics.rpc_response, self._rpc_reply)
        self.a.on(FLOOR_OUT, lambda p, at: self.floor_echoes.append(at))
        self.a.on(FLOOR_STREAM_OUT, self.floor_stream)
        self.a.on(RELAY_OUT, self.relay_sinks)
        self.floor = FloorProcess(self.broker.port, FLOOR_ID, FLOOR_OUT)

    def teardown(self) -> None:
        bridge, floor, relay, api, broker = self.bridge, self.floor, self.relay, self.api, self.broker
        actions: list[Callable[[], None]] = []
        if bridge is not None:
            actions.append(lambda: self.stop_bridge(bridge))
        actions += [c.close for c in (floor, relay, api, broker) if c is not None]
        for action in actions:
            try:
                action()
            except Exception as exc:
                log(f"teardown: {exc}")
        if os.environ.get("BENCH_KEEP", "") in ("", "0") and not self.py_spy:
            shutil.rmtree(self.work, ignore_errors=True)
        else:
            log(f"kept the work directory {self.work}")

    def _rpc_reply(self, payload: bytes, at: float) -> None:
        try:
            message = json.loads(payload)
        except ValueError:
            return
        if isinstance(message, dict):
            self.rpc_replies.setdefault(str(message.get("id")), []).append((at, message))

    def add(self, figure: Figure) -> Figure:
        self.figures.append(figure)
        return figure

    def phase(self, name: str, body: Callable[[], None], figures: list[tuple[str, str]]) -> None:
        """Run one phase; if it breaks, its figures are recorded as failed with the reason."""
        log(f"{name}...")
        started = time.monotonic()
        recording = None
        if self.py_spy and self.bridge is not None and self.bridge.proc is not None:
            slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
            recording = Recording(self.py_spy, self.bridge.pid, self.profiles / f"{slug}.txt")
        try:
            body()
        except Exception as exc:
            traceback.print_exc()
            reason = f"{type(exc).__name__}: {exc}"
            self.problems.append(f"{name}: {reason}")
            known = {f.name for f in self.figures}
            for fig_name, unit in figures:
                if fig_name not in known:
                    self.add(Figure(fig_name, math.nan, unit, ok=False, note="phase failed"))
        finally:
            if recording is not None:
                self.keep_profile(name, recording.stop())
        self.raw.setdefault("phase_seconds", {})[name] = round(time.monotonic() - started, 2)

    def keep_profile(self, name: str, path: Optional[Path]) -> None:
        if path is None:
            self.problems.append(f"py-spy wrote no profile for {name}")
            return
        summary = summarize(path)
        self.raw.setdefault("profiles", {})[name] = {"file": str(path), **summary}
        print(render(name, summary), flush=True)

    def profile_start(self) -> None:
        """One more start, under ``py-spy record`` from exec to ONLINE."""
        assert self.py_spy is not None
        out = self.profiles / "start.txt"
        bridge = self.new_bridge()
        bridge.prefix = (self.py_spy, "record", "--rate", "1000", "--format", "raw", "-o",
                         str(out), "--")
        mark = len(self.status)
        bridge.start()
        try:
            self.wait_online(mark, 30)
        finally:
            child = _children(bridge.pid)
            for pid in child:  # SIGKILL: no shutdown in the samples; py-spy then writes its file
                os.kill(pid, signal.SIGKILL)
            try:
                bridge.proc.wait(20) if bridge.proc is not None else None
            except subprocess.TimeoutExpired:
                bridge.kill()
        self.keep_profile("start to ONLINE", out if out.exists() else None)

    # ------------------------------------------------------------------ sessions

    def open_session(self, cols: int = 200, rows: int = 50) -> SessionSink:
        sid = f"{ROUTER_ID}-{int(time.time() * 1000)}-{next(self.ids)}"
        sink = self.sinks.add(SessionSink(sid))
        self.a.publish(self.topics.x_in, protocol.api_x_start(sid, API_OUT, cols=cols, rows=rows))
        self.a.pump(lambda: sink.started_at is not None or bool(sink.errors), 10, "x-started")
        if sink.errors:
            raise RuntimeError(f"x-start refused: {sink.errors[0]}")
        self.a.pump(lambda: sink.nbytes > 0, 10, "the shell's prompt")
        self.a.pump(None, 0.05)  # the rest of the prompt, if any
        return sink

    def type(self, sink: SessionSink, text: bytes) -> float:
        return self.a.publish(self.topics.x_in, protocol.api_x_data(sink.session_id, text))

    def close_session(self, sink: SessionSink) -> None:
        """``exit`` in the shell, then wait for the bridge's exit report."""
        mark = len(sink.errors)
        self.type(sink, b"exit\n")
        try:
            self.a.pump(lambda: len(sink.errors) > mark, 10, "the session's exit")
        except Exception:
            self.a.publish(self.topics.x_in, protocol.api_x_stop(sink.session_id))
            self.a.pump(lambda: len(sink.errors) > mark, 5, "the session's end after x-stop")
        self.sinks.by_id.pop(sink.session_id, None)

    # ------------------------------------------------------------------ phases

    def run(self) -> None:
        self.setup()
        phases: list[tuple[str, str, Callable[[], None], list[tuple[str, str]]]] = [
            ("keys", "keystroke echo", self.bench_keystrokes,
             [("keystroke echo p50", "ms"), ("keystroke echo p99", "ms"),
              ("keystroke CPU of the bridge (in and out)", "us/key")]),
            ("bulk", "bulk output", self.bench_bulk, [("bulk output", "MB/s")]),
            ("rpc", "rpc round trips", self.bench_rpc,
             [("rpc bridge ping p50", "ms"), ("rpc system info p50", "ms")]),
            ("concurrent", "50 concurrent rpcs", self.bench_concurrent,
             [(f"{self.s.concurrent_rpcs} concurrent rpcs", "ms")]),
            ("multi", "8 sessions streaming", self.bench_multi,
             [(f"{self.s.multi_sessions} sessions aggregate", "MB/s")]),
            ("idle", "idle cost", self.bench_idle,
             [("idle CPU", "ms/min"), ("idle context switches", "1/s")]),
            ("outage", "broker outage", self.bench_outage,
             [(f"ONLINE after {self.s.outage_seconds:g} s outage", "ms")]),
        ]
        try:
            if self.s.wants("start"):
                self.phase("start to ONLINE, idle RSS", self.bench_start,
                           [("start to ONLINE", "ms"), ("RSS idle", "MB")])
                if self.py_spy:
                    self.phase("start-up profile", self.profile_start, [])
            if self.bridge is None:
                self.bridge, _ = self.start_bridge()
                mark = len(self.metrics_at)
                self.wait_count(self.metrics_at, mark, 15, "the first metrics")
                self.a.pump(None, 0.3)
                self.fresh_rss_mb = procfs.memory_kib(self.bridge.pid)["VmRSS"] / 1024
            else:  # the last start's bridge carries on
                self.fresh_rss_mb = self.raw["start"]["rss_mb"][-1]
            self.raw["bridge_threads_at_start"] = procfs.thread_names(self.bridge.pid)
            for key, name, body, figures in phases:
                if key == "idle" and self.s.wants("idle"):
                    self.raw["bridge_info"] = self.bridge_info()
                if self.s.wants(key):
                    self.phase(name, body, figures)
            self.raw["bridge_log_tail"] = self.bridge.log()[-4000:]
        finally:
            self.teardown()

    # start-up and memory ------------------------------------------------------

    def bench_start(self) -> None:
        env = dict(os.environ)
        env.update(self.new_bridge().env)  # the interpreter and paths the bridge gets
        import_floor(env)  # warm the page cache for both
        starts, imports, rss, rss_floor, cpu, cpu_floor = [], [], [], [], [], []
        lean_imports, lean_rss_floor = [], []  # paho's urllib.request deferred, as the bridge
        for rep in range(self.s.start_reps):
            seconds, kib, cpu_seconds = import_floor(env)
            imports.append(seconds * 1000)
            rss_floor.append(kib / 1024)
            cpu_floor.append(cpu_seconds * 1000)
            seconds, kib, _ = import_floor(env, deferred=True)
            lean_imports.append(seconds * 1000)
            lean_rss_floor.append(kib / 1024)
            bridge, online = self.start_bridge()
            starts.append(online * 1000)
            cpu.append(self.cpu_at_online * 1000)
            mark = len(self.metrics_at)
            self.wait_count(self.metrics_at, mark, 15, "the first metrics")
            self.a.pump(None, 0.3)  # let the first metrics round finish its children
            rss.append(procfs.memory_kib(bridge.pid)["VmRSS"] / 1024)
            if rep == self.s.start_reps - 1:
                self.bridge = bridge
            else:
                self.stop_bridge(bridge)
        self.raw["start"] = {"online_ms": starts, "import_ms": imports, "rss_mb": rss,
                             "import_rss_mb": rss_floor, "cpu_ms": cpu, "import_cpu_ms": cpu_floor,
                             "deferred_import_ms": lean_imports,
                             "deferred_import_rss_mb": lean_rss_floor}
        self.add(Figure("start to ONLINE", median(starts), "ms", median(imports), "max_over", 20,
                        reps=starts, rep_floors=imports))
        self.add(Figure("start to ONLINE over the lean floor", median(starts), "ms",
                        median(lean_imports), reps=starts, rep_floors=lean_imports,
                        note="floor: paho's urllib.request deferred too"))
        self.add(Figure("start CPU to ONLINE", median(cpu), "ms", median(cpu_floor), reps=cpu,
                        rep_floors=cpu_floor, note="floor: CPU of the import alone"))
        self.add(Figure("RSS idle", median(rss), "MB", median(rss_floor), "max_over", 1, reps=rss,
                        rep_floors=rss_floor))
        self.add(Figure("RSS idle over the lean floor", median(rss), "MB", median(lean_rss_floor),
                        reps=rss, rep_floors=lean_rss_floor,
                        note=f"+{median([a - b for a, b in zip(rss, lean_rss_floor)]):.2f} MB; "
                             "floor: paho's urllib.request deferred too"))

    # keystrokes ---------------------------------------------------------------

    def _bridge_key(self, sink: SessionSink, key: bytes, echo: bytes) -> float:
        mark = len(sink.chunks)
        sent = self.type(sink, key)
        self.a.pump(lambda: sink.output(mark).endswith(echo), 5, f"the echo of {key!r}")
        return sink.chunks[-1].at - sent

    def _floor_key(self, key: bytes) -> float:
        mark = len(self.floor_echoes)
        sent = self.a.publish(self.floor_topics.x_in, protocol.api_x_data("floor-keys", key))
        self.a.pump(lambda: len(self.floor_echoes) > mark, 5, "the floor's echo")
        return self.floor_echoes[mark] - sent

    def _relay_key(self, sink: SessionSink, key: bytes, echo: bytes) -> float:
        mark = len(sink.chunks)
        sent = self.a.publish(Topics(RELAY_ID).x_in, protocol.api_x_data(RELAY_SESSION, key))
        self.a.pump(lambda: sink.output(mark).endswith(echo), 5, f"the relay's echo of {key!r}")
        return sink.chunks[-1].at - sent

    def _learn_echoes(self, keys: tuple[bytes, ...], chunks: list[Any],
                      send: Callable[[bytes], Any], output: Callable[[int], bytes]
                      ) -> dict[bytes, bytes]:
        """What the shell prints for each key (its echo), typed a few times."""
        echoes: dict[bytes, bytes] = {}
        for _ in range(3):
            for key in keys:
                mark = len(chunks)
                send(key)
                self.wait_count(chunks, mark, 5, "an echo")
                self.a.pump(None, 0.05)
                echoes[key] = output(mark)
        return echoes

    def relay_floor(self) -> FloorProcess:
        """The minimal terminal (``bench.floors relay``), started on first use."""
        if self.relay is None:
            assert self.broker is not None
            self.relay = FloorProcess(self.broker.port, RELAY_ID, RELAY_OUT,
                                      relay_qos=self.terminal.qos, shell=SHELL)
        return self.relay

    def bench_keystrokes(self) -> None:
        assert self.bridge is not None
        relay = self.relay_floor()
        sink = self.open_session()
        relay_sink = self.relay_sinks.add(SessionSink(RELAY_SESSION))
        keys = (b"a", b"\x7f")  # type a letter, erase it: the line never grows
        echoes = self._learn_echoes(keys, sink.chunks, lambda k: self.type(sink, k), sink.output)
        relay_topic = Topics(RELAY_ID).x_in
        relay_echoes = self._learn_echoes(
            keys, relay_sink.chunks,
            lambda k: self.a.publish(relay_topic, protocol.api_x_data(RELAY_SESSION, k)),
            relay_sink.output)
        pty = PtyEcho(SHELL)
        for _ in range(10):  # warm-up
            for key in keys:
                self._bridge_key(sink, key, echoes[key])
                self._floor_key(key)
                self._relay_key(relay_sink, key, relay_echoes[key])
                pty.sample(key, len(echoes[key]))
        per_rep: dict[str, list[list[float]]] = {"bridge": [], "floor": [], "pty": [],
                                                 "relay": []}
        cpu: dict[str, list[float]] = {"bridge": [], "relay": []}  # CPU microseconds per key
        for _rep in range(self.s.reps):
            samples: dict[str, list[float]] = {who: [] for who in per_rep}
            before = {"bridge": procfs.snapshot(self.bridge.pid),
                      "relay": procfs.snapshot(relay.pid)}
            for i in range(self.s.keystrokes):
                key = keys[i % 2]
                order = ["bridge", "floor", "relay"]
                turn = (i // 2) % 3
                for who in order[turn:] + order[:turn]:
                    if who == "bridge":
                        samples[who].append(self._bridge_key(sink, key, echoes[key]))
                    elif who == "floor":
                        samples[who].append(self._floor_key(key))
                    else:
                        samples[who].append(self._relay_key(relay_sink, key, relay_echoes[key]))
                samples["pty"].append(pty.sample(key, len(echoes[key])))
            for who, pid in (("bridge", self.bridge.pid), ("relay", relay.pid)):
                used = procfs.cost_between(before[who], procfs.snapshot(pid)).cpu_s
                cpu[who].append(used * 1e6 / self.s.keystrokes)
            for who in per_rep:
                per_rep[who].append([x * 1000 for x in samples[who]])
        pty.close()
        self.close_session(sink)
        self.relay_sinks.by_id.pop(RELAY_SESSION, None)

        def stat(who: str, q: float) -> tuple[float, list[float]]:
            values = [percentile(samples, q) for samples in per_rep[who]]
            return median(values), values

        self.raw["keystroke"] = {who: {f"p{q}": stat(who, q)[1] for q in (50, 95, 99)}
                                 for who in per_rep}
        self.raw["keystroke"]["cpu_us_per_key"] = cpu
        self.raw["keystroke"]["echo_bytes"] = {k.decode("latin-1"): v.decode("latin-1")
                                               for k, v in echoes.items()}
        for q, kind, limit in ((50, "max_ratio", 1.3), (95, "info", None), (99, "max_ratio", 2.0)):
            value, reps = stat("bridge", q)
            floor_value, floor_reps = stat("floor", q)
            self.add(Figure(f"keystroke echo p{q}", value, "ms", floor_value, kind, limit, reps=reps,
                            rep_floors=floor_reps))
        self.add(Figure("PTY's own echo p50", stat("pty", 50)[0], "ms", stat("floor", 50)[0]))
        value, reps = stat("relay", 50)
        self.add(Figure("keystroke echo via the PTY relay p50", value, "ms", stat("floor", 50)[0],
                        reps=reps, rep_floors=stat("floor", 50)[1],
                        note="floor: broker echo; the relay is the CPU floor below"))
        self.add(Figure("keystroke CPU of the bridge (in and out)", median(cpu["bridge"]), "us/key",
                        median(cpu["relay"]), "max_ratio", 1.5, reps=cpu["bridge"],
                        rep_floors=cpu["relay"], note="floor: the minimal PTY relay"))

    # bulk output --------------------------------------------------------------

    def _verify_stream(self, sink: SessionSink, expected: bytes, start_chunk: int = 0) -> list[str]:
        problems = sink.seq_problems()
        out = sink.output(start_chunk)
        begin = out.find(b"\r\n1\r\n")
        if begin < 0:
            return [*problems, "the first line of seq output was not found"]
        begin += 2
        body = out[begin:begin + len(expected)]
        if body != expected:
            at = next((i for i, (x, y) in enumerate(zip(body, expected)) if x != y),
                      min(len(body), len(expected)))
            problems.append(f"output differs from seq at byte {at} of {len(expected)} "
                            f"(got {len(body)} bytes): {body[max(0, at - 20):at + 20]!r}")
        elif not out[begin + len(expected):].startswith(b"BENCH-END"):
            problems.append("extra bytes between the last seq line and the end marker")
        return problems

    def _bridge_bulk(self, sink: SessionSink, count: int) -> float:
        sink.arm()
        started = self.type(sink, f"seq 1 {count} | cat; {END_COMMAND}\n".encode())
        self.a.pump(lambda: sink.end_at is not None, 300, "the end of the bulk output")
        assert sink.end_at is not None
        return sink.end_at - started

    def _floor_bulk(self, session_id: str, stream_file: Path, expected: bytes
                    ) -> tuple[float, list[str]]:
        sink = self.floor_stream.add(SessionSink(session_id))
        spec = {"file": str(stream_file), "chunk": self.terminal.batch_bytes,
                "session": session_id, "topic": FLOOR_STREAM_OUT, "qos": self.terminal.qos}
        started = self.a.publish(STREAM_CONTROL_TOPIC, json.dumps(spec).encode())
        self.a.pump(lambda: sink.end_at is not None, 300, "the end of the floor's stream")
        assert sink.end_at is not None
        self.floor_stream.by_id.pop(session_id)
        return sink.end_at - started, self._verify_stream(sink, expected)

    def _relay_bulk(self, session_id: str, count: int, expected: bytes) -> tuple[float, list[str]]:
        """The minimal terminal publishing ``seq`` read from its own PTY, in chunks."""
        sink = self.relay_sinks.add(SessionSink(session_id))
        spec = {"command": [SHELL, "-c", f"echo; seq 1 {count} | cat; {END_COMMAND}"],
                "chunk": self.terminal.batch_bytes, "session": session_id, "topic": RELAY_OUT}
        started = self.a.publish(RELAY_STREAM_TOPIC, json.dumps(spec).encode())
        self.a.pump(lambda: sink.end_at is not None, 300, "the end of the relay's stream")
        assert sink.end_at is not None
        self.relay_sinks.by_id.pop(session_id)
        return sink.end_at - started, self._verify_stream(sink, expected)

    def bench_bulk(self) -> None:
        count = seq_count_for(self.s.bulk_bytes)
        expected = seq_bytes(count)
        stream_file = self.work / "stream.bin"
        stream_file.write_bytes(b"\r\n" + expected + b"BENCH-END\r\n")
        batch = self.terminal.batch_bytes
        rates: dict[str, list[float]] = {"bridge": [], "pty": [], "mqtt": [], "relay": []}
        problems: list[str] = []
        message_sizes: list[int] = []
        assert self.bridge is not None
        # CPU ms per MB
        cpu: dict[str, list[float]] = {"bridge": [], "pty": [], "mqtt": [], "relay": []}
        assert self.floor is not None
        relay = self.relay_floor()
        for rep in range(self.s.reps):
            order = ["bridge", "pty", "mqtt", "relay"]
            order = order[rep % 4:] + order[:rep % 4]
            for who in order:
                if who == "pty":
                    before_self = resource.getrusage(resource.RUSAGE_SELF)
                    out, seconds = drain_pty([SHELL, "-c", f"seq 1 {count} | cat"])
                    after_self = resource.getrusage(resource.RUSAGE_SELF)
                    used = (after_self.ru_utime - before_self.ru_utime
                            + after_self.ru_stime - before_self.ru_stime)
                    if out != expected:
                        problems.append(f"pty floor: got {len(out)} bytes, not the seq output")
                elif who == "mqtt":
                    before = procfs.snapshot(self.floor.pid)
                    seconds, found = self._floor_bulk(f"floor-bulk-{rep}", stream_file, expected)
                    used = procfs.cost_between(before, procfs.snapshot(self.floor.pid)).cpu_s
                    problems += [f"mqtt floor: {p}" for p in found]
                elif who == "relay":
                    before = procfs.snapshot(relay.pid)
                    seconds, found = self._relay_bulk(f"relay-bulk-{rep}", count, expected)
                    used = procfs.cost_between(before, procfs.snapshot(relay.pid)).cpu_s
                    problems += [f"relay floor: {p}" for p in found]
                else:
                    sink = self.open_session()
                    before = procfs.snapshot(self.bridge.pid)
                    seconds = self._bridge_bulk(sink, count)
                    used = procfs.cost_between(before, procfs.snapshot(self.bridge.pid)).cpu_s
                    first = sink.watch_from
                    problems += [f"bridge: {p}" for p in self._verify_stream(sink, expected, first)]
                    message_sizes += [len(c.data) for c in sink.chunks[first:]]
                    self.close_session(sink)
                rates[who].append(len(expected) / MB / seconds)
                cpu[who].append(used * 1000 / (len(expected) / MB))
        memory = procfs.memory_kib(self.bridge.pid)
        floor = min(median(rates["pty"]), median(rates["mqtt"]))
        rep_floors = [min(p, m) for p, m in zip(rates["pty"], rates["mqtt"])]
        self.raw["bulk"] = {"bytes": len(expected), "seq_count": count, "mb_per_s": rates,
                            "bridge_messages": len(message_sizes),
                            "bridge_mean_message_bytes": (sum(message_sizes) / len(message_sizes)
                                                          if message_sizes else 0),
                            "floor_message_bytes": batch, "problems": problems,
                            "cpu_ms_per_mb": cpu,
                            "bridge_memory_kib": memory}
        self.add(Figure("bulk output", median(rates["bridge"]), "MB/s", floor, "min_ratio", 0.8,
                        ok=not any(p.startswith("bridge") for p in problems),
                        note="" if not problems else "lost/reordered bytes", reps=rates["bridge"],
                        rep_floors=rep_floors))
        self.add(Figure("bulk floor: bare PTY reader", median(rates["pty"]), "MB/s",
                        reps=rates["pty"]))
        self.add(Figure("bulk floor: minimal MQTT publisher", median(rates["mqtt"]), "MB/s",
                        reps=rates["mqtt"]))
        self.add(Figure("bulk floor: minimal PTY publisher", median(rates["relay"]), "MB/s",
                        reps=rates["relay"]))
        # the least a bridge can spend: the minimal terminal reading the same command from
        # its PTY and publishing it in the same chunks, in the same repetition
        self.add(Figure("bulk CPU of the bridge per MB", median(cpu["bridge"]), "ms/MB",
                        median(cpu["relay"]), "max_ratio", 1.2, reps=cpu["bridge"],
                        rep_floors=cpu["relay"],
                        note=f"floor: minimal PTY publisher; bare PTY reader "
                             f"{median(cpu['pty']):.1f}, file-fed publisher "
                             f"{median(cpu['mqtt']):.1f} ms/MB"))
        rss_floor = median(self.raw.get("start", {}).get("import_rss_mb", [math.nan]))
        self.add(Figure("RSS peak during bulk", memory["VmHWM"] / 1024, "MB", rss_floor))

    # rpc ----------------------------------------------------------------------

    def _rpc(self, topics: Topics, path: str, method: str) -> tuple[float, dict[str, Any]]:
        req_id = f"cmd_{int(time.time())}_bench_{next(self.ids)}"
        sent = self.a.publish(topics.rpc_request, protocol.api_rpc_request(req_id, path, method, {}))
        self.a.pump(lambda: req_id in self.rpc_replies, 30, f"the reply to {path} {method}")
        at, message = self.rpc_replies[req_id][0]
        return at - sent, message

    def bench_rpc(self) -> None:
        ubus_argv = [str(self.ubus), "-S", "-t", "30", "--", "call", "system", "info", "{}"]
        for _ in range(10):  # warm-up
            self._rpc(self.floor_topics, "bridge", "ping")
            self._rpc(self.topics, "bridge", "ping")
            self._rpc(self.topics, "system", "info")
            exec_floor(ubus_argv)
        names = ("floor", "ping", "info", "exec")
        per_rep: dict[str, list[list[float]]] = {name: [] for name in names}
        errors: list[str] = []
        for _rep in range(self.s.reps):
            samples: dict[str, list[float]] = {name: [] for name in names}
            for i in range(self.s.rpc_calls):
                order = names[i % 4:] + names[:i % 4]
                for name in order:
                    if name == "exec":
                        samples[name].append(exec_floor(ubus_argv) * 1000)
                        continue
                    topics = self.floor_topics if name == "floor" else self.topics
                    path, method = ("system", "info") if name == "info" else ("bridge", "ping")
                    seconds, reply = self._rpc(topics, path, method)
                    if name != "floor" and reply.get("status") != "success":
                        errors.append(f"{path} {method}: {reply.get('error')}")
                    samples[name].append(seconds * 1000)
            for name in names:
                per_rep[name].append(samples[name])

        def stat(name: str, q: float) -> tuple[float, list[float]]:
            values = [percentile(s, q) for s in per_rep[name]]
            return median(values), values

        self.raw["rpc"] = {name: {f"p{q}": stat(name, q)[1] for q in (50, 95)} for name in names}
        self.raw["rpc"]["errors"] = errors[:10]
        ok = not errors
        for q in (50, 95):
            value, reps = stat("ping", q)
            floor, floor_reps = stat("floor", q)
            self.add(Figure(f"rpc bridge ping p{q}", value, "ms", floor,
                            "max_ratio" if q == 50 else "info", 1.5 if q == 50 else None,
                            ok=ok, reps=reps, rep_floors=floor_reps))
        # system info's floor: the fake ubus's exec time plus the broker's round trip, same reps
        floors = [a + b for a, b in zip(stat("exec", 50)[1], stat("floor", 50)[1])]
        value, reps = stat("info", 50)
        self.add(Figure("rpc system info p50", value, "ms", median(floors), "max_over", 0.5,
                        ok=ok, reps=reps, rep_floors=floors))
        floors95 = [a + b for a, b in zip(stat("exec", 95)[1], stat("floor", 95)[1])]
        value, reps = stat("info", 95)
        self.add(Figure("rpc system info p95", value, "ms", median(floors95), ok=ok, reps=reps,
                        rep_floors=floors95))
        self.add(Figure("fake ubus exec p50", stat("exec", 50)[0], "ms"))

    def bench_concurrent(self) -> None:
        walls: list[float] = []
        problems: list[str] = []
        for _rep in range(self.s.reps):
            ids = [f"cmd_{int(time.time())}_conc_{next(self.ids)}" for _ in range(self.s.concurrent_rpcs)]
            started = time.perf_counter()
            for req_id in ids:
                self.a.publish(self.topics.rpc_request,
                               protocol.api_rpc_request(req_id, "system", "info", {}))
            self.wait_replies(ids, 60)
            walls.append((max(self.rpc_replies[i][0][0] for i in ids) - started) * 1000)
            self.a.pump(None, 0.2)  # a duplicate would arrive now
            for req_id in ids:
                replies = self.rpc_replies[req_id]
                if len(replies) != 1:
                    problems.append(f"{req_id} answered {len(replies)} times")
                if replies[0][1].get("status") != "success":
                    problems.append(f"{req_id}: {replies[0][1].get('error')}")
        self.raw["concurrent"] = {"wall_ms": walls, "problems": problems[:10]}
        self.add(Figure(f"{self.s.concurrent_rpcs} concurrent rpcs", median(walls), "ms",
                        ok=not problems, note="" if not problems else "ids lost or repeated",
                        reps=walls))

    # several sessions ---------------------------------------------------------

    def bench_multi(self) -> None:
        count = seq_count_for(self.s.multi_bytes)
        expected = seq_bytes(count)
        aggregates, fairness, floors = [], [], []
        problems: list[str] = []
        assert self.bridge is not None
        for _rep in range(self.s.reps):
            drained = drain_ptys([SHELL, "-c", f"seq 1 {count} | cat"], self.s.multi_sessions)
            floors.append(len(expected) * len(drained) / MB / max(t for _, t in drained))
            if any(out != expected for out, _ in drained):
                problems.append("parallel pty floor: output is not the seq output")
            sinks = [self.open_session() for _ in range(self.s.multi_sessions)]
            for sink in sinks:
                sink.arm()
            command = f"seq 1 {count} | cat; {END_COMMAND}\n".encode()
            started = time.perf_counter()
            for sink in sinks:
                self.type(sink, command)
            self.wait_ends(sinks, 300)
            ends = [s.end_at - started for s in sinks if s.end_at is not None]
            aggregates.append(len(expected) * len(sinks) / MB / max(ends))
            rates = [len(expected) / MB / e for e in ends]
            fairness.append(min(rates) / max(rates))
            for sink in sinks:
                problems += self._verify_stream(sink, expected, sink.watch_from)
                self.close_session(sink)
        memory = procfs.memory_kib(self.bridge.pid)
        self.raw["multi"] = {"sessions": self.s.multi_sessions, "bytes_each": len(expected),
                             "aggregate_mb_per_s": aggregates, "fairness": fairness,
                             "problems": problems[:10], "bridge_memory_kib": memory}
        self.raw["multi"]["pty_floor_mb_per_s"] = floors
        self.add(Figure(f"{self.s.multi_sessions} sessions aggregate", median(aggregates), "MB/s",
                        median(floors), ok=not problems, note="" if not problems else "lost/reordered bytes",
                        reps=aggregates, rep_floors=floors))
        self.add(Figure(f"{self.s.multi_sessions} sessions fairness min/max", median(fairness), "x",
                        reps=fairness))
        rss_floor = median(self.raw.get("start", {}).get("import_rss_mb", [math.nan]))
        self.add(Figure("RSS peak overall", memory["VmHWM"] / 1024, "MB", rss_floor))

    def bridge_info(self) -> Any:
        try:
            _seconds, reply = self._rpc(self.topics, "bridge", "info")
            return reply.get("result")
        except Exception as exc:
            return f"bridge info failed: {exc}"

    # idle -----------------------------------------------------------------------

    def bench_idle(self) -> None:
        assert self.bridge is not None
        pid = self.bridge.pid
        self.a.pump(None, 2.0)  # let the last session's end settle
        metrics_before = len(self.metrics_at)
        before = procfs.snapshot(pid)
        started = time.monotonic()
        self.a.pump(None, self.s.idle_seconds)
        after = procfs.snapshot(pid)
        elapsed = time.monotonic() - started
        cost = procfs.cost_between(before, after)
        cpu_per_min = cost.cpu_s * 1000 * 60 / elapsed
        switches = cost.switches / elapsed
        memory = procfs.memory_kib(pid)
        self.raw["idle"] = {"seconds": elapsed, "cpu_s": cost.cpu_s, "switches": cost.switches,
                            "threads": procfs.thread_names(pid),
                            "children_cpu_s": cost.children_cpu_s,
                            "metrics_published": len(self.metrics_at) - metrics_before,
                            "rss_after_workload_kib": memory["VmRSS"]}
        note = f"{elapsed:.0f} s window"
        self.add(Figure("idle CPU", cpu_per_min, "ms/min", None, "max_abs", 10, note=note))
        self.add(Figure("idle context switches", switches, "1/s", None, "max_abs", 0.5, note=note))
        self.add(Figure("RSS idle after the workload", memory["VmRSS"] / 1024, "MB",
                        self.fresh_rss_mb, "max_over", 1,
                        note="floor: the same bridge idle before it"))

    # broker outage --------------------------------------------------------------

    def _broker_back(self) -> float:
        """Start the broker again; the moment its port accepts connections."""
        broker = self.broker
        assert broker is not None
        from tests.helpers.broker import mosquitto_binary

        with open(broker.log_path, "ab") as log_file:
            broker.proc = subprocess.Popen([mosquitto_binary(), "-c", str(broker.dir / "mosquitto.conf")],
                                           stdout=log_file, stderr=log_file, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not port_open(broker.port):
            if broker.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("mosquitto did not come back")
            time.sleep(0.001)
        return time.perf_counter()

    def bench_outage(self) -> None:
        assert self.broker is not None
        for floor in (self.floor, self.relay):  # not needed any more, would not reconnect
            if floor is not None:
                floor.close()
        self.floor = self.relay = None
        values: list[float] = []
        for rep in range(self.s.outage_reps):
            if rep:  # each rep on a fresh bridge: the link's backoff remembers recent outages
                assert self.bridge is not None
                self.stop_bridge(self.bridge)
                self.bridge, _ = self.start_bridge()
            values.append(self._outage())
        self.raw["outage"] = {"online_ms": values, "outage_s": self.s.outage_seconds}
        self.add(Figure(f"ONLINE after {self.s.outage_seconds:g} s outage", median(values), "ms",
                        None, "max_abs", 1000, reps=values))
        if not self.s.quick:  # a second outage right after the first (a flapping broker)
            again = self._outage()
            self.raw["outage"]["second_outage_online_ms"] = again
            self.add(Figure("ONLINE after a 2nd outage at once", again, "ms"))

    def _outage(self) -> float:
        """Milliseconds from the broker accepting connections again to the bridge's ONLINE."""
        assert self.broker is not None
        self.broker.stop()
        time.sleep(self.s.outage_seconds)  # the outage itself
        back = self._broker_back()
        mark = len(self.status)
        self.a.reconnect()
        return (self.wait_online(mark, 30) - back) * 1000


# --------------------------------------------------------------------------- results


def git_describe() -> dict[str, Any]:
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain",
                                                                  "--", "spotfi_bridge"))}


def report(bench: Bench, started: float, load_before: tuple[float, float, float],
           source: dict[str, Any]) -> dict[str, Any]:
    return {
        "meta": {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            **source,
            "python": platform.python_version(),
            "paho": mqtt_compat.PAHO_VERSION,
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
            "seconds": round(time.monotonic() - started, 1),
            "settings": {k: v for k, v in vars(bench.s).items()},
            "bridge_source": os.environ.get("BENCH_BRIDGE_SRC") or str(ROOT),
            "bridge_toml": bench.toml,
        },
        "figures": [f.as_dict() for f in bench.figures],
        "problems": bench.problems,
        "raw": bench.raw,
    }


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compare", metavar="PATH", help="an earlier results JSON to compare with")
    parser.add_argument("--out", metavar="PATH", default=str(RESULTS / "latest.json"))
    parser.add_argument("--quick", action="store_true", help="the ~1 minute smoke variant")
    args = parser.parse_args(argv)
    previous = None
    if args.compare:  # read first: --compare may name latest.json, which this run replaces
        previous = json.loads(Path(args.compare).read_text())
    settings = Settings.from_env(args.quick)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.monotonic()
    load_before = os.getloadavg()
    log(f"{'quick' if settings.quick else 'full'} run: {settings.reps} reps, idle window "
        f"{settings.idle_seconds:g} s, bridge overrides {settings.overrides or 'none'}")
    source = git_describe()  # before the snapshot of the source is taken
    bench = Bench(settings)
    try:
        bench.run()
    except Exception:
        traceback.print_exc()
        bench.problems.append("the bench stopped early: " + traceback.format_exc(limit=1).strip())
    result = _json_safe(report(bench, started, load_before, source))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=2)
    out.write_text(text + "\n")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (out.parent / f"run-{stamp}.json").write_text(text + "\n")
    print()
    print(table(bench.figures))
    judged = [f for f in bench.figures if f.passed is not None]
    print(f"\n{sum(1 for f in judged if f.passed)} of {len(judged)} judged figures pass; "
          f"{time.monotonic() - started:.0f} s; load average {os.getloadavg()[0]:.2f}; "
          f"results in {out}")
    for problem in bench.problems:
        print(f"problem: {problem}")
    if previous is not None:
        print(f"\nchange against {args.compare}:")
        print(compare(previous, result))
    strict = os.environ.get("BENCH_STRICT", "") not in ("", "0")
    if bench.problems or (strict and any(f.passed is False for f in judged)):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
