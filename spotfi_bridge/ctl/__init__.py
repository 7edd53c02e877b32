"""``spotfi-bridge-ctl``: the SpotFi API side in a terminal, for developers and operators.

It speaks exactly what the API speaks (``docs/PROTOCOL.md``, built by
:mod:`spotfi_bridge.protocol`) as its own API instance, so it can poke a real
router's bridge or the dry run's. Exit statuses: 0 success; 1 the router
answered with an error or the session ended with one (``ctl shell`` exits with
the remote shell's own code when it exits); 2 bad command line or settings;
3 the broker cannot be reached or refused us; 124 no answer in time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
from types import FrameType
from typing import Optional, Sequence

from spotfi_bridge import __version__
from spotfi_bridge.ctl.client import EXIT_OK, EXIT_USAGE, CtlError
from spotfi_bridge.ctl.settings import ALL_ROUTERS, KEYS, Settings, SettingsError, resolve

__all__ = ["main"]

PROG = "spotfi-bridge-ctl"

EPILOG = """\
settings come from flags, then SPOTFI_CTL_BROKER, SPOTFI_CTL_ROUTER, SPOTFI_CTL_USERNAME,
SPOTFI_CTL_PASSWORD, SPOTFI_CTL_CAFILE, SPOTFI_CTL_CERT, SPOTFI_CTL_KEY, SPOTFI_CTL_INSECURE,
then the TOML file (--config, $SPOTFI_CTL_CONFIG or ~/.config/spotfi/ctl.toml) with the
same keys in lower case (broker = "mqtt://host:1883", router = "r1", ...).

