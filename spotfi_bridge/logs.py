"""Logging to stderr, one line per event, secrets redacted.

Under procd, stderr goes to logd, which stamps every line itself (``logread`` shows the
time): the init script passes ``--logd`` and the lines carry no time of their own.
Anywhere else (by hand, the dry run, a test) nothing else would stamp them, so they
start with the local time, to the millisecond.
"""

from __future__ import annotations

import logging
import sys
from typing import Iterable, Optional

_REDACTED = "<redacted>"


class RedactSecrets(logging.Filter):
    """Replace every configured secret in a record's final text, whoever logged it."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self.secrets: tuple[str, ...] = ()
        self.set_secrets(secrets)

    def set_secrets(self, secrets: Iterable[str]) -> None:
        self.secrets = tuple(s for s in secrets if s and len(s) >= 3)

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.secrets:
            return True
        try:
            text = record.getMessage()
        except Exception:  # bad format args: never raise into the caller, never print the args
            text = f"{record.msg} [log call with arguments that do not fit its format]"
            record.msg, record.args = text, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        exc_text = record.exc_text or ""
        if any(s in text or s in exc_text for s in self.secrets):
            for secret in self.secrets:
                text = text.replace(secret, _REDACTED)
                exc_text = exc_text.replace(secret, _REDACTED)
            record.msg, record.args = text, None
            record.exc_text = exc_text or None
        return True


_filter = RedactSecrets()

PLAIN_FORMAT = "%(levelname)s %(name)s: %(message)s"
STAMPED_FORMAT = "%(asctime)s.%(msecs)03d " + PLAIN_FORMAT
STAMP_DATE_FORMAT = "%Y-%m-%d %H:%M:%S"
_timestamps = True


def setup_logging(level: str = "info", secrets: Iterable[str] = (),
                  stream: Optional[object] = None, timestamps: Optional[bool] = None) -> None:
    """Idempotent: a SIGHUP reload calls it again with the new level and token.

    ``timestamps``: False when something downstream stamps the lines (logd); ``None``
    keeps the previous choice (a reload does not know how the daemon was started)."""
    global _timestamps
    if timestamps is not None:
        _timestamps = timestamps
    _filter.set_secrets(secrets)
    root = logging.getLogger()
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    for handler in list(root.handlers):
        if getattr(handler, "_spotfi", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stderr)  # type: ignore[arg-type]
    handler._spotfi = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter(STAMPED_FORMAT, STAMP_DATE_FORMAT) if _timestamps
                         else logging.Formatter(PLAIN_FORMAT))
    handler.addFilter(_filter)
    root.addHandler(handler)
