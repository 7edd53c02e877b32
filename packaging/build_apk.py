#!/usr/bin/env python3
"""Build ``dist/spotfi-bridge-<version>-r1.apk`` for OpenWrt 25.12 without the SDK or apk-tools.

The payload is ``build_ipk.py``'s (:func:`build_ipk.collect`): the same files, modes and
Depends as the ``.ipk``, plus what OpenWrt's ``include/package-pack.mk`` adds to every
apk package: ``/lib/apk/packages/<name>.list`` (the files, sorted; the on-device
helpers find the init script there), ``.conffiles`` and ``.conffiles_static`` (each
conffile with its sha256), and its four scripts around the package's own bodies.

The format is APKv3 as apk-tools defines it (``doc/apk-v3.5.scd``, ``src/adb.h``,
``src/apk_adb.h``, ``src/app_mkpkg.c``): ``ADBd`` then a raw deflate stream of the
file header (``ADB.`` and the schema ``pckg``), one ADB block holding the package
object tree, and one DATA block per non-empty file, each led by the 1-based indexes
of its directory and file in the tree. Blocks are 8-byte aligned; values are 32-bit
little-endian tags (4 bits of type, 28 of value or offset). Files are recorded as
root:root with sha256 hashes, directories 0755 root:root, and the ``hashes`` field of
the package info holds the first 20 bytes of the ADB block's sha256, as ``apk mkpkg``
writes them. No signature: the package installs with ``apk add --allow-untrusted``
(OpenWrt signs only its feed indexes, never packages). Reproducible: fixed mtimes
(``SOURCE_DATE_EPOCH``, default 2024-01-01), sorted trees, deflate level 9.
"""

from __future__ import annotations

import hashlib
import re
import struct
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
import build_ipk  # the shared payload: a sibling script, not a package
from build_ipk import (
    CONFFILE,
    PACKAGE,
    ROOT,
    BuildError,
    Contents,
    Entry,
    collect,
    source_mtime,
)

RELEASE = "r1"
ARCH = "noarch"  # what package-pack.mk writes for PKGARCH:=all
ORIGIN = "packaging/openwrt"
MAINTAINER = "SpotFi"
LICENSE = "MIT"
APK_PACKAGES_DIR = "lib/apk/packages"

# ADB wire format (apk-tools src/adb.h, src/apk_adb.h)
ADB_MAGIC = b"ADB."
ADB_DEFLATE_MAGIC = b"ADBd"
SCHEMA_PACKAGE = b"pckg"
BLOCK_ADB, BLOCK_DATA = 0, 2
BLOCK_ALIGNMENT = 8
TYPE_INT, TYPE_INT_32 = 0x10000000, 0x20000000
TYPE_BLOB_8, TYPE_BLOB_16, TYPE_BLOB_32 = 0x80000000, 0x90000000, 0xA0000000
TYPE_ARRAY, TYPE_OBJECT = 0xD0000000, 0xE0000000
NULL = 0
UNIQUE_ID_LENGTH = 20  # apk mkpkg: sha1-sized, filled from the sha256 of the ADB block

# field numbers (1-based slots of each object)
PKG_INFO, PKG_PATHS, PKG_SCRIPTS = 1, 2, 3
PI_NAME, PI_VERSION, PI_HASHES, PI_DESCRIPTION, PI_ARCH, PI_LICENSE, PI_ORIGIN, \
    PI_MAINTAINER = 1, 2, 3, 4, 5, 6, 7, 8
PI_INSTALLED_SIZE, PI_DEPENDS = 0x0C, 0x0F
DEP_NAME = 1
ACL_MODE, ACL_USER, ACL_GROUP = 1, 2, 3
FILE_NAME, FILE_ACL, FILE_SIZE, FILE_MTIME, FILE_HASH = 1, 2, 3, 4, 5
DIR_NAME, DIR_ACL, DIR_FILES = 1, 2, 3
SCRIPT_SLOTS = {"pre-install": 2, "post-install": 3, "pre-deinstall": 4,
                "post-deinstall": 5, "pre-upgrade": 6, "post-upgrade": 7}


# --------------------------------------------------------------------------- ADB writer

