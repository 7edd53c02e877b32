"""One paho-mqtt surface over 1.6.1 (OpenWrt's feeds) and 2.x (PyPI, OpenWrt master).

paho 2.0 changed every callback's signature and turned result codes into
``ReasonCode`` objects. The rest of the bridge sees only the normalised
callbacks installed by :func:`bind_callbacks`.
"""

from __future__ import annotations

import importlib.util
import socket
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

if TYPE_CHECKING:
    import ssl


def _defer_import(name: str) -> None:
    """Register ``name`` as a module that is executed only when a name it defines is first
    looked up (PEP 562's module ``__getattr__``), unless it is already loaded: nothing
    changes for whoever uses it.

    paho (1.6.1 and 2.x) imports ``urllib.request`` (with http.client, email and tempfile:
    1.8 MiB on a 32-bit router) only to read proxy settings from the environment, which it
    does only when PySocks is installed (and then in the one connect thread). The stdlib's
    ``LazyLoader`` would not do: from Python 3.12 on, the import statement itself reads the
    module's ``__spec__``, which makes a ``LazyLoader`` module load at once.
    """
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        return
    loader = spec.loader
    module = importlib.util.module_from_spec(spec)

    def load(attribute: str) -> Any:
        del module.__dict__["__getattr__"]
        loader.exec_module(module)
        return getattr(module, attribute)

    module.__dict__["__getattr__"] = load
    sys.modules[name] = module
    parent, _, child = name.rpartition(".")
    setattr(sys.modules[parent], child, module)


_defer_import("urllib.request")

import paho.mqtt.client as paho  # noqa: E402

PAHO_2 = hasattr(paho, "CallbackAPIVersion")
PAHO_VERSION: str = getattr(paho, "__version__", "") or __import__("paho.mqtt").mqtt.__version__

#: CONNACK codes meaning "your credentials were refused" (3.1.1: 4, 5; MQTT 5: 134, 135).
AUTH_REFUSED_CODES = frozenset({4, 5, 134, 135})


@dataclass(frozen=True)
class ConnectResult:
    ok: bool
    code: int
    reason: str
    session_present: bool

    @property
    def auth_refused(self) -> bool:
        return self.code in AUTH_REFUSED_CODES


def _code(value: Any) -> int:
    """An int out of an int, a paho 1.x ReasonCodes or a paho 2.x ReasonCode."""
    if isinstance(value, int):
        return value
    return int(getattr(value, "value", 0) or 0)


def _connack_reason(code: int, value: Any) -> str:
    """paho's words, without their final full stop (log lines add their own punctuation)."""
    if not isinstance(value, int):
        return str(value).rstrip(".")
    return str(paho.connack_string(code)).rstrip(".")


def new_client(client_id: str, *, clean_session: bool, protocol: str = "3.1.1",
               transport: str = "tcp") -> paho.Client:
    proto = paho.MQTTv5 if protocol == "5" else paho.MQTTv311
    kwargs: dict[str, Any] = {"client_id": client_id, "protocol": proto, "transport": transport}
    if proto != paho.MQTTv5:
        kwargs["clean_session"] = clean_session
    if PAHO_2:
        kwargs["callback_api_version"] = paho.CallbackAPIVersion.VERSION2
    return paho.Client(**kwargs)


def connect_properties(protocol: str, clean_session: bool) -> Any:
    """MQTT 5 keeps the session with a session-expiry interval instead of clean_session."""
    if protocol != "5" or clean_session:
        return None
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 3600
    return props


def bind_callbacks(
    client: paho.Client,
    *,
    on_connect: Callable[[ConnectResult], None],
    on_disconnect: Callable[[int], None],
    on_message: Optional[Callable[[str, bytes, int, bool], None]],
    on_publish: Callable[[int], None],
) -> None:
    """Install version-neutral callbacks: ``on_message(topic, payload, qos, retain)``.

    ``on_message=None`` leaves ``client.on_message`` to the caller: its signature,
    ``(client, userdata, message)``, is the same in every paho version.
    """

    def connect_cb(_client: Any, _userdata: Any, flags: Any, rc: Any, *_rest: Any) -> None:
        code = _code(rc)
        if isinstance(flags, dict):
            session_present = bool(flags.get("session present"))
        else:
            session_present = bool(getattr(flags, "session_present", False))
        on_connect(ConnectResult(code == 0, code, _connack_reason(code, rc), session_present))

    def disconnect_cb(_client: Any, _userdata: Any, *args: Any) -> None:
        # 1.x: (rc) or (rc, properties); 2.x: (flags, reason_code, properties)
        if PAHO_2:
            on_disconnect(_code(args[1]) if len(args) > 1 else 0)
        else:
            on_disconnect(_code(args[0]) if args else 0)

    def message_cb(_client: Any, _userdata: Any, message: Any) -> None:
        assert on_message is not None
        on_message(message.topic, message.payload, message.qos, bool(message.retain))

    def publish_cb(_client: Any, _userdata: Any, mid: int, *_rest: Any) -> None:
        on_publish(mid)

    client.on_connect = connect_cb
    client.on_disconnect = disconnect_cb
    if on_message is not None:
        client.on_message = message_cb
    client.on_publish = publish_cb


