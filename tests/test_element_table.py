"""The element table (agent/data/elements.csv) and what is made from it, enumerated from the table itself.

- Every element kipfix fills, at its full size and at every reduced size
  (RFC 7011 6.2), through the C and the Python encoder (the same bytes) and
  the built-in collector's decoder (its row's value for each record, capped
  at a reduced size's largest value, as counted in ``saturated``).
- tshark decodes every reduced size kipfix may send, but the few its
  dissector cannot (listed below, documented in docs/elements.md).
- A new kind of source is one lookup and one function: rows added to the
  table at run time with such a lookup go through both encoders and the decoder.
- What each source and transform means, checked against numbers worked out
  by hand (the rows only combine them).
- docs/elements.md and the README's table are current.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import pathlib
import subprocess

import pytest

from kipfix.agent.config import ConfigError, TemplateConfig, parse_config
from kipfix.agent.export.ipfix import elementdocs, fields, values
from kipfix.agent.export.ipfix.decoder import TemplateStore, decode_message
from kipfix.agent.export.ipfix.dummy import dummy_records
from kipfix.agent.export.ipfix.infomodel import read_table, reduced_lengths, table
from kipfix.agent.export.ipfix.session import ExportSession
from kipfix.agent.export.ipfix.template import Template
from kipfix.agent.flows.record import EndReason, FlowKey, FlowRecord
from kipfix.operator.spec import SpecError, contribution, parse_exporter

from test_flowpack import INIT_MS, Pods, Routes, packers
from test_ipfix_roundtrip import (TSHARK, TSHARK_PORT, check_with_collector, check_with_tshark, make_records,
                                  needs_tshark, run_export, tshark_fields, write_pcap)

REPO = pathlib.Path(__file__).resolve().parent.parent
PEN = 32473
CONSTANTS = {"observation_domain_id": 7, "exporting_process_id": 4242, "system_init_ms": INIT_MS}
# (element, size) for every element kipfix fills, at its own size (None) and at each reduced size
CASES = [(row.name, size) for row in table().fillable()
         for size in (None, *(reduced_lengths(row.type) if row.type.startswith("unsigned") else ()))]
# Reduced sizes Wireshark's IPFIX dissector (tshark 4.0, Debian 12) takes for a malformed packet:
# RFC 7011 6.2 allows them, kipfix sends them, tshark cannot show them. docs/elements.md says so.
TSHARK_REJECTS = {("sourceTransportPort", 1), ("destinationTransportPort", 1), ("icmpTypeCodeIPv6", 1),
                  *((f"flow{edge}SysUpTime", n) for edge in ("Start", "End") for n in (1, 2, 3))}


def spec(name: str, size: int | None) -> str:
    return name if size is None else f"{name}:{size}"


def records() -> list[FlowRecord]:
    """Both families, TCP/UDP/ICMP, both directions; a few with every counter too large for 4 octets."""
    base = make_records() + dummy_records(24, seed=3)
    big = [dataclasses.replace(r, packets=2**40 + i, octets=2**33 + i, fragment_id=2**31 + i, vlan_id=4000,
                               tcp_flags=0xFF) for i, r in enumerate(base[:4])]
    return base + big


def lookups_for(rows):
    """Routes and pods the packers get: every address has a route, every other source address a pod."""
    addresses = {a for r in rows for a in (r.key.src, r.key.dst)}
    routes = Routes((r.netns, a) for r in rows[::2] for a in (r.key.src, r.key.dst))  # half cached
    pods = Pods({a: (b"pod-" + a.hex().encode(), b"ns", b"node", b"web", b"Deployment")
                 for i, a in enumerate(sorted(addresses)) if i % 2})
    return routes, pods


def decoded(template: Template, packed: list[bytes]) -> list[dict]:
    session = ExportSession(7, 65535, [template])
    messages = session.template_messages(0) + [p.message for p in session.data_messages([(template.id, packed)], 0)]
    store = TemplateStore(table().model(PEN))
    return [r.values for m in messages for r in decode_message(m, store, "peer").records]


def as_decoded(row, value):
    if row.type in ("ipv4Address", "ipv6Address"):
        return ipaddress.ip_address(value.ljust(row.length, b"\0"))
    return value.decode() if row.type == "string" else value


@pytest.mark.parametrize("name, size", CASES, ids=[spec(*c) for c in CASES])
def test_every_element_through_both_encoders_and_the_decoder(name, size, monkeypatch):
    rows = records()
    routes, pods = lookups_for(rows)
    context = values.Context(CONSTANTS, route=lambda netns, address: Routes.compute(address), pods=pods)
    row = table().row(name)
    for family in (None, 4, 6):
        taken = [r for r in rows if family in (None, r.key.ip_version)]
        fast, slow = packers([spec(name, size)], family, routes, pods, monkeypatch)
        packed = fast(taken)
        assert packed == slow(taken)
        limit = 2 ** (8 * size) - 1 if size else None
        want = [row.value.evaluate(r, context) for r in taken]
        assert list(fast.saturated) == slow.saturated == [sum(1 for v in want if limit is not None and v > limit)]
        got = [v[name] for v in decoded(Template(256, fields.elements([spec(name, size)], PEN)), packed)]
        assert got == [as_decoded(row, v if limit is None else min(v, limit)) for v in want]


@needs_tshark
def test_tshark_decodes_every_reduced_size_but_those_its_dissector_rejects(tmp_path):
    """One message pair per (element, size), each under a template of its own; tshark's values per frame."""
    reduced = [(n, s) for n, s in CASES if s is not None]
    rows = [r for r in records() if r.key.ip_version == 4]
    datagrams, frames = [], {}
    for i, (name, size) in enumerate(reduced):
        template = Template(300 + i, fields.elements([spec(name, size)], PEN))
        pack = fields.compile_flow_packer(template, observation_domain_id=7, exporting_process_id=4242,
                                          system_init_ms=INIT_MS, route=Routes())
        session = ExportSession(7, 65535, [template])
        datagrams += session.template_messages(0)
        datagrams += [p.message for p in session.data_messages([(template.id, pack(rows))], 0)]
        frames[len(datagrams)] = (name, size)  # frame numbers count from 1: the data message's
    path = tmp_path / "reduced.pcap"
    write_pcap(path, datagrams)
    out = subprocess.run(["tshark", "-r", str(path), "-d", f"udp.port=={TSHARK_PORT},cflow", "-T", "fields",
                          "-e", "frame.number", "-Y", "_ws.malformed || _ws.expert.severity >= error"],
                         capture_output=True, text=True, check=True).stdout
    rejected = {frames.get(int(n), ("template frame", int(n))) for n in out.split()}
    assert rejected == TSHARK_REJECTS
    # the values tshark shows for the others: the records' values, capped at the size's largest
    shown = tshark_fields(path, sorted({TSHARK[n][0] for n, s in reduced if n in TSHARK}))
    context = values.Context(CONSTANTS, route=lambda netns, a: Routes.compute(a))
    cursor = dict.fromkeys(shown, 0)
    checked = 0
    for frame, (name, size) in sorted(frames.items()):
        if (name, size) in TSHARK_REJECTS or name not in TSHARK:
            continue
        field, text = TSHARK[name]
        for record in rows:
            want = min(table().row(name).value.evaluate(record, context), 2 ** (8 * size) - 1)
            got = shown[field][cursor[field]]
            cursor[field] += 1
            assert got == text(want) or int(got, 0) == want, (name, size, got, want)
            checked += 1
    assert checked == len(rows) * sum(1 for c in reduced if c not in TSHARK_REJECTS and c[0] in TSHARK)


