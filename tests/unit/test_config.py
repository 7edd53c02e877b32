"""``load_config``: load order, legacy env file, TOML, environment, and every error path.

Every ``ConfigError`` must name its source, key, value and expectation, and must
never carry the token: a router owner pastes these lines into support tickets.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

import pytest

from spotfi_bridge import config as config_module
from spotfi_bridge.config import Config, ConfigError, load_config
from tests.helpers.certs import make_ca, make_server_cert

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

TOKEN = "tok-9f8e7d6c5b4a3f2e-SECRET"
BASE_ENV = {
    "SPOTFI_ROUTER_ID": "router-1",
    "SPOTFI_TOKEN": TOKEN,
    "SPOTFI_MQTT_BROKER": "mqtt://broker.example.com",
}


@pytest.fixture(autouse=True)
def no_system_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The machine's own /etc files must never leak into these tests."""
    monkeypatch.setattr(config_module, "DEFAULT_TOML_PATH", str(tmp_path / "nowhere" / "bridge.toml"))
    monkeypatch.setattr(config_module, "DEFAULT_ENV_FILE", str(tmp_path / "nowhere" / "spotfi.env"))


def write(path: Path, text: str, mode: int = 0o600) -> str:
    path.write_text(text)
    os.chmod(path, mode)
    return str(path)


