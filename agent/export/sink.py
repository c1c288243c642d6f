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
    # Packets and octets the kernel could not meter because its table was full.
    ignored_packets: int = 0
    ignored_octets: int = 0
    # ifindex -> interface name of every attached interface, for interface tables.
    interfaces: tuple[tuple[int, str], ...] = ()


class FlowSink(Protocol):
    """Receives flow records as they leave the cache.

    ``export`` is called from the agent's drain loop and must not block on the
    network: a sink that talks to collectors queues and sends elsewhere.
    """

    def export(self, records: Sequence[FlowRecord], stats: MeteringStats) -> None: ...

    def close(self) -> None: ...
