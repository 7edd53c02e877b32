"""Configuration: defaults → legacy ``/etc/spotfi.env`` → TOML file → ``SPOTFI_*`` environment.

Everything ends up in one frozen dataclass tree. Every bad value raises a
:class:`ConfigError` that names where it came from (file or variable), the key,
the value (never the token's) and what was expected, because the person reading
it is a router owner looking at ``logread``.
"""

from __future__ import annotations

import difflib
import fnmatch
import os
import shlex
import stat
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping, Optional
from urllib.parse import urlsplit

from spotfi_bridge.protocol import router_id_problem

DEFAULT_TOML_PATH = "/etc/spotfi/bridge.toml"
DEFAULT_ENV_FILE = "/etc/spotfi.env"
EX_CONFIG = 78

SCHEMES: dict[str, tuple[str, bool, int]] = {
    # scheme: (paho transport, TLS, default port)
    "tcp": ("tcp", False, 1883),
    "mqtt": ("tcp", False, 1883),
    "ssl": ("tcp", True, 8883),
    "mqtts": ("tcp", True, 8883),
    "tls": ("tcp", True, 8883),
    "ws": ("websockets", False, 80),
    "wss": ("websockets", True, 443),
}


class ConfigError(Exception):
    """A configuration value that cannot be used; the message is one line for the log."""


@dataclass(frozen=True)
class RouterConfig:
    id: str
    token: str = field(repr=False)
    mac: str = ""
    name: str = ""


@dataclass(frozen=True)
class BrokerAddress:
    url: str
    scheme: str
    host: str
    port: int
    transport: str
    tls: bool
    ws_path: str


@dataclass(frozen=True)
class MqttConfig:
    broker: BrokerAddress
    keepalive: int = 30
    protocol: str = "3.1.1"
    clean_session: bool = False
    connect_timeout: float = 10.0
    backoff_min: float = 0.5
    backoff_max: float = 60.0
    stable_after: float = 60.0
    max_inbound_bytes: int = 1024 * 1024
    outbox_max_messages: int = 1000
    outbox_max_bytes: int = 8 * 1024 * 1024
    bulk_window_bytes: int = 64 * 1024


@dataclass(frozen=True)
class TlsConfig:
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    insecure: bool = False


@dataclass(frozen=True)
class MetricsConfig:
    interval: float = 30.0
    qos: int = 1


@dataclass(frozen=True)
class RpcConfig:
    backend: str = "auto"
    max_concurrent: int = 4
    queue_size: int = 64
    default_timeout: float = 30.0
    max_timeout: float = 300.0
    #: (``path.method`` glob, seconds); first match wins.
    timeouts: tuple[tuple[str, float], ...] = (("file.exec", 120.0),)
    #: how long the API waits for a call before it gives up: an older request is not run
    max_age: float = 30.0
    #: (``path.method`` glob, seconds); first match wins. ``file.exec`` runs ``opkg install``,
    #: for which the API waits 120 s.
    max_ages: tuple[tuple[str, float], ...] = (("file.exec", 120.0),)
    #: allowed difference between the router's clock and the API's (see freshness.py)
    clock_skew: float = 5.0
    output_cap: int = 1024 * 1024
    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()
    dedup_window: float = 600.0
    log_file: str = ""
    #: a reply larger than this is replaced by an error: a broker drops the connection of
    #: a client that publishes past its packet limit (EMQX: 1 MB by default), and the
    #: QoS 1 resend after the reconnect would do it again, forever
    max_reply_bytes: int = 1_000_000
    #: map the API's calls that real ubus does not answer to what does (rpc/compat.py)
    compat: bool = True
    #: where the compat layer's ``service ACTION {name}`` finds init scripts (tests move it)
    init_dir: str = "/etc/init.d"

    def timeout_for(self, path: str, method: str) -> float:
        return _first_match(self.timeouts, f"{path}.{method}", self.default_timeout)

    def max_age_for(self, path: str, method: str) -> float:
        return _first_match(self.max_ages, f"{path}.{method}", self.max_age)


def _first_match(table: tuple[tuple[str, float], ...], name: str, default: float) -> float:
    for pattern, seconds in table:
        if fnmatch.fnmatchcase(name, pattern):
            return seconds
    return default


