"""Well-formed dummy flows, to check a collector without any traffic."""

from __future__ import annotations

import ipaddress
import random
import time
from typing import Sequence

from ...flows.record import (EGRESS, INGRESS, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, EndReason, FlowKey,
                             FlowRecord)
from ...contract import DEFAULT_PEN
from ..sink import MeteringStats

MINIMAL_TEMPLATE = ("FlowEndMilliseconds", "FlowStartMilliseconds", "OctetDeltaCount", "PacketDeltaCount",
                    "IpVersion", "FlowDirection", "SourceIPv4Address", "DestinationIPv4Address")
# Documentation prefixes only (RFC 5737, RFC 3849): dummy flows name no real host.
V4_NETWORK = ipaddress.ip_network("198.51.100.0/24")
V6_NETWORK = ipaddress.ip_network("2001:db8::/64")


def dummy_records(count: int, seed: int = 0, now_ns: int | None = None) -> list[FlowRecord]:
    """``count`` varied flows: IPv4 and IPv6; TCP, UDP and ICMP; both directions."""
    rng = random.Random(seed)
    now_ns = time.time_ns() if now_ns is None else now_ns
    records = []
    for i in range(count):
        version = 6 if i % 4 == 3 else 4
        network = V6_NETWORK if version == 6 else V4_NETWORK
        src = network[rng.randrange(1, 250)].packed
        dst = network[rng.randrange(1, 250)].packed
        kind = i % 3
        if kind == 2:
            protocol = PROTO_ICMPV6 if version == 6 else PROTO_ICMP
            sport, dport = 0, (128 << 8) if version == 6 else (8 << 8)
        else:
            protocol = PROTO_TCP if kind == 0 else PROTO_UDP
            sport, dport = rng.randrange(1024, 65536), rng.choice((53, 80, 443, 4739))
        packets = rng.randrange(1, 1000)
        start = now_ns - rng.randrange(1, 60_000) * 1_000_000
        records.append(FlowRecord(
            key=FlowKey(ifindex=1 + i % 2, direction=EGRESS if i % 2 else INGRESS, ip_version=version,
                        protocol=protocol, src=src, dst=dst, sport=sport, dport=dport),
            packets=packets, octets=packets * rng.randrange(40, 1500), start_ns=start,
            end_ns=start + rng.randrange(0, 10_000) * 1_000_000, end_reason=EndReason.IDLE_TIMEOUT,
            tcp_flags=0x1B if protocol == PROTO_TCP else 0, min_ttl=64, max_ttl=64,
            interface_name=f"dummy{1 + i % 2}"))
    return records


def send_dummy(collectors: Sequence, templates: Sequence, count: int, observation_domain_id: int = 1,
               enterprise_number: int = DEFAULT_PEN, timeout: float = 10.0) -> dict:
    """Export ``count`` dummy flows to ``collectors``; the exporter's counters per collector."""
    from .exporter import IpfixExporter

    exporter = IpfixExporter(collectors, templates, observation_domain_id, enterprise_number)
    try:
        exporter.export(dummy_records(count), MeteringStats(observation_points=((1, 1, "dummy1", "host"), (2, 2, "dummy2", "host"))))
    finally:
        exporter.close(timeout)
    return exporter.counters()