class AdbWriter:
    """The ADB block of a package: values appended after the 8-byte header, aligned."""

    def __init__(self) -> None:
        # adb_hdr: compat version 0, version 0, reserved, root (patched by set_root)
        self.data = bytearray(8)

    def _append(self, payload: bytes, alignment: int) -> int:
        self.data.extend(b"\0" * (-len(self.data) % alignment))
        offset = len(self.data)
        if offset > 0x0FFFFFFF:
            raise BuildError("package metadata over 256 MiB")
        self.data.extend(payload)
        return offset

    def blob(self, value: bytes) -> int:
        if not value:
            return NULL
        if len(value) <= 0xFF:
            return TYPE_BLOB_8 | self._append(struct.pack("<B", len(value)) + value, 1)
        if len(value) <= 0xFFFF:
            return TYPE_BLOB_16 | self._append(struct.pack("<H", len(value)) + value, 2)
        return TYPE_BLOB_32 | self._append(struct.pack("<I", len(value)) + value, 4)

    def string(self, value: str) -> int:
        return self.blob(value.encode("utf-8"))

    def integer(self, value: int) -> int:
        if value < 0x10000000:
            return TYPE_INT | value
        return TYPE_INT_32 | self._append(struct.pack("<I", value), 4)

    def _slots(self, kind: int, values: Sequence[int]) -> int:
        slots = list(values)
        while slots and slots[-1] == NULL:
            slots.pop()
        if not slots:
            return NULL
        packed = struct.pack(f"<{len(slots) + 1}I", len(slots) + 1, *slots)
        return kind | self._append(packed, 4)

    def object(self, fields: dict[int, int]) -> int:
        """An object from its set fields (slot number -> value)."""
        top = max(fields, default=0)
        return self._slots(TYPE_OBJECT, [fields.get(slot, NULL) for slot in range(1, top + 1)])

    def array(self, items: Iterable[int]) -> int:
        return self._slots(TYPE_ARRAY, [item for item in items if item != NULL])

    def placeholder(self, length: int) -> tuple[int, int]:
        """A blob of ``length`` zero bytes to fill in later: its value and data offset."""
        offset = self._append(bytes([length]) + bytes(length), 1)
        return TYPE_BLOB_8 | offset, offset + 1

    def set_root(self, value: int) -> None:
        struct.pack_into("<I", self.data, 4, value)


def block(kind: int, payload: bytes) -> bytes:
    """One block: type in the top 2 bits of the tag, then size (tag included), padding."""
    raw = 4 + len(payload)
    if raw > 0x3FFFFFFF:
        raise BuildError("block over 1 GiB")
    return struct.pack("<I", (kind << 30) | raw) + payload + b"\0" * (-raw % BLOCK_ALIGNMENT)


# --------------------------------------------------------------------------- contents

def without_shebang(script: str) -> str:
    """The script minus its ``#!`` lines, as package-pack.mk's ``sed '/^\\s*#!/d'``."""
    return "".join(line for line in script.splitlines(keepends=True)
                   if not re.match(r"\s*#!", line))


def scripts(source: Path = ROOT, files: Iterable[Entry] = ()) -> dict[str, str]:
    """The four scripts package-pack.mk generates, around the package's own bodies."""
    control = source / "packaging" / "control"
    header = ("[ -s ${IPKG_INSTROOT}/lib/functions.sh ] || exit 0\n"
              ". ${IPKG_INSTROOT}/lib/functions.sh\n"
              'export root="${IPKG_INSTROOT}"\n'
              f'export pkgname="{PACKAGE}"\n')
    post_install = ("#!/bin/sh\n"
                    '[ "${IPKG_NO_SCRIPT}" = "1" ] && exit 0\n'
                    + header + "add_group_and_user\ndefault_postinst\n"
                    + without_shebang((control / "apk-postinst").read_text("utf-8")))
    return {
        "post-install": post_install,
        "post-upgrade": "#!/bin/sh\nexport PKG_UPGRADE=1\n" + without_shebang(post_install),
        "pre-deinstall": ("#!/bin/sh\n" + header + "default_prerm\n"
                          + without_shebang((control / "apk-prerm").read_text("utf-8"))),
        "post-deinstall": build_ipk.postrm_script(files, source).decode("utf-8"),
    }


def apk_metadata_files(files: Sequence[Entry]) -> list[Entry]:
    """``/lib/apk/packages/<name>.{list,conffiles,conffiles_static}`` as package-pack.mk
    writes them: the list (made before the conffiles files join) names every file."""
    listing = "".join(f"/{path}\n" for path in sorted(entry.path for entry in files
                                                       if entry.data is not None))
    by_path = {entry.path: entry for entry in files}
    conffile = by_path[CONFFILE.lstrip("/")]
    assert conffile.data is not None
    static = f"{CONFFILE} {hashlib.sha256(conffile.data).hexdigest()}\n"
    base = f"{APK_PACKAGES_DIR}/{PACKAGE}"
    return [Entry(f"{base}.list", listing.encode(), 0o644),
            Entry(f"{base}.conffiles", f"{CONFFILE}\n".encode(), 0o644),
            Entry(f"{base}.conffiles_static", static.encode(), 0o644)]


def description_line(description: str = build_ipk.DESCRIPTION) -> str:
    """package-pack.mk's description: the long text on one line (``$(strip ...)``)."""
    return " ".join(description.split("\n", 1)[1].split())


# --------------------------------------------------------------------------- package

@dataclass(frozen=True)
class Built:
    path: Path
    version: str
    installed_size: int
    depends: dict[str, str]
    apk_size: int