@dataclass(frozen=True)
class TerminalConfig:
    #: argv of the login shell; empty means auto (``/bin/ash -l``, the user's shell, ``/bin/sh``).
    shell: tuple[str, ...] = ()
    max_sessions: int = 8
    #: seconds without input (``x-data`` in) before a session ends, even if it prints
    idle_timeout: float = 3600.0
    batch_bytes: int = 32 * 1024
    batch_delay_ms: float = 3.0
    outbox_bytes: int = 1024 * 1024
    qos: int = 2
    no_subscriber_timeout: float = 60.0
    #: an ``x-start`` older than this (by its ``timestamp``) opens nothing
    start_max_age: float = 30.0


@dataclass(frozen=True)
class UpdateConfig:
    #: a package download larger than this is refused (and deleted)
    max_bytes: int = 16 * 1024 * 1024
    #: how long the update helper waits for the new bridge to connect before rolling back
    confirm_timeout: float = 120.0


@dataclass(frozen=True)
class Config:
    router: RouterConfig
    mqtt: MqttConfig
    tls: TlsConfig = TlsConfig()
    metrics: MetricsConfig = MetricsConfig()
    rpc: RpcConfig = RpcConfig()
    terminal: TerminalConfig = TerminalConfig()
    update: UpdateConfig = UpdateConfig()
    log_level: str = "info"
    #: files that were read, in order; for check-config and the start-up log line
    sources: tuple[str, ...] = ()
    #: problems worth a warning that do not stop the bridge
    warnings: tuple[str, ...] = ()

    def connection_settings(self) -> tuple[Any, ...]:
        """What, when changed by a reload, requires a new MQTT connection."""
        return (self.router.id, self.router.token, self.mqtt, self.tls)

    def redacted(self) -> dict[str, Any]:
        """The effective configuration with the token masked, for ``check-config``."""
        data = asdict(self)
        data["router"]["token"] = mask_secret(self.router.token)
        data["rpc"]["timeouts"] = {pattern: seconds for pattern, seconds in self.rpc.timeouts}
        data["rpc"]["max_ages"] = {pattern: seconds for pattern, seconds in self.rpc.max_ages}
        data["mqtt"]["broker"] = self.mqtt.broker.url
        return data


def mask_secret(secret: str) -> str:
    return f"<set, {len(secret)} characters>" if secret else "<not set>"


# --------------------------------------------------------------------------- schema

Converter = Callable[[Any], Any]


@dataclass(frozen=True)
class _Key:
    expected: str
    convert: Converter
    secret: bool = False


class _Invalid(ValueError):
    pass


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise _Invalid
    return value


def _number(low: float, high: float, integer: bool = False) -> Converter:
    def convert(value: Any) -> Any:
        if isinstance(value, str):
            try:
                value = int(value) if integer else float(value)
            except ValueError:
                raise _Invalid from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Invalid
        if integer and (not isinstance(value, int)):
            raise _Invalid
        if not low <= value <= high:
            raise _Invalid
        return value if integer else float(value)

    return convert


