"""The .ipk as opkg reads it: built here, then taken apart byte by byte.

opkg (OpenWrt's, from ``scripts/ipkg-build`` packages) wants an outer gzipped
tar of ``./debian-binary``, ``./control.tar.gz`` and ``./data.tar.gz`` in GNU
format (it silently installs nothing behind PAX headers), owned 0:0. The
launcher must run the packaged code, not this checkout's.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass, fields
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from spotfi_bridge import __version__
from spotfi_bridge.config import (
    SCHEMA,
    Config,
    MetricsConfig,
    MqttConfig,
    RouterConfig,
    RpcConfig,
    TerminalConfig,
    TlsConfig,
    UpdateConfig,
    load_config,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
BUILDER = ROOT / "packaging" / "build_ipk.py"
TOKEN = "tok-3f9a7c1e55d2"
EX_CONFIG = 78

pytestmark = pytest.mark.skipif(sys.version_info < (3, 10),
                                reason="the ipk builder needs Python 3.10+")


def load_builder() -> ModuleType:
    spec = importlib.util.spec_from_file_location("build_ipk", BUILDER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["build_ipk"] = module
    spec.loader.exec_module(module)
    return module


@functools.cache
def _shell() -> tuple[str, ...]:
    busybox = shutil.which("busybox")
    if busybox and subprocess.run([busybox, "ash", "-c", "true"]).returncode == 0:
        return (busybox, "ash")
    return ("sh",)


def shell() -> list[str]:
    """busybox ash (OpenWrt's /bin/sh) when this machine has it, else sh."""
    return list(_shell())


# --------------------------------------------------------------------------- raw tar reading

@dataclass(frozen=True)
class Header:
    name: str
    mode: int
    uid: int
    gid: int
    size: int
    typeflag: str
    magic: bytes
    uname: str
    gname: str
    data: bytes


def _octal(field: bytes) -> int:
    text = field.rstrip(b"\0 ").strip()
    return int(text, 8) if text else 0


def raw_headers(archive: bytes) -> list[Header]:
    """Every header of a tar, read from the 512-byte blocks themselves (no tarfile)."""
    headers = []
    offset = 0
    while offset + 512 <= len(archive):
        block = archive[offset:offset + 512]
        if block == b"\0" * 512:
            break
        checksum = _octal(block[148:156])
        assert checksum == sum(block[:148]) + 8 * 32 + sum(block[156:]), "bad header checksum"
        size = _octal(block[124:136])
        data = archive[offset + 512:offset + 512 + size]
        headers.append(Header(
            name=block[0:100].rstrip(b"\0").decode(),
            mode=_octal(block[100:108]),
            uid=_octal(block[108:116]),
            gid=_octal(block[116:124]),
            size=size,
            typeflag=block[156:157].decode(),
            magic=block[257:265],
            uname=block[265:297].rstrip(b"\0").decode(),
            gname=block[297:329].rstrip(b"\0").decode(),
            data=data,
        ))
        offset += 512 + (size + 511) // 512 * 512
    assert len(archive) % 512 == 0
    return headers


def gunzip(data: bytes) -> bytes:
    assert data[:2] == b"\x1f\x8b", "not gzip"
    return gzip.decompress(data)


@dataclass
class Ipk:
    path: Path
    raw: bytes
    outer: list[Header]
    control_tar: bytes
    data_tar: bytes

    def member(self, name: str) -> bytes:
        return next(h.data for h in self.outer if h.name == name)

    def control(self) -> dict[str, str]:
        text = next(h.data for h in raw_headers(self.control_tar)
                    if h.name == "./control").decode()
        fields_: dict[str, str] = {}
        last = ""
        for line in text.splitlines():
            if line.startswith(" "):
                fields_[last] += "\n" + line
            else:
                last, _, value = line.partition(": ")
                fields_[last] = value
        return fields_

    def data(self) -> dict[str, Header]:
        return {h.name: h for h in raw_headers(self.data_tar)}


def open_ipk(path: Path) -> Ipk:
    raw = path.read_bytes()
    outer = raw_headers(gunzip(raw))
    members = {h.name: h.data for h in outer}
    return Ipk(path, raw, outer, gunzip(members["./control.tar.gz"]),
               gunzip(members["./data.tar.gz"]))


@pytest.fixture(scope="module")
def builder() -> ModuleType:
    return load_builder()


@pytest.fixture(scope="module")
def ipk(builder: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> Ipk:
    built = builder.build_ipk(tmp_path_factory.mktemp("dist"))
    return open_ipk(built.path)


@pytest.fixture(scope="module")
def unpacked(ipk: Ipk, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """data.tar.gz extracted as opkg would, into a scratch root."""
    root = tmp_path_factory.mktemp("root")
    with tarfile.open(fileobj=io.BytesIO(ipk.data_tar)) as archive:
        for member in archive.getmembers():
            assert not member.name.startswith("/") and ".." not in member.name.split("/")
        archive.extractall(root)
    return root


# --------------------------------------------------------------------------- archive format

def test_name_and_outer_members_in_order(ipk: Ipk) -> None:
    assert ipk.path.name == f"spotfi-bridge_{__version__}-1_all.ipk"
    assert [h.name for h in ipk.outer] == ["./debian-binary", "./control.tar.gz",
                                           "./data.tar.gz"]
    assert ipk.member("./debian-binary") == b"2.0\n"


def test_every_tar_is_gnu_owned_by_root(ipk: Ipk) -> None:
    for label, archive in (("outer", gunzip(ipk.raw)), ("control", ipk.control_tar),
                           ("data", ipk.data_tar)):
        headers = raw_headers(archive)
        assert headers, label
        for header in headers:
            # no PAX ('x', 'g') or GNU long-name ('L', 'K') records: files and dirs only
            assert header.typeflag in ("0", "5"), (label, header.name, header.typeflag)
            assert header.magic == b"ustar  \0", (label, header.name, header.magic)
            assert (header.uid, header.gid) == (0, 0), (label, header.name)
            assert header.uname in ("", "root") and header.gname in ("", "root")
            assert header.name.startswith("./"), (label, header.name)


def test_gzip_streams_carry_no_timestamp_or_file_name(ipk: Ipk) -> None:
    for stream in (ipk.raw, ipk.member("./control.tar.gz"), ipk.member("./data.tar.gz")):
        assert stream[4:8] == b"\0\0\0\0"  # MTIME
        assert not stream[3] & 0x08  # FNAME flag


def test_two_builds_are_identical_whatever_the_file_dates(
        builder: ModuleType, ipk: Ipk, tmp_path: Path) -> None:
    again = builder.build_ipk(tmp_path / "again")
    assert again.path.read_bytes() == ipk.raw
    # a fresh checkout has other mtimes: the package must not notice
    copy = tmp_path / "checkout"
    for part in ("spotfi_bridge", "packaging", "init.d"):
        shutil.copytree(ROOT / part, copy / part,
                        ignore=shutil.ignore_patterns("__pycache__"))
    for path in copy.rglob("*"):
        os.utime(path, (1_000_000_000, 1_000_000_000))
    moved = builder.build_ipk(tmp_path / "moved", source=copy)
    assert moved.path.read_bytes() == ipk.raw


# --------------------------------------------------------------------------- control

def test_control_fields(ipk: Ipk) -> None:
    control = ipk.control()
    assert list(control) == ["Package", "Version", "Depends", "Source", "SourceName",
                             "License", "Section", "Maintainer", "Architecture",
                             "Installed-Size", "Description"]
    assert control["Package"] == "spotfi-bridge"
    assert control["Version"] == f"{__version__}-1"
    assert control["Architecture"] == "all"
    assert control["License"] == "MIT"
    # what ipkg-build writes: the size of the uncompressed data.tar
    assert int(control["Installed-Size"]) == len(ipk.data_tar)
    summary, *body = control["Description"].split("\n")
    assert summary and body and all(line.startswith(" ") for line in body)


def test_control_members_and_modes(ipk: Ipk) -> None:
    headers = {h.name: h for h in raw_headers(ipk.control_tar)}
    assert set(headers) == {"./", "./control", "./conffiles", "./postinst", "./prerm",
                            "./postrm"}
    assert headers["./"].typeflag == "5"
    assert headers["./postinst"].mode == headers["./prerm"].mode == 0o755
    assert headers["./postrm"].mode == 0o755
    assert headers["./control"].mode == headers["./conffiles"].mode == 0o644


def _imports_by_grep(text: str, module: str) -> bool:
    return re.search(rf"^\s*(import|from)\s+{re.escape(module)}\b", text, re.M) is not None


def test_depends_names_the_feed_packages_the_code_imports(ipk: Ipk) -> None:
    depends = [name.strip() for name in ipk.control()["Depends"].split(",")]
    assert depends[0] == "python3-light"
    assert len(set(depends)) == len(depends)
    shipped = [h.data.decode() for name, h in ipk.data().items() if name.endswith(".py")]
    # grep, independent of the builder's AST walk: a feed package is listed exactly
    # when some shipped module imports what it carries
    for module, package in (("asyncio", "python3-asyncio"), ("logging", "python3-logging"),
                            ("urllib", "python3-urllib"), ("paho", "python3-paho-mqtt"),
                            ("psutil", "python3-psutil"), ("sqlite3", "python3-sqlite3"),
                            ("xml", "python3-xml"), ("ctypes", "python3-ctypes"),
                            ("multiprocessing", "python3-multiprocessing")):
        imported = any(_imports_by_grep(text, module) for text in shipped)
        assert (package in depends) == imported, (module, package, depends)
    # TLS brokers need the ssl module, imported or not
    assert "python3-openssl" in depends
    # bundled, so no dependency on a package 23.05-25.12 lack
    assert "python3-ptyprocess" not in depends
    assert not any(name.startswith("python3-tomli") for name in depends)


def test_required_imports_skips_optional_and_other_python_branches(builder: ModuleType) -> None:
    source = """
import os, json.decoder
from collections import abc
from . import sibling
try:
    import ujson
except ImportError:
    ujson = None
if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli
if sys.version_info < (3, 12):
    import logging
if TYPE_CHECKING:
    import mypy_extensions
def later():
    import asyncio
"""
    assert builder.required_imports(source) == {
        "os", "json", "collections", "tomllib", "logging", "asyncio"}


def test_an_unknown_import_stops_the_build(builder: ModuleType) -> None:
    with pytest.raises(builder.BuildError, match="import yaml"):
        builder.feed_depends({"os", "yaml"}, own=set())
    assert builder.feed_depends({"os", "http"}, own=set()).keys() >= {
        "python3-light", "python3-email", "python3-urllib"}


def test_feed_makefile_depends_match_the_ipk(ipk: Ipk) -> None:
    makefile = (ROOT / "packaging" / "openwrt" / "Makefile").read_text()
    match = re.search(r"^\s*DEPENDS:=((?:.*\\\n)*.*)$", makefile, re.M)
    assert match, "no DEPENDS in packaging/openwrt/Makefile"
    feed = {word.lstrip("+") for word in match.group(1).replace("\\\n", " ").split()}
    ipk_depends = {name.strip() for name in ipk.control()["Depends"].split(",")}
    assert feed == ipk_depends
    assert "PKG_RELEASE:=1" in makefile
    assert "/etc/spotfi/bridge.toml" in makefile


# --------------------------------------------------------------------------- data

def test_data_layout_and_modes(ipk: Ipk) -> None:
    data = ipk.data()
    lib = "./usr/lib/spotfi-bridge/"
    for name, header in data.items():
        if header.typeflag == "5" or name.startswith(("./usr/bin/", "./etc/init.d/",
                                                      "./usr/libexec/")):
            assert header.mode == 0o755, name  # directories, launchers, init script
        elif name == "./etc/spotfi/bridge.toml":
            assert header.mode == 0o600, name  # may come to hold the token
        else:
            assert header.mode == 0o644, name
        assert "__pycache__" not in name and not name.endswith(".pyc"), name
        if header.typeflag == "0" and name.startswith(lib):
            assert name.endswith(".py") or name == lib + "ptyprocess/LICENSE", name
    for needed in ("./usr/bin/spotfi-bridge", "./etc/init.d/spotfi-bridge",
                   lib + "spotfi_bridge/__init__.py", lib + "spotfi_bridge/cli.py",
                   lib + "ptyprocess/__init__.py", lib + "ptyprocess/ptyprocess.py",
                   lib + "ptyprocess/LICENSE"):
        assert data[needed].typeflag == "0", needed
    # every parent directory is listed before what it holds
    seen: set[str] = set()
    for name in data:
        parent = name.rstrip("/").rsplit("/", 1)[0] + "/"
        assert name == "./" or parent in seen, name
        seen.add(name)
    # SpotFi's setup script owns it: never created or overwritten by the package
    assert not any(name.startswith("./etc/spotfi.env") for name in data)


def test_packaged_code_is_this_checkouts(ipk: Ipk) -> None:
    data = ipk.data()
    for path in sorted((ROOT / "spotfi_bridge").rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        name = "./usr/lib/spotfi-bridge/" + path.relative_to(ROOT).as_posix()
        if {"devtools", "ctl"} & set(path.parts):  # developers' and operators' machines only
            assert name not in data, name
            continue
        assert data[name].data == path.read_bytes(), name


def test_conffiles_are_in_the_data(ipk: Ipk) -> None:
    conffiles = next(h.data for h in raw_headers(ipk.control_tar)
                     if h.name == "./conffiles").decode().splitlines()
    assert conffiles == ["/etc/spotfi/bridge.toml"]
    data = ipk.data()
    for path in conffiles:
        assert data["." + path].typeflag == "0"


def test_installed_size_stays_small(ipk: Ipk) -> None:
    # the package's own footprint on the router, beyond the feed packages
    assert len(ipk.data_tar) < 400 * 1024


# --------------------------------------------------------------------------- example config

def uncomment(text: str) -> str:
    """Turn every ``#key = value`` and ``#[section]`` line of the example into a setting."""
    return "\n".join(line[1:] if re.match(r"#[\[A-Za-z]", line) else line
                     for line in text.splitlines())


def test_example_config_is_all_commented_out() -> None:
    text = (ROOT / "packaging" / "bridge.toml.example").read_text()
    assert tomllib.loads(text) == {}  # a fresh install runs on /etc/spotfi.env alone


def _value_at(config: Config, section: str, key: str) -> Any:
    if section == "log":
        return config.log_level
    return getattr(getattr(config, section), key)


SECTION_CLASSES = {"router": RouterConfig, "mqtt": MqttConfig, "tls": TlsConfig,
                   "metrics": MetricsConfig, "rpc": RpcConfig, "terminal": TerminalConfig,
                   "update": UpdateConfig}


def _default_of(section: str, key: str) -> Any:
    if section == "log":
        return {f.name: f.default for f in fields(Config)}["log_level"]
    return {f.name: f.default for f in fields(SECTION_CLASSES[section])}[key]


def test_example_config_names_every_key_with_its_default(tmp_path: Path) -> None:
    text = (ROOT / "packaging" / "bridge.toml.example").read_text()
    document = tomllib.loads(uncomment(text))
    listed = {(section, key) for section, table in document.items() for key in table}
    assert listed == {(section, key) for section, keys in SCHEMA.items() for key in keys}
    # each setting appears once, as "#key = value" right under its explanation
    settings = [line for line in text.splitlines() if re.match(r"#[A-Za-z]", line)]
    assert len(settings) == len(listed)

    path = tmp_path / "bridge.toml"
    path.write_text(uncomment(text))
    path.chmod(0o600)
    config = load_config(str(path), environ={}, env_file=os.devnull)
    required_or_examples = {("router", "id"), ("router", "token"), ("mqtt", "broker"),
                            ("terminal", "shell")}
    for section, key in sorted(listed - required_or_examples):
        assert _value_at(config, section, key) == _default_of(section, key), (section, key)


# --------------------------------------------------------------------------- scripts

def test_scripts_pass_sh_n(ipk: Ipk) -> None:
    scripts = {name: h.data for name, h in ipk.data().items()
               if name.startswith(("./usr/bin/", "./etc/init.d/", "./usr/libexec/"))
               and h.typeflag == "0"}
    scripts.update({h.name: h.data for h in raw_headers(ipk.control_tar)
                    if h.name in ("./postinst", "./prerm", "./postrm")})
    assert len(scripts) >= 5
    for name, body in scripts.items():
        assert body.startswith(b"#!/bin/sh"), name
        result = subprocess.run([*shell(), "-n"], input=body, capture_output=True)
        assert result.returncode == 0, (name, result.stderr.decode())


def run_launcher(root: Path, *args: str, env_file: Path, **extra: str
                 ) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SPOTFI_", "PYTHON"))}
    env.update({"SPOTFI_BRIDGE_LIB": str(root / "usr/lib/spotfi-bridge"),
                "SPOTFI_BRIDGE_PYTHON": sys.executable,
                "SPOTFI_ENV_FILE": str(env_file),
                "SPOTFI_CONFIG": "", **extra})
    return subprocess.run([*shell(), str(root / "usr/bin/spotfi-bridge"), *args], env=env,
                          cwd=str(root), capture_output=True, text=True, timeout=30)


@pytest.fixture
def marked_root(unpacked: Path, tmp_path: Path) -> Path:
    """A copy of the unpacked package whose version says it is that copy."""
    root = tmp_path / "root"
    shutil.copytree(unpacked, root)
    init = root / "usr/lib/spotfi-bridge/spotfi_bridge/__init__.py"
    init.write_text(init.read_text().replace(f'"{__version__}"', f'"{__version__}+unpacked"'))
    return root


def test_launcher_runs_the_packaged_code(marked_root: Path, tmp_path: Path) -> None:
    result = run_launcher(marked_root, "--version", env_file=Path(os.devnull))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"spotfi-bridge {__version__}+unpacked"
    assert not list(marked_root.rglob("__pycache__"))  # nothing written next to the code
    # the bundled ptyprocess is the one imported, ahead of any installed one
    probe = subprocess.run(
        [sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
         "import ptyprocess; print(ptyprocess.__file__)",
         str(marked_root / "usr/lib/spotfi-bridge")], capture_output=True, text=True)
    assert probe.stdout.startswith(str(marked_root)), probe


def test_launcher_check_config_with_the_legacy_env_file(unpacked: Path, tmp_path: Path) -> None:
    env_file = tmp_path / "spotfi.env"
    env_file.write_text(f"SPOTFI_ROUTER_ID=router-7\nSPOTFI_TOKEN={TOKEN}\n"
                        "SPOTFI_MQTT_BROKER=mqtt://127.0.0.1:1883\n")
    env_file.chmod(0o600)
    result = run_launcher(unpacked, "check-config", env_file=env_file)
    assert result.returncode == 0, result.stderr
    assert '"router-7"' in result.stdout and "mqtt://127.0.0.1:1883" in result.stdout
    assert TOKEN not in result.stdout + result.stderr

    env_file.write_text(f"SPOTFI_TOKEN={TOKEN}\nSPOTFI_MQTT_BROKER=mqtt://127.0.0.1:1883\n")
    result = run_launcher(unpacked, "check-config", env_file=env_file)
    assert result.returncode == EX_CONFIG
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "[router] id is not set" in lines[0], result.stderr
    assert TOKEN not in result.stdout + result.stderr


def other_pythons() -> list[str]:
    """Interpreters of other router releases found on this machine (3.13 is 25.12's)."""
    found: list[str] = []
    for pattern in ("/root/.pyenv/versions/3.13*/bin/python3.13", "/usr/bin/python3.13",
                    "/usr/local/bin/python3.13"):
        found.extend(str(path) for path in sorted(Path("/").glob(pattern.lstrip("/"))))
    return sorted(set(found))[:1]


@pytest.mark.parametrize("python", other_pythons() or
                         [pytest.param("", marks=pytest.mark.skip("no Python 3.13 here"))])
def test_launcher_runs_on_python_3_13(unpacked: Path, tmp_path: Path, python: str) -> None:
    # --version and check-config need only the standard library
    env_file = tmp_path / "spotfi.env"
    env_file.write_text(f"SPOTFI_ROUTER_ID=r3\nSPOTFI_TOKEN={TOKEN}\n"
                        "SPOTFI_MQTT_BROKER=mqtts://broker.invalid\n")
    env_file.chmod(0o600)
    version = run_launcher(unpacked, "--version", env_file=env_file,
                           SPOTFI_BRIDGE_PYTHON=python)
    assert version.stdout.strip() == f"spotfi-bridge {__version__}", version.stderr
    check = run_launcher(unpacked, "check-config", env_file=env_file,
                         SPOTFI_BRIDGE_PYTHON=python)
    assert check.returncode == 0, check.stderr
    assert "mqtts://broker.invalid" in check.stdout and TOKEN not in check.stdout


def test_busybox_tar_unpacks_it_like_the_raw_reading(ipk: Ipk, tmp_path: Path) -> None:
    busybox = shutil.which("busybox")
    if not busybox or subprocess.run([busybox, "tar", "--help"],
                                     capture_output=True).returncode != 0:
        pytest.skip("no busybox tar here")
    subprocess.run([busybox, "tar", "-xzf", str(ipk.path)], cwd=tmp_path, check=True)
    assert (tmp_path / "debian-binary").read_bytes() == b"2.0\n"
    root = tmp_path / "root"
    root.mkdir()
    subprocess.run([busybox, "tar", "-xzf", str(tmp_path / "data.tar.gz")], cwd=root,
                   check=True)
    for name, header in ipk.data().items():
        if name == "./":
            continue
        path = root / name
        assert path.stat().st_mode & 0o7777 == header.mode, name
        if header.typeflag == "0":
            assert path.read_bytes() == header.data, name


def test_builder_command_line(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, str(BUILDER), "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    built = tmp_path / f"spotfi-bridge_{__version__}-1_all.ipk"
    assert built.is_file()
    assert "installed size" in result.stdout and "Depends: python3-light" in result.stdout


def test_stage_writes_the_same_tree(builder: ModuleType, ipk: Ipk, tmp_path: Path) -> None:
    builder.stage(tmp_path)
    for name, header in ipk.data().items():
        if name == "./":
            continue
        path = tmp_path / name
        if header.typeflag == "5":
            assert path.is_dir(), name
        else:
            assert path.read_bytes() == header.data, name
        assert path.stat().st_mode & 0o7777 == header.mode, name