def tree(files: Iterable[Entry]) -> dict[str, list[Entry]]:
    """Directory (``""`` for /) -> its files, every directory of the payload present."""
    directories: dict[str, list[Entry]] = {"": []}
    for entry in build_ipk.with_directories(files):
        if entry.data is None:
            directories.setdefault(entry.path, [])
        else:
            parent = entry.path.rpartition("/")[0]
            directories.setdefault(parent, []).append(entry)
    return directories


def adb_block(contents: Contents, files: Sequence[Entry], script_texts: dict[str, str],
              mtime: int) -> tuple[bytes, list[tuple[int, int, bytes]]]:
    """The ADB block's payload and the DATA blocks' (path index, file index, bytes)."""
    adb = AdbWriter()
    root_acl = {ACL_MODE: adb.integer(0o755), ACL_USER: adb.string("root"),
                ACL_GROUP: adb.string("root")}
    directories = tree(files)
    data: list[tuple[int, int, bytes]] = []
    paths = []
    installed_size = 0
    for path_index, name in enumerate(sorted(directories, key=str.encode), start=1):
        entries = []
        for file_index, entry in enumerate(
                sorted(directories[name], key=lambda e: e.path.encode()), start=1):
            assert entry.data is not None
            installed_size += len(entry.data)
            acl = adb.object({**root_acl, ACL_MODE: adb.integer(entry.mode)})
            entries.append(adb.object({
                FILE_NAME: adb.string(entry.path.rpartition("/")[2]),
                FILE_ACL: acl,
                FILE_SIZE: adb.integer(len(entry.data)),
                FILE_MTIME: adb.integer(mtime),
                FILE_HASH: adb.blob(hashlib.sha256(entry.data).digest()),
            }))
            if entry.data:
                data.append((path_index, file_index, entry.data))
        paths.append(adb.object({DIR_NAME: adb.string(name), DIR_ACL: adb.object(root_acl),
                                 DIR_FILES: adb.array(entries)}))

    # a raw blob the size of the unique id, filled in once the whole block is written
    unique_id, uid_at = adb.placeholder(UNIQUE_ID_LENGTH)
    depends = [adb.object({DEP_NAME: adb.string(name)}) for name in sorted(contents.depends)]
    info = adb.object({
        PI_NAME: adb.string(PACKAGE),
        PI_VERSION: adb.string(f"{contents.version}-{RELEASE}"),
        PI_HASHES: unique_id,
        PI_DESCRIPTION: adb.string(description_line()),
        PI_ARCH: adb.string(ARCH),
        PI_LICENSE: adb.string(LICENSE),
        PI_ORIGIN: adb.string(ORIGIN),
        PI_MAINTAINER: adb.string(MAINTAINER),
        PI_INSTALLED_SIZE: adb.integer(installed_size),
        PI_DEPENDS: adb.array(depends),
    })
    script_values = {SCRIPT_SLOTS[kind]: adb.string(text)
                     for kind, text in script_texts.items()}
    adb.set_root(adb.object({PKG_INFO: info, PKG_PATHS: adb.array(paths),
                             PKG_SCRIPTS: adb.object(script_values)}))
    adb.data[uid_at:uid_at + UNIQUE_ID_LENGTH] = \
        hashlib.sha256(bytes(adb.data)).digest()[:UNIQUE_ID_LENGTH]
    return bytes(adb.data), data


def package_bytes(contents: Contents, mtime: int, source: Path = ROOT) -> tuple[bytes, int]:
    """The .apk file and its installed size."""
    files = [*contents.files, *apk_metadata_files(contents.files)]
    adb, data = adb_block(contents, files, scripts(source, contents.files), mtime)
    stream = [ADB_MAGIC, SCHEMA_PACKAGE, block(BLOCK_ADB, adb)]
    stream += [block(BLOCK_DATA, struct.pack("<II", path_index, file_index) + body)
               for path_index, file_index, body in data]
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15, 8, zlib.Z_DEFAULT_STRATEGY)
    packed = ADB_DEFLATE_MAGIC + compressor.compress(b"".join(stream)) + compressor.flush()
    return packed, sum(len(entry.data or b"") for entry in files)


def build_apk(out_dir: Path, source: Path = ROOT, ptyprocess_dir: Optional[Path] = None,
              mtime: Optional[int] = None) -> Built:
    contents = collect(source, ptyprocess_dir)
    stamp = source_mtime() if mtime is None else mtime
    packed, installed_size = package_bytes(contents, stamp, source)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{PACKAGE}-{contents.version}-{RELEASE}.apk"
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_bytes(packed)
    temporary.replace(path)
    return Built(path, contents.version, installed_size, contents.depends, len(packed))


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_ipk.package_parser(__doc__ or "").parse_args(argv)
    try:
        built = build_apk(args.out, args.source, args.ptyprocess)
    except (BuildError, OSError) as exc:
        print(f"build_apk: {exc}", file=sys.stderr)
        return 1
    print(f"{build_ipk.shown(built.path)}: {build_ipk._human(built.apk_size)}; "
          f"installed size {build_ipk._human(built.installed_size)}")
    print(f"depends: {' '.join(sorted(built.depends))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
