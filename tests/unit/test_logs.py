"""``setup_logging``: one line per event on the stream, the token redacted wherever it hides."""

from __future__ import annotations

import io
import logging
import re
from typing import Iterator

import pytest

from spotfi_bridge import logs

TOKEN = "tok-5e4d3c2b1a-SECRET"


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    """Logging set up on a buffer; the root logger is put back afterwards."""
    root = logging.getLogger()
    level = root.level
    out = io.StringIO()
    logs.setup_logging("debug", [TOKEN], out, timestamps=False)  # as under logd
    yield out
    for handler in list(root.handlers):
        if getattr(handler, "_spotfi", False):
            root.removeHandler(handler)
    logs._filter.set_secrets(())
    logs._timestamps = True
    root.setLevel(level)


def lines(out: io.StringIO) -> list[str]:
    return out.getvalue().splitlines()


def test_one_line_per_event_with_level_and_logger(stream: io.StringIO) -> None:
    logging.getLogger("spotfi_bridge.link").info("connected to %s:%d", "broker", 1883)
    assert lines(stream) == ["INFO spotfi_bridge.link: connected to broker:1883"]


def test_token_in_message_is_redacted(stream: io.StringIO) -> None:
    logging.getLogger("spotfi_bridge").warning(f"auth with password {TOKEN} refused")
    assert lines(stream) == ["WARNING spotfi_bridge: auth with password <redacted> refused"]


def test_token_in_arguments_is_redacted(stream: io.StringIO) -> None:
    log = logging.getLogger("spotfi_bridge")
    log.info("password=%s user=%s", TOKEN, "router-1")
    log.info("settings %r", {"username": "router-1", "password": TOKEN})
    text = stream.getvalue()
    assert TOKEN not in text
    assert "password=<redacted> user=router-1" in text
    assert "'password': '<redacted>'" in text


def test_token_in_exception_text_is_redacted(stream: io.StringIO) -> None:
    log = logging.getLogger("spotfi_bridge.link")
    try:
        raise ConnectionError(f"CONNACK refused for password {TOKEN}")
    except ConnectionError:
        log.exception("connect failed")
    text = stream.getvalue()
    assert TOKEN not in text
    assert "ERROR spotfi_bridge.link: connect failed" in text
    assert "Traceback" in text and "ConnectionError: CONNACK refused for password <redacted>" in text


def test_third_party_loggers_are_redacted_too(stream: io.StringIO) -> None:
    logging.getLogger("paho.mqtt.client").error("Sending CONNECT (u1, p1) pw=%s", TOKEN)
    assert TOKEN not in stream.getvalue()
    assert "<redacted>" in stream.getvalue()


def test_bad_format_arguments_neither_raise_nor_leak(stream: io.StringIO) -> None:
    log = logging.getLogger("spotfi_bridge")
    log.info("count %d", TOKEN)  # a bug in a log call must not take the daemon down
    log.info("two %s %s", "only-one")
    text = stream.getvalue()
    assert TOKEN not in text
    assert len(lines(stream)) == 2 and "count %d" in lines(stream)[0]


def test_level_is_applied(stream: io.StringIO) -> None:
    logs.setup_logging("warning", [TOKEN], stream)
    log = logging.getLogger("spotfi_bridge")
    log.info("not shown")
    log.debug("not shown either")
    log.warning("shown")
    assert lines(stream) == ["WARNING spotfi_bridge: shown"]


def test_setup_again_replaces_handler_and_token(stream: io.StringIO) -> None:
    new_token = "tok-rotated-after-sighup"
    logs.setup_logging("info", [new_token], stream)
    log = logging.getLogger("spotfi_bridge")
    log.info("token %s", new_token)
    assert lines(stream) == ["INFO spotfi_bridge: token <redacted>"]  # once: no duplicate handler


def test_empty_and_tiny_secrets_do_not_mangle_logs(stream: io.StringIO) -> None:
    logs.setup_logging("info", ["", "a", TOKEN], stream)
    logging.getLogger("spotfi_bridge").info("a normal line with %s", TOKEN)
    assert lines(stream) == ["INFO spotfi_bridge: a normal line with <redacted>"]


def test_percent_signs_survive_redaction(stream: io.StringIO) -> None:
    logging.getLogger("spotfi_bridge").info("cpu 100%% with %s", TOKEN)
    assert lines(stream) == ["INFO spotfi_bridge: cpu 100% with <redacted>"]


STAMP = r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}\.\d{3} "


def test_lines_carry_the_time_when_nothing_downstream_stamps_them(stream: io.StringIO) -> None:
    # by hand or in the dry run nobody else adds the time; logd (``--logd``) does
    logs.setup_logging("info", [TOKEN], stream, timestamps=True)
    logging.getLogger("spotfi_bridge.link").warning("connection lost with %s", TOKEN)
    [line] = lines(stream)
    assert re.fullmatch(STAMP + r"WARNING spotfi_bridge\.link: connection lost with <redacted>",
                        line), line


def test_a_reload_keeps_the_choice_made_at_start(stream: io.StringIO) -> None:
    logs.setup_logging("info", [TOKEN], stream, timestamps=True)
    logs.setup_logging("info", ["tok-after-sighup"], stream)  # what Daemon.reload calls
    logging.getLogger("spotfi_bridge").info("reloaded")
    assert re.fullmatch(STAMP + "INFO spotfi_bridge: reloaded", lines(stream)[0])
    logs.setup_logging("info", [TOKEN], stream, timestamps=False)
    logs.setup_logging("info", ["tok-after-sighup"], stream)
    logging.getLogger("spotfi_bridge").info("reloaded again")
    assert lines(stream)[1] == "INFO spotfi_bridge: reloaded again"
