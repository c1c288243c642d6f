"""Kubernetes pod metadata in IPFIX: a PodIndex -> IpfixExporter -> UDP on loopback ->
the built-in collector (names) and tshark from a live loopback capture (PEN, type ids, bytes).

The expected names are the pods the test put in the index; tshark has no
dictionary for kipfix's enterprise elements, so it shows them as enterprise
private entries: type id and the value's octets.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import re
import shutil
import subprocess
import time
import xml.etree.ElementTree as ET

import pytest

from kipfix.agent.config import CollectorConfig, TemplateConfig, parse_config
from kipfix.agent.daemon import build_sink
from kipfix.agent.flows.record import EndReason, FlowKey, FlowRecord
from kipfix.agent.export.ipfix import fields
from kipfix.agent.collector.server import Collector, record_line
from kipfix.agent.export.ipfix.decoder import DecodedRecord
from kipfix.agent.export.ipfix.exporter import IpfixExporter
from kipfix.agent.kube.podmeta import PodIndex, PodInfo
from kipfix.agent.export.sink import MeteringStats

from test_ipfix_cli import start_collect
from test_ipfix_roundtrip import BASE_NS, wait_for_probe

POD_NAMES = fields.POD_NAMES
# ids of the pod elements under the exporter's PEN (agent/data/kipfix-elements.csv)
POD_IDS = dict(zip(POD_NAMES, range(2, 12)))
TEMPLATE = ("flowStartMilliseconds", "octetDeltaCount", "sourceIPv4Address", "destinationIPv4Address") + POD_NAMES

WEB = PodInfo("u-web", "web-7d9f8b6c5-x2x4q", "shop", "node-a", ("10.244.1.17", "fd00:10:244:1::11"),
              "Deployment", "web", phase="Running")
DB = PodInfo("u-db", "db-0", "data", "node-b", ("10.244.2.5", "fd00:10:244:2::5"), "StatefulSet", "db",
             phase="Running")
AGENT = PodInfo("u-agent", "kipfix-agent-9xk2p", "kipfix", "node-a", ("192.168.10.11",), "DaemonSet",
                "kipfix-agent", phase="Running", host_network=True)  # host network: not indexed by IP
BARE = PodInfo("u-bare", "débug-shell", "default", "node-b", ("10.244.2.9",), phase="Running")  # no controller


def index() -> PodIndex:
    return PodIndex([WEB, DB, AGENT, BARE])


def flow(i: int, src: str, dst: str) -> FlowRecord:
    version = ipaddress.ip_address(src).version
    start = BASE_NS + i * 1_000_000_007
    return FlowRecord(key=FlowKey(ifindex=3, direction=i % 2, ip_version=version, protocol=6,
                                  src=ipaddress.ip_address(src).packed, dst=ipaddress.ip_address(dst).packed,
                                  sport=40000 + i, dport=8080),
                      packets=10 + i, octets=1000 + i, start_ns=start, end_ns=start + 5_000_000,
                      end_reason=EndReason.IDLE_TIMEOUT, tcp_flags=0x1B, min_ttl=64, max_ttl=64, tos=0,
                      vlan_id=0, inner_vlan_id=0, fragment_id=0, interface_name="eth0", netns="")


# (source, destination) and the pods they belong to (None: no pod)
FLOWS = [
    ("10.244.1.17", "10.244.2.5", WEB, DB),           # pod to pod
    ("10.244.2.5", "10.244.1.17", DB, WEB),           # and back
    ("192.168.10.11", "10.244.2.9", None, BARE),      # host network (the node's IP) to a bare pod
    ("10.244.1.17", "203.0.113.7", WEB, None),        # pod to outside the cluster
    ("fd00:10:244:1::11", "fd00:10:244:2::5", WEB, DB),  # IPv6 (the derived template)
]


def records() -> list[FlowRecord]:
    return [flow(i, src, dst) for i, (src, dst, _, _) in enumerate(FLOWS)]


def pod_values(source: PodInfo | None, destination: PodInfo | None) -> dict[str, str]:
    values = {}
    for side, info in (("source", source), ("destination", destination)):
        got = ("", "", "", "", "") if info is None else (info.name, info.namespace, info.node,
                                                         info.workload_name, info.workload_kind)
        values.update(zip((f"{side}{s}" for s in fields.POD_ELEMENTS), got))
    return values


def expected_in_wire_order() -> list[dict[str, str]]:
    """The exporter sends IPv4 records (template 256) first, then IPv6 ones (its derived twin)."""
    v4 = [pod_values(s, d) for src, _, s, d in FLOWS if ipaddress.ip_address(src).version == 4]
    v6 = [pod_values(s, d) for src, _, s, d in FLOWS if ipaddress.ip_address(src).version == 6]
    return v4 + v6


def export(collector: Collector, pen: int = 32473, pods=None, templates=(TemplateConfig(256, TEMPLATE),)):
    config = CollectorConfig(f"127.0.0.1:{collector.port}", "127.0.0.1", collector.port, "udp")
    exporter = IpfixExporter([config], templates, observation_domain_id=7, enterprise_number=pen,
                             pod_lookup=pods)
    exporter.export(records(), MeteringStats())
    exporter.close(10)
    assert collector.wait_for(lambda c: c.data_records >= len(FLOWS) * len(templates), 10)
    return exporter


# ---- the built-in collector -----------------------------------------------------------

@pytest.mark.parametrize("pen", [32473, 64000])
def test_builtin_collector_decodes_pod_elements_by_name(pen):
    collector = Collector(out=None, err=None, enterprise_number=pen).start()
    try:
        exporter = export(collector, pen, index())
    finally:
        collector.stop()
    assert collector.errors == []
    assert [(ft.template.id, ft.family) for ft in exporter.flow_templates] == [(256, 4), (257, 6)]
    got = [{n: r.values[n] for n in POD_NAMES} for r in collector.records()]
    assert got == expected_in_wire_order()
    assert got[0]["sourcePodName"] == "web-7d9f8b6c5-x2x4q" and got[0]["destinationWorkloadKind"] == "StatefulSet"
    assert got[2]["destinationPodName"] == "débug-shell" and got[2]["destinationWorkloadKind"] == ""
    assert all(e.pen == pen for ft in exporter.flow_templates for e in ft.template.elements if e.name in POD_NAMES)


def test_collector_with_another_pen_does_not_misname_them():
    collector = Collector(out=None, err=None).start()  # expects 32473, gets 64000
    try:
        export(collector, 64000, index())
    finally:
        collector.stop()
    values = collector.records()[0].values
    assert "sourcePodName" not in values
    assert values["64000.2"] == b"web-7d9f8b6c5-x2x4q" and values["64000.11"] == b"StatefulSet"


def test_kipfix_collect_command_with_enterprise_number():
    process, port = start_collect("--json", "--enterprise-number", "64000", "--count", str(len(FLOWS)),
                                  "--timeout", "60")
    try:
        config = CollectorConfig(f"127.0.0.1:{port}", "127.0.0.1", port, "udp")
        exporter = IpfixExporter([config], [TemplateConfig(256, TEMPLATE)], 7, enterprise_number=64000,
                                 pod_lookup=index())
        exporter.export(records(), MeteringStats())
        exporter.close(10)
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 0, err
    flows = [json.loads(line)["fields"] for line in out.splitlines() if "scope" not in json.loads(line)]
    assert [{n: f[n] for n in POD_NAMES} for f in flows] == expected_in_wire_order()


def test_table_line_shows_source_and_destination_pods():
    values = {"flowStartMilliseconds": 1_795_335_740_000, "octetDeltaCount": 1000,
              "sourceIPv4Address": ipaddress.ip_address("10.244.1.17"),
              "destinationIPv4Address": ipaddress.ip_address("203.0.113.7"), **pod_values(WEB, None)}
    assert record_line(DecodedRecord(256, values)).endswith("  pods shop/web-7d9f8b6c5-x2x4q -> -")
    assert "pods" not in record_line(DecodedRecord(256, {"octetDeltaCount": 1}))


def test_bad_enterprise_number_for_kipfix_collect(capsys):
    from test_ipfix_cli import run
    assert run("collect", "--listen", "127.0.0.1:0", "--enterprise-number", "0") == 2
    assert "--enterprise-number 0: accepted: 1..4294967295" in capsys.readouterr().err


# ---- standalone: no pod index ---------------------------------------------------------

def test_standalone_exporter_encodes_empty_strings():
    exporter = IpfixExporter([], [TemplateConfig(256, POD_NAMES)], observation_domain_id=1)
    ((template_id, encoded, fixed),) = exporter.encode(records()[:1])
    assert (template_id, encoded, fixed) == (256, [bytes(10)], 0)  # ten zero-length strings
    collector = Collector(out=None, err=None).start()
    try:
        export(collector)  # the template with addresses, no pod index
    finally:
        collector.stop()
    assert [{n: r.values[n] for n in POD_NAMES} for r in collector.records()] == [pod_values(None, None)] * len(FLOWS)


def test_agent_sink_uses_the_pod_index_it_is_given():
    collector = Collector(out=None, err=None).start()
    try:
        config = parse_config({"collectors": [{"address": f"127.0.0.1:{collector.port}"}],
                               "templates": [{"id": 256, "template": list(TEMPLATE)}]})
        sink = build_sink(config, index())
        sink.export(records(), MeteringStats())
        sink.close()
        assert collector.wait_for(lambda c: c.data_records >= len(FLOWS), 10)
    finally:
        collector.stop()
    assert [{n: r.values[n] for n in POD_NAMES} for r in collector.records()] == expected_in_wire_order()


def test_a_plain_lookup_function_works_too():
    pods = index()
    calls = []

    def lookup(packed: bytes):
        calls.append(packed)
        return pods(packed)

    exporter = IpfixExporter([], [TemplateConfig(256, TEMPLATE)], observation_domain_id=1, pod_lookup=lookup)
    (group,) = exporter.encode(records()[:1])
    assert calls == [ipaddress.ip_address("10.244.1.17").packed, ipaddress.ip_address("10.244.2.5").packed]
    assert group[1][0].endswith(b"".join(bytes((len(v),)) + v.encode() for v in pod_values(WEB, DB).values()))


def test_index_changes_reach_the_next_batch_without_recompiling():
    pods = PodIndex()
    exporter = IpfixExporter([], [TemplateConfig(256, POD_NAMES)], observation_domain_id=1, pod_lookup=pods)
    one = records()[:1]
    assert exporter.encode(one)[0][1] == [bytes(10)]
    pods.upsert(WEB)
    pods.upsert(DB)
    assert exporter.encode(one)[0][1] == [b"".join(bytes((len(v),)) + v.encode()
                                                    for v in pod_values(WEB, DB).values())]


def test_a_deleted_pods_last_flows_keep_its_name_after_a_new_pod_took_its_ip():
    """The agent exports a deleted pod's flows at the next drain; a new pod may hold its IP by then."""
    pods = PodIndex([WEB, DB])
    ended = time.time_ns()  # WEB's last packet
    old_flow = dataclasses.replace(records()[0], end_ns=ended)
    reused = PodInfo("u-web2", "web-7d9f8b6c5-new", "shop", "node-a", WEB.ips, "Deployment", "web", phase="Running")
    while time.time_ns() == ended:
        pass
    pods.upsert(reused)  # WEB is deleted (kept until its flows are out); the new pod takes its IPs now
    new_flow = dataclasses.replace(records()[0], end_ns=time.time_ns())
    collector = Collector(out=None, err=None).start()
    try:
        config = CollectorConfig(f"127.0.0.1:{collector.port}", "127.0.0.1", collector.port, "udp")
        exporter = IpfixExporter([config], [TemplateConfig(256, TEMPLATE)], observation_domain_id=7,
                                 pod_lookup=pods)
        exporter.export([old_flow, new_flow], MeteringStats())
        exporter.close(10)
        assert collector.wait_for(lambda c: c.data_records >= 2, 10)
    finally:
        collector.stop()
    got = [{n: r.values[n] for n in POD_NAMES} for r in collector.records()]
    assert got == [pod_values(WEB, DB), pod_values(reused, DB)]
    pods.remove(WEB.uid)  # swept: every flow of that IP is the new pod's
    assert pods(ipaddress.ip_address(WEB.ips[0]).packed, ended)[0] == reused.name.encode()


