"""kipfix against the collectors users run: goflow2, nfcapd (nfdump), nfacctd (pmacct), tshark, kipfix collect.

One agent meters every interface of a client-router-server topology (the
client's and the server's too, in their own network namespaces, where both
eth0 have the same ifindex as the router's r1) and exports to all of them
at once. The ground truth is a packet capture (dumpcap) on every one of
those interfaces: per observation point and flow, its packets, IP octets
and TCP flags. Each collector's own output must hold every flow of the
ping, UDP-socket and iperf3 traffic with exactly those values, and its log
no error.
"""

from __future__ import annotations

import ipaddress
import json
import signal
import subprocess
import sys
import time

import pytest

from agentproc import AgentProcess, wait_for
from capture import EGRESS, INGRESS, Capture
from collectors import Goflow2, Nfacctd, Nfcapd, missing_collectors
from kipfix.agent.collector.server import Collector
from router import Router, sh
from test_metering_exact import iperf3

pytestmark = [pytest.mark.root, pytest.mark.skipif(bool(missing_collectors()),
                                                   reason=f"collectors missing: {missing_collectors()}")]

COMMON = ["flowStartMilliseconds", "flowEndMilliseconds", "protocolIdentifier", "ingressInterface", "egressInterface",
          "flowDirection", "packetDeltaCount", "octetDeltaCount", "observationPointId", "networkNamespace"]
ADDRESSES = ["sourceIPv4Address", "destinationIPv4Address"]
TEMPLATES = [  # L3AF's shape: transport flows with ports and TCP flags, ICMP with type and code
    {"id": 300, "select": {"protocols": ["tcp", "udp"]},
     # tcpControlBits in 1 octet (reduced size): pmacct reads the flags only so
     "template": ADDRESSES + ["sourceTransportPort", "destinationTransportPort", "tcpControlBits:1"] + COMMON},
    {"id": 301, "select": {"protocols": ["icmp", "icmpv6"]}, "template": ADDRESSES + ["icmpTypeCodeIPv4"] + COMMON},
]
UDP_SENDER = """
import socket, sys
family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
s = socket.socket(family, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
for _ in range(int(sys.argv[5])):
    s.sendto(b"u" * int(sys.argv[6]), (sys.argv[3], int(sys.argv[4])))
"""
UDP_LISTENER = """
import socket, sys, time
family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
s = socket.socket(family, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
print("bound", flush=True)
time.sleep(600)
"""
TCP_FLAG_LETTERS = "FSRPAUEC"  # nfdump's flag string, least significant bit first ("...AP.SF": reversed)


def flow_key(src, dst, proto, sport, dport, icmp) -> tuple:
    src, dst = str(ipaddress.ip_address(src)), str(ipaddress.ip_address(dst))
    if proto in (1, 58):
        return (src, dst, proto, "icmp", icmp)
    return (src, dst, proto, sport, dport)


def add(table: dict, key, packets: int, octets: int, flags: int) -> None:
    p, o, f = table.get(key, (0, 0, 0))
    table[key] = (p + packets, o + octets, f | flags)


class Interop:
    """The session's results: the truth per observation point and what every collector gave."""

    def __init__(self):
        self.truth: dict = {}           # (netns, ifname, direction, flow key) -> (packets, octets, flags)
        self.ifindex: dict = {}         # (netns, ifname) -> ifindex
        self.collectors: dict = {}
        self.kipfix: Collector | None = None
        self.ipfix_pcap = None
        self.agent_records: list = []
        self.ours: set = set()          # flow keys of the test's own traffic

    def truth_by(self, point) -> dict:
        """The truth folded by ``point(netns, ifname, direction)`` (what a collector can tell apart)."""
        out: dict = {}
        for (netns, ifname, direction, key), (p, o, f) in self.truth.items():
            add(out, (point(netns, ifname, direction), key), p, o, f)
        return out


