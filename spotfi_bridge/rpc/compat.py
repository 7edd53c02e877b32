"""The API's calls that real ubus does not answer, mapped to what does.

The SpotFi API asks ubus for things an OpenWrt router never answered: ``log read``
without ``"stream": false`` (logd streams, the CLI prints nothing), ``service start``
and friends (procd's ``service`` object has no such methods), ``hostapd``
``IFACE/get_status`` (hostapd registers one ``hostapd.IFACE`` object per interface).
The bridge is the one place that can make those dashboard pages work without
touching the API. Each rule is listed in ``bridge info`` with how often it was
used; ``[rpc] compat = false`` turns them all off (calls then pass untouched).
Policy (``allow``/``deny``) and timeouts apply to the API's call as it was asked.
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Optional, Union

from spotfi_bridge.config import RpcConfig
from spotfi_bridge.rpc.backend import Backend, Call, Outcome, ServiceAction

logger = logging.getLogger("spotfi_bridge.rpc")

#: our own init script: acting on it (stop, restart...) would end us before the reply
SELF_SERVICE = "spotfi-bridge"
SERVICE_ACTIONS = ("start", "stop", "restart", "reload", "enable", "disable", "status")
#: actions on our own service that can end this process: replied to first, then run
SELF_ENDING_ACTIONS = ("start", "stop", "restart", "reload")
#: an init script's name: no '/', no '.', no leading '-' (never a path or an option)
_SERVICE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,63}")


@dataclass(frozen=True)
class Rule:
    name: str
    #: the API's call, as it sends it
    call: str
    #: what the bridge runs instead
    runs: str
    #: the dashboard feature it makes work
    serves: str


LOG_READ = Rule("log-read", 'log read {"lines": N} (no "stream")',
                'log read {"lines": N, "stream": false}; logd\'s reply unchanged', "Logs page")
SERVICE = Rule("service-action",
               'service start|stop|restart|reload|enable|disable|status {"name": N}',
               "/etc/init.d/N ACTION (status: procd's service list and /etc/init.d/N enabled)",
               "Services page")
HOSTAPD = Rule("hostapd-get-status", "hostapd IFACE/get_status", "hostapd.IFACE get_status",
               "Wireless status")
RULES = (LOG_READ, SERVICE, HOSTAPD)

Target = Union[Call, ServiceAction, Outcome]


def _with(call: Call, path: str, method: str, args: dict[str, Any]) -> Call:
    return Call(path, method, args, call.timeout, call.output_cap)


def service_problem(name: Any, init_dir: str) -> Optional[str]:
    """Why ``name`` is not an init script directly under ``init_dir``, or None."""
    if not isinstance(name, str) or not name:
        return f"'name' must be the name of a service (an init script in {init_dir})"
    if not _SERVICE_NAME.fullmatch(name):
        return (f"invalid service name {name[:80]!r}: expected the name of a script directly "
                f"in {init_dir} (letters, digits, '_' and '-'; no '/', no '.', no leading '-')")
    if not os.path.isfile(os.path.join(init_dir, name)):
        return f"no such service: {init_dir}/{name} does not exist"
    return None


def route(call: Call, init_dir: str) -> tuple[Optional[Rule], Target]:
    """The rule that applies to ``call`` (None: none) and what to run: a ubus call, an init
    script action, or the refusal to answer with."""
    if call.path == "log" and call.method == "read" and "stream" not in call.args:
        return LOG_READ, _with(call, "log", "read", {**call.args, "stream": False})
    if call.path == "service" and call.method in SERVICE_ACTIONS:
        name = call.args.get("name")
        problem = service_problem(name, init_dir)
        if problem is not None:
            return SERVICE, Outcome(error=f"service {call.method}: {problem}")
        assert isinstance(name, str)
        return SERVICE, ServiceAction(name, call.method, os.path.join(init_dir, name),
                                      call.timeout, call.output_cap)
    if call.path == "hostapd":
        iface, slash, method = call.method.partition("/")
        if slash and iface and method == "get_status":
            return HOSTAPD, _with(call, f"hostapd.{iface}", method, call.args)
    return None, call


class CompatBackend:
    """A backend that applies the rules, then hands what remains to the real one."""

    def __init__(self, inner: Backend, config: RpcConfig) -> None:
        self.inner = inner
        self.name = inner.name
        self.config = config
        self.used: Counter[str] = Counter()

    def reconfigure(self, config: RpcConfig) -> None:
        self.config = config
        self.inner.reconfigure(config)

    async def call(self, call: Call) -> Outcome:
        if not self.config.compat:
            return await self.inner.call(call)
        rule, target = route(call, self.config.init_dir)
        if rule is not None:
            self.used[rule.name] += 1
        if isinstance(target, Outcome):
            logger.warning("rpc: %s.%s refused: %s", call.path, call.method, target.error)
            return target
        if isinstance(target, ServiceAction):
            return await self.inner.service(target)
        return await self.inner.call(target)

    async def service(self, action: ServiceAction) -> Outcome:
        return await self.inner.service(action)

    def describe(self) -> dict[str, Any]:
        """For ``bridge info``: whether the rules apply, each rule and how often it was used."""
        return {"enabled": self.config.compat,
                "rules": [{"rule": rule.name, "call": rule.call, "runs": rule.runs,
                           "serves": rule.serves, "used": self.used[rule.name]}
                          for rule in RULES]}
