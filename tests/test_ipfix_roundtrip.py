"""Round trips: IpfixExporter over UDP on loopback -> built-in collector, and the
same datagrams decoded independently by tshark (cflow dissector).

Expected values are each element's row of the element table evaluated for the
FlowRecords the test wrote (values.Value.evaluate), with the route facts the
test configured in its own network namespace.
"""

from __future__ import annotations

import calendar
import ipaddress
import os
import shutil
import socket
import struct
import subprocess
import time
import uuid

import pytest

from kipfix.agent.config import CollectorConfig, TemplateConfig
from kipfix.agent.flows.record import EndReason, FlowKey, FlowRecord
from kipfix.agent.export.ipfix import fields
from kipfix.agent.export.ipfix.values import Context
from kipfix.agent.collector.server import Collector
from kipfix.agent.export.ipfix.exporter import IpfixExporter
from kipfix.agent.export.routes import RouteResolver
from kipfix.agent.export.sink import MeteringStats

MINIMAL = ("FlowEndMilliseconds", "FlowStartMilliseconds", "OctetDeltaCount", "PacketDeltaCount",
           "IpVersion", "FlowDirection", "SourceIPv4Address", "DestinationIPv4Address")
FULL = tuple(fields.fillable_names())
TSHARK_PORT = 4739  # only a label inside the pcap file; nothing is sent to it
BASE_NS = (time.time_ns() // 10**9 - 120) * 10**9 + 123_456_789  # after boot: SysUpTime > 0

needs_tshark = pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark is not installed")


def ip(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


def make_records(netns: str = "") -> list[FlowRecord]:
    """IPv4 and IPv6; TCP, UDP and ICMP; both directions; every counter distinct."""
    specs = [
        (4, 6, "10.77.1.10", "10.77.2.20", 40000, 443),
        (4, 17, "10.77.1.11", "10.88.0.9", 5353, 53),
        (4, 1, "10.77.1.12", "10.77.2.22", 0, (8 << 8) | 0),
        (6, 6, "fd00:77::10", "fd00:77::20", 40001, 80),
        (6, 17, "fd00:77::11", "fd00:88::9", 123, 123),
        (6, 58, "fd00:77::12", "fd00:77::22", 0, (128 << 8) | 0),
        (4, 1, "10.77.1.13", "10.77.2.23", 0, (3 << 8) | 1),
        (6, 58, "fd00:77::13", "fd00:77::23", 0, (1 << 8) | 4),
    ]
    records = []
    for i, (version, proto, src, dst, sport, dport) in enumerate(specs):
        start = BASE_NS + i * 1_000_003_007
        records.append(FlowRecord(
            key=FlowKey(ifindex=2 + i % 3, direction=i % 2, ip_version=version, protocol=proto,
                        src=ip(src), dst=ip(dst), sport=sport, dport=dport),
            packets=11 + i, octets=1_500_000_000_000 + 977 * i, start_ns=start,
            end_ns=start + 2_500_000_123 + i, end_reason=EndReason(1 + i % 5),
            tcp_flags=0x12 | i if proto == 6 else 0, min_ttl=30 + i, max_ttl=60 + i, tos=0xB8 + i,
            vlan_id=100 + i, inner_vlan_id=200 + i, fragment_id=7000 + i,
            interface_name=f"veth{i}", netns=netns, observation_point_id=(i % 2) << 32 | (2 + i % 3)))
    return records


def run_export(templates, records, *, transport="udp", route_resolver=None, stats=None, **collector_opts):
    """Export ``records`` to a fresh collector; returns (collector, exporter) after close()."""
    collector = Collector(out=None, err=None).start()
    try:
        config = CollectorConfig(f"127.0.0.1:{collector.port}", "127.0.0.1", collector.port, transport,
                                 **collector_opts)
        exporter = IpfixExporter([config], templates, observation_domain_id=4242,
                                 exporting_process_id=77, route_resolver=route_resolver)
        exporter.export(records, stats or MeteringStats())
        exporter.close(10)
        flow_ids = {ft.template.id for ft in exporter.flow_templates}
        expected = len(records) - exporter.unselected.flows  # each flow in exactly one record
        assert collector.wait_for(lambda c: sum(r.template_id in flow_ids for r in c.records()) >= expected, 10)
    finally:
        collector.stop()
    assert collector.errors == []
    return collector, exporter


def expected_values(record: FlowRecord, names, exporter, routes=None) -> dict:
    """What each element must decode to: its row's value in the element table (agent/data/elements.csv)
    for ``record``, with the routes the test configured (``routes``: address -> (prefix length, next hop)).
    ``names`` are template fields: a reduced size (``octetDeltaCount:4``) caps the value at the largest
    that size holds, as the encoders do."""
    def route(netns, address):
        prefix, next_hop = (routes or {}).get(address, (0, None))
        return prefix, ipaddress.ip_address(next_hop).packed if next_hop else bytes(len(address))

    context = Context({"observation_domain_id": exporter.observation_domain_id,
                       "exporting_process_id": exporter.exporting_process_id,
                       "system_init_ms": exporter.system_init_ms}, route=route)  # no pod index: empty pods
    values = {}
    for name in names:
        row, size = fields.parse_field(name)
        value = row.value.evaluate(record, context)
        if size is not None:
            value = min(value, 2 ** (8 * size) - 1)
        if row.type in ("ipv4Address", "ipv6Address"):
            value = ipaddress.ip_address(value.ljust(row.length, b"\0"))  # zeros: another family's record
        elif row.type == "string":
            value = value.decode()
        values[row.name] = value
    return values


def field_specs(template) -> list[str]:
    """The template's elements as config fields: name, or name:octets for a reduced size."""
    return [f"{e.name}:{e.length}" if e.reduced else e.name for e in template.elements]


def template_for(record: FlowRecord, exporter: IpfixExporter, configured_id: int):
    for ft in exporter.flow_templates:
        if ft.configured_id == configured_id and ft.family in (None, record.key.ip_version):
            return ft.template
    raise AssertionError("no template")


def sent_order(records, exporter, configured_id):
    """Records in the order the exporter puts them on the wire: per template, IPv4 then IPv6."""
    order = []
    for ft in exporter.flow_templates:
        if ft.configured_id == configured_id:
            for family in (4, 6):
                order += [r for r in records if r.key.ip_version == family and ft.family in (None, family)]
    return order


# ---- tshark ------------------------------------------------------------------

def write_pcap(path, datagrams) -> None:
    """Datagrams as IPv4/UDP packets to TSHARK_PORT (link type raw IP)."""
    with open(path, "wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 101))
        for i, data in enumerate(datagrams):
            udp = struct.pack("!HHHH", 40000, TSHARK_PORT, 8 + len(data), 0) + data
            header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), i & 0xFFFF, 0, 64, 17, 0,
                                 ip("127.0.0.1"), ip("127.0.0.1"))
            total = sum(struct.unpack("!10H", header))
            while total >> 16:
                total = (total & 0xFFFF) + (total >> 16)
            header = header[:10] + struct.pack("!H", ~total & 0xFFFF) + header[12:]
            packet = header + udp
            f.write(struct.pack("<IIII", 1_790_000_000, i, len(packet), len(packet)) + packet)


def tshark_fields(path, names) -> dict[str, list[str]]:
    """Every occurrence of each tshark field, in packet and record order."""
    command = ["tshark", "-r", str(path), "-d", f"udp.port=={TSHARK_PORT},cflow", "-T", "fields",
               "-E", "occurrence=a", "-E", "aggregator=|", "-E", "separator=/t"]
    for name in names:
        command += ["-e", name]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    values: dict[str, list[str]] = {n: [] for n in names}
    for line in out.splitlines():
        for name, cell in zip(names, line.split("\t")):
            if cell:
                # the message header's observation domain is cflow.od_id too: drop it
                values[name] += cell.split("|")[1:] if name == "cflow.od_id" else cell.split("|")
    return values


def tshark_malformed(path) -> int:
    out = subprocess.run(["tshark", "-r", str(path), "-d", f"udp.port=={TSHARK_PORT},cflow",
                          "-Y", "_ws.malformed || _ws.expert.severity >= error || !cflow"],
                         capture_output=True, text=True, check=True).stdout
    return len(out.splitlines())


def parse_abstime(text: str) -> int:
    """tshark's 'Nov 22, 2026 04:10:00.074394619 UTC' -> ns since the epoch."""
    stamp, fraction = text.replace(" UTC", "").rsplit(".", 1)
    seconds = calendar.timegm(time.strptime(stamp, "%b %d, %Y %H:%M:%S"))
    return seconds * 10**9 + int(fraction.ljust(9, "0")[:9])


# element -> (tshark field, how to turn the expected value into tshark's text)
def _hex4(v): return f"0x{v:04x}"
def _hex2(v): return f"0x{v:02x}"


TSHARK = {
    "octetDeltaCount": ("cflow.octets", str), "packetDeltaCount": ("cflow.packets", str),
    "ipVersion": ("cflow.ip_version", str), "flowDirection": ("cflow.direction", str),
    "sourceIPv4Address": ("cflow.srcaddr", str), "destinationIPv4Address": ("cflow.dstaddr", str),
    "sourceIPv6Address": ("cflow.srcaddrv6", str), "destinationIPv6Address": ("cflow.dstaddrv6", str),
    "protocolIdentifier": ("cflow.protocol", str), "sourceTransportPort": ("cflow.srcport", str),
    "destinationTransportPort": ("cflow.dstport", str), "tcpControlBits": ("cflow.tcpflags", _hex4),
    "icmpTypeCodeIPv4": ("cflow.icmp_type_code_ipv4", _hex4),
    "ipClassOfService": ("cflow.tos", _hex2), "ipDiffServCodePoint": ("cflow.ip_dscp", str),
    "minimumTTL": ("cflow.ttl_min", str), "maximumTTL": ("cflow.ttl_max", str),
    "vlanId": ("cflow.vlanid", str), "dot1qVlanId": ("cflow.dot1q_vlan_id", str),
    "dot1qCustomerVlanId": ("cflow.dot1q_customer_vlan_id", str),
    "flowEndReason": ("cflow.flow_end_reason", str),
    "forwardingStatus": ("cflow.forwarding_status", lambda v: str(v >> 6)),
    "fragmentIdentification": ("cflow.frag_ident", str),
    "sourceIPv4PrefixLength": ("cflow.srcmask", str), "destinationIPv4PrefixLength": ("cflow.dstmask", str),
    "sourceIPv6PrefixLength": ("cflow.srcmaskv6", str), "destinationIPv6PrefixLength": ("cflow.dstmaskv6", str),
    "ipNextHopIPv4Address": ("cflow.nexthop", str), "ipNextHopIPv6Address": ("cflow.nexthopv6", str),
    "interfaceName": ("cflow.if_name", str), "observationDomainId": ("cflow.od_id", str),
    "exportingProcessId": ("cflow.flow_exporter", str), "observationPointId": ("cflow.observation_point_id", str),
    "ingressInterface": ("cflow.inputint", str), "egressInterface": ("cflow.outputint", str),
    "flowStartSysUpTime": ("cflow.timestart", lambda v: f"{v // 1000}.{v % 1000:03d}000000"),
    "flowEndSysUpTime": ("cflow.timeend", lambda v: f"{v // 1000}.{v % 1000:03d}000000"),
}
TIME_ELEMENTS = {  # elements tshark shows as cflow.abstimestart/abstimeend, ns since the epoch
    "flowStartSeconds": ("cflow.abstimestart", 10**9), "flowEndSeconds": ("cflow.abstimeend", 10**9),
    "flowStartMilliseconds": ("cflow.abstimestart", 10**6), "flowEndMilliseconds": ("cflow.abstimeend", 10**6),
    "flowStartMicroseconds": ("cflow.abstimestart", 10**3), "flowEndMicroseconds": ("cflow.abstimeend", 10**3),
    "flowStartNanoseconds": ("cflow.abstimestart", 1), "flowEndNanoseconds": ("cflow.abstimeend", 1),
}


def check_with_tshark(tmp_path, collector, exporter, records, configured_id, routes=None):
    # Options data go in messages of their own; leave them out so every cflow field is a flow's.
    datagrams = [r.raw for r in collector.received if not r.message.options_records]
    path = tmp_path / "ipfix.pcap"
    write_pcap(path, datagrams)
    assert tshark_malformed(path) == 0
    order = sent_order(records, exporter, configured_id)
    names = {e.name for r in order for e in template_for(r, exporter, configured_id).elements}
    tshark_names = sorted({TSHARK[n][0] for n in names if n in TSHARK}
                          | {TIME_ELEMENTS[n][0] for n in names if n in TIME_ELEMENTS}
                          | ({"cflow.icmp_ipv6_type", "cflow.icmp_ipv6_code"}
                             if "icmpTypeCodeIPv6" in names or "icmpTypeCodeIPv4" in names else set())
                          | {"cflow.sys_init_time"})
    got = tshark_fields(path, tshark_names)
    cursor = {n: 0 for n in tshark_names}
    checked = 0
    for record in order:
        template = template_for(record, exporter, configured_id)
        expected = expected_values(record, field_specs(template), exporter, routes)
        for element in template.elements:
            name, want = element.name, expected[element.name]
            if name in TSHARK:
                field, text = TSHARK[name]
                seen = got[field][cursor[field]]
                # a reduced size shows fewer hex digits (0x12 for tcpControlBits:1)
                assert seen == text(want) or (element.reduced and int(seen, 0) == want), (name, record)
                cursor[field] += 1
            elif name in TIME_ELEMENTS:
                field, unit = TIME_ELEMENTS[name]
                seen = parse_abstime(got[field][cursor[field]])
                cursor[field] += 1
                want_ns = want * unit
                # tshark prints NTP fractions truncated: allow what the wire format cannot carry
                slack = {1: 1, 1000: 500}.get(unit, 0)
                assert abs(seen - want_ns) <= slack, (name, seen, want_ns)
            elif name == "icmpTypeCodeIPv6":
                t, c = got["cflow.icmp_ipv6_type"][cursor["cflow.icmp_ipv6_type"]], \
                    got["cflow.icmp_ipv6_code"][cursor["cflow.icmp_ipv6_code"]]
                cursor["cflow.icmp_ipv6_type"] += 1
                cursor["cflow.icmp_ipv6_code"] += 1
                assert (int(t), int(c)) == (want >> 8, want & 0xFF), (name, record)
            elif name == "systemInitTimeMilliseconds":
                seen = parse_abstime(got["cflow.sys_init_time"][cursor["cflow.sys_init_time"]])
                cursor["cflow.sys_init_time"] += 1
                assert seen == want * 10**6
            else:
                assert element.pen  # enterprise elements: tshark cannot name them (tests/test_pod_ipfix.py)
                continue
            checked += 1
    for field, used in cursor.items():  # nothing extra decoded
        assert used == len(got[field]), field
    return checked


def check_with_collector(collector, exporter, records, configured_id, routes=None):
    order = sent_order(records, exporter, configured_id)
    decoded = [r for r in collector.records()
               if any(ft.configured_id == configured_id and ft.template.id == r.template_id
                      for ft in exporter.flow_templates)]
    assert len(decoded) == len(order)
    for record, got in zip(order, decoded):
        template = template_for(record, exporter, configured_id)
        assert got.template_id == template.id
        assert got.values == expected_values(record, field_specs(template), exporter, routes)


# ---- tests -------------------------------------------------------------------

def test_minimal_template_round_trip_collector_and_tshark(tmp_path):
    records = make_records()
    collector, exporter = run_export([TemplateConfig(256, MINIMAL)], records)
    # IPv6 flows went to the derived template, not dropped
    assert [(ft.template.id, ft.family, ft.derived) for ft in exporter.flow_templates] == \
        [(256, 4, False), (257, 6, True)]
    check_with_collector(collector, exporter, records, 256)
    if shutil.which("tshark"):
        assert check_with_tshark(tmp_path, collector, exporter, records, 256) == len(records) * len(MINIMAL)


@pytest.fixture
def route_netns():
    """A namespace with known routes: 10.77.1.0/24 and fd00:77::/64 on-link,
    10.88.0.0/16 via 10.77.1.1, fd00:88::/48 via fd00:77::1."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 to create a network namespace")
    name = f"kipfix-ipfix-{uuid.uuid4().hex[:8]}"
    commands = [
        ["ip", "netns", "add", name],
        ["ip", "-n", name, "link", "add", "r0", "type", "veth", "peer", "name", "r1"],
        ["ip", "-n", name, "link", "set", "r0", "up"], ["ip", "-n", name, "link", "set", "r1", "up"],
        ["ip", "-n", name, "addr", "add", "10.77.1.2/24", "dev", "r0"],
        ["ip", "-n", name, "route", "add", "10.77.2.0/25", "via", "10.77.1.3"],
        ["ip", "-n", name, "route", "add", "10.88.0.0/16", "via", "10.77.1.1"],
        ["ip", "-n", name, "-6", "addr", "add", "fd00:77::2/64", "dev", "r0", "nodad"],
        ["ip", "-n", name, "-6", "route", "add", "fd00:88::/48", "via", "fd00:77::1"],
    ]
    try:
        for command in commands:
            subprocess.run(command, check=True, capture_output=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


# prefix length and next hop for each address of make_records(), from the routes above
ROUTES = {
    ip("10.77.1.10"): (24, None), ip("10.77.1.11"): (24, None), ip("10.77.1.12"): (24, None),
    ip("10.77.1.13"): (24, None),
    ip("10.77.2.20"): (25, "10.77.1.3"), ip("10.77.2.22"): (25, "10.77.1.3"), ip("10.77.2.23"): (25, "10.77.1.3"),
    ip("10.88.0.9"): (16, "10.77.1.1"),
    ip("fd00:77::10"): (64, None), ip("fd00:77::11"): (64, None), ip("fd00:77::12"): (64, None),
    ip("fd00:77::13"): (64, None), ip("fd00:77::20"): (64, None), ip("fd00:77::22"): (64, None),
    ip("fd00:77::23"): (64, None), ip("fd00:88::9"): (48, "fd00:77::1"),
}


def test_full_template_round_trip_collector_and_tshark(tmp_path, route_netns):
    records = make_records(netns=route_netns)
    resolver = RouteResolver()
    try:
        collector, exporter = run_export([TemplateConfig(300, FULL)], records, route_resolver=resolver)
    finally:
        resolver.close()
    # both families' addresses named: split, IPv4 flows without the IPv6 elements and the reverse
    assert [(ft.template.id, ft.family, ft.derived) for ft in exporter.flow_templates] == \
        [(300, 4, False), (301, 6, True)]
    v4_only = {fields.canonical_name(n) for n in FULL if "IPv4" in n}
    v6_only = {fields.canonical_name(n) for n in FULL if "IPv6" in n}
    assert v4_only and v6_only
    assert [set(e.name for e in ft.template.elements) & (v4_only | v6_only) for ft in exporter.flow_templates] == \
        [v4_only, v6_only]
    check_with_collector(collector, exporter, records, 300, ROUTES)
    if shutil.which("tshark"):
        checked = check_with_tshark(tmp_path, collector, exporter, records, 300, ROUTES)
        # all but the enterprise elements
        assert checked == sum(sum(1 for e in template_for(r, exporter, 300).elements if not e.pen) for r in records)


def test_options_records_report_observation_points_and_ignored_packets():
    stats = MeteringStats(observed_packets=1000, observed_octets=64000, ignored_packets=17, ignored_octets=1700,
                          ignored_first_ms=1_700_000_000_123, ignored_last_ms=1_700_000_009_456,
                          observation_points=((2, 2, "veth0", "host"), ((5 << 32) | 2, 2, "eth0", "pod-a")))
    collector, exporter = run_export([TemplateConfig(256, MINIMAL)], make_records(), stats=stats)
    options = [r for m in collector.messages() for r in m.options_records]
    by_scope = {}
    for record in options:
        by_scope.setdefault(record.scope[0], []).append(record.values)
    # the latest report of each kind (the first may predate export()); two interfaces with ifindex 2, told
    # apart by their observation point
    assert by_scope["observationPointId"][-2:] == [
        {"observationPointId": 2, "ingressInterface": 2, "interfaceName": "veth0", "networkNamespace": "host"},
        {"observationPointId": (5 << 32) | 2, "ingressInterface": 2, "interfaceName": "eth0",
         "networkNamespace": "pod-a"}]
    reliability = [v for v in by_scope["observationDomainId"] if "ignoredPacketTotalCount" in v][-1]
    assert reliability == {"observationDomainId": 4242, "ignoredPacketTotalCount": 17, "ignoredOctetTotalCount": 1700,
                           "observationTimeMilliseconds": [1_700_000_000_123, 1_700_000_009_456]}
    process = [v for v in by_scope["observationDomainId"] if "systemInitTimeMilliseconds" in v][-1]
    assert process == {"observationDomainId": 4242, "systemInitTimeMilliseconds": exporter.system_init_ms,
                       "packetTotalCount": 1000, "octetTotalCount": 64000}
    exporting = by_scope["exportingProcessId"][-1]
    assert exporting == {"exportingProcessId": 77, "notSentFlowTotalCount": 0, "notSentPacketTotalCount": 0,
                         "notSentOctetTotalCount": 0, "observationTimeMilliseconds": [0, 0]}


def wait_for_probe(port: int, path) -> None:
    """Send header-only IPFIX messages to ``port`` until a new one shows in the capture file."""
    def probes() -> int:
        out = subprocess.run(["tshark", "-r", str(path), "-Y", "udp.length == 24"], capture_output=True, text=True)
        return len(out.stdout.splitlines())

    before = probes()
    deadline = time.monotonic() + 30
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        while time.monotonic() < deadline:
            probe.sendto(struct.pack("!HHIII", 10, 16, 0, 0, 4242), ("127.0.0.1", port))
            if probes() > before:
                return
            time.sleep(0.1)
    raise AssertionError("the capture never showed the probe")


@needs_tshark
@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_live_capture_on_loopback_decodes_cleanly(tmp_path, transport):
    """tshark captures what goes on the wire (port of our own collector only) and decodes every record."""
    if os.geteuid() != 0:
        pytest.skip("capturing on loopback needs root")
    records = [r for r in make_records() if r.key.ip_version == 4] * 100  # many messages, TCP segments
    collector = Collector(out=None, err=None).start()
    path = tmp_path / "live.pcapng"
    capture = subprocess.Popen(["tshark", "-i", "lo", "-f", f"port {collector.port}", "-w", str(path)],
                               stderr=subprocess.PIPE, text=True)
    decode = ["tshark", "-r", str(path), "-d", f"{transport}.port=={collector.port},cflow"]

    def decoded_pairs() -> list:
        out = subprocess.run(decode + ["-T", "fields", "-E", "occurrence=a", "-E", "aggregator=|",
                                       "-e", "cflow.packets", "-e", "cflow.octets"],
                             capture_output=True, text=True).stdout
        pairs = []
        for line in out.splitlines():
            packets, octets = (line.split("\t") + [""])[:2]
            if packets:
                pairs += zip(map(int, packets.split("|")), map(int, octets.split("|")))
        return pairs

    try:
        for line in capture.stderr:  # wait until the capture runs
            if "Capturing on" in line:
                break
        # ... and until it sees packets: empty IPFIX messages (a header alone) from another socket
        wait_for_probe(collector.port, path)
        exporter = IpfixExporter([CollectorConfig(f"127.0.0.1:{collector.port}", "127.0.0.1", collector.port,
                                                  transport)], [TemplateConfig(256, MINIMAL)], 4242)
        exporter.export(records, MeteringStats(observation_points=((2, 2, "veth0", "host"),)))
        exporter.close(10)
        assert collector.wait_for(lambda c: c.data_records >= len(records), 10)
        wait_for_probe(collector.port, path)  # once a later probe is in the file, everything before is
    finally:
        collector.stop()
        capture.terminate()
        capture.wait(30)
    bad = subprocess.run(decode + ["-Y", "_ws.malformed || _ws.expert.severity >= error"],
                         capture_output=True, text=True, check=True).stdout
    assert bad == ""
    assert decoded_pairs() == [(r.packets, r.octets) for r in records]


def test_the_collector_names_each_records_interface_and_namespace():
    """Two interfaces with ifindex 2 in two namespaces: the collector tells them apart by observation point."""
    import io
    import json

    records = [r for r in make_records() if r.key.ip_version == 4][:2]
    points = ((2, 2, "veth0", "host"), ((5 << 32) | 2, 2, "eth0", "pod-a"))
    for record, point in zip(records, points):
        record.observation_point_id = point[0]
    template = TemplateConfig(256, MINIMAL + ("observationPointId", "ingressInterface"))
    for json_lines in (False, True):
        out = io.StringIO()
        collector = Collector(out=out, err=None, json_lines=json_lines).start()
        try:
            config = CollectorConfig(f"127.0.0.1:{collector.port}", "127.0.0.1", collector.port, "udp")
            exporter = IpfixExporter([config], [template], observation_domain_id=4242)
            exporter.export(records, MeteringStats(observation_points=points))
            exporter.close(10)
            assert collector.wait_for(lambda c: len(c.records(256)) == 2, 10)
        finally:
            collector.stop()
        lines = [line for line in out.getvalue().splitlines() if line.startswith("2") or '"template": 256' in line]
        if json_lines:
            assert [json.loads(line)["observationPoint"] for line in lines] == [
                {"netns": "host", "interface": "veth0", "ifindex": 2},
                {"netns": "pod-a", "interface": "eth0", "ifindex": 2}]
        else:
            assert [line.split()[6] for line in lines] == ["veth0@host", "eth0@pod-a"]
