"""Real traffic -> kernel -> agent -> IPFIX on the wire -> two independent decoders.

The agent meters the router's r1 and exports each flow twice: as JSON lines
(what the flow cache produced) and as IPFIX to a collector on loopback, in
exactly one of two templates: the classic minimal one (IPv4 ICMP) or one of
every element kipfix fills (the rest). The datagrams are decoded by kipfix's collector and, independently,
by tshark from a loopback capture. Every field of every record must equal
the JSON line of the same flow, and the totals must equal what ping and the
kernel's interface counters say.
"""

from __future__ import annotations

import ipaddress
import subprocess
import time
from collections import Counter

import pytest

from agentproc import AgentProcess, totals, wait_for
from kipfix.agent.collector.server import Collector
from kipfix.agent.export.ipfix.fields import fillable_names
from router import Router, link_stats, sh
from test_metering_exact import iperf3

pytestmark = pytest.mark.root

MINIMAL = ["FlowEndMilliseconds", "FlowStartMilliseconds", "OctetDeltaCount", "PacketDeltaCount",
           "IpVersion", "FlowDirection", "SourceIPv4Address", "DestinationIPv4Address"]
FULL_ID = 300
END_REASONS = {"idle_timeout": 1, "active_timeout": 2, "end_of_flow": 3, "forced_end": 4,
               "lack_of_resources": 5}
PROTOCOLS = {"icmp": 1, "tcp": 6, "udp": 17, "icmpv6": 58}


def full_template() -> list[str]:
    # Every element kipfix can fill, IPv4 and IPv6 alike (one template for both families).
    return fillable_names()


