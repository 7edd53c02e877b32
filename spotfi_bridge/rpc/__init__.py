"""The ubus proxy: ``rpc/request`` in, one ``rpc-result`` per request id out.

``executor`` validates, dedups, limits and answers; ``ubus`` runs real ubus
calls as children; ``local`` emulates the same objects where ubus is absent;
``bridge_ns`` answers the bridge's own ``bridge`` object in-process.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from spotfi_bridge.config import RpcConfig
from spotfi_bridge.rpc.backend import Backend, Call, Outcome
from spotfi_bridge.rpc.executor import RpcExecutor
from spotfi_bridge.rpc.ubus import UbusBackend, find_ubus

if TYPE_CHECKING:
    from spotfi_bridge.rpc.local import LocalBackend


def make_backend(config: RpcConfig) -> Backend:
    """``auto``: real ubus when the ``ubus`` CLI is on PATH, else the local emulation.
    ``ubus`` forced without the CLI still builds a ubus backend: every call then fails with
    a clear "cannot run ubus" error instead of silently answering from emulation."""
    if config.backend == "local":
        return _local(config)
    binary = find_ubus()
    if config.backend == "ubus":
        return UbusBackend(config, binary or "ubus")
    return UbusBackend(config, binary) if binary else _local(config)


def _local(config: RpcConfig) -> Backend:
    # imported on demand: a router with ubus never pays for the emulation's modules
    from spotfi_bridge.rpc.local import LocalBackend

    return LocalBackend(config)


def __getattr__(name: str) -> Any:
    if name == "LocalBackend":
        from spotfi_bridge.rpc.local import LocalBackend

        return LocalBackend
    raise AttributeError(name)


__all__ = ["Backend", "Call", "LocalBackend", "Outcome", "RpcExecutor", "UbusBackend",
           "make_backend"]