def parse_bool(value: Any) -> bool:
    """true/false, or 1/0, yes/no, on/off as strings; raises ValueError otherwise."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("0", "false", "no", "off", ""):
        return False
    raise _Invalid


def _choice(*choices: str) -> Converter:
    def convert(value: Any) -> str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str) or value.strip().lower() not in choices:
            raise _Invalid
        return value.strip().lower()

    return convert


def _string_list(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return tuple(value)
    raise _Invalid


def _argv(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        try:
            return tuple(shlex.split(value))
        except ValueError:
            raise _Invalid from None
    if isinstance(value, list) and value and all(isinstance(item, str) and item for item in value):
        return tuple(value)
    raise _Invalid


def _absolute_dir(value: Any) -> str:
    if not isinstance(value, str) or not value.startswith("/") or "\x00" in value:
        raise _Invalid
    return value.rstrip("/") or "/"


def _router_id(value: Any) -> str:
    if not isinstance(value, str) or router_id_problem(value) is not None:
        raise _Invalid
    return value


def _seconds_table(low: float, high: float) -> Converter:
    """A table of ``"path.method" glob = seconds``, or ``"file.exec=120,uci.*=10"`` from
    the environment."""
    check = _number(low, high)

    def convert(value: Any) -> tuple[tuple[str, float], ...]:
        if isinstance(value, str):
            pairs = []
            for part in value.split(","):
                if not part.strip():
                    continue
                pattern, sep, seconds = part.partition("=")
                if not sep:
                    raise _Invalid
                pairs.append((pattern.strip(), seconds.strip()))
            value = dict(pairs)
        if not isinstance(value, dict):
            raise _Invalid
        return tuple((str(pattern), check(seconds)) for pattern, seconds in value.items())

    return convert


SCHEMA: dict[str, dict[str, _Key]] = {
    "router": {
        "id": _Key("a non-empty string without '/', '+', '#' or whitespace", _router_id),
        "token": _Key("a non-empty string", _string, secret=True),
        "mac": _Key("a string", _string),
        "name": _Key("a string", _string),
    },
    "mqtt": {
        "broker": _Key(f"a URL like mqtt://host:1883 ({', '.join(s + '://' for s in SCHEMES)})",
                       _string),
        "keepalive": _Key("an integer from 5 to 3600 (seconds)", _number(5, 3600, True)),
        "protocol": _Key('"3.1.1" or "5"', _choice("3.1.1", "5", "3", "311")),
        "clean_session": _Key("true or false", parse_bool),
        "connect_timeout": _Key("a number from 1 to 120 (seconds)", _number(1, 120)),
        "backoff_min": _Key("a number from 0.05 to 60 (seconds)", _number(0.05, 60)),
        "backoff_max": _Key("a number from 1 to 3600 (seconds)", _number(1, 3600)),
        "stable_after": _Key("a number from 1 to 3600 (seconds)", _number(1, 3600)),
        "max_inbound_bytes": _Key("an integer from 1024 to 268435455",
                                  _number(1024, 268435455, True)),
        "outbox_max_messages": _Key("an integer from 10 to 1000000", _number(10, 1e6, True)),
        "outbox_max_bytes": _Key("an integer from 65536 to 1073741824",
                                 _number(65536, 1 << 30, True)),
        "bulk_window_bytes": _Key("an integer from 4096 to 16777216 (bytes)",
                                  _number(4096, 16 << 20, True)),
    },
    "tls": {
        "ca_file": _Key("a path to a PEM file", _string),
        "cert_file": _Key("a path to a PEM file", _string),
        "key_file": _Key("a path to a PEM file", _string),
        "insecure": _Key("true or false", parse_bool),
    },
    "metrics": {
        "interval": _Key("a number from 5 to 55 (seconds; the API's heartbeat lasts 60 s)",
                         _number(5, 55)),
        "qos": _Key("0 or 1", _number(0, 1, True)),
    },
    "rpc": {
        "backend": _Key('"auto", "ubus" or "local"', _choice("auto", "ubus", "local")),
        "max_concurrent": _Key("an integer from 1 to 64", _number(1, 64, True)),
        "queue_size": _Key("an integer from 0 to 10000", _number(0, 10000, True)),
        "default_timeout": _Key("a number from 0.1 to 3600 (seconds)", _number(0.1, 3600)),
        "max_timeout": _Key("a number from 0.1 to 3600 (seconds)", _number(0.1, 3600)),
        "timeouts": _Key('a table of "path.method" glob = seconds (0.1 to 3600)',
                         _seconds_table(0.1, 3600)),
        "max_age": _Key("a number from 1 to 86400 (seconds)", _number(1, 86400)),
        "max_ages": _Key('a table of "path.method" glob = seconds (1 to 86400)',
                         _seconds_table(1, 86400)),
        "clock_skew": _Key("a number from 0 to 300 (seconds)", _number(0, 300)),
        "output_cap": _Key("an integer from 1024 to 67108864 (bytes)",
                           _number(1024, 64 << 20, True)),
        "allow": _Key('a list of "path.method" glob patterns', _string_list),
        "deny": _Key('a list of "path.method" glob patterns', _string_list),
        "dedup_window": _Key("a number from 0 to 86400 (seconds)", _number(0, 86400)),
        "log_file": _Key("a path", _string),
        "max_reply_bytes": _Key("an integer from 4096 to 268435455 (bytes; keep it under the "
                                "broker's maximum packet size)", _number(4096, 268435455, True)),
        "compat": _Key("true or false", parse_bool),
        "init_dir": _Key("an absolute path to a directory", _absolute_dir),
    },
    "terminal": {
        "shell": _Key("a command line or a list of strings", _argv),
        "max_sessions": _Key("an integer from 1 to 256", _number(1, 256, True)),
        "idle_timeout": _Key("a number from 1 to 604800 (seconds)", _number(1, 604800)),
        "batch_bytes": _Key("an integer from 512 to 1048576", _number(512, 1 << 20, True)),
        "batch_delay_ms": _Key("a number from 0 to 1000", _number(0, 1000)),
        "outbox_bytes": _Key("an integer from 65536 to 67108864", _number(65536, 64 << 20, True)),
        "qos": _Key("0, 1 or 2", _number(0, 2, True)),
        "no_subscriber_timeout": _Key("a number from 1 to 86400 (seconds)", _number(1, 86400)),
        "start_max_age": _Key("a number from 1 to 86400 (seconds)", _number(1, 86400)),
    },
    "update": {
        "max_bytes": _Key("an integer from 65536 to 268435456 (bytes)",
                          _number(65536, 256 << 20, True)),
        "confirm_timeout": _Key("a number from 5 to 3600 (seconds)", _number(5, 3600)),
    },
    "log": {
        "level": _Key('"debug", "info", "warning" or "error"',
                      _choice("debug", "info", "warning", "error")),
    },
}

#: Legacy names of /etc/spotfi.env that do not follow SPOTFI_<SECTION>_<KEY>.
LEGACY_ENV_NAMES = {
    "SPOTFI_TOKEN": ("router", "token"),
    "SPOTFI_MAC": ("router", "mac"),
}
IGNORED_ENV_NAMES = {
    "SPOTFI_WS_URL": "SPOTFI_WS_URL is ignored: this bridge talks to SpotFi over MQTT only",
}
#: Variables that steer loading itself, not config keys.
LOADER_ENV_NAMES = {"SPOTFI_CONFIG", "SPOTFI_ENV_FILE"}
#: SPOTFI_* variables of other programs (spotfi-bridge-ctl, the package's launcher and update
#: helper, bench) and the tests' own hooks (SPOTFI_TEST_*): not settings, never warned about.
OTHER_PROGRAMS_ENV_PREFIXES = ("SPOTFI_CTL_", "SPOTFI_BRIDGE_", "SPOTFI_TEST_")


def env_name(section: str, key: str) -> str:
    for name, target in LEGACY_ENV_NAMES.items():
        if target == (section, key):
            return name
    return f"SPOTFI_{section.upper()}_{key.upper()}"


def _env_key(name: str) -> Optional[tuple[str, str]]:
    if name in LEGACY_ENV_NAMES:
        return LEGACY_ENV_NAMES[name]
    if not name.startswith("SPOTFI_"):
        return None
    rest = name[len("SPOTFI_"):].lower()
    for section, keys in SCHEMA.items():
        prefix = section + "_"
        if rest.startswith(prefix) and rest[len(prefix):] in keys:
            return section, rest[len(prefix):]
    return None


# --------------------------------------------------------------------------- loading

_Raw = dict[tuple[str, str], tuple[Any, str]]  # (section, key) -> (value, where it came from)


def parse_env_file(path: str, text: str) -> tuple[dict[str, str], list[str]]:
    """KEY=value lines as the legacy shell-sourced file writes them."""
    values: dict[str, str] = {}
    problems: list[str] = []
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.startswith("export "):
            stripped = stripped[len("export "):].strip()
        name, sep, value = stripped.partition("=")
        name = name.strip()
        if not sep or not name.replace("_", "").isalnum():
            problems.append(f"{path}:{number}: expected NAME=value, line ignored")
            continue
        value = value.strip()
        try:
            parts = shlex.split(value, comments=True) if value else [""]
        except ValueError:
            raise ConfigError(f"{path}:{number}: {name}: unbalanced quotes") from None
        values[name] = " ".join(parts) if parts else ""
    return values, problems


def _unknown_env_warning(name: str) -> str:
    """The warning for a SPOTFI_* name that is no setting, with the likely intended one."""
    known = {env_name(section, key) for section, keys in SCHEMA.items() for key in keys}
    known |= LOADER_ENV_NAMES | set(LEGACY_ENV_NAMES)
    suffixes = {candidate[len("SPOTFI_"):]: candidate for candidate in known}
    close = difflib.get_close_matches(name[len("SPOTFI_"):].upper(), suffixes, n=1, cutoff=0.75)
    hint = f"; did you mean {suffixes[close[0]]}?" if close else ""
    return f"unknown setting, ignored{hint}"


def _collect_env(values: Mapping[str, str], where: Callable[[str], str], raw: _Raw,
                 warnings: list[str]) -> None:
    for name, value in values.items():
        if name in IGNORED_ENV_NAMES:
            warnings.append(f"{where(name)}: {IGNORED_ENV_NAMES[name]}")
            continue
        if name in LOADER_ENV_NAMES:
            continue
        target = _env_key(name)
        if target is None:
            if name.startswith("SPOTFI_") and not name.startswith(OTHER_PROGRAMS_ENV_PREFIXES):
                warnings.append(f"{where(name)}: {_unknown_env_warning(name)}")
            continue
        raw[target] = (value, where(name))


def read_toml(path: str, what: str = "config file") -> dict[str, Any]:
    """The TOML document at ``path``; a ConfigError naming the file when it cannot be had."""
    # imported here: most routers run from /etc/spotfi.env alone and never pay for it
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - exercised on Python < 3.11 only
        import tomli as tomllib
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read {what}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def _collect_toml(path: str, raw: _Raw) -> None:
    document = read_toml(path)
    for section, table in document.items():
        if section not in SCHEMA:
            raise ConfigError(f"{path}: unknown section [{section}]; expected one of "
                              f"{', '.join('[' + name + ']' for name in SCHEMA)}")
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: '{section}' must be a table [{section}]")
        for key, value in table.items():
            if key not in SCHEMA[section]:
                raise ConfigError(f"{path}: [{section}] unknown key '{key}'; expected one of "
                                  f"{', '.join(SCHEMA[section])}")
            raw[(section, key)] = (value, path)


def _file_mode_warning(path: str, secret_inside: bool) -> Optional[str]:
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if secret_inside and mode & (stat.S_IRWXG | stat.S_IRWXO):
        return (f"{path}: holds the router token but is readable by group or others "
                f"(mode {stat.S_IMODE(mode):04o}); run: chmod 600 {path}")
    return None


def _no_password() -> bytes:
    """An encrypted key is refused at once instead of OpenSSL asking for a pass phrase."""
    return b""


def check_tls_files(tls: TlsConfig, where: Callable[[str], str]) -> None:
    """Load the CA file, the client certificate and its key as the link will, so a file that
    is not what it should be is a config error now rather than a link that dies later.

    ``where(key)`` names the file or variable that set ``[tls] key``."""
    if not (tls.ca_file or tls.cert_file):
        return
    import ssl  # only routers with TLS files pay for it here

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if tls.ca_file:
        try:
            context.load_verify_locations(cafile=tls.ca_file)
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise ConfigError(f"{where('ca_file')}: [tls] ca_file = {tls.ca_file!r} is invalid: "
                              f"expected a file of PEM certificates (-----BEGIN CERTIFICATE-----)"
                              f"; {_ssl_reason(exc)}") from None
    if not tls.cert_file:
        return
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=tls.cert_file)
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise ConfigError(f"{where('cert_file')}: [tls] cert_file = {tls.cert_file!r} is "
                          f"invalid: expected a PEM client certificate "
                          f"(-----BEGIN CERTIFICATE-----); {_ssl_reason(exc)}") from None
    try:
        context.load_cert_chain(tls.cert_file, tls.key_file or None, password=_no_password)
    except (ssl.SSLError, OSError, ValueError) as exc:
        key, path = ("key_file", tls.key_file) if tls.key_file else ("cert_file", tls.cert_file)
        if "KEY_VALUES_MISMATCH" in str(exc):
            expected = f"the private key of the certificate in {tls.cert_file}"
            problem = "does not match cert_file"
        else:
            expected = "an unencrypted PEM private key (-----BEGIN PRIVATE KEY-----)"
            problem = "is invalid"
        raise ConfigError(f"{where(key)}: [tls] {key} = {path!r} {problem}: expected "
                          f"{expected}; {_ssl_reason(exc)}") from None


def _ssl_reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc)
    return f"OpenSSL says: {reason}"


def parse_broker_url(url: str) -> BrokerAddress:
    """Raises ``_Invalid`` (turned into a ConfigError by the caller) on a bad URL."""
    text = url.strip()
    if "://" not in text:
        text = "tcp://" + text
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        raise _Invalid from None
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES or not parts.hostname or port == 0:
        raise _Invalid
    transport, tls, default_port = SCHEMES[scheme]
    ws_path = parts.path or "/mqtt"
    if parts.query:
        ws_path += "?" + parts.query
    return BrokerAddress(url.strip(), scheme, parts.hostname, port or default_port, transport,
                         tls, ws_path if transport == "websockets" else "")


def load_config(
    config_path: Optional[str] = None,
    environ: Optional[Mapping[str, str]] = None,
    env_file: Optional[str] = None,
) -> Config:
    """Build the effective configuration. Raises :class:`ConfigError`."""
    environ = os.environ if environ is None else environ
    explicit_env_file = env_file or environ.get("SPOTFI_ENV_FILE")
    env_file = explicit_env_file or DEFAULT_ENV_FILE
    raw: _Raw = {}
    warnings: list[str] = []
    sources: list[str] = []

    if explicit_env_file and not os.path.exists(explicit_env_file):
        # the default file may be absent (a router set up by hand); one named on purpose not
        raise ConfigError(f"{explicit_env_file}: env file not found (named by SPOTFI_ENV_FILE; "
                          f"{os.devnull} for none)")
    if os.path.exists(env_file):
        try:
            with open(env_file, encoding="utf-8", errors="replace") as handle:
                text = handle.read()
        except OSError as exc:
            raise ConfigError(f"{env_file}: cannot read: {exc.strerror}") from None
        values, problems = parse_env_file(env_file, text)
        warnings.extend(problems)
        _collect_env(values, lambda name: f"{env_file}: {name}", raw, warnings)
        if env_file != os.devnull:
            sources.append(env_file)
        problem = _file_mode_warning(env_file, "SPOTFI_TOKEN" in values)
        if problem:
            warnings.append(problem)

    explicit = config_path or environ.get("SPOTFI_CONFIG")
    toml_path = explicit or DEFAULT_TOML_PATH
    if explicit or os.path.exists(toml_path):
        if not os.path.exists(toml_path):
            raise ConfigError(f"{toml_path}: config file not found")
        before = dict(raw)
        _collect_toml(toml_path, raw)
        sources.append(toml_path)
        token_here = raw.get(("router", "token"), (None, ""))[1] == toml_path
        problem = _file_mode_warning(toml_path, token_here and raw != before)
        if problem:
            warnings.append(problem)

    _collect_env({k: v for k, v in environ.items() if k.startswith("SPOTFI_")},
                 lambda name: f"environment variable {name}", raw, warnings)
    return _build(raw, tuple(sources), tuple(warnings), (toml_path, env_file))


def _value(raw: _Raw, section: str, key: str) -> Any:
    """The converted value, or ``None`` when the key was not set anywhere."""
    if (section, key) not in raw:
        return None
    value, where = raw[(section, key)]
    spec = SCHEMA[section][key]
    try:
        return spec.convert(value)
    except _Invalid:
        shown = "(hidden)" if spec.secret else repr(value)
        raise ConfigError(f"{where}: [{section}] {key} = {shown} is invalid: expected "
                          f"{spec.expected}") from None


def _section(raw: _Raw, section: str) -> dict[str, Any]:
    values = {}
    for key in SCHEMA[section]:
        value = _value(raw, section, key)
        if value is not None:
            values[key] = value
    return values


#: The keys without which the bridge cannot connect.
REQUIRED_KEYS = (("router", "id"), ("router", "token"), ("mqtt", "broker"))


def _check_required(raw: _Raw, files: tuple[str, str]) -> None:
    """One error naming every required key that is missing, and the files it reads."""
    missing = [(section, key) for section, key in REQUIRED_KEYS
               if (section, key) not in raw or raw[(section, key)][0] in ("", None)]
    if not missing:
        return
    toml_path, env_file = files
    names = ", ".join(env_name(section, key) for section, key in missing)
    places = [path for path in (toml_path, env_file) if path != os.devnull]
    if env_file in places:
        places[-1] += f" ({names})"
    places.append(f"the environment ({names})")
    where = ", ".join(places[:-1]) + (" or " if len(places) > 1 else "") + places[-1]
    raise ConfigError("; ".join(f"[{section}] {key} is not set: expected "
                                f"{SCHEMA[section][key].expected}" for section, key in missing)
                      + f"; set {'it' if len(missing) == 1 else 'them'} in {where}")


def _required(raw: _Raw, section: str, key: str) -> Any:
    """A required key's value; :func:`_check_required` has made sure it is set."""
    return _value(raw, section, key)


