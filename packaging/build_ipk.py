#!/usr/bin/env python3
"""Build ``dist/spotfi-bridge_<version>-1_all.ipk`` without the OpenWrt SDK.

Standard library only, and reproducible: the same sources give the same bytes
(GNU tar headers, owner 0:0, fixed mtimes, sorted entries, gzip mtime 0), so a
package can be rebuilt and compared. The layout is the one opkg expects from
OpenWrt's ``scripts/ipkg-build``: an outer gzipped tar holding
``./debian-binary``, ``./control.tar.gz`` and ``./data.tar.gz``. GNU format
matters: opkg skips entries behind PAX headers and still exits 0.

The Python code goes to ``/usr/lib/spotfi-bridge`` (no ``pythonX.Y`` in the
path), so one package serves Python 3.11 (OpenWrt 23.05, 24.10) and 3.13.
``Depends:`` is computed from the imports of the shipped code, mapped to the
OpenWrt feed packages that carry them, so it stays true as the code changes.

``--stage DIR`` writes the same file tree to a directory instead; the OpenWrt
feed Makefile (``packaging/openwrt/Makefile``) uses it so SDK builds (opkg or
apk) install exactly what this script packs.

The payload (:func:`collect`: every file, its mode, the Depends) is defined here
once; ``build_apk.py`` packs the same payload as an OpenWrt 25.12 ``.apk``.
"""

from __future__ import annotations

import argparse
import ast
import gzip
import importlib.metadata
import importlib.util
import io
import operator
import os
import re
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent
PACKAGING = ROOT / "packaging"

PACKAGE = "spotfi-bridge"
RELEASE = "1"
LIB_DIR = "usr/lib/spotfi-bridge"
CONFFILE = "/etc/spotfi/bridge.toml"
#: Directories only this package creates (/etc, /usr/bin... belong to the system): the
#: postrm removes those a removal left empty.
OWN_DIRECTORIES = (LIB_DIR, "etc/spotfi")
#: 2024-01-01T00:00:00Z: the mtime of every entry unless SOURCE_DATE_EPOCH says otherwise.
DEFAULT_MTIME = 1704067200

#: Launchers: file under /usr/bin -> the module whose main() it runs. One whose module is
#: missing (or has no main) is left out.
LAUNCHERS = {
    "spotfi-bridge": "spotfi_bridge.cli",
}

#: Files installed as they are from the source tree, besides the Python code and the launchers
#: (path on the router -> (file in the checkout, mode)). The apk build reuses this list too.
PAYLOAD = {
    "etc/init.d/spotfi-bridge": ("init.d/spotfi-bridge", 0o755),
    # bridge update's detached installer (spotfi_bridge/update.py starts it)
    "usr/libexec/spotfi-bridge-update": ("packaging/update-helper.sh", 0o755),
}

#: Parts of the package a router does not run: the dry run, and spotfi-bridge-ctl (the API
#: side, used from an operator's machine; ~65 KB that would take the router's flash past
#: 300 KB). ``pip install`` of the project still provides both.
NOT_ON_ROUTERS = ("__pycache__", "tests", "test", "devtools", "ctl")

#: Python of the supported releases: 3.11 (23.05, 24.10), 3.13 (25.12, master). An import
#: in a branch no router takes (``tomli`` before ``tomllib``) does not count for Depends.
ROUTER_PYTHONS = ((3, 11, 0), (3, 13, 0))
_COMPARE: dict[type, Callable[[tuple[int, ...], tuple[int, ...]], bool]] = {
    ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge,
}

