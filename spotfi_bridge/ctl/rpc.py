"""``ctl rpc`` and ``ctl sessions``: one ubus-style call, exactly as the SpotFi API makes it."""

from __future__ import annotations

import json
import secrets
import time
from typing import IO, Any, Callable, Optional

from spotfi_bridge import protocol
from spotfi_bridge.ctl.client import EXIT_FAILED, EXIT_OK, EXIT_TIMEOUT, CtlClient, CtlError, Message
from spotfi_bridge.ctl.settings import Settings

DEFAULT_TIMEOUT = 30.0
#: A router that ever connected to the broker left a retained status (ONLINE, or its Last
#: Will OFFLINE), which the broker sends right after the SUBACK: without one by then, no
#: reply is coming, and waiting the whole timeout only hides a wrong --router or --broker.
STATUS_GRACE = 2.0


def new_request_id() -> str:
    """Shaped like the API's ``cmd_<unix ms>_<random>_<n>``."""
    return f"cmd_{int(time.time() * 1000)}_{secrets.token_hex(2)}_1"


def parse_args_json(text: Optional[str]) -> dict[str, Any]:
    """The call's ``args``: a JSON object, or a usage error naming what is wrong."""
    if text is None or not text.strip():
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"ARGS is not valid JSON: {exc.msg} at position {exc.pos}") from None
    if not isinstance(value, dict):
        raise ValueError(f"ARGS must be a JSON object like '{{\"key\": \"value\"}}', "
                         f"got {type(value).__name__}")
    return value


def call(settings: Settings, path: str, method: str, args: dict[str, Any],
         timeout: float) -> dict[str, Any]:
    """Send one request and return the router's reply envelope; CtlError on timeout."""
    router = settings.require_router()
    topics = protocol.Topics(router)
    deadline = time.monotonic() + timeout
    client = CtlClient(settings)
    client.connect(min(timeout, 10.0))
    try:
        client.subscribe([topics.rpc_response])
        # to explain a timeout, and to give up early on a router the broker has never seen;
        # an ACL that hides the status leaves only the timeout
        status_hidden = bool(client.subscribe([topics.status], required=False))
        status_due = time.monotonic() + STATUS_GRACE
        req_id = new_request_id()
        client.publish(topics.rpc_request, protocol.api_rpc_request(req_id, path, method, args))
        status: Optional[str] = None
        while True:
            waiting_for_status = status is None and not status_hidden and status_due < deadline
            event = client.get((status_due if waiting_for_status else deadline) - time.monotonic())
            if event is None and waiting_for_status:
                raise CtlError(f"router {router} has never announced itself on "
                               f"{settings.public_broker} (no retained status after "
                               f"{STATUS_GRACE:g} s): no reply to {path}.{method} will come; "
                               "check --router and --broker", EXIT_TIMEOUT)
            if event is None:
                raise CtlError(_timeout_message(settings, router, timeout, status), EXIT_TIMEOUT)
            if not isinstance(event, Message):
                continue  # paho reconnects by itself and resends the QoS 1 request
            if event.topic == topics.status:
                status = event.payload.decode("utf-8", "replace")
                continue
            reply = protocol.decode_object(event.payload)
            if isinstance(reply, dict) and reply.get("id") == req_id:
                return reply
    finally:
        client.close()


def _timeout_message(settings: Settings, router: str, timeout: float, status: Optional[str]) -> str:
    if status is None:
        state = f"router {router} has never announced itself on {settings.public_broker}"
    else:
        state = f"its last status on {settings.public_broker} is {status!r}"
    return f"no reply from router {router} within {timeout:g} s ({state})"


def is_error(reply: dict[str, Any]) -> bool:
    """The API's own test: ``status == "error"`` or ``type == "error"``."""
    return reply.get("status") == "error" or reply.get("type") == "error"


def error_text(reply: dict[str, Any]) -> str:
    """The message the API would show for an error reply."""
    return str(reply.get("error") or reply.get("message") or "unknown error")


def dump_json(value: Any, pretty: bool) -> str:
    if pretty:
        return json.dumps(value, indent=2, ensure_ascii=False)
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def run_rpc(settings: Settings, path: str, method: str, args: dict[str, Any], timeout: float,
            out: IO[str], err: IO[str], pretty: bool) -> int:
    reply = call(settings, path, method, args, timeout)
    result = reply.get("result")
    if is_error(reply):
        if result:
            print(dump_json(result, pretty), file=out)
        print(f"error: {path}.{method}: {error_text(reply)}", file=err)
        stderr = reply.get("stderr")
        if isinstance(stderr, str) and stderr:
            err.write(stderr if stderr.endswith("\n") else stderr + "\n")
        return EXIT_FAILED
    # as the API: ``response.result || response``
    print(dump_json(result if result else reply, pretty), file=out)
    return EXIT_OK


# --------------------------------------------------------------------------- sessions

_COLUMNS: tuple[tuple[str, Callable[[dict[str, Any]], str]], ...] = (
    ("SESSION", lambda s: str(s.get("id", ""))),
    ("PID", lambda s: str(s.get("pid", ""))),
    ("SIZE", lambda s: f"{s.get('cols', '?')}x{s.get('rows', '?')}"),
    ("AGE", lambda s: duration(s.get("age"))),
    ("IDLE", lambda s: duration(s.get("idle"))),
    ("IN", lambda s: size(s.get("bytesIn"))),
    ("OUT", lambda s: size(s.get("bytesOut"))),
    ("OUTPUT TO", lambda s: str(s.get("responseTopic", ""))),
)


def duration(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool):
        return "-"
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


def size(count: Any) -> str:
    if not isinstance(count, (int, float)) or isinstance(count, bool):
        return "-"
    value = float(count)
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return f"{value:.1f}GiB"


def sessions_table(sessions: list[Any]) -> str:
    rows = [[cell(s) for _, cell in _COLUMNS] for s in sessions if isinstance(s, dict)]
    header = [name for name, _ in _COLUMNS]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    return "\n".join(lines)


def run_sessions(settings: Settings, timeout: float, out: IO[str], err: IO[str],
                 table: bool) -> int:
    reply = call(settings, "bridge", "sessions", {}, timeout)
    if is_error(reply):
        print(f"error: bridge.sessions: {error_text(reply)}", file=err)
        return EXIT_FAILED
    result = reply.get("result")
    sessions = result.get("sessions") if isinstance(result, dict) else None
    if not isinstance(sessions, list):
        print(f"error: unexpected answer to bridge sessions: {dump_json(result, False)[:200]}",
              file=err)
        return EXIT_FAILED
    if not table:
        print(dump_json(result, False), file=out)
    elif not sessions:
        print(f"no open terminal sessions on {settings.router}", file=out)
    else:
        print(sessions_table(sessions), file=out)
    return EXIT_OK
