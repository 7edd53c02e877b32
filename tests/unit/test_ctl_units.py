"""spotfi-bridge-ctl without a broker: settings precedence, the ~. escape, seq reordering,
argument parsing and the watch/sessions formatting."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spotfi_bridge.ctl import build_parser, main
from spotfi_bridge.ctl.client import Message
from spotfi_bridge.ctl.rpc import parse_args_json, sessions_table
from spotfi_bridge.ctl.settings import SettingsError, resolve, write_config
from spotfi_bridge.ctl.stream import HELP, QUIT, EscapeParser, SeqReorderer
from spotfi_bridge.ctl.watch import classify

NO_FLAGS: dict[str, object] = {}


def env(tmp_path: Path, **values: str) -> dict[str, str]:
    """An environment where no real ~/.config/spotfi/ctl.toml can leak in."""
    base = {"XDG_CONFIG_HOME": str(tmp_path / "xdg")}
    base.update(values)
    return base


# --------------------------------------------------------------------------- settings


def test_defaults_without_any_source(tmp_path: Path) -> None:
    settings = resolve(NO_FLAGS, env(tmp_path))
    assert settings.broker.host == "127.0.0.1" and settings.broker.port == 1883
    assert settings.router == "" and settings.sources == ()


def test_flags_beat_environment_beat_file(tmp_path: Path) -> None:
    path = tmp_path / "ctl.toml"
    path.write_text('broker = "mqtt://file-host:1111"\nrouter = "from-file"\nusername = "fu"\n')
    environ = env(tmp_path, SPOTFI_CTL_CONFIG=str(path), SPOTFI_CTL_ROUTER="from-env")
    settings = resolve({"broker": "mqtt://flag-host:2222"}, environ)
    assert (settings.broker.host, settings.broker.port) == ("flag-host", 2222)
    assert settings.router == "from-env"
    assert settings.username == "fu"
    assert settings.sources == (str(path),)


def test_default_config_path_is_read_when_present(tmp_path: Path) -> None:
    config = tmp_path / "xdg" / "spotfi" / "ctl.toml"
    config.parent.mkdir(parents=True)
    write_config(str(config), "mqtt://127.0.0.1:4242", "dev-router")
    assert os.stat(config).st_mode & 0o077 == 0
    settings = resolve(NO_FLAGS, env(tmp_path))
    assert settings.broker.port == 4242 and settings.router == "dev-router"


@pytest.mark.parametrize("text, needle", [
    ('brokr = "x"\n', "unknown key 'brokr'"),
    ('broker = 5\n', "expected a string"),
    ('insecure = "maybe"\n', "expected true or false"),
    ("broker = \n", "not valid TOML"),
])
def test_bad_file_names_the_file_and_key(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "ctl.toml"
    path.write_text(text)
    with pytest.raises(SettingsError) as info:
        resolve(NO_FLAGS, env(tmp_path), str(path))
    assert needle in str(info.value) and str(path) in str(info.value)


def test_explicit_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="not found"):
        resolve(NO_FLAGS, env(tmp_path, SPOTFI_CTL_CONFIG=str(tmp_path / "nope.toml")))


def test_bad_broker_url_names_its_source(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=r"SPOTFI_CTL_BROKER.*gopher"):
        resolve(NO_FLAGS, env(tmp_path, SPOTFI_CTL_BROKER="gopher://x"))


def test_tls_options_need_a_tls_url(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="mqtts://"):
        resolve({"insecure": True}, env(tmp_path))
    settings = resolve({"insecure": True, "broker": "mqtts://h"}, env(tmp_path))
    assert settings.broker.tls and settings.broker.port == 8883 and settings.insecure


def test_password_is_never_shown(tmp_path: Path) -> None:
    with pytest.raises(SettingsError) as info:
        resolve(NO_FLAGS, env(tmp_path, SPOTFI_CTL_PASSWORD="s3cret-pass"))
    assert "s3cret-pass" not in str(info.value)
    settings = resolve({"username": "u", "password": "s3cret-pass"}, env(tmp_path))
    assert "s3cret-pass" not in repr(settings)


def test_password_in_a_world_readable_file_warns(tmp_path: Path) -> None:
    path = tmp_path / "ctl.toml"
    path.write_text('username = "u"\npassword = "p4ss"\n')
    path.chmod(0o644)
    settings = resolve(NO_FLAGS, env(tmp_path), str(path))
    assert any("chmod 600" in w for w in settings.warnings)


def test_router_id_is_checked_and_plus_only_for_watch(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="no router id"):
        resolve(NO_FLAGS, env(tmp_path)).require_router()
    with pytest.raises(SettingsError, match="must not contain"):
        resolve({"router": "+"}, env(tmp_path)).require_router()
    assert resolve({"router": "+"}, env(tmp_path)).require_router(allow_all=True) == "+"


# --------------------------------------------------------------------------- command line


def test_common_options_before_or_after_the_command() -> None:
    parser = build_parser()
    before = parser.parse_args(["--router", "r1", "rpc", "system", "info"])
    after = parser.parse_args(["rpc", "system", "info", "--router", "r1"])
    assert before.router == after.router == "r1"
    assert (after.path, after.method, after.args) == ("system", "info", None)


def test_usage_errors_exit_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert main(["rpc", "--router", "r1", "system", "info", "{nope"]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    assert main(["rpc", "system", "info"]) == 2
    assert "no router id" in capsys.readouterr().err


def test_args_json_must_be_an_object() -> None:
    assert parse_args_json('{"a": [1]}') == {"a": [1]}
    assert parse_args_json(None) == {} and parse_args_json("  ") == {}
    with pytest.raises(ValueError, match="JSON object"):
        parse_args_json("[1, 2]")


# --------------------------------------------------------------------------- escape


def test_tilde_dot_at_line_start_quits() -> None:
    parser = EscapeParser()
    assert parser.feed(b"~.") == (b"", [QUIT])
    parser = EscapeParser()
    assert parser.feed(b"ls\r~.ignored") == (b"ls\r", [QUIT])


def test_tilde_split_across_reads() -> None:
    parser = EscapeParser()
    assert parser.feed(b"echo\n") == (b"echo\n", [])
    assert parser.feed(b"~") == (b"", [])
    assert parser.feed(b".") == (b"", [QUIT])


def test_tilde_in_the_middle_of_a_line_is_plain() -> None:
    parser = EscapeParser()
    assert parser.feed(b"cd ~.\r") == (b"cd ~.\r", [])


def test_double_tilde_sends_one_and_other_keys_pass() -> None:
    parser = EscapeParser()
    assert parser.feed(b"~~.") == (b"~.", [])
    parser = EscapeParser()
    assert parser.feed(b"~x\r~?") == (b"~x\r", [HELP])
    assert parser.feed(b"~.") == (b"", [QUIT])


@given(st.binary(max_size=200), st.lists(st.integers(1, 50), max_size=10))
def test_chunking_does_not_change_the_result(data: bytes, cuts: list[int]) -> None:
    whole = EscapeParser().feed(data)
    parser = EscapeParser()
    sent, commands, rest = b"", [], data
    for cut in cuts:
        piece, rest = rest[:cut], rest[cut:]
        out, cmds = parser.feed(piece)
        sent, commands = sent + out, commands + cmds
        if QUIT in cmds:
            rest = b""
            break
    out, cmds = parser.feed(rest)
    assert (sent + out, commands + cmds) == whole


@given(st.binary(max_size=200).filter(lambda d: b"~" not in d))
def test_without_tilde_everything_passes(data: bytes) -> None:
    assert EscapeParser().feed(data) == (data, [])


# --------------------------------------------------------------------------- reorder


def test_in_order_output_passes_straight_through() -> None:
    r = SeqReorderer()
    assert r.push(0, b"a", 0.0) == [b"a"]
    assert r.push(1, b"b", 0.0) == [b"b"]
    assert r.deadline() is None


def test_early_chunk_waits_for_the_gap() -> None:
    r = SeqReorderer()
    assert r.push(1, b"b", 0.0) == []
    assert r.push(2, b"c", 0.1) == []
    assert r.deadline() == 2.0
    assert r.push(0, b"a", 0.2) == [b"a", b"b", b"c"]
    assert r.deadline() is None and r.held_bytes == 0


def test_duplicates_are_dropped_and_counted() -> None:
    r = SeqReorderer()
    r.push(0, b"a", 0.0)
    r.push(2, b"c", 0.0)
    assert r.push(0, b"a", 0.0) == [] and r.push(2, b"c", 0.0) == []
    assert r.duplicates == 2


def test_gap_never_filled_is_skipped_and_counted() -> None:
    r = SeqReorderer(gap_timeout=1.0)
    r.push(0, b"a", 0.0)
    r.push(3, b"d", 0.5)
    assert r.expire(1.0) == ([], 0)
    assert r.expire(1.5) == ([b"d"], 2)
    assert r.lost == 2 and r.expected == 4 and r.deadline() is None


def test_second_gap_gets_its_own_timer() -> None:
    r = SeqReorderer(gap_timeout=1.0)
    r.push(1, b"b", 0.0)
    r.push(3, b"d", 0.0)
    assert r.push(0, b"a", 5.0) == [b"a", b"b"]
    assert r.deadline() == 6.0


def test_too_much_held_output_skips_ahead() -> None:
    r = SeqReorderer(max_held=10)
    assert r.push(1, b"x" * 6, 0.0) == []
    assert r.push(2, b"y" * 6, 0.0) == [b"x" * 6, b"y" * 6]
    assert r.lost == 1


def test_chunks_without_seq_pass_in_arrival_order() -> None:
    r = SeqReorderer()
    assert r.push(None, b"x", 0.0) == [b"x"]


@given(st.permutations(list(range(12))))
def test_any_arrival_order_comes_out_in_seq_order(order: list[int]) -> None:
    r = SeqReorderer()
    out: list[bytes] = []
    for seq in order:
        out += r.push(seq, bytes([seq]), 0.0)
    assert out == [bytes([i]) for i in range(12)]
    assert r.lost == 0 and not r.held


# --------------------------------------------------------------------------- watch / sessions


def test_watch_records() -> None:
    status = classify(Message("spotfi/router/r1/status", b"ONLINE", True))
    assert status == {"router": "r1", "event": "status", "status": "ONLINE", "retained": True}
    metrics = classify(Message("spotfi/router/r1/metrics",
                               b'{"type":"metrics","metrics":{"uptime":"5"}}', False))
    assert metrics == {"router": "r1", "event": "metrics", "metrics": {"uptime": "5"}}
    bad = classify(Message("spotfi/router/r1/metrics", b"{oops", False))
    assert bad is not None and bad["event"] == "invalid" and "not valid JSON" in bad["error"]
    assert classify(Message("spotfi/router/r1/rpc/response", b"{}", False)) is None


def test_sessions_table_has_one_row_per_session() -> None:
    text = sessions_table([{"id": "s1", "pid": 10, "cols": 80, "rows": 24, "age": 75.2,
                            "idle": 3, "bytesIn": 10, "bytesOut": 4096, "responseTopic": "t"}])
    header, row = text.splitlines()
    assert header.split()[:3] == ["SESSION", "PID", "SIZE"]
    assert row.split() == ["s1", "10", "80x24", "1m15s", "3s", "10B", "4.0KiB", "t"]


def test_watch_screen_renders_status_and_metrics(tmp_path: Path) -> None:
    import io

    from spotfi_bridge.ctl.watch import Screen

    now = [100.0]
    out = io.StringIO()
    screen = Screen(resolve({"router": "r1"}, env(tmp_path)), out, lambda: now[0])
    assert "waiting for status or metrics" in screen.render()
    screen.apply({"router": "r1", "event": "status", "status": "ONLINE", "retained": True})
    screen.apply({"router": "r1", "event": "metrics", "metrics": {
        "uptime": "3700", "cpuLoad": 125, "totalMemory": 2048, "freeMemory": 1024,
        "activeUsers": 3, "sessions": 1}})
    now[0] = 175.0
    rows = screen.render().splitlines()
    header = next(i for i, line in enumerate(rows) if line.startswith("ROUTER"))
    assert rows[header + 1].split() == ["r1", "ONLINE", ">1m15s", "1m15s", "ago", "1h01m", "1.25",
                                        "1.0KiB/2.0KiB", "3", "1"]
    assert "  activeUsers: 3" in rows
    screen.draw()
    assert out.getvalue().startswith("\x1b[H") and out.getvalue().endswith("\x1b[J")


def test_update_takes_a_url_and_a_64_digit_sha256(capsys: pytest.CaptureFixture[str]) -> None:
    args = build_parser().parse_args(["update", "http://127.0.0.1/p.ipk", "--sha256", "AB" * 32])
    assert (args.command, args.url, args.sha256) == ("update", "http://127.0.0.1/p.ipk",
                                                     "ab" * 32)
    with pytest.raises(SystemExit) as exc:
        main(["update", "http://127.0.0.1/p.ipk", "--sha256", "abc"])
    assert exc.value.code == 2
    assert "expected 64 hexadecimal digits, got 'abc'" in capsys.readouterr().err