@pytest.fixture(scope="module")
def interop(tmp_path_factory):
    work = tmp_path_factory.mktemp("interop")
    topo = Router()
    result = Interop()
    started: list = []
    captures: list = []
    listeners: list = []
    agent = None
    try:
        topo.create(inside=True)
        points = [(topo.h1, "eth0"), (topo.r, "r1"), (topo.r, "r2a"), (topo.r, "r2b"), (topo.h2, "eth0"),
                  (topo.h2, "eth1")]
        result.ifindex = {p: topo.ifindex(*p) for p in points}
        macs = {p: topo.mac(*p) for p in points}
        for cls in (Goflow2, Nfcapd, Nfacctd):
            collector = cls(work).start()
            started.append(collector)
            result.collectors[collector.name] = collector
        result.kipfix = Collector(out=None, err=None).start()
        result.ipfix_pcap = work / "ipfix.pcapng"
        ipfix_capture = subprocess.Popen(["dumpcap", "-q", "-i", "lo", "-f", f"udp port {result.kipfix.port}",
                                          "-w", str(result.ipfix_pcap)], stdout=subprocess.DEVNULL,
                                         stderr=subprocess.PIPE, text=True)
        for line in ipfix_capture.stderr:
            if "Capturing on" in line:
                break
        ports = [c.port for c in started] + [result.kipfix.port]
        config = {
            "collectors": [{"address": f"127.0.0.1:{port}"} for port in ports],
            "templates": TEMPLATES,
            "interfaces": [{"netns": topo.h1, "names": ["eth0"]}, {"netns": topo.r, "names": ["r1", "r2a", "r2b"]},
                           {"netns": topo.h2, "names": ["eth0", "eth1"]}],
            "timeouts": {"idle": 60, "active": 120},
        }
        agent = AgentProcess(work, config).start()
        # one dumpcap per interface: it says "Capturing on" once that interface's capture is open
        captures = [Capture(netns, [ifname], work / f"truth-{i}.pcapng") for i, (netns, ifname) in enumerate(points)]
        for capture in captures:
            capture.sync()

        # The traffic: ping both families, UDP sockets both families, an iperf3 TCP transfer.
        assert " 4 received" in sh(f"ip netns exec {topo.h1} ping -c 4 -i 0.05 -q 10.2.0.1").stdout
        assert " 3 received" in sh(f"ip netns exec {topo.h1} ping -6 -c 3 -i 0.05 -q fd02::1").stdout
        for bind, port in (("10.2.0.1", 40002), ("fd02::1", 40004)):
            listener = subprocess.Popen(["ip", "netns", "exec", topo.h2, sys.executable, "-c", UDP_LISTENER, bind,
                                         str(port)], stdout=subprocess.PIPE, text=True)
            listeners.append(listener)
            assert listener.stdout.readline().strip() == "bound"
        sh(f"ip netns exec {topo.h1} {sys.executable} -c '{UDP_SENDER}' 10.1.0.1 40001 10.2.0.1 40002 6 111")
        sh(f"ip netns exec {topo.h1} {sys.executable} -c '{UDP_SENDER}' fd01::1 40003 fd02::1 40004 5 222")
        report = iperf3(topo, "-n", "2M")
        assert "error" not in report, report.get("error")
        topo.settle()
        for capture in captures:
            capture.sync()
            capture.stop()
        agent.stop()
        result.agent_records = agent.records()

        # Everything the agent exported has arrived where a count can tell.
        exported = len(result.agent_records)
        wait_for(lambda: len(result.kipfix.records()) >= exported, 30,
                 "every record at kipfix collect")
        wait_for(lambda: len(result.collectors["goflow2"].records()) >= exported, 30, "every record at goflow2")
        total_packets = sum(r["packets"] for r in result.agent_records)
        wait_for(lambda: sum(r["packets"] for r in result.collectors["nfacctd"].records()) >= total_packets, 30,
                 "every packet at nfacctd")
        time.sleep(0.5)
        ipfix_capture.send_signal(signal.SIGINT)
        ipfix_capture.wait(30)
        for collector in started:
            collector.stop()

        for capture in captures:
            for packet in capture.packets(macs):
                key = flow_key(packet["src"], packet["dst"], packet["proto"], packet["sport"], packet["dport"],
                               packet["icmp"])
                add(result.truth, (packet["netns"], packet["ifname"], packet["direction"], key), 1,
                    packet["octets"], packet["flags"])
        result.topo = topo
        yield result
    finally:
        for listener in listeners:
            listener.kill()
        for capture in captures:
            capture.stop()
        if agent is not None:
            agent.cleanup()
        for collector in started:
            collector.stop()
        if result.kipfix is not None:
            result.kipfix.stop()
        topo.destroy()


def options_records(collector: Collector) -> list:
    return [r for m in collector.messages() for r in m.options_records]


def assert_same(got: dict, want: dict, what: str) -> None:
    """Every flow of the truth is there with the same packets, octets and flags, and nothing else."""
    assert sorted(got) == sorted(want), f"{what}: other flows than the truth"
    for key in want:
        assert got[key] == want[key], f"{what}: {key}"


