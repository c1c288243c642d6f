"""Prometheus metrics of the agent (prefix ``kipfix_agent_``).

Two kinds of numbers:

- Numbers that live elsewhere -- the kernel tables and the loss counter in
  BPF maps, the flow cache, the exporter's per-collector counters, the
  attachments, bpf_stats of the programs -- are read when Prometheus scrapes,
  by ``AgentCollector``: nothing copies them in the background.
- Numbers only the drain loop sees -- packets and bytes drained per
  interface and direction, flows exported per end reason, reload failures,
  drain durations -- are counted by the loop through ``AgentMetrics``.

Labels are bounded: per interface (and netns, direction), per collector, per
end reason, per error reason; never per flow. Series of interfaces that went
away are dropped after ``STALE_SERIES_SECONDS``, so pod churn does not grow
memory forever.

Per-collector send errors, templates sent and the last successful send are
counted by ``MeteredTransport``, which wraps each collector's transport when
the daemon builds its exporter (``transport_factory=metered_transport``).
"""

from __future__ import annotations

import collections
import errno
import logging
import ssl
import struct
import threading
import time
from typing import Any, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .datapath import bpfsys
from .flows.record import DIRECTION_NAMES, EndReason

log = logging.getLogger("kipfix.metrics")

PREFIX = "kipfix_agent_"
BPF_STATS_PATH = "/proc/sys/kernel/bpf_stats_enabled"
STALE_SERIES_SECONDS = 3600.0  # observed-traffic series of a detached interface are dropped after this
PRUNE_EVERY_SECONDS = 60.0
DRAIN_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
END_REASONS = tuple(reason.name.lower() for reason in EndReason)


# ---- per-collector transport instrumentation ------------------------------------

_SET_HEADER = struct.Struct("!HH")
_TEMPLATE_SET_ID, _OPTIONS_TEMPLATE_SET_ID = 2, 3
_MESSAGE_HEADER_LENGTH = 16


def template_records(message: bytes) -> int:
    """Template and options template records in an IPFIX message (withdrawals not counted)."""
    count = 0
    offset = _MESSAGE_HEADER_LENGTH
    end = len(message)
    while offset + 4 <= end:
        set_id, length = _SET_HEADER.unpack_from(message, offset)
        if length < 4:
            break
        if set_id in (_TEMPLATE_SET_ID, _OPTIONS_TEMPLATE_SET_ID):
            record = offset + 4
            set_end = min(offset + length, end)
            header = 6 if set_id == _OPTIONS_TEMPLATE_SET_ID else 4
            while record + 4 <= set_end:
                _template_id, fields = _SET_HEADER.unpack_from(message, record)
                if fields == 0:  # withdrawal (RFC 7011 8.1), or padding
                    record += 4
                    continue
                record += header
                for _ in range(fields):
                    if record + 4 > set_end:
                        break
                    element_id = _SET_HEADER.unpack_from(message, record)[0]
                    record += 8 if element_id & 0x8000 else 4
                count += 1
        offset += length
    return count


def error_reason(err: BaseException) -> str:
    """A short, bounded label for a transport error: errno name, ``tls``, ``timeout`` or ``other``."""
    cause = err.__cause__ or err
    if isinstance(cause, ssl.SSLError):
        return "tls"
    if isinstance(cause, TimeoutError) and not getattr(cause, "errno", None):
        return "timeout"
    code = getattr(err, "errno", None) or getattr(cause, "errno", None)
    if code:
        return errno.errorcode.get(code, f"errno{code}").lower()
    return "other"


class MeteredTransport:
    """Wraps an IPFIX transport; counts failed connects/sends by reason (an ICMP error about an
    earlier UDP message counts as a failed send), templates sent, and the time of the last
    message delivered. Otherwise transparent."""

    def __init__(self, inner: Any):
        self.inner = inner
        self._lock = threading.Lock()
        self._errors: collections.Counter[tuple[str, str]] = collections.Counter()
        self.templates_sent = 0

    @property
    def last_success(self) -> float:
        """Unix time of the last message delivered (UDP: sent, and no ICMP error came back for it
        in a moment); 0 before the first."""
        return self.inner.last_delivered

    @property
    def stream(self) -> bool:
        return self.inner.stream

    @property
    def connected(self) -> bool:
        return self.inner.connected

    def errors(self) -> dict[tuple[str, str], int]:
        """(operation, reason) -> count."""
        with self._lock:
            return dict(self._errors)

    def _count_error(self, operation: str, err: BaseException) -> None:
        with self._lock:
            self._errors[(operation, error_reason(err))] += 1

    def connect(self) -> None:
        try:
            self.inner.connect()
        except OSError as err:
            self._count_error("connect", err)
            raise

    def send(self, message: bytes) -> int | None:
        try:
            stream_end = self.inner.send(message)
        except OSError as err:
            self._count_error("send", err)
            raise
        templates = template_records(message)
        if templates:
            with self._lock:
                self.templates_sent += templates
        return stream_end

    def check(self, settle: float = 0.0) -> None:
        try:
            self.inner.check(settle)
        except OSError as err:
            self._count_error("send", err)
            raise

    def alive(self) -> bool:
        return self.inner.alive()

    def close(self) -> None:
        self.inner.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def metered_transport(config) -> "MeteredTransport":
    """Transport factory for IpfixExporter(transport_factory=...): the exporter's
    own transport, counted for the metrics from the first connect on."""
    from .export.ipfix.transport import make_transport

    return MeteredTransport(make_transport(config))


