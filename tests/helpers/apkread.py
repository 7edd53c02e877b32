"""An APKv3 package reader written from apk-tools' documentation, for the tests.

Independent of ``packaging/build_apk.py`` (it imports nothing of it): what it
knows comes from apk-tools' ``doc/apk-v3.5.scd`` (tags, blocks), ``src/adb.h``
(file header, 8-byte block alignment, the ``adb_hdr`` at the start of the ADB
block), ``src/apk_adb.h``/``src/apk_adb.c`` (the package schema: slot numbers
and names) and ``src/extract_v3.c`` (how apk walks the tree and matches each
DATA block to a file, and checks its hash). Every rule apk enforces while
installing is checked here and raises :class:`ApkFormatError`.

``python -m tests.helpers.apkread FILE.apk`` prints the metadata and file list.
"""

from __future__ import annotations

import hashlib
import struct
import sys
import zlib
from dataclasses import dataclass, field
from typing import Any, Optional, Union

Value = Union[None, int, bytes, "list[Any]", "dict[str, Any]"]


class ApkFormatError(Exception):
    """The file breaks a rule of the APKv3 format (the message says which)."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise ApkFormatError(message)


# --------------------------------------------------------------------------- schema

# A schema node is ("blob"|"int"|"oct"|"hex"), ("object", {slot: (name, node)}) or
# ("array", node). Slot numbers and names: apk-tools src/apk_adb.h and src/apk_adb.c.
Schema = Any
STRING, INT, OCT, HEX = "blob", "int", "oct", "hex"
DEPENDENCY = ("object", {1: ("name", STRING), 2: ("version", STRING), 3: ("match", INT)})
DEPENDENCIES = ("array", DEPENDENCY)
PKGINFO = ("object", {
    1: ("name", STRING), 2: ("version", STRING), 3: ("hashes", HEX),
    4: ("description", STRING), 5: ("arch", STRING), 6: ("license", STRING),
    7: ("origin", STRING), 8: ("maintainer", STRING), 9: ("url", STRING),
    10: ("repo-commit", HEX), 11: ("build-time", INT), 12: ("installed-size", INT),
    13: ("file-size", INT), 14: ("provider-priority", INT), 15: ("depends", DEPENDENCIES),
    16: ("provides", DEPENDENCIES), 17: ("replaces", DEPENDENCIES),
    18: ("install-if", DEPENDENCIES), 19: ("recommends", DEPENDENCIES), 20: ("layer", INT),
    21: ("tags", ("array", STRING)),
})
ACL = ("object", {1: ("mode", OCT), 2: ("user", STRING), 3: ("group", STRING),
                  4: ("xattrs", ("array", STRING))})
FILE = ("object", {1: ("name", STRING), 2: ("acl", ACL), 3: ("size", INT), 4: ("mtime", INT),
                   5: ("hash", HEX), 6: ("target", HEX)})
DIRECTORY = ("object", {1: ("name", STRING), 2: ("acl", ACL), 3: ("files", ("array", FILE))})
SCRIPTS = ("object", {1: ("trigger", STRING), 2: ("pre-install", STRING),
                      3: ("post-install", STRING), 4: ("pre-deinstall", STRING),
                      5: ("post-deinstall", STRING), 6: ("pre-upgrade", STRING),
                      7: ("post-upgrade", STRING)})
PACKAGE = ("object", {1: ("info", PKGINFO), 2: ("paths", ("array", DIRECTORY)),
                      3: ("scripts", SCRIPTS), 4: ("triggers", ("array", STRING)),
                      5: ("replaces-priority", INT)})

# tag types (high 4 bits), doc/apk-v3.5.scd
T_SPECIAL, T_INT, T_INT32, T_INT64 = 0x0, 0x1, 0x2, 0x3
T_BLOB8, T_BLOB16, T_BLOB32, T_ARRAY, T_OBJECT = 0x8, 0x9, 0xA, 0xD, 0xE
BLOCK_NAMES = {0: "ADB", 1: "SIG", 2: "DATA", 3: "EXT"}


# --------------------------------------------------------------------------- decoding

@dataclass
class Adb:
    """The ADB block: values are looked up by offset from its start."""

    data: bytes
    tags: dict[str, int] = field(default_factory=dict)  # type names seen, for the tests

    def _at(self, offset: int, size: int) -> bytes:
        check(offset + size <= len(self.data), f"value at {offset}+{size} runs past the ADB "
                                                f"block ({len(self.data)} bytes)")
        return self.data[offset:offset + size]

    def raw(self, tag: int) -> tuple[int, int]:
        return tag >> 28, tag & 0x0FFFFFFF

    def scalar(self, tag: int, kind: str) -> Value:
        code, value = self.raw(tag)
        if code == T_SPECIAL:
            check(value == 0, f"special value {value:#x} where a {kind} belongs")
            return None
        if kind in (INT, OCT):
            if code == T_INT:
                return value
            if code == T_INT32:
                check(value % 4 == 0, "int32 not 4-byte aligned")
                return int(struct.unpack("<I", self._at(value, 4))[0])
            if code == T_INT64:
                return int(struct.unpack("<Q", self._at(value, 8))[0])
            raise ApkFormatError(f"type {code:#x} where an integer belongs")
        widths = {T_BLOB8: (1, "<B"), T_BLOB16: (2, "<H"), T_BLOB32: (4, "<I")}
        check(code in widths, f"type {code:#x} where a blob belongs")
        width, fmt = widths[code]
        check(value % width == 0, f"blob length field at {value} not {width}-byte aligned")
        (length,) = struct.unpack(fmt, self._at(value, width))
        return self._at(value + width, length)

    def slots(self, tag: int, code: int) -> list[int]:
        got, offset = self.raw(tag)
        check(got == code, f"type {got:#x} where {'an array' if code == T_ARRAY else 'an object'}"
                           " belongs")
        check(offset % 4 == 0, "object not 4-byte aligned")
        (count,) = struct.unpack("<I", self._at(offset, 4))
        check(count >= 1, "object with no slot count")
        return list(struct.unpack(f"<{count}I", self._at(offset, 4 * count)))[1:]

    def decode(self, tag: int, schema: Schema) -> Value:
        if tag == 0:
            return None
        if isinstance(schema, str):
            return self.scalar(tag, schema)  # strings stay bytes: the caller decodes
        kind, inner = schema
        if kind == "array":
            items = [self.decode(item, inner) for item in self.slots(tag, T_ARRAY)]
            check(None not in items, "NULL item in an array")
            return items
        result: dict[str, Any] = {}
        values = self.slots(tag, T_OBJECT)
        for slot, item in enumerate(values, start=1):
            if item == 0:
                continue
            check(slot in inner, f"slot {slot} is not in the schema ({sorted(inner)})")
            name, node = inner[slot]
            result[name] = self.decode(item, node)
        check(not values or values[-1] != 0, "object ends with NULL slots")
        return result


@dataclass
class Block:
    kind: str
    offset: int  # from the start of the uncompressed stream
    payload: bytes
    padding: bytes


@dataclass
class ApkFile:
    """One file of the package: its path, metadata and content."""

    path: str
    mode: int
    user: str
    group: str
    size: int
    mtime: int
    sha256: bytes
    data: bytes


@dataclass
class Apk:
    compressed: bool
    schema: bytes
    adb_version: tuple[int, int]
    blocks: list[Block]
    package: dict[str, Any]
    directories: dict[str, dict[str, Any]]  # path ("" = /) -> {"mode", "user", "group"}
    files: dict[str, ApkFile]

    @property
    def info(self) -> dict[str, Any]:
        info: dict[str, Any] = self.package["info"]
        return info

    def text(self, name: str) -> str:
        value = self.info.get(name)
        return value.decode("utf-8") if isinstance(value, bytes) else ""

    @property
    def depends(self) -> list[str]:
        return [dep["name"].decode() for dep in self.info.get("depends", [])]

    @property
    def scripts(self) -> dict[str, str]:
        return {name: body.decode("utf-8") for name, body in self.package["scripts"].items()}


def blocks_of(stream: bytes) -> list[Block]:
    """Every block after the 8-byte file header: 32-bit tag (2 bits type, 30 size)."""
    blocks = []
    offset = 8
    while offset < len(stream):
        check(offset + 4 <= len(stream), "truncated block header")
        (tag,) = struct.unpack_from("<I", stream, offset)
        kind, raw_size = tag >> 30, tag & 0x3FFFFFFF
        check(kind != 3, "extended (EXT) block: not written for packages this small")
        check(raw_size >= 4, f"block at {offset}: size {raw_size} below its own header")
        padded = raw_size + (-raw_size % 8)
        check(offset + padded <= len(stream), f"block at {offset} runs past the end")
        blocks.append(Block(BLOCK_NAMES[kind], offset, stream[offset + 4:offset + raw_size],
                            stream[offset + raw_size:offset + padded]))
        offset += padded
    return blocks


def read(raw: bytes) -> Apk:
    """Parse and check a whole .apk (v3) file."""
    check(raw[:3] == b"ADB", "no ADB magic: not an APKv3 file")
    compressed = raw[3:4] == b"d"
    if compressed:
        inflater = zlib.decompressobj(-15)  # raw deflate, apk-tools io_gunzip.c
        stream = inflater.decompress(raw[4:]) + inflater.flush()
        check(inflater.eof and not inflater.unused_data, "deflate stream has trailing bytes")
    else:
        check(raw[3:4] == b".", f"unknown compression {raw[3:4]!r}")
        stream = raw
    check(stream[:4] == b"ADB.", "inner header is not ADB.")
    schema = stream[4:8]
    check(schema == b"pckg", f"schema {schema!r} is not a package (pckg)")

    blocks = blocks_of(stream)
    for each in blocks:
        check(each.padding == bytes(len(each.padding)), f"non-zero padding at {each.offset}")
    kinds = [each.kind for each in blocks]
    check(kinds[:1] == ["ADB"], "the first block is not the ADB block")
    rest = kinds[1:]
    while rest[:1] == ["SIG"]:
        rest = rest[1:]
    check(all(kind == "DATA" for kind in rest), f"blocks out of order: {kinds}")

    adb_data = blocks[0].payload
    check(len(adb_data) >= 8, "ADB block shorter than its header")
    compat, version = adb_data[0], adb_data[1]
    check(compat == 0, f"ADB compat version {compat}: apk refuses it")
    adb = Adb(adb_data)
    (root,) = struct.unpack_from("<I", adb_data, 4)
    package = adb.decode(root, PACKAGE)
    check(isinstance(package, dict) and "info" in package, "no package info")
    assert isinstance(package, dict)

    # apk's writer sorts these arrays (adb_wa_sort, byte order of the name: apk_blob_sort)
    # and its lookups expect them so
    for label, items in [("paths", package.get("paths", []))] + [
            (f"files of {(d.get('name') or b'').decode()!r}", d.get("files", []))
            for d in package.get("paths", [])] + [
            ("depends", package["info"].get("depends", []))]:
        names = [item.get("name") or b"" for item in items]
        check(names == sorted(names) and len(set(names)) == len(names),
              f"{label} not sorted by name, or repeated")

    directories: dict[str, dict[str, Any]] = {}
    expected: list[tuple[int, int, str, dict[str, Any]]] = []
    files: dict[str, ApkFile] = {}
    for path_index, directory in enumerate(package.get("paths", []), start=1):
        name = (directory.get("name") or b"").decode()
        check(name not in directories, f"directory {name!r} listed twice")
        acl = directory.get("acl", {})
        directories[name] = {"mode": acl.get("mode"), "user": (acl.get("user") or b"").decode(),
                             "group": (acl.get("group") or b"").decode()}
        for file_index, entry in enumerate(directory.get("files", []), start=1):
            path = f"{name}/{entry['name'].decode()}" if name else entry["name"].decode()
            check("target" not in entry, f"{path}: links and devices are not expected")
            digest = entry.get("hash", b"")
            check(len(digest) == 32, f"{path}: hash is not a sha256 ({len(digest)} bytes)")
            file_acl = entry.get("acl", {})
            files[path] = ApkFile(path, file_acl.get("mode", 0),
                                  (file_acl.get("user") or b"").decode(),
                                  (file_acl.get("group") or b"").decode(),
                                  entry.get("size", 0), entry.get("mtime", 0), digest, b"")
            if files[path].size:
                expected.append((path_index, file_index, path, entry))

    # apk matches DATA blocks to the non-empty files in tree order (extract_v3.c)
    data_blocks = [each for each in blocks if each.kind == "DATA"]
    check(len(data_blocks) == len(expected),
          f"{len(data_blocks)} DATA blocks for {len(expected)} non-empty files")
    for each, (path_index, file_index, path, entry) in zip(data_blocks, expected):
        got = struct.unpack_from("<II", each.payload)
        check(got == (path_index, file_index), f"DATA block for {got}, expected "
                                               f"{(path_index, file_index)} ({path})")
        body = each.payload[8:]
        check(len(body) == entry["size"], f"{path}: {len(body)} bytes, size says {entry['size']}")
        check(hashlib.sha256(body).digest() == entry["hash"], f"{path}: sha256 mismatch")
        files[path].data = body

    return Apk(compressed, schema, (compat, version), blocks, package, directories, files)


def unique_id_matches(apk: Apk) -> bool:
    """apk mkpkg's unique id: the first bytes of the ADB block's sha256, taken while the
    id itself was still zero."""
    adb_data = bytearray(apk.blocks[0].payload)
    uid: bytes = apk.info.get("hashes", b"")
    if not uid:
        return False
    at = adb_data.find(bytes([len(uid)]) + uid)
    if at < 0 or adb_data.find(bytes([len(uid)]) + uid, at + 1) >= 0:
        return False
    adb_data[at + 1:at + 1 + len(uid)] = bytes(len(uid))
    return hashlib.sha256(bytes(adb_data)).digest()[:len(uid)] == uid


def describe(apk: Apk) -> str:
    """Metadata, scripts and file list, one item a line."""
    lines = [f"container: {'ADBd (deflate)' if apk.compressed else 'ADB.'}, schema "
             f"{apk.schema.decode()}, blocks: " + " ".join(
                 f"{kind}x{[b.kind for b in apk.blocks].count(kind)}"
                 for kind in ("ADB", "SIG", "DATA"))]
    for key, value in apk.info.items():
        if key == "depends":
            shown = " ".join(apk.depends)
        elif isinstance(value, bytes) and key == "hashes":
            shown = value.hex() + (" (unique id ok)" if unique_id_matches(apk) else " (BAD)")
        elif isinstance(value, bytes):
            shown = value.decode()
        else:
            shown = str(value)
        lines.append(f"{key}: {shown}")
    for name, body in apk.scripts.items():
        lines.append(f"script {name}: {len(body)} bytes")
    for path, entry in sorted(apk.directories.items()):
        lines.append(f"d {entry['mode']:04o} {entry['user']}:{entry['group']} /{path}")
    for path, item in sorted(apk.files.items()):
        lines.append(f"f {item.mode:04o} {item.user}:{item.group} {item.size:6d} "
                     f"{item.sha256.hex()[:16]} /{path}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    for name in args:
        with open(name, "rb") as stream:
            print(describe(read(stream.read())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
