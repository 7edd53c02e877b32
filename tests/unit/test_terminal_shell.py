"""What a terminal session runs: shell choice, environment, exit descriptions."""

from __future__ import annotations

import os
import signal

from spotfi_bridge.config import TerminalConfig
from spotfi_bridge.terminal.session import exit_description
from spotfi_bridge.terminal.shell import default_argv, shell_spec


def test_ash_first_then_the_users_shell_then_sh() -> None:
    assert default_argv("/bin/bash", lambda path: True) == ("/bin/ash", "-l")
    only_bash = {"/bin/bash"}
    assert default_argv("/bin/bash", only_bash.__contains__) == ("/bin/bash", "-l")
    assert default_argv("/usr/sbin/nologin", lambda p: p != "/bin/ash") == ("/bin/sh", "-l")
    assert default_argv("/bin/false", lambda p: p != "/bin/ash") == ("/bin/sh", "-l")
    assert default_argv("", lambda path: False) == ("/bin/sh", "-l")
    assert default_argv("relative/zsh", lambda p: p != "/bin/ash") == ("/bin/sh", "-l")


def test_configured_shell_wins_and_environment_is_fresh() -> None:
    environ = {"PATH": "/opt/bin:/bin", "SPOTFI_TOKEN": "secret", "LANG": "C.UTF-8",
               "PYTHONPATH": "/x"}
    spec = shell_spec(TerminalConfig(shell=("/bin/zsh", "-l")), environ)
    assert spec.argv == ("/bin/zsh", "-l")
    assert spec.env["TERM"] == "xterm-256color" and spec.env["SHELL"] == "/bin/zsh"
    assert spec.env["PATH"] == "/opt/bin:/bin" and spec.env["LANG"] == "C.UTF-8"
    assert "SPOTFI_TOKEN" not in spec.env and "PYTHONPATH" not in spec.env
    assert spec.cwd == spec.env["HOME"] and os.path.isdir(spec.cwd)
    assert shell_spec(TerminalConfig(), {}).env["PATH"] == "/usr/sbin:/usr/bin:/sbin:/bin"


def test_exit_descriptions() -> None:
    assert exit_description(0) == (0, {}, "shell exited with code 0")
    assert exit_description(3)[0] == 3
    code, extra, text = exit_description(-signal.SIGKILL)
    assert code == 137 and extra == {"signal": 9} and "SIGKILL" in text
    code, extra, text = exit_description(-200)
    assert code == 328 and "signal 200" in text
