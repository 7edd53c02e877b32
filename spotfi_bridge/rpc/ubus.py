"""The real backend: one ``ubus call`` child per request.

Why the CLI and not the ``ubus`` Python binding: the binding's ``call`` blocks
the calling thread until ubusd answers (up to the call's timeout), so it would
stall the loop or need a thread per call, and a call stuck in it cannot be
killed. A CLI child costs a fork+exec (a few ms on a router) and can always be
timed out, killed and reaped. So the binding is not used.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import signal
from typing import Any, Optional

from spotfi_bridge.config import RpcConfig
from spotfi_bridge.rpc.backend import (
    UBUS_TIMEOUT,
    Call,
    Outcome,
    timeout_failure,
    ubus_failure,
)
from spotfi_bridge.rpc.child import MAX_ARG_STRLEN, ArgumentTooLong, run_child


def decode_text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


def parse_stdout(data: bytes) -> Any:
    """ubus prints JSON; anything else is handed back as text. Empty output is ``None``."""
    text = decode_text(data)
    if not text.strip():
        return None
    try:
        # NaN/Infinity are not JSON the API can read back: keep them as their names
        return json.loads(text, parse_constant=lambda name: name)
    except (ValueError, RecursionError):
        return text


def find_ubus() -> Optional[str]:
    return shutil.which("ubus")


class UbusBackend:
    name = "ubus"

    def __init__(self, config: RpcConfig, binary: str = "ubus") -> None:
        self.binary = binary
        self.config = config

    def reconfigure(self, config: RpcConfig) -> None:
        self.config = config

    def argv(self, call: Call) -> list[str]:
        # "--" ends ubus's options: a path or method starting with "-" stays an operand
        seconds = max(1, math.ceil(call.timeout))
        return [self.binary, "-S", "-t", str(seconds), "--", "call", call.path, call.method,
                json.dumps(call.args, separators=(",", ":"), ensure_ascii=False)]

    async def call(self, call: Call) -> Outcome:
        try:
            argv = self.argv(call)
        except (ValueError, TypeError) as exc:
            return ubus_failure(2, f"arguments cannot be encoded as JSON: {exc}")
        try:
            child = await run_child(argv, timeout=call.timeout, output_cap=call.output_cap)
        except ArgumentTooLong as exc:
            what = "args (as JSON)" if exc.index == len(argv) - 1 else "path or method"
            return Outcome(error=f"{what} too large for ubus: {exc.size} bytes, over the "
                                 f"kernel's limit of {MAX_ARG_STRLEN - 1} bytes for one "
                                 "command-line argument (MAX_ARG_STRLEN); not run")
        except ValueError:  # NUL byte in path, method or args
            return ubus_failure(2, "path, method or args contain a NUL character")
        except UnicodeEncodeError:
            return ubus_failure(2, "path, method or args are not valid Unicode")
        except OSError as exc:
            return Outcome(error=f"cannot run {self.binary}: {exc.strerror or exc}")
        stderr = decode_text(child.stderr)
        stdout = parse_stdout(child.stdout)
        if child.timed_out:
            return timeout_failure(call.timeout, stderr, truncated=child.truncated)
        if child.signal is not None:
            return Outcome(result=stdout, error=f"ubus killed by signal {child.signal} "
                                                f"({signal_name(child.signal)})",
                           stderr=stderr, signal=child.signal, truncated=child.truncated)
        if child.returncode != 0:
            outcome = ubus_failure(child.returncode, stderr, truncated=child.truncated)
            # ubus's own timeout (-t, or an object that never answered): its status, its words
            return dataclasses.replace(outcome, result=stdout,
                                       timed_out=child.returncode == UBUS_TIMEOUT)
        return Outcome(result=stdout, stderr=stderr, exit_code=0, truncated=child.truncated)


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return "unknown signal"
