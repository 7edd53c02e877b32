"""The one way parts other than the link send to the broker.

``rpc`` and ``terminal`` are handed a :class:`Publisher` instead of importing
``link``, so each can be tested alone with a list that collects what it would
publish, and end to end with a real broker.
"""

from __future__ import annotations

from typing import Callable, Optional, Protocol

OnSent = Callable[[], None]


class Publisher(Protocol):
    def __call__(
        self,
        topic: str,
        payload: bytes,
        qos: int = 1,
        retain: bool = False,
        on_sent: Optional[OnSent] = None,
    ) -> bool:
        """Queue ``payload`` for ``topic``.

        Returns ``False`` when the message was refused because the link's outbox is
        full (the link counts and logs it). When it returns ``True``, ``on_sent`` is
        called exactly once, on the event loop, when the message has left the
        bridge's hands: acknowledged by the broker (QoS 1), written to the socket
        (QoS 0), or given up on (counted and logged by the link). Messages published
        at QoS 1 while the link is down are kept, in order, and sent after reconnect.
        """
        ...
