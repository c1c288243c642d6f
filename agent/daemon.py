"""``kipfix agent``: the standalone metering and export daemon.

One loop: every drain interval, swap and drain the kernel tables into the
flow cache, expire what ended and hand the records to the sinks. Signals
only set flags; the loop acts on them between cycles, so a reload or a
shutdown never races a drain.

- SIGHUP reloads the file and applies only the difference. Nothing that goes
  wrong in a reload -- reading, parsing, checking against the host
  (config.resolve), building the new exporters, attaching -- stops the
  agent: it is logged with the file and key, counted in
  ``kipfix_agent_reload_failures_total``, and the running configuration
  keeps metering and exporting. New parts are built before old ones are
  torn down, so a failure half-way leaves the running configuration whole.
- At start, every configuration mistake is found before the BPF program is
  loaded or anything is pinned (exit code 2).
- SIGTERM/SIGINT drains once more, ends every cached flow (forced end),
  exports, and detaches (unless --keep-attached: then the filters and pinned
  tables stay, and a restarted agent picks up what was counted meanwhile).

Crash safety (flows/journal.py): a cycle reads the kernel table without
deleting, updates the cache, hands records to the sinks, commits the
journal, and only then lets the senders send and deletes the flows from
the kernel. A restarted agent (after kill -9 too) takes the cache and the
unsent records from the journal, clears the kernel table the journal
already holds or reads the one it does not, and goes on.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
import time
from dataclasses import replace
from typing import Sequence

from .config import AgentConfig, ConfigError, changed_keys, check_reload, load_config
from .config.resolve import resolve_config
from .flows.record import EndReason, FlowCounters, FlowKey, FlowRecord
from .flows.cache import FlowCache, wall_offset_ns
from .flows.gcpause import gc_paused
from .flows.journal import Journal, JournalError, JournalState, PinPathInUse, SendCursors, journal_path
from .datapath.meter import Meter
from .datapath.netnsids import STATE_DIR, NetnsIds, default_path
from .export.sink import FlowSink, MeteringStats

_COUNTER_FIELDS = tuple(f.name for f in dataclasses.fields(FlowCounters))

log = logging.getLogger("kipfix.agent")

# UDP messages of one drain are spread over this part of the drain interval: done before the next one
PACE_FRACTION = 0.8
LOST_REASONS = {"no_collector": "their collector is no longer configured",
                "not_resumable": "their template changed",
                "in_doubt": "they were being sent when the agent was killed (the collector may have them)"}


class FanoutSink:
    """Hands every batch to each configured sink; carries their journal state by name."""

    def __init__(self, sinks: dict[str, FlowSink] | Sequence[FlowSink]):
        self.named = dict(sinks) if isinstance(sinks, dict) else {str(i): sink for i, sink in enumerate(sinks)}
        self.sinks = list(self.named.values())

    def export(self, records, stats) -> None:
        for sink in self.sinks:
            try:
                sink.export(records, stats)
            except Exception:  # one broken sink must not stop metering or the others
                log.exception("sink %s failed to export %d records", type(sink).__name__, len(records))

    def release(self) -> None:
        """What was exported is journaled: sinks that hold records back may send them."""
        for sink in self.sinks:
            release = getattr(sink, "release", None)
            if release is not None:
                release()

    def journal_state(self) -> dict:
        return {name: sink.journal_state() for name, sink in self.named.items() if hasattr(sink, "journal_state")}

    def restore(self, states: dict, cursors_at_start: dict | None = None) -> tuple[int, dict[str, int]]:
        """Give each sink its state from the journal; (records requeued, records lost per reason)."""
        requeued, lost = 0, {}
        for name, state in states.items():
            sink = self.named.get(name)
            if name == "ipfix" and sink is None:  # collectors all gone from the configuration
                left = sum(len(serials) for _n, _s, serials, _p in state["sessions"])
                if left:
                    lost["no_collector"] = sum(plain[2][0] for plain in state["batches"].values())
                continue
            if sink is None or not hasattr(sink, "restore"):
                continue
            try:
                result = sink.restore(state, cursors_at_start) if name == "ipfix" else sink.restore(state)
            except Exception:  # noqa: BLE001 - a state it cannot take is lost, not fatal
                log.exception("sink %s cannot take its journaled state; it is dropped", name)
                continue
            if name == "ipfix":
                requeued += result[0]
                for reason, count in result[1].items():
                    lost[reason] = lost.get(reason, 0) + count
        return requeued, lost

    def queued_flows(self) -> int:
        """Flow records the sinks still hold for some collector (the most any one collector waits for)."""
        return max((s.queued_flows for sink in self.sinks for s in getattr(sink, "sessions", ())), default=0)

    def free_cursors(self) -> None:
        """After ``close(keep=True)`` and a restore elsewhere: the senders' cursor slots are free."""
        for sink in self.sinks:
            if hasattr(sink, "free_cursors"):
                sink.free_cursors()

    def close(self, keep: bool = False) -> None:
        """Close every sink; with ``keep``, what an IPFIX exporter did not send stays in its
        ``journal_state`` instead of being counted as not sent."""
        for sink in self.sinks:
            try:
                if keep and hasattr(sink, "journal_state"):
                    sink.close(keep=True)
                else:
                    sink.close()
            except Exception:
                log.exception("closing sink %s failed", type(sink).__name__)