def _where(raw: _Raw, section: str, *keys: str) -> str:
    """Where the first of ``keys`` that was set came from (a limit broken by defaults alone
    cannot happen, so one of them was set)."""
    for key in keys:
        if (section, key) in raw:
            return str(raw[(section, key)][1])
    return "defaults"


def _build(raw: _Raw, sources: tuple[str, ...], warnings: tuple[str, ...],
           files: tuple[str, str] = (DEFAULT_TOML_PATH, DEFAULT_ENV_FILE)) -> Config:
    _check_required(raw, files)
    router = RouterConfig(
        id=_required(raw, "router", "id"),
        token=_required(raw, "router", "token"),
        **{k: v for k, v in _section(raw, "router").items() if k in ("mac", "name")},
    )
    url = _required(raw, "mqtt", "broker")
    try:
        broker = parse_broker_url(url)
    except _Invalid:
        raise ConfigError(f"{raw[('mqtt', 'broker')][1]}: [mqtt] broker = {url!r} is invalid: "
                          f"expected {SCHEMA['mqtt']['broker'].expected}") from None
    mqtt_values = _section(raw, "mqtt")
    mqtt_values["broker"] = broker
    if "protocol" in mqtt_values:
        mqtt_values["protocol"] = "5" if mqtt_values["protocol"] == "5" else "3.1.1"
    mqtt = MqttConfig(**mqtt_values)
    if mqtt.backoff_max < mqtt.backoff_min:
        where = _where(raw, "mqtt", "backoff_max", "backoff_min")
        raise ConfigError(f"{where}: [mqtt] backoff_max = {mqtt.backoff_max} is invalid: expected a "
                          f"number not below backoff_min ({mqtt.backoff_min})")
    tls = TlsConfig(**_section(raw, "tls"))
    for key in ("ca_file", "cert_file", "key_file"):
        path = getattr(tls, key)
        if path and not os.path.isfile(path):
            raise ConfigError(f"{raw[('tls', key)][1]}: [tls] {key} = {path!r} is invalid: "
                              f"expected an existing PEM file")
    if bool(tls.cert_file) != bool(tls.key_file) and not tls.cert_file:
        raise ConfigError(f"{raw[('tls', 'key_file')][1]}: [tls] key_file is set without "
                          f"cert_file: expected both or neither")
    check_tls_files(tls, lambda key: str(raw[("tls", key)][1]))
    rpc_values = _section(raw, "rpc")
    for key, builtin in (("timeouts", RpcConfig.timeouts), ("max_ages", RpcConfig.max_ages)):
        if key in rpc_values:  # the user's patterns first; built-in ones still apply after
            user = rpc_values[key]
            rpc_values[key] = user + tuple((pattern, seconds) for pattern, seconds in builtin
                                           if pattern not in {p for p, _ in user})
    rpc = RpcConfig(**rpc_values)
    if rpc.max_timeout < rpc.default_timeout:
        raise ConfigError(f"{_where(raw, 'rpc', 'max_timeout', 'default_timeout')}: [rpc] "
                          f"max_timeout = {rpc.max_timeout} is invalid: expected a number not "
                          f"below default_timeout ({rpc.default_timeout})")
    if tls.insecure:
        where = _where(raw, "tls", "insecure")
        warnings += ((f"{where}: [tls] insecure = true: the broker's certificate and host name "
                      "are NOT verified; anyone on the path can pose as the broker and read the "
                      "router token") if broker.tls else
                     (f"{where}: [tls] insecure = true has no effect: the broker URL "
                      f"{broker.scheme}:// does not use TLS"),)
    log_values = _section(raw, "log")
    return Config(
        router=router,
        mqtt=mqtt,
        tls=tls,
        metrics=MetricsConfig(**_section(raw, "metrics")),
        rpc=rpc,
        terminal=TerminalConfig(**_section(raw, "terminal")),
        update=UpdateConfig(**_section(raw, "update")),
        log_level=log_values.get("level", "info"),
        sources=sources,
        warnings=warnings,
    )
