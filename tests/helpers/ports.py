from __future__ import annotations

import socket


def free_port() -> int:
    """A free TCP port on loopback (the tests never touch another address)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
