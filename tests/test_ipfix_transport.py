"""TCP reconnects, TLS, and an unreachable collector next to a working one (loopback only)."""

from __future__ import annotations

import shutil
import ssl
import subprocess

import pytest

from kipfix.agent.config import CollectorConfig, TemplateConfig, TLSConfig
from kipfix.agent.collector.server import Collector
from kipfix.agent.export.ipfix.dummy import MINIMAL_TEMPLATE, dummy_records
from kipfix.agent.export.ipfix.exporter import IpfixExporter
from kipfix.agent.export.sink import MeteringStats

TEMPLATES = (TemplateConfig(256, MINIMAL_TEMPLATE),)


def config(port: int, transport: str, **options) -> CollectorConfig:
    return CollectorConfig(f"127.0.0.1:{port}", "127.0.0.1", port, transport, **options)


def exporter_for(*collectors, **options) -> IpfixExporter:
    return IpfixExporter(list(collectors), TEMPLATES, observation_domain_id=3, exporting_process_id=5,
                         reconnect_initial=0.05, reconnect_max=0.2, **options)


def tcp_sessions(collector: Collector) -> dict:
    """Messages per TCP connection, in arrival order."""
    sessions: dict = {}
    for item in collector.received:
        sessions.setdefault(item.peer, []).append(item.message)
    return sessions


def check_session(messages) -> None:
    """Templates come first; sequence numbers count data records from 0 in each connection."""
    assert messages[0].templates
    total = 0
    for message in messages:
        assert message.sequence == total
        total += len(message.records)


def test_tcp_collector_restarted_mid_stream():
    first = Collector(out=None, err=None).start()
    port = first.port
    exporter = exporter_for(config(port, "tcp"))
    try:
        batch1 = dummy_records(50, seed=1)
        exporter.export(batch1, MeteringStats())
        assert first.wait_for(lambda c: c.data_records >= 50, 10)
        first.stop()  # the collector goes away, closing the connection
        second = Collector(port=port, out=None, err=None).start()
        try:
            batch2 = dummy_records(70, seed=2)
            exporter.export(batch2, MeteringStats())
            assert second.wait_for(lambda c: c.data_records >= 70, 10)
            exporter.close(5)
            assert second.wait_for(lambda c: any(m.withdrawn for m in c.messages()), 5)
        finally:
            second.stop()
    finally:
        exporter.close(1)
    for collector, batch in ((first, batch1), (second, batch2)):
        (messages,) = tcp_sessions(collector).values()  # one connection each
        check_session(messages)
        flows = [r for m in messages for r in m.data_records]
        assert [r.values["packetDeltaCount"] for r in flows] == \
            [r.packets for r in batch if r.key.ip_version == 4] + [r.packets for r in batch if r.key.ip_version == 6]
    assert exporter.counters()[f"tcp://127.0.0.1:{port}"].not_sent_flows == 0


def test_unreachable_collector_does_not_block_others_and_drops_are_counted():
    good = Collector(out=None, err=None).start()
    gone = Collector(out=None, err=None)
    port = gone.port
    gone.stop()  # nothing listens there now: connections are refused
    exporter = exporter_for(config(good.port, "udp"), config(port, "tcp", queue_size=10), chunk_size=10)
    batches = [dummy_records(10, seed=i) for i in range(5)]
    try:
        for batch in batches:
            exporter.export(batch, MeteringStats())  # returns at once: nothing waits for the TCP collector
        assert good.wait_for(lambda c: c.data_records >= 50, 10)
        dropped = exporter.counters()[f"tcp://127.0.0.1:{port}"]
        # the first chunk waits in the queue (its size); the four after it found it full
        assert (dropped.not_sent_flows, dropped.not_sent_packets, dropped.not_sent_octets) == \
            (40, sum(r.packets for b in batches[1:] for r in b), sum(r.octets for b in batches[1:] for r in b))
        back = Collector(port=port, out=None, err=None).start()
        try:
            assert back.wait_for(lambda c: c.data_records >= 10, 10)
            exporter.close(5)
            assert back.wait_for(lambda c: any(m.withdrawn for m in c.messages()), 5)
        finally:
            back.stop()
    finally:
        exporter.close(1)
        good.stop()
    records = [r for m in back.messages() for r in m.data_records]
    assert sorted(r.values["packetDeltaCount"] for r in records) == sorted(r.packets for r in batches[0])
    reliability = [r.values for m in back.messages() for r in m.options_records if "notSentFlowTotalCount" in r.values]
    assert reliability[-1]["notSentFlowTotalCount"] == 40
    assert reliability[-1]["notSentPacketTotalCount"] == dropped.not_sent_packets
    assert reliability[-1]["exportingProcessId"] == 5


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A test CA, a collector certificate for kipfix-collector.test and a client certificate."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    d = tmp_path_factory.mktemp("pki")

    def run(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=kipfix test CA")
    for name, cn, ext in (("server", "kipfix-collector.test", "subjectAltName=DNS:kipfix-collector.test"),
                          ("client", "kipfix-exporter", "extendedKeyUsage=clientAuth")):
        run("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}")
        (d / f"{name}.ext").write_text(ext + "\n")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext")
    return d


def tls_collector(pki) -> Collector:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki / "server.pem", pki / "server.key")
    context.load_verify_locations(pki / "ca.pem")
    context.verify_mode = ssl.CERT_REQUIRED  # the exporter must show its client certificate
    return Collector(out=None, err=None, tls_context=context).start()


def test_tls_session_with_client_certificate(pki):
    collector = tls_collector(pki)
    tls = TLSConfig(str(pki / "ca.pem"), str(pki / "client.pem"), str(pki / "client.key"), "kipfix-collector.test")
    exporter = exporter_for(config(collector.port, "tls", tls=tls))
    try:
        records = dummy_records(30)
        exporter.export(records, MeteringStats())
        assert collector.wait_for(lambda c: c.data_records >= 30, 10)
    finally:
        exporter.close(5)
        collector.stop()
    (messages,) = tcp_sessions(collector).values()
    check_session(messages)
    assert sorted(r.values["octetDeltaCount"] for m in messages for r in m.data_records) == \
        sorted(r.octets for r in records)


def test_tls_server_name_is_checked(pki):
    collector = tls_collector(pki)
    tls = TLSConfig(str(pki / "ca.pem"), str(pki / "client.pem"), str(pki / "client.key"), "someone-else.test")
    exporter = exporter_for(config(collector.port, "tls", tls=tls))
    try:
        exporter.export(dummy_records(5), MeteringStats())
    finally:
        exporter.close(0.5)
        collector.stop()
    assert collector.data_records == 0
    assert exporter.counters()[f"tls://127.0.0.1:{collector.port}"].not_sent_flows == 5


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_ipv6_loopback_collector(transport):
    try:
        collector = Collector("::1", 0, out=None, err=None).start()
    except OSError:
        pytest.skip("no IPv6 loopback")
    exporter = IpfixExporter([CollectorConfig(f"[::1]:{collector.port}", "::1", collector.port, transport)],
                             TEMPLATES, observation_domain_id=3)
    try:
        records = dummy_records(20)
        exporter.export(records, MeteringStats())
        assert collector.wait_for(lambda c: c.data_records >= 20, 10)
    finally:
        exporter.close(5)
        collector.stop()
    assert {item.peer[0] for item in collector.received} == {"::1"}
    assert sorted(r.values["octetDeltaCount"] for r in collector.records()) == sorted(r.octets for r in records)