def build_sink(config: AgentConfig, pod_index=None, cursors: SendCursors | None = None) -> FanoutSink:
    """The configured sinks; ``pod_index`` (podmeta.PodIndex) fills the IPFIX pod elements;
    with ``cursors``, IPFIX batches wait for the journal (``release``).

    ConfigError names the output that cannot be opened; nothing stays open then.
    """
    sinks: dict[str, FlowSink] = {}
    try:
        if config.json_lines:
            from .export.jsonlines import JsonLinesSink
            try:
                sinks["jsonlines"] = JsonLinesSink(config.json_lines, config.json_lines_mode)
            except OSError as err:
                raise ConfigError(f"jsonLines: cannot open {config.json_lines!r}: {err.strerror}") from None
        if config.collectors:
            from .export.ipfix.exporter import IpfixExporter
            from .metrics import metered_transport
            try:
                # metered: per-collector send errors, templates sent and last send time for the metrics
                sinks["ipfix"] = IpfixExporter(config.collectors, config.templates, config.observation_domain_id,
                                               enterprise_number=config.enterprise_number, pod_lookup=pod_index,
                                               transport_factory=metered_transport,
                                               pace_window=PACE_FRACTION * config.drain_interval, cursors=cursors)
            except (OSError, ValueError) as err:
                raise ConfigError(f"collectors: cannot start exporting: {err}") from None
    except BaseException:
        FanoutSink(sinks).close()
        raise
    if not sinks:
        log.warning("no collectors and no jsonLines output configured: flows are metered but not exported")
    return FanoutSink(sinks)


def _export_settings(config: AgentConfig) -> tuple:
    return (config.collectors, config.templates, config.observation_domain_id, config.enterprise_number,
            config.json_lines, config.json_lines_mode)