# ---- scrape-time collector ------------------------------------------------------

def bpf_stats_enabled(path: str = BPF_STATS_PATH) -> bool:
    try:
        with open(path, encoding="ascii") as handle:
            return handle.read().strip() not in ("", "0")
    except OSError:
        return False


def _counter(name: str, doc: str, labels: Iterable[str] = ()) -> CounterMetricFamily:
    return CounterMetricFamily(PREFIX + name, doc, labels=list(labels))


def _gauge(name: str, doc: str, labels: Iterable[str] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(PREFIX + name, doc, labels=list(labels))


class AgentCollector(Collector):
    """Reads the agent's state at scrape time. ``agent`` is a daemon.Agent (or
    anything with its attributes: meter, cache, sink, attachments, config,
    generation)."""

    def __init__(self, agent: Any, observed: "ObservedTraffic", bpf_stats_path: str = BPF_STATS_PATH):
        self.agent = agent
        self.observed = observed
        self.bpf_stats_path = bpf_stats_path

    def describe(self) -> list[Metric]:
        return [family for family, _ in self._families()]

    def collect(self) -> Iterator[Metric]:
        for family, fill in self._families():
            try:
                fill(family)
            except Exception:  # noqa: BLE001 -- one unreadable source must not fail the scrape
                log.debug("metric %s not collected", family.name, exc_info=True)
                continue
            yield family

    def _families(self) -> list[tuple[Metric, Any]]:
        iface = ("netns", "interface", "direction")
        return [
            (_counter("observed_packets", "Packets metered per interface and direction (as drained from the "
                      "kernel table)", iface), lambda f: self.observed.fill(f, 0)),
            (_counter("observed_bytes", "Octets metered per interface and direction: the IP packet, without "
                      "the link-layer header", iface), lambda f: self.observed.fill(f, 1)),
            (_gauge("kernel_flows", "Flows the last drain found in the kernel table: its occupancy over one "
                    "drain interval (compare with kernel_table_capacity)"),
             lambda f: f.add_metric([], self.agent.meter.tables.entries())),
            (_gauge("cache_flows", "Flows in the agent's flow cache (waiting for their end)"),
             lambda f: f.add_metric([], len(self.agent.cache))),
            (_gauge("kernel_table_capacity", "Flows the kernel table holds between two drains (maxFlows)"),
             lambda f: f.add_metric([], self.agent.meter.tables.capacity)),
            (_counter("not_metered_packets", "Packets the kernel could not meter because its flow table "
                      "was full"), lambda f: f.add_metric([], self._unmetered()[0])),
            (_counter("not_metered_bytes", "Octets of packets the kernel could not meter because its flow "
                      "table was full"), lambda f: f.add_metric([], self._unmetered()[1])),
            (_gauge("bpf_stats_enabled", "1 if the sysctl kernel.bpf_stats_enabled is on: only then do "
                    "bpf_run_* count (or while a tool holds a BPF_ENABLE_STATS fd)"),
             lambda f: f.add_metric([], int(bpf_stats_enabled(self.bpf_stats_path)))),
            (_counter("bpf_run_seconds", "Time the metering program ran while bpf_stats was on, per "
                      "direction; per packet: rate(this) / rate(kipfix_agent_bpf_runs_total)", ("direction",)),
             lambda f: self._bpf_stats(f, "run_time_ns", 1e-9)),
            (_counter("bpf_runs", "Runs of the metering program (one per packet) while bpf_stats was on, "
                      "per direction", ("direction",)), lambda f: self._bpf_stats(f, "run_cnt", 1)),
            (_counter("ipfix_messages", "IPFIX messages sent, per collector", ("collector",)),
             lambda f: self._per_session(f, lambda s: s.counters.messages)),
            (_counter("ipfix_records", "IPFIX data records sent (flows and options), per collector",
                      ("collector",)), lambda f: self._per_session(f, lambda s: s.counters.records)),
            (_counter("ipfix_bytes", "Octets of IPFIX messages sent, per collector", ("collector",)),
             lambda f: self._per_session(f, lambda s: s.counters.octets)),
            (_counter("ipfix_dropped_flows", "Flow records a collector did not get, per reason: queue_full, "
                      "too_large (exceeds maxMessageSize), refused (UDP: the collector's host answered ICMP "
                      "unreachable), unacknowledged (TCP/TLS: the connection died before the collector's TCP "
                      "acknowledged them), not_resumable (journaled across a restart, but the template "
                      "changed), in_doubt (being sent when the agent was killed: the collector may have "
                      "them; not sent again), not_sent_at_exit, error", ("collector", "reason")), self._dropped),
            (_counter("ipfix_unselected_flows", "Flow records no template selects (a template's select: IP "
                      "version, protocols): not exported to any collector"),
             lambda f: f.add_metric([], sum(e.unselected.flows for e in self._exporters()))),
            (_counter("ipfix_unselected_packets", "Packets of the flow records counted in ipfix_unselected_flows"),
             lambda f: f.add_metric([], sum(e.unselected.packets for e in self._exporters()))),
            (_gauge("ipfix_queued_flows", "Flow records waiting in a collector's queue", ("collector",)),
             lambda f: self._per_session(f, lambda s: s.queued_flows)),
            (_counter("ipfix_templates_sent", "Template and options template records sent, per collector",
                      ("collector",)), lambda f: self._per_transport(f, lambda t: t.templates_sent)),
            (_gauge("ipfix_last_export_timestamp_seconds", "Unix time of the last message sent to a "
                    "collector (0: none yet)", ("collector",)),
             lambda f: self._per_transport(f, lambda t: t.last_success)),
            (_counter("ipfix_send_errors", "Failed connects and sends, per collector, operation and reason "
                      "(errno name, tls, timeout)", ("collector", "operation", "reason")), self._send_errors),
            (_counter("ipfix_saturated_values", "Values sent as the largest a reduced-size element holds "
                      "(a template field NAME:OCTETS) because they were larger, per template and element",
                      ("template", "element")), self._saturated),
            (_gauge("ipfix_collector_connected", "1 while the TCP/TLS connection to a collector is up "
                    "(UDP collectors have no connection and no series)", ("collector",)),
             self._connected),
            (_gauge("interface_attached", "1 for every interface kipfix is attached to; 0 for one the "
                    "configuration names exactly that is not attached", ("netns", "interface")),
             self._attached),
            (_counter("deduplicated_packets", "Packets metered on the host side of a pod's veth and left out "
                      "because the pod's own interface metered them too (Kubernetes agent)"),
             lambda f: f.add_metric([], self.agent.dedup.dropped_packets)),
            (_counter("deduplicated_bytes", "Octets of the packets counted in deduplicated_packets"),
             lambda f: f.add_metric([], self.agent.dedup.dropped_octets)),
            (_gauge("pods_metered", "Pods of this node metered inside their network namespace (Kubernetes "
                    "agent), and those whose netns is not found yet", ("state",)), self._pods),
            (_counter("attach_errors", "Errors attaching or detaching interfaces and watching netns"),
             lambda f: f.add_metric([], self.agent.attachments.error_count)),
            (_gauge("config_generation", "Configuration generation applied (1 at start, +1 per reload "
                    "applied)"), lambda f: f.add_metric([], self.agent.generation)),
            (_counter("journal_write_errors", "Cycles whose journal could not be written: a crash in them "
                      "would lose the flow cache and the records queued for collectors"),
             lambda f: f.add_metric([], self.agent.journal_errors)),
            (_counter("journal_recovered_flows", "Flows carried over from the journal of a killed (or "
                      "stopped) agent at start: cached flows, and records queued for collectors",
                      ("part",)), self._recovered),
            (_counter("lost_flows", "Flows lost outside any collector's queue, per reason: "
                      "journal_unreadable (a damaged journal, or one of another version: what its header says it "
                      "held), no_collector (queued for a collector removed from the configuration by a restart "
                      "or reload)", ("reason",)), self._lost),
        ]

    # -- sources ------------------------------------------------------------------

    def _pods(self, family: GaugeMetricFamily) -> None:
        metering = self.agent.pod_metering
        unresolved = len(metering.unresolved())
        family.add_metric(["metered"], len(metering.metered) - unresolved)
        family.add_metric(["netns_not_found"], unresolved)

    def _unmetered(self) -> tuple[int, int]:
        return self.agent.meter.tables.unmetered()

    def _bpf_stats(self, family: CounterMetricFamily, field: str, scale: float) -> None:
        meter = self.agent.meter
        for direction, fd in (("ingress", meter.ingress_fd), ("egress", meter.egress_fd)):
            family.add_metric([direction], getattr(bpfsys.prog_info(fd), field) * scale)

    def _exporters(self) -> list:
        sinks = getattr(self.agent.sink, "sinks", [self.agent.sink])
        return [sink for sink in sinks if hasattr(sink, "unselected")]

    def _sessions(self) -> list:
        sinks = getattr(self.agent.sink, "sinks", [self.agent.sink])
        return [session for sink in sinks for session in getattr(sink, "sessions", ())]

    def _saturated(self, family: CounterMetricFamily) -> None:
        for sink in getattr(self.agent.sink, "sinks", [self.agent.sink]):
            if hasattr(sink, "saturated_values"):
                for (template_id, element), count in sorted(sink.saturated_values().items()):
                    family.add_metric([str(template_id), element], count)

    def _per_session(self, family: Metric, value) -> None:
        for session in self._sessions():
            family.add_metric([session.name], value(session))

    def _dropped(self, family: CounterMetricFamily) -> None:
        for session in self._sessions():
            for reason, flows in sorted(session.counters.not_sent_by_reason.items()):
                family.add_metric([session.name, reason], flows)

    def _recovered(self, family: CounterMetricFamily) -> None:
        family.add_metric(["cache"], self.agent.recovered["flows"])
        family.add_metric(["queued"], self.agent.recovered["records"])

    def _lost(self, family: CounterMetricFamily) -> None:
        for reason in ("journal_unreadable", "no_collector"):
            family.add_metric([reason], self.agent.lost.get(reason, 0))

    def _per_transport(self, family: Metric, value) -> None:
        for session in self._sessions():
            if isinstance(session.transport, MeteredTransport):
                family.add_metric([session.name], value(session.transport))

    def _send_errors(self, family: CounterMetricFamily) -> None:
        for session in self._sessions():
            if isinstance(session.transport, MeteredTransport):
                for (operation, reason), count in sorted(session.transport.errors().items()):
                    family.add_metric([session.name, operation, reason], count)

    def _connected(self, family: GaugeMetricFamily) -> None:
        for session in self._sessions():
            if session.transport.stream:
                family.add_metric([session.name], int(bool(session.transport.connected)))

    def _attached(self, family: GaugeMetricFamily) -> None:
        from .datapath.attachments import group_selections

        attached = {(a.netns, a.ifname) for a in self.agent.attachments.attached()}
        for netns, ifname in sorted(attached):
            family.add_metric([netns, ifname], 1)
        missing = set()
        for ref, selectors in group_selections(self.agent.config.interfaces).items():
            for selector in selectors:
                for name in selector.exact_names:
                    if (str(ref), name) not in attached:
                        missing.add((str(ref), name))
        for netns, ifname in sorted(missing):
            family.add_metric([netns, ifname], 0)


# ---- counted by the drain loop --------------------------------------------------

class ObservedTraffic:
    """Packets and octets drained, per (netns, interface, direction)."""

    def __init__(self, stale_after: float = STALE_SERIES_SECONDS):
        self.stale_after = stale_after
        self._lock = threading.Lock()
        self._totals: dict[tuple[str, str, str], list] = {}  # -> [packets, octets, last update (monotonic)]
        self._next_prune = time.monotonic() + PRUNE_EVERY_SECONDS

    def add(self, flows: Iterable[tuple[int, Any, Any]], describe) -> None:
        """Fold drained kernel flows ``(netns_id, key, counters)`` in; ``describe(netns_id, ifindex)``
        gives (netns label, interface name)."""
        grouped: dict[tuple[int, int, int], list[int]] = {}
        for netns_id, key, counters in flows:
            group = (netns_id, key.ifindex, key.direction)
            sums = grouped.get(group)
            if sums is None:
                grouped[group] = [counters.packets, counters.octets]
            else:
                sums[0] += counters.packets
                sums[1] += counters.octets
        if not grouped:
            return
        now = time.monotonic()
        with self._lock:
            for (netns_id, ifindex, direction), (packets, octets) in grouped.items():
                netns, ifname = describe(netns_id, ifindex)
                labels = (netns, ifname or f"#{ifindex}", DIRECTION_NAMES.get(direction, str(direction)))
                totals = self._totals.get(labels)
                if totals is None:
                    self._totals[labels] = [packets, octets, now]
                else:
                    totals[0] += packets
                    totals[1] += octets
                    totals[2] = now

    def prune(self, attached: set[tuple[str, str]], now: float | None = None) -> None:
        """Forget interfaces not in ``attached`` {(netns, ifname)} that saw nothing for ``stale_after``."""
        now = time.monotonic() if now is None else now
        with self._lock:
            for labels in [k for k, v in self._totals.items()
                           if (k[0], k[1]) not in attached and now - v[2] >= self.stale_after]:
                del self._totals[labels]

    def prune_due(self) -> bool:
        now = time.monotonic()
        if now < self._next_prune:
            return False
        self._next_prune = now + PRUNE_EVERY_SECONDS
        return True

    def fill(self, family: CounterMetricFamily, index: int) -> None:
        with self._lock:
            rows = sorted((labels, totals[index]) for labels, totals in self._totals.items())
        for labels, value in rows:
            family.add_metric(list(labels), value)


class AgentMetrics:
    """The agent's metrics in ``registry``: the drain loop calls ``drained``,
    ``exported``, ``cycle_done`` and ``reload_failed``; the rest is read at
    scrape time from ``agent``."""

    def __init__(self, registry: CollectorRegistry, agent: Any, bpf_stats_path: str = BPF_STATS_PATH):
        self.agent = agent
        self.observed = ObservedTraffic()
        self.collector = AgentCollector(agent, self.observed, bpf_stats_path)
        self.exported_flows = Counter(PREFIX + "exported_flows", "Flow records handed to the exporters, "
                                      "per end reason (flowEndReason)", ["end_reason"], registry=registry)
        for reason in END_REASONS:
            self.exported_flows.labels(reason)
        self.reload_failures = Counter(PREFIX + "reload_failures", "Reloads (SIGHUP) rejected because the "
                                       "new configuration was invalid", registry=registry)
        self.drain_duration = Histogram(PREFIX + "drain_duration_seconds", "Time of one drain cycle: swap and "
                                        "read the kernel table, update the cache, expire, hand records to the "
                                        "exporters", buckets=DRAIN_BUCKETS, registry=registry)
        registry.register(self.collector)
        self._exported = {reason: self.exported_flows.labels(reason.name.lower()) for reason in EndReason}

    def drained(self, flows: list) -> None:
        self.observed.add(flows, self.agent._describe)
        if self.observed.prune_due():
            self.observed.prune({(a.netns, a.ifname) for a in self.agent.attachments.attached()})

    def exported(self, records: list) -> None:
        for reason, count in collections.Counter(record.end_reason for record in records).items():
            self._exported[reason].inc(count)

    def cycle_done(self, seconds: float) -> None:
        self.drain_duration.observe(seconds)

    def reload_failed(self) -> None:
        self.reload_failures.inc()


def serve_metrics(address: str, port: int, registry: CollectorRegistry, tls=None, basic_auth=None):
    """Serve ``registry`` on http(s)://address:port/metrics from a daemon thread; returns the
    server (``shutdown()`` stops it). OSError (e.g. address in use) if it cannot listen, ValueError
    for TLS or password files that do not load."""
    from .metricshttp import serve

    return serve(address, port, registry, tls, basic_auth)


def start_agent_metrics(agent: Any, address: str, port: int, registry: CollectorRegistry | None = None,
                        tls=None, basic_auth=None) -> bool:
    """Count ``agent`` into ``registry`` (default: the global one, which adds process_* metrics) and
    serve it. A port that cannot be opened is reported; metering and export go on without metrics."""
    if registry is None:
        from prometheus_client import REGISTRY as registry
    where = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
    scheme = "https" if tls is not None else "http"
    try:
        serve_metrics(address, port, registry, tls, basic_auth)
    except (OSError, ValueError) as err:
        log.error("cannot serve metrics on %s: %s; running without metrics (set metrics.port, or "
                  "metrics.enabled: false)", where, getattr(err, "strerror", None) or err)
        return False
    agent.metrics = AgentMetrics(registry, agent)
    log.info("serving metrics on %s://%s/metrics%s%s", scheme, where,
             " (client certificates required)" if tls is not None and tls.client_ca else "",
             " (basic authentication)" if basic_auth is not None else "")
    return True
