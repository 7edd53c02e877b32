"""asyncio set-up shared by the daemon and ctl."""

from __future__ import annotations

import asyncio
import os
import sys
import warnings


def child_environment() -> dict[str, str]:
    """The daemon's environment for a child it runs, without the daemon's own settings:
    ``SPOTFI_TOKEN`` may be among them."""
    return {k: v for k, v in os.environ.items() if not k.startswith("SPOTFI_")}


def install_child_watcher() -> None:
    """Reap children through pidfds on the loop, not with a thread per child.

    Python 3.9-3.11 default to ``ThreadedChildWatcher`` (one thread per child
    process); 3.12+ pick the pidfd watcher on their own.
    """
    if sys.version_info >= (3, 12) or not hasattr(asyncio, "PidfdChildWatcher"):
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            watcher = asyncio.PidfdChildWatcher()
            asyncio.set_child_watcher(watcher)
            watcher.attach_loop(asyncio.get_running_loop())
        except (OSError, RuntimeError):  # old kernel without pidfd_open: keep the default
            pass
