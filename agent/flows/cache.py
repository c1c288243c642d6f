"""User-space flow cache: timeouts and end reasons (RFC 5102 flowEndReason).

The kernel tables hold what arrived since the last drain; the cache holds
each flow until it ends. A record carries the counts since the previous
record of the same flow (delta counts), so a long flow cut by the active
timeout is exported as records that add up to its total.

All times inside the cache are kernel monotonic nanoseconds; they become
wall-clock time only when a record is made, with an offset sampled then.
"""

from __future__ import annotations

import dataclasses
import operator
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterable

from .record import TCP_FIN, TCP_RST, EndReason, FlowCounters, FlowKey, FlowRecord, observation_point_id

CacheKey = tuple[int, FlowKey]  # (netns_id, key)
# (netns_id, ifindex) -> (netns name, interface name)
Describe = Callable[[int, int], tuple[str, str]]


def monotonic_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def wall_offset_ns() -> int:
    """Wall-clock minus monotonic time, sampled as tightly as Python allows."""
    before = monotonic_ns()
    wall = time.time_ns()
    after = monotonic_ns()
    return wall - (before + after) // 2


_counter_values = operator.attrgetter(*(f.name for f in dataclasses.fields(FlowCounters)))


@dataclass(slots=True)
class _Entry:
    counters: FlowCounters | None  # since the last record; None right after one
    last_seen_ns: int