def config_error(config_path: Optional[str] = None, environ: Optional[dict[str, str]] = None,
                 env_file: Optional[str] = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(config_path, environ if environ is not None else {}, env_file)
    message = str(info.value)
    assert TOKEN not in message
    assert "\n" not in message, "a config error is one log line"
    return message


# --------------------------------------------------------------------------- sources and order


def test_runs_from_the_three_environment_variables_alone() -> None:
    cfg = load_config(None, dict(BASE_ENV))
    assert cfg.router.id == "router-1"
    assert cfg.router.token == TOKEN
    assert (cfg.mqtt.broker.host, cfg.mqtt.broker.port, cfg.mqtt.broker.tls) == (
        "broker.example.com", 1883, False)
    assert cfg.sources == ()
    assert cfg.warnings == ()
    # the documented defaults
    assert cfg.metrics.interval == 30.0
    assert cfg.mqtt.keepalive == 30
    assert cfg.mqtt.protocol == "3.1.1"
    assert cfg.mqtt.clean_session is False
    assert cfg.log_level == "info"


def test_legacy_env_file_export_quotes_comments_and_ws_url(tmp_path: Path) -> None:
    env_file = write(tmp_path / "spotfi.env", f"""\
# written by the SpotFi installer
export SPOTFI_ROUTER_ID="router-legacy"
SPOTFI_TOKEN='{TOKEN}'
SPOTFI_MAC=aa:bb:cc:dd:ee:ff   # trailing comment
  export SPOTFI_MQTT_BROKER="mqtts://broker.example.com"
SPOTFI_ROUTER_NAME="Cafe on Main Street"
SPOTFI_WS_URL="wss://api.example.com/ws"

this line is not an assignment
""")
    cfg = load_config(None, {}, env_file)
    assert cfg.router.id == "router-legacy"
    assert cfg.router.token == TOKEN
    assert cfg.router.mac == "aa:bb:cc:dd:ee:ff"
    assert cfg.router.name == "Cafe on Main Street"
    assert (cfg.mqtt.broker.scheme, cfg.mqtt.broker.port, cfg.mqtt.broker.tls) == ("mqtts", 8883, True)
    assert cfg.sources == (env_file,)
    ws = [w for w in cfg.warnings if "SPOTFI_WS_URL" in w]
    assert len(ws) == 1 and "ignored" in ws[0] and env_file in ws[0]
    bad_line = [w for w in cfg.warnings if w.startswith(f"{env_file}:9: expected NAME=value")]
    assert len(bad_line) == 1, cfg.warnings
    assert all(TOKEN not in w for w in cfg.warnings)


def test_env_file_from_spotfi_env_file_variable(tmp_path: Path) -> None:
    env_file = write(tmp_path / "other.env", "SPOTFI_ROUTER_NAME=from-file\n")
    cfg = load_config(None, {**BASE_ENV, "SPOTFI_ENV_FILE": env_file})
    assert cfg.router.name == "from-file"
    assert cfg.sources == (env_file,)


def test_ws_url_in_environment_is_ignored_with_a_warning() -> None:
    cfg = load_config(None, {**BASE_ENV, "SPOTFI_WS_URL": "wss://api.example.com/ws"})
    assert any("environment variable SPOTFI_WS_URL" in w and "ignored" in w for w in cfg.warnings)


def test_later_sources_win(tmp_path: Path) -> None:
    env_file = write(tmp_path / "spotfi.env", f"""\
SPOTFI_ROUTER_ID=from-env-file
SPOTFI_TOKEN={TOKEN}
SPOTFI_MQTT_BROKER=mqtt://env-file-broker
SPOTFI_ROUTER_NAME=env-file-name
SPOTFI_MAC=00:00:00:00:00:01
""")
    toml = write(tmp_path / "bridge.toml", """\
[router]
name = "toml-name"
mac = "00:00:00:00:00:02"

[mqtt]
broker = "mqtt://toml-broker:1999"
keepalive = 40

[metrics]
interval = 20
""")
    environ = {"SPOTFI_MQTT_KEEPALIVE": "50", "SPOTFI_MAC": "00:00:00:00:00:03",
               "SPOTFI_CONFIG": toml}
    cfg = load_config(None, environ, env_file)
    assert cfg.router.id == "from-env-file"           # only in the env file
    assert cfg.router.name == "toml-name"             # TOML over env file
    assert cfg.mqtt.broker.host == "toml-broker"      # TOML over env file
    assert cfg.mqtt.broker.port == 1999
    assert cfg.mqtt.keepalive == 50                   # environment over TOML
    assert cfg.router.mac == "00:00:00:00:00:03"      # environment over both
    assert cfg.metrics.interval == 20.0
    assert cfg.sources == (env_file, toml)


def test_explicit_path_wins_over_spotfi_config(tmp_path: Path) -> None:
    explicit = write(tmp_path / "a.toml", '[router]\nname = "explicit"\n')
    other = write(tmp_path / "b.toml", '[router]\nname = "from-variable"\n')
    cfg = load_config(explicit, {**BASE_ENV, "SPOTFI_CONFIG": other})
    assert cfg.router.name == "explicit"
    assert cfg.sources == (explicit,)


def test_default_toml_path_is_read_when_present(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    default = write(tmp_path / "bridge.toml", '[log]\nlevel = "debug"\n')
    monkeypatch.setattr(config_module, "DEFAULT_TOML_PATH", default)
    cfg = load_config(None, dict(BASE_ENV))
    assert cfg.log_level == "debug"
    assert cfg.sources == (default,)


@pytest.fixture(scope="module")
def pem(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A real CA and client certificate with its key: the loader now loads them."""
    directory = tmp_path_factory.mktemp("pem")
    ca = make_ca(directory)
    cert, key = make_server_cert(directory, ca, "DNS:r-42", "client", usage="clientAuth")
    return {"ca": str(ca[0]), "cert": str(cert), "key": str(key)}


def test_full_toml_file(tmp_path: Path, pem: dict[str, str]) -> None:
    ca, cert, key = pem["ca"], pem["cert"], pem["key"]
    toml = write(tmp_path / "bridge.toml", f"""\
[router]
id = "r-42"
token = "{TOKEN}"
mac = "aa:bb:cc:00:11:22"
name = "Lobby"

[mqtt]
broker = "wss://mqtt.example.com/mqtt"
keepalive = 60
protocol = "5"
clean_session = true
connect_timeout = 5
backoff_min = 0.25
backoff_max = 30
max_inbound_bytes = 65536

[tls]
ca_file = "{ca}"
cert_file = "{cert}"
key_file = "{key}"
insecure = false

[metrics]
interval = 15
qos = 0

[rpc]
backend = "local"
max_concurrent = 2
allow = ["system.*", "uci.get"]
deny = ["system.reboot"]

[rpc.timeouts]
"file.exec" = 200
"uci.*" = 10

[terminal]
shell = ["/bin/ash", "-l"]
max_sessions = 3

[log]
level = "warning"
""")
    cfg = load_config(toml, {})
    assert cfg.router == config_module.RouterConfig("r-42", TOKEN, "aa:bb:cc:00:11:22", "Lobby")
    assert cfg.mqtt.broker.transport == "websockets" and cfg.mqtt.broker.port == 443
    assert (cfg.mqtt.keepalive, cfg.mqtt.protocol, cfg.mqtt.clean_session) == (60, "5", True)
    assert (cfg.mqtt.backoff_min, cfg.mqtt.backoff_max) == (0.25, 30.0)
    assert cfg.tls == config_module.TlsConfig(ca, cert, key, False)
    assert (cfg.metrics.interval, cfg.metrics.qos) == (15.0, 0)
    assert cfg.rpc.backend == "local" and cfg.rpc.max_concurrent == 2
    assert cfg.rpc.allow == ("system.*", "uci.get") and cfg.rpc.deny == ("system.reboot",)
    assert cfg.rpc.timeouts == (("file.exec", 200.0), ("uci.*", 10.0))
    assert cfg.terminal.shell == ("/bin/ash", "-l") and cfg.terminal.max_sessions == 3
    assert cfg.log_level == "warning"
    assert cfg.warnings == ()  # mode 0600: no warning


# --------------------------------------------------------------------------- values


@pytest.mark.parametrize(("url", "scheme", "port", "transport", "tls", "ws_path"), [
    ("tcp://broker", "tcp", 1883, "tcp", False, ""),
    ("mqtt://broker", "mqtt", 1883, "tcp", False, ""),
    ("ssl://broker", "ssl", 8883, "tcp", True, ""),
    ("mqtts://broker", "mqtts", 8883, "tcp", True, ""),
    ("ws://broker", "ws", 80, "websockets", False, "/mqtt"),
    ("wss://broker", "wss", 443, "websockets", True, "/mqtt"),
    ("broker", "tcp", 1883, "tcp", False, ""),
    ("broker:2883", "tcp", 2883, "tcp", False, ""),
    ("mqtt://broker:11883", "mqtt", 11883, "tcp", False, ""),
    ("mqtts://broker:443", "mqtts", 443, "tcp", True, ""),
    ("ws://broker:8080/custom/path", "ws", 8080, "websockets", False, "/custom/path"),
    ("wss://broker/mqtt?auth=1", "wss", 443, "websockets", True, "/mqtt?auth=1"),
    ("MQTT://broker", "mqtt", 1883, "tcp", False, ""),
])
def test_broker_url_forms(url: str, scheme: str, port: int, transport: str, tls: bool,
                          ws_path: str) -> None:
    broker = load_config(None, {**BASE_ENV, "SPOTFI_MQTT_BROKER": url}).mqtt.broker
    assert (broker.host, broker.scheme, broker.port, broker.transport, broker.tls, broker.ws_path) == (
        "broker", scheme, port, transport, tls, ws_path)
    assert broker.url == url


def test_broker_ipv6_literal() -> None:
    broker = load_config(None, {**BASE_ENV, "SPOTFI_MQTT_BROKER": "mqtt://[::1]:1884"}).mqtt.broker
    assert (broker.host, broker.port) == ("::1", 1884)


@pytest.mark.parametrize(("name", "value", "expected"), [
    ("SPOTFI_METRICS_INTERVAL", "5", 5.0),
    ("SPOTFI_METRICS_INTERVAL", "55", 55.0),
    ("SPOTFI_METRICS_INTERVAL", "12.5", 12.5),
    ("SPOTFI_MQTT_KEEPALIVE", "5", 5),
    ("SPOTFI_MQTT_KEEPALIVE", "3600", 3600),
    ("SPOTFI_RPC_QUEUE_SIZE", "0", 0),
    ("SPOTFI_MQTT_PROTOCOL", "5", "5"),
    ("SPOTFI_MQTT_PROTOCOL", "311", "3.1.1"),
    ("SPOTFI_LOG_LEVEL", " DEBUG ", "debug"),
    ("SPOTFI_RPC_BACKEND", "ubus", "ubus"),
])
def test_environment_values_are_converted(name: str, value: str, expected: Any) -> None:
    cfg = load_config(None, {**BASE_ENV, name: value})
    section, _, key = name[len("SPOTFI_"):].lower().partition("_")
    got = cfg.log_level if section == "log" else getattr(getattr(cfg, section), key)
    assert got == expected
    assert type(got) is type(expected)


@pytest.mark.parametrize(("text", "expected"), [
    ("true", True), ("1", True), ("yes", True), ("ON", True),
    ("false", False), ("0", False), ("no", False), ("off", False), ("", False),
])
def test_booleans_from_environment(text: str, expected: bool) -> None:
    assert load_config(None, {**BASE_ENV, "SPOTFI_TLS_INSECURE": text}).tls.insecure is expected


@pytest.mark.parametrize("literal", ["true", "false"])
def test_booleans_from_toml(tmp_path: Path, literal: str) -> None:
    toml = write(tmp_path / "b.toml", f"[mqtt]\nclean_session = {literal}\n")
    assert load_config(toml, dict(BASE_ENV)).mqtt.clean_session is (literal == "true")


def test_lists_from_environment_and_toml(tmp_path: Path) -> None:
    cfg = load_config(None, {**BASE_ENV, "SPOTFI_RPC_ALLOW": " system.*, uci.get ,, ",
                             "SPOTFI_TERMINAL_SHELL": "/bin/sh -c 'exec ash -l'"})
    assert cfg.rpc.allow == ("system.*", "uci.get")
    assert cfg.terminal.shell == ("/bin/sh", "-c", "exec ash -l")
    toml = write(tmp_path / "l.toml", '[rpc]\ndeny = ["file.*", "system.reboot"]\n')
    assert load_config(toml, dict(BASE_ENV)).rpc.deny == ("file.*", "system.reboot")


def test_rpc_timeouts_table_and_timeout_for(tmp_path: Path) -> None:
    default = load_config(None, dict(BASE_ENV)).rpc
    assert default.timeout_for("file", "exec") == 120.0
    assert default.timeout_for("system", "info") == default.default_timeout == 30.0

    toml = write(tmp_path / "t.toml", """\
[rpc]
default_timeout = 20

[rpc.timeouts]
"file.*" = 60
"file.exec" = 200
"hostapd.*" = 7.5
""")
    rpc = load_config(toml, dict(BASE_ENV)).rpc
    assert rpc.timeout_for("file", "exec") == 60.0      # first match wins, in file order
    assert rpc.timeout_for("file", "read") == 60.0
    assert rpc.timeout_for("hostapd", "wlan0/get_status") == 7.5
    assert rpc.timeout_for("system", "info") == 20.0    # no match: default_timeout
    assert rpc.timeout_for("files", "exec") == 20.0

    env = load_config(None, {**BASE_ENV, "SPOTFI_RPC_TIMEOUTS": "uci.*=10, file.exec=90,"}).rpc
    assert env.timeouts == (("uci.*", 10.0), ("file.exec", 90.0))
    assert env.timeout_for("uci", "commit") == 10.0


def test_rpc_max_ages_table_and_max_age_for(tmp_path: Path) -> None:
    default = load_config(None, dict(BASE_ENV))
    assert default.rpc.max_age_for("file", "exec") == 120.0  # the API waits 120 s for opkg
    assert default.rpc.max_age_for("system", "reboot") == default.rpc.max_age == 30.0
    assert default.rpc.clock_skew == 5.0 and default.terminal.start_max_age == 30.0

    toml = write(tmp_path / "a.toml", """\
[rpc]
max_age = 10
clock_skew = 2

[rpc.max_ages]
"system.*" = 60

[terminal]
start_max_age = 15
""")
    cfg = load_config(toml, dict(BASE_ENV))
    assert cfg.rpc.max_age_for("system", "reboot") == 60.0
    assert cfg.rpc.max_age_for("file", "exec") == 120.0   # the built-in pattern still applies
    assert cfg.rpc.max_age_for("uci", "get") == 10.0
    assert (cfg.rpc.clock_skew, cfg.terminal.start_max_age) == (2.0, 15.0)
    assert cfg.redacted()["rpc"]["max_ages"] == {"system.*": 60.0, "file.exec": 120.0}

    env = load_config(None, {**BASE_ENV, "SPOTFI_RPC_MAX_AGES": "file.exec=300"}).rpc
    assert env.max_ages == (("file.exec", 300.0),)


# --------------------------------------------------------------------------- error paths

TOML_ERRORS = [
    # (section, key, TOML literal, fragment of what was expected)
    ("router", "id", '"a/b"', "without '/'"),
    ("router", "id", '"a+b"', "without '/'"),
    ("router", "id", '"a#b"', "without '/'"),
    ("router", "id", '"a b"', "whitespace"),
    ("router", "id", '"a\\tb"', "whitespace"),
    ("router", "id", "42", "non-empty string"),
    ("router", "name", "5", "a string"),
    ("mqtt", "broker", '"http://broker"', "mqtt://host:1883"),
    ("mqtt", "broker", '"mqtt://broker:99999"', "mqtt://host:1883"),
    ("mqtt", "broker", '"mqtt://broker:0"', "mqtt://host:1883"),
    ("mqtt", "broker", '"mqtt://broker:port"', "mqtt://host:1883"),
    ("mqtt", "broker", '"mqtt://:1883"', "mqtt://host:1883"),
    ("mqtt", "broker", "1883", "mqtt://host:1883"),
    ("mqtt", "keepalive", "4", "5 to 3600"),
    ("mqtt", "keepalive", "3601", "5 to 3600"),
    ("mqtt", "keepalive", "30.5", "an integer"),
    ("mqtt", "keepalive", '"thirty"', "an integer"),
    ("mqtt", "protocol", '"4"', '"3.1.1" or "5"'),
    ("mqtt", "clean_session", '"maybe"', "true or false"),
    ("mqtt", "clean_session", "1", "true or false"),
    ("mqtt", "connect_timeout", "0", "1 to 120"),
    ("tls", "insecure", '"perhaps"', "true or false"),
    ("metrics", "interval", "4", "5 to 55"),
    ("metrics", "interval", "4.99", "5 to 55"),
    ("metrics", "interval", "56", "5 to 55"),
    ("metrics", "interval", "true", "5 to 55"),
    ("metrics", "interval", "nan", "5 to 55"),
    ("metrics", "interval", "inf", "5 to 55"),
    ("metrics", "qos", "2", "0 or 1"),
    ("rpc", "backend", '"dbus"', '"auto"'),
    ("rpc", "max_concurrent", "0", "1 to 64"),
    ("rpc", "allow", "[1, 2]", "glob patterns"),
    ("rpc", "timeouts", '{ "file.exec" = "slow" }', "glob = seconds"),
    ("rpc", "timeouts", '{ "file.exec" = 0 }', "glob = seconds"),
    ("rpc", "timeouts", "5", "glob = seconds"),
    ("rpc", "compat", '"sometimes"', "true or false"),
    ("rpc", "init_dir", '"etc/init.d"', "an absolute path"),
    ("rpc", "init_dir", "1", "an absolute path"),
    ("rpc", "max_age", "0", "1 to 86400"),
    ("rpc", "max_ages", '{ "file.exec" = 0.5 }', "glob = seconds (1 to 86400)"),
    ("rpc", "max_ages", '{ "file.exec" = "long" }', "glob = seconds (1 to 86400)"),
    ("rpc", "max_ages", "[120]", "glob = seconds (1 to 86400)"),
    ("rpc", "clock_skew", "-1", "0 to 300"),
    ("rpc", "clock_skew", "301", "0 to 300"),
    ("terminal", "start_max_age", "0", "1 to 86400"),
    ("terminal", "shell", "[]", "command line"),
    ("terminal", "shell", '["/bin/sh", 3]', "command line"),
    ("terminal", "shell", '"sh \\"unterminated"', "command line"),
    ("terminal", "max_sessions", "0", "1 to 256"),
    ("terminal", "qos", "3", "0, 1 or 2"),
    ("terminal", "no_subscriber_timeout", "0", "1 to 86400"),
    ("mqtt", "bulk_window_bytes", "1024", "4096 to 16777216"),
    ("log", "level", '"verbose"', '"debug"'),
]


@pytest.mark.parametrize(("section", "key", "literal", "expected"), TOML_ERRORS)
def test_bad_toml_value_names_file_key_value_and_expectation(
        tmp_path: Path, section: str, key: str, literal: str, expected: str) -> None:
    toml = write(tmp_path / "bridge.toml", f"[{section}]\n{key} = {literal}\n")
    environ = {k: v for k, v in BASE_ENV.items() if k != config_module.env_name(section, key)}
    message = config_error(toml, environ)
    value = tomllib.loads(f"v = {literal}")["v"]
    assert message.startswith(f"{toml}: [{section}] {key} = {value!r} is invalid: expected "), message
    assert expected in message


ENV_ERRORS = [
    ("SPOTFI_ROUTER_ID", "a/b", "without '/'"),
    ("SPOTFI_ROUTER_ID", "a+b", "without '/'"),
    ("SPOTFI_ROUTER_ID", "a#b", "without '/'"),
    ("SPOTFI_ROUTER_ID", "two words", "whitespace"),
    ("SPOTFI_ROUTER_ID", "trailing\n", "whitespace"),
    ("SPOTFI_ROUTER_ID", "x" * 129, "non-empty string"),
    ("SPOTFI_MQTT_BROKER", "ftp://broker", "mqtt://host:1883"),
    ("SPOTFI_MQTT_BROKER", "mqtt://", "mqtt://host:1883"),
    ("SPOTFI_METRICS_INTERVAL", "4", "5 to 55"),
    ("SPOTFI_METRICS_INTERVAL", "56", "5 to 55"),
    ("SPOTFI_METRICS_INTERVAL", "half a minute", "5 to 55"),
    ("SPOTFI_METRICS_INTERVAL", "nan", "5 to 55"),
    ("SPOTFI_MQTT_KEEPALIVE", "30.5", "an integer"),
    ("SPOTFI_MQTT_CLEAN_SESSION", "maybe", "true or false"),
    ("SPOTFI_MQTT_PROTOCOL", "3.1", '"3.1.1" or "5"'),
    ("SPOTFI_RPC_TIMEOUTS", "file.exec", "glob = seconds"),
    ("SPOTFI_RPC_TIMEOUTS", "file.exec=slow", "glob = seconds"),
    ("SPOTFI_RPC_TIMEOUTS", "file.exec=4000", "glob = seconds"),
    ("SPOTFI_RPC_MAX_CONCURRENT", "0", "1 to 64"),
    ("SPOTFI_RPC_COMPAT", "maybe", "true or false"),
    ("SPOTFI_RPC_INIT_DIR", "init.d", "an absolute path"),
    ("SPOTFI_TERMINAL_SHELL", 'sh "x', "command line"),
    ("SPOTFI_LOG_LEVEL", "loud", '"debug"'),
]


@pytest.mark.parametrize(("name", "value", "expected"), ENV_ERRORS)
def test_bad_environment_value_names_variable_key_value_and_expectation(
        name: str, value: str, expected: str) -> None:
    message = config_error(None, {**BASE_ENV, name: value})
    assert message.startswith(f"environment variable {name}: ["), message
    assert f"= {value!r} is invalid: expected " in message
    assert expected in message


def test_bad_value_in_legacy_env_file_names_the_file_and_variable(tmp_path: Path) -> None:
    env_file = write(tmp_path / "spotfi.env", f"SPOTFI_ROUTER_ID=bad/id\nSPOTFI_TOKEN={TOKEN}\n"
                                              "SPOTFI_MQTT_BROKER=mqtt://b\n")
    message = config_error(None, {}, env_file)
    assert message.startswith(f"{env_file}: SPOTFI_ROUTER_ID: [router] id = 'bad/id' is invalid")


def test_bad_token_type_hides_the_value(tmp_path: Path) -> None:
    toml = write(tmp_path / "bridge.toml", "[router]\ntoken = 918273645546372819\n")
    message = config_error(toml, {"SPOTFI_ROUTER_ID": "r1", "SPOTFI_MQTT_BROKER": "b"})
    assert "918273645546372819" not in message
    assert "[router] token = (hidden) is invalid: expected a non-empty string" in message
    assert message.startswith(toml)


def test_unbalanced_quotes_in_env_file_never_show_the_token(tmp_path: Path) -> None:
    env_file = write(tmp_path / "spotfi.env", f'SPOTFI_ROUTER_ID=r1\nSPOTFI_TOKEN="{TOKEN}\n')
    message = config_error(None, {}, env_file)
    assert message == f"{env_file}:2: SPOTFI_TOKEN: unbalanced quotes"


@pytest.mark.parametrize(("name", "key"), [
    ("SPOTFI_ROUTER_ID", "[router] id"),
    ("SPOTFI_TOKEN", "[router] token"),
    ("SPOTFI_MQTT_BROKER", "[mqtt] broker"),
])
def test_missing_required_setting(name: str, key: str) -> None:
    environ = {k: v for k, v in BASE_ENV.items() if k != name}
    message = config_error(None, environ)
    assert message.startswith(f"{key} is not set: expected ")
    assert name in message


def test_every_missing_required_setting_is_named_in_one_error() -> None:
    # one run, every fix: a router owner should not need three restarts to learn three keys
    message = config_error(None, {})
    assert message.count("is not set") == 3, message
    for key, name in (("[router] id", "SPOTFI_ROUTER_ID"), ("[router] token", "SPOTFI_TOKEN"),
                      ("[mqtt] broker", "SPOTFI_MQTT_BROKER")):
        assert f"{key} is not set: expected " in message and name in message
    assert message.endswith("(SPOTFI_ROUTER_ID, SPOTFI_TOKEN, SPOTFI_MQTT_BROKER)")


def test_the_set_it_in_hint_names_the_file_given_with_config(tmp_path: Path) -> None:
    toml = write(tmp_path / "my-bridge.toml", '[router]\nid = "r1"\n')
    env_file = write(tmp_path / "my.env", "SPOTFI_ROUTER_NAME=lobby\n")
    message = config_error(toml, {"SPOTFI_ENV_FILE": env_file})
    assert message.endswith(f"set them in {toml}, {env_file} (SPOTFI_TOKEN, SPOTFI_MQTT_BROKER) "
                            "or the environment (SPOTFI_TOKEN, SPOTFI_MQTT_BROKER)"), message
    assert str(config_module.DEFAULT_TOML_PATH) not in message


def test_the_broker_error_lists_every_scheme_tls_included() -> None:
    message = config_error(None, {**BASE_ENV, "SPOTFI_MQTT_BROKER": "gopher://broker"})
    for scheme in config_module.SCHEMES:
        assert f"{scheme}://" in message, message
    assert "tls://" in message
    assert load_config(None, {**BASE_ENV, "SPOTFI_MQTT_BROKER": "tls://b.example"}).mqtt.broker.tls


def test_an_env_file_named_on_purpose_must_exist(tmp_path: Path) -> None:
    missing = tmp_path / "spotfi.env.typo"
    message = config_error(None, {**BASE_ENV, "SPOTFI_ENV_FILE": str(missing)})
    assert message.startswith(f"{missing}: env file not found")
    # the default file may be absent (a router configured by TOML or environment alone)
    assert load_config(None, dict(BASE_ENV)).router.id == "router-1"
    assert load_config(None, {**BASE_ENV, "SPOTFI_ENV_FILE": os.devnull}).sources == ()


@pytest.mark.parametrize(("name", "suggestion"), [
    ("SPOTFI_METRICS_INTERVL", "did you mean SPOTFI_METRICS_INTERVAL?"),
    ("SPOTFI_ROUTERID", "did you mean SPOTFI_ROUTER_ID?"),
    ("SPOTFI_RPC_MAX_CONCURRENCY", "did you mean SPOTFI_RPC_MAX_CONCURRENT?"),
    ("SPOTFI_COLOUR", None),
])
def test_an_unknown_spotfi_variable_warns_with_the_closest_key(name: str,
                                                               suggestion: Optional[str]) -> None:
    cfg = load_config(None, {**BASE_ENV, name: "15"})
    [warning] = cfg.warnings
    assert warning.startswith(f"environment variable {name}: unknown setting, ignored")
    if suggestion is None:
        assert "did you mean" not in warning
    else:
        assert warning.endswith(f"; {suggestion}")
    assert cfg.metrics.interval == 30.0  # ignored, not guessed


def test_variables_of_ctl_and_the_launcher_are_not_unknown_settings() -> None:
    cfg = load_config(None, {**BASE_ENV, "SPOTFI_CTL_BROKER": "mqtt://x", "SPOTFI_BRIDGE_LIB": "/x",
                             "SPOTFI_BRIDGE_PYTHON": "python3", "SPOTFI_CONFIG_DIR": "x"})
    assert cfg.warnings == ("environment variable SPOTFI_CONFIG_DIR: unknown setting, ignored; "
                            "did you mean SPOTFI_CONFIG?",)


def test_an_unknown_name_in_the_env_file_gets_the_same_hint(tmp_path: Path) -> None:
    env_file = write(tmp_path / "spotfi.env", "SPOTFI_MQTT_BROKR=mqtt://b\n")
    cfg = load_config(None, {**BASE_ENV, "SPOTFI_ENV_FILE": env_file})
    assert cfg.warnings == (f"{env_file}: SPOTFI_MQTT_BROKR: unknown setting, ignored; "
                            "did you mean SPOTFI_MQTT_BROKER?",)


def test_empty_token_is_not_set(tmp_path: Path) -> None:
    message = config_error(None, {**BASE_ENV, "SPOTFI_TOKEN": ""})
    assert message.startswith("[router] token is not set")


def test_unknown_toml_section(tmp_path: Path) -> None:
    toml = write(tmp_path / "bridge.toml", '[routr]\nid = "r1"\n')
    message = config_error(toml, dict(BASE_ENV))
    assert message.startswith(f"{toml}: unknown section [routr]")
    assert "[router]" in message  # says what was expected


def test_unknown_toml_key(tmp_path: Path) -> None:
    toml = write(tmp_path / "bridge.toml", "[metrics]\nintervall = 20\n")
    message = config_error(toml, dict(BASE_ENV))
    assert message.startswith(f"{toml}: [metrics] unknown key 'intervall'")
    assert "interval" in message.split("expected", 1)[1]


def test_top_level_key_instead_of_a_table(tmp_path: Path) -> None:
    toml = write(tmp_path / "bridge.toml", f'token = "{TOKEN}"\n')
    message = config_error(toml, dict(BASE_ENV))
    assert message.startswith(f"{toml}: unknown section [token]")


def test_section_that_is_not_a_table(tmp_path: Path) -> None:
    toml = write(tmp_path / "bridge.toml", 'router = "r1"\n')
    message = config_error(toml, dict(BASE_ENV))
    assert message.startswith(f"{toml}: 'router' must be a table")


@pytest.mark.parametrize("text", [
    f'[router]\ntoken = "{TOKEN}\n',            # unterminated string on the token's line
    f"[router]\ntoken = {TOKEN}\n",             # bare value
    f'[router]\ntoken = "{TOKEN}" trailing\n',
    "[router\n",
    '[router]\nid = "a"\nid = "b"\n',           # duplicate key
])
def test_invalid_toml(tmp_path: Path, text: str) -> None:
    toml = write(tmp_path / "bridge.toml", text)
    message = config_error(toml, dict(BASE_ENV))
    assert message.startswith(f"{toml}: not valid TOML: ")
    assert "line" in message


def test_missing_explicit_file(tmp_path: Path) -> None:
    missing = str(tmp_path / "absent.toml")
    assert config_error(missing, dict(BASE_ENV)) == f"{missing}: config file not found"


def test_missing_file_named_by_spotfi_config(tmp_path: Path) -> None:
    missing = str(tmp_path / "absent.toml")
    message = config_error(None, {**BASE_ENV, "SPOTFI_CONFIG": missing})
    assert message == f"{missing}: config file not found"


def test_config_path_that_is_a_directory(tmp_path: Path) -> None:
    message = config_error(str(tmp_path), dict(BASE_ENV))
    assert message.startswith(f"{tmp_path}: cannot read config file: ")


@pytest.mark.parametrize("key", ["ca_file", "cert_file", "key_file"])
def test_tls_file_that_does_not_exist(tmp_path: Path, key: str) -> None:
    existing = write(tmp_path / "present.pem", "pem")
    missing = str(tmp_path / "missing.pem")
    paths = {"ca_file": existing, "cert_file": existing, "key_file": existing, key: missing}
    toml = write(tmp_path / "bridge.toml",
                 "[tls]\n" + "".join(f'{k} = "{v}"\n' for k, v in paths.items()))
    message = config_error(toml, dict(BASE_ENV))
    assert message == f"{toml}: [tls] {key} = {missing!r} is invalid: expected an existing PEM file"


def test_tls_file_from_environment_that_does_not_exist(tmp_path: Path) -> None:
    missing = str(tmp_path / "ca.pem")
    message = config_error(None, {**BASE_ENV, "SPOTFI_TLS_CA_FILE": missing})
    assert message.startswith(f"environment variable SPOTFI_TLS_CA_FILE: [tls] ca_file = {missing!r}")


def test_tls_key_without_certificate(tmp_path: Path) -> None:
    key = write(tmp_path / "client.key", "pem")
    toml = write(tmp_path / "bridge.toml", f'[tls]\nkey_file = "{key}"\n')
    message = config_error(toml, dict(BASE_ENV))
    assert message.startswith(f"{toml}: [tls] key_file is set without cert_file")


def test_backoff_max_below_backoff_min(tmp_path: Path) -> None:
    toml = write(tmp_path / "bridge.toml", "[mqtt]\nbackoff_min = 10\nbackoff_max = 5\n")
    message = config_error(toml, dict(BASE_ENV))
    assert message.startswith(f"{toml}: [mqtt] backoff_max = 5.0 is invalid: expected")
    assert "backoff_min (10.0)" in message


def test_default_timeout_above_the_default_max_names_the_file(tmp_path: Path) -> None:
    toml = write(tmp_path / "bridge.toml", "[rpc]\ndefault_timeout = 400\n")
    message = config_error(toml, dict(BASE_ENV))
    assert message.startswith(f"{toml}: [rpc] max_timeout = 300.0 is invalid: expected")
    assert "default_timeout (400.0)" in message


# --------------------------------------------------------------------------- file modes


def test_env_file_with_token_readable_by_others_warns(tmp_path: Path) -> None:
    env_file = write(tmp_path / "spotfi.env", f"SPOTFI_TOKEN={TOKEN}\n", mode=0o644)
    cfg = load_config(None, {k: v for k, v in BASE_ENV.items() if k != "SPOTFI_TOKEN"}, env_file)
    warnings = [w for w in cfg.warnings if "readable by group or others" in w]
    assert len(warnings) == 1
    assert env_file in warnings[0] and "0644" in warnings[0] and f"chmod 600 {env_file}" in warnings[0]
    assert TOKEN not in warnings[0]


def test_env_file_with_token_mode_600_does_not_warn(tmp_path: Path) -> None:
    env_file = write(tmp_path / "spotfi.env", f"SPOTFI_TOKEN={TOKEN}\n", mode=0o600)
    assert load_config(None, dict(BASE_ENV), env_file).warnings == ()


def test_env_file_without_token_may_be_world_readable(tmp_path: Path) -> None:
    env_file = write(tmp_path / "spotfi.env", "SPOTFI_ROUTER_NAME=x\n", mode=0o644)
    assert load_config(None, dict(BASE_ENV), env_file).warnings == ()


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660])
def test_toml_with_token_readable_by_group_or_others_warns(tmp_path: Path, mode: int) -> None:
    toml = write(tmp_path / "bridge.toml", f'[router]\ntoken = "{TOKEN}"\n', mode=mode)
    cfg = load_config(toml, {"SPOTFI_ROUTER_ID": "r1", "SPOTFI_MQTT_BROKER": "b"})
    assert len(cfg.warnings) == 1
    assert toml in cfg.warnings[0] and f"{mode:04o}" in cfg.warnings[0]


def test_toml_without_token_may_be_world_readable(tmp_path: Path) -> None:
    toml = write(tmp_path / "bridge.toml", '[router]\nname = "x"\n', mode=0o644)
    assert load_config(toml, dict(BASE_ENV)).warnings == ()


# --------------------------------------------------------------------------- redaction, reloads


def test_redacted_masks_the_token_and_is_json() -> None:
    cfg = load_config(None, {**BASE_ENV, "SPOTFI_RPC_TIMEOUTS": "uci.*=10"})
    data = cfg.redacted()
    text = json.dumps(data)
    assert TOKEN not in text
    assert data["router"]["token"] == f"<set, {len(TOKEN)} characters>"
    assert data["router"]["id"] == "router-1"
    assert data["mqtt"]["broker"] == "mqtt://broker.example.com"
    assert data["rpc"]["timeouts"] == {"uci.*": 10.0, "file.exec": 120.0}  # defaults kept
    assert data["metrics"]["interval"] == 30.0
    assert TOKEN not in repr(cfg)  # nobody logs a config object with the token in it


def _settings(**env: str) -> tuple[Any, ...]:
    return load_config(None, {**BASE_ENV, **env}).connection_settings()


@pytest.mark.parametrize(("name", "value"), [
    ("SPOTFI_METRICS_INTERVAL", "10"),
    ("SPOTFI_RPC_MAX_CONCURRENT", "9"),
    ("SPOTFI_RPC_ALLOW", "system.*"),
    ("SPOTFI_TERMINAL_MAX_SESSIONS", "2"),
    ("SPOTFI_LOG_LEVEL", "debug"),
    ("SPOTFI_ROUTER_NAME", "renamed"),
    ("SPOTFI_MAC", "00:11:22:33:44:55"),
])
def test_connection_settings_ignore_other_keys(name: str, value: str) -> None:
    assert _settings(**{name: value}) == _settings()


@pytest.mark.parametrize(("name", "value"), [
    ("SPOTFI_ROUTER_ID", "router-2"),
    ("SPOTFI_TOKEN", TOKEN + "-rotated"),
    ("SPOTFI_MQTT_BROKER", "mqtt://other.example.com"),
    ("SPOTFI_MQTT_BROKER", "mqtt://broker.example.com:1884"),
    ("SPOTFI_MQTT_KEEPALIVE", "45"),
    ("SPOTFI_MQTT_PROTOCOL", "5"),
    ("SPOTFI_MQTT_CLEAN_SESSION", "true"),
    ("SPOTFI_TLS_INSECURE", "true"),
])
def test_connection_settings_change_with_connection_keys(name: str, value: str) -> None:
    assert _settings(**{name: value}) != _settings()


def test_connection_settings_with_tls_file(pem: dict[str, str]) -> None:
    assert _settings(SPOTFI_TLS_CA_FILE=pem["ca"]) != _settings()


def test_config_is_frozen() -> None:
    cfg: Config = load_config(None, dict(BASE_ENV))
    with pytest.raises(AttributeError):
        cfg.log_level = "debug"  # type: ignore[misc]
