"""A loopback TCP proxy the tests control: cut, blackhole, refuse, throttle, delay.

It stands between the bridge and the broker so a test can break the bridge's
link alone while the API-side client stays connected to the broker directly.

Each direction of each connection has a reader thread and a sender thread, so
the two directions never wait for each other (a throttled upload does not hold
back the PINGRESP coming down), latency is a pipeline delay (it adds to every
chunk's trip without dividing the throughput), and throttling reads in small
slices at the configured rate, so the sender's own socket buffer fills and
backpressure reaches it as on a slow WAN. A black hole swallows data and also
the FIN or RST of a side that gives up, until it is lifted: neither end learns
anything from the other, as with a dead route.
"""

from __future__ import annotations

import queue
import random
import socket
import threading
import time
from typing import Optional

from tests.helpers.ports import free_port

_LINGER_RST = b"\x01\x00\x00\x00\x00\x00\x00\x00"  # l_onoff=1, l_linger=0: close sends RST


class _Pair:
    """One proxied connection: the accepted client socket and its upstream socket."""

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client = client
        self.upstream = upstream
        self.closed = False
        self.queues: list[queue.Queue[Optional[tuple[float, bytes]]]] = [queue.Queue(), queue.Queue()]


class TcpProxy:
    def __init__(self, target_port: int, port: Optional[int] = None) -> None:
        self.target_port = target_port
        self.port = port or free_port()
        self.blackholed = False
        self.blackholed_up = False  # only client → target vanishes (the client's acks, pings)
        self.refusing = False
        self.latency = 0.0       # seconds added to every chunk, each direction
        self.jitter = 0.0        # +/- seconds (order is kept: a chunk never overtakes another)
        self.rate_bps: Optional[float] = None  # bytes per second, each direction
        self.connections = 0
        self.bytes_up = 0        # client → target, forwarded
        self.bytes_down = 0      # target → client, forwarded
        self.bytes_dropped = 0   # swallowed by the black hole
        self._pairs: list[_Pair] = []
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
            upstream.settimeout(None)
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            pair = _Pair(client, upstream)
            with self._lock:
                self._pairs.append(pair)
                self.connections += 1
            for index, (src, dst) in enumerate(((client, upstream), (upstream, client))):
                threading.Thread(target=self._read, args=(pair, src, index), daemon=True).start()
                threading.Thread(target=self._send, args=(pair, dst, index), daemon=True).start()

    def _read(self, pair: _Pair, src: socket.socket, index: int) -> None:
        """Read one direction at the configured rate; queue each chunk with its delivery time."""
        out = pair.queues[index]
        next_free = time.monotonic()  # when the throttled "wire" is free again
        last_due = 0.0
        try:
            while not self._stop.is_set() and not pair.closed:
                rate = self.rate_bps
                size = 65536 if not rate else max(256, int(rate / 50))
                data = src.recv(size)
                if not data:
                    break
                if self.blackholed or (index == 0 and self.blackholed_up):
                    self.bytes_dropped += len(data)  # silently, like packets into a black hole
                    continue
                now = time.monotonic()
                if rate:
                    next_free = max(next_free, now) + len(data) / rate
                    if next_free > now:
                        time.sleep(next_free - now)  # hold the socket: the sender's buffer fills
                    now = time.monotonic()
                delay = self.latency + random.uniform(-self.jitter, self.jitter) if (
                    self.latency or self.jitter) else 0.0
                last_due = max(last_due, now + max(0.0, delay))
                out.put((last_due, data))
        except OSError:
            pass
        # a FIN or RST does not cross a black hole either: hold it until the hole closes
        while self.blackholed and not pair.closed and not self._stop.is_set():
            time.sleep(0.05)
        out.put(None)

    def _send(self, pair: _Pair, dst: socket.socket, index: int) -> None:
        """Deliver one direction's chunks when they are due, in order."""
        source = pair.queues[index]
        try:
            while True:
                item = source.get()
                if item is None or pair.closed:
                    break
                due, data = item
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                if pair.closed:
                    break
                if self.blackholed or (index == 0 and self.blackholed_up):
                    self.bytes_dropped += len(data)
                    continue
                dst.sendall(data)
                if index == 0:
                    self.bytes_up += len(data)
                else:
                    self.bytes_down += len(data)
        except OSError:
            pass
        self._close_pair(pair, reset=False)

    def _close_pair(self, pair: _Pair, reset: bool) -> None:
        with self._lock:
            if pair.closed:
                return
            pair.closed = True
            if pair in self._pairs:
                self._pairs.remove(pair)
        for sock in (pair.client, pair.upstream):
            try:
                if reset:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
                sock.shutdown(socket.SHUT_RDWR)  # wakes the reader blocked in recv()
            except OSError:
                pass
            try:
                sock.close()
            except OSError:
                pass
        for out in pair.queues:
            out.put(None)

    def cut(self) -> None:
        """Reset every open connection (new ones are still accepted)."""
        with self._lock:
            pairs = list(self._pairs)
        for pair in pairs:
            self._close_pair(pair, reset=True)

    def open_connections(self) -> int:
        with self._lock:
            return len(self._pairs)

    def clear_faults(self) -> None:
        """Back to a clean wire: no black hole, no refusal, no delay, no throttle."""
        self.blackholed = self.blackholed_up = False
        self.refusing = False
        self.latency = self.jitter = 0.0
        self.rate_bps = None

    def close(self) -> None:
        self._stop.set()
        self.cut()
        self._listener.close()
        self._thread.join(2)

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
