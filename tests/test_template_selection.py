"""Every flow is exported exactly once per collector: in the one template that selects it.

Collectors sum records, so these tests send real IPFIX over loopback to the
built-in collector and check that the records it decodes hold every flow
once, under the template the rules of selection.py give it, and that the
sums equal the records' own.
"""

from __future__ import annotations

import logging

import pytest

from kipfix.agent.config import ConfigError, TemplateConfig, parse_config
from kipfix.agent.export.ipfix.selection import plan_templates, protocol_number
from test_ipfix_roundtrip import MINIMAL, make_records, run_export

V4 = ("flowStartMilliseconds", "sourceIPv4Address", "destinationIPv4Address", "protocolIdentifier",
      "packetDeltaCount", "octetDeltaCount")
V6 = tuple(n.replace("IPv4", "IPv6") for n in V4)


def flows_by_template(collector, exporter) -> dict[int, list]:
    """template id -> decoded flow records (options records left out)."""
    ids = {ft.template.id for ft in exporter.flow_templates}
    out: dict[int, list] = {}
    for record in collector.records():
        if record.template_id in ids:
            out.setdefault(record.template_id, []).append(record.values)
    return out


def assert_each_flow_once(collector, exporter, records):
    decoded = [v for values in flows_by_template(collector, exporter).values() for v in values]
    assert sorted((v["packetDeltaCount"], v["octetDeltaCount"]) for v in decoded) == \
        sorted((r.packets, r.octets) for r in records)


def test_an_ipv4_and_an_ipv6_template_take_each_flow_once():
    records = make_records()
    collector, exporter = run_export([TemplateConfig(300, V4), TemplateConfig(301, V6)], records)
    # neither gets a derived counterpart: the other template takes that family
    assert [(ft.template.id, ft.family, ft.derived) for ft in exporter.flow_templates] == \
        [(300, 4, False), (301, 6, False)]
    by_template = flows_by_template(collector, exporter)
    assert len(by_template[300]) == sum(r.key.ip_version == 4 for r in records)
    assert len(by_template[301]) == sum(r.key.ip_version == 6 for r in records)
    assert_each_flow_once(collector, exporter, records)
    assert exporter.unselected.flows == 0


def test_three_templates_still_send_each_flow_once():
    """The issue's case: three templates used to send every flow three times."""
    records = make_records()
    collector, exporter = run_export([TemplateConfig(300, V4 + ("tcpControlBits",), protocols=(6,)),
                                      TemplateConfig(256, MINIMAL), TemplateConfig(301, V6)], records)
    assert_each_flow_once(collector, exporter, records)
    # 300 takes IPv4 TCP, 256 the other IPv4 flows, 301 every IPv6 flow: no derived template is needed
    assert [ft.template.id for ft in exporter.flow_templates] == [300, 256, 301]
    by_template = flows_by_template(collector, exporter)
    assert {k: len(v) for k, v in by_template.items()} == {
        300: sum(r.key.ip_version == 4 and r.key.protocol == 6 for r in records),
        256: sum(r.key.ip_version == 4 and r.key.protocol != 6 for r in records),
        301: sum(r.key.ip_version == 6 for r in records)}


def test_first_match_wins_tcp_then_icmp_then_the_rest():
    """L3AF's shape: a TCP template with TCP flags, an ICMP one with type and code, one for the rest."""
    tcp = TemplateConfig(400, V4 + ("sourceTransportPort", "destinationTransportPort", "tcpControlBits"),
                         protocols=(6,))
    icmp = TemplateConfig(401, V4 + ("icmpTypeCodeIPv4",), protocols=(1, 58))
    rest = TemplateConfig(402, V4 + ("sourceTransportPort", "destinationTransportPort"))
    records = make_records()
    collector, exporter = run_export([tcp, icmp, rest], records)
    plans = {ft.template.id: ft.plan for ft in exporter.flow_templates}
    # each IPv4-only template gets an IPv6 counterpart for what no configured template takes: IPv6 flows
    assert [(p.id, p.family, sorted(p.protocols or []), p.derived) for p in plans.values()] == [
        (400, 4, [6], False), (401, 4, [1, 58], False), (402, 4, [], False),
        (403, 6, [6], True), (404, 6, [1, 58], True), (405, 6, [], True)]
    by_template = flows_by_template(collector, exporter)
    want = {400: (4, {6}), 401: (4, {1}), 402: (4, {17}), 403: (6, {6}), 404: (6, {58}), 405: (6, {17})}
    for template_id, (version, protocols) in want.items():
        got = by_template[template_id]
        assert {v["protocolIdentifier"] for v in got} == protocols, template_id
        assert len(got) == sum(r.key.ip_version == version and r.key.protocol in protocols for r in records)
    assert {v["tcpControlBits"] for v in by_template[400]} == {r.tcp_flags for r in records
                                                              if r.key.protocol == 6 and r.key.ip_version == 4}
    assert_each_flow_once(collector, exporter, records)


