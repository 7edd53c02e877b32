"""A stand-in for OpenWrt 25.12's ``apk add`` (apk-tools 3), installing into ``$SPOTFI_BRIDGE_ROOT``.

It reads the real package (APKv3, through tests/helpers/apkread.py) and behaves as apk
does for the calls the update helper makes: an unsigned package without
``--allow-untrusted`` is refused (``UNTRUSTED signature``, exit 99); the installed
version again is a no-op unless ``--force-reinstall``; an edited conffile is kept (the
new one goes to ``FILE.apk-new``); ``apk add -h`` lists ``--force-reinstall`` as apk-tools
3.0.5 does. Scripts are not run (the helper restarts the service itself). Every install
is appended to ``$SPOTFI_BRIDGE_ROOT/opkg.log`` (``install NAME VERSION``), the same record
the fake opkg keeps.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.helpers.apkread import ApkFormatError, read
from tests.helpers.fake_opkg import record_install

DB = "lib/apk/db/spotfi-bridge.version"
HELP = """apk-tools 3.0.5, compiled for x86_64.
Add options:
  --force-reinstall     Allow reinstalling already-installed packages
                        without a version change
"""


def install(path: str, untrusted: bool, reinstall: bool, root: str) -> int:
    try:
        package = read(Path(path).read_bytes())
    except (OSError, ApkFormatError) as exc:
        print(f"ERROR: {path}: {exc}", file=sys.stderr)
        return 1
    if not untrusted:
        print(f"ERROR: {path}: UNTRUSTED signature", file=sys.stderr)
        return 99
    name, version = package.text("name"), package.text("version")
    record = Path(root, DB)
    old = record.read_text().strip() if record.exists() else None
    if old == version and not reinstall:
        print("OK: 1 packages, 0 dirs, 0 files, 0 MiB")
        return 0
    conffiles = {"etc/spotfi/bridge.toml"}
    for relative, item in package.files.items():
        target = Path(root, relative.lstrip("/"))
        target.parent.mkdir(parents=True, exist_ok=True)
        if relative.lstrip("/") in conffiles and target.exists() and \
                target.read_bytes() != item.data:
            target = target.with_name(target.name + ".apk-new")
        temporary = target.with_name(target.name + ".apk-tmp")
        temporary.write_bytes(item.data)
        os.chmod(temporary, item.mode & 0o7777)
        temporary.replace(target)
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(version + "\n")
    print(f"({'Upgrading' if old else 'Installing'} {name} ({version})\nOK")
    record_install(root, name, version)
    return 0


def main(argv: list[str]) -> int:
    root = os.environ.get("SPOTFI_BRIDGE_ROOT", "")
    if not root:
        print("ERROR: fake apk: SPOTFI_BRIDGE_ROOT is not set", file=sys.stderr)
        return 1
    if argv[:2] == ["add", "-h"]:
        print(HELP)
        return 0
    flags = {arg for arg in argv if arg.startswith("--")}
    args = [arg for arg in argv if not arg.startswith("--")]
    unknown = flags - {"--allow-untrusted", "--force-reinstall"}
    if unknown or len(args) != 2 or args[0] != "add":
        print(f"ERROR: usage: apk add [--allow-untrusted] [--force-reinstall] FILE "
              f"({' '.join(argv)})", file=sys.stderr)
        return 1
    return install(args[1], "--allow-untrusted" in flags, "--force-reinstall" in flags, root)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
