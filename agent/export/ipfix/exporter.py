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

UDP is paced: the messages of a drain are spread over ``pace_window``
(most of the drain interval) when the collector's ``pacing`` is
``spread``, and never come faster than ``maxMessagesPerSecond``, so a
collector's receive buffer sees a trickle instead of a burst.

Losses are counted per collector and reason (ExportCounters), never
guessed away: a UDP socket is connected, so an ICMP port or host
unreachable comes back as an error: the message it follows is counted
(``refused``), flows are held and templates sent as probes until one is
not refused. When a TCP/TLS connection dies, the messages whose end the
collector's TCP had not acknowledged (TCP_INFO bytes_acked against each
message's end in the stream) are counted (``unacknowledged``).

With ``cursors`` (the agent's journal, flows/journal.py) every batch is
numbered and held until ``release()`` -- the agent calls it once its
journal holds the batch -- and after every message a sender records how
far it got; ``journal_state()`` and ``restore()`` carry queued batches
over a restart (or a reload), so a flow is sent once even across kill -9.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

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
PROBE_WAIT = 0.25  # s a probe (or the last message) must go unrefused before the collector counts as up
REFUSED = {errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN, errno.ENETDOWN}
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


class Tally(NamedTuple):
    """Packets and octets of one record of a batch restored from the journal."""

    packets: int
    octets: int


Position = tuple[int, int]  # (set index, record index) in a batch's groups


@dataclass(frozen=True, slots=True)
class Batch:
    """One chunk of flows: ``groups`` of (template id, [record bytes], fixed length), and
    ``sources``: per group, the records behind the bytes in the same order (anything
    with ``packets`` and ``octets``), to count what a lost message carried."""

    serial: int
    groups: tuple
    sources: tuple
    flows: int
    packets: int
    octets: int

    @property
    def end(self) -> Position:
        return (len(self.groups), 0)

    def tally(self, start: Position, end: Position) -> tuple[int, int, int]:
        """(flows, packets, octets) of the records from ``start`` up to ``end``."""
        if start == (0, 0) and end >= self.end:
            return self.flows, self.packets, self.octets
        flows = packets = octets = 0
        for index in range(start[0], min(end[0] + 1, len(self.sources))):
            records = self.sources[index]
            lo = start[1] if index == start[0] else 0
            hi = end[1] if index == end[0] else len(records)
            for record in records[lo:hi]:
                flows += 1
                packets += record.packets
                octets += record.octets
        return flows, packets, octets


def groups_from(groups: tuple, position: Position) -> tuple:
    """``groups`` from ``position`` on."""
    set_index, record_index = position
    rest = list(groups[set_index:])
    if rest and record_index:
        first = rest[0]
        rest[0] = (first[0], first[1][record_index:]) + tuple(first[2:])
    return tuple(rest)


def absolute(start: Position, relative: Position) -> Position:
    """A position in ``groups_from(groups, start)`` as a position in ``groups``."""
    return (start[0] + relative[0], (start[1] if relative[0] == 0 else 0) + relative[1])


class CollectorSession:
    """One collector: transport, export session, bounded queue and sender thread."""

    def __init__(self, config, templates: Sequence[Template], options: OptionsReporter,
                 stats: Callable[[], MeteringStats], domain_id: int,
                 reconnect_initial: float = 0.5, reconnect_max: float = 30.0,
                 transport_factory: Callable = make_transport, pace_window: float = 0.0, cursors=None):
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
        self._position: Position = (0, 0)  # how far into the head batch the collector got
        self._cond = threading.Condition()
        self._closing = False
        self._deadline = 0.0
        self._need_templates = True
        self._options_due = True
        self._last_refresh = 0.0
        # journal: batches up to this serial may be sent (None: all, no journal)
        self.cursors = cursors
        self.slot = cursors.take() if cursors is not None else None
        self._released: int | None = None if cursors is None else 0
        # pacing (UDP)
        udp = config.transport == "udp"
        self._pace_window = pace_window if udp and getattr(config, "pacing", "none") == "spread" else 0.0
        rate = getattr(config, "max_messages_per_second", 0) if udp else 0
        self._min_gap = 1.0 / rate if rate else 0.0
        self._pace_deadline = 0.0
        self._next_send = 0.0
        self._head_sent = 0  # records of the head batch sent
        # loss accounting
        self._in_flight: collections.deque = collections.deque()  # TCP/TLS: (stream end, batch, start, end)
        self._unconfirmed: tuple | None = None  # UDP: (batch, start, end) of the last data message sent
        self._outage_refused = [0, 0, 0]  # flows, packets, octets refused since the collector went away
        self._probing = False
        self._thread = threading.Thread(target=self._run, name=f"ipfix {self.name}", daemon=True)
        self._thread.start()

    # -- producer side ---------------------------------------------------------

    def offer(self, batch: Batch) -> bool:
        """Queue ``batch``; False (and counted as not sent) if the queue is full."""
        with self._cond:
            if not self._closing and (not self._queue or self._queued + batch.flows <= self.config.queue_size):
                self._queue.append(batch)
                self._queued += batch.flows
                if self._released is None:
                    self._pace_deadline = time.monotonic() + self._pace_window
                self._cond.notify()
                return True
            self.counters.not_sent("queue_full", batch.flows, batch.packets, batch.octets)
            return False

    def release(self, serial: int) -> None:
        """Batches up to ``serial`` are journaled: they may be sent."""
        with self._cond:
            if self._released is not None and serial > self._released:
                self._released = serial
                self._pace_deadline = time.monotonic() + self._pace_window
                self._cond.notify()

    def restore(self, batches: list[tuple[Batch, Position]]) -> None:
        """Put batches journaled before a restart (or left by a reload) in front of the queue, before
        this session sent any batch."""
        with self._cond:
            for batch, position in reversed(batches):
                self._queue.appendleft(batch)
                self._queued += batch.flows
            if batches:
                self._position = batches[0][1]
                self._head_sent = batches[0][0].tally((0, 0), self._position)[0]
            self._cond.notify()

    def pending(self) -> tuple[list[Batch], Position]:
        """Queued batches and how far into the first one the collector got."""
        with self._cond:
            return list(self._queue), self._position

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
            if self._released is not None:
                self._released = max((b.serial for b in self._queue), default=self._released)
            self._deadline = time.monotonic() + timeout
            self._cond.notify()

    def join(self, timeout: float, keep: bool = False) -> None:
        """Wait for the sender; what it did not send is counted as not sent, unless ``keep``
        (the journal carries it to the next agent)."""
        self._thread.join(timeout)
        if self.transport.stream:
            self._stream_lost()
        if keep:
            return
        with self._cond:
            left = list(self._queue)
            position = self._position
            self._queue.clear()
            self._queued = 0
            self._position = (0, 0)
        flows = 0
        for index, batch in enumerate(left):
            lost = batch.tally(position if index == 0 else (0, 0), batch.end)
            self.counters.not_sent("not_sent_at_exit", *lost)
            flows += lost[0]
        if flows:
            log.warning("%s: %d flows not sent before close", self.name, flows)

    # -- sender thread -----------------------------------------------------------

    def _sendable(self) -> bool:
        return bool(self._queue) and (self._released is None or self._queue[0].serial <= self._released)

    def _refresh_due(self, now: float) -> bool:
        return now - self._last_refresh >= self.config.template_refresh_seconds

    def _confirm_at(self) -> float | None:
        """When to look for an ICMP error about the last UDP message (None: nothing to confirm)."""
        sent_at = getattr(self.transport, "unconfirmed_since", None)
        return None if sent_at is None else sent_at + PROBE_WAIT

    def _wait_for_work(self) -> None:
        with self._cond:
            while True:
                now = time.monotonic()
                if self._sendable() or self._closing or self._need_templates or self._options_due \
                        or self._refresh_due(now):
                    return
                wake = self._last_refresh + self.config.template_refresh_seconds
                confirm = self._confirm_at()
                if confirm is not None:
                    if now >= confirm:
                        return
                    wake = min(wake, confirm)
                self._cond.wait(max(wake - now, 0.001))

    def _run(self) -> None:
        backoff = self.reconnect_initial
        failing = False  # logged once per outage, and once when it ends
        while True:
            self._wait_for_work()
            with self._cond:
                if self._closing and (not self._sendable() or time.monotonic() >= self._deadline):
                    break
            if not self.transport.alive():
                if self.transport.stream:
                    self._stream_lost()
                try:
                    self.transport.connect()
                except (TransportError, OSError) as err:
                    if not failing:
                        log.warning("%s: collector unreachable (%s); retrying with backoff up to %gs",
                                    self.name, err, self.reconnect_max)
                        failing = True
                    if not self._pause(backoff):
                        break
                    backoff = min(backoff * 2, self.reconnect_max)
                    continue
                if failing and self.transport.stream:
                    log.warning("%s: connected again", self.name)
                    failing = False
                backoff = self.reconnect_initial
                if self.transport.stream:
                    self.session.reset()
                self._need_templates = True
            try:
                self._confirm()
                self._send_pending()
            except TransportError as err:
                refused = not self.transport.stream and err.errno in REFUSED
                if refused:
                    self._count_refused()
                    self._probing = True
                if self.transport.stream:
                    self._stream_lost()
                if not failing:
                    log.warning("%s: %s%s", self.name, err, "; holding flows and probing with templates until "
                                "the collector accepts them" if refused else "")
                    failing = True
                if not self.transport.stream:  # UDP: wait a moment before trying again
                    self._pause(backoff)
                    backoff = min(backoff * 2, self.reconnect_max)
                continue
            except Exception:  # noqa: BLE001 - a bug must not silence this collector for good
                log.exception("%s: cannot send the next batch; it is dropped and counted", self.name)
                with self._cond:
                    if self._queue:
                        batch = self._queue.popleft()
                        self._queued -= batch.flows
                        self.counters.not_sent("error", *batch.tally(self._position, batch.end))
                        self._position, self._head_sent = (0, 0), 0
                    if not self._closing:
                        self._cond.wait(backoff)
                continue
            if failing and not self.transport.stream:
                flows, packets, octets = self._outage_refused
                log.warning("%s: the collector accepts messages again; %d flows (%d packets, %d octets) sent "
                            "while it refused them are lost (counted as refused)", self.name, flows, packets, octets)
                self._outage_refused = [0, 0, 0]
            failing = False
            backoff = self.reconnect_initial
        if self.transport.alive() and not self._need_templates and not self._probing:
            try:
                self._send_options()  # final statistics
                if self.transport.stream:
                    self.transport.send(self.session.withdrawal_message(int(time.time())))
                else:  # a refusal of the last messages still counts
                    time.sleep(max(min(PROBE_WAIT, self._deadline - time.monotonic()), 0))
                    self._confirm()
            except TransportError:
                self._count_refused()
        self.transport.close()

    def _pause(self, seconds: float) -> bool:
        """Wait ``seconds`` (less when closing); False when the close deadline passed."""
        with self._cond:
            if not self._closing:
                self._cond.wait(seconds)
                return True
            left = self._deadline - time.monotonic()
            if left <= 0:
                return False
            self._cond.wait(min(seconds, left))
            return True

    def _wait_until(self, when: float) -> None:
        """Pacing: wait until ``when``, unless the session closes (then what is left goes out at once)."""
        with self._cond:
            while not self._closing:
                left = when - time.monotonic()
                if left <= 0:
                    return
                self._cond.wait(left)

    # -- loss accounting ---------------------------------------------------------

    def _confirm(self) -> None:
        """UDP: raise if the collector refused the last message (ICMP), else take it as delivered."""
        if not self.transport.stream:
            self.transport.check(settle=PROBE_WAIT)
            if getattr(self.transport, "unconfirmed_since", None) is None:
                self._unconfirmed = None

    def _count_refused(self) -> None:
        if self._unconfirmed is not None:
            batch, start, end = self._unconfirmed
            self._unconfirmed = None
            lost = batch.tally(start, end)
            self.counters.not_sent("refused", *lost)
            self._outage_refused = [a + b for a, b in zip(self._outage_refused, lost)]

    def _stream_lost(self) -> None:
        """The TCP/TLS connection is gone: count the messages the collector did not acknowledge."""
        if not self._in_flight:
            return
        acked = getattr(self.transport, "acked_at_close", None)
        flows = 0
        for stream_end, batch, start, end in self._in_flight:
            if acked is None or stream_end > acked:
                lost = batch.tally(start, end)
                self.counters.not_sent("unacknowledged", *lost)
                flows += lost[0]
        self._in_flight.clear()
        if flows:
            log.warning("%s: the connection ended with %d flows the collector had not acknowledged; they are "
                        "counted as not sent", self.name, flows)

    def _sent(self, stream_end: int | None, batch: Batch | None = None, start: Position = (0, 0),
              end: Position = (0, 0)) -> None:
        if batch is None:
            return
        if stream_end is not None:
            in_flight = self._in_flight
            in_flight.append((stream_end, batch, start, end))
            if len(in_flight) > 256:  # forget what the collector acknowledged
                acked = self.transport.acked()
                while in_flight and acked is not None and in_flight[0][0] <= acked:
                    in_flight.popleft()
        else:
            self._unconfirmed = (batch, start, end)

    # -- sending -------------------------------------------------------------------

    def _send(self, message: bytes) -> int | None:
        stream_end = self.transport.send(message)
        self.counters.messages += 1
        self.counters.octets += len(message)
        return stream_end

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

    def _probe(self) -> None:
        """After a refusal: templates (a restarted collector needs them anyway), then data only if
        no ICMP error came back for them."""
        self._send_templates()
        self._options_due = True
        self._wait_until(time.monotonic() + PROBE_WAIT)
        self.transport.check(settle=0.0)
        self._probing = False

    def _send_pending(self) -> None:
        now = time.monotonic()
        udp = not self.transport.stream
        if self._probing:
            self._probe()
        if self._need_templates or (udp and self._refresh_due(now)):
            self._send_templates()
            self._options_due = True
        if self._options_due or self._refresh_due(now):
            self._send_options()
        while True:
            with self._cond:
                if not self._sendable():
                    return
                batch = self._queue[0]
            if self._options_due:  # new interfaces: the table goes before the flows that use it
                self._send_options()
            self._send_batch(batch)
            with self._cond:
                self._queue.popleft()
                self._queued -= batch.flows
                self._position, self._head_sent = (0, 0), 0
            if udp and self._refresh_due(time.monotonic()):
                return  # the next round re-sends templates and options first

    def _send_batch(self, batch: Batch) -> None:
        too_large: list = []
        refresh_messages = self.config.template_refresh_messages
        udp = not self.transport.stream
        start = self._position
        counted = 0
        for packed in self.session.data_messages(groups_from(batch.groups, start), int(time.time()), too_large):
            if udp and self.session.messages_since_templates > refresh_messages:
                self._send_templates()
                self._options_due = True
                self.session.messages_since_templates = 1
            if self._next_send:
                self._wait_until(self._next_send)
            end = absolute(start, packed.end)
            if self.cursors is not None:  # killed from here to the next write: these records are in doubt
                self.cursors.write(self.slot, batch.serial, self._position, end)
            try:
                stream_end = self._send(packed.message)
            except TransportError:  # not sent (TCP: at most a part, which the collector discards)
                if self.cursors is not None:
                    self.cursors.write(self.slot, batch.serial, self._position)
                raise
            self.counters.records += packed.records
            self._sent(stream_end, batch, self._position, end)
            with self._cond:
                self._position = end
                self._head_sent += packed.records
            if self.cursors is not None:
                self.cursors.write(self.slot, batch.serial, end)
            if len(too_large) > counted:
                self.counters.not_sent("too_large", len(too_large) - counted, 0, 0)
                log.warning("%s: %d records larger than maxMessageSize %d were not sent", self.name,
                            len(too_large) - counted, self.config.max_message_size)
                counted = len(too_large)
            if udp:
                self._pace(packed.records)
        if self.cursors is not None:
            self.cursors.write(self.slot, batch.serial, batch.end)

    def _pace(self, records: int) -> None:
        """When the next UDP data message may leave: spread what is queued over what is left of
        the pacing window, and no faster than maxMessagesPerSecond."""
        now = time.monotonic()
        gap = self._min_gap
        if self._pace_window:
            with self._cond:
                remaining = self._queued - self._head_sent  # records still to send, this message's excluded
            left = self._pace_deadline - now
            if remaining > 0 and left > 0:
                gap = max(gap, left * records / (remaining + records))
        self._next_send = now + gap if gap else 0.0


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
                 transport_factory: Callable = make_transport, pace_window: float = 0.0, cursors=None):
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
        self.cursors = cursors
        self._next_serial = 1  # batch numbers; 0 in a cursor means "nothing sent"
        self._plain: dict[int, tuple] = {}  # serial -> the batch as plain data, made once for the journal
        all_templates = [ft.template for ft in self.flow_templates] + self.options.templates
        self.sessions: list[CollectorSession] = []
        try:
            for collector in collectors:
                self.sessions.append(CollectorSession(collector, all_templates, self.options, lambda: self.stats,
                                                      observation_domain_id, reconnect_initial, reconnect_max,
                                                      transport_factory, pace_window, cursors))
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
        return self._encode(*self._partition(records))[0]

    def _encode(self, parts: dict, left: list) -> tuple[tuple, tuple]:
        """The groups, and per group the records behind its bytes, in the same order."""
        if left:
            self._count_unselected(left)
        groups = []
        sources = []
        for index, (ft, packers, fixed) in enumerate(zip(self.flow_templates, self._packers, self._fixed)):
            encoded = []
            behind: list = []
            for version, pack in packers.items():  # IPv4 records first, then IPv6
                chosen = parts.get((index, version))
                if chosen:
                    encoded += pack(chosen)
                    behind += chosen
            if encoded:
                groups.append((ft.template.id, encoded, fixed))
                sources.append(behind)
        return tuple(groups), tuple(sources)

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
            groups, sources = self._encode(parts, left)
            batch = Batch(self._next_serial, groups, sources, len(chosen), sum(r.packets for r in chosen),
                          sum(r.octets for r in chosen))
            self._next_serial += 1
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

    def release(self) -> None:
        """Everything exported so far is journaled: the senders may send it."""
        for session in self.sessions:
            session.release(self._next_serial - 1)

    def counters(self) -> dict[str, ExportCounters]:
        """Per collector (transport://address): messages, records, octets sent; flows etc. not sent."""
        return {s.name: s.counters for s in self.sessions}

    # -- journal ---------------------------------------------------------------------

    def _templates_state(self) -> dict[int, bytes]:
        return {ft.template.id: ft.template.record() for ft in self.flow_templates}

    def journal_state(self) -> dict:
        """What the collectors have not got yet, as plain data (batches once, however many
        sessions queue them), and the totals it holds: (flows, packets, octets)."""
        sessions = []
        live: dict[int, Batch] = {}
        for session in self.sessions:
            batches, position = session.pending()
            sessions.append((session.name, session.slot, [b.serial for b in batches], position))
            for batch in batches:
                live[batch.serial] = batch
        plain = {}
        for serial, batch in live.items():
            if serial not in self._plain:
                self._plain[serial] = (
                    [(tid, records, fixed) for tid, records, fixed in batch.groups],
                    [[(r.packets, r.octets) for r in records] for records in batch.sources],
                    (batch.flows, batch.packets, batch.octets))
            plain[serial] = self._plain[serial]
        self._plain = plain
        return {"next_serial": self._next_serial, "templates": self._templates_state(), "batches": plain,
                "sessions": sessions}

    def restore(self, state: dict, cursors_at_start: dict | None = None) -> tuple[int, dict[str, int]]:
        """Queue the batches of ``state`` (``journal_state()`` of an earlier exporter) again, each for
        the collector it was meant for, from where that collector got: the journaled position, or
        the cursor its sender wrote after the journal (``cursors_at_start``: slot -> (serial, position)).

        Returns the flows requeued, and the flows that are not, per reason: no_collector (the
        collector is no longer configured) -- counted by the caller, since no session is left to
        count them; not_resumable (a template changed) and in_doubt (being sent when the agent was
        killed) are counted in that collector's counters too.
        """
        self._next_serial = max(self._next_serial, state["next_serial"])
        templates = self._templates_state()
        same = {tid for tid, record in state["templates"].items() if templates.get(tid) == record}
        batches = {serial: self._batch_from(serial, plain) for serial, plain in state["batches"].items()}
        by_name = {session.name: session for session in self.sessions}
        requeued = 0
        lost: collections.Counter = collections.Counter()
        for name, slot, serials, position in state["sessions"]:
            session = by_name.get(name)
            cursor = (cursors_at_start or {}).get(slot)
            resume = []
            for index, serial in enumerate(serials):
                batch = batches[serial]
                start = tuple(position) if index == 0 else (0, 0)
                if cursor is not None and cursor[0] > serial:
                    continue  # sent after the journal was written
                if cursor is not None and cursor[0] == serial:
                    done, sending = tuple(cursor[1]), tuple(cursor[2])
                    start = max(start, done)
                    if sending > start:  # the agent died around the send of these: maybe sent, maybe not
                        doubt = batch.tally(start, sending)
                        lost["in_doubt"] += doubt[0]
                        if session is not None:
                            session.counters.not_sent("in_doubt", *doubt)
                            log.warning("%s: %d flows (%d packets, %d octets) were being sent when the agent "
                                        "was killed: the collector may or may not have them; they are not "
                                        "sent again", name, *doubt)
                        start = sending
                if start >= batch.end:
                    continue
                if session is None:
                    lost["no_collector"] += batch.tally(start, batch.end)[0]
                    continue
                kept, dropped = self._resumable(batch, start, same)
                if dropped[0]:
                    session.counters.not_sent("not_resumable", *dropped)
                    lost["not_resumable"] += dropped[0]
                if kept is not None:
                    resume.append(kept)
                    requeued += kept[0].tally(kept[1], kept[0].end)[0]
            if session is not None:
                session.restore(resume)
        return requeued, dict(lost)

    @staticmethod
    def _batch_from(serial: int, plain: tuple) -> Batch:
        groups, sources, (flows, packets, octets) = plain
        return Batch(serial, tuple((tid, list(records), fixed) for tid, records, fixed in groups),
                     tuple([Tally(*pair) for pair in records] for records in sources), flows, packets, octets)

    @staticmethod
    def _resumable(batch: Batch, start: Position, same: set[int]) -> tuple[tuple | None, tuple[int, int, int]]:
        """``batch`` from ``start`` without the groups of templates this exporter no longer has
        (emptied, so positions keep their meaning), and the tally of what was taken out."""
        if all(group[0] in same for group in batch.groups[start[0]:]):
            return (batch, start), (0, 0, 0)
        groups, sources = list(batch.groups), list(batch.sources)
        dropped = (0, 0, 0)
        for index in range(start[0], len(groups)):
            if groups[index][0] not in same:
                lo = start[1] if index == start[0] else 0
                lost = batch.tally((index, lo), (index + 1, 0))
                dropped = tuple(a + b for a, b in zip(dropped, lost))
                groups[index] = (groups[index][0], [], groups[index][2])
                sources[index] = []
        left = batch.tally(start, batch.end)
        if left[0] == dropped[0]:
            return None, dropped
        kept = Batch(batch.serial, tuple(groups), tuple(sources), batch.flows - dropped[0],
                     batch.packets - dropped[1], batch.octets - dropped[2])
        return (kept, start), dropped

    def free_cursors(self) -> None:
        if self.cursors is not None:
            for session in self.sessions:
                self.cursors.free(session.slot)

    def close(self, timeout: float = 5.0, keep: bool = False) -> None:
        """Send what is queued (waiting at most ``timeout`` s in all), withdraw TCP templates, stop.
        With ``keep``, what is left stays queued for ``journal_state()`` instead of being counted."""
        deadline = time.monotonic() + timeout
        for session in self.sessions:
            session.close(timeout)
        for session in self.sessions:
            session.join(max(deadline - time.monotonic(), 0) + 0.5, keep)
            if self.cursors is not None and not keep:
                self.cursors.free(session.slot)
        if self._own_resolver is not None:
            self._own_resolver.close()