REDUCED_TEMPLATE = ("flowStartMilliseconds", "flowEndMilliseconds", "sourceIPv4Address", "destinationIPv4Address",
                    "protocolIdentifier", "tcpControlBits:1", "octetDeltaCount:4", "packetDeltaCount:4",
                    "ingressInterface:2", "egressInterface:2", "fragmentIdentification:2", "vlanId:1")


@needs_tshark
def test_reduced_sizes_through_the_exporter_to_the_collector_and_tshark(tmp_path):
    rows = [dataclasses.replace(r, octets=1000 + i) for i, r in enumerate(make_records())]
    rows[0] = dataclasses.replace(rows[0], octets=2**32 + 5)  # too large for octetDeltaCount:4: saturated
    collector, exporter = run_export([TemplateConfig(256, REDUCED_TEMPLATE)], rows)
    assert [e.length for e in exporter.flow_templates[0].template.elements] == [8, 8, 4, 4, 1, 1, 4, 4, 2, 2, 2, 1]
    check_with_collector(collector, exporter, rows, 256)
    assert [r.values["octetDeltaCount"] for r in collector.records()][0] == 2**32 - 1
    checked = check_with_tshark(tmp_path, collector, exporter, rows, 256)
    assert checked == len(rows) * len(REDUCED_TEMPLATE)
    saturated = exporter.saturated_values()  # every reduced element of the template and its IPv6 twin, 0 or more
    assert set(saturated) == {(t, n.partition(":")[0]) for t in (256, 257) for n in REDUCED_TEMPLATE if ":" in n}
    assert {k: v for k, v in saturated.items() if v} == {(256, "octetDeltaCount"): 1}