class Agent:
    def __init__(self, config: AgentConfig, config_path: str | None = None, keep_attached: bool = False,
                 pod_index=None):
        from .datapath.attachments import AttachmentManager

        self.config = config
        self.pod_index = pod_index  # podmeta.PodIndex (Kubernetes): pod elements of IPFIX records
        self.config_path = config_path
        self.keep_attached = keep_attached
        # Before anything is loaded: a second agent on this pin path is refused (PinPathInUse).
        path = journal_path(STATE_DIR, config.pin_path)
        self.cursors = SendCursors(path + ".sent")
        self.journal = Journal(path)
        self.journal_errors = 0  # commits that failed: the cycles they covered were not crash-safe
        self._checkpoint_next = True  # the first commit (the recovery cycle's) writes everything
        self.recovered = {"flows": 0, "records": 0}  # carried over from the journal at start
        self.lost: dict[str, int] = {}  # flows the journal could not carry over, per reason
        try:
            # The exporters first: one that cannot start (ConfigError) must leave nothing loaded or pinned.
            self.sink = build_sink(config, self.pod_index, self.cursors)
        except BaseException:
            self.cursors.close()
            raise
        try:
            self.meter = Meter(config.max_flows, config.pin_path)
        except BaseException:
            self.sink.close()
            self.cursors.close()
            raise
        self.netns_ids = NetnsIds(default_path(config.pin_path))
        self.cache = FlowCache(config.timeouts.idle, config.timeouts.active, config.max_flows,
                               describe=self._describe)
        self.attachments = AttachmentManager(self.meter, self.netns_ids)
        self.attachments.apply(self.desired_interfaces(config))
        self.ended_netns: set[int] = set()  # netns ids whose flows end at the next drain (a deleted pod's)
        self._wake = threading.Event()  # the loop sleeps on this between drains
        self._stopping = threading.Event()
        self._reload = threading.Event()
        self._unmetered = self.meter.tables.unmetered()
        self._unmetered_ms = self._unmetered_wall_ms()
        self.observed_packets = self.observed_octets = self.exported_flows = 0
        self.generation = 1
        self.metrics = None  # metrics.AgentMetrics when metrics are served
        self._restored_held: list = []  # journaled held flows, for the first cycle
        self._recover()

    # -- crash safety ------------------------------------------------------------

    def _recover(self) -> None:
        """Take over from a killed agent: its cache and unsent records from the journal, and what
        it left in tables no program writes."""
        try:
            state = self.journal.load()
        except JournalError as err:
            flows, packets, octets = err.lost
            log.error("%s: starting without it; %d flows (%d packets, %d octets) it held are lost", err,
                      flows, packets, octets)
            self._count_lost("journal_unreadable", flows)
            state = None
        held = []
        if state is not None:
            self.attachments.remember_names(state.names)
            self.recovered["flows"] = self.cache.restore(state.cache)
            held = [(netns_id, FlowKey(*key), FlowCounters(*counters)) for netns_id, key, counters in state.held]
            self.recovered["records"], lost = self.sink.restore(state.sinks, self.cursors.at_start)
            for reason, flows in lost.items():
                log.warning("journal: %d flow records queued for collectors before the restart are not sent: %s",
                            flows, LOST_REASONS.get(reason, reason))
                if reason == "no_collector":
                    self._count_lost(reason, flows)
            log.info("journal: carried over %d cached flows, %d held flows and %d records for collectors",
                     self.recovered["flows"], len(held), self.recovered["records"])
        taken = self.meter.take_inactive(set(state.maps) if state is not None else set())
        self.restore_held(held)
        self._drain(taken=taken)

    def _count_lost(self, reason: str, flows: int) -> None:
        if flows:
            self.lost[reason] = self.lost.get(reason, 0) + flows

    def held_flows(self) -> list:
        """Drained flows a filter holds back for the next drain (the Kubernetes agent's veth dedup)."""
        return []

    def restore_held(self, flows: list) -> None:
        """Journaled held flows: hold them again (here: nothing holds flows, they are metered now)."""
        self._restored_held = flows

    def _commit(self, taken: list) -> None:
        """Journal this cycle: a delta of the cache (what the drain changed), or a checkpoint of all of it
        when the log has grown (or the last commit failed)."""
        held = [(netns_id, tuple(key), tuple(getattr(counters, f) for f in _COUNTER_FIELDS))
                for netns_id, key, counters in self.held_flows()]
        maps = tuple(t.map_id for t in taken)
        totals = tuple(self.cache.held)
        try:
            sinks = self.sink.journal_state()
            names = self.attachments.known_names()  # the kernel and the cache know only ifindexes
            if self._checkpoint_next or self.journal.due():
                self._checkpoint_next = True  # until one succeeds: a delta would miss what this one took
                self.journal.checkpoint(JournalState(maps, self.cache.snapshot(), held, sinks, totals, names))
                self._checkpoint_next = False
            else:
                changed, removed = self.cache.take_changes()
                self._checkpoint_next = True
                self.journal.append(JournalState(maps, changed, held, sinks, totals, names, removed))
                self._checkpoint_next = False
        except Exception as err:  # noqa: BLE001 - crash safety is lost for this cycle; metering goes on
            self.journal_errors += 1
            if self.journal_errors == 1 or self.journal_errors % 600 == 0:
                log.error("cannot write the journal %s: %s (%d cycles so far); a crash now loses the flow "
                          "cache and queued records", self.journal.path,
                          getattr(err, "strerror", None) or err, self.journal_errors,
                          exc_info=not isinstance(err, OSError))
            return
        self.cursors.committed()

    # -- signals and control -----------------------------------------------------

    def request_stop(self, *_args) -> None:
        self._stopping.set()
        self._wake.set()

    def request_reload(self, *_args) -> None:
        self._reload.set()
        self._wake.set()

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        signal.signal(signal.SIGHUP, self.request_reload)

    # -- the loop ----------------------------------------------------------------

    def _describe(self, netns_id: int, ifindex: int) -> tuple[str, str]:
        return self.netns_ids.label(netns_id), self.attachments.ifname(netns_id, ifindex)

    def stats(self) -> MeteringStats:
        packets, octets = self._unmetered
        first_ms, last_ms = self._unmetered_ms
        return MeteringStats(observed_packets=self.observed_packets, observed_octets=self.observed_octets,
                             exported_flows=self.exported_flows, ignored_packets=packets, ignored_octets=octets,
                             ignored_first_ms=first_ms, ignored_last_ms=last_ms,
                             observation_points=tuple(self.attachments.observation_points()))

    def _unmetered_wall_ms(self) -> tuple[int, int]:
        """Wall-clock ms of the first and last packet a full kernel table could not meter; (0, 0) for none."""
        times = self.meter.tables.unmetered_times()
        if times is None:
            return 0, 0
        offset = wall_offset_ns()
        return (times[0] + offset) // 1_000_000, (times[1] + offset) // 1_000_000

    def desired_interfaces(self, config: AgentConfig) -> tuple:
        """What to attach to: the config's selections (the Kubernetes agent adds its pods')."""
        return config.interfaces

    def deduplicate(self, flows: list, final: bool) -> list:
        """Flows metered twice on one path, left out (the Kubernetes agent's pod veths)."""
        return flows

    def cycle(self, final: bool = False) -> list[FlowRecord]:
        """One drain: swap, read, update the cache, export, journal, clear."""
        return self._drain(final)

    def _drain(self, final: bool = False, taken: list | None = None) -> list[FlowRecord]:
        """A cycle on ``taken`` (tables already read, at start) or on a swap now."""
        started = time.monotonic()
        if taken is None:
            taken = self.meter.take()
        flows = [flow for table in taken for flow in table.flows]
        if self.metrics is not None:
            self.metrics.drained(flows)
        for _netns_id, _key, counters in flows:
            self.observed_packets += counters.packets
            self.observed_octets += counters.octets
        restored, self._restored_held = self._restored_held, []
        flows = self.deduplicate(restored + flows, final)
        with gc_paused():  # one record per flow, all alive until exported: nothing for the GC to find
            records = self.cache.ingest(flows)
            records += self.cache.expire()  # even at shutdown, a flow that ended says how it ended
            if final:
                records += self.cache.flush(EndReason.FORCED_END)
            elif self.ended_netns:  # detached before this drain: nothing of them is left in the kernel
                ended, self.ended_netns = self.ended_netns, set()
                records += self.cache.flush(EndReason.FORCED_END, match=lambda netns_id, _key: netns_id in ended)
                for netns_id in ended:
                    self.attachments.release_soon(netns_id)
        unmetered = self.meter.tables.unmetered()
        if unmetered != self._unmetered:
            log.warning("flow table full (maxFlows %d): %d packets / %d octets not metered since the last "
                        "drain (%d / %d in total); raise maxFlows or shorten drainInterval",
                        self.config.max_flows, unmetered[0] - self._unmetered[0],
                        unmetered[1] - self._unmetered[1], *unmetered)
            self._unmetered = unmetered
            self._unmetered_ms = self._unmetered_wall_ms()
        if records:
            self.exported_flows += len(records)
            self.sink.export(records, self.stats())
            if self.metrics is not None:
                self.metrics.exported(records)
        # The journal holds the cache, the records and which tables they came from before the
        # senders may send and before the flows leave the kernel: a kill between any two steps
        # loses nothing and sends nothing twice.
        self._commit(taken)
        self.sink.release()
        self.meter.clear(taken)
        if self.metrics is not None:
            self.metrics.cycle_done(time.monotonic() - started)
        return records

    def run(self) -> None:
        next_drain = time.monotonic() + self.config.drain_interval
        while True:
            self._wake.wait(max(0.0, next_drain - time.monotonic()))
            self._wake.clear()  # before reading the flags: one set after this wakes the next wait
            if self._reload.is_set():
                self._reload.clear()
                self.reload()
            if self._stopping.is_set():
                break
            if time.monotonic() < next_drain:  # woken early (a reload)
                continue
            next_drain += self.config.drain_interval
            if next_drain < time.monotonic():  # fell behind (e.g. a slow drain): don't burst
                next_drain = time.monotonic() + self.config.drain_interval
            self.cycle()
        self.shutdown()

    def shutdown(self) -> None:
        # Detach before the last drain: a packet metered after the drain would be counted and never exported.
        if self.keep_attached:
            log.info("leaving filters and pinned tables in place (--keep-attached)")
        else:
            self.attachments.detach_all()
        records = self.cycle(final=True)
        log.info("stopping: exported %d flows at shutdown (forced end)", len(records))
        # What a collector did not take in time stays in the journal for the next agent on this pin path.
        self.sink.close(keep=True)
        self._commit([])
        left = self.sink.queued_flows()
        if left:
            log.warning("stopping: %d flow records a collector did not take are kept in the journal %s for "
                        "the next agent", left, self.journal.path)
        self.cursors.close()
        self.journal.close()
        if not self.keep_attached:
            self.netns_ids.forget_all()  # no filter carries these ids any more
        self.attachments.close()
        self.meter.close()

    # -- reload --------------------------------------------------------------------

    def reload(self) -> bool:
        """Re-read the file and apply it; any failure is reported and the running configuration stays."""
        try:
            new = load_config(self.config_path, reloading=True)
            check_standalone(new, self.config_path)
            try:
                check_reload(self.config, new)
            except ConfigError as err:
                raise ConfigError(f"{self.config_path}: {err}") from None
            resolve_config(new, self.config_path)
            self.apply(new)
        except ConfigError as err:
            self.reload_failed(str(err))
            return False
        except Exception as err:  # noqa: BLE001 -- a reload must never take the agent down
            log.exception("unexpected error while reloading %s", self.config_path)
            self.reload_failed(f"{self.config_path}: {type(err).__name__}: {err}")
            return False
        return True

    def reload_failed(self, message: str) -> None:
        log.error("reload failed, keeping the running configuration: %s", message)
        if self.metrics is not None:
            self.metrics.reload_failed()

    def apply(self, new: AgentConfig) -> None:
        """Apply only what changed; counts in the kernel and the cache stay.

        The new exporters are built before anything changes and the old ones
        closed only at the end, so an exception (ConfigError when an output
        cannot be opened) leaves the running configuration in force.
        """
        old = self.config
        for key in ("max_flows", "pin_path", "metrics"):
            if getattr(new, key) != getattr(old, key):
                log.warning("%s changed (%s -> %s): takes effect when the agent restarts",
                            key, getattr(old, key), getattr(new, key))
                new = replace(new, **{key: getattr(old, key)})
        sink = build_sink(new, self.pod_index, self.cursors) if _export_settings(new) != _export_settings(old) \
            else None
        if new.interfaces != old.interfaces:
            try:
                self.attachments.apply(self.desired_interfaces(new))
            except BaseException:
                if sink is not None:
                    sink.close()
                self.attachments.apply(self.desired_interfaces(old))
                raise
        if new.timeouts != old.timeouts:
            self.cache.idle_ns = int(new.timeouts.idle * 1e9)
            self.cache.active_ns = int(new.timeouts.active * 1e9)
        if sink is not None:
            self.sink, old_sink = sink, self.sink
            old_sink.close(keep=True)
            # what the old exporter did not send goes on with the new one, to the collectors still there
            _requeued, lost = sink.restore(old_sink.journal_state())
            for reason, flows in lost.items():
                log.warning("reload: %d flow records queued for collectors are not sent: %s", flows,
                            LOST_REASONS.get(reason, reason))
                if reason == "no_collector":
                    self._count_lost(reason, flows)
            old_sink.free_cursors()
        changed = changed_keys(old, new)
        self.config = new
        self.generation += 1
        log.info("configuration generation %d applied (changed: %s)", self.generation, ", ".join(changed) or "nothing")


