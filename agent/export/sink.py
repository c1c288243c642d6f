"""The interface between the flow cache and whatever exports its records."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

from ..flows.record import FlowRecord


@dataclass(frozen=True, slots=True)
class MeteringStats:
    """Cumulative metering-process statistics, for sinks that report them
    (IPFIX options records, RFC 7011 section 4.1/4.2)."""

    observed_packets: int = 0
    observed_octets: int = 0
    exported_flows: int = 0
    # Packets and octets the kernel could not meter because its table was full, and the wall-clock
    # ms of the first and the last of them (0: none yet).
    ignored_packets: int = 0
    ignored_octets: int = 0
    ignored_first_ms: int = 0
    ignored_last_ms: int = 0
    # (observationPointId, ifindex, interface name, netns) of every attached interface.
    observation_points: tuple[tuple[int, int, str, str], ...] = ()


class FlowSink(Protocol):
    """Receives flow records as they leave the cache.

    ``export`` is called from the agent's drain loop and must not block on the
    network: a sink that talks to collectors queues and sends elsewhere.
    """

    def export(self, records: Sequence[FlowRecord], stats: MeteringStats) -> None: ...

    def close(self) -> None: ...
