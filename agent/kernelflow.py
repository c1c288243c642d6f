"""Binary layout of the kernel flow table (bpf/flowmeter.c), both ways.

Kept beside the C structs it mirrors; the agent checks pinned maps against
these sizes before re-using them.
"""

from __future__ import annotations

import struct

from .flow import FlowCounters, FlowKey

# struct flow_key: ifindex, netns_id, direction, ip_version, src, dst, sport, dport, protocol, pad
KEY = struct.Struct("=IHBB16s16sHHB3x")
# struct flow_value: packets, bytes, first_ns, last_ns, fragment_id, vlan_id, inner_vlan_id,
# tcp_flags, min_ttl, max_ttl, tos, pad
VALUE = struct.Struct("=QQQQIHHBBBB4x")
UNMETERED = struct.Struct("=QQ")
assert KEY.size == 48 and VALUE.size == 48

# Per-CPU values come back padded to 8 octets each.
VALUE_STRIDE = (VALUE.size + 7) & ~7
UNMETERED_STRIDE = (UNMETERED.size + 7) & ~7


def decode_key(raw: bytes, offset: int = 0) -> tuple[int, FlowKey]:
    """Return (netns_id, key) for one raw key."""
    ifindex, netns_id, direction, version, src, dst, sport, dport, proto = KEY.unpack_from(raw, offset)
    width = 4 if version == 4 else 16
    return netns_id, FlowKey(ifindex, direction, version, proto, src[:width], dst[:width], sport, dport)


def encode_key(netns_id: int, key: FlowKey) -> bytes:
    return KEY.pack(key.ifindex, netns_id, key.direction, key.ip_version, key.src.ljust(16, b"\0"),
                    key.dst.ljust(16, b"\0"), key.sport, key.dport, key.protocol)


def sum_percpu(raw: bytes, offset: int, cpus: int) -> FlowCounters | None:
    """Fold one key's per-CPU values; None if no CPU saw a packet."""
    total: FlowCounters | None = None
    for cpu in range(cpus):
        (packets, octets, first, last, frag, vlan, inner, flags, min_ttl, max_ttl,
         tos) = VALUE.unpack_from(raw, offset + cpu * VALUE_STRIDE)
        if not packets:
            continue
        counters = FlowCounters(packets, octets, first, last, flags, min_ttl, max_ttl, tos, vlan, inner, frag)
        if total is None:
            total = counters
        else:
            total.merge(counters)
    return total


def decode_table(keys: bytes, values: bytes, count: int, cpus: int) -> list[tuple[int, FlowKey, FlowCounters]]:
    """Decode a batch read: [(netns_id, key, counters)], empty entries dropped."""
    out = []
    stride = VALUE_STRIDE * cpus
    for i in range(count):
        counters = sum_percpu(values, i * stride, cpus)
        if counters is not None:
            netns_id, key = decode_key(keys, i * KEY.size)
            out.append((netns_id, key, counters))
    return out


def sum_unmetered(raw: bytes, cpus: int) -> tuple[int, int]:
    packets = octets = 0
    for cpu in range(cpus):
        p, o = UNMETERED.unpack_from(raw, cpu * UNMETERED_STRIDE)
        packets += p
        octets += o
    return packets, octets
