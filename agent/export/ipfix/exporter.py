"""The IPFIX exporting process: a FlowSink sending to one or more collectors.

``export()`` encodes each record under the one template that selects it
(selection.py; in the caller's thread, no network) and offers the chunk to
every collector session: each flow is in exactly one data record per
collector. Records no template selects are counted and reported. Each
session has a bounded queue and its own sender thread, so an unreachable or
slow collector never blocks export() or the other collectors; a chunk that
does not fit a session's queue is dropped for that collector and counted
(notSent* in the Exporting Process Reliability options record).

Templates and options records are sent immediately at start (and on every
TCP/TLS connection); over UDP they are re-sent every
``template_refresh_seconds`` and every ``template_refresh_messages``
messages. Over TCP/TLS, templates go once per connection, the options
records on the refresh interval; at close, templates are withdrawn
(never over UDP).
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from ...contract import DEFAULT_PEN
from ...flows.record import FlowRecord
from ..routes import RouteResolver
from ..sink import MeteringStats
from . import fields
from .message import HEADER_LENGTH, SET_HEADER_LENGTH
from .options import ExportCounters, OptionsReporter
from .selection import describe_protocols, free_ids, route_table, unselected
from .session import ExportSession, FlowTemplate, build_flow_templates
from .template import Template
from .transport import TransportError, make_transport

log = logging.getLogger(__name__)

DEFAULT_CHUNK = 1024
UNSELECTED_LOG_INTERVAL = 60.0  # seconds between reports of flows no template takes


@dataclass
class Unselected:
    """Flow records no template selected (not exported), and when that was last reported."""

    flows: int = 0
    packets: int = 0
    octets: int = 0
    reported_flows: int = 0
    reported_at: float = float("-inf")


def system_init_ms() -> int:
    """Wall-clock time of boot in ms: the zero of flowStart/EndSysUpTime."""
    return (time.time_ns() - time.clock_gettime_ns(time.CLOCK_BOOTTIME)) // 1_000_000


@dataclass(frozen=True, slots=True)
class Batch:
    """One chunk of flows, encoded per template: ``groups`` of (template id, records, fixed length)."""

    groups: tuple
    flows: int
    packets: int
    octets: int


class CollectorSession:
    """One collector: transport, export session, bounded queue and sender thread."""

    def __init__(self, config, templates: Sequence[Template], options: OptionsReporter,
                 stats: Callable[[], MeteringStats], domain_id: int,
                 reconnect_initial: float = 0.5, reconnect_max: float = 30.0,
                 transport_factory: Callable = make_transport):
        self.config = config
        self.name = f"{config.transport}://{config.address}"
        self.transport = transport_factory(config)  # ValueError for unusable TLS files
        self.session = ExportSession(domain_id, config.max_message_size, templates)
        self.options = options
        self.stats = stats
        self.counters = ExportCounters()
        self.reconnect_initial, self.reconnect_max = reconnect_initial, reconnect_max
        self._queue: collections.deque[Batch] = collections.deque()
        self._queued = 0
        self._cond = threading.Condition()
        self._closing = False
        self._deadline = 0.0
        self._need_templates = True
        self._options_due = True
        self._last_refresh = 0.0
        self._thread = threading.Thread(target=self._run, name=f"ipfix {self.name}", daemon=True)
        self._thread.start()

    # -- producer side ---------------------------------------------------------

    def offer(self, batch: Batch) -> bool:
        """Queue ``batch``; False (and counted as not sent) if the queue is full."""
        with self._cond:
            if not self._closing and (not self._queue or self._queued + batch.flows <= self.config.queue_size):
                self._queue.append(batch)
                self._queued += batch.flows
                self._cond.notify()
                return True
            self._count_dropped(batch)
            return False

    def _count_dropped(self, batch: Batch) -> None:
        self.counters.dropped(batch.flows, batch.packets, batch.octets, time.time_ns() // 1_000_000)

    @property
    def queued_flows(self) -> int:
        return self._queued

    def report_options(self) -> None:
        """Send the options records (statistics, interface table) before the next batch."""
        with self._cond:
            self._options_due = True
            self._cond.notify()

    def close(self, timeout: float) -> None:
        with self._cond:
            self._closing = True
            self._deadline = time.monotonic() + timeout
            self._cond.notify()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)
        with self._cond:
            left = list(self._queue)
            self._queue.clear()
            self._queued = 0
            for batch in left:
                self._count_dropped(batch)
        if left:
            log.warning("%s: %d flows not sent before close", self.name, sum(b.flows for b in left))

    # -- sender thread -----------------------------------------------------------

    def _refresh_due(self, now: float) -> bool:
        return now - self._last_refresh >= self.config.template_refresh_seconds

    def _run(self) -> None:
        backoff = self.reconnect_initial
        reported = False
        while True:
            with self._cond:
                while not self._queue and not self._closing and not self._need_templates \
                        and not self._options_due and not self._refresh_due(time.monotonic()):
                    wait = self._last_refresh + self.config.template_refresh_seconds - time.monotonic()
                    self._cond.wait(max(wait, 0.001))
                if self._closing and (not self._queue or time.monotonic() >= self._deadline):
                    break
            if not self.transport.alive():
                try:
                    self.transport.connect()
                except (TransportError, OSError) as err:
                    if not reported:
                        log.warning("%s: collector unreachable (%s); retrying with backoff up to %gs",
                                    self.name, err, self.reconnect_max)
                        reported = True
                    with self._cond:
                        if not self._closing:
                            self._cond.wait(backoff)
                        elif time.monotonic() >= self._deadline:
                            break
                        else:
                            self._cond.wait(min(backoff, self._deadline - time.monotonic()))
                    backoff = min(backoff * 2, self.reconnect_max)
                    continue
                if reported:
                    log.warning("%s: connected again", self.name)
                reported = False
                backoff = self.reconnect_initial
                if self.transport.stream:
                    self.session.reset()
                self._need_templates = True
            try:
                self._send_pending()
            except TransportError as err:
                log.warning("%s: %s", self.name, err)
                if not self.transport.stream:  # UDP: wait a moment before trying again
                    with self._cond:
                        if not self._closing:
                            self._cond.wait(backoff)
                    backoff = min(backoff * 2, self.reconnect_max)
            except Exception:  # noqa: BLE001 - a bug must not silence this collector for good
                log.exception("%s: cannot send the next batch; it is dropped and counted", self.name)
                with self._cond:
                    if self._queue:
                        batch = self._queue.popleft()
                        self._queued -= batch.flows
                        self._count_dropped(batch)
                    if not self._closing:
                        self._cond.wait(backoff)
        if self.transport.alive() and not self._need_templates:
            try:
                self._send_options()  # final statistics
                if self.transport.stream:
                    self.transport.send(self.session.withdrawal_message(int(time.time())))
            except TransportError:
                pass
        self.transport.close()

    def _send(self, message: bytes) -> None:
        self.transport.send(message)
        self.counters.messages += 1
        self.counters.octets += len(message)

    def _send_templates(self) -> None:
        for message in self.session.template_messages(int(time.time())):
            self._send(message)
        self._need_templates = False

    def _send_options(self) -> None:
        # Cleared before the statistics are read: a report_options() from now on (new interfaces
        # while this sends) asks for another round instead of being lost when this one ends.
        with self._cond:
            self._options_due = False
        now = time.time()
        groups = self.options.groups(self.stats(), self.counters, int(now * 1000))
        try:
            for packed in self.session.data_messages(groups, int(now)):
                self._send(packed.message)
                self.counters.records += packed.records
        except BaseException:
            with self._cond:
                self._options_due = True  # not sent: the next round tries again
            raise
        self._last_refresh = time.monotonic()

    def _send_pending(self) -> None:
        now = time.monotonic()
        udp = not self.transport.stream
        if self._need_templates or (udp and self._refresh_due(now)):
            self._send_templates()
            self._options_due = True
        if self._options_due or self._refresh_due(now):
            self._send_options()
        while True:
            with self._cond:
                if not self._queue:
                    return
                batch = self._queue[0]
            if self._options_due:  # new interfaces: the table goes before the flows that use it
                self._send_options()
            self._send_batch(batch)
            with self._cond:
                self._queue.popleft()
                self._queued -= batch.flows
            if udp and self._refresh_due(time.monotonic()):
                return  # the next round re-sends templates and options first

    def _send_batch(self, batch: Batch) -> None:
        too_large: list = []
        refresh_messages = self.config.template_refresh_messages
        udp = not self.transport.stream
        start = (0, 0)
        for packed in self.session.data_messages(batch.groups, int(time.time()), too_large):
            if udp and self.session.messages_since_templates > refresh_messages:
                self._send_templates()
                self._options_due = True
                self.session.messages_since_templates = 1
            try:
                self._send(packed.message)
            except TransportError:
                self._requeue_rest(batch, start)
                raise
            self.counters.records += packed.records
            start = packed.end
        if too_large:
            self.counters.dropped(len(too_large), 0, 0, time.time_ns() // 1_000_000)
            log.warning("%s: %d records larger than maxMessageSize %d were not sent", self.name,
                        len(too_large), self.config.max_message_size)

    def _requeue_rest(self, batch: Batch, start: tuple[int, int]) -> None:
        set_index, record_index = start
        groups = list(batch.groups[set_index:])
        if groups and record_index:
            first = groups[0]
            groups[0] = (first[0], first[1][record_index:]) + tuple(first[2:])
        with self._cond:
            if self._queue and self._queue[0] is batch:
                self._queue[0] = Batch(tuple(groups), batch.flows, batch.packets, batch.octets)


class IpfixExporter:
    """FlowSink exporting IPFIX to every collector in ``collectors`` (CollectorConfig).

    ``templates`` are TemplateConfig (id, fields, selection); every record is
    exported under the one template that selects it (selection.py), records
    no template selects are counted in ``unselected`` and reported in the log.
    ValueError for bad templates or TLS files.
    ``pod_lookup`` (a podmeta.PodIndex, or any ``lookup(packed_address)``
    giving the five encoded pod values) fills the pod elements; without it
    they are empty strings.
    """

    def __init__(self, collectors: Sequence, templates: Sequence, observation_domain_id: int,
                 enterprise_number: int = DEFAULT_PEN, *, exporting_process_id: int | None = None,
                 route_resolver: Callable | None = None, pod_lookup: Callable | None = None,
                 chunk_size: int = DEFAULT_CHUNK,
                 reconnect_initial: float = 0.5, reconnect_max: float = 30.0,
                 transport_factory: Callable = make_transport):
        self.observation_domain_id = observation_domain_id
        self.exporting_process_id = (os.getpid() if exporting_process_id is None else exporting_process_id)
        self.system_init_ms = system_init_ms()
        self.flow_templates: list[FlowTemplate] = build_flow_templates(templates, enterprise_number)
        ids = free_ids(ft.template.id for ft in self.flow_templates)
        self.options = OptionsReporter([next(ids) for _ in range(OptionsReporter.COUNT)], observation_domain_id,
                                       self.exporting_process_id, self.system_init_ms, enterprise_number)
        for collector in collectors:
            for ft in self.flow_templates:
                need = HEADER_LENGTH + SET_HEADER_LENGTH + ft.template.min_record_length
                if need > collector.max_message_size:
                    raise ValueError(
                        f"collector {collector.address}: maxMessageSize {collector.max_message_size} cannot hold "
                        f"one record of template {ft.template.id} ({need} octets with headers); accepted: >= {need}")
        self._own_resolver = None
        names = [e.name for ft in self.flow_templates for e in ft.template.elements]
        if route_resolver is None and fields.uses_routes(names):
            route_resolver = self._own_resolver = RouteResolver()

        def packer(template, family):
            return fields.compile_flow_packer(template, observation_domain_id=observation_domain_id,
                                              exporting_process_id=self.exporting_process_id,
                                              system_init_ms=self.system_init_ms, route=route_resolver,
                                              pods=pod_lookup, family=family)

        # one packer per template and address family, so no record tests its family field by field
        self._packers = [{f: packer(ft.template, f) for f in sorted(ft.plan.versions)} for ft in self.flow_templates]
        plans = [ft.plan for ft in self.flow_templates]
        self._route = route_table(plans)  # (IP version, protocol) -> template index
        # without protocol selections the IP version alone decides: no per-record lookup
        self._by_version = None if any(p.protocols is not None for p in plans) else \
            {v: self._route.get((v, 0)) for v in (4, 6)}
        self.unselected = Unselected()
        for version, protocols in unselected(plans).items():
            taken = set(range(256)) - set(protocols)
            what = "every protocol" if not taken else f"protocol {describe_protocols(protocols)}" \
                if len(protocols) < 128 else f"every protocol but {describe_protocols(taken)}"
            log.warning("no template selects IPv%d flows of %s: they are not exported (counted in "
                        "kipfix_agent_ipfix_unselected_flows_total)", version, what)
        self._fixed = [0 if ft.template.variable else ft.template.min_record_length for ft in self.flow_templates]
        self._reduced = any(e.reduced for ft in self.flow_templates for e in ft.template.elements)
        self._saturation_reported: set[tuple[int, str]] = set()
        self.chunk_size = chunk_size
        self.stats = MeteringStats()
        all_templates = [ft.template for ft in self.flow_templates] + self.options.templates
        self.sessions: list[CollectorSession] = []
        try:
            for collector in collectors:
                self.sessions.append(CollectorSession(collector, all_templates, self.options, lambda: self.stats,
                                                      observation_domain_id, reconnect_initial, reconnect_max,
                                                      transport_factory))
        except Exception:
            self.close(0)
            raise
        for ft in self.flow_templates:
            log.info("IPFIX template %d (%s): %s", ft.template.id, ft.plan.describe(),
                     ", ".join(e.name for e in ft.template.elements))

    def _partition(self, records: Sequence[FlowRecord]) -> tuple[dict, list]:
        """{(template index, IP version): [records]} and the records no template selects."""
        parts: dict[tuple[int, int], list] = {}
        left: list = []
        if self._by_version is not None:
            v4 = [r for r in records if r.key.ip_version == 4]
            split = ((4, v4), (6, [r for r in records if r.key.ip_version != 4] if len(v4) < len(records) else []))
            for version, chosen in split:
                if chosen:
                    index = self._by_version[version]
                    if index is None:
                        left += chosen
                    else:
                        parts[(index, version)] = chosen
            return parts, left
        route = self._route
        for r in records:
            key = r.key
            index = route.get((key.ip_version, key.protocol))
            if index is None:
                left.append(r)
            else:
                parts.setdefault((index, key.ip_version), []).append(r)
        return parts, left

    def encode(self, records: Sequence[FlowRecord]) -> tuple:
        """``(template id, [record bytes], fixed length or 0)`` groups for ``records``.

        Every record is in exactly one group: that of the first template that
        selects it; within a group, IPv4 records come before IPv6 records.
        Records no template selects are counted in ``unselected``.
        """
        return self._encode(*self._partition(records))

    def _encode(self, parts: dict, left: list) -> tuple:
        if left:
            self._count_unselected(left)
        groups = []
        for index, (ft, packers, fixed) in enumerate(zip(self.flow_templates, self._packers, self._fixed)):
            encoded = []
            for version, pack in packers.items():  # IPv4 records first, then IPv6
                chosen = parts.get((index, version))
                if chosen:
                    encoded += pack(chosen)
            if encoded:
                groups.append((ft.template.id, encoded, fixed))
        return tuple(groups)

    def _count_unselected(self, records: list) -> None:
        counts = self.unselected
        counts.flows += len(records)
        counts.packets += sum(r.packets for r in records)
        counts.octets += sum(r.octets for r in records)
        now = time.monotonic()
        if now - counts.reported_at >= UNSELECTED_LOG_INTERVAL:
            key = records[0].key
            log.warning("%d flow records no template selects were not exported (%d packets, %d octets in all "
                        "so far), for example IPv%d protocol %d %s -> %s; select them with a template's "
                        "select.ipVersion / select.protocols", counts.flows - counts.reported_flows,
                        counts.packets, counts.octets, key.ip_version, key.protocol, key.src_ip, key.dst_ip)
            counts.reported_flows, counts.reported_at = counts.flows, now
    def export(self, records: Sequence[FlowRecord], stats: MeteringStats) -> None:
        interfaces_changed = stats.observation_points != self.stats.observation_points
        self.stats = stats
        if interfaces_changed:
            for session in self.sessions:
                session.report_options()
        if not self.sessions:
            return
        for start in range(0, len(records), self.chunk_size):
            parts, left = self._partition(records[start:start + self.chunk_size])
            chosen = [r for part in parts.values() for r in part]
            batch = Batch(self._encode(parts, left), len(chosen), sum(r.packets for r in chosen),
                          sum(r.octets for r in chosen))
            for session in self.sessions:
                session.offer(batch)
        if self._reduced:
            self._report_saturation()

    def saturated_values(self) -> dict[tuple[int, str], int]:
        """Values sent as the largest a reduced size holds because they were larger (fields.py), per
        (template id, element) of every template with a reduced size."""
        counts: dict[tuple[int, str], int] = {}
        for ft, packers in zip(self.flow_templates, self._packers):
            for pack in packers.values():
                for element, count in zip(ft.template.elements, pack.saturated):
                    if element.reduced:
                        key = (ft.template.id, element.name)
                        counts[key] = counts.get(key, 0) + count
        return counts

    def _report_saturation(self) -> None:
        """Log the first value of each reduced-size element that did not fit (then only the counter grows)."""
        for (template_id, name), count in self.saturated_values().items():
            if count and (template_id, name) not in self._saturation_reported:
                self._saturation_reported.add((template_id, name))
                log.warning("template %d: a value of %s did not fit its reduced size and was sent as the largest "
                            "it holds; counted in kipfix_agent_ipfix_saturated_values_total", template_id, name)

    def counters(self) -> dict[str, ExportCounters]:
        """Per collector (transport://address): messages, records, octets sent; flows etc. not sent."""
        return {s.name: s.counters for s in self.sessions}

    def close(self, timeout: float = 5.0) -> None:
        """Send what is queued (waiting at most ``timeout`` s in all), withdraw TCP templates, stop."""
        deadline = time.monotonic() + timeout
        for session in self.sessions:
            session.close(timeout)
        for session in self.sessions:
            session.join(max(deadline - time.monotonic(), 0) + 0.5)
        if self._own_resolver is not None:
            self._own_resolver.close()
