"""Property-based tests of the encoder and decoder (hypothesis)."""

from __future__ import annotations

import ipaddress

from hypothesis import given, settings, strategies as st

from kipfix.agent.config import TemplateConfig
from kipfix.agent.flows.record import EndReason, FlowKey, FlowRecord
from kipfix.agent.export.ipfix import fields
from kipfix.agent.export.ipfix.decoder import TemplateStore, decode_message
from kipfix.agent.export.ipfix.exporter import IpfixExporter, system_init_ms
from kipfix.agent.export.ipfix.infomodel import InfoModel, InformationElement, default_model, lookup
from kipfix.agent.export.ipfix.session import ExportSession
from kipfix.agent.export.ipfix.template import Template, compile_value_packer

from test_ipfix_roundtrip import expected_values

# every element that needs no routing table (those are covered in test_ipfix_roundtrip)
NO_ROUTES = tuple(n for n in fields.fillable_names() if n not in fields.ROUTE_ELEMENTS)
BOOT_MS = system_init_ms() + 1000  # exporters made in these tests see at most this
U8, U16, U32, U64 = (st.integers(0, 2**n - 1) for n in (8, 16, 32, 64))
TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)


@st.composite
def flow_records(draw):
    version = draw(st.sampled_from((4, 6)))
    size = 4 if version == 4 else 16
    protocol = draw(st.sampled_from((1, 6, 17, 58, 132)) | U8)
    # flows the kernel metered happen after boot (flowStartSysUpTime counts from there)
    start_ms = draw(st.integers(BOOT_MS + 1, BOOT_MS + 10**11))
    start = start_ms * 10**6 + draw(st.integers(0, 999_999))
    return FlowRecord(
        key=FlowKey(ifindex=draw(U32), direction=draw(st.sampled_from((0, 1))), ip_version=version,
                    protocol=protocol, src=draw(st.binary(min_size=size, max_size=size)),
                    dst=draw(st.binary(min_size=size, max_size=size)), sport=draw(U16), dport=draw(U16)),
        packets=draw(U64), octets=draw(U64), start_ns=start, end_ns=start + draw(st.integers(0, 10**12)),
        end_reason=draw(st.sampled_from(list(EndReason))), tcp_flags=draw(U16), min_ttl=draw(U8),
        max_ttl=draw(U8), tos=draw(U8), vlan_id=draw(st.integers(0, 4095)),
        inner_vlan_id=draw(st.integers(0, 4095)), fragment_id=draw(U32), interface_name=draw(TEXT),
        netns=draw(TEXT), observation_point_id=draw(st.integers(0, 2**64 - 1)))


SIGNED = InformationElement(30001, "testSigned", "signed32", 4, pen=32473)
BOOLEAN = InformationElement(30002, "testBoolean", "boolean", 1, pen=32473)


def decode_all(messages) -> list:
    store = TemplateStore(InfoModel(default_model().elements() + [SIGNED, BOOLEAN]))
    return [r for m in messages for r in decode_message(m, store, "peer").records]


@settings(max_examples=60, deadline=None)
@given(records=st.lists(flow_records(), max_size=60),
       names=st.lists(st.sampled_from(NO_ROUTES), min_size=1, unique=True),
       max_size=st.integers(1024, 9000))
def test_any_record_set_round_trips(records, names, max_size):
    exporter = IpfixExporter([], [TemplateConfig(256, tuple(names))], observation_domain_id=11,
                             exporting_process_id=12)
    session = ExportSession(11, max_size, [ft.template for ft in exporter.flow_templates])
    messages = session.template_messages(0)
    packed = list(session.data_messages(exporter.encode(records), 0))
    assert all(len(p.message) <= max_size for p in packed)
    assert sum(p.records for p in packed) == session.sequence
    decoded = decode_all(messages + [p.message for p in packed])
    expected = [(ft.template.id, expected_values(r, [e.name for e in ft.template.elements], exporter))
                for ft in exporter.flow_templates for family in (4, 6)
                for r in records if r.key.ip_version == family and ft.family in (None, family)]
    assert [(r.template_id, r.values) for r in decoded] == expected


STRING = Template(300, (lookup("interfaceName"), lookup("octetDeltaCount"), lookup("interfaceDescription")))


@settings(max_examples=40, deadline=None)
@given(first=st.sampled_from((0, 1, 254, 255, 256, 300, 1000)), second=st.sampled_from((0, 254, 255, 300)),
       counter=U64, char=st.sampled_from("aZ\u00e9\u4e2d"))
def test_variable_length_strings(first, second, counter, char):
    """0..254 octets use the 1-octet length form, 255 and more the 3-octet form."""
    a = (char * first).encode()[:first].decode("utf-8", errors="ignore")
    b = "x" * second
    (record,) = compile_value_packer(STRING)([(a, counter, b)])
    n = len(a.encode())
    assert record[:1 if n < 255 else 3] == (bytes((n,)) if n < 255 else b"\xff" + n.to_bytes(2, "big"))
    session = ExportSession(1, 65535, [STRING])
    messages = session.template_messages(0) + [p.message for p in session.data_messages([(300, [record])], 0)]
    (decoded,) = decode_all(messages)
    assert decoded.values == {"interfaceName": a, "octetDeltaCount": counter, "interfaceDescription": b}


@given(st.sampled_from((0, 254, 255, 300)))
def test_variable_length_boundaries_exactly(n):
    (record,) = compile_value_packer(STRING)([("a" * n, 1, "")])
    prefix = 1 if n < 255 else 3
    assert len(record) == prefix + n + 8 + 1


@settings(max_examples=60, deadline=None)
@given(values=st.lists(st.tuples(U8, st.integers(-2**31, 2**31 - 1), st.booleans(),
                                 st.ip_addresses(v=4), st.ip_addresses(v=6),
                                 st.binary(min_size=6, max_size=6), st.binary(max_size=300),
                                 st.integers(0, 2**32 - 1 - 2_208_988_800).map(lambda s: s * 10**9)),
                       min_size=1, max_size=20))
def test_generic_types_round_trip(values):
    template = Template(301, (lookup("protocolIdentifier"), SIGNED, BOOLEAN, lookup("sourceIPv4Address"),
                              lookup("sourceIPv6Address"), lookup("sourceMacAddress"), lookup("paddingOctets"),
                              lookup("observationTimeNanoseconds")))
    records = compile_value_packer(template)(values)
    session = ExportSession(1, 65535, [template])
    messages = session.template_messages(0) + [p.message for p in session.data_messages([(301, records)], 0)]
    decoded = decode_all(messages)
    assert [tuple(r.values.values()) for r in decoded] == [
        (u8, s32, flag, ipaddress.ip_address(v4), ipaddress.ip_address(v6), mac.hex(":"), octets, ns)
        for u8, s32, flag, v4, v6, mac, octets, ns in values]