# ---- tshark, from a live capture on loopback ----------------------------------------------

def tshark_pod_entries(path, port: int, set_ids) -> tuple[list[tuple[int, int]], list[list[tuple[int, bytes]]]]:
    """(template fields as (type id, PEN), records of data sets ``set_ids`` as [(type id, value octets)]),
    as tshark shows them. tshark leaves zero-length entries out of a record.
    """
    pdml = subprocess.run(["tshark", "-r", str(path), "-d", f"udp.port=={port},cflow", "-T", "pdml"],
                          capture_output=True, text=True, check=True).stdout
    template_fields, data, set_id = [], [], None
    for packet in ET.fromstring(pdml).iter("packet"):
        for element in packet.iter("field"):
            name = element.get("name")
            if name == "cflow.template_ipfix_field_type_enterprise":
                template_fields.append([int(element.get("show"))])
            elif name == "cflow.template_ipfix_field_pen":
                template_fields[-1].append(int(element.get("show")))
            elif name == "cflow.flowset_id":
                set_id = int(element.get("show"))
            elif name == "" and element.get("show", "").startswith("Flow ") and set_id in set_ids:  # a record
                record = []
                for entry in element.iter("field"):
                    if entry.get("name") == "cflow.enterprise_private_entry":
                        # "Enterprise Private entry: (<enterprise>) Type 2: Value (hex bytes): 77 65 ..."
                        type_id = int(re.search(r"\) Type (\d+): ", entry.get("showname")).group(1))
                        record.append((type_id, bytes.fromhex(entry.get("value"))))
                data.append(record)
    return [tuple(f) for f in template_fields], data


@pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark is not installed")
@pytest.mark.parametrize("pen", [32473, 64000])
def test_tshark_shows_enterprise_type_ids_and_exact_strings(tmp_path, pen):
    if os.geteuid() != 0:
        pytest.skip("capturing on loopback needs root")
    collector = Collector(out=None, err=None, enterprise_number=pen).start()
    path = tmp_path / "pods.pcapng"
    capture = subprocess.Popen(["tshark", "-i", "lo", "-f", f"udp port {collector.port}", "-w", str(path)],
                               stderr=subprocess.PIPE, text=True)
    try:
        for line in capture.stderr:  # wait until the capture runs
            if "Capturing on" in line:
                break
        wait_for_probe(collector.port, path)
        exporter = export(collector, pen, index())
        wait_for_probe(collector.port, path)  # once a later probe is in the file, everything before is
    finally:
        collector.stop()
        capture.terminate()
        capture.wait(30)
    bad = subprocess.run(["tshark", "-r", str(path), "-d", f"udp.port=={collector.port},cflow",
                          "-Y", "_ws.malformed || _ws.expert.severity >= error"],
                         capture_output=True, text=True, check=True).stdout
    assert bad == ""
    template_fields, data = tshark_pod_entries(path, collector.port,
                                               {ft.template.id for ft in exporter.flow_templates})
    # the two templates (IPv4 256 and its IPv6 twin), each announcing ids 2..11 under the PEN, and the
    # observation points options template its networkNamespace (id 1)
    assert template_fields == [(POD_IDS[n], pen) for n in POD_NAMES] * 2 + [(1, pen)]
    want = [[(POD_IDS[n], values[n].encode()) for n in POD_NAMES if values[n]] for values in expected_in_wire_order()]
    assert data == want
    assert data[0][0] == (2, b"web-7d9f8b6c5-x2x4q") and data[2][0] == (7, "débug-shell".encode())
