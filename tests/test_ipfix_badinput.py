"""Bad input gives one clear ValueError naming the value and what is accepted;
malformed messages are rejected by the collector, which keeps running."""

from __future__ import annotations

import socket
import struct

import pytest

from kipfix.agent.config import CollectorConfig, TemplateConfig, TLSConfig
from kipfix.agent.export.ipfix import fields, infomodel
from kipfix.agent.export.address import parse_collector_address
from kipfix.agent.collector.server import Collector
from kipfix.agent.export.ipfix.decoder import MalformedMessage, TemplateStore, decode_message
from kipfix.agent.export.ipfix.dummy import MINIMAL_TEMPLATE, dummy_records
from kipfix.agent.export.ipfix.exporter import IpfixExporter
from kipfix.agent.export.ipfix.selection import record_lengths
from kipfix.agent.export.ipfix.session import build_flow_templates
from kipfix.agent.export.ipfix.transport import tls_context
from kipfix.agent.export.sink import MeteringStats


@pytest.mark.parametrize("name", ["flowEndMilliseconds", "FlowEndMilliseconds", "FLOWENDMILLISECONDS"])
def test_lookup_is_case_insensitive(name):
    element = infomodel.lookup(name)
    assert (element.id, element.name, element.length) == (153, "flowEndMilliseconds", 8)


def test_registry_has_every_element_of_the_issue():
    names = """flowStartMilliseconds flowEndMilliseconds flowStartNanoseconds flowEndNanoseconds
    flowStartSysUpTime flowEndSysUpTime octetDeltaCount packetDeltaCount ipVersion ingressInterface
    egressInterface flowDirection sourceIPv4Address destinationIPv4Address sourceIPv6Address
    destinationIPv6Address protocolIdentifier sourceTransportPort destinationTransportPort tcpControlBits
    icmpTypeCodeIPv4 icmpTypeCodeIPv6 ipClassOfService ipDiffServCodePoint minimumTTL maximumTTL vlanId
    dot1qVlanId dot1qCustomerVlanId flowEndReason forwardingStatus fragmentIdentification
    sourceIPv4PrefixLength destinationIPv4PrefixLength sourceIPv6PrefixLength destinationIPv6PrefixLength
    ipNextHopIPv4Address ipNextHopIPv6Address interfaceName observationDomainId exportingProcessId
    systemInitTimeMilliseconds""".split()
    fields.check_template_fields(names)  # known and fillable


def test_unknown_element():
    with pytest.raises(ValueError, match="unknown information element 'flowEndMillis'"):
        infomodel.lookup("flowEndMillis")
    with pytest.raises(ValueError, match="'flowEndMillis'"):
        fields.check_template_fields(["octetDeltaCount", "flowEndMillis"])


def test_element_kipfix_cannot_fill_lists_what_it_can():
    with pytest.raises(ValueError) as err:
        fields.check_template_fields(["bgpSourceAsNumber"])
    text = str(err.value)
    assert "'bgpSourceAsNumber'" in text and "cannot fill" in text
    assert "octetDeltaCount" in text and "flowEndMilliseconds" in text


def test_duplicate_element():
    with pytest.raises(ValueError, match="'OctetDeltaCount' appears twice"):
        fields.check_template_fields(["octetDeltaCount", "OctetDeltaCount"])


@pytest.mark.parametrize("template_id", [0, 2, 255, 65536])
def test_template_id_out_of_range(template_id):
    with pytest.raises(ValueError, match=f"template id {template_id} is out of range; accepted: 256..65535"):
        build_flow_templates([TemplateConfig(template_id, ("octetDeltaCount",))], 32473)


def test_template_id_duplicated():
    with pytest.raises(ValueError, match="template id 300 is used twice"):
        build_flow_templates([TemplateConfig(300, ("octetDeltaCount",)),
                              TemplateConfig(300, ("packetDeltaCount",))], 32473)


def test_template_whose_fixed_part_exceeds_the_message_size():
    names = tuple(fields.fillable_names())
    # both families' addresses: sent as an IPv4 and an IPv6 part; the IPv6 part is the longer
    ipv6_part = [n for n in names if "IPv4" not in n]
    need = 16 + 4 + sum(1 if e.variable_length else e.length for e in fields.elements(ipv6_part, 1))
    collector = CollectorConfig("127.0.0.1:4739", "127.0.0.1", 4739, "udp", max_message_size=need - 1)
    with pytest.raises(ValueError, match=f"maxMessageSize {need - 1} cannot hold one record of template 401 "
                                         rf"\({need} octets with headers\); accepted: >= {need}"):
        IpfixExporter([collector], [TemplateConfig(400, names)], 1)
    # the derived IPv6 counterpart is what decides for an IPv4-only template
    assert record_lengths(TemplateConfig(400, ("sourceIPv4Address",))) == [4, 16]