def test_the_truth_is_the_agents_own_count(interop):
    """The capture and the agent's own JSON lines agree: the references below compare like with like."""
    mine: dict = {}
    for r in interop.agent_records:
        icmp = (r.get("icmpType"), r.get("icmpCode")) if r["protocol"] in ("icmp", "icmpv6") else None
        proto = {"icmp": 1, "tcp": 6, "udp": 17, "icmpv6": 58}[r["protocol"]]
        add(mine, (r["netns"], r["interface"], r["direction"],
                   flow_key(r["src"], r["dst"], proto, r.get("sport", 0), r.get("dport", 0), icmp)),
            r["packets"], r["octets"], r.get("tcpFlags", 0))
    assert_same(mine, interop.truth, "agent JSON lines")
    t = interop.topo
    # the asymmetric path: requests leave the router on r2a, replies come back on r2b and leave h2 on eth1
    assert {k[:3] for k in interop.truth} == {
        (t.h1, "eth0", EGRESS), (t.h1, "eth0", INGRESS), (t.r, "r1", INGRESS), (t.r, "r1", EGRESS),
        (t.r, "r2a", EGRESS), (t.r, "r2b", INGRESS), (t.h2, "eth0", INGRESS), (t.h2, "eth1", EGRESS)}
    # three interfaces with one ifindex, in three namespaces: only the observation point tells them apart
    assert interop.ifindex[(t.h1, "eth0")] == interop.ifindex[(t.r, "r1")] == interop.ifindex[(t.h2, "eth0")] == 2


# ---- one test per collector ------------------------------------------------------------------------------

def tshark_sets(interop) -> list[tuple[int, dict]]:
    """(set id, record fields) of every record tshark decodes from the capture of kipfix collect's port."""
    out = subprocess.run(["tshark", "-r", str(interop.ipfix_pcap), "-d", f"udp.port=={interop.kipfix.port},cflow",
                          "-T", "json"], capture_output=True, text=True, check=True).stdout
    records = []
    for packet in json.loads(out):
        cflow = packet["_source"]["layers"].get("cflow", {})
        for name, flowset in cflow.items():
            if name.startswith("Set ") and isinstance(flowset, dict):
                set_id = int(flowset["cflow.flowset_id"])
                records += [(set_id, v) for k, v in flowset.items() if k.startswith("Flow ")]
    return records


def tshark_points(interop) -> dict[int, tuple[str, str]]:
    """observationPointId -> (netns, interface name), as tshark decodes kipfix's options records."""
    points = {}
    for _set_id, v in tshark_sets(interop):
        if "cflow.if_name" in v and "cflow.observation_point_id" in v:
            netns = bytes.fromhex(v["cflow.enterprise_private_entry"].replace(":", "")).decode()
            points[int(v["cflow.observation_point_id"])] = (netns, v["cflow.if_name"])
    return points


def test_kipfix_collect_names_every_observation_point(interop):
    got: dict = {}
    for received in interop.kipfix.received:
        for record in received.message.data_records:
            v = record.values
            netns, ifname, _ifindex = interop.kipfix.points.lookup(("udp", received.peer), received.message.domain_id,
                                                                    record)
            six = "sourceIPv6Address" in v
            proto = v["protocolIdentifier"]
            icmp = v.get("icmpTypeCodeIPv6" if six else "icmpTypeCodeIPv4")
            key = flow_key(v["sourceIPv6Address" if six else "sourceIPv4Address"],
                           v["destinationIPv6Address" if six else "destinationIPv4Address"], proto,
                           v.get("sourceTransportPort"), v.get("destinationTransportPort"),
                           None if icmp is None else (icmp >> 8, icmp & 0xFF))
            add(got, ((netns, ifname, (INGRESS, EGRESS)[v["flowDirection"]]), key), v["packetDeltaCount"],
                v["octetDeltaCount"], v.get("tcpControlBits", 0))
    assert_same(got, interop.truth_by(lambda netns, ifname, direction: (netns, ifname, direction)), "kipfix collect")
    assert interop.kipfix.errors == []


