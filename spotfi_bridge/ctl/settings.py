"""Where ``spotfi-bridge-ctl`` gets its broker, credentials and router: flags, environment, file.

Precedence, highest first: command-line flags, ``SPOTFI_CTL_*`` environment
variables, the TOML file (``--config``, ``$SPOTFI_CTL_CONFIG`` or
``~/.config/spotfi/ctl.toml``), defaults. The dry run writes such a file and
exports its path, so a developer types no flags at all.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

from spotfi_bridge.config import (
    BrokerAddress,
    ConfigError,
    parse_bool,
    parse_broker_url,
    read_toml,
)
from spotfi_bridge.protocol import router_id_problem

DEFAULT_BROKER = "mqtt://127.0.0.1:1883"
ENV_PREFIX = "SPOTFI_CTL_"
ALL_ROUTERS = "+"


class SettingsError(Exception):
    """A setting that cannot be used; the message names where it came from."""


@dataclass(frozen=True)
class Settings:
    broker: BrokerAddress
    router: str = ""
    username: str = ""
    password: str = field(default="", repr=False)
    cafile: str = ""
    cert: str = ""
    key: str = ""
    insecure: bool = False
    #: files that were read, for error messages
    sources: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()

    def require_router(self, allow_all: bool = False) -> str:
        """The router id, checked: the topic tree forbids wildcards and '/' in ids."""
        if not self.router:
            raise SettingsError("no router id: pass --router ID, set SPOTFI_CTL_ROUTER or put "
                                "router = \"ID\" in the ctl config file")
        if allow_all and self.router == ALL_ROUTERS:
            return self.router
        problem = router_id_problem(self.router)
        if problem:
            raise SettingsError(f"router id {self.router!r} {problem}")
        return self.router

    @property
    def public_broker(self) -> str:
        """The broker URL without credentials, for messages."""
        b = self.broker
        return f"{b.scheme}://{b.host}:{b.port}{b.ws_path}"


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("expected a string")
    return value


def _flag(value: Any) -> bool:
    try:
        return parse_bool(value)
    except ValueError:
        raise ValueError("expected true or false") from None


#: key → converter; the same names in the file, as SPOTFI_CTL_<KEY> and as --<key> flags
KEYS: dict[str, Callable[[Any], Any]] = {
    "broker": _text,
    "router": _text,
    "username": _text,
    "password": _text,
    "cafile": _text,
    "cert": _text,
    "key": _text,
    "insecure": _flag,
}
_SECRET = {"password"}


def default_config_path(environ: Mapping[str, str]) -> str:
    base = environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "spotfi", "ctl.toml")


def _read_file(path: str) -> dict[str, Any]:
    try:
        document = read_toml(path, "ctl config")
    except ConfigError as exc:
        raise SettingsError(str(exc)) from None
    unknown = [name for name in document if name not in KEYS]
    if unknown:
        raise SettingsError(f"{path}: unknown key {unknown[0]!r}; expected one of {', '.join(KEYS)}")
    return dict(document)


def resolve(flags: Mapping[str, Any], environ: Optional[Mapping[str, str]] = None,
            config_path: Optional[str] = None) -> Settings:
    """Merge file, environment and ``flags`` (``None`` values mean "not given")."""
    environ = os.environ if environ is None else environ
    raw: dict[str, tuple[Any, str]] = {}
    sources: list[str] = []
    warnings: list[str] = []

    explicit = config_path or environ.get(ENV_PREFIX + "CONFIG")
    path = explicit or default_config_path(environ)
    if explicit or os.path.exists(path):
        if not os.path.exists(path):
            raise SettingsError(f"{path}: ctl config file not found")
        from_file = _read_file(path)
        for name, value in from_file.items():
            raw[name] = (value, f"{path}: {name}")
        sources.append(path)
        if from_file.get("password") and _group_readable(path):
            warnings.append(f"{path} holds a password but is readable by others; "
                            f"run: chmod 600 {path}")
    for name in KEYS:
        env = ENV_PREFIX + name.upper()
        if environ.get(env) is not None:
            raw[name] = (environ[env], f"environment variable {env}")
    for name in KEYS:
        if flags.get(name) is not None:
            raw[name] = (flags[name], f"--{name}")

    values: dict[str, Any] = {}
    for name, (value, where) in raw.items():
        try:
            values[name] = KEYS[name](value)
        except ValueError as exc:
            shown = "(hidden)" if name in _SECRET else repr(value)
            raise SettingsError(f"{where} = {shown} is invalid: {exc}") from None

    url = values.pop("broker", "") or DEFAULT_BROKER
    try:
        broker = parse_broker_url(url)
    except ValueError:
        where = raw.get("broker", (None, "default"))[1]
        raise SettingsError(f"{where}: broker {url!r} is invalid: expected a URL like "
                            "mqtt://host:1883 (tcp, mqtt, ssl, mqtts, ws, wss)") from None
    for name in ("cafile", "cert", "key"):
        if values.get(name) and not os.path.isfile(values[name]):
            raise SettingsError(f"{raw[name][1]}: {values[name]!r} is not a file")
    if values.get("key") and not values.get("cert"):
        raise SettingsError(f"{raw['key'][1]}: a client key needs a client certificate (--cert)")
    if not broker.tls and any(values.get(name) for name in ("cafile", "cert", "key", "insecure")):
        raise SettingsError(f"TLS options were given but the broker URL {url!r} is not a TLS one: "
                            "use mqtts://host:8883 (or ssl://, wss://)")
    if values.get("password") and not values.get("username"):
        raise SettingsError("a password was given without a username (--username)")
    return Settings(broker=broker, sources=tuple(sources), warnings=tuple(warnings), **values)


def _group_readable(path: str) -> bool:
    try:
        return bool(os.stat(path).st_mode & (stat.S_IRWXG | stat.S_IRWXO))
    except OSError:
        return False


def write_config(path: str, broker: str, router: str) -> None:
    """The file the dry run hands to ctl (mode 600: it may later hold a password)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write("# spotfi-bridge-ctl settings; flags and SPOTFI_CTL_* variables override them\n"
                     f"broker = {_toml_string(broker)}\nrouter = {_toml_string(router)}\n")


def _toml_string(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'