@pytest.mark.parametrize("text, reason", [
    ("collector", "does not parse"),
    ("collector:", "port '' is not 1..65535"),
    ("127.0.0.1:99999", "port '99999' is not 1..65535"),
    ("::1:4739", "needs brackets"),
    ("[::1]", "does not parse"),
    ("[not-v6]:4739", "is not an IPv6 address"),
    ("no-such-host.invalid:4739", "does not resolve"),
])
def test_collector_address_that_does_not_parse_or_resolve(text, reason):
    with pytest.raises(ValueError) as err:
        parse_collector_address(text)
    assert repr(text) in str(err.value) and reason in str(err.value)
    assert "accepted: host:port, IPv4:port or [IPv6]:port" in str(err.value)


def test_collector_addresses_that_parse():
    assert parse_collector_address("127.0.0.1:4739") == ("127.0.0.1", 4739)
    assert parse_collector_address("[::1]:4740") == ("::1", 4740)
    assert parse_collector_address("localhost:2055") == ("localhost", 2055)


def test_tls_files_missing(tmp_path):
    missing = str(tmp_path / "ca.pem")
    with pytest.raises(ValueError, match=f"TLS CA file '{missing}' does not exist; accepted: a readable PEM file"):
        tls_context(TLSConfig(missing, None, None, None))
    (tmp_path / "ca.pem").write_text("not a certificate\n")
    with pytest.raises(ValueError, match="is not a usable PEM CA certificate"):
        tls_context(TLSConfig(str(tmp_path / "ca.pem"), None, None, None))
    key = str(tmp_path / "client.key")
    with pytest.raises(ValueError, match=f"TLS key file '{key}' does not exist"):
        IpfixExporter([CollectorConfig("127.0.0.1:4739", "127.0.0.1", 4739, "tls",
                                       tls=TLSConfig(str(tmp_path / "ca.pem"), str(tmp_path / "ca.pem"), key))],
                      [TemplateConfig(256, MINIMAL_TEMPLATE)], 1)


# ---- malformed messages ------------------------------------------------------

def header(length: int, version: int = 10) -> bytes:
    return struct.pack("!HHIII", version, length, 0, 0, 1)


MALFORMED = [
    (b"\x00\x0a\x00", "shorter than the 16-octet header"),
    (header(16, version=9), "version 9 is not IPFIX"),
    (header(40), "header length 40 differs from the 16 octets received"),
    (header(22) + struct.pack("!HH", 2, 2) + b"\0\0", "has length 2, outside 4..6"),
    (header(24) + struct.pack("!HH", 2, 8) + struct.pack("!HH", 100, 1), "template id 100"),
    (header(28) + struct.pack("!HH", 2, 12) + struct.pack("!HHHH", 300, 1, 1, 0), "has length 0"),
    (header(28) + struct.pack("!HH", 2, 12) + struct.pack("!HHHH", 300, 2, 1, 8), "field specifier beyond"),
    (header(24) + struct.pack("!HH", 7, 8) + b"\0" * 4, "set id 7 at offset 16 is reserved"),
    (header(26) + struct.pack("!HH", 3, 10) + struct.pack("!HHH", 300, 1, 0), "scope field count 0"),
]


@pytest.mark.parametrize("data, reason", MALFORMED)
def test_decoder_rejects_malformed_messages(data, reason):
    with pytest.raises(MalformedMessage, match=reason.replace("(", r"\(")):
        decode_message(data, TemplateStore(), "peer")


def test_variable_length_field_past_the_set_end():
    store = TemplateStore()
    template = header(28) + struct.pack("!HH", 2, 12) + struct.pack("!HHHH", 300, 1, 82, 65535)
    decode_message(template, store, "peer")
    data = header(26) + struct.pack("!HH", 300, 10) + bytes((20,)) + b"eth0\0"
    with pytest.raises(MalformedMessage, match="interfaceName: 20 octets run past the set end"):
        decode_message(data, store, "peer")


def test_collector_reports_malformed_messages_and_keeps_running():
    collector = Collector(out=None, err=None).start()
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            for data, _ in MALFORMED:
                sock.sendto(data, ("127.0.0.1", collector.port))
            assert collector.wait_for(lambda c: len(c.errors) == len(MALFORMED), 10)
        with socket.create_connection(("127.0.0.1", collector.port)) as tcp:
            tcp.sendall(header(16, version=5))  # a TCP stream out of sync is closed
            assert tcp.recv(1) == b""
        assert collector.wait_for(lambda c: len(c.errors) == len(MALFORMED) + 1, 10)
        # still collecting, over both transports
        for transport in ("udp", "tcp"):
            exporter = IpfixExporter([CollectorConfig("x", "127.0.0.1", collector.port, transport)],
                                     [TemplateConfig(256, MINIMAL_TEMPLATE)], 1)
            exporter.export(dummy_records(3), MeteringStats())
            exporter.close(5)
        assert collector.wait_for(lambda c: c.data_records >= 6, 10)
    finally:
        collector.stop()
    for (_, reason), error in zip(MALFORMED, collector.errors):
        assert error.startswith("rejected udp message from 127.0.0.1:") and reason in error
    assert "version 5 is not IPFIX (10)" in collector.errors[len(MALFORMED)]
