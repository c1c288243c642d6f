"""A small routed topology in network namespaces the test creates.

    h1 (10.1.0.1) ── r1 ── r (router) ── r2a ── h2 (10.2.0.1)
                                      └─ r2b ── h2 (10.3.0.1)

h2's default route leaves through its second link, so replies to h1 come
back into the router on a different interface than the requests left it:
an asymmetric path. IPv6 runs over the same links (fd01::/64, ...).
Static neighbour entries and disabled router solicitations keep the links
free of anything but test traffic, so `ip -s link` counters are exact.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from dataclasses import dataclass, field


def sh(cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, shell=True, check=check, capture_output=True, text=True, **kw)


def link_stats(netns: str, ifname: str) -> dict:
    out = sh(f"ip -n {netns} -s -j link show dev {ifname}").stdout
    stats = json.loads(out)[0]["stats64"]
    return {"rx_packets": stats["rx"]["packets"], "rx_bytes": stats["rx"]["bytes"],
            "tx_packets": stats["tx"]["packets"], "tx_bytes": stats["tx"]["bytes"]}


@dataclass
class Router:
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:6])

    def __post_init__(self):
        t = self.tag
        self.h1, self.r, self.h2 = f"kf{t}h1", f"kf{t}r", f"kf{t}h2"
        self.links = {  # name in router : (peer netns, peer ifname, v4 subnet, v6 subnet)
            "r1": (self.h1, "eth0", "10.1.0", "fd01::"),
            "r2a": (self.h2, "eth0", "10.2.0", "fd02::"),
            "r2b": (self.h2, "eth1", "10.3.0", "fd03::"),
        }

    @property
    def namespaces(self) -> tuple[str, str, str]:
        return self.h1, self.r, self.h2

    def ifindex(self, netns: str, ifname: str) -> int:
        return json.loads(sh(f"ip -n {netns} -j link show dev {ifname}").stdout)[0]["ifindex"]

    def mac(self, netns: str, ifname: str) -> str:
        return json.loads(sh(f"ip -n {netns} -j link show dev {ifname}").stdout)[0]["address"]

    def create(self, offloads: bool = False, inside: bool = False) -> "Router":
        """``inside``: create each veth end inside its namespace, as a CNI plugin does, so each namespace
        numbers its interfaces from 2 and h1's eth0, the router's r1 and h2's eth0 share ifindex 2
        (by default veths are made in the host and moved, keeping host-wide unique numbers)."""
        for ns in self.namespaces:
            sh(f"ip netns add {ns}")
            sh(f"ip -n {ns} link set lo up")
            for knob in ("net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0",
                         "net.ipv6.conf.all.router_solicitations=0", "net.ipv6.conf.default.router_solicitations=0",
                         "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0",
                         "net.ipv6.conf.default.mldv1_unsolicited_report_interval=0",
                         "net.ipv6.conf.default.mldv2_unsolicited_report_interval=0",
                         "net.ipv6.conf.all.force_mld_version=1"):
                sh(f"ip netns exec {ns} sysctl -qw {knob}", check=False)
        sh(f"ip netns exec {self.r} sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1")
        for rif, (peer_ns, peer_if, v4, v6) in self.links.items():
            tmp = f"kf{self.tag}{rif}"
            if inside:
                sh(f"ip link add {rif} netns {self.r} type veth peer name {peer_if} netns {peer_ns}")
            else:
                sh(f"ip link add {tmp}x type veth peer name {tmp}y")
                sh(f"ip link set {tmp}x netns {self.r} name {rif}")
                sh(f"ip link set {tmp}y netns {peer_ns} name {peer_if}")
            for ns, ifname, host in ((self.r, rif, 254), (peer_ns, peer_if, 1)):
                sh(f"ip -n {ns} link set {ifname} up")
                sh(f"ip -n {ns} addr add {v4}.{host}/24 dev {ifname}")
                sh(f"ip -n {ns} addr add {v6}{host:x}/64 dev {ifname} nodad")
                if not offloads:
                    sh(f"ip netns exec {ns} ethtool -K {ifname} tso off gso off gro off", check=False)
            # Static neighbours both ways: no ARP/ND on the links during the test.
            for ns, ifname, peer, peer_ifname, host in ((self.r, rif, peer_ns, peer_if, 1),
                                                        (peer_ns, peer_if, self.r, rif, 254)):
                mac = self.mac(peer, peer_ifname)
                sh(f"ip -n {ns} neigh replace {v4}.{host} lladdr {mac} dev {ifname} nud permanent")
                sh(f"ip -n {ns} neigh replace {v6}{host:x} lladdr {mac} dev {ifname} nud permanent")
        sh(f"ip -n {self.h1} route add default via 10.1.0.254")
        sh(f"ip -n {self.h1} -6 route add default via fd01::fe")
        sh(f"ip -n {self.h2} route add default via 10.3.0.254 dev eth1 src 10.2.0.1")  # the asymmetric return
        sh(f"ip -n {self.h2} -6 route add default via fd03::fe dev eth1 src fd02::1")
        return self

    def settle(self, timeout: float = 15.0) -> None:
        """Wait until the router's links are quiet: a tool's report can come before its last
        packets (iperf3 returns once its data is written, not delivered), and what crosses a
        link after the agent detached is rightly not metered."""
        import time

        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            now = [link_stats(self.r, ifname) for ifname in self.links]
            if now == last:
                return
            last = now
            time.sleep(0.3)
        raise AssertionError(f"router links still busy after {timeout}s")

    def destroy(self) -> None:
        for ns in self.namespaces:
            sh(f"ip netns pids {ns} | xargs -r kill -9", check=False)
            sh(f"ip netns del {ns}", check=False)

    def __enter__(self) -> "Router":
        try:
            return self.create()
        except Exception:
            self.destroy()
            raise

    def __exit__(self, *exc) -> None:
        self.destroy()


def netns_exists(name: str) -> bool:
    return os.path.exists(f"/var/run/netns/{name}")
