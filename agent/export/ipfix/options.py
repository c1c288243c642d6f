"""Options templates and their records (RFC 7011 4.1-4.3) and the interface table.

Sent with the templates, per collector session:
- Metering Process Statistics (4.1), scope observationDomainId: exported
  messages, records and octets of this session, observed packets/octets and
  the system init time (for flowStart/EndSysUpTime).
- Metering Process Reliability Statistics (4.2), scope observationDomainId:
  packets and octets the kernel could not meter because its table was full.
- Exporting Process Reliability Statistics (4.3), scope exportingProcessId:
  flows, packets and octets dropped instead of sent to this collector.
- Interface table, scope ingressInterface: interfaceName of every metered
  interface.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

from ..sink import MeteringStats
from .infomodel import lookup
from .template import Template, compile_value_packer

METERING_STATISTICS = ("observationDomainId", "exportedMessageTotalCount", "exportedFlowRecordTotalCount",
                       "exportedOctetTotalCount", "packetTotalCount", "octetTotalCount",
                       "systemInitTimeMilliseconds", "observationTimeMilliseconds")
METERING_RELIABILITY = ("observationDomainId", "ignoredPacketTotalCount", "ignoredOctetTotalCount",
                        "observationTimeMilliseconds")
EXPORTING_RELIABILITY = ("exportingProcessId", "notSentFlowTotalCount", "notSentPacketTotalCount",
                         "notSentOctetTotalCount", "observationTimeMilliseconds")
INTERFACE_TABLE = ("ingressInterface", "interfaceName")


@dataclass
class ExportCounters:
    """What one collector session sent and lost (cumulative).

    not_sent_* count every flow record the collector will not get, whatever
    the reason (notSent* of the 4.3 options record); ``not_sent_by_reason``
    splits the flows by why: queue_full, too_large, refused (UDP: ICMP
    unreachable), unacknowledged (TCP/TLS died with data unacknowledged),
    not_sent_at_exit, not_resumable (journaled, but its template changed).
    """

    messages: int = 0
    records: int = 0
    octets: int = 0
    not_sent_flows: int = 0
    not_sent_packets: int = 0
    not_sent_octets: int = 0
    not_sent_by_reason: collections.Counter = field(default_factory=collections.Counter)

    def not_sent(self, reason: str, flows: int, packets: int, octets: int) -> None:
        self.not_sent_flows += flows
        self.not_sent_packets += packets
        self.not_sent_octets += octets
        self.not_sent_by_reason[reason] += flows


def _template(template_id: int, names: tuple[str, ...]) -> Template:
    return Template(template_id, tuple(lookup(n) for n in names), scope_count=1)


class OptionsReporter:
    """The four options templates under given IDs, and their current records."""

    def __init__(self, ids: list[int], observation_domain_id: int, exporting_process_id: int,
                 system_init_ms: int):
        self.observation_domain_id = observation_domain_id
        self.exporting_process_id = exporting_process_id
        self.system_init_ms = system_init_ms
        self.metering = _template(ids[0], METERING_STATISTICS)
        self.metering_reliability = _template(ids[1], METERING_RELIABILITY)
        self.exporting_reliability = _template(ids[2], EXPORTING_RELIABILITY)
        self.interfaces = _template(ids[3], INTERFACE_TABLE)
        self.templates = [self.metering, self.metering_reliability, self.exporting_reliability, self.interfaces]
        self._packers = {t.id: compile_value_packer(t) for t in self.templates}

    def groups(self, stats: MeteringStats, counters: ExportCounters, now_ms: int) -> list[tuple[int, list[bytes]]]:
        """``(template id, [record bytes])`` groups for a data message."""
        rows = {
            self.metering.id: [(self.observation_domain_id, counters.messages, counters.records, counters.octets,
                                stats.observed_packets, stats.observed_octets, self.system_init_ms, now_ms)],
            self.metering_reliability.id: [(self.observation_domain_id, stats.ignored_packets,
                                            stats.ignored_octets, now_ms)],
            self.exporting_reliability.id: [(self.exporting_process_id, counters.not_sent_flows,
                                              counters.not_sent_packets, counters.not_sent_octets, now_ms)],
            self.interfaces.id: [(index, name) for index, name in stats.interfaces],
        }
        return [(tid, self._packers[tid](r)) for tid, r in rows.items() if r]
