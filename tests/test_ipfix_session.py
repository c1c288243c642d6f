"""Sequence numbers, message size limits and template refresh, over real UDP on loopback."""

from __future__ import annotations

import struct
import threading

from kipfix.agent.config import CollectorConfig, TemplateConfig
from kipfix.agent.collector.server import Collector
from kipfix.agent.export.ipfix.decoder import TemplateStore, decode_message
from kipfix.agent.export.ipfix.dummy import MINIMAL_TEMPLATE, dummy_records
from kipfix.agent.export.ipfix.exporter import IpfixExporter
from kipfix.agent.export.ipfix.session import ExportSession
from kipfix.agent.export.ipfix.transport import UdpTransport
from kipfix.agent.export.ipfix.template import Template, compile_value_packer
from kipfix.agent.export.ipfix.infomodel import lookup
from kipfix.agent.export.sink import MeteringStats

MINIMAL_V4_LENGTH = 8 + 8 + 8 + 8 + 1 + 1 + 4 + 4  # octets of one record of the minimal template


def export_to(collector: Collector, batches, templates=(TemplateConfig(256, MINIMAL_TEMPLATE),), **options):
    config = CollectorConfig(f"127.0.0.1:{collector.port}", "127.0.0.1", collector.port, "udp", **options)
    exporter = IpfixExporter([config], templates, observation_domain_id=9)
    for batch in batches:
        exporter.export(batch, MeteringStats())
    return exporter


def check_sequence(received) -> int:
    """Every message's sequence number equals the data records sent before it; returns the total."""
    total = 0
    for item in received:
        assert item.message.sequence == total, (item.message.sequence, total)
        total += len(item.message.records)  # options records are data records too
    return total


def test_sequence_numbers_continuous_across_batches_and_templates():
    collector = Collector(out=None, err=None).start()
    try:
        batches = [dummy_records(n, seed=n) for n in (1, 40, 0, 333, 7)]
        exporter = export_to(collector, batches, template_refresh_messages=3)
        exporter.close(10)
        flows = sum(len(b) for b in batches)
        assert collector.wait_for(lambda c: c.data_records >= flows, 10)
    finally:
        collector.stop()
    received = collector.received
    template_messages = [r for r in received if r.message.templates]
    assert len(template_messages) > 2  # re-sent every 3 messages, in between data
    assert all(not r.message.records for r in template_messages)
    total = check_sequence(received)
    assert total == flows + sum(len(m.options_records) for m in collector.messages())


def test_sequence_number_wraps_modulo_2_32():
    template = Template(256, (lookup("packetDeltaCount"),))
    session = ExportSession(1, 1400, [template])
    session.sequence = 2**32 - 3
    pack = compile_value_packer(template)
    groups = [(256, pack([(i,) for i in range(200)]), 8)]
    headers = [struct.unpack_from("!HHIII", p.message) for p in session.data_messages(groups, 0)]
    sequences = [h[3] for h in headers]
    assert sequences[0] == 2**32 - 3
    assert sequences[1] == (2**32 - 3 + (1400 - 20) // 8) % 2**32
    assert session.sequence == (2**32 - 3 + 200) % 2**32


def test_udp_messages_respect_the_size_limit_at_the_boundary():
    for per_message in (6, 11, 32):  # config accepts maxMessageSize >= 256
        exact = 16 + 4 + per_message * MINIMAL_V4_LENGTH
        for limit, fits in ((exact, per_message), (exact - 1, per_message - 1), (exact + 1, per_message)):
            if fits == 0:
                continue
            collector = Collector(out=None, err=None).start()
            try:
                records = [r for r in dummy_records(400, seed=limit) if r.key.ip_version == 4][:100]
                exporter = export_to(collector, [records], max_message_size=limit)
                exporter.close(10)
                assert collector.wait_for(lambda c: c.data_records >= len(records), 10)
            finally:
                collector.stop()
            data = [r for r in collector.received if r.message.data_records]
            assert all(len(r.raw) <= limit for r in collector.received)
            counts = [len(r.message.records) for r in data]
            assert counts[:-1] == [fits] * (len(counts) - 1)  # every full message holds exactly what fits
            assert sum(counts) == len(records)
            if limit == exact:
                assert all(len(r.raw) == exact for r in data[:-1])
            check_sequence(collector.received)


def test_templates_refreshed_on_the_interval():
    collector = Collector(out=None, err=None).start()
    try:
        exporter = export_to(collector, [dummy_records(5)], template_refresh_seconds=0.2)
        # nothing else is exported: further template messages come from the timer alone
        assert collector.wait_for(lambda c: sum(1 for r in c.received if r.message.templates) >= 4, 20)
        exporter.close(5)
    finally:
        collector.stop()
    check_sequence(collector.received)
    # every refresh brings the options records along
    template_indexes = [i for i, r in enumerate(collector.received) if r.message.templates]
    for i in template_indexes[:-1]:
        assert collector.received[i + 1].message.options_records


def test_templates_sent_first_and_every_n_messages():
    collector = Collector(out=None, err=None).start()
    try:
        records = dummy_records(2000)
        exporter = export_to(collector, [records], template_refresh_messages=4)
        exporter.close(10)
        assert collector.wait_for(lambda c: c.data_records >= len(records), 10)
    finally:
        collector.stop()
    assert collector.received[0].message.templates
    since = 0
    for item in collector.received:
        if item.message.templates:
            since = 0
        elif item.message.data_records:
            since += 1
            assert since <= 4
    # a fresh decoder that only ever saw this stream decodes every record (no data before its template)
    store = TemplateStore()
    for item in collector.received:
        assert not decode_message(item.raw, store, "peer").unknown_sets


def test_interfaces_reported_while_options_are_sent_still_precede_the_flows():
    """export() with new interfaces while the sender is sending the previous options: the interface
    table is sent again before the flows that use it, not only at close."""
    collector = Collector(out=None, err=None).start()
    sends = []
    gate, blocked = threading.Event(), threading.Event()

    class GatedUdp(UdpTransport):
        def send(self, message: bytes) -> None:
            sends.append(message)
            if len(sends) == 2:  # the first options message, its statistics already read
                blocked.set()
                gate.wait(10)
            super().send(message)

    config = CollectorConfig(f"127.0.0.1:{collector.port}", "127.0.0.1", collector.port, "udp")
    try:
        exporter = IpfixExporter([config], (TemplateConfig(256, MINIMAL_TEMPLATE),), observation_domain_id=9,
                                 transport_factory=lambda c: GatedUdp(c.host, c.port))
        assert blocked.wait(10)
        exporter.export(dummy_records(3), MeteringStats(observation_points=((7, 7, "eth7", "host"),)))
        gate.set()
        assert collector.wait_for(lambda c: c.data_records >= 3, 10)
        exporter.close(10)
    finally:
        gate.set()
        collector.stop()
    order = []
    for message in collector.messages():
        for record in message.records:
            if record.scope[:1] == ("observationPointId",):
                order.append(("interface", record.values["interfaceName"]))
            elif not record.scope:
                order.append(("flow", None))
    assert ("interface", "eth7") in order
    assert order.index(("interface", "eth7")) < order.index(("flow", None)), order