@pytest.fixture
def capture(tmp_path):
    """tshark capturing loopback UDP to the collector's port into a pcap."""
    started = []

    def start(port: int):
        path = tmp_path / "ipfix.pcap"
        proc = subprocess.Popen(["tshark", "-q", "-i", "lo", "-f", f"udp port {port}", "-w", str(path)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        started.append(proc)
        line = proc.stderr.readline()
        while line and "Capturing on" not in line:
            line = proc.stderr.readline()
        assert "Capturing on" in line, "tshark did not start capturing"
        return proc, path

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(10)


def tshark(path, *args) -> str:
    return subprocess.run(["tshark", "-r", str(path), *args], capture_output=True, text=True,
                          check=True).stdout


def key_of(values: dict) -> tuple:
    family = "IPv6" if values.get("ipVersion") == 6 or "sourceIPv4Address" not in values else "IPv4"
    src, dst = values[f"source{family}Address"], values[f"destination{family}Address"]
    return (str(ipaddress.ip_address(src)), str(ipaddress.ip_address(dst)),
            values["flowStartMilliseconds"], values["flowEndMilliseconds"],
            "ingress" if values["flowDirection"] == 0 else "egress")


def full_key(values: dict) -> tuple:
    ports = (values["sourceTransportPort"], values["destinationTransportPort"])
    if values["protocolIdentifier"] in (1, 58):
        element = "icmpTypeCodeIPv4" if values["protocolIdentifier"] == 1 else "icmpTypeCodeIPv6"
        ports = (0, values[element])
    return key_of(values) + (values["protocolIdentifier"], *ports)


def json_key(record: dict) -> tuple:
    return (record["src"], record["dst"], record["flowStartMilliseconds"], record["flowEndMilliseconds"],
            record["direction"])


def test_every_field_reaches_two_independent_decoders(tmp_path, capture):
    collector = Collector("127.0.0.1", 0, out=None).start()
    tshark_proc, pcap = capture(collector.port)
    with Router() as router:
        agent = AgentProcess(tmp_path, {
            "interfaces": [{"netns": router.r, "names": ["r1"]}],
            "collectors": [{"address": f"127.0.0.1:{collector.port}"}],
            # each flow in exactly one template: TCP, UDP and ICMPv6 in the full one (split per family: it
            # names both families' addresses), IPv4 ICMP in the minimal one
            "templates": [{"id": FULL_ID, "fields": full_template(), "select": {"protocols": ["tcp", "udp", "icmpv6"]}},
                          {"id": 256, "template": MINIMAL}],
            "timeouts": {"idle": 30, "active": 60},
        })
        try:
            agent.start()
            before = link_stats(router.r, "r1")
            pings = sh(f"ip netns exec {router.h1} ping -c 10 -i 0.02 -q 10.2.0.1").stdout
            assert " 10 received" in pings
            sh(f"ip netns exec {router.h1} ping -6 -c 4 -i 0.02 -q fd02::1")
            iperf3(router, "-t", "1", "-b", "20M")
            iperf3(router, "-u", "-t", "1", "-b", "5M", "-l", "500")
            router.settle()
            agent.stop()
            after = link_stats(router.r, "r1")
        finally:
            agent.cleanup()

    records = agent.records()
    pings = [r for r in records if r["protocol"] == "icmp"]
    assert len(records) > 10 and pings
    wait_for(lambda: len(collector.records()) >= len(records), 10, "every record at the collector")
    time.sleep(0.5)
    tshark_proc.terminate()
    tshark_proc.wait(10)
    collector.stop()

    # Independent truth first: ping -c and the kernel's interface counters.
    assert totals(records, direction="ingress", icmpType=8) == (10, 840)
    packets, octets = totals(records, direction="ingress")
    assert packets == after["rx_packets"] - before["rx_packets"]
    assert octets + 14 * packets == after["rx_bytes"] - before["rx_bytes"]

    # Every record once: the minimal template has the IPv4 ICMP flows, the full template (its IPv4 part
    # FULL_ID, its IPv6 part a derived id) the others. The minimal template has no ports, so two flows can
    # look alike: compare as multisets.
    assert len(collector.records()) == len(records)
    minimal = Counter(key_of(r.values) + (r.values["packetDeltaCount"], r.values["octetDeltaCount"],
                                          r.values["ipVersion"]) for r in collector.records(256))
    assert minimal == Counter(json_key(r) + (r["packets"], r["octets"], 4) for r in pings)

    # The full template: every field of every other record.
    full = {full_key(r.values): r.values for r in collector.records() if r.template_id != 256}
    others = [r for r in records if r["protocol"] != "icmp"]
    assert len(full) == len(others) and {r.template_id for r in collector.records()} == {256, FULL_ID, FULL_ID + 1}
    for record in others:
        got = full[json_key(record) + (PROTOCOLS[record["protocol"]], record["sport"], record["dport"])]
        assert got["packetDeltaCount"] == record["packets"]
        assert got["octetDeltaCount"] == record["octets"]
        assert got["protocolIdentifier"] == PROTOCOLS[record["protocol"]]
        assert got["ipVersion"] == record["ipVersion"]
        assert got["tcpControlBits"] == record["tcpFlags"]
        assert (got["minimumTTL"], got["maximumTTL"]) == (record["minTTL"], record["maxTTL"])
        assert got["ipClassOfService"] == record["tos"]
        assert got["flowEndReason"] == END_REASONS[record["endReason"]]
        assert got["interfaceName"] == "r1"
        interface = got["ingressInterface"] if record["direction"] == "ingress" else got["egressInterface"]
        assert interface == record["ifindex"]
        if record["protocol"] in ("icmp", "icmpv6"):
            element = "icmpTypeCodeIPv4" if record["ipVersion"] == 4 else "icmpTypeCodeIPv6"
            assert got[element] == record["icmpType"] << 8 | record["icmpCode"]
        else:
            assert (got["sourceTransportPort"], got["destinationTransportPort"]) == \
                (record["sport"], record["dport"])
        assert got["flowStartMilliseconds"] <= got["flowEndMilliseconds"]
    # Routes come from the router's own table: 10.2.0.0/24 is connected on r2a.
    to_h2 = [v for v in full.values() if v["ipVersion"] == 4 and str(v["destinationIPv4Address"]) == "10.2.0.1"
             and v["flowDirection"] == 0]
    assert to_h2 and all(v["destinationIPv4PrefixLength"] == 24 for v in to_h2)

    # tshark, from the wire: no malformed packet, the same number of records and the same totals.
    assert "Malformed" not in tshark(pcap, "-d", f"udp.port=={collector.port},cflow")
    fields = tshark(pcap, "-d", f"udp.port=={collector.port},cflow", "-T", "fields", "-E", "occurrence=a",
                    "-E", "aggregator=,", "-e", "cflow.packets", "-e", "cflow.octets")
    tshark_packets = tshark_octets = 0
    for line in fields.splitlines():
        pkts, octs = (line.split("\t") + [""])[:2]
        tshark_packets += sum(int(v) for v in pkts.split(",") if v)
        tshark_octets += sum(int(v) for v in octs.split(",") if v)
    # Each flow was sent once: a collector that sums records counts the traffic exactly.
    assert (tshark_packets, tshark_octets) == (sum(r["packets"] for r in records), sum(r["octets"] for r in records))
