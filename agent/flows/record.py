"""The flow record: what the metering side hands to every sink.

Addresses are kept as packed bytes (4 octets for IPv4, 16 for IPv6) because
that is what both the kernel table and the IPFIX encoder use; conversion to
text happens only for display.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass
from typing import NamedTuple

INGRESS = 0
EGRESS = 1
DIRECTION_NAMES = {INGRESS: "ingress", EGRESS: "egress"}

PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_ICMPV6 = 58
PROTO_SCTP = 132
PROTO_NAMES = {PROTO_ICMP: "icmp", PROTO_TCP: "tcp", PROTO_UDP: "udp",
               PROTO_ICMPV6: "icmpv6", PROTO_SCTP: "sctp"}

TCP_FIN = 0x01
TCP_RST = 0x04


class EndReason(enum.IntEnum):
    """flowEndReason values (IANA IE 136, RFC 5102 section 5.11.3)."""

    IDLE_TIMEOUT = 1
    ACTIVE_TIMEOUT = 2
    END_OF_FLOW = 3
    FORCED_END = 4
    LACK_OF_RESOURCES = 5


class FlowKey(NamedTuple):
    """One flow as the kernel meters it: per interface and direction.

    For ICMP and ICMPv6, ``sport`` is 0 and ``dport`` is type << 8 | code,
    the value of icmpTypeCodeIPv4/IPv6. A NamedTuple because a drain makes
    one per flow: it is the cheapest immutable, hashable record Python has.
    """

    ifindex: int
    direction: int
    ip_version: int
    protocol: int
    src: bytes
    dst: bytes
    sport: int
    dport: int

    @property
    def src_ip(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        return ipaddress.ip_address(self.src)

    @property
    def dst_ip(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        return ipaddress.ip_address(self.dst)

    @property
    def is_icmp(self) -> bool:
        return self.protocol in (PROTO_ICMP, PROTO_ICMPV6)


@dataclass(slots=True)
class FlowCounters:
    """What the kernel accumulated for one key since the last drain.

    Times are kernel monotonic nanoseconds (bpf_ktime_get_ns).
    """

    packets: int
    octets: int
    first_ns: int
    last_ns: int
    tcp_flags: int = 0
    min_ttl: int = 255
    max_ttl: int = 0
    tos: int = 0
    vlan_id: int = 0
    inner_vlan_id: int = 0
    fragment_id: int = 0

    def merge(self, other: "FlowCounters") -> None:
        """Fold ``other`` (later or from another CPU) into this one."""
        self.packets += other.packets
        self.octets += other.octets
        self.first_ns = min(self.first_ns, other.first_ns)
        if other.last_ns >= self.last_ns:
            self.last_ns = other.last_ns
            self.tos = other.tos
            if other.vlan_id:
                self.vlan_id = other.vlan_id
                self.inner_vlan_id = other.inner_vlan_id
            if other.fragment_id:
                self.fragment_id = other.fragment_id
        self.tcp_flags |= other.tcp_flags
        self.min_ttl = min(self.min_ttl, other.min_ttl)
        self.max_ttl = max(self.max_ttl, other.max_ttl)


@dataclass(slots=True)
class FlowRecord:
    """One exported flow record (a full flow or an active-timeout delta).

    Times are wall-clock nanoseconds since the Unix epoch; ``*_ms`` give the
    flowStart/EndMilliseconds values.
    """

    key: FlowKey
    packets: int
    octets: int
    start_ns: int
    end_ns: int
    end_reason: EndReason
    tcp_flags: int = 0
    min_ttl: int = 0
    max_ttl: int = 0
    tos: int = 0
    vlan_id: int = 0
    inner_vlan_id: int = 0
    fragment_id: int = 0
    interface_name: str = ""
    netns: str = ""
    observation_point_id: int = 0  # (netns id, ifindex): observation_point_id()

    @property
    def start_ms(self) -> int:
        return self.start_ns // 1_000_000

    @property
    def end_ms(self) -> int:
        return self.end_ns // 1_000_000


def observation_point_id(netns_id: int, ifindex: int) -> int:
    """The IPFIX observationPointId of an interface: an ifindex is unique only within its network
    namespace, so the agent's netns id goes in the upper 32 bits (host interfaces: the ifindex)."""
    return (netns_id << 32) | ifindex
