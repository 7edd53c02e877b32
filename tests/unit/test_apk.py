"""The .apk for OpenWrt 25.12 as apk reads it: built here, then taken apart.

The reader (``tests/helpers/apkread.py``) is written from apk-tools' documentation
and headers, not from the builder: it checks the container, the block order and
alignment, the package schema, and every file's size and sha256 against its DATA
block, as apk does while installing. The payload must be the ipk's, byte for byte,
plus the ``/lib/apk/packages`` files OpenWrt's package-pack.mk adds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from spotfi_bridge import __version__
from tests.helpers.apkread import Apk, ApkFormatError, read, unique_id_matches
from tests.unit.test_initscript import Package
from tests.unit.test_packaging import Ipk, _imports_by_grep, open_ipk, raw_headers, shell

ROOT = Path(__file__).resolve().parents[2]
BUILDER = ROOT / "packaging" / "build_apk.py"
DEFAULT_MTIME = 1704067200  # 2024-01-01, the builders' default SOURCE_DATE_EPOCH
APK_FILES = ("lib/apk/packages/spotfi-bridge.list", "lib/apk/packages/spotfi-bridge.conffiles",
             "lib/apk/packages/spotfi-bridge.conffiles_static")

pytestmark = pytest.mark.skipif(sys.version_info < (3, 10),
                                reason="the builders need Python 3.10+")


def load(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def builder() -> ModuleType:
    return load(BUILDER, "build_apk")


@pytest.fixture(scope="module")
def built(builder: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> Path:
    env = os.environ.pop("SOURCE_DATE_EPOCH", None)
    try:
        path: Path = builder.build_apk(tmp_path_factory.mktemp("dist")).path
    finally:
        if env is not None:
            os.environ["SOURCE_DATE_EPOCH"] = env
    return path


@pytest.fixture(scope="module")
def apk(built: Path) -> Apk:
    return read(built.read_bytes())


@pytest.fixture(scope="module")
def ipk(builder: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> Ipk:
    return open_ipk(sys.modules["build_ipk"].build_ipk(tmp_path_factory.mktemp("ipk")).path)


# --------------------------------------------------------------------------- container

def test_name_container_and_blocks(built: Path, apk: Apk) -> None:
    assert built.name == f"spotfi-bridge-{__version__}-r1.apk"
    raw = built.read_bytes()
    assert raw[:4] == b"ADBd" and apk.compressed  # what apk mkpkg writes: raw deflate
    assert apk.schema == b"pckg" and apk.adb_version == (0, 0)
    kinds = [block.kind for block in apk.blocks]
    assert kinds[0] == "ADB" and "SIG" not in kinds  # unsigned: apk add --allow-untrusted
    assert kinds.count("DATA") == sum(1 for item in apk.files.values() if item.size)
    assert all(block.offset % 8 == 0 for block in apk.blocks)


def test_the_reader_refuses_what_apk_refuses(built: Path) -> None:
    import zlib
    inflater = zlib.decompressobj(-15)
    stream = bytearray(inflater.decompress(built.read_bytes()[4:]) + inflater.flush())
    read(b"ADB." + bytes(stream[4:]))  # the uncompressed form is valid too
    for offset, value, message in (
            (4, b"indx", "schema"),  # an index, not a package
            (len(stream) - 1, None, "sha256 mismatch|padding|runs past"),  # last byte flipped
    ):
        broken = bytearray(stream)
        if value is None:
            broken[offset] ^= 0xFF
        else:
            broken[offset:offset + len(value)] = value
        with pytest.raises(ApkFormatError, match=message):
            read(bytes(broken))


def test_package_info(apk: Apk, ipk: Ipk) -> None:
    info = apk.info
    assert list(info) == ["name", "version", "hashes", "description", "arch", "license",
                          "origin", "maintainer", "installed-size", "depends"]
    assert apk.text("name") == "spotfi-bridge"
    assert apk.text("version") == f"{__version__}-r1"
    assert apk.text("arch") == "noarch"  # package-pack.mk's arch for PKGARCH:=all
    assert apk.text("license") == "MIT" and apk.text("maintainer") == "SpotFi"
    assert apk.text("origin") == ipk.control()["Source"]
    # one line: the ipk's long description without its summary line
    description = apk.text("description")
    assert "\n" not in description and "  " not in description
    assert description == " ".join(ipk.control()["Description"].split("\n", 1)[1].split())
    assert info["installed-size"] == sum(item.size for item in apk.files.values())
    assert len(info["hashes"]) == 20 and unique_id_matches(apk)


def test_depends_are_the_ipks_and_follow_the_imports(apk: Apk, ipk: Ipk) -> None:
    depends = apk.depends
    assert depends == sorted(set(depends))  # apk keeps them sorted and unique
    assert set(depends) == {name.strip() for name in ipk.control()["Depends"].split(",")}
    shipped = [item.data.decode() for path, item in apk.files.items() if path.endswith(".py")]
    for module, package in (("paho", "python3-paho-mqtt"), ("psutil", "python3-psutil"),
                            ("asyncio", "python3-asyncio"), ("sqlite3", "python3-sqlite3")):
        imported = any(_imports_by_grep(text, module) for text in shipped)
        assert (package in depends) == imported, (module, depends)
    assert "python3-ptyprocess" not in depends  # bundled


# --------------------------------------------------------------------------- files

def test_payload_is_the_ipks(apk: Apk, ipk: Ipk) -> None:
    ipk_files = {name[2:]: header for name, header in ipk.data().items()
                 if header.typeflag == "0"}
    assert set(apk.files) == set(ipk_files) | set(APK_FILES)
    for path, header in ipk_files.items():
        item = apk.files[path]
        assert item.data == header.data, path
        assert item.mode == header.mode, path
    ipk_dirs = {name[2:].rstrip("/") for name, header in ipk.data().items()
                if header.typeflag == "5"}
    assert set(apk.directories) == ipk_dirs | {"lib", "lib/apk", "lib/apk/packages"}
    for path, directory in apk.directories.items():
        assert directory == {"mode": 0o755, "user": "root", "group": "root"}, path
    for item in apk.files.values():
        assert (item.user, item.group, item.mtime) == ("root", "root", DEFAULT_MTIME)
        assert hashlib.sha256(item.data).digest() == item.sha256
    assert apk.files["etc/spotfi/bridge.toml"].mode == 0o600  # may come to hold the token
    assert apk.files["etc/init.d/spotfi-bridge"].mode == 0o755


def test_lib_apk_packages_files(apk: Apk) -> None:
    listed = apk.files["lib/apk/packages/spotfi-bridge.list"].data.decode().splitlines()
    # package-pack.mk writes the list before the conffiles files join the package
    assert listed == sorted("/" + path for path in apk.files if path not in APK_FILES)
    assert "/etc/init.d/spotfi-bridge" in listed  # how default_postinst finds the service
    conffiles = apk.files["lib/apk/packages/spotfi-bridge.conffiles"].data
    assert conffiles == b"/etc/spotfi/bridge.toml\n"
    static = apk.files["lib/apk/packages/spotfi-bridge.conffiles_static"].data.decode()
    digest = hashlib.sha256(apk.files["etc/spotfi/bridge.toml"].data).hexdigest()
    assert static == f"/etc/spotfi/bridge.toml {digest}\n"


def test_two_builds_are_identical_whatever_the_file_dates(
        builder: ModuleType, built: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    again = builder.build_apk(tmp_path / "again")
    assert again.path.read_bytes() == built.read_bytes()
    copy = tmp_path / "checkout"
    for part in ("spotfi_bridge", "packaging", "init.d"):
        shutil.copytree(ROOT / part, copy / part, ignore=shutil.ignore_patterns("__pycache__"))
    for path in copy.rglob("*"):
        os.utime(path, (1_000_000_000, 1_000_000_000))
    moved = builder.build_apk(tmp_path / "moved", source=copy)
    assert moved.path.read_bytes() == built.read_bytes()
    # SOURCE_DATE_EPOCH sets the recorded dates, nothing else
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1750000000")
    dated = read(builder.build_apk(tmp_path / "dated").path.read_bytes())
    assert {item.mtime for item in dated.files.values()} == {1750000000}


# --------------------------------------------------------------------------- scripts

FUNCTIONS_HEADER = ('[ -s ${IPKG_INSTROOT}/lib/functions.sh ] || exit 0\n'
                    '. ${IPKG_INSTROOT}/lib/functions.sh\n'
                    'export root="${IPKG_INSTROOT}"\n'
                    'export pkgname="spotfi-bridge"\n')


def test_scripts_are_package_pack_mks(apk: Apk, ipk: Ipk) -> None:
    scripts = apk.scripts
    assert set(scripts) == {"post-install", "post-upgrade", "pre-deinstall", "post-deinstall"}
    install = scripts["post-install"]
    assert install.startswith('#!/bin/sh\n[ "${IPKG_NO_SCRIPT}" = "1" ] && exit 0\n'
                              + FUNCTIONS_HEADER + "add_group_and_user\ndefault_postinst\n")
    assert install.count("#!") == 1  # the body's own shebang dropped, as sed does
    assert scripts["post-upgrade"] == ("#!/bin/sh\nexport PKG_UPGRADE=1\n"
                                       + install.removeprefix("#!/bin/sh\n"))
    assert scripts["pre-deinstall"].startswith("#!/bin/sh\n" + FUNCTIONS_HEADER
                                               + "default_prerm\n")
    postrm = next(h.data for h in raw_headers(ipk.control_tar) if h.name == "./postrm")
    assert scripts["post-deinstall"].encode() == postrm


def test_scripts_pass_busybox_sh_n(apk: Apk) -> None:
    for name, body in apk.scripts.items():
        result = subprocess.run([*shell(), "-n"], input=body.encode(), capture_output=True)
        assert result.returncode == 0, (name, result.stderr.decode())


FUNCTIONS_SH = r"""
# stand-in for OpenWrt's /lib/functions.sh on a live router (IPKG_INSTROOT empty):
# default_postinst/default_prerm run each /etc/init.d script of the package's list,
# the first action only when not upgrading
add_group_and_user() { :; }
_services() {
	for i in $(grep -s "^/etc/init.d/" "$root/lib/apk/packages/${pkgname}.list"); do
		[ "$PKG_UPGRADE" != "1" ] && "$INIT_STUB" "$1"
		"$INIT_STUB" "$2"
	done
	return 0
}
default_postinst() { _services enable start; }
default_prerm() { _services disable stop; }
"""


class Router(Package):
    """The apk scripts with /lib/functions.sh, the init script and the library directory
    pointed into a scratch dir (a live router's paths are absolute)."""

    def __init__(self, root: Path, apk: Apk) -> None:
        super().__init__(root)
        (root / "functions.sh").write_text(FUNCTIONS_SH)
        listing = root / "lib" / "apk" / "packages" / "spotfi-bridge.list"
        listing.parent.mkdir(parents=True)
        listing.write_bytes(apk.files["lib/apk/packages/spotfi-bridge.list"].data)
        for name, body in apk.scripts.items():
            for fixed, here in (("${IPKG_INSTROOT}/lib/functions.sh", str(root / "functions.sh")),
                                ("INIT=/etc/init.d/spotfi-bridge\n", f"INIT={self.init}\n"),
                                ("LIB=/usr/lib/spotfi-bridge\n", f"LIB={self.lib}\n"),
                                ('export root="${IPKG_INSTROOT}"', f'export root="{root}"')):
                body = body.replace(fixed, here)
            (root / name).write_text(body)
        self.env["INIT_STUB"] = str(self.init)


@pytest.fixture
def router(tmp_path: Path, apk: Apk) -> Router:
    return Router(tmp_path, apk)


def test_post_install_enables_and_starts(router: Router) -> None:
    status, stderr, calls = router.run("post-install")
    assert status == 0 and stderr == ""
    assert calls == ["init\tenable", "init\tstart", "init\tcheck"]


def test_post_install_explains_a_bridge_that_cannot_start_yet(router: Router) -> None:
    status, stderr, calls = router.run("post-install", STUB_CHECK="78")
    assert status == 0  # the package stays installed
    assert calls[:2] == ["init\tenable", "init\tstart"]
    assert "/etc/spotfi/bridge.toml" in stderr and "/etc/spotfi.env" in stderr


def test_post_upgrade_restarts_an_enabled_bridge(router: Router) -> None:
    status, _, calls = router.run("post-upgrade", STUB_ENABLED="1")
    assert status == 0
    # default_postinst's start keeps procd's instance on the old code: restart it
    assert calls == ["init\tstart", "init\tenabled", "init\trestart"]


def test_post_upgrade_keeps_a_disabled_bridge_stopped(router: Router) -> None:
    status, _, calls = router.run("post-upgrade", STUB_ENABLED="0")
    assert status == 0
    assert calls == ["init\tstart", "init\tenabled", "init\tstop"]


def test_scripts_do_nothing_when_scripts_are_off(router: Router) -> None:
    for script in ("post-install", "post-upgrade"):
        status, _, calls = router.run(script, IPKG_NO_SCRIPT="1")
        assert status == 0 and calls == [], script


def test_pre_deinstall_disables_stops_and_removes_byte_code(router: Router) -> None:
    cache = router.lib / "spotfi_bridge" / "rpc" / "__pycache__"
    cache.mkdir(parents=True)
    (cache / "executor.cpython-313.pyc").write_bytes(b"\0")
    source = router.lib / "spotfi_bridge" / "rpc" / "executor.py"
    source.write_text("")
    status, _, calls = router.run("pre-deinstall")
    assert status == 0
    assert calls == ["init\tdisable", "init\tstop"]
    assert not cache.exists() and source.exists()


# --------------------------------------------------------------------------- removal

def package_tree(root: Path, apk: Apk) -> None:
    """The package's directories (and the system's it lives in), its files gone."""
    for path in apk.directories:
        (root / path).mkdir(parents=True, exist_ok=True)


@pytest.mark.parametrize("package", ["ipk", "apk"])
def test_removal_deletes_the_package_dirs_left_empty_and_nothing_else(
        package: str, apk: Apk, ipk: Ipk, tmp_path: Path) -> None:
    script = tmp_path / "postrm"
    script.write_bytes(apk.scripts["post-deinstall"].encode() if package == "apk" else next(
        h.data for h in raw_headers(ipk.control_tar) if h.name == "./postrm"))
    root = tmp_path / "root"
    package_tree(root, apk)
    foreign = root / "usr/lib/spotfi-bridge/spotfi_bridge/rpc/notes.txt"
    foreign.write_text("the owner's\n")
    kept = root / "etc/spotfi/bridge.toml"  # an edited conffile the package manager kept
    kept.write_text("[router]\n")
    env = {"PATH": os.environ["PATH"], "IPKG_INSTROOT": str(root)}

    upgrade = subprocess.run([*shell(), str(script)], env={**env, "PKG_UPGRADE": "1"},
                             capture_output=True, text=True, timeout=30)
    assert upgrade.returncode == 0
    assert (root / "usr/lib/spotfi-bridge/ptyprocess").is_dir()  # an upgrade removes nothing

    result = subprocess.run([*shell(), str(script)], env=env, capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0 and result.stderr == ""
    left = sorted(str(path.relative_to(root)) for path in root.rglob("*"))
    assert left == sorted([
        "etc", "etc/init.d", "etc/spotfi", "etc/spotfi/bridge.toml",  # /etc/spotfi not empty
        "lib", "lib/apk", "lib/apk/packages",  # the system's
        "usr", "usr/bin", "usr/lib", "usr/libexec",  # the system's
        "usr/lib/spotfi-bridge", "usr/lib/spotfi-bridge/spotfi_bridge",
        "usr/lib/spotfi-bridge/spotfi_bridge/rpc",
        "usr/lib/spotfi-bridge/spotfi_bridge/rpc/notes.txt"])

    foreign.unlink()
    kept.unlink()
    subprocess.run([*shell(), str(script)], env=env, check=True, timeout=30)
    left = sorted(str(path.relative_to(root)) for path in root.rglob("*"))
    assert left == ["etc", "etc/init.d", "lib", "lib/apk", "lib/apk/packages",
                    "usr", "usr/bin", "usr/lib", "usr/libexec"]


# --------------------------------------------------------------------------- tools

def test_builder_command_line(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, str(BUILDER), "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    built = tmp_path / f"spotfi-bridge-{__version__}-r1.apk"
    assert built.is_file()
    assert re.search(r"installed size \d+ bytes", result.stdout)
    assert "depends: python3-asyncio python3-light" in result.stdout


def apk_tools_v3() -> str:
    tool = shutil.which("apk")
    if not tool:
        return ""
    version = subprocess.run([tool, "--version"], capture_output=True, text=True).stdout
    return tool if re.match(r"apk-tools 3\.", version) else ""


@pytest.mark.skipif(not apk_tools_v3(), reason="no apk-tools 3 on this machine")
def test_apk_tools_extracts_it(built: Path, apk: Apk, tmp_path: Path) -> None:
    target = tmp_path / "extracted"
    target.mkdir()
    subprocess.run([apk_tools_v3(), "extract", "--allow-untrusted", "--no-chown",
                    "--destination", str(target), str(built)], check=True, timeout=60)
    for path, item in apk.files.items():
        assert (target / path).read_bytes() == item.data, path
