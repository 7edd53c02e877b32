"""``system`` and ``network.*`` answers shaped like procd's and netifd's, from psutil and /proc.

For the dry run on a machine without ubus: the dashboard reads these exact
field names, so they follow OpenWrt's output, filled in as well as a generic
Linux box allows.
"""

from __future__ import annotations

import ipaddress
import os
import platform
import shlex
import socket
import time
from typing import Any, Optional

import psutil

from spotfi_bridge.rpc.backend import UBUS_INVALID_ARGUMENT, UBUS_NOT_FOUND, UbusError

#: procd reports load averages as the kernel does: fixed point, scaled by 1 << 16
LOAD_SCALE = 65536


def _read(path: str, limit: int = 65536) -> Optional[str]:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return handle.read(limit).strip()
    except OSError:
        return None


def _filesystem(path: str) -> dict[str, int]:
    """KiB, as procd's ``root`` and ``tmp``."""
    try:
        fs = os.statvfs(path)
    except OSError:
        return {"total": 0, "free": 0, "used": 0, "avail": 0}
    return {
        "total": fs.f_blocks * fs.f_frsize // 1024,
        "free": fs.f_bfree * fs.f_frsize // 1024,
        "used": (fs.f_blocks - fs.f_bfree) * fs.f_frsize // 1024,
        "avail": fs.f_bavail * fs.f_frsize // 1024,
    }


def _uptime() -> int:
    text = _read("/proc/uptime")
    if text:
        try:
            return int(float(text.split()[0]))
        except (ValueError, IndexError):
            pass
    return int(time.time() - psutil.boot_time())


def system_info() -> dict[str, Any]:
    now = time.time()
    memory = psutil.virtual_memory()
    swap = psutil.swap_memory()
    return {
        "localtime": int(now + time.localtime(now).tm_gmtoff),
        "uptime": _uptime(),
        "load": [int(value * LOAD_SCALE) for value in os.getloadavg()],
        "memory": {
            "total": memory.total,
            "free": memory.free,
            "shared": getattr(memory, "shared", 0),
            "buffered": getattr(memory, "buffers", 0),
            "available": memory.available,
            "cached": getattr(memory, "cached", 0),
        },
        "root": _filesystem("/"),
        "tmp": _filesystem("/tmp"),
        "swap": {"total": swap.total, "free": swap.free},
    }


def _key_values(text: Optional[str]) -> dict[str, str]:
    values: dict[str, str] = {}
    for line in (text or "").splitlines():
        name, sep, value = line.partition("=")
        if not sep:
            continue
        try:
            parts = shlex.split(value)
        except ValueError:
            parts = [value]
        values[name.strip()] = " ".join(parts)
    return values


def _release() -> dict[str, str]:
    """OpenWrt's /etc/openwrt_release when present, else the generic /etc/os-release."""
    openwrt = _key_values(_read("/etc/openwrt_release"))
    if openwrt:
        return {
            "distribution": openwrt.get("DISTRIB_ID", "OpenWrt"),
            "version": openwrt.get("DISTRIB_RELEASE", ""),
            "revision": openwrt.get("DISTRIB_REVISION", ""),
            "target": openwrt.get("DISTRIB_TARGET", ""),
            "description": openwrt.get("DISTRIB_DESCRIPTION", ""),
        }
    osr = _key_values(_read("/etc/os-release") or _read("/usr/lib/os-release"))
    return {
        "distribution": osr.get("NAME", platform.system()),
        "version": osr.get("VERSION_ID", ""),
        "revision": osr.get("BUILD_ID", ""),
        "target": osr.get("OPENWRT_BOARD", platform.machine()),
        "description": osr.get("PRETTY_NAME", ""),
    }


def _cpu_name() -> str:
    for line in (_read("/proc/cpuinfo", 1 << 20) or "").splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("system type", "model name", "cpu model", "hardware"):
            return value.strip()
    return platform.processor() or platform.machine()


def _rootfs_type() -> str:
    for line in (_read("/proc/mounts", 1 << 20) or "").splitlines():
        fields = line.split()
        if len(fields) > 2 and fields[1] == "/":
            return fields[2]
    return ""


def system_board() -> dict[str, Any]:
    model = (_read("/tmp/sysinfo/model") or _read("/proc/device-tree/model")
             or _read("/sys/class/dmi/id/product_name") or f"Generic {platform.machine()}")
    board = (_read("/tmp/sysinfo/board_name") or _read("/sys/class/dmi/id/board_name")
             or "generic")
    return {
        "kernel": platform.release(),
        "hostname": socket.gethostname(),
        "system": _cpu_name(),
        "model": model.strip("\x00"),
        "board_name": board.strip("\x00"),
        "rootfs_type": _rootfs_type(),
        "release": _release(),
    }


# --------------------------------------------------------------------------- network

_STAT_NAMES = (
    "collisions", "rx_frame_errors", "tx_compressed", "multicast", "rx_length_errors",
    "tx_dropped", "rx_bytes", "rx_missed_errors", "tx_errors", "rx_compressed",
    "rx_over_errors", "tx_fifo_errors", "rx_crc_errors", "rx_packets", "tx_heartbeat_errors",
    "rx_dropped", "tx_aborted_errors", "tx_packets", "rx_errors", "tx_bytes",
    "tx_window_errors", "rx_fifo_errors", "tx_carrier_errors",
)


