"""The ``bridge`` ubus-style object: the bridge's own diagnostics, answered in-process.

``bridge ping`` is how the API (or ``spotfi-bridge-ctl``) measures the round trip
through the broker without a child process in the way, so it must stay cheap.
Every answer passes through :func:`redact`: ``bridge info`` goes to the API and
must never carry the router token, whatever the daemon's ``info()`` returned.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from spotfi_bridge import __version__
from spotfi_bridge.rpc.backend import UBUS_METHOD_NOT_FOUND, Outcome, ubus_failure

REDACTED = "<redacted>"
#: keys whose values are never shown, whatever they hold
_SECRET_KEYS = ("token", "password", "secret", "passwd")


def redact(value: Any, secrets: tuple[str, ...]) -> Any:
    """A copy of ``value`` with secret-looking keys masked and every secret string cut out."""
    if isinstance(value, dict):
        return {str(key): (REDACTED if any(word in str(key).lower() for word in _SECRET_KEYS)
                           else redact(item, secrets))
                for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(item, secrets) for item in value]
    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, REDACTED)
        return value
    return value


@dataclass(frozen=True)
class BridgeView:
    """What the ``bridge`` object can see of the executor and the daemon."""

    backend: str
    uptime: Callable[[], float]
    counters: Callable[[], dict[str, int]]
    limits: Callable[[], dict[str, Any]]
    info: Callable[[], dict[str, Any]]
    sessions: Callable[[], list[dict[str, Any]]]
    secrets: Callable[[], Iterable[str]]


def answer(method: str, view: BridgeView) -> Outcome:
    if method == "ping":
        return Outcome(result={"pong": True, "uptime": int(view.uptime())}, exit_code=0)
    if method not in ("info", "sessions"):
        return ubus_failure(UBUS_METHOD_NOT_FOUND)
    secrets = tuple(s for s in view.secrets() if s and len(s) >= 3)
    sessions = view.sessions()
    if method == "sessions":
        return Outcome(result=redact({"sessions": sessions}, secrets), exit_code=0)
    info: dict[str, Any] = {
        "version": __version__,
        "uptime": int(view.uptime()),
        "pid": os.getpid(),
        "python": platform.python_version(),
        "backend": view.backend,
        "counters": view.counters(),
        "rpc": view.limits(),
        "sessions": len(sessions),
    }
    info.update(view.info())
    return Outcome(result=redact(info, secrets), exit_code=0)
