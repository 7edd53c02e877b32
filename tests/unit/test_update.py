"""The parts of ``bridge update`` that need no broker: arguments, one update at a time,
the rollback package rebuilt from opkg's records."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from spotfi_bridge.config import UpdateConfig
from spotfi_bridge.update import (
    UpdatePaths,
    Updater,
    UpdateRefused,
    parse_request,
    rebuild_installed_ipk,
)
from tests.helpers.router import ROOT
from tests.unit.test_packaging import load_builder

FAKE_OPKG = ROOT / "tests" / "helpers" / "fake_opkg.py"


def test_a_valid_request_is_read_with_the_digest_in_lower_case() -> None:
    assert parse_request({"url": "https://example.net/p.ipk", "sha256": "AB" * 32}) == \
        ("https://example.net/p.ipk", "ab" * 32)


@pytest.mark.parametrize(("args", "word"), [
    ({"sha256": "0" * 64}, "'url'"),
    ({"url": "file:///etc/shadow", "sha256": "0" * 64}, "'url'"),
    ({"url": "http://x/a b.ipk", "sha256": "0" * 64}, "'url'"),
    ({"url": "http://x/p.ipk"}, "'sha256'"),
    ({"url": "http://x/p.ipk", "sha256": "0" * 63}, "'sha256'"),
    ({"url": "http://x/p.ipk", "sha256": "g" * 64}, "'sha256'"),
])
def test_bad_arguments_name_the_argument(args: dict[str, str], word: str) -> None:
    with pytest.raises(UpdateRefused, match=word):
        parse_request(args)


def _opkg(root: Path, package: Path) -> None:
    subprocess.run([sys.executable, str(FAKE_OPKG), "install", str(package)], check=True,
                   env={**os.environ, "SPOTFI_BRIDGE_ROOT": str(root)}, capture_output=True)


def _tree(root: Path) -> dict[str, tuple[bytes, int]]:
    return {str(path.relative_to(root)): (path.read_bytes(), path.stat().st_mode & 0o7777)
            for path in sorted(root.rglob("*"))
            if path.is_file() and "opkg" not in path.parts and path.name != "opkg.log"}


def test_the_rebuilt_package_installs_the_same_files(tmp_path: Path) -> None:
    """The rollback package made from opkg's records puts back exactly what was installed
    (every file, its bytes and its mode), and opkg records the same version."""
    built = load_builder().build_ipk(tmp_path / "dist")
    first, second = tmp_path / "first", tmp_path / "second"
    _opkg(first, built.path)
    rebuilt = tmp_path / "rebuilt.ipk"
    version = rebuild_installed_ipk(str(first / "usr/lib/opkg/info"), str(first), str(rebuilt))
    assert version == f"{built.version}-1"
    _opkg(second, rebuilt)
    assert _tree(second) == _tree(first)
    assert (second / "usr/lib/opkg/info/spotfi-bridge.control").read_text() == \
        (first / "usr/lib/opkg/info/spotfi-bridge.control").read_text()


def test_no_record_of_the_package_is_a_clear_refusal(tmp_path: Path) -> None:
    with pytest.raises(UpdateRefused, match="opkg has no record of spotfi-bridge"):
        rebuild_installed_ipk(str(tmp_path / "info"), str(tmp_path), str(tmp_path / "x.ipk"))


def test_a_second_update_while_one_is_running_is_refused(tmp_path: Path) -> None:
    paths = UpdatePaths(str(tmp_path))
    os.makedirs(paths.state_dir)
    Path(paths.request_file).write_text(json.dumps(
        {"id": "upd-1", "state": "installing", "helperPid": os.getpid()}))
    updater = Updater(UpdateConfig(), paths, environ={})
    outcome = asyncio.run(updater.start({"url": "http://127.0.0.1:9/p.ipk",
                                         "sha256": "0" * 64}, 30.0))
    assert outcome.error == "refused: an update is already running (upd-1)"
    # once the helper is gone (its pid no longer runs) the state no longer blocks
    Path(paths.state_file).write_text(json.dumps({"id": "upd-1", "state": "done"}))
    assert updater.info()["state"] == "done"