def test_tshark_decodes_every_record_and_the_observation_points(interop):
    points = tshark_points(interop)
    t = interop.topo
    assert sorted(points.values()) == sorted([(t.h1, "eth0"), (t.r, "r1"), (t.r, "r2a"), (t.r, "r2b"),
                                              (t.h2, "eth0"), (t.h2, "eth1")])
    got: dict = {}
    for _set_id, v in tshark_sets(interop):
        if "cflow.packets" not in v:
            continue  # options records
        six = "cflow.srcaddrv6" in v
        proto = int(v["cflow.protocol"])
        if proto in (1, 58):
            icmp = (int(v["cflow.icmp_ipv6_type"]), int(v["cflow.icmp_ipv6_code"])) if six else \
                divmod(int(v["cflow.icmp_type_code_ipv4"], 16), 256)
        key = flow_key(v["cflow.srcaddrv6" if six else "cflow.srcaddr"], v["cflow.dstaddrv6" if six else "cflow.dstaddr"],
                       proto, int(v.get("cflow.srcport", 0)), int(v.get("cflow.dstport", 0)),
                       tuple(icmp) if proto in (1, 58) else None)
        netns, ifname = points[int(v["cflow.observation_point_id"])]
        add(got, ((netns, ifname, (INGRESS, EGRESS)[int(v["cflow.direction"])]), key), int(v["cflow.packets"]),
            int(v["cflow.octets"]), int(v.get("cflow.tcpflags", "0"), 16))
    assert_same(got, interop.truth_by(lambda netns, ifname, direction: (netns, ifname, direction)), "tshark")
    bad = subprocess.run(["tshark", "-r", str(interop.ipfix_pcap), "-d", f"udp.port=={interop.kipfix.port},cflow",
                          "-Y", "_ws.malformed || _ws.expert.severity >= warning"], capture_output=True, text=True,
                         check=True).stdout
    assert bad == ""


def test_goflow2(interop):
    """goflow2 keeps no options records and only 32 bits of observationPointId (its protobuf field is uint32):
    it tells interfaces apart by ifindex and direction only, so the truth is folded the same way."""
    collector = interop.collectors["goflow2"]
    got: dict = {}
    names = {"ICMP": 1, "TCP": 6, "UDP": 17, "IPv6-ICMP": 58, "ICMPv6": 58}
    for r in collector.records():
        proto = names.get(r["proto"], r["proto"])
        key = flow_key(r["src_addr"], r["dst_addr"], proto, r["src_port"], r["dst_port"],
                       (r["icmp_type"], r["icmp_code"]) if proto in (1, 58) else None)
        point = (r["in_if"], INGRESS) if r["in_if"] else (r["out_if"], EGRESS)
        assert r["observation_point_id"] == point[0]  # (netns id << 32 | ifindex) cut to its low 32 bits
        add(got, (point, key), r["packets"], r["bytes"], r["tcp_flags"])
    want = interop.truth_by(lambda netns, ifname, direction: (interop.ifindex[(netns, ifname)], direction))
    assert_same(got, want, "goflow2")
    assert collector.errors == []


def nfdump_flags(text: str) -> int:
    """nfdump's flag string ("...AP.SF") as bits."""
    return sum(1 << i for i, letter in enumerate(reversed(text)) if letter != ".")


def test_nfcapd(interop):
    collector = interop.collectors["nfcapd"]
    points = tshark_points(interop)
    got: dict = {}
    for r in collector.records():
        proto = r["proto"]
        src = r.get("src4_addr") or r.get("src6_addr")
        dst = r.get("dst4_addr") or r.get("dst6_addr")
        icmp = (r.get("icmp_type"), r.get("icmp_code")) if proto in (1, 58) else None
        key = flow_key(src, dst, proto, r.get("src_port"), r.get("dst_port"), icmp)
        netns, ifname = points[r["observationPointID"]]
        add(got, ((netns, ifname, (INGRESS, EGRESS)[r["direction"]]), key), r["in_packets"], r["in_bytes"],
            nfdump_flags(r.get("tcp_flags", "")))
    assert_same(got, interop.truth_by(lambda netns, ifname, direction: (netns, ifname, direction)), "nfcapd")
    assert collector.errors == []


def test_nfacctd(interop):
    collector = interop.collectors["nfacctd"]
    points = tshark_points(interop)
    got: dict = {}
    names = {"icmp": 1, "tcp": 6, "udp": 17, "ipv6-icmp": 58, "icmpv6": 58}
    for r in collector.records():
        proto = names.get(r["ip_proto"], r["ip_proto"])
        netns, ifname = points[int(r["obs_point"])]
        direction = INGRESS if r["iface_in"] else EGRESS
        key = flow_key(r["ip_src"], r["ip_dst"], proto, r["port_src"], r["port_dst"], None)
        add(got, ((netns, ifname, direction), key), r["packets"], r["bytes"], int(r["tcp_flags"]))
    # pmacct keeps ICMP type and code to itself: the truth without them
    want: dict = {}
    for (point, key), (p, o, f) in interop.truth_by(lambda n, i, d: (n, i, d)).items():
        add(want, (point, key[:3] + ("icmp", None) if key[3] == "icmp" else key), p, o, f)
    assert_same(got, want, "nfacctd")
    assert collector.errors == []