def test_a_template_naming_both_families_is_split_and_never_carries_zero_addresses():
    records = make_records()
    both = V4 + ("sourceIPv6Address", "destinationIPv6Address", "icmpTypeCodeIPv4", "icmpTypeCodeIPv6")
    collector, exporter = run_export([TemplateConfig(500, both)], records)
    names = {ft.template.id: [e.name for e in ft.template.elements] for ft in exporter.flow_templates}
    assert names == {500: list(V4) + ["icmpTypeCodeIPv4"],
                     501: ["flowStartMilliseconds", "protocolIdentifier", "packetDeltaCount", "octetDeltaCount",
                           "sourceIPv6Address", "destinationIPv6Address", "icmpTypeCodeIPv6"]}
    by_template = flows_by_template(collector, exporter)
    assert all(int(v["sourceIPv4Address"]) != 0 for v in by_template[500])
    assert all(int(v["sourceIPv6Address"]) != 0 for v in by_template[501])
    assert_each_flow_once(collector, exporter, records)


def test_flows_no_template_selects_are_counted_and_reported(caplog):
    records = make_records()
    with caplog.at_level(logging.WARNING, logger="kipfix.agent.export.ipfix.exporter"):
        collector, exporter = run_export([TemplateConfig(600, V4, ip_versions=(4,), protocols=(6, 17))], records)
    left = [r for r in records if r.key.ip_version == 6 or r.key.protocol not in (6, 17)]
    assert (exporter.unselected.flows, exporter.unselected.packets, exporter.unselected.octets) == \
        (len(left), sum(r.packets for r in left), sum(r.octets for r in left))
    assert_each_flow_once(collector, exporter, [r for r in records if r not in left])
    messages = [r.getMessage() for r in caplog.records]
    assert "no template selects IPv6 flows of every protocol: they are not exported" in " ".join(messages)
    assert any(m.startswith(f"{len(left)} flow records no template selects were not exported") for m in messages)
    # reported once per interval, not once per batch
    exporter.encode(left)
    assert exporter.unselected.flows == 2 * len(left)
    assert sum("flow records no template selects" in r.getMessage() for r in caplog.records) == 1


def test_the_rule_is_the_same_for_the_config_check():
    config = parse_config({"templates": [
        {"id": 700, "template": list(V4) + ["tcpControlBits"], "select": {"protocols": ["tcp"]}},
        {"id": 701, "template": list(V4)},
    ]})
    assert [(p.id, p.describe()) for p in plan_templates(config.templates)] == [
        (700, "IPv4 flows of protocol tcp"), (701, "IPv4 flows"),
        (702, "IPv6 flows of protocol tcp"), (703, "IPv6 flows")]
    with pytest.raises(ConfigError, match=r"templates\[1\] \(id 701\): takes no flow"):
        parse_config({"templates": [{"id": 700, "template": list(V4)},
                                    {"id": 701, "template": list(V4), "select": {"protocols": ["tcp"]}}]})


@pytest.mark.parametrize("value, number", [("tcp", 6), ("UDP", 17), ("icmpv6", 58), ("ipv6-icmp", 58), (132, 132),
                                           ("47", 47)])
def test_protocol_names_and_numbers(value, number):
    assert protocol_number(value) == number


def test_a_counterpart_never_repeats_an_element():
    # an IPv6 template that also names icmpTypeCodeIPv4: its IPv4 counterpart names each element once
    (v6, v4) = plan_templates([TemplateConfig(800, ("destinationIPv6Address", "icmpTypeCodeIPv4", "icmpTypeCodeIPv6",
                                                    "tcpControlBits:1"))])
    assert (v6.family, v4.family) == (6, 4)
    assert v4.names == ("destinationIPv4Address", "icmpTypeCodeIPv6", "icmpTypeCodeIPv4", "tcpControlBits:1")
