"""A loopback TCP proxy the tests control: cut, blackhole, refuse, throttle, delay.

It stands between the bridge and the broker so a test can break the bridge's
link alone while the API-side client stays connected to the broker directly.
"""

from __future__ import annotations

import random
import select
import socket
import threading
import time
from typing import Optional

from tests.helpers.ports import free_port


class TcpProxy:
    def __init__(self, target_port: int, port: Optional[int] = None) -> None:
        self.target_port = target_port
        self.port = port or free_port()
        self.blackholed = False
        self.refusing = False
        self.latency = 0.0       # seconds added to every chunk, each direction
        self.jitter = 0.0        # +/- seconds
        self.rate_bps: Optional[float] = None  # bytes per second, each direction
        self.connections = 0
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", self.port))
        self._listener.listen(16)
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def _accept_loop(self) -> None:
        self._listener.settimeout(0.2)
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            if self.refusing:
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=2)
            except OSError:
                client.close()
                continue
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._pairs.append((client, upstream))
                self.connections += 1
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        peers = {a: b, b: a}
        try:
            while not self._stop.is_set():
                readable, _, _ = select.select([a, b], [], [], 0.2)
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        return
                    if self.blackholed:
                        continue  # silently dropped, like packets into a black hole
                    self._delay(len(data))
                    peers[sock].sendall(data)
        except OSError:
            return
        finally:
            for sock in (a, b):
                try:
                    sock.close()
                except OSError:
                    pass
            with self._lock:
                if (a, b) in self._pairs:
                    self._pairs.remove((a, b))

    def _delay(self, size: int) -> None:
        wait = 0.0
        if self.latency or self.jitter:
            wait += max(0.0, self.latency + random.uniform(-self.jitter, self.jitter))
        if self.rate_bps:
            wait += size / self.rate_bps
        if wait:
            time.sleep(wait)

    def cut(self) -> None:
        """Reset every open connection (new ones are still accepted)."""
        with self._lock:
            pairs = list(self._pairs)
        for a, b in pairs:
            for sock in (a, b):
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def open_connections(self) -> int:
        with self._lock:
            return len(self._pairs)

    def close(self) -> None:
        self._stop.set()
        self.cut()
        self._listener.close()
        self._thread.join(2)

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
