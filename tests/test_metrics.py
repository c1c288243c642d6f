"""Agent metrics: every metric and its labels, read from a private registry."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import socket
import ssl
import time
import urllib.request
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry

from kipfix.agent.datapath import bpfsys
from kipfix.agent.datapath.attachments import Attached
from kipfix.agent.config import CollectorConfig, ConfigError, TemplateConfig, parse_config
from kipfix.agent.daemon import FanoutSink, build_sink
from kipfix.agent.flows.record import EGRESS, INGRESS, PROTO_UDP, EndReason, FlowCounters, FlowKey
from kipfix.agent.flows.cache import FlowCache
from kipfix.agent.collector.server import Collector
from kipfix.agent.export.ipfix.dummy import MINIMAL_TEMPLATE, dummy_records
from kipfix.agent.export.ipfix.exporter import IpfixExporter
from kipfix.agent.export.ipfix.session import ExportSession
from kipfix.agent.export.ipfix.transport import TransportError
from kipfix.agent.metrics import (AgentMetrics, MeteredTransport, ObservedTraffic, error_reason, metered_transport,
                                  serve_metrics, start_agent_metrics, template_records)
from kipfix.agent.export.sink import MeteringStats

P = "kipfix_agent_"


class FakeTables:
    capacity = 4096

    def __init__(self):
        self.kernel_entries = 0
        self.lost = (0, 0)

    def entries(self) -> int:
        return self.kernel_entries

    def unmetered(self) -> tuple[int, int]:
        return self.lost


class FakeAttachments:
    def __init__(self, attached=(), error_count=0):
        self._attached = list(attached)
        self.error_count = error_count

    def attached(self):
        return list(self._attached)


def make_agent(sink=None, attached=(), config=None, ingress_fd=-1, egress_fd=-1):
    names = {(1, 10): ("host", "eth0"), (2, 20): ("pod-a", "eth0")}
    return SimpleNamespace(
        meter=SimpleNamespace(tables=FakeTables(), ingress_fd=ingress_fd, egress_fd=egress_fd),
        cache=FlowCache(15, 60, 1000),
        sink=sink if sink is not None else FanoutSink([]),
        attachments=FakeAttachments(attached),
        config=config or parse_config({}),
        generation=1, journal_errors=0, recovered={"flows": 0, "records": 0}, lost={},
        _describe=lambda netns_id, ifindex: names.get((netns_id, ifindex), (f"netns#{netns_id}", "")))


@pytest.fixture
def registry():
    return CollectorRegistry()


def value(registry, name, **labels):
    return registry.get_sample_value(P + name, labels)


def kernel_flow(netns_id, ifindex, direction, packets, octets, sport=1000):
    key = FlowKey(ifindex, direction, 4, PROTO_UDP, bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]), sport, 53)
    now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    return netns_id, key, FlowCounters(packets, octets, now, now)


def test_observed_packets_and_bytes_per_interface_and_direction(registry):
    metrics = AgentMetrics(registry, make_agent())
    metrics.drained([kernel_flow(1, 10, INGRESS, 3, 300), kernel_flow(1, 10, INGRESS, 2, 100, sport=1001),
                     kernel_flow(1, 10, EGRESS, 1, 60), kernel_flow(2, 20, INGRESS, 7, 700),
                     kernel_flow(5, 7, EGRESS, 4, 400)])
    metrics.drained([kernel_flow(1, 10, INGRESS, 10, 1000)])
    assert value(registry, "observed_packets_total", netns="host", interface="eth0", direction="ingress") == 15
    assert value(registry, "observed_bytes_total", netns="host", interface="eth0", direction="ingress") == 1400
    assert value(registry, "observed_packets_total", netns="host", interface="eth0", direction="egress") == 1
    assert value(registry, "observed_bytes_total", netns="host", interface="eth0", direction="egress") == 60
    assert value(registry, "observed_packets_total", netns="pod-a", interface="eth0", direction="ingress") == 7
    # An interface whose name is no longer known keeps its ifindex.
    assert value(registry, "observed_packets_total", netns="netns#5", interface="#7", direction="egress") == 4
    assert value(registry, "observed_packets_total", netns="host", interface="eth0", direction="nowhere") is None


def test_series_of_a_detached_interface_are_dropped_once_stale():
    observed = ObservedTraffic(stale_after=100)
    describe = lambda netns_id, ifindex: ("host", f"if{ifindex}")  # noqa: E731
    observed.add([kernel_flow(1, 1, INGRESS, 1, 10), kernel_flow(1, 2, INGRESS, 1, 10)], describe)
    now = time.monotonic()
    observed.prune({("host", "if1")}, now=now + 50)
    assert len(observed._totals) == 2  # if2 is detached, but not stale yet
    observed.prune({("host", "if1")}, now=now + 101)
    assert [labels for labels in observed._totals] == [("host", "if1", "ingress")]


def test_kernel_table_cache_and_loss_are_read_at_scrape_time(registry):
    agent = make_agent()
    AgentMetrics(registry, agent)
    assert value(registry, "kernel_flows") == 0
    assert value(registry, "kernel_table_capacity") == 4096
    agent.meter.tables.kernel_entries = 17
    agent.meter.tables.lost = (24, 672)
    agent.cache.ingest([kernel_flow(1, 10, INGRESS, 1, 10, sport=p) for p in range(3)])
    assert value(registry, "kernel_flows") == 17
    assert value(registry, "cache_flows") == 3
    assert value(registry, "not_metered_packets_total") == 24
    assert value(registry, "not_metered_bytes_total") == 672


def test_flows_exported_by_end_reason(registry):
    metrics = AgentMetrics(registry, make_agent())
    for reason in EndReason:  # every reason is there from the start
        assert value(registry, "exported_flows_total", end_reason=reason.name.lower()) == 0
    records = dummy_records(5)
    for record, reason in zip(records, (EndReason.IDLE_TIMEOUT, EndReason.IDLE_TIMEOUT, EndReason.END_OF_FLOW,
                                        EndReason.ACTIVE_TIMEOUT, EndReason.LACK_OF_RESOURCES)):
        record.end_reason = reason
    metrics.exported(records)
    metrics.exported(records[:1])
    assert value(registry, "exported_flows_total", end_reason="idle_timeout") == 3
    assert value(registry, "exported_flows_total", end_reason="end_of_flow") == 1
    assert value(registry, "exported_flows_total", end_reason="active_timeout") == 1
    assert value(registry, "exported_flows_total", end_reason="lack_of_resources") == 1
    assert value(registry, "exported_flows_total", end_reason="forced_end") == 0


def test_generation_reload_failures_and_drain_durations(registry):
    agent = make_agent()
    metrics = AgentMetrics(registry, agent)
    assert value(registry, "config_generation") == 1
    agent.generation = 4
    assert value(registry, "config_generation") == 4
    metrics.reload_failed()
    metrics.reload_failed()
    assert value(registry, "reload_failures_total") == 2
    for seconds in (0.0002, 0.003, 0.003, 0.7):
        metrics.cycle_done(seconds)
    assert value(registry, "drain_duration_seconds_count") == 4
    assert value(registry, "drain_duration_seconds_bucket", le="0.0005") == 1
    assert value(registry, "drain_duration_seconds_bucket", le="0.005") == 3
    assert value(registry, "drain_duration_seconds_bucket", le="1.0") == 4
    assert value(registry, "drain_duration_seconds_sum") == pytest.approx(0.7062)


def test_interfaces_attached_and_named_but_missing(registry):
    config = parse_config({"interfaces": [{"names": ["eth0", "veth*", "gone0", "skip0"], "exclude": ["skip*"]},
                                          {"netns": "pod-a", "names": ["eth0"]}]})
    agent = make_agent(config=config, attached=[Attached("host", "eth0", 2), Attached("host", "veth1", 9)])
    agent.attachments.error_count = 3
    AgentMetrics(registry, agent)
    assert value(registry, "interface_attached", netns="host", interface="eth0") == 1
    assert value(registry, "interface_attached", netns="host", interface="veth1") == 1
    assert value(registry, "interface_attached", netns="host", interface="gone0") == 0
    assert value(registry, "interface_attached", netns="pod-a", interface="eth0") == 0
    assert value(registry, "interface_attached", netns="host", interface="skip0") is None  # excluded
    assert value(registry, "attach_errors_total") == 3


def free_tcp_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def collector_config(port: int, transport: str, **options) -> CollectorConfig:
    return CollectorConfig(f"127.0.0.1:{port}", "127.0.0.1", port, transport, **options)


def wait(predicate, timeout: float = 10, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def test_per_collector_export_counters_match_what_the_collectors_received(registry):
    udp = Collector(out=None, err=None).start()
    refused = free_tcp_port()
    tcp_name, udp_name = f"tcp://127.0.0.1:{refused}", f"udp://127.0.0.1:{udp.port}"
    started = time.time()
    exporter = IpfixExporter([collector_config(udp.port, "udp"), collector_config(refused, "tcp")],
                             (TemplateConfig(256, MINIMAL_TEMPLATE),), 3, reconnect_initial=0.05,
                             reconnect_max=0.1, transport_factory=metered_transport)
    listener = None
    try:
        AgentMetrics(registry, make_agent(sink=FanoutSink([exporter])))
        exporter.export(dummy_records(30), MeteringStats())
        wait(lambda: len(udp.records()) >= 30, what="30 records at the UDP collector")
        # the sender counts a message once its send() returned: the collector may have it a moment before
        wait(lambda: value(registry, "ipfix_records_total", collector=udp_name) == sum(
            len(r.message.records) for r in udp.received), what="the sender's count of the records received")
        received = udp.received
        assert value(registry, "ipfix_messages_total", collector=udp_name) == len(received)
        assert value(registry, "ipfix_bytes_total", collector=udp_name) == sum(len(r.raw) for r in received)
        assert value(registry, "ipfix_records_total", collector=udp_name) == \
            sum(len(r.message.records) for r in received)
        assert value(registry, "ipfix_templates_sent_total", collector=udp_name) == \
            sum(len(r.message.templates) for r in received)
        # UDP: a message counts as delivered once a moment passed without an ICMP error about it
        wait(lambda: value(registry, "ipfix_last_export_timestamp_seconds", collector=udp_name) >= started,
             what="the last UDP message confirmed")
        assert value(registry, "ipfix_last_export_timestamp_seconds", collector=udp_name) <= time.time()
        assert value(registry, "ipfix_dropped_flows_total", collector=udp_name, reason="queue_full") is None
        assert value(registry, "ipfix_queued_flows", collector=udp_name) == 0
        assert value(registry, "ipfix_collector_connected", collector=udp_name) is None  # UDP: no connection
        assert value(registry, "ipfix_send_errors_total", collector=udp_name, operation="send",
                     reason="econnrefused") is None

        # Nothing listens on the TCP collector's port: refused connects, counted; its records wait.
        wait(lambda: (value(registry, "ipfix_send_errors_total", collector=tcp_name, operation="connect",
                            reason="econnrefused") or 0) >= 2, what="refused connects counted")
        assert value(registry, "ipfix_collector_connected", collector=tcp_name) == 0
        assert value(registry, "ipfix_messages_total", collector=tcp_name) == 0
        assert value(registry, "ipfix_last_export_timestamp_seconds", collector=tcp_name) == 0
        assert value(registry, "ipfix_queued_flows", collector=tcp_name) == 30

        listener = Collector(port=refused, out=None, err=None).start()
        wait(lambda: value(registry, "ipfix_collector_connected", collector=tcp_name) == 1, what="connected")
        wait(lambda: len(listener.records()) >= 30, what="30 records at the TCP collector")
        assert value(registry, "ipfix_queued_flows", collector=tcp_name) == 0
        assert value(registry, "ipfix_templates_sent_total", collector=tcp_name) == \
            sum(len(m.templates) for m in listener.messages())
    finally:
        exporter.close(1)
        udp.stop()
        if listener is not None:
            listener.stop()


def test_flows_dropped_at_a_full_collector_queue(registry):
    refused = free_tcp_port()
    name = f"tcp://127.0.0.1:{refused}"
    exporter = IpfixExporter([collector_config(refused, "tcp", queue_size=10)],
                             (TemplateConfig(256, MINIMAL_TEMPLATE),), 3, chunk_size=10,
                             transport_factory=metered_transport)
    try:
        AgentMetrics(registry, make_agent(sink=FanoutSink([exporter])))
        for seed in range(5):
            exporter.export(dummy_records(10, seed=seed), MeteringStats())
        # The first chunk fills the queue; the four after it are dropped.
        assert value(registry, "ipfix_queued_flows", collector=name) == 10
        assert value(registry, "ipfix_dropped_flows_total", collector=name, reason="queue_full") == 40
    finally:
        exporter.close(0)


def test_template_records_are_counted_in_template_messages_only():
    exporter = IpfixExporter([], (TemplateConfig(256, MINIMAL_TEMPLATE),), 1)
    session = ExportSession(1, 1400, [ft.template for ft in exporter.flow_templates] + exporter.options.templates)
    messages = session.template_messages(0)
    assert sum(template_records(m) for m in messages) == len(session.templates) == 7  # 2 flow + 5 options
    small = ExportSession(1, 64, session.templates)  # one template per message
    assert sum(template_records(m) for m in small.template_messages(0)) == 7
    assert template_records(session.withdrawal_message(0)) == 0
    groups = exporter.encode(dummy_records(8))
    assert all(template_records(p.message) == 0 for p in session.data_messages(groups, 0))


def test_transport_error_reasons():
    def wrapped(cause):
        try:
            try:
                raise cause
            except OSError as err:
                raise TransportError(getattr(err, "errno", None) or 0, "failed") from err
        except TransportError as outer:
            return outer

    assert error_reason(wrapped(ConnectionRefusedError(errno.ECONNREFUSED, "refused"))) == "econnrefused"
    assert error_reason(wrapped(ssl.SSLError(1, "bad certificate"))) == "tls"
    assert error_reason(wrapped(TimeoutError("timed out"))) == "timeout"
    assert error_reason(TransportError(0, "not connected")) == "other"
    assert error_reason(TransportError(errno.EPIPE, "broken")) == "epipe"


def test_metered_transport_counts_and_stays_transparent():
    class Inner:
        stream = True
        connected = False
        sock = "the socket"
        last_delivered = 0.0  # the transport knows what was delivered (UDP: no ICMP error came back)

        def __init__(self):
            self.sent = []

        def connect(self):
            raise TransportError(errno.ECONNREFUSED, "refused")

        def send(self, message):
            if message == b"fail":
                raise TransportError(errno.EPIPE, "broken pipe")
            self.sent.append(message)
            self.last_delivered = time.time()

        def alive(self):
            return False

        def close(self):
            pass

    transport = MeteredTransport(Inner())
    with pytest.raises(TransportError):
        transport.connect()
    with pytest.raises(TransportError):
        transport.send(b"fail")
    before = time.time()
    transport.send(b"\0" * 16)
    assert transport.errors() == {("connect", "econnrefused"): 1, ("send", "epipe"): 1}
    assert transport.inner.sent == [b"\0" * 16]
    assert before <= transport.last_success <= time.time()
    assert (transport.stream, transport.connected, transport.sock, transport.alive()) == (True, False,
                                                                                          "the socket", False)


# ---- bpf_stats from real programs ----------------------------------------------------

BPF_PROG_LOAD, BPF_PROG_TEST_RUN, BPF_ENABLE_STATS = 5, 10, 32
BPF_PROG_TYPE_SCHED_CLS = 3


class _ProgLoadAttr(ctypes.Structure):
    _fields_ = [("prog_type", ctypes.c_uint32), ("insn_cnt", ctypes.c_uint32), ("insns", ctypes.c_uint64),
                ("license", ctypes.c_uint64), ("log_level", ctypes.c_uint32), ("log_size", ctypes.c_uint32),
                ("log_buf", ctypes.c_uint64), ("kern_version", ctypes.c_uint32), ("prog_flags", ctypes.c_uint32),
                ("prog_name", ctypes.c_char * 16)]


class _TestRunAttr(ctypes.Structure):
    _fields_ = [("prog_fd", ctypes.c_uint32), ("retval", ctypes.c_uint32), ("data_size_in", ctypes.c_uint32),
                ("data_size_out", ctypes.c_uint32), ("data_in", ctypes.c_uint64), ("data_out", ctypes.c_uint64),
                ("repeat", ctypes.c_uint32), ("duration", ctypes.c_uint32)]


class _EnableStatsAttr(ctypes.Structure):
    _fields_ = [("type", ctypes.c_uint32)]


def load_return_zero(name: bytes) -> int:
    """A two-instruction tc program (r0 = 0; exit)."""
    insns = ctypes.create_string_buffer(bytes.fromhex("b700000000000000" "9500000000000000"), 16)
    license_ = ctypes.create_string_buffer(b"GPL")
    return bpfsys._bpf(BPF_PROG_LOAD, _ProgLoadAttr(prog_type=BPF_PROG_TYPE_SCHED_CLS, insn_cnt=2,
                                                    insns=ctypes.addressof(insns),
                                                    license=ctypes.addressof(license_), prog_name=name))


def run_program(fd: int, repeat: int) -> None:
    frame = ctypes.create_string_buffer(bytes(64), 64)
    bpfsys._bpf(BPF_PROG_TEST_RUN, _TestRunAttr(prog_fd=fd, data_size_in=64, data_in=ctypes.addressof(frame),
                                               repeat=repeat))


@contextlib.contextmanager
def bpf_stats_on():
    """Run-time statistics on while inside (BPF_ENABLE_STATS: released with the fd, nothing to restore)."""
    fd = bpfsys._bpf(BPF_ENABLE_STATS, _EnableStatsAttr(0))
    try:
        yield
    finally:
        os.close(fd)


@pytest.mark.root
def test_bpf_run_time_and_runs_per_direction_from_the_programs(registry, tmp_path):
    ingress, egress = load_return_zero(b"kf_test_in"), load_return_zero(b"kf_test_eg")
    sysctl = tmp_path / "bpf_stats_enabled"
    sysctl.write_text("1\n")
    try:
        AgentMetrics(registry, make_agent(ingress_fd=ingress, egress_fd=egress), bpf_stats_path=str(sysctl))
        assert value(registry, "bpf_runs_total", direction="ingress") == 0
        with bpf_stats_on():
            run_program(ingress, 1000)
            run_program(egress, 10)
        run_program(ingress, 500)  # stats off: not counted
        assert value(registry, "bpf_runs_total", direction="ingress") == 1000
        assert value(registry, "bpf_runs_total", direction="egress") == 10
        assert value(registry, "bpf_run_seconds_total", direction="ingress") > 0
        assert value(registry, "bpf_stats_enabled") == 1
        sysctl.write_text("0\n")
        assert value(registry, "bpf_stats_enabled") == 0
    finally:
        os.close(ingress)
        os.close(egress)


@pytest.mark.root
def test_prog_info_names_the_program():
    fd = load_return_zero(b"kf_named")
    try:
        info = bpfsys.prog_info(fd)
        assert info.name == "kf_named" and info.id > 0
    finally:
        os.close(fd)


def test_an_unreadable_source_leaves_out_only_its_metrics(registry):
    agent = make_agent()  # ingress_fd -1: prog_info fails
    AgentMetrics(registry, agent)
    assert value(registry, "bpf_runs_total", direction="ingress") is None
    assert value(registry, "kernel_table_capacity") == 4096


# ---- serving, and the config key ---------------------------------------------------------

def test_serve_metrics_over_http(registry):
    AgentMetrics(registry, make_agent())
    server = serve_metrics("127.0.0.1", 0, registry)
    try:
        port = server.server_port
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        server.shutdown()
        server.server_close()
    assert "kipfix_agent_kernel_table_capacity 4096.0" in body
    assert 'kipfix_agent_exported_flows_total{end_reason="forced_end"} 0.0' in body


def test_a_busy_port_is_reported_and_the_agent_runs_on(registry, caplog):
    agent = make_agent()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        with caplog.at_level(logging.ERROR, logger="kipfix.metrics"):
            assert start_agent_metrics(agent, "127.0.0.1", port, registry) is False
    assert f"cannot serve metrics on 127.0.0.1:{port}: Address already in use; running without metrics" \
        in caplog.text
    assert not hasattr(agent, "metrics")


def test_metrics_config_defaults_and_mistakes():
    config = parse_config({})
    assert (config.metrics.address, config.metrics.port, config.metrics.enabled) == ("0.0.0.0", 9469, True)
    config = parse_config({"metrics": {"address": "::1", "port": 9100, "enabled": False}})
    assert (config.metrics.address, config.metrics.port, config.metrics.enabled) == ("::1", 9100, False)
    for metrics, expected in (
            ({"port": 0}, "metrics.port: 0 is out of range; accepted: 1..65535"),
            ({"port": "http"}, "metrics.port: 'http' is not an integer; accepted: 1..65535"),
            ({"address": "localhost"}, "metrics.address: 'localhost' is not an IP address; accepted: an IPv4 "
                                       "or IPv6 address"),
            ({"enabled": "yes"}, "metrics.enabled: 'yes' is not accepted; accepted: true, false"),
            ({"path": "/m"}, "metrics.path: unknown key; accepted keys here: address, port, enabled"),
            ("on", "metrics: expected a mapping, got str 'on'")):
        with pytest.raises(ConfigError) as err:
            parse_config({"metrics": metrics})
        assert expected in str(err.value)


def test_the_daemon_builds_exporters_with_metered_transports():
    config = parse_config({"collectors": [{"address": f"127.0.0.1:{free_tcp_port()}", "transport": "tcp"}],
                           "templates": [{"id": 256, "template": list(MINIMAL_TEMPLATE)}]})
    sink = build_sink(config)
    try:
        (exporter,) = sink.sinks
        assert all(isinstance(s.transport, MeteredTransport) for s in exporter.sessions)
    finally:
        for s in sink.sinks:
            s.close(0)


def test_flows_no_template_selects_are_counted(registry):
    udp = Collector(out=None, err=None).start()
    exporter = IpfixExporter([collector_config(udp.port, "udp")],
                             (TemplateConfig(256, MINIMAL_TEMPLATE, ip_versions=(4,), protocols=(6,)),), 3)
    try:
        AgentMetrics(registry, make_agent(sink=FanoutSink([exporter])))
        records = dummy_records(40)
        exporter.export(records, MeteringStats())
        left = [r for r in records if (r.key.ip_version, r.key.protocol) != (4, 6)]
        assert value(registry, "ipfix_unselected_flows_total") == len(left) > 0
        assert value(registry, "ipfix_unselected_packets_total") == sum(r.packets for r in left)
        wait(lambda: len(udp.records(256)) == len(records) - len(left), what="the TCP flows at the collector")
    finally:
        exporter.close(5)
        udp.stop()
