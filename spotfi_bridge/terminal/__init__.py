"""Terminal sessions over the x-tunnel: PTY shells multiplexed on the one MQTT link."""

from __future__ import annotations

from spotfi_bridge.terminal.manager import SessionManager
from spotfi_bridge.terminal.session import PtySession

__all__ = ["PtySession", "SessionManager"]
