"""RFC 7011 4.1-4.3 options templates: exactly the RFC's fields, each in a set of its own, and counters that
equal known losses: packets a full kernel table could not meter, flows a full export queue dropped."""

from __future__ import annotations

import socket
import struct
import subprocess
import sys
import time

import pytest

from agentproc import AgentProcess, wait_for
from kipfix.agent.collector.server import Collector
from kipfix.agent.config import CollectorConfig, TemplateConfig
from kipfix.agent.export.ipfix.dummy import MINIMAL_TEMPLATE, dummy_records
from kipfix.agent.export.ipfix.exporter import IpfixExporter
from kipfix.agent.export.sink import MeteringStats
from netns_fixtures import netns_factory, veth_pair  # noqa: F401 -- fixtures

# RFC 7011 section 4, the Information Elements each template lists: (scope, the rest). The observation
# times are "any of the observationTime* Information Elements"; kipfix uses milliseconds.
RFC_7011 = {
    "4.1 Metering Process Statistics": (["observationDomainId"], [
        "exportedMessageTotalCount", "exportedFlowRecordTotalCount", "exportedOctetTotalCount"]),
    "4.2 Metering Process Reliability Statistics": (["observationDomainId"], [
        "ignoredPacketTotalCount", "ignoredOctetTotalCount",
        "observationTimeMilliseconds",   # time first packet ignored
        "observationTimeMilliseconds"]),  # time last packet ignored
    "4.3 Exporting Process Reliability Statistics": (["exportingProcessId"], [
        "notSentFlowTotalCount", "notSentPacketTotalCount", "notSentOctetTotalCount",
        "observationTimeMilliseconds",   # time first flow dropped
        "observationTimeMilliseconds"]),  # time last flow dropped
}


def options_by_kind(collector: Collector) -> dict[str, list[dict]]:
    """The options records of each RFC 7011 template, recognised by their first non-scope field."""
    first = {fields[0]: kind for kind, (_scope, fields) in RFC_7011.items()}
    out: dict[str, list[dict]] = {kind: [] for kind in RFC_7011}
    for message in collector.messages():
        for record in message.options_records:
            kind = next((first[name] for name in record.values if name in first), None)
            if kind:
                out[kind].append(record.values)
    return out


def options_sets(raw: bytes) -> list[int]:
    """Number of template records in each options template set (set id 3) of one message."""
    counts, offset = [], 16
    while offset + 4 <= len(raw):
        set_id, length = struct.unpack_from("!HH", raw, offset)
        if set_id == 3:
            records, at = 0, offset + 4
            while at + 6 <= offset + length:
                _tid, count, _scope = struct.unpack_from("!HHH", raw, at)
                at += 6
                for _ in range(count):
                    (element,) = struct.unpack_from("!H", raw, at)
                    at += 8 if element & 0x8000 else 4
                records += 1
            counts.append(records)
        offset += length
    return counts


def test_each_options_template_carries_exactly_the_rfc_fields_in_a_set_of_its_own():
    collector = Collector(out=None, err=None).start()
    try:
        exporter = IpfixExporter([CollectorConfig(f"127.0.0.1:{collector.port}", "127.0.0.1", collector.port, "udp")],
                                 (TemplateConfig(256, MINIMAL_TEMPLATE),), 7)
        exporter.export(dummy_records(5), MeteringStats())
        exporter.close(10)
        assert collector.wait_for(lambda c: len(c.records()) == 5, 10)
    finally:
        collector.stop()
    templates = {}
    for message in collector.messages():
        for template in message.templates:
            if template.scope_count:
                names = [e.name for e in template.elements]
                templates[tuple(names)] = (names[:template.scope_count], names[template.scope_count:])
    for kind, (scope, fields) in RFC_7011.items():
        assert (scope, fields) in templates.values(), kind
    # pmacct reads one options template per set: every options template set holds exactly one
    sets = [n for received in collector.received for n in options_sets(received.raw)]
    assert sets and set(sets) == {1}, sets


