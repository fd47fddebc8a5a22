"""A tenant's own network on this machine: a Linux network namespace joined to the host by a veth
pair, the host side at ``host_ip``. Processes started with ``ip netns exec NAME`` see only that
link and their own loopback, as a tenant's host on another network would: they reach the host's
services bound to ``host_ip`` (the Fleet proxy) and none bound to its loopback (the SuperLink's
own port). Needs root (CAP_NET_ADMIN) and iproute2."""

from __future__ import annotations

import os
import subprocess
import uuid
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass(frozen=True)
class Namespace:
    name: str
    host_ip: str    # the host's end of the link: what the tenant dials
    tenant_ip: str  # the tenant's end

    def command(self, *cmd: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *cmd]


def available() -> str | None:
    """None when namespaces can be made here, else why not."""
    if os.geteuid() != 0:
        return "network namespaces need root (CAP_NET_ADMIN)"
    if subprocess.run(["ip", "-V"], capture_output=True).returncode != 0:
        return "iproute2's `ip` is not installed"
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@contextmanager
def tenant_namespace():
    """A fresh namespace and link (a random 10.231.x.0/30); removed on exit."""
    tag = uuid.uuid4().hex[:6]
    name, host_if, ns_if = f"fl-{tag}", f"flh{tag}", f"fln{tag}"
    octet = int(tag[:2], 16)
    ns = Namespace(name, f"10.231.{octet}.1", f"10.231.{octet}.2")
    _ip("netns", "add", name)
    try:
        _ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        _ip("link", "set", ns_if, "netns", name)
        _ip("addr", "add", f"{ns.host_ip}/30", "dev", host_if)
        _ip("link", "set", host_if, "up")
        for args in (("addr", "add", f"{ns.tenant_ip}/30", "dev", ns_if), ("link", "set", ns_if, "up"),
                     ("link", "set", "lo", "up")):
            _ip("netns", "exec", name, "ip", *args)
        yield ns
    finally:
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
