"""The daemon imports only what its configuration uses: each module is RSS on a router."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from spotfi_bridge import cli

#: Loaded by a daemon that reads its command line, builds every part and talks to ubus:
#: none of these may be among them.
NOT_ON_THE_DAEMONS_PATH = (
    "argparse",            # the command line is read by hand in the common forms
    "psutil",              # only without ubus (dry run on a PC)
    "http.client",         # paho's urllib.request, deferred: read only for a SOCKS proxy
    "email", "tempfile",
    "datetime",            # only from the first date-time read (an x-start's timestamp)
    "tarfile",             # only to rebuild the installed package for a roll-back
    "spotfi_bridge.ctl", "spotfi_bridge.devtools",
    "spotfi_bridge.rpc.local", "spotfi_bridge.rpc.sysinfo",
)


def loaded_after(code: str) -> set[str]:
    script = f"import sys, json\n{code}\nprint(json.dumps(sorted(sys.modules)))\n"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    return set(json.loads(out.splitlines()[-1]))


def test_the_daemons_start_path_leaves_out_what_it_does_not_use() -> None:
    loaded = loaded_after(
        "from spotfi_bridge import cli\n"
        "args = cli.parse_args(['run', '--config', '/etc/spotfi/bridge.toml', '--logd'])\n"
        "from spotfi_bridge import daemon\n"
        "from spotfi_bridge.rpc import make_backend\n")
    assert not loaded & set(NOT_ON_THE_DAEMONS_PATH)


def test_deferred_urllib_request_still_works_when_used() -> None:
    loaded = loaded_after(
        "import spotfi_bridge.mqtt_compat\n"
        "import urllib.request\n"
        "from urllib import request\n"
        "assert request is urllib.request\n"
        "assert isinstance(urllib.request.getproxies(), dict)\n"
        "assert urllib.request.proxy_bypass('localhost') in (True, False, 0, 1)\n")
    assert "http.client" in loaded  # loaded on first use, as a plain import would


@pytest.mark.parametrize("argv", [
    [], ["run"], ["check-config"], ["--config", "/x.toml"], ["--config=/x.toml"],
    ["--config="], ["run", "--config", "a", "--config", "b"], ["--log-level", "debug", "run"],
    ["check-config", "--log-level=error", "--config", "c"], ["--config", "x", "check-config"],
    ["run", "--logd"], ["--logd", "--config", "x", "--logd"],
])
def test_the_plain_command_line_reads_as_argparse_reads_it(argv: list[str]) -> None:
    assert cli._parse_plain(argv) is not None
    assert vars(cli.parse_args(argv)) == vars(cli.build_parser().parse_args(argv))


def _outcome(parse: Any, argv: list[str], capsys: pytest.CaptureFixture[str]) -> Any:
    try:
        return vars(parse(argv))
    except SystemExit as exc:
        return exc.code, capsys.readouterr()


@pytest.mark.parametrize("argv", [
    ["--log-level", "loud"], ["run", "run"], ["--config"], ["bogus"], ["--config", "-x"],
    ["--conf", "x"], ["--version"], ["-h"], ["--", "run"], ["--logd=1"], ["--log"],
])
def test_anything_else_is_left_to_argparse(argv: list[str],
                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert cli._parse_plain(argv) is None
    assert _outcome(cli.parse_args, argv, capsys) == \
        _outcome(cli.build_parser().parse_args, argv, capsys)