# ---- a new kind of source: one lookup, one function, rows -------------------------

NAT_ROWS = """\
pen,id,name,type,length,semantics,value,description
,225,postNATSourceIPv4Address,ipv4Address,4,default,nat.post_source | ipv4,
,227,postNAPTSourceTransportPort,unsigned16,2,identifier,nat.post_port | not_icmp,
exporter,100,natRule,string,v,default,nat.rule,
"""


def test_a_new_kind_of_source_is_a_lookup_and_a_function(monkeypatch):
    monkeypatch.setitem(values.LOOKUPS, "nat", values.Lookup(
        "nat", {"post_source": values.BYTES, "post_port": values.INT, "rule": values.BYTES}, "a NAT table"))
    rows = table().extended(read_table(NAT_ROWS).rows)

    def nat(record):  # the one function: what a conntrack look-up would give
        return bytes(reversed(record.key.src)), (record.key.sport + 1000) % 65536, f"rule-{record.key.dport}"

    flows = records()
    names = ("postNATSourceIPv4Address", "postNAPTSourceTransportPort", "natRule", "octetDeltaCount")
    fields.check_template_fields(names, rows)
    template = Template(256, fields.elements(names, PEN, rows))
    options = dict(observation_domain_id=7, exporting_process_id=4242, system_init_ms=INIT_MS,
                   lookups={"nat": nat}, rows=rows)
    fast = fields.compile_flow_packer(template, **options)
    monkeypatch.setenv("KIPFIX_ENCODER", "python")
    slow = fields.compile_flow_packer(template, **options)
    assert type(fast).__name__ == "Packer" and type(slow).__name__ == "function"
    assert fast(flows) == slow(flows)
    store = TemplateStore(rows.model(PEN))
    session = ExportSession(7, 65535, [template])
    messages = session.template_messages(0) + [p.message for p in session.data_messages([(256, fast(flows))], 0)]
    got = [r.values for m in messages for r in decode_message(m, store, "peer").records]
    assert got == [{"postNATSourceIPv4Address": ipaddress.ip_address(bytes(reversed(r.key.src)) if r.key.ip_version == 4
                                                                     else bytes(4)),
                    "postNAPTSourceTransportPort": 0 if r.key.protocol in (1, 58) else (r.key.sport + 1000) % 65536,
                    "natRule": f"rule-{r.key.dport}", "octetDeltaCount": r.octets} for r in flows]


# ---- what sources and transforms mean -----------------------------------------------

def flow(direction=0, version=4, protocol=6, **changes) -> FlowRecord:
    size = 4 if version == 4 else 16
    key = FlowKey(ifindex=9, direction=direction, ip_version=version, protocol=protocol, src=b"\x0a" * size,
                  dst=b"\x0b" * size, sport=1234, dport=(3 << 8 | 1) if protocol in (1, 58) else 80)
    return dataclasses.replace(FlowRecord(key, 5, 700, start_ns=1_700_000_000_123_456_789,
                                          end_ns=1_700_000_060_987_654_321, end_reason=EndReason.IDLE_TIMEOUT,
                                          tos=0xB9, interface_name="eth0", netns="blue"), **changes)


