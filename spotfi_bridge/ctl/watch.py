"""``ctl watch``: presence and latest metrics of one router (or ``+``: every router).

On a terminal the view is redrawn in place; otherwise every event is one JSON
line, so scripts and tests can read it with ``readline``.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from typing import IO, Any, Callable, Optional

from spotfi_bridge import protocol
from spotfi_bridge.ctl.client import EXIT_OK, EXIT_TIMEOUT, CtlClient, CtlError, LinkEvent, Message
from spotfi_bridge.ctl.rpc import duration, size
from spotfi_bridge.ctl.settings import Settings


@dataclass
class RouterView:
    status: str = "?"
    status_at: Optional[float] = None
    #: the status was the broker's retained copy: it is at least that old, maybe much older
    status_retained: bool = False
    metrics: dict[str, Any] = field(default_factory=dict)
    metrics_at: Optional[float] = None
    metrics_count: int = 0
    invalid: int = 0


def classify(message: Message) -> Optional[dict[str, Any]]:
    """One event record out of a status or metrics message (``None``: not ours)."""
    parts = message.topic.split("/")
    if len(parts) != 4 or parts[:2] != ["spotfi", "router"]:
        return None
    router, kind = parts[2], parts[3]
    if kind == "status":
        text = message.payload.decode("utf-8", "replace")
        # the API reads ``message.status || message.payload``: accept a JSON object too
        obj = protocol.decode_object(message.payload)
        if isinstance(obj, dict) and isinstance(obj.get("status"), str):
            text = obj["status"]
        record: dict[str, Any] = {"router": router, "event": "status", "status": text}
        if message.retain:
            record["retained"] = True
        return record
    if kind == "metrics":
        obj = protocol.decode_object(message.payload)
        if isinstance(obj, str):
            return {"router": router, "event": "invalid", "topic": message.topic, "error": obj}
        metrics = obj.get("metrics")
        if not isinstance(metrics, dict):
            return {"router": router, "event": "invalid", "topic": message.topic,
                    "error": "no 'metrics' object in the message"}
        return {"router": router, "event": "metrics", "metrics": metrics}
    return None


class Screen:
    """The in-place view: a header, one line per router, the full metrics of a single router."""

    def __init__(self, settings: Settings, out: IO[str], clock: Callable[[], float]) -> None:
        self.settings = settings
        self.out = out
        self.clock = clock
        self.routers: dict[str, RouterView] = {}
        self.broker_state = "connected"

    def apply(self, record: dict[str, Any]) -> None:
        view = self.routers.setdefault(record["router"], RouterView())
        now = self.clock()
        if record["event"] == "status":
            view.status, view.status_at = record["status"], now
            view.status_retained = bool(record.get("retained"))
        elif record["event"] == "metrics":
            view.metrics, view.metrics_at = record["metrics"], now
            view.metrics_count += 1
        else:
            view.invalid += 1

    def render(self) -> str:
        now = self.clock()
        width = shutil.get_terminal_size((100, 24)).columns
        lines = [f"spotfi-bridge-ctl watch  {self.settings.public_broker}  "
                 f"router {self.settings.router}  ({self.broker_state}; Ctrl-C quits)", ""]
        header = ("ROUTER", "STATUS", "SINCE", "METRICS", "UPTIME", "LOAD", "MEMORY", "USERS",
                  "SESSIONS")
        rows = [header]
        for router in sorted(self.routers):
            v = self.routers[router]
            m = v.metrics
            rows.append((
                router, v.status,
                (">" if v.status_retained else "") + _ago(now, v.status_at),
                f"{_ago(now, v.metrics_at)} ago" if v.metrics_at is not None else "none yet",
                duration(_number(m.get("uptime"))),
                _load(m.get("cpuLoad")), _memory(m), _text(m.get("activeUsers")),
                _text(m.get("sessions")),
            ))
        if len(rows) == 1:
            lines.append("waiting for status or metrics...")
        else:
            widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
            lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        if len(self.routers) == 1:
            v = next(iter(self.routers.values()))
            if v.metrics:
                lines += ["", f"latest metrics ({v.metrics_count} received"
                              f"{f', {v.invalid} invalid' if v.invalid else ''}):"]
                for key, value in v.metrics.items():
                    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
                    lines.append(f"  {key}: {text}")
        return "\n".join(line[:width] for line in lines)

    def draw(self) -> None:
        # home, the frame with each line cleared to its end, then clear what is below
        body = self.render().replace("\n", "\x1b[K\n")
        self.out.write(f"\x1b[H{body}\x1b[K\n\x1b[J")
        self.out.flush()


def _ago(now: float, at: Optional[float]) -> str:
    return "-" if at is None else duration(now - at)


def _number(value: Any) -> Optional[float]:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _load(value: Any) -> str:
    number = _number(value)
    return "-" if number is None else f"{number / 100:.2f}"


def _memory(metrics: dict[str, Any]) -> str:
    total, free = _number(metrics.get("totalMemory")), _number(metrics.get("freeMemory"))
    if total is None or free is None:
        return "-"
    return f"{size(total - free)}/{size(total)}"


def _text(value: Any) -> str:
    return "-" if value is None else str(value)


def run_watch(settings: Settings, count: Optional[int], timeout: Optional[float], out: IO[str],
              tty: bool, clock: Callable[[], float] = time.monotonic) -> int:
    """Exit 0 after ``count`` events or ``timeout`` s (124 when ``count`` was not reached)."""
    router = settings.require_router(allow_all=True)
    deadline = None if timeout is None else clock() + timeout
    client = CtlClient(settings)
    client.connect(10.0 if timeout is None else max(0.5, min(timeout, 10.0)))
    screen = Screen(settings, out, clock) if tty else None
    seen = 0
    try:
        if screen:
            out.write("\x1b[?25l\x1b[2J")
            screen.draw()
        client.subscribe([f"spotfi/router/{router}/status", f"spotfi/router/{router}/metrics"])
        while count is None or seen < count:
            remaining = None if deadline is None else deadline - clock()
            if remaining is not None and remaining <= 0:
                if count is not None:
                    raise CtlError(f"saw {seen} of {count} events within {timeout:g} s",
                                   EXIT_TIMEOUT)
                break
            wait = remaining
            if screen:  # refresh the ages once a second
                wait = 1.0 if remaining is None else min(remaining, 1.0)
            event = client.get(wait)
            if isinstance(event, LinkEvent):
                state = "connected" if event.up else f"broker connection lost: {event.detail}"
                if screen:
                    screen.broker_state = state
                else:
                    _line(out, {"event": "broker", "connected": event.up, "detail": event.detail})
            elif isinstance(event, Message):
                record = classify(event)
                if record is None:
                    continue
                seen += 1
                if screen:
                    screen.apply(record)
                else:
                    _line(out, record)
            if screen:
                screen.draw()
        return EXIT_OK
    finally:
        if screen:
            out.write("\x1b[?25h")
            out.flush()
        client.close()


def _line(out: IO[str], record: dict[str, Any]) -> None:
    out.write(json.dumps(record, separators=(",", ":"), ensure_ascii=False) + "\n")
    out.flush()
