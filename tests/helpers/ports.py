"""Free loopback ports for the tests (which never touch another address)."""

from __future__ import annotations

from spotfi_bridge.devtools.loopback import free_port

__all__ = ["free_port"]
