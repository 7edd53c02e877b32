"""What a backend is: one ubus-style call in, one :class:`Outcome` out.

Both backends report failures with the same ubus status codes and texts, so
the API (and whoever reads the dashboard) sees the same error whether the
router runs real ubus or the dry-run emulation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol

from spotfi_bridge.config import RpcConfig

# UBUS_STATUS_* of libubus (ubusmsg.h); the ubus CLI exits with them.
UBUS_INVALID_COMMAND = 1
UBUS_INVALID_ARGUMENT = 2
UBUS_METHOD_NOT_FOUND = 3
UBUS_NOT_FOUND = 4
UBUS_NO_DATA = 5
UBUS_PERMISSION_DENIED = 6
UBUS_TIMEOUT = 7
UBUS_NOT_SUPPORTED = 8
UBUS_UNKNOWN_ERROR = 9
UBUS_CONNECTION_FAILED = 10
UBUS_NO_MEMORY = 11
UBUS_PARSE_ERROR = 12
UBUS_SYSTEM_ERROR = 13

#: The CLI's ``return -1``: ubusd unreachable, or the JSON message did not parse. With
#: ``-S`` it prints nothing, so these words are the only explanation the caller gets.
UBUS_CLI_FAILED = 255
#: The CLI's ``return -2``: a command line it does not understand (it prints its usage).
UBUS_CLI_USAGE = 254

#: libubus's ``ubus_strerror`` words, which the CLI prints without ``-S``.
UBUS_STATUS_TEXT: dict[int, str] = {
    UBUS_INVALID_COMMAND: "Invalid command",
    UBUS_INVALID_ARGUMENT: "Invalid argument",
    UBUS_METHOD_NOT_FOUND: "Method not found",
    UBUS_NOT_FOUND: "Not found",
    UBUS_NO_DATA: "No response",
    UBUS_PERMISSION_DENIED: "Permission denied",
    UBUS_TIMEOUT: "Request timed out",
    UBUS_NOT_SUPPORTED: "Operation not supported",
    UBUS_UNKNOWN_ERROR: "Unknown error",
    UBUS_CONNECTION_FAILED: "Connection failed",
    UBUS_NO_MEMORY: "Out of memory",
    UBUS_PARSE_ERROR: "Parsing message data failed",
    UBUS_SYSTEM_ERROR: "System error",
    UBUS_CLI_FAILED: "Failed to connect to ubus or to parse message data",
    UBUS_CLI_USAGE: "Invalid ubus command line",
}


def ubus_status_text(status: Optional[int]) -> str:
    """What an exit status of the ubus CLI means, in ubus's own words."""
    if status is None:
        return "ubus ended without an exit status"
    return UBUS_STATUS_TEXT.get(status) or f"ubus failed with exit status {status}"


@dataclass(frozen=True)
class Call:
    """One call as the executor hands it to a backend, limits already resolved."""

    path: str
    method: str
    args: dict[str, Any]
    timeout: float
    output_cap: int


@dataclass(frozen=True)
class ServiceAction:
    """``/etc/init.d/NAME ACTION``: what the compat layer runs for the API's
    ``service ACTION {"name": NAME}``, which procd's ``service`` object does not have."""

    name: str
    action: str
    #: the init script, checked to exist directly under the init directory
    script: str
    timeout: float
    output_cap: int


@dataclass(frozen=True)
class Outcome:
    """The result of a call; ``error`` is ``None`` on success."""

    result: Any = None
    error: Optional[str] = None
    stderr: str = ""
    #: exit status of the ubus CLI (or the status it would have exited with)
    exit_code: Optional[int] = None
    truncated: bool = False
    timed_out: bool = False
    #: the signal that killed the child (it then has no exit status)
    signal: Optional[int] = None
    #: run once the reply has left the bridge (an action that would stop the bridge itself)
    after_reply: Optional[Callable[[], None]] = field(default=None, compare=False)

    @property
    def ok(self) -> bool:
        return self.error is None


def ubus_failure(status: Optional[int], stderr: str = "", *, error: Optional[str] = None,
                 truncated: bool = False) -> Outcome:
    """The outcome of a ubus call that ended with ``status``, worded as ubus words it."""
    text = error or ubus_status_text(status)
    return Outcome(error=text, stderr=stderr, exit_code=status, truncated=truncated)


def timeout_failure(seconds: float, stderr: str = "", *, truncated: bool = False,
                    exit_code: Optional[int] = None) -> Outcome:
    return Outcome(error=f"timeout after {seconds:g} s", stderr=stderr, timed_out=True,
                   truncated=truncated, exit_code=exit_code)


class UbusError(Exception):
    """Raised inside the local backend's handlers; becomes :func:`ubus_failure`.

    ``error`` replaces ubus's wording only where ubus itself could not be clearer
    (a local-only setting is missing)."""

    def __init__(self, status: int, error: Optional[str] = None) -> None:
        super().__init__(error or UBUS_STATUS_TEXT.get(status, str(status)))
        self.status = status
        self.error = error


class Backend(Protocol):
    #: ``"ubus"`` or ``"local"``, shown by ``bridge info``
    name: str

    async def call(self, call: Call) -> Outcome:
        """Run one call. Never raises for a failed call (only on cancellation, after the
        call's children are killed and reaped)."""
        ...

    async def service(self, action: ServiceAction) -> Outcome:
        """Run (or emulate) an init script action for the compat layer; same rules as
        :meth:`call`."""
        ...

    def reconfigure(self, config: RpcConfig) -> None:
        """Take new settings (SIGHUP)."""
        ...
