"""Options templates and their records: RFC 7011 4.1-4.3, the metering process, the observation points.

Sent with the templates, per collector session; each options template goes
in a set of its own (pmacct mis-steps through a set holding several).

RFC 7011 section 4, with exactly the fields it lists (collectors such as
ipfixcol2 recognise these templates by their fields):
- 4.1 Metering Process Statistics, scope observationDomainId: messages,
  flow records and octets this session exported.
- 4.2 Metering Process Reliability Statistics, scope observationDomainId:
  packets and octets the kernel could not meter because its table was full,
  and the time of the first and the last of them (observationTimeMilliseconds
  twice, in that order).
- 4.3 Exporting Process Reliability Statistics, scope exportingProcessId:
  flows, packets and octets dropped instead of sent to this collector, and
  when the first and the last such flow was dropped.
Until the first loss, both times are 0 (no time).

kipfix's own:
- Metering process, scope observationDomainId: systemInitTimeMilliseconds
  (the zero of flowStart/EndSysUpTime; nfdump reads it from here), and the
  packets and octets metered.
- Observation points, scope observationPointId: for every metered interface,
  its ifindex (ingressInterface), interfaceName and network namespace
  (kipfix's networkNamespace element, as in data records: "host" for the
  host's, else the name or path the configuration gave). An ifindex is unique
  only within its network namespace; observationPointId in data records
  names the (namespace, interface) pair a flow was metered on.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field

from ..sink import MeteringStats
from .infomodel import default_model
from .template import Template, compile_value_packer

METERING_STATISTICS = ("observationDomainId", "exportedMessageTotalCount", "exportedFlowRecordTotalCount",
                       "exportedOctetTotalCount")
METERING_RELIABILITY = ("observationDomainId", "ignoredPacketTotalCount", "ignoredOctetTotalCount",
                        "observationTimeMilliseconds", "observationTimeMilliseconds")
EXPORTING_RELIABILITY = ("exportingProcessId", "notSentFlowTotalCount", "notSentPacketTotalCount",
                         "notSentOctetTotalCount", "observationTimeMilliseconds", "observationTimeMilliseconds")
METERING_PROCESS = ("observationDomainId", "systemInitTimeMilliseconds", "packetTotalCount", "octetTotalCount")
OBSERVATION_POINTS = ("observationPointId", "ingressInterface", "interfaceName", "networkNamespace")


@dataclass
class ExportCounters:
    """What one collector session sent and lost (cumulative); when it first and last lost one (ms).

    not_sent_* count every flow record the collector will not get, whatever
    the reason (notSent* of the 4.3 options record); ``not_sent_by_reason``
    splits the flows by why: queue_full, too_large, refused (UDP: ICMP
    unreachable), unacknowledged (TCP/TLS died with data unacknowledged),
    not_sent_at_exit, not_resumable (journaled, but its template changed),
    in_doubt (being sent when the agent was killed), error.
    """

    messages: int = 0
    records: int = 0
    octets: int = 0
    not_sent_flows: int = 0
    not_sent_packets: int = 0
    not_sent_octets: int = 0
    first_not_sent_ms: int = 0
    last_not_sent_ms: int = 0
    not_sent_by_reason: collections.Counter = field(default_factory=collections.Counter)

    def not_sent(self, reason: str, flows: int, packets: int, octets: int) -> None:
        self.dropped(flows, packets, octets, time.time_ns() // 1_000_000)
        if flows:
            self.not_sent_by_reason[reason] += flows

    def dropped(self, flows: int, packets: int, octets: int, now_ms: int) -> None:
        if not flows:
            return
        self.not_sent_flows += flows
        self.not_sent_packets += packets
        self.not_sent_octets += octets
        self.first_not_sent_ms = self.first_not_sent_ms or now_ms
        self.last_not_sent_ms = now_ms


class OptionsReporter:
    """The options templates under given IDs (five), and their current records."""

    COUNT = 5

    def __init__(self, ids: list[int], observation_domain_id: int, exporting_process_id: int,
                 system_init_ms: int, enterprise_number: int | None = None):
        self.observation_domain_id = observation_domain_id
        self.exporting_process_id = exporting_process_id
        self.system_init_ms = system_init_ms
        model = default_model() if enterprise_number is None else default_model(enterprise_number)

        def template(template_id: int, names: tuple[str, ...]) -> Template:
            return Template(template_id, tuple(model.lookup(n) for n in names), scope_count=1)

        self.metering = template(ids[0], METERING_STATISTICS)
        self.metering_reliability = template(ids[1], METERING_RELIABILITY)
        self.exporting_reliability = template(ids[2], EXPORTING_RELIABILITY)
        self.metering_process = template(ids[3], METERING_PROCESS)
        self.observation_points = template(ids[4], OBSERVATION_POINTS)
        self.templates = [self.metering, self.metering_reliability, self.exporting_reliability,
                          self.metering_process, self.observation_points]
        self._packers = {t.id: compile_value_packer(t) for t in self.templates}

    def groups(self, stats: MeteringStats, counters: ExportCounters, now_ms: int) -> list[tuple[int, list[bytes]]]:
        """``(template id, [record bytes])`` groups for a data message."""
        rows = {
            self.metering.id: [(self.observation_domain_id, counters.messages, counters.records, counters.octets)],
            self.metering_reliability.id: [(self.observation_domain_id, stats.ignored_packets, stats.ignored_octets,
                                            stats.ignored_first_ms, stats.ignored_last_ms)],
            self.exporting_reliability.id: [(self.exporting_process_id, counters.not_sent_flows,
                                              counters.not_sent_packets, counters.not_sent_octets,
                                              counters.first_not_sent_ms, counters.last_not_sent_ms)],
            self.metering_process.id: [(self.observation_domain_id, self.system_init_ms, stats.observed_packets,
                                        stats.observed_octets)],
            self.observation_points.id: [tuple(point) for point in stats.observation_points],
        }
        return [(tid, self._packers[tid](r)) for tid, r in rows.items() if r]
