"""A flow sink writing one JSON object per record (file or stdout)."""

from __future__ import annotations

import json
import sys
from typing import Sequence

from ..flows.record import DIRECTION_NAMES, PROTO_NAMES, FlowRecord
from .sink import MeteringStats


def record_to_dict(record: FlowRecord) -> dict:
    key = record.key
    out = {
        "flowStartMilliseconds": record.start_ms,
        "flowEndMilliseconds": record.end_ms,
        "netns": record.netns,
        "interface": record.interface_name,
        "ifindex": key.ifindex,
        "direction": DIRECTION_NAMES.get(key.direction, str(key.direction)),
        "ipVersion": key.ip_version,
        "protocol": PROTO_NAMES.get(key.protocol, str(key.protocol)),
        "src": str(key.src_ip),
        "dst": str(key.dst_ip),
        "sport": key.sport,
        "dport": key.dport,
        "packets": record.packets,
        "octets": record.octets,
        "tcpFlags": record.tcp_flags,
        "minTTL": record.min_ttl,
        "maxTTL": record.max_ttl,
        "tos": record.tos,
        "endReason": record.end_reason.name.lower(),
    }
    if key.is_icmp:
        out["icmpType"], out["icmpCode"] = key.dport >> 8, key.dport & 0xFF
    if record.vlan_id:
        out["vlanId"] = record.vlan_id
    if record.inner_vlan_id:
        out["innerVlanId"] = record.inner_vlan_id
    if record.fragment_id:
        out["fragmentId"] = record.fragment_id
    return out


class JsonLinesSink:
    def __init__(self, path: str):
        self.path = path
        self._out = sys.stdout if path == "-" else open(path, "a", encoding="utf-8", buffering=1)

    def export(self, records: Sequence[FlowRecord], stats: MeteringStats) -> None:
        for record in records:
            self._out.write(json.dumps(record_to_dict(record), separators=(",", ":")) + "\n")
        self._out.flush()

    def close(self) -> None:
        if self._out is not sys.stdout:
            self._out.close()
