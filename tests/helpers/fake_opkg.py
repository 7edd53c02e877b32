"""A stand-in for OpenWrt's ``opkg install``, installing into ``$SPOTFI_BRIDGE_ROOT``.

It behaves as opkg does for the calls the update helper makes: reads the
package's outer tar (``debian-binary``, ``control.tar.gz``, ``data.tar.gz``),
refuses a malformed one (exit 255, "Collected errors"), keeps an installed
version unless ``--force-reinstall`` (same version) or ``--force-downgrade``
(older) says otherwise (then exit 0 with opkg's words, nothing changed),
removes the files the old version had and the new one has not, keeps an
existing conffile (the new one goes to ``FILE-opkg``), and records the package
in ``usr/lib/opkg/info`` (``.list``, ``.control``, maintainer scripts) as opkg
does. Maintainer scripts are not run (like ``opkg install`` with
``IPKG_NO_SCRIPT=1``): the helper restarts the service itself. Every install is
appended to ``$SPOTFI_BRIDGE_ROOT/opkg.log`` (``install NAME VERSION``).
"""

from __future__ import annotations

import io
import os
import re
import sys
import tarfile
from typing import Optional

PACKAGE_INFO = "usr/lib/opkg/info"


def _fail(message: str) -> int:
    print(f"Collected errors:\n * {message}", file=sys.stderr)
    return 255


def _members(path: str) -> Optional[dict[str, bytes]]:
    try:
        with tarfile.open(path, "r:gz") as outer:
            found = {}
            for member in outer.getmembers():
                handle = outer.extractfile(member)
                if handle is not None:
                    found[member.name.lstrip("./")] = handle.read()
    except (OSError, tarfile.TarError, EOFError):
        return None
    needed = ("debian-binary", "control.tar.gz", "data.tar.gz")
    return found if all(name in found for name in needed) else None


def _version_key(version: str) -> list[tuple[int, str]]:
    return [(int(part), "") if part.isdigit() else (-1, part)
            for part in re.split(r"[.\-]", version)]


def install(path: str, force_reinstall: bool, force_downgrade: bool, root: str) -> int:
    members = _members(path)
    if members is None:
        return _fail(f"pkg_init_from_file: Malformed package file {path}.")
    controls: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(members["control.tar.gz"]), mode="r:gz") as archive:
        for member in archive.getmembers():
            handle = archive.extractfile(member)
            if handle is not None:
                controls[member.name.lstrip("./")] = handle.read()
    control = controls.get("control", b"").decode()
    name = re.search(r"^Package:\s*(\S+)", control, re.M)
    version = re.search(r"^Version:\s*(\S+)", control, re.M)
    if not name or not version:
        return _fail(f"pkg_init_from_file: Malformed package file {path}.")
    package, new = name.group(1), version.group(1)
    info = os.path.join(root, PACKAGE_INFO)
    os.makedirs(info, exist_ok=True)
    old = None
    try:
        with open(os.path.join(info, f"{package}.control")) as handle:
            found = re.search(r"^Version:\s*(\S+)", handle.read(), re.M)
            old = found.group(1) if found else None
    except OSError:
        pass
    if old == new and not force_reinstall:
        print(f"Package {package} ({new}) installed in root is up to date.")
        return 0
    if old is not None and _version_key(new) < _version_key(old) and not force_downgrade:
        print(f"Not downgrading package {package} on root from {old} to {new}.")
        return 0
    if old is None:
        print(f"Installing {package} ({new}) to root...")
    elif old == new:
        print(f"Reinstalling {package} ({new}) on root...")
    else:
        print(f"Upgrading {package} on root from {old} to {new}...")
    conffiles = set(controls.get("conffiles", b"").decode().split())
    old_list = os.path.join(info, f"{package}.list")
    previous: set[str] = set()
    if os.path.exists(old_list):
        with open(old_list) as handle:
            previous = {line.split("\t")[0] for line in handle if line.strip()}
    installed: list[str] = []
    with tarfile.open(fileobj=io.BytesIO(members["data.tar.gz"]), mode="r:gz") as data:
        for member in data.getmembers():
            target_name = "/" + member.name.lstrip("./")
            if target_name == "/":
                continue
            target = root + target_name
            if member.isdir():
                os.makedirs(target, exist_ok=True)
                continue
            handle = data.extractfile(member)
            assert handle is not None
            body = handle.read()
            if target_name in conffiles and os.path.exists(target):
                with open(target, "rb") as existing:
                    if existing.read() != body:
                        print(f"Existing conffile {target_name} is different from the "
                              f"conffile in the new package.\n The new conffile will be "
                              f"placed at {target_name}-opkg.")
                        target += "-opkg"
            os.makedirs(os.path.dirname(target), exist_ok=True)
            temporary = target + ".opkg-tmp"
            with open(temporary, "wb") as out:
                out.write(body)
            os.chmod(temporary, member.mode)
            os.replace(temporary, target)
            installed.append(target_name)
    for gone in sorted(previous - set(installed)):
        if gone not in conffiles:
            try:
                os.unlink(root + gone)
            except OSError:
                pass
    with open(old_list, "w") as handle:
        handle.writelines(f"{path}\n" for path in installed)
    for name_in_control, body in controls.items():
        with open(os.path.join(info, f"{package}.{name_in_control}"), "wb") as out:
            out.write(body)
    print(f"Configuring {package}.")
    record_install(root, package, new)
    return 0


def record_install(root: str, package: str, version: str) -> None:
    """The install log the tests read (both fakes keep it)."""
    with open(os.path.join(root, "opkg.log"), "a") as log:
        log.write(f"install {package} {version}\n")


def main(argv: list[str]) -> int:
    root = os.environ.get("SPOTFI_BRIDGE_ROOT", "")
    if not root:
        return _fail("fake opkg: SPOTFI_BRIDGE_ROOT is not set (it never touches /)")
    args = [arg for arg in argv if not arg.startswith("--")]
    flags = {arg for arg in argv if arg.startswith("--")}
    unknown = flags - {"--force-reinstall", "--force-downgrade"}
    if unknown:
        print(f"opkg: unrecognized option '{sorted(unknown)[0]}'", file=sys.stderr)
        return 1
    if len(args) != 2 or args[0] != "install":
        print("usage: opkg install [--force-reinstall] [--force-downgrade] FILE", file=sys.stderr)
        return 1
    return install(args[1], "--force-reinstall" in flags, "--force-downgrade" in flags, root)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
