"""What a terminal session runs, and with which environment.

The child gets a small, fresh environment rather than the daemon's: the daemon's
environment may hold the router token (``SPOTFI_TOKEN``) and must not leak into an
operator's shell.
"""

from __future__ import annotations

import os
import pwd
import signal
from dataclasses import dataclass
from typing import Callable, Mapping, Optional

from spotfi_bridge.config import TerminalConfig

DEFAULT_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
#: Inherited from the daemon when set: locale and time zone only.
PASSED_ENV = ("LANG", "LC_ALL", "LC_CTYPE", "TZ")
_NOT_SHELLS = ("nologin", "false")

#: Signals a child must start with at their default action. Ignored dispositions survive
#: exec, and Python ignores SIGPIPE, so without this ``yes | head`` would misbehave.
_RESET_SIGNALS = tuple(
    getattr(signal, name) for name in (
        "SIGPIPE", "SIGXFSZ", "SIGXFZ", "SIGINT", "SIGQUIT", "SIGTERM", "SIGHUP", "SIGCHLD",
        "SIGTSTP", "SIGTTIN", "SIGTTOU", "SIGUSR1", "SIGUSR2", "SIGALRM",
    ) if hasattr(signal, name)
)


@dataclass(frozen=True)
class ShellSpec:
    argv: tuple[str, ...]
    env: dict[str, str]
    cwd: str


def _user() -> tuple[str, str, str]:
    """(name, home, login shell) of the daemon's user; robust to a missing passwd entry."""
    try:
        entry = pwd.getpwuid(os.getuid())
        return entry.pw_name, entry.pw_dir or "/", entry.pw_shell or ""
    except KeyError:
        return str(os.getuid()), os.environ.get("HOME", "/"), ""


def default_argv(user_shell: str, is_executable: Callable[[str], bool]) -> tuple[str, ...]:
    """``/bin/ash -l`` (OpenWrt), else the user's login shell, else ``/bin/sh``."""
    if is_executable("/bin/ash"):
        return ("/bin/ash", "-l")
    if (user_shell and os.path.isabs(user_shell) and is_executable(user_shell)
            and os.path.basename(user_shell) not in _NOT_SHELLS):
        return (user_shell, "-l")
    return ("/bin/sh", "-l")


def _is_executable(path: str) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


def shell_spec(config: TerminalConfig, environ: Optional[Mapping[str, str]] = None) -> ShellSpec:
    environ = os.environ if environ is None else environ
    name, home, user_shell = _user()
    argv = tuple(config.shell) or default_argv(user_shell, _is_executable)
    if not os.path.isdir(home):
        home = "/"
    env = {
        "TERM": "xterm-256color",
        "HOME": home,
        "USER": name,
        "LOGNAME": name,
        "SHELL": argv[0],
        "PATH": environ.get("PATH") or DEFAULT_PATH,
    }
    for key in PASSED_ENV:
        if environ.get(key):
            env[key] = environ[key]
    return ShellSpec(argv, env, home)


def reset_child_signals() -> None:
    """Run in the forked child before exec: default dispositions, nothing blocked."""
    for signum in _RESET_SIGNALS:
        try:
            signal.signal(signum, signal.SIG_DFL)
        except (OSError, ValueError):
            pass
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