def _sysfs_int(device: str, name: str) -> Optional[int]:
    text = _read(f"/sys/class/net/{device}/{name}")
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def _statistics(device: str) -> dict[str, int]:
    stats = {}
    for name in _STAT_NAMES:
        value = _sysfs_int(device, f"statistics/{name}")
        stats[name] = value if value is not None else 0
    return stats


def _device_type(device: str) -> str:
    return "bridge" if os.path.isdir(f"/sys/class/net/{device}/bridge") else "Network device"


def device_status(name: Optional[str] = None) -> dict[str, Any]:
    """``network.device status``: every device, or the one named (netifd answers
    "Invalid argument" for an unknown one)."""
    stats = psutil.net_if_stats()
    addrs = psutil.net_if_addrs()
    names = sorted(stats)
    if name is not None:
        if name not in stats:
            raise UbusError(UBUS_INVALID_ARGUMENT)
        names = [name]
    devices: dict[str, Any] = {}
    for device in names:
        stat = stats[device]
        mac = next((a.address for a in addrs.get(device, ())
                    if a.family == psutil.AF_LINK), "")
        carrier = _sysfs_int(device, "carrier")
        entry: dict[str, Any] = {
            "external": False,
            "present": True,
            "type": _device_type(device),
            "up": stat.isup,
            "carrier": bool(carrier) if carrier is not None else stat.isup,
            "mtu": stat.mtu,
            "macaddr": mac,
            "txqueuelen": _sysfs_int(device, "tx_queue_len") or 0,
            "statistics": _statistics(device),
        }
        if stat.speed > 0:
            duplex = "F" if stat.duplex == psutil.NIC_DUPLEX_FULL else "H"
            entry["speed"] = f"{stat.speed}{duplex}"
        devices[device] = entry
    return devices[names[0]] if name is not None else devices


def _prefix_length(netmask: Optional[str]) -> int:
    if not netmask:
        return 0
    try:
        if "." in netmask:
            return ipaddress.IPv4Network(f"0.0.0.0/{netmask}").prefixlen
        return bin(int(ipaddress.IPv6Address(netmask))).count("1")
    except ValueError:
        return 0


def interface_dump() -> dict[str, Any]:
    """``network.interface dump``: one logical interface per device (``lo`` is ``loopback``,
    as in OpenWrt's default config)."""
    stats = psutil.net_if_stats()
    addrs = psutil.net_if_addrs()
    interfaces = []
    for device in sorted(stats):
        ipv4, ipv6 = [], []
        for addr in addrs.get(device, ()):
            if addr.family == socket.AF_INET:
                ipv4.append({"address": addr.address, "mask": _prefix_length(addr.netmask)})
            elif addr.family == socket.AF_INET6:
                address = addr.address.split("%")[0]
                if not ipaddress.IPv6Address(address).is_link_local:
                    ipv6.append({"address": address, "mask": _prefix_length(addr.netmask)})
        interfaces.append({
            "interface": "loopback" if device == "lo" else device,
            "up": stats[device].isup,
            "pending": False,
            "available": True,
            "autostart": True,
            "dynamic": False,
            "l3_device": device,
            "proto": "static" if ipv4 else "none",
            "device": device,
            "metric": 0,
            "dns_metric": 0,
            "delegation": True,
            "ipv4-address": ipv4,
            "ipv6-address": ipv6,
            "ipv6-prefix": [],
            "ipv6-prefix-assignment": [],
            "route": [],
            "dns-server": [],
            "dns-search": [],
            "neighbors": [],
            "inactive": {"ipv4-address": [], "ipv6-address": [], "route": [],
                         "dns-server": [], "dns-search": [], "neighbors": []},
            "data": {},
        })
    return {"interface": interfaces}


def interface_status(name: str) -> dict[str, Any]:
    for entry in interface_dump()["interface"]:
        if entry["interface"] == name:
            return {key: value for key, value in entry.items() if key != "interface"}
    raise UbusError(UBUS_NOT_FOUND)


#: the radio a dry run shows when this machine has none (a typical 2.4 GHz OpenWrt AP)
EMULATED_RADIO = "wlan0"


def wireless_interfaces() -> list[str]:
    """This machine's wireless interfaces, or the one emulated radio when it has none."""
    try:
        names = sorted(name for name in os.listdir("/sys/class/net")
                       if os.path.isdir(f"/sys/class/net/{name}/wireless"))
    except OSError:
        names = []
    return names or [EMULATED_RADIO]


def hostapd_status(iface: str) -> dict[str, Any]:
    """``hostapd.IFACE get_status`` as hostapd answers it for an access point that is up."""
    mac = next((a.address for a in psutil.net_if_addrs().get(iface, ())
                if a.family == psutil.AF_LINK), "02:00:00:00:00:01")
    return {"status": "ENABLED", "bssid": mac, "ssid": "OpenWrt", "freq": 2437, "channel": 6,
            "op_class": 81, "beacon_interval": 100, "phy": "phy0",
            "rrm": {"neighbor_report_tx": 0},
            "wnm": {"bss_transition_query_rx": 0, "bss_transition_request_tx": 0,
                    "bss_transition_response_rx": 0},
            "airtime": {"time": 0, "time_busy": 0, "utilization": 0}}