@pytest.mark.parametrize("text, record, want", [
    ("key.ifindex | ingress", flow(direction=0), 9),
    ("key.ifindex | ingress", flow(direction=1), 0),
    ("key.ifindex | egress", flow(direction=1), 9),
    ("key.sport | not_icmp", flow(protocol=17), 1234),
    ("key.sport | not_icmp", flow(protocol=1), 0),
    ("key.sport | not_icmp", flow(version=6, protocol=58), 0),
    ("key.dport | icmpv4", flow(protocol=1), 0x0301),
    ("key.dport | icmpv4", flow(version=6, protocol=58), 0),
    ("key.dport | icmpv6", flow(version=6, protocol=58), 0x0301),
    ("key.src | ipv4", flow(version=4), b"\x0a" * 4),
    ("key.src | ipv4", flow(version=6), b""),
    ("key.dst | ipv6", flow(version=6), b"\x0b" * 16),
    ("record.start_ns | s", flow(), 1_700_000_000),
    ("record.start_ns | ms", flow(), 1_700_000_000_123),
    ("record.start_ns | us", flow(), 1_700_000_000_123_456),
    ("record.end_ns | uptime", flow(), 1_700_000_060_987 - 1_699_999_000_000),
    ("record.start_ns | uptime", flow(start_ns=1_699_998_000_000_000_000), 2**32 - 1_000_000),  # before boot: wraps
    ("record.tos | dscp", flow(), 0xB9 >> 2),
    ("record.interface_name", flow(), b"eth0"),
    ("64 | egress", flow(direction=1), 64),
    ("64 | egress", flow(direction=0), 0),
    ("exporter.system_init_ms", flow(), 1_699_999_000_000),
])
def test_sources_and_transforms_mean_what_docs_elements_md_says(text, record, want):
    context = values.Context({"observation_domain_id": 1, "exporting_process_id": 2,
                              "system_init_ms": 1_699_999_000_000})
    assert values.parse(text).evaluate(record, context) == want


def test_a_value_naming_an_unknown_source_or_transform_says_what_is_accepted():
    with pytest.raises(ValueError, match=r"unknown source 'record.bytes'; accepted: record.ATTR \(.*octets"):
        values.parse("record.bytes")
    with pytest.raises(ValueError, match="unknown transform 'ingres'; accepted: ingress, egress"):
        values.parse("key.ifindex | ingres")
    with pytest.raises(ValueError, match="flowFoo: value 'key.src' gives bytes, which a unsigned32"):
        read_table("pen,id,name,type,length,semantics,value,description\n,1,flowFoo,unsigned32,4,default,key.src,\n")


# ---- reduced sizes in the configuration ----------------------------------------------

@pytest.mark.parametrize("field, message", [
    ("sourceIPv4Address:2", "sourceIPv4Address is an address (ipv4Address) and cannot be sent in fewer octets"),
    ("ipNextHopIPv6Address:8", "is an address (ipv6Address)"),
    ("flowStartMilliseconds:4", "flowStartMilliseconds is a timestamp (dateTimeMilliseconds)"),
    ("interfaceName:8", "interfaceName is a string and cannot"),
    ("protocolIdentifier:1", "protocolIdentifier is an unsigned8, already a single octet"),
    ("octetDeltaCount:8", "octetDeltaCount (unsigned64) takes 8 octets, a reduced size must be fewer; "
                          "accepted: 1..7"),
    ("octetDeltaCount:0", "accepted: 1..7"),
    ("tcpControlBits:two", "size 'two' is not a number of octets"),
])
def test_a_reduced_size_kipfix_cannot_send_is_refused_naming_template_and_element(field, message):
    config = {"collectors": [{"address": "127.0.0.1:4739"}],
              "templates": [{"id": 256, "template": ["octetDeltaCount"]},
                            {"id": 300, "template": ["flowEndMilliseconds", field]}]}
    with pytest.raises(ConfigError) as err:
        parse_config(config)
    assert str(err.value).startswith(f"templates[1].template: information element {field!r}: ")
    assert message in str(err.value)


def test_a_reduced_size_written_as_a_yaml_mapping_gets_a_hint():
    config = {"templates": [{"id": 256, "template": ["octetDeltaCount", {"tcpControlBits": 1}]}]}
    with pytest.raises(ConfigError, match=r"templates\[0\].template\[1\]: \{'tcpControlBits': 1\} is a mapping; "
                                          "a reduced size is written in the element's string without a space: "
                                          "'tcpControlBits:1'"):
        parse_config(config)


