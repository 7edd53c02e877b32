"""A fake ``ubus`` on PATH: answers ``system info`` (the RPC round) and what the metrics ask.

A ``/bin/sh`` script, like the many shell wrappers on a router; its own exec
time is measured in the same run and is part of the ``system info`` floor.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

SYSTEM_INFO = {
    "localtime": 1700000000, "uptime": 123456, "load": [12032, 9184, 6432],
    "memory": {"total": 262144000, "free": 150000000, "shared": 1200000, "buffered": 4000000,
               "available": 170000000, "cached": 30000000},
    "root": {"total": 10240, "free": 8000, "used": 2240, "avail": 8000},
    "tmp": {"total": 128000, "free": 127000, "used": 1000, "avail": 127000},
    "swap": {"total": 0, "free": 0},
}
SYSTEM_BOARD = {
    "kernel": "5.15.150", "hostname": "OpenWrt", "system": "ARMv7 Processor rev 5 (v7l)",
    "model": "Bench Router", "board_name": "bench,router",
    "release": {"distribution": "OpenWrt", "version": "23.05.3", "target": "ipq40xx/generic"},
}

SCRIPT = """#!/bin/sh
# fake ubus written by bench/fakeubus.py: `ubus [-S] [-t N] [--] call PATH METHOD [ARGS]`
while [ $# -gt 0 ]; do
  case "$1" in
    call) shift; break ;;
    -t|-s) shift 2 ;;
    *) shift ;;
  esac
done
case "$1 $2" in
  "system info") printf '%s\\n' '{info}' ;;
  "system board") printf '%s\\n' '{board}' ;;
  "uspot client_list") printf '%s\\n' '{{}}' ;;
  *) echo "Command failed: Not found" >&2; exit 4 ;;
esac
"""


def write_fake_ubus(directory: Path) -> Path:
    """Write ``directory/ubus`` and return its path; put ``directory`` first on PATH."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "ubus"
    path.write_text(SCRIPT.replace("{info}", json.dumps(SYSTEM_INFO, separators=(",", ":")))
                    .replace("{board}", json.dumps(SYSTEM_BOARD, separators=(",", ":")))
                    .replace("{{}}", "{}"))
    os.chmod(path, 0o755)
    return path