#: PUBACK / PUBREC reason code (MQTT 5): accepted, but no subscription matched the topic.
NO_MATCHING_SUBSCRIBERS = 16


def watch_publish_acks(client: paho.Client, on_ack: Callable[[int, int], None]) -> None:
    """Call ``on_ack(mid, reason_code)`` for every PUBACK (QoS 1) and PUBREC (QoS 2).

    Neither paho passes these reason codes on: 1.6.1's ``on_publish`` has no reason
    argument (``_handle_pubackcomp`` and ``_handle_pubrec`` parse and drop it), and
    2.x's comes from PUBCOMP for QoS 2, after the one that matters. Both keep the
    packet being handled in ``_in_packet["packet"]``: packet id (2 bytes), then, in
    MQTT 5, the reason code byte when it is not 0. The hooks read it there before
    paho handles the packet, which then goes on unchanged.
    """
    handle_puback = client._handle_pubackcomp
    handle_pubrec = client._handle_pubrec

    def report() -> None:
        packet = bytes(client._in_packet.get("packet", b""))
        if len(packet) >= 2:
            on_ack(int.from_bytes(packet[:2], "big"), packet[2] if len(packet) > 2 else 0)

    def pubackcomp(cmd: str) -> Any:
        if cmd == "PUBACK":
            report()
        return handle_puback(cmd)

    def pubrec() -> Any:
        report()
        return handle_pubrec()

    client._handle_pubackcomp = pubackcomp  # type: ignore[method-assign]
    client._handle_pubrec = pubrec  # type: ignore[method-assign]


def keep_release_state(client: paho.Client) -> None:
    """Call before every ``reconnect()``: keeps QoS 2 exactly once across failed attempts.

    ``reconnect()`` (1.6.1 and 2.x alike) turns a QoS 2 message waiting for PUBCOMP
    into "resend PUBREL" and every other unacknowledged one into "resend PUBLISH". A
    second ``reconnect()`` before a CONNACK (an attempt that timed out) finds "resend
    PUBREL" and makes it "resend PUBLISH": the broker, which released that message on
    the first PUBREL, forwards it again. Putting those messages back to "waiting for
    PUBCOMP" lets the reset map them to PUBREL again.
    """
    with client._out_message_mutex:
        for message in client._out_messages.values():
            if message.qos == 2 and message.state == paho.mqtt_ms_resend_pubrel:
                message.state = paho.mqtt_ms_wait_for_pubcomp


def set_connect_timeout(client: paho.Client, seconds: float) -> None:
    """Bound the TCP connect (and TLS/WebSocket handshake) inside ``reconnect()``."""
    if hasattr(type(client), "connect_timeout"):
        client.connect_timeout = seconds
    else:
        client._connect_timeout = seconds


def set_nodelay(sock: Any) -> None:
    """paho never sets TCP_NODELAY: without it each keystroke echo waits for Nagle and
    delayed ACKs (tens of ms). Works under paho's WebSocket wrapper too."""
    raw = getattr(sock, "_socket", sock)
    try:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):
        pass


def tls_context(ca_file: str = "", cert_file: str = "", key_file: str = "",
                insecure: bool = False) -> ssl.SSLContext:
    """Certificate and host name verification on, unless ``insecure`` says otherwise."""
    import ssl

    context = ssl.create_default_context(cafile=ca_file or None)
    if cert_file:
        context.load_cert_chain(cert_file, key_file or None)
    if insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def describe_error(exc: BaseException) -> str:
    """One line for a failed connection attempt, as a router owner reads it in logread."""
    import ssl

    if isinstance(exc, ssl.SSLCertVerificationError):
        detail = str(exc.verify_message or exc).rstrip(".")
        return f"TLS certificate verification failed: {detail}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS error: {exc.reason or exc}"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host name ({exc.strerror})"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (no broker listening on that port)"
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def error_string(rc: int) -> str:
    """paho's words for ``rc``, without their final full stop."""
    return str(paho.error_string(rc)).rstrip(".")


def publish_rc(info: Any) -> int:
    return int(getattr(info, "rc", 0))


def message_mid(info: Any) -> int:
    return int(info.mid)


def subscribe_mid(result: Any) -> int:
    """The packet id of ``client.subscribe()``'s ``(rc, mid)``."""
    return int(result[1])


def sock_of(client: paho.Client) -> Optional[Any]:
    return client.socket()