class FlowCache:
    """Flows waiting for their end, oldest update first.

    For the crash journal it keeps what changed since ``take_changes`` (or
    ``snapshot``) and the flows, packets and octets it holds unexported, so a
    commit costs what a drain changed, not what the cache holds.
    """

    def __init__(self, idle_timeout: float, active_timeout: float, capacity: int,
                 describe: Describe | None = None):
        self.idle_ns = int(idle_timeout * 1e9)
        self.active_ns = int(active_timeout * 1e9)
        self.capacity = capacity
        self.describe = describe or (lambda netns_id, ifindex: ("", ""))
        # Ordered by last update, oldest first: eviction takes from the front.
        self._entries: OrderedDict[CacheKey, _Entry] = OrderedDict()
        self._changed: dict[CacheKey, None] = {}  # since the last take_changes/snapshot, in order of change
        self._removed: set[CacheKey] = set()
        self.held = [0, 0, 0]  # flows, packets, octets in the cache not exported yet

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, cache_key: CacheKey) -> bool:
        return cache_key in self._entries

    def _record(self, cache_key: CacheKey, counters: FlowCounters, reason: EndReason, offset: int) -> FlowRecord:
        netns_id, key = cache_key
        netns, ifname = self.describe(netns_id, key.ifindex)
        held = self.held
        held[0] -= 1
        held[1] -= counters.packets
        held[2] -= counters.octets
        return FlowRecord(
            key=key, packets=counters.packets, octets=counters.octets,
            start_ns=counters.first_ns + offset, end_ns=counters.last_ns + offset, end_reason=reason,
            tcp_flags=counters.tcp_flags, min_ttl=counters.min_ttl, max_ttl=counters.max_ttl, tos=counters.tos,
            vlan_id=counters.vlan_id, inner_vlan_id=counters.inner_vlan_id, fragment_id=counters.fragment_id,
            interface_name=ifname, netns=netns, observation_point_id=observation_point_id(netns_id, key.ifindex))

    def _gone(self, cache_key: CacheKey) -> None:
        self._changed.pop(cache_key, None)
        self._removed.add(cache_key)

    def ingest(self, flows: Iterable[tuple[int, FlowKey, FlowCounters]]) -> list[FlowRecord]:
        """Fold drained kernel flows in. Returns records of flows evicted for
        lack of resources (the cache was at capacity)."""
        entries = self._entries
        changed = self._changed
        flows_in = packets = octets = 0
        for netns_id, key, counters in flows:
            cache_key = (netns_id, key)
            changed[cache_key] = None
            packets += counters.packets
            octets += counters.octets
            entry = entries.get(cache_key)
            if entry is None:
                entries[cache_key] = _Entry(counters, counters.last_ns)
                flows_in += 1
                continue
            if entry.counters is None:
                entry.counters = counters
                flows_in += 1
            else:
                entry.counters.merge(counters)
            entry.last_seen_ns = max(entry.last_seen_ns, counters.last_ns)
            entries.move_to_end(cache_key)
        held = self.held
        held[0] += flows_in
        held[1] += packets
        held[2] += octets
        evicted = []
        if len(entries) > self.capacity:
            offset = wall_offset_ns()
            while len(entries) > self.capacity:
                cache_key, entry = entries.popitem(last=False)
                self._gone(cache_key)
                if entry.counters is not None:
                    evicted.append(self._record(cache_key, entry.counters, EndReason.LACK_OF_RESOURCES, offset))
        return evicted

    def expire(self, now_ns: int | None = None) -> list[FlowRecord]:
        """Records of flows that ended (FIN/RST, idle) or ran past the active timeout."""
        now_ns = monotonic_ns() if now_ns is None else now_ns
        offset = wall_offset_ns()
        out = []
        ended = []
        for cache_key, entry in self._entries.items():
            counters = entry.counters
            if now_ns - entry.last_seen_ns >= self.idle_ns:
                if counters is not None:
                    out.append(self._record(cache_key, counters, EndReason.IDLE_TIMEOUT, offset))
                ended.append(cache_key)
            elif counters is None:
                continue
            elif counters.tcp_flags & (TCP_FIN | TCP_RST):
                out.append(self._record(cache_key, counters, EndReason.END_OF_FLOW, offset))
                ended.append(cache_key)
            elif now_ns - counters.first_ns >= self.active_ns:
                out.append(self._record(cache_key, counters, EndReason.ACTIVE_TIMEOUT, offset))
                entry.counters = None  # the flow goes on; its next record starts with its next packet
                self._changed[cache_key] = None
        for cache_key in ended:
            del self._entries[cache_key]
            self._gone(cache_key)
        return out

    def flush(self, reason: EndReason = EndReason.FORCED_END,
              match: Callable[[int, FlowKey], bool] | None = None) -> list[FlowRecord]:
        """End flows now (all, or those ``match`` selects)."""
        offset = wall_offset_ns()
        out = []
        for cache_key in list(self._entries):
            if match is not None and not match(*cache_key):
                continue
            entry = self._entries.pop(cache_key)
            self._gone(cache_key)
            if entry.counters is not None:
                out.append(self._record(cache_key, entry.counters, reason, offset))
        return out

    # -- the journal -------------------------------------------------------------------

    @staticmethod
    def _row(cache_key: CacheKey, entry: _Entry) -> tuple:
        counters = entry.counters
        return (cache_key[0], tuple(cache_key[1]), None if counters is None else _counter_values(counters),
                entry.last_seen_ns)

    def snapshot(self) -> list[tuple]:
        """The whole cache as plain tuples, oldest first; what changed so far counts as taken."""
        self._changed, self._removed = {}, set()
        row = self._row
        return [row(cache_key, entry) for cache_key, entry in self._entries.items()]

    def take_changes(self) -> tuple[list[tuple], list[tuple]]:
        """Rows of the flows changed since the last call (or snapshot), in order of change, and the
        (netns id, key tuple) of those that left."""
        changed, removed = self._changed, self._removed
        self._changed, self._removed = {}, set()
        entries, row = self._entries, self._row
        return ([row(cache_key, entries[cache_key]) for cache_key in changed],
                [(netns_id, tuple(key)) for netns_id, key in removed])

    def restore(self, rows: Iterable[tuple]) -> int:
        """Put back what ``snapshot`` returned (before any ingest); returns the flows restored."""
        entries = self._entries
        held = self.held
        for netns_id, key, counters, last_seen_ns in rows:
            counters = None if counters is None else FlowCounters(*counters)
            entries[(netns_id, FlowKey(*key))] = _Entry(counters, last_seen_ns)
            if counters is not None:
                held[0] += 1
                held[1] += counters.packets
                held[2] += counters.octets
        return len(entries)
