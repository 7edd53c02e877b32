"""Command line of the daemon: ``run`` (default), ``check-config``, ``--version``."""

from __future__ import annotations

import json
import logging
import sys
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Optional, Sequence

from spotfi_bridge import __version__, logs
from spotfi_bridge.config import EX_CONFIG, ConfigError, load_config

if TYPE_CHECKING:
    import argparse

log = logging.getLogger("spotfi_bridge")

COMMANDS = ("run", "check-config")
LOG_LEVELS = ("debug", "info", "warning", "error")


def build_parser() -> argparse.ArgumentParser:
    import argparse

    parser = argparse.ArgumentParser(
        prog="spotfi-bridge",
        description="SpotFi router bridge: presence, metrics, ubus RPC and terminals over MQTT.")
    parser.add_argument("--version", action="version", version=f"spotfi-bridge {__version__}")
    parser.add_argument("command", nargs="?", default="run", choices=COMMANDS,
                        help="run the daemon (default) or validate and print the config")
    parser.add_argument("--config", metavar="PATH",
                        help="TOML config file (default: $SPOTFI_CONFIG or /etc/spotfi/bridge.toml)")
    parser.add_argument("--log-level", choices=LOG_LEVELS,
                        help="override [log] level")
    parser.add_argument("--logd", action="store_true",
                        help="stderr goes to logd (the init script under procd), which stamps "
                             "every line: log without timestamps of our own")
    return parser


def _parse_plain(argv: Sequence[str]) -> Optional[dict[str, Any]]:
    """``[run|check-config] [--config PATH] [--log-level LEVEL] [--logd]``, the forms procd
    and the init script use, read without argparse (0.4 MB and milliseconds of start on a
    router). ``None`` for anything else (help, version, abbreviations, mistakes): argparse
    then answers exactly as it always did."""
    values: dict[str, Any] = {"command": "run", "config": None, "log_level": None,
                              "logd": False}
    command_seen = False
    rest = list(argv)
    while rest:
        item = rest.pop(0)
        if not item.startswith("-"):
            if command_seen or item not in COMMANDS:
                return None
            values["command"], command_seen = item, True
            continue
        if item == "--logd":
            values["logd"] = True
            continue
        name, equals, value = item.partition("=")
        if name not in ("--config", "--log-level"):
            return None
        if not equals:
            if not rest or rest[0].startswith("-"):
                return None
            value = rest.pop(0)
        if name == "--log-level" and value not in LOG_LEVELS:
            return None
        values[name[2:].replace("-", "_")] = value
    return values


def parse_args(argv: Optional[Sequence[str]] = None) -> Any:
    """The command line as argparse would read it (an ``argparse.Namespace`` look-alike)."""
    arguments = sys.argv[1:] if argv is None else argv
    plain = _parse_plain(arguments)
    if plain is not None:
        return SimpleNamespace(**plain)
    return build_parser().parse_args(arguments)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"spotfi-bridge: config error: {exc}", file=sys.stderr)
        return EX_CONFIG
    if args.command == "check-config":
        for warning in config.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        print(json.dumps(config.redacted(), indent=2, sort_keys=True))
        print("config OK", file=sys.stderr)
        return 0
    logs.setup_logging(args.log_level or config.log_level, [config.router.token],
                       timestamps=not args.logd)
    for warning in config.warnings:
        log.warning("%s", warning)
    from spotfi_bridge.daemon import run_daemon

    try:
        return run_daemon(config, args.config, args.log_level)
    except KeyboardInterrupt:
        return 0