@pytest.mark.root
def test_a_full_kernel_table_is_reported_with_its_first_and_last_ignored_packet(veth_pair, tmp_path):  # noqa: F811
    """maxFlows 16 and 40 flows in one drain interval: 24 packets are not metered, and the 4.2 record says so."""
    collector = Collector(out=None, err=None).start()
    agent = AgentProcess(tmp_path, {
        "collectors": [{"address": f"127.0.0.1:{collector.port}", "templateRefreshSeconds": 1}],
        "templates": [{"id": 256, "template": list(MINIMAL_TEMPLATE)}],
        "interfaces": [{"netns": veth_pair.ns_b, "names": [veth_pair.if_b]}],
        "maxFlows": 16, "drainInterval": 30, "timeouts": {"idle": 60, "active": 120}})
    payload = 100
    try:
        agent.start()
        subprocess.run(["ip", "netns", "exec", veth_pair.ns_b, "ping", "-c", "1", "-W", "2", veth_pair.ip_a],
                       check=True, capture_output=True)  # ARP settled: the datagrams go out at once
        before_ms = time.time_ns() // 1_000_000
        sender = ("import socket, sys\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                  "for port in range(41000, 41040):\n    s.sendto(b'x' * 100, (sys.argv[1], port))\n")
        subprocess.run(["ip", "netns", "exec", veth_pair.ns_a, sys.executable, "-c", sender, veth_pair.ip_b],
                       check=True)
        after_ms = time.time_ns() // 1_000_000
        agent.stop()
        records = agent.records()

        def reported(c: Collector) -> list:
            return [v for v in options_by_kind(c)["4.2 Metering Process Reliability Statistics"]
                    if v["ignoredPacketTotalCount"]]
        wait_for(lambda: reported(collector), 30, "a 4.2 record with the ignored packets")
    finally:
        agent.cleanup()
        collector.stop()
    # every datagram sent was either metered (a record) or counted as ignored, and the table was full
    assert len(records) <= 16
    udp_metered = sum(r["packets"] for r in records if r["protocol"] == "udp")
    ignored = 40 - udp_metered
    assert ignored >= 24
    last = reported(collector)[-1]
    assert (last["ignoredPacketTotalCount"], last["ignoredOctetTotalCount"]) == (ignored, ignored * (payload + 28))
    first_ms, last_ms = last["observationTimeMilliseconds"]
    assert before_ms <= first_ms <= last_ms <= after_ms


def test_a_dropped_export_queue_is_reported_with_its_first_and_last_dropped_flow():
    """queueSize 10 and a collector that is down: what does not fit the queue is dropped, and once the
    collector is up, the 4.3 record says exactly what and when."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens on it until the collector starts
    config = CollectorConfig(f"127.0.0.1:{port}", "127.0.0.1", port, "tcp", queue_size=10)
    exporter = IpfixExporter([config], (TemplateConfig(256, MINIMAL_TEMPLATE),), 7, exporting_process_id=4711,
                             reconnect_initial=0.05, reconnect_max=0.2, chunk_size=10)
    collector = None
    try:
        batches = [dummy_records(10, seed=i) for i in range(4)]
        before_ms = time.time_ns() // 1_000_000
        for batch in batches:
            exporter.export(batch, MeteringStats())
        after_ms = time.time_ns() // 1_000_000
        dropped = [r for batch in batches[1:] for r in batch]  # the first batch fills the queue
        collector = Collector(port=port, out=None, err=None).start()
        assert collector.wait_for(lambda c: len(c.records()) == 10, 30)
        exporter.close(10)
    finally:
        exporter.close(0)
        if collector is not None:
            collector.stop()
    last = options_by_kind(collector)["4.3 Exporting Process Reliability Statistics"][-1]
    assert (last["exportingProcessId"], last["notSentFlowTotalCount"], last["notSentPacketTotalCount"],
            last["notSentOctetTotalCount"]) == (4711, len(dropped), sum(r.packets for r in dropped),
                                                sum(r.octets for r in dropped))
    first_ms, last_ms = last["observationTimeMilliseconds"]
    assert before_ms <= first_ms <= last_ms <= after_ms
