"""GSO/GRO super-packets are counted as the packets they stand for on the wire, headers included.

With TSO, GSO and GRO on (the veth defaults the other tests turn off), h1's
TCP stack hands its veth 64 KiB super-packets and the router receives and
forwards them whole: the metering program on r1 (ingress) and r2a (egress)
sees one skb per super-packet. r2a itself has TSO and GSO off, so the kernel
cuts each super-packet into wire-sized segments *after* the egress hook; a
capture on r2a (dumpcap, which sees what the driver sends) counts those
segments and their IP lengths: that is the independent truth.

(r2a's `ip -s link` counts the same segments, but for segments the kernel
cut its octets leave out the Ethernet header it counts for other packets:
the capture is the unambiguous reference.)
"""

from __future__ import annotations

import subprocess

import pytest

from agentproc import totals
from capture import Capture
from router import Router, link_stats, sh
from test_metering_exact import iperf3

pytestmark = pytest.mark.root


@pytest.fixture
def offload_router():
    topo = Router()
    try:
        topo.create(offloads=True)
        for ns, ifname in ((topo.h1, "eth0"), (topo.r, "r1"), (topo.r, "r2b"), (topo.h2, "eth0"), (topo.h2, "eth1")):
            sh(f"ip netns exec {ns} ethtool -K {ifname} tso on gso on gro on")
        sh(f"ip netns exec {topo.r} ethtool -K r2a tso off gso off gro on")
        yield topo
    finally:
        topo.destroy()


def test_tcp_bulk_with_offloads_counts_wire_segments(offload_router, agent_factory, tmp_path):
    router = offload_router
    agent = agent_factory({"interfaces": [{"netns": router.r, "names": ["r1", "r2a"]}],
                           "timeouts": {"idle": 30, "active": 60}}).start()
    pcap = tmp_path / "r2a.pcapng"
    dumpcap = Capture(router.r, ["r2a"], pcap)
    dumpcap.sync()  # the capture runs
    h1_before, r2a_before = link_stats(router.h1, "eth0"), link_stats(router.r, "r2a")
    report = iperf3(router, "-n", "16M", "-l", "128K")
    assert "error" not in report, report.get("error")
    router.settle()
    agent.stop()
    h1_after, r2a_after = link_stats(router.h1, "eth0"), link_stats(router.r, "r2a")
    dumpcap.sync()  # everything before this probe is in the file
    dumpcap.stop()
    records = agent.records()

    lengths = subprocess.run(["tshark", "-r", str(pcap), "-Y", "ip.src == 10.1.0.1", "-T", "fields", "-e", "ip.len"],
                             capture_output=True, text=True, check=True).stdout.split()
    segments, ip_octets = len(lengths), sum(map(int, lengths))
    assert segments == r2a_after["tx_packets"] - r2a_before["tx_packets"]  # the capture missed nothing
    sent_skbs = h1_after["tx_packets"] - h1_before["tx_packets"]
    # the offloads were on: h1 sent far fewer (super-)packets than went over r2a's wire
    assert segments > 5 * sent_skbs, (segments, sent_skbs)
    # every packet h1 sent crossed r1 and left through r2a, cut into the segments the capture saw
    for ifname, direction in (("r1", "ingress"), ("r2a", "egress")):
        assert (ifname, *totals(records, interface=ifname, direction=direction)) == (ifname, segments, ip_octets)
    data_packets, data_octets = totals(records, interface="r2a", direction="egress", protocol="tcp", dport=5201)
    # what iperf3's server received (and its 37-octet cookie) plus at least an IP and TCP header per segment
    # (the sender's count can be more: iperf3 closes the test before its last segments are delivered)
    assert data_octets >= report["end"]["sum_received"]["bytes"] + 37 + 40 * data_packets
