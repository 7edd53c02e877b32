"""The ubus proxy: ``rpc/request`` in, one ``rpc-result`` per request id out.

``executor`` validates, dedups, limits and answers; ``ubus`` runs real ubus
calls as children; ``local`` emulates the same objects where ubus is absent;
``bridge_ns`` answers the bridge's own ``bridge`` object in-process.
"""

from __future__ import annotations

from spotfi_bridge.config import RpcConfig
from spotfi_bridge.rpc.backend import Backend, Call, Outcome
from spotfi_bridge.rpc.executor import RpcExecutor
from spotfi_bridge.rpc.local import LocalBackend
from spotfi_bridge.rpc.ubus import UbusBackend, find_ubus


def make_backend(config: RpcConfig) -> Backend:
    """``auto``: real ubus when the ``ubus`` CLI is on PATH, else the local emulation.
    ``ubus`` forced without the CLI still builds a ubus backend: every call then fails with
    a clear "cannot run ubus" error instead of silently answering from emulation."""
    if config.backend == "local":
        return LocalBackend(config)
    binary = find_ubus()
    if config.backend == "ubus":
        return UbusBackend(config, binary or "ubus")
    return UbusBackend(config, binary) if binary else LocalBackend(config)


__all__ = ["Backend", "Call", "LocalBackend", "Outcome", "RpcExecutor", "UbusBackend",
           "make_backend"]
