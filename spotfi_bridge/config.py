"""Configuration: defaults → legacy ``/etc/spotfi.env`` → TOML file → ``SPOTFI_*`` environment.

Everything ends up in one frozen dataclass tree. Every bad value raises a
:class:`ConfigError` that names where it came from (file or variable), the key,
the value (never the token's) and what was expected, because the person reading
it is a router owner looking at ``logread``.
"""

from __future__ import annotations

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
    max_age: float = 300.0
    output_cap: int = 1024 * 1024
    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()
    dedup_window: float = 600.0
    log_file: str = ""
    #: a reply larger than this is replaced by an error: a broker drops the connection of
    #: a client that publishes past its packet limit (EMQX: 1 MB by default), and the
    #: QoS 1 resend after the reconnect would do it again, forever
    max_reply_bytes: int = 1_000_000

    def timeout_for(self, path: str, method: str) -> float:
        name = f"{path}.{method}"
        for pattern, seconds in self.timeouts:
            if fnmatch.fnmatchcase(name, pattern):
                return seconds
        return self.default_timeout


@dataclass(frozen=True)
class TerminalConfig:
    #: argv of the login shell; empty means auto (``/bin/ash -l``, the user's shell, ``/bin/sh``).
    shell: tuple[str, ...] = ()
    max_sessions: int = 8
    idle_timeout: float = 3600.0
    batch_bytes: int = 32 * 1024
    batch_delay_ms: float = 3.0
    outbox_bytes: int = 1024 * 1024
    qos: int = 2
    no_subscriber_timeout: float = 60.0


@dataclass(frozen=True)
class Config:
    router: RouterConfig
    mqtt: MqttConfig
    tls: TlsConfig = TlsConfig()
    metrics: MetricsConfig = MetricsConfig()
    rpc: RpcConfig = RpcConfig()
    terminal: TerminalConfig = TerminalConfig()
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


def _router_id(value: Any) -> str:
    if not isinstance(value, str) or router_id_problem(value) is not None:
        raise _Invalid
    return value


def _timeouts(value: Any) -> tuple[tuple[str, float], ...]:
    if isinstance(value, str):  # "file.exec=120,uci.*=10" from the environment
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
    check = _number(0.1, 3600)
    return tuple((str(pattern), check(seconds)) for pattern, seconds in value.items())


SCHEMA: dict[str, dict[str, _Key]] = {
    "router": {
        "id": _Key("a non-empty string without '/', '+', '#' or whitespace", _router_id),
        "token": _Key("a non-empty string", _string, secret=True),
        "mac": _Key("a string", _string),
        "name": _Key("a string", _string),
    },
    "mqtt": {
        "broker": _Key("a URL like mqtt://host:1883 (tcp, mqtt, ssl, mqtts, ws, wss)", _string),
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
        "timeouts": _Key('a table of "path.method" glob = seconds (0.1 to 3600)', _timeouts),
        "max_age": _Key("a number from 1 to 86400 (seconds)", _number(1, 86400)),
        "output_cap": _Key("an integer from 1024 to 67108864 (bytes)",
                           _number(1024, 64 << 20, True)),
        "allow": _Key('a list of "path.method" glob patterns', _string_list),
        "deny": _Key('a list of "path.method" glob patterns', _string_list),
        "dedup_window": _Key("a number from 0 to 86400 (seconds)", _number(0, 86400)),
        "log_file": _Key("a path", _string),
        "max_reply_bytes": _Key("an integer from 4096 to 268435455 (bytes; keep it under the "
                                "broker's maximum packet size)", _number(4096, 268435455, True)),
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


def _collect_env(values: Mapping[str, str], where: Callable[[str], str], raw: _Raw,
                 warnings: list[str], warn_unknown: bool) -> None:
    for name, value in values.items():
        if name in IGNORED_ENV_NAMES:
            warnings.append(f"{where(name)}: {IGNORED_ENV_NAMES[name]}")
            continue
        if name in LOADER_ENV_NAMES:
            continue
        target = _env_key(name)
        if target is None:
            if warn_unknown and name.startswith("SPOTFI_"):
                warnings.append(f"{where(name)}: unknown setting, ignored")
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
    env_file = env_file or environ.get("SPOTFI_ENV_FILE") or DEFAULT_ENV_FILE
    raw: _Raw = {}
    warnings: list[str] = []
    sources: list[str] = []

    if os.path.exists(env_file):
        try:
            with open(env_file, encoding="utf-8", errors="replace") as handle:
                text = handle.read()
        except OSError as exc:
            raise ConfigError(f"{env_file}: cannot read: {exc.strerror}") from None
        values, problems = parse_env_file(env_file, text)
        warnings.extend(problems)
        _collect_env(values, lambda name: f"{env_file}: {name}", raw, warnings, True)
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
                 lambda name: f"environment variable {name}", raw, warnings, False)
    return _build(raw, tuple(sources), tuple(warnings))


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


def _required(raw: _Raw, section: str, key: str) -> Any:
    value = _value(raw, section, key)
    if value is None or value == "":
        raise ConfigError(
            f"[{section}] {key} is not set: expected {SCHEMA[section][key].expected}; set it "
            f"in {DEFAULT_TOML_PATH}, {DEFAULT_ENV_FILE} ({env_name(section, key)}) or the "
            f"environment ({env_name(section, key)})")
    return value


def _where(raw: _Raw, section: str, *keys: str) -> str:
    """Where the first of ``keys`` that was set came from (a limit broken by defaults alone
    cannot happen, so one of them was set)."""
    for key in keys:
        if (section, key) in raw:
            return str(raw[(section, key)][1])
    return "defaults"


def _build(raw: _Raw, sources: tuple[str, ...], warnings: tuple[str, ...]) -> Config:
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
    rpc_values = _section(raw, "rpc")
    if "timeouts" in rpc_values:  # the user's patterns first; built-in ones still apply after
        user = rpc_values["timeouts"]
        rpc_values["timeouts"] = user + tuple(
            (pattern, seconds) for pattern, seconds in RpcConfig.timeouts
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
        log_level=log_values.get("level", "info"),
        sources=sources,
        warnings=warnings,
    )
