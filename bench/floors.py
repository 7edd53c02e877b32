"""The floors: what the same work costs without the bridge, measured in the same run.

``python -m bench.floors serve`` is the minimal MQTT client that stands in for
the bridge: it echoes ``x/in`` and ``rpc/request`` payloads straight back
unchanged and, on request, publishes a byte stream as ``x-data`` messages of
the bridge's batch size. ``python -m bench.floors relay`` is the minimal terminal:
it types every ``x-data`` from ``x/in`` into a shell on a PTY and publishes what the
PTY prints as ``x-data``, the least a bridge must do per keystroke. The other
floors run inside the bench process: a bare
reader draining a command from a local PTY (no MQTT), the import time and RSS
of the bridge's dependencies, and the fake ubus's exec time.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import resource
import select
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Optional

import paho.mqtt.client as paho

from spotfi_bridge import mqtt_compat
from spotfi_bridge.protocol import Topics, x_data

#: What the bridge needs to import, as a minimal client imports it: the import floor of
#: start-up time and RSS. psutil is not among them (a router's metrics come from ubus and
#: /proc).
IMPORTS = "paho.mqtt.client, ptyprocess, asyncio, json, ssl"
IMPORT_CODE = (
    f"import {IMPORTS}\n"
    "import time\n"
    "t = time.perf_counter()\n"
    "rss = [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmRSS')][0]\n"
    "print(t, rss)\n"
)
#: The same with paho's urllib.request registered but never executed, as the bridge defers
#: it (``mqtt_compat._defer_import``): what the dependencies cost at the very least.
DEFERRED_IMPORT_CODE = (
    "import importlib.util, sys, urllib\n"
    "spec = importlib.util.find_spec('urllib.request')\n"
    "urllib.request = sys.modules['urllib.request'] = importlib.util.module_from_spec(spec)\n"
    + IMPORT_CODE
)

STREAM_CONTROL_TOPIC = "bench/floor/stream"
RELAY_STREAM_TOPIC = "bench/relay/stream"


# ---------------------------------------------------------------------- MQTT floor process


@dataclass
class _Stream:
    data: bytes
    chunk: int
    session: str
    topic: str
    qos: int
    offset: int = 0
    seq: int = 0


def serve(port: int, router_id: str, out_topic: str, max_inflight: int) -> int:
    topics = Topics(router_id)
    replies: list[tuple[str, bytes]] = []
    streams: list[_Stream] = []
    state = {"connected": False, "subscribed": 0}

    def on_connect(result: mqtt_compat.ConnectResult) -> None:
        if result.ok:
            state["connected"] = True
            for topic in (topics.x_in, topics.rpc_request, STREAM_CONTROL_TOPIC):
                client.subscribe(topic, 1)

    def on_message(topic: str, payload: bytes, qos: int, retain: bool) -> None:
        # replied to outside the callback, where paho writes at once instead of next loop
        if topic == topics.x_in:
            replies.append((out_topic, payload))
        elif topic == topics.rpc_request:
            replies.append((topics.rpc_response, payload))
        elif topic == STREAM_CONTROL_TOPIC:
            spec: dict[str, Any] = json.loads(payload)
            with open(spec["file"], "rb") as handle:
                data = handle.read()
            streams.append(_Stream(data, int(spec["chunk"]), spec["session"], spec["topic"],
                                   int(spec["qos"])))

    def on_disconnect(rc: int) -> None:
        state["connected"] = False

    client = mqtt_compat.new_client(f"bench-floor-{os.getpid()}", clean_session=True)
    mqtt_compat.bind_callbacks(client, on_connect=on_connect, on_disconnect=on_disconnect,
                               on_message=on_message, on_publish=lambda mid: None)
    client.on_socket_open = lambda _c, _u, sock: _nodelay(sock)
    client.on_subscribe = lambda *args: state.__setitem__("subscribed", state["subscribed"] + 1)
    client.max_inflight_messages_set(max_inflight)
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", port, keepalive=60)
    announced = False
    while True:
        rc = client.loop(0.0 if (streams or replies) else 1.0)
        if rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_AGAIN):
            return 1  # broker gone: the bench starts a new floor when it needs one
        if not announced and state["subscribed"] >= 3:
            print("ready", flush=True)
            announced = True
        while replies:
            topic, payload = replies.pop(0)
            client.publish(topic, payload, qos=1)
        if streams:
            stream = streams[0]
            piece = stream.data[stream.offset:stream.offset + stream.chunk]
            client.publish(stream.topic, x_data(stream.session, piece, stream.seq), qos=stream.qos)
            stream.offset += len(piece)
            stream.seq += 1
            if stream.offset >= len(stream.data):
                streams.pop(0)


@dataclass
class _Terminal:
    """One PTY the relay reads: its output goes out as x-data, per read or in chunks."""

    proc: subprocess.Popen[bytes]
    session: str
    topic: str
    chunk: int = 0  # 0: one message per read (keystrokes); else full chunks, the rest at EOF
    pending: bytes = b""
    seq: int = 0


def _spawn_on_pty(argv: list[str]) -> tuple[int, subprocess.Popen[bytes]]:
    master, slave = os.openpty()
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave,
                            start_new_session=True)
    os.close(slave)
    os.set_blocking(master, False)
    return master, proc


def relay(port: int, router_id: str, out_topic: str, qos: int, shell: str) -> int:
    """The terminal floor: the least a bridge must do, in one select loop over the broker
    socket and the PTY masters (as paho's own ``loop``).

    Keystrokes: ``x-data`` from ``x/in`` typed into ``shell`` on a PTY, its output
    published to ``out_topic`` as ``x-data`` with ``seq``, one message a read. Bulk: a
    command named on ``RELAY_STREAM_TOPIC`` runs on its own PTY and its output is published
    in messages of ``chunk`` bytes (the bridge's ``batch_bytes``), the rest at EOF.
    """
    topics = Topics(router_id)
    master, proc = _spawn_on_pty([shell])
    terminals = {master: _Terminal(proc, "relay", out_topic)}
    subscribed = [False]

    def on_connect(result: mqtt_compat.ConnectResult) -> None:
        if result.ok:
            client.subscribe([(topics.x_in, 1), (RELAY_STREAM_TOPIC, 1)])

    def on_message(topic: str, payload: bytes, qos: int, retain: bool) -> None:
        message = json.loads(payload)
        if topic == RELAY_STREAM_TOPIC:
            fd, child = _spawn_on_pty(message["command"])
            terminals[fd] = _Terminal(child, message["session"], message["topic"],
                                      int(message["chunk"]))
        elif message.get("type") == "x-data":
            terminals[master].session = message["sessionId"]
            os.write(master, base64.b64decode(message["data"]))

    def send(term: _Terminal, data: bytes) -> None:
        client.publish(term.topic, x_data(term.session, data, term.seq), qos=qos)
        term.seq += 1

    def on_readable(fd: int) -> None:
        term = terminals[fd]
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return
        except OSError:  # EIO: every slave side is closed
            data = b""
        term.pending += data
        size = term.chunk or len(term.pending)
        while term.pending and (len(term.pending) >= size or not data):
            send(term, term.pending[:size])
            term.pending = term.pending[size:]
        if not data:
            del terminals[fd]
            os.close(fd)
            term.proc.wait()

    client = mqtt_compat.new_client(f"bench-relay-{os.getpid()}", clean_session=True)
    mqtt_compat.bind_callbacks(client, on_connect=on_connect, on_disconnect=lambda rc: None,
                               on_message=on_message, on_publish=lambda mid: None)
    client.on_socket_open = lambda _c, _u, sock: _nodelay(sock)
    client.on_subscribe = lambda *args: subscribed.__setitem__(0, True)
    client.max_inflight_messages_set(100)
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", port, keepalive=60)
    announced = False
    try:
        while True:
            sock = client.socket()
            if sock is None:
                return 1
            wants = [sock] if client.want_write() else []
            readable, _, _ = select.select([sock, *terminals], wants, [], 1.0)
            if sock in readable and client.loop_read() != paho.MQTT_ERR_SUCCESS:
                return 1  # broker gone
            for fd in readable:
                if fd in terminals:
                    on_readable(fd)
            if master not in terminals:
                return 0  # the shell is gone
            if client.want_write():
                client.loop_write()
            client.loop_misc()
            if not announced and subscribed[0]:
                print("ready", flush=True)
                announced = True
    finally:
        for fd, term in terminals.items():
            term.proc.kill()
            term.proc.wait()
            os.close(fd)


def _nodelay(sock: Any) -> None:
    from bench.api import set_nodelay

    set_nodelay(sock)


class FloorProcess:
    """The ``serve`` floor (or, with ``relay_qos``, the ``relay`` floor) as a child of the bench."""

    def __init__(self, port: int, router_id: str, out_topic: str, max_inflight: int = 100,
                 relay_qos: Optional[int] = None, shell: str = "/bin/sh") -> None:
        self.router_id = router_id
        self.topics = Topics(router_id)
        self.out_topic = out_topic
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, PYTHONPATH=root)
        common = ["--port", str(port), "--router", router_id, "--out-topic", out_topic]
        if relay_qos is None:
            argv = ["serve", *common, "--max-inflight", str(max_inflight)]
        else:
            argv = ["relay", *common, "--qos", str(relay_qos), "--shell", shell]
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.floors", *argv],
                                     stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env,
                                     cwd=root)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line.strip() != b"ready":
            self.close()
            raise RuntimeError(f"floor client did not start: {line!r}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


# ---------------------------------------------------------------------- in-process floors


def drain_pty(argv: list[str]) -> tuple[bytes, float]:
    """Run ``argv`` on a fresh PTY (cooked mode) and read its master until EOF, 64 KiB a read.

    Returns the bytes and the seconds from spawn to EOF: the line discipline's own limit.
    """
    master, slave = os.openpty()
    started = time.perf_counter()
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: every slave side is closed
            break
        if not data:
            break
        chunks.append(data)
    elapsed = time.perf_counter() - started
    os.close(master)
    proc.wait()
    return b"".join(chunks), elapsed


def drain_ptys(argv: list[str], count: int) -> list[tuple[bytes, float]]:
    """``count`` copies of ``argv`` on their own PTYs at once, drained by one select loop."""

    started = time.perf_counter()
    masters: dict[int, list[bytes]] = {}
    procs = []
    for _ in range(count):
        master, slave = os.openpty()
        procs.append(subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave,
                                      start_new_session=True))
        os.close(slave)
        masters[master] = []
    ended: dict[int, float] = {}
    while len(ended) < count:
        ready, _, _ = select.select([fd for fd in masters if fd not in ended], [], [], 30)
        if not ready:
            raise RuntimeError("the parallel PTY floor stalled")
        for fd in ready:
            try:
                data = os.read(fd, 65536)
            except OSError:
                data = b""
            if data:
                masters[fd].append(data)
            else:
                ended[fd] = time.perf_counter() - started
    for fd in masters:
        os.close(fd)
    for proc in procs:
        proc.wait()
    return [(b"".join(chunks), ended[fd]) for fd, chunks in masters.items()]


class PtyEcho:
    """A local shell on a PTY: the time its line discipline takes to echo one key."""

    def __init__(self, shell: str = "/bin/sh") -> None:
        self.master, slave = os.openpty()
        self.proc = subprocess.Popen([shell], stdin=slave, stdout=slave, stderr=slave,
                                     start_new_session=True)
        os.close(slave)
        self._drain_prompt()

    def _drain_prompt(self) -> None:
        while select.select([self.master], [], [], 0.3)[0]:
            os.read(self.master, 65536)

    def sample(self, key: bytes, echo_length: int) -> float:
        started = time.perf_counter()
        os.write(self.master, key)
        got = 0
        while got < echo_length:
            got += len(os.read(self.master, 65536))
        return time.perf_counter() - started

    def close(self) -> None:
        os.close(self.master)
        self.proc.kill()
        self.proc.wait()


def import_floor(env: dict[str, str], cwd: Optional[str] = None, deferred: bool = False
                 ) -> tuple[float, int, float]:
    """Seconds from spawn to the dependencies imported, the RSS (KiB) at that point, and the
    CPU seconds the whole child used; ``deferred``: with paho's urllib.request deferred."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    code = DEFERRED_IMPORT_CODE if deferred else IMPORT_CODE
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=cwd,
                         capture_output=True, check=True).stdout.split()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    # perf_counter is CLOCK_MONOTONIC: one clock for every process on the machine
    return float(out[0]) - started, int(out[1]), cpu


def exec_floor(argv: list[str]) -> float:
    """Seconds to spawn ``argv``, collect its output and reap it."""
    started = time.perf_counter()
    subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, check=True)
    return time.perf_counter() - started


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.floors")
    sub = parser.add_subparsers(dest="command", required=True)
    serve_cmd = sub.add_parser("serve", help="the minimal echo/stream MQTT client")
    serve_cmd.add_argument("--port", type=int, required=True)
    serve_cmd.add_argument("--router", required=True)
    serve_cmd.add_argument("--out-topic", required=True)
    serve_cmd.add_argument("--max-inflight", type=int, default=100)
    relay_cmd = sub.add_parser("relay", help="the minimal keystroke relay to a shell on a PTY")
    relay_cmd.add_argument("--port", type=int, required=True)
    relay_cmd.add_argument("--router", required=True)
    relay_cmd.add_argument("--out-topic", required=True)
    relay_cmd.add_argument("--qos", type=int, default=1)
    relay_cmd.add_argument("--shell", default="/bin/sh")
    args = parser.parse_args(argv)
    try:
        if args.command == "relay":
            return relay(args.port, args.router, args.out_topic, args.qos, args.shell)
        return serve(args.port, args.router, args.out_topic, args.max_inflight)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