#: Standard library modules that OpenWrt splits out of python3-light into their own
#: packages (openwrt/packages lang/python/python3/files/python3-package-*.mk). Everything
#: else of the standard library is in python3-light.
STDLIB_PACKAGES = {
    "asyncio": "python3-asyncio",
    "logging": "python3-logging",
    "urllib": "python3-urllib",
    "email": "python3-email",
    "ssl": "python3-openssl",
    "_ssl": "python3-openssl",
    "_hashlib": "python3-openssl",
    "xml": "python3-xml",
    "xmlrpc": "python3-xml",
    "pyexpat": "python3-xml",
    "_elementtree": "python3-xml",
    "sqlite3": "python3-sqlite3",
    "dbm": "python3-dbm",
    "curses": "python3-ncurses",
    "readline": "python3-readline",
    "unittest": "python3-unittest",
    "multiprocessing": "python3-multiprocessing",
    "ctypes": "python3-ctypes",
    "decimal": "python3-decimal",
    "lzma": "python3-lzma",
    "uuid": "python3-uuid",
    "unicodedata": "python3-codecs",
    "pydoc": "python3-pydoc",
    "doctest": "python3-pydoc",
    "cgi": "python3-cgi",
    "cgitb": "python3-cgitb",
    "lib2to3": "python3-lib2to3",
    "distutils": "python3-distutils",
    "venv": "python3-venv",
    "webbrowser": "python3-webbrowser",
    # light modules that import split-out ones at module level
    "http": "python3-email python3-urllib",
    "mimetypes": "python3-urllib",
    "smtplib": "python3-email",
}
#: Third-party imports and the feed package that provides each.
FEED_PACKAGES = {
    "paho": "python3-paho-mqtt",
    "psutil": "python3-psutil",
}
#: Pure-Python dependencies that 23.05, 24.10 and 25.12 do not carry: shipped inside.
BUNDLED = ("ptyprocess",)
#: Needed although no shipped module imports them by name, and why.
ALWAYS_DEPENDS = {
    "python3-light": "the interpreter and most of the standard library",
    "python3-openssl": "paho-mqtt needs the ssl module for ssl://, mqtts:// and wss:// brokers",
}

DESCRIPTION = """\
SpotFi router bridge
 Keeps one MQTT connection from this router to the SpotFi platform: presence,
 metrics, ubus RPC and remote terminal sessions. Configure it in
 /etc/spotfi/bridge.toml or the legacy /etc/spotfi.env; logs: logread -e spotfi-bridge."""


class BuildError(Exception):
    """Something the package cannot be built with; the message says what to fix."""


@dataclass(frozen=True)
class Entry:
    """One file or directory of a tar archive (path without the leading ``./``)."""

    path: str
    data: Optional[bytes]  # None for a directory
    mode: int


# --------------------------------------------------------------------------- sources

def read_version(source: Path = ROOT) -> str:
    text = (source / "spotfi_bridge" / "__init__.py").read_text(encoding="utf-8")
    match = re.search(r'^__version__\s*=\s*["\']([^"\']+)["\']', text, re.M)
    if not match:
        raise BuildError(f"{source}/spotfi_bridge/__init__.py: no __version__ = \"...\" line")
    return match.group(1)


def python_files(package_dir: Path) -> list[Path]:
    """The ``.py`` files of a package that a router runs (see :data:`NOT_ON_ROUTERS`)."""
    files = []
    for path in package_dir.rglob("*.py"):
        parts = path.relative_to(package_dir).parts
        if any(part in NOT_ON_ROUTERS for part in parts):
            continue
        files.append(path)
    return sorted(files)


def find_ptyprocess() -> Path:
    """The ptyprocess package of the running interpreter (the venv's)."""
    spec = importlib.util.find_spec("ptyprocess")
    if spec is None or not spec.submodule_search_locations:
        raise BuildError("ptyprocess is not installed in this Python: run `make venv` "
                         "(or pass --ptyprocess DIR)")
    return Path(next(iter(spec.submodule_search_locations)))


def find_license(package_dir: Path) -> bytes:
    """The license text next to a source checkout, or in the installed distribution."""
    beside = package_dir.parent / "LICENSE"
    if beside.is_file():
        return beside.read_bytes()
    try:
        dist = importlib.metadata.distribution(package_dir.name)
    except importlib.metadata.PackageNotFoundError:
        raise BuildError(f"no LICENSE found for {package_dir}") from None
    for file in dist.files or []:
        if file.name.upper().startswith(("LICENSE", "COPYING")):
            return Path(str(dist.locate_file(file))).read_bytes()
    raise BuildError(f"no LICENSE found for {package_dir}")


def has_main(source: Path, module: str) -> bool:
    """Whether ``module`` (a file or a package under ``source``) defines or imports ``main``."""
    base = source.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            tree = ast.parse(path.read_text("utf-8"), str(path))
            for node in tree.body:
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and \
                        node.name == "main":
                    return True
                if isinstance(node, ast.ImportFrom) and any(
                        (alias.asname or alias.name) == "main" for alias in node.names):
                    return True
    return False


