"""A flow sink writing one JSON object per record (file or stdout)."""

from __future__ import annotations

import json
import logging
import os
import stat
import sys
from typing import Sequence

from ..flows.record import DIRECTION_NAMES, PROTO_NAMES, FlowRecord
from .sink import MeteringStats

log = logging.getLogger(__name__)

DEFAULT_MODE = 0o600  # flow records say who talked to whom: not for every local user


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


def open_private(path: str, mode: int) -> int:
    """An fd appending to ``path``, created with ``mode``; an existing file is given ``mode`` too
    (it may come from a version that created it 0644)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, mode)
    try:
        old = stat.S_IMODE(os.fstat(fd).st_mode)
        if old != mode:
            os.fchmod(fd, mode)
            log.info("jsonLines %s had mode %04o; set to %04o (jsonLinesMode)", path, old, mode)
    except BaseException:
        os.close(fd)
        raise
    return fd


class JsonLinesSink:
    def __init__(self, path: str, mode: int = DEFAULT_MODE):
        self.path = path
        self._out = sys.stdout if path == "-" else open(open_private(path, mode), "a", encoding="utf-8",
                                                        buffering=1)
        self._state: dict = {}

    def export(self, records: Sequence[FlowRecord], stats: MeteringStats) -> None:
        for record in records:
            self._out.write(json.dumps(record_to_dict(record), separators=(",", ":")) + "\n")
        self._out.flush()

    def journal_state(self) -> dict:
        """Which file, and how long it was when the agent committed its journal."""
        if self._out is sys.stdout:
            return {}
        if not self._out.closed:
            info = os.fstat(self._out.fileno())
            self._state = {"path": self.path, "device": info.st_dev, "inode": info.st_ino, "size": info.st_size}
        return self._state

    def restore(self, state: dict) -> None:
        """After a crash: lines written after the last journal commit are written again by this
        agent (their flows are still in the kernel or the journal), so they are cut off first.
        A file rotated meanwhile is left alone."""
        if self._out is sys.stdout or state.get("path") != self.path:
            return
        info = os.fstat(self._out.fileno())
        if (info.st_dev, info.st_ino) != (state["device"], state["inode"]) or info.st_size <= state["size"]:
            return
        os.ftruncate(self._out.fileno(), state["size"])
        log.info("jsonLines %s: cut %d octets written after the last journal commit (they are written "
                 "again)", self.path, info.st_size - state["size"])

    def close(self, keep: bool = False) -> None:
        if self._out is not sys.stdout:
            self.journal_state()  # what it was when closed, for the last commit
            self._out.close()