def check_standalone(config: AgentConfig, path: str | None) -> None:
    if config.pods:
        raise ConfigError(f"{path}: pods: only `kipfix agent --kubernetes` meters pods (it watches the API "
                          "for them); standalone, select their interfaces under interfaces with netns")


def run_agent(config_path: str, keep_attached: bool = False, metrics_config: str | None = None) -> int:
    """``metrics_config``: a file whose ``metrics:`` section replaces the config's (the chart's TLS and
    authentication settings)."""
    from .config import load_metrics_config
    from .config.resolve import resolve_metrics

    try:
        config = load_config(config_path)
        check_standalone(config, config_path)
        if metrics_config:
            config = replace(config, metrics=load_metrics_config(metrics_config))
        resolve_config(config, config_path)
        if config.metrics.enabled:
            resolve_metrics(config.metrics, metrics_config or config_path)
    except ConfigError as err:
        log.error("%s", err)
        return 2
    try:
        agent = Agent(config, config_path, keep_attached=keep_attached)
    except ConfigError as err:  # an output that could not be opened after all
        log.error("%s: %s", config_path, err)
        return 2
    except PinPathInUse as err:
        log.error("%s", err)
        return 2
    if config.metrics.enabled:
        from .metrics import start_agent_metrics
        start_agent_metrics(agent, config.metrics.address, config.metrics.port, tls=config.metrics.tls,
                            basic_auth=config.metrics.basic_auth)
    agent.install_signal_handlers()
    log.info("kipfix agent running: %d interface selections, drain every %gs, idle %gs, active %gs",
             len(config.interfaces), config.drain_interval, config.timeouts.idle, config.timeouts.active)
    agent.run()
    return 0