# --------------------------------------------------------------------------- Depends

def _version_guard(test: ast.expr) -> Optional[bool]:
    """``if sys.version_info <op> (x, y)``: True or False when every router Python agrees."""
    if not (isinstance(test, ast.Compare) and len(test.ops) == 1
            and isinstance(test.left, ast.Attribute) and test.left.attr == "version_info"):
        return None
    try:
        bound = tuple(ast.literal_eval(test.comparators[0]))
    except (ValueError, TypeError):
        return None
    compare = _COMPARE.get(type(test.ops[0]))
    if compare is None:
        return None
    outcomes = {compare(version, bound) for version in ROUTER_PYTHONS}
    return outcomes.pop() if len(outcomes) == 1 else None


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    names = {"ImportError", "ModuleNotFoundError", "Exception", "BaseException"}
    kinds = handler.type
    if kinds is None:
        return True
    items = kinds.elts if isinstance(kinds, ast.Tuple) else [kinds]
    return any(isinstance(item, ast.Name) and item.id in names for item in items)


def required_imports(source: str, filename: str = "<source>") -> set[str]:
    """Top-level modules a file imports unconditionally on a router.

    Skipped: relative imports, ``try: import x / except ImportError`` (optional),
    ``if TYPE_CHECKING:`` blocks, and branches of ``if sys.version_info ...`` that no
    router Python takes.
    """
    found: set[str] = set()

    def visit(nodes: Iterable[ast.AST]) -> None:
        for node in nodes:
            if isinstance(node, ast.Import):
                found.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level == 0 and node.module:
                    found.add(node.module.split(".")[0])
            elif isinstance(node, ast.Try):
                if any(_catches_import_error(h) for h in node.handlers):
                    continue  # optional import
                visit(node.body + node.orelse + node.finalbody)
                for handler in node.handlers:
                    visit(handler.body)
            elif isinstance(node, ast.If):
                test = node.test
                if (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
                        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"):
                    visit(node.orelse)
                    continue
                guard = _version_guard(test)
                if guard is not False:
                    visit(node.body)
                if guard is not True:
                    visit(node.orelse)
            else:
                visit(ast.iter_child_nodes(node))

    visit(ast.parse(source, filename).body)
    return found


def feed_depends(modules: Iterable[str], own: Iterable[str]) -> dict[str, str]:
    """Feed packages for imported modules: package -> the module that needs it."""
    stdlib = getattr(sys, "stdlib_module_names", None)
    if stdlib is None:  # pragma: no cover - Python < 3.10
        raise BuildError("building the ipk needs Python 3.10 or later")
    depends = {package: reason for package, reason in ALWAYS_DEPENDS.items()}
    own = set(own)
    for module in sorted(set(modules) - own):
        if module in STDLIB_PACKAGES:
            for package in STDLIB_PACKAGES[module].split():
                depends.setdefault(package, f"import {module}")
        elif module in FEED_PACKAGES:
            depends.setdefault(FEED_PACKAGES[module], f"import {module}")
        elif module in stdlib or module == "__future__":
            continue  # in python3-light
        else:
            raise BuildError(f"import {module}: not in the standard library, not bundled and "
                             f"no feed package known; add it to FEED_PACKAGES or BUNDLED in "
                             f"{Path(__file__).name}")
    return depends


def depends_line(depends: dict[str, str]) -> str:
    rest = sorted(name for name in depends if name != "python3-light")
    return ", ".join(["python3-light", *rest])


# --------------------------------------------------------------------------- contents

def launcher_script(name: str, module: str, template: Optional[str] = None) -> bytes:
    text = template if template is not None else (PACKAGING / "launcher").read_text("utf-8")
    return text.replace("@NAME@", name).replace("@MODULE@", module).encode()


@dataclass(frozen=True)
class Contents:
    version: str
    files: tuple[Entry, ...]  # data, paths relative to / without leading ./
    depends: dict[str, str]


def collect(source: Path = ROOT, ptyprocess_dir: Optional[Path] = None) -> Contents:
    """Every file of the package with its mode, and the Depends derived from imports.

    The one payload of both packages: build_apk.py packs what this returns, so a file
    added here ships in the .ipk and the .apk alike (a new directory of the package's
    own also goes into :data:`OWN_DIRECTORIES`, for the postrm).
    """
    version = read_version(source)
    pty_dir = ptyprocess_dir or find_ptyprocess()
    files: list[Entry] = []
    imports: set[str] = set()

    for name, package_dir in (("spotfi_bridge", source / "spotfi_bridge"),
                              ("ptyprocess", pty_dir)):
        sources = python_files(package_dir)
        if not sources:
            raise BuildError(f"{package_dir}: no .py files")
        for path in sources:
            data = path.read_bytes()
            imports |= required_imports(data.decode("utf-8"), str(path))
            relative = path.relative_to(package_dir).as_posix()
            files.append(Entry(f"{LIB_DIR}/{name}/{relative}", data, 0o644))
    files.append(Entry(f"{LIB_DIR}/ptyprocess/LICENSE", find_license(pty_dir), 0o644))

    template = (source / "packaging" / "launcher").read_text("utf-8")
    for name, module in LAUNCHERS.items():
        if has_main(source, module):
            files.append(Entry(f"usr/bin/{name}", launcher_script(name, module, template),
                               0o755))
    for target, (origin, mode) in PAYLOAD.items():
        files.append(Entry(target, (source / origin).read_bytes(), mode))
    # the example config may end up holding the token: root only, like /etc/spotfi.env
    files.append(Entry(CONFFILE.lstrip("/"),
                       (source / "packaging" / "bridge.toml.example").read_bytes(), 0o600))

    depends = feed_depends(imports, own={"spotfi_bridge", *BUNDLED})
    return Contents(version, tuple(files), depends)


def with_directories(files: Iterable[Entry]) -> list[Entry]:
    """Files plus every parent directory (0755), ordered like ``tar --sort=name``."""
    entries: dict[str, Entry] = {}
    for file in files:
        parts = file.path.split("/")
        for depth in range(1, len(parts)):
            directory = "/".join(parts[:depth])
            entries.setdefault(directory, Entry(directory, None, 0o755))
        entries[file.path] = file
    # depth-first with the children of each directory sorted by name, directory first
    return sorted(entries.values(), key=lambda entry: entry.path.split("/"))


def own_directories(files: Iterable[Entry]) -> list[str]:
    """The package's own directories (:data:`OWN_DIRECTORIES`), deepest first."""
    found = [entry.path for entry in with_directories(files) if entry.data is None and any(
        entry.path == top or entry.path.startswith(top + "/") for top in OWN_DIRECTORIES)]
    return sorted(found, key=lambda path: (-path.count("/"), path))


def postrm_script(files: Iterable[Entry], source: Path = ROOT) -> bytes:
    """packaging/control/postrm with the list of directories it may remove."""
    template = (source / "packaging" / "control" / "postrm").read_text("utf-8")
    listed = " ".join(f"\\\n\t\t/{path}" for path in own_directories(files))
    return template.replace("@PACKAGE_DIRS@", listed).encode()


def control_text(contents: Contents, installed_size: int) -> str:
    fields = [
        ("Package", PACKAGE),
        ("Version", f"{contents.version}-{RELEASE}"),
        ("Depends", depends_line(contents.depends)),
        ("Source", "packaging/openwrt"),
        ("SourceName", PACKAGE),
        ("License", "MIT"),
        ("Section", "net"),
        ("Maintainer", "SpotFi"),
        ("Architecture", "all"),
        ("Installed-Size", str(installed_size)),
        ("Description", DESCRIPTION),
    ]
    return "".join(f"{name}: {value}\n" for name, value in fields)


# --------------------------------------------------------------------------- archives

def tar_bytes(entries: Sequence[Entry], mtime: int, root_entry: bool = True) -> bytes:
    """A GNU-format tar, every entry ``./path`` owned by 0:0 with the same mtime."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as archive:
        listed = ([Entry("", None, 0o755)] if root_entry else []) + list(entries)
        for entry in listed:
            info = tarfile.TarInfo("./" + entry.path)
            info.mtime = mtime
            info.mode = entry.mode
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            if entry.data is None:
                info.type = tarfile.DIRTYPE
                archive.addfile(info)
            else:
                info.size = len(entry.data)
                archive.addfile(info, io.BytesIO(entry.data))
    return buffer.getvalue()


def gzip_bytes(data: bytes) -> bytes:
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, compresslevel=9,
                       mtime=0) as stream:
        stream.write(data)
    return buffer.getvalue()


def source_mtime() -> int:
    value = os.environ.get("SOURCE_DATE_EPOCH", "")
    if not value:
        return DEFAULT_MTIME
    try:
        return int(value)
    except ValueError:
        raise BuildError(f"SOURCE_DATE_EPOCH={value!r} is not an integer") from None


@dataclass(frozen=True)
class Built:
    path: Path
    version: str
    installed_size: int
    depends: dict[str, str]
    ipk_size: int


def build_ipk(out_dir: Path, source: Path = ROOT, ptyprocess_dir: Optional[Path] = None,
              mtime: Optional[int] = None) -> Built:
    contents = collect(source, ptyprocess_dir)
    stamp = source_mtime() if mtime is None else mtime

    data_tar = tar_bytes(with_directories(contents.files), stamp)
    installed_size = len(data_tar)  # what ipkg-build reports: the uncompressed data.tar
    control_dir = source / "packaging" / "control"
    control_files = [
        Entry("control", control_text(contents, installed_size).encode(), 0o644),
        Entry("conffiles", (CONFFILE + "\n").encode(), 0o644),
        Entry("postinst", (control_dir / "postinst").read_bytes(), 0o755),
        Entry("prerm", (control_dir / "prerm").read_bytes(), 0o755),
        Entry("postrm", postrm_script(contents.files, source), 0o755),
    ]
    control_tar = tar_bytes(sorted(control_files, key=lambda e: e.path), stamp)
    outer = [
        Entry("debian-binary", b"2.0\n", 0o644),
        Entry("control.tar.gz", gzip_bytes(control_tar), 0o644),
        Entry("data.tar.gz", gzip_bytes(data_tar), 0o644),
    ]
    ipk = gzip_bytes(tar_bytes(outer, stamp, root_entry=False))

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{PACKAGE}_{contents.version}-{RELEASE}_all.ipk"
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_bytes(ipk)
    temporary.replace(path)
    return Built(path, contents.version, installed_size, contents.depends, len(ipk))


def stage(root: Path, source: Path = ROOT, ptyprocess_dir: Optional[Path] = None) -> Contents:
    """Write the package's file tree under ``root`` (for the OpenWrt SDK's install step)."""
    contents = collect(source, ptyprocess_dir)
    for entry in with_directories(contents.files):
        target = root / entry.path
        if entry.data is None:
            target.mkdir(parents=True, exist_ok=True)
            os.chmod(target, entry.mode)
        else:
            target.write_bytes(entry.data)
            os.chmod(target, entry.mode)
    return contents


def _human(size: int) -> str:
    return f"{size} bytes ({size / 1024:.1f} KiB)"


def package_parser(doc: str) -> argparse.ArgumentParser:
    """The command line both builders share: where to write, what to build from."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "dist", help="output directory")
    parser.add_argument("--source", type=Path, default=ROOT, help="source checkout")
    parser.add_argument("--ptyprocess", type=Path, help="ptyprocess package directory "
                        "(default: the one this Python imports)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = package_parser(__doc__ or "")
    parser.add_argument("--stage", type=Path, metavar="DIR",
                        help="write the installed file tree to DIR instead of an .ipk")
    parser.add_argument("--print-depends", action="store_true",
                        help="print the Depends line and why each package is there")
    args = parser.parse_args(argv)
    try:
        if args.print_depends:
            contents = collect(args.source, args.ptyprocess)
            print(depends_line(contents.depends))
            for name, reason in sorted(contents.depends.items()):
                print(f"  {name}: {reason}")
            return 0
        if args.stage:
            contents = stage(args.stage, args.source, args.ptyprocess)
            print(f"staged {PACKAGE} {contents.version} in {args.stage}")
            return 0
        built = build_ipk(args.out, args.source, args.ptyprocess)
    except (BuildError, OSError) as exc:
        print(f"build_ipk: {exc}", file=sys.stderr)
        return 1
    print(f"{shown(built.path)}: {_human(built.ipk_size)}; "
          f"installed size {_human(built.installed_size)}")
    print(f"Depends: {depends_line(built.depends)}")
    return 0


def shown(path: Path) -> Path:
    """A built package's path as the user typed the command: relative to here when inside."""
    try:
        return path.relative_to(Path.cwd())
    except ValueError:
        return path


if __name__ == "__main__":
    sys.exit(main())
