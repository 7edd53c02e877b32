"""Command line of the daemon: ``run`` (default), ``check-config``, ``--version``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Optional, Sequence

from spotfi_bridge import __version__, logs
from spotfi_bridge.config import EX_CONFIG, ConfigError, load_config

log = logging.getLogger("spotfi_bridge")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spotfi-bridge",
        description="SpotFi router bridge: presence, metrics, ubus RPC and terminals over MQTT.")
    parser.add_argument("--version", action="version", version=f"spotfi-bridge {__version__}")
    parser.add_argument("command", nargs="?", default="run", choices=("run", "check-config"),
                        help="run the daemon (default) or validate and print the config")
    parser.add_argument("--config", metavar="PATH",
                        help="TOML config file (default: $SPOTFI_CONFIG or /etc/spotfi/bridge.toml)")
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"),
                        help="override [log] level")
    parser.add_argument("--logd", action="store_true",
                        help="stderr goes to logd (the init script under procd), which stamps "
                             "every line: log without timestamps of our own")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
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