exit status: 0 ok; 1 the router answered with an error (rpc) or the session ended with
one (shell exits with the remote shell's code); 2 bad usage or settings; 3 broker
unreachable or refused; 124 no answer in time.

examples:
  spotfi-bridge-ctl rpc bridge ping
  spotfi-bridge-ctl rpc system info
  spotfi-bridge-ctl rpc file exec '{"command": "uname", "params": ["-a"]}'
  spotfi-bridge-ctl shell                 (~. at the start of a line quits)
  spotfi-bridge-ctl watch --all
  spotfi-bridge-ctl sessions
  spotfi-bridge-ctl update https://example.net/spotfi-bridge_0.2.0-1_all.ipk --sha256 HEX
"""


def _common_options() -> argparse.ArgumentParser:
    """Accepted before and after the command; SUPPRESS keeps one position from erasing the other."""
    common = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    group = common.add_argument_group("connection")
    group.add_argument("--config", metavar="PATH", help="ctl settings file (TOML)")
    group.add_argument("--broker", metavar="URL",
                       help="mqtt://host:1883, mqtts://host:8883, ws://, wss:// "
                            "(default mqtt://127.0.0.1:1883)")
    group.add_argument("--router", metavar="ID", help="the router's id")
    group.add_argument("--username", metavar="USER", help="MQTT username")
    group.add_argument("--password", metavar="PASSWORD",
                       help="MQTT password (prefer SPOTFI_CTL_PASSWORD: flags show in ps)")
    group.add_argument("--cafile", metavar="PEM", help="CA bundle to verify the broker (TLS)")
    group.add_argument("--cert", metavar="PEM", help="client certificate (TLS)")
    group.add_argument("--key", metavar="PEM", help="client private key (TLS)")
    group.add_argument("--insecure", action="store_true",
                       help="do not verify the broker's certificate (TLS; testing only)")
    return common


def build_parser() -> argparse.ArgumentParser:
    common = _common_options()
    parser = argparse.ArgumentParser(
        prog=PROG, parents=[common], epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="The SpotFi API side in a terminal: ubus-style RPC, an interactive shell, "
                    "presence and metrics of routers running spotfi-bridge.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    rpc = commands.add_parser("rpc", parents=[common], help="call a ubus-style method",
                              description="Call PATH METHOD on the router as the API does and "
                                          "print the result as JSON.")
    rpc.add_argument("path", metavar="PATH", help="ubus object, e.g. system, bridge, file")
    rpc.add_argument("method", metavar="METHOD", help="method, e.g. info, ping, exec")
    rpc.add_argument("args", metavar="ARGS", nargs="?", help="arguments as a JSON object")
    rpc.add_argument("--timeout", type=_seconds, default=30.0, metavar="S",
                     help="give up after S seconds (default 30; exit status 124)")
    style = rpc.add_mutually_exclusive_group()
    style.add_argument("--pretty", action="store_true", default=None,
                       help="indented JSON (default on a terminal)")
    style.add_argument("--compact", dest="pretty", action="store_false",
                       help="one-line JSON (default otherwise)")

    shell = commands.add_parser("shell", parents=[common], help="interactive terminal",
                                description="An interactive shell on the router through MQTT. "
                                            "~. at the start of a line quits, ~~ sends ~, ~? helps.")
    shell.add_argument("--start-timeout", type=_seconds, default=10.0, metavar="S",
                       help="how long to wait for the router to start the shell (default 10)")

    watch = commands.add_parser("watch", parents=[common], help="presence and latest metrics",
                                description="Presence and the latest metrics of a router, live. "
                                            "On a terminal the view refreshes in place; otherwise "
                                            "each event is one JSON line.")
    watch.add_argument("--all", action="store_true", help="every router on the broker (router +)")
    watch.add_argument("--count", type=int, metavar="N", help="exit after N events")
    watch.add_argument("--timeout", type=_seconds, metavar="S",
                       help="exit after S seconds (status 124 if --count was not reached)")

    sessions = commands.add_parser("sessions", parents=[common], help="open terminal sessions",
                                   description="The router's open terminal sessions "
                                               "(rpc bridge sessions).")
    sessions.add_argument("--timeout", type=_seconds, default=15.0, metavar="S",
                          help="give up after S seconds (default 15)")

    update = commands.add_parser(
        "update", parents=[common], help="install a bridge package on the router",
        description="Ask the router's bridge to download a package (.ipk or .apk), check its "
                    "sha256 and install it (rpc bridge update). The reply comes once the "
                    "package is checked and handed to the installer; the outcome (done, "
                    "rolled-back) shows in 'rpc bridge info' under \"update\".")
    update.add_argument("url", metavar="URL", help="http:// or https:// URL of the package")
    update.add_argument("--sha256", required=True, type=_sha256, metavar="HEX",
                        help="the package's SHA-256 (sha256sum FILE)")
    update.add_argument("--timeout", type=_seconds, default=120.0, metavar="S",
                        help="give up waiting for the reply after S seconds (default 120)")

    commands.add_parser("config", parents=[common], help="show the effective settings",
                        description="Print the settings ctl would use (password masked).")
    return parser


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0 < value <= 86400:
        raise argparse.ArgumentTypeError(f"expected 0 < seconds <= 86400, got {text}")
    return value


def _sha256(text: str) -> str:
    if len(text) != 64 or any(c not in "0123456789abcdefABCDEF" for c in text):
        raise argparse.ArgumentTypeError(f"expected 64 hexadecimal digits, got {text!r}")
    return text.lower()


def _exit_on_signal(signum: int, _frame: Optional[FrameType]) -> None:
    """SIGTERM/SIGHUP unwind like Ctrl-C, so every ``finally`` (cursor, tty, MQTT) runs."""
    raise SystemExit(128 + signum)


def main(argv: Optional[Sequence[str]] = None) -> int:
    installed = {}
    for signum in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(signum) == signal.SIG_DFL:
            installed[signum] = signal.signal(signum, _exit_on_signal)
    try:
        return _main(argv)
    finally:
        for signum, previous in installed.items():
            signal.signal(signum, previous)


def _main(argv: Optional[Sequence[str]]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    flags = {name: getattr(args, name, None) for name in KEYS}
    if getattr(args, "all", False):
        flags["router"] = ALL_ROUTERS
    try:
        settings = resolve(flags, config_path=getattr(args, "config", None))
        for warning in settings.warnings:
            print(f"{PROG}: warning: {warning}", file=sys.stderr)
        return _run(args, settings)
    except SettingsError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except CtlError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # the reader went away (``ctl watch | head -1``): not an error; silence the final flush
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK


def _run(args: argparse.Namespace, settings: Settings) -> int:
    if args.command == "rpc":
        from spotfi_bridge.ctl.rpc import parse_args_json, run_rpc

        try:
            call_args = parse_args_json(args.args)
        except ValueError as exc:
            raise SettingsError(str(exc)) from None
        pretty = sys.stdout.isatty() if args.pretty is None else args.pretty
        return run_rpc(settings, args.path, args.method, call_args, args.timeout, sys.stdout,
                       sys.stderr, pretty)
    if args.command == "shell":
        from spotfi_bridge.ctl.shell import run_shell

        return run_shell(settings, sys.stderr, start_timeout=args.start_timeout)
    if args.command == "watch":
        from spotfi_bridge.ctl.watch import run_watch

        if args.count is not None and args.count < 1:
            raise SettingsError("--count must be at least 1")
        return run_watch(settings, args.count, args.timeout, sys.stdout, sys.stdout.isatty())
    if args.command == "update":
        from spotfi_bridge.ctl.rpc import run_rpc

        return run_rpc(settings, "bridge", "update", {"url": args.url, "sha256": args.sha256},
                       args.timeout, sys.stdout, sys.stderr, sys.stdout.isatty())
    if args.command == "sessions":
        from spotfi_bridge.ctl.rpc import run_sessions

        return run_sessions(settings, args.timeout, sys.stdout, sys.stderr, sys.stdout.isatty())
    shown = dataclasses.asdict(settings)
    shown["broker"] = settings.broker.url
    shown["password"] = "<set>" if settings.password else ""
    print(json.dumps(shown, indent=2))
    return EXIT_OK
