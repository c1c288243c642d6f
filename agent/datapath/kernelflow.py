"""Binary layout of the kernel flow table (bpf/flowmeter.c), both ways.

Kept beside the C structs it mirrors; the agent checks pinned maps against
these sizes before re-using them.
"""

from __future__ import annotations

import struct

from ..flows.record import FlowCounters, FlowKey
from ..flows.gcpause import gc_paused

# struct flow_key: ifindex, netns_id, direction, ip_version, src, dst, sport, dport, protocol, pad
KEY = struct.Struct("=IHBB16s16sHHB3x")
# struct flow_value: packets, bytes, first_ns, last_ns, fragment_id, vlan_id, inner_vlan_id,
# tcp_flags, min_ttl, max_ttl, tos, pad
VALUE = struct.Struct("=QQQQIHHBBBB4x")
UNMETERED = struct.Struct("=QQQQ")  # packets, octets, first and last ns
assert KEY.size == 48 and VALUE.size == 48

# Per-CPU values come back padded to 8 octets each; decode_table steps through
# them with VALUE.iter_unpack, which needs the value to be that padded size.
VALUE_STRIDE = (VALUE.size + 7) & ~7
assert VALUE.size == VALUE_STRIDE
UNMETERED_STRIDE = (UNMETERED.size + 7) & ~7


def decode_key(raw: bytes, offset: int = 0) -> tuple[int, FlowKey]:
    """Return (netns_id, key) for one raw key."""
    ifindex, netns_id, direction, version, src, dst, sport, dport, proto = KEY.unpack_from(raw, offset)
    width = 4 if version == 4 else 16
    return netns_id, FlowKey(ifindex, direction, version, proto, src[:width], dst[:width], sport, dport)


def encode_key(netns_id: int, key: FlowKey) -> bytes:
    return KEY.pack(key.ifindex, netns_id, key.direction, key.ip_version, key.src.ljust(16, b"\0"),
                    key.dst.ljust(16, b"\0"), key.sport, key.dport, key.protocol)


def decode_table(keys, values, count: int, cpus: int) -> list[tuple[int, FlowKey, FlowCounters]]:
    """Decode a batch read: [(netns_id, key, counters)], per-CPU values folded.

    The hot loop of every drain: one pass of iter_unpack over each buffer, and
    a shortcut for the common case of a flow seen by one CPU only.
    """
    with gc_paused():
        return _decode(keys, values, count, cpus)


def _decode(keys, values, count: int, cpus: int) -> list[tuple[int, FlowKey, FlowCounters]]:
    out = []
    append = out.append
    values_iter = VALUE.iter_unpack(memoryview(values)[:count * cpus * VALUE_STRIDE])
    for ifindex, netns_id, direction, version, src, dst, sport, dport, proto in \
            KEY.iter_unpack(memoryview(keys)[:count * KEY.size]):
        total = None
        for _ in range(cpus):
            value = next(values_iter)
            if not value[0]:
                continue
            if total is None:
                total = FlowCounters(value[0], value[1], value[2], value[3], value[7], value[8], value[9],
                                     value[10], value[5], value[6], value[4])
            else:
                total.merge(FlowCounters(value[0], value[1], value[2], value[3], value[7], value[8], value[9],
                                         value[10], value[5], value[6], value[4]))
        if total is not None:
            if version == 4:
                src, dst = src[:4], dst[:4]
            append((netns_id, FlowKey(ifindex, direction, version, proto, src, dst, sport, dport), total))
    return out


def sum_unmetered(raw: bytes, cpus: int) -> tuple[int, int]:
    packets = octets = 0
    for cpu in range(cpus):
        p, o, _first, _last = UNMETERED.unpack_from(raw, cpu * UNMETERED_STRIDE)
        packets += p
        octets += o
    return packets, octets


def unmetered_times(raw: bytes, cpus: int) -> tuple[int, int] | None:
    """(first, last) kernel monotonic ns of the packets a full table could not meter; None if none."""
    times = [UNMETERED.unpack_from(raw, cpu * UNMETERED_STRIDE) for cpu in range(cpus)]
    seen = [(first, last) for packets, _octets, first, last in times if packets]
    if not seen:
        return None
    return min(first for first, _ in seen), max(last for _, last in seen)