def test_flowexporter_fields_carry_reduced_sizes_to_the_agent_config():
    body = {"apiVersion": "kipfix.io/v1alpha1", "kind": "FlowExporter", "metadata": {"name": "a", "uid": "u"},
            "spec": {"collectors": [{"address": "127.0.0.1:4739"}], "interfaces": {"host": {"names": ["eth0"]}},
                     "templates": [{"id": 256, "fields": ["sourceIPv4Address", "tcpControlBits:1",
                                                          "octetDeltaCount:4"]}]}}
    rendered = contribution(parse_exporter(body), "node-a")
    assert rendered["templates"] == [{"id": 256, "fields": ["sourceIPv4Address", "tcpControlBits:1",
                                                            "octetDeltaCount:4"]}]
    assert parse_config(rendered).templates[0].fields == ("sourceIPv4Address", "tcpControlBits:1", "octetDeltaCount:4")
    body["spec"]["templates"][0]["fields"][1] = "sourceIPv4Address:2"
    with pytest.raises(SpecError, match=r"^spec.templates\[0\].fields: information element 'sourceIPv4Address:2'"):
        parse_exporter(body)


def test_the_crd_pattern_is_the_agent_rule_and_takes_every_field_kipfix_accepts():
    import re

    import yaml

    from kipfix.agent.config import rules

    crd = yaml.safe_load((REPO / "crds" / "flowexporter.yaml").read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    pattern = schema["templates"]["items"]["properties"]["fields"]["items"]["pattern"]
    assert pattern == rules.ELEMENT_FIELD_PATTERN
    accepted = [spec(n, s) for n, s in CASES]  # every fillable element at every size it may take
    for field in accepted:
        fields.check_template_fields([field])
    assert all(re.fullmatch(pattern, f) for f in accepted)
    assert not any(re.fullmatch(pattern, f) for f in ("tcpControlBits:", "tcpControlBits: 1", ":1", "a:b"))


# ---- the docs --------------------------------------------------------------------------

def test_docs_elements_md_and_the_readme_table_are_current():
    hint = "run: .venv/bin/python -m kipfix.agent.export.ipfix.elementdocs --write"
    assert (REPO / "docs" / "elements.md").read_text(encoding="utf-8") == elementdocs.render(), hint
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert readme == elementdocs.readme_with_table(readme), hint
    wireshark = next(p for p in elementdocs.render().split("\n\n") if "Wireshark" in p)
    assert all(name in wireshark for name, _ in TSHARK_REJECTS), wireshark


def test_saturated_values_are_a_metric_per_template_and_element():
    from prometheus_client import CollectorRegistry

    from kipfix.agent.daemon import FanoutSink
    from kipfix.agent.export.ipfix.exporter import IpfixExporter
    from kipfix.agent.export.sink import MeteringStats
    from kipfix.agent.metrics import AgentMetrics
    from test_metrics import make_agent, value

    from kipfix.agent.collector.server import Collector
    from kipfix.agent.config import CollectorConfig

    registry = CollectorRegistry()
    collector = Collector(out=None, err=None).start()
    try:
        exporter = IpfixExporter([CollectorConfig("c", "127.0.0.1", collector.port, "udp")],
                                 [TemplateConfig(256, ("sourceIPv4Address", "octetDeltaCount:2", "tcpControlBits:1"))],
                                 1)
        AgentMetrics(registry, make_agent(sink=FanoutSink([exporter])))
        flows = [r for r in make_records() if r.key.ip_version == 4]  # octets 1.5e12 each: none fits 2 octets
        exporter.export(flows + [dataclasses.replace(flows[0], octets=65535)], MeteringStats())
        exporter.close(5)
        assert collector.wait_for(lambda c: c.data_records >= len(flows) + 1, 10)
    finally:
        collector.stop()
    assert [r.values["octetDeltaCount"] for r in collector.records()] == [65535] * (len(flows) + 1)
    assert value(registry, "ipfix_saturated_values_total", template="256", element="octetDeltaCount") == len(flows)
    assert value(registry, "ipfix_saturated_values_total", template="256", element="tcpControlBits") == 0
    assert value(registry, "ipfix_saturated_values_total", template="257", element="octetDeltaCount") == 0
