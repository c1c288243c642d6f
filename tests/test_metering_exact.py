"""Exact counts on a routed, asymmetric topology, against independent sources.

The agent runs as a real process, meters the router's three interfaces in
both directions and writes JSON lines. Every figure is compared with what
the traffic generator reported (ping -c, iperf3 --json) and with the
kernel's own interface counters (`ip -s link`), which count the Ethernet
header too: link octets == metered IP octets + 14 x packets.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from agentproc import totals
from router import link_stats, sh

pytestmark = pytest.mark.root
ETH_HEADER = 14
ROUTER_IFS = ("r1", "r2a", "r2b")


def router_config(router, names=ROUTER_IFS, **extra):
    return {"interfaces": [{"netns": router.r, "names": list(names)}],
            "timeouts": {"idle": 30, "active": 60}, **extra}


def snapshot(router):
    return {ifname: link_stats(router.r, ifname) for ifname in ROUTER_IFS}


def assert_matches_link_counters(records, router, before, after):
    for ifname in ROUTER_IFS:
        for direction, prefix in (("ingress", "rx"), ("egress", "tx")):
            packets, octets = totals(records, interface=ifname, direction=direction)
            link_packets = after[ifname][f"{prefix}_packets"] - before[ifname][f"{prefix}_packets"]
            link_bytes = after[ifname][f"{prefix}_bytes"] - before[ifname][f"{prefix}_bytes"]
            assert (ifname, direction, packets) == (ifname, direction, link_packets)
            assert (ifname, direction, octets + ETH_HEADER * packets) == (ifname, direction, link_bytes)


def iperf3(router, *client_args, server_addr="10.2.0.1", bind=None):
    """Run an iperf3 client in h1 against a one-off server in h2; return its JSON report."""
    port = 5201
    server = subprocess.Popen(["ip", "netns", "exec", router.h2, "iperf3", "-s", "-1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(50):
            if sh(f"ip netns exec {router.h2} ss -ltn sport = :{port}").stdout.count("LISTEN"):
                break
            subprocess.run(["sleep", "0.1"])
        out = sh(f"ip netns exec {router.h1} iperf3 -c {server_addr} -p {port} --json " + " ".join(client_args))
        return json.loads(out.stdout)
    finally:
        server.wait(timeout=30)


def test_icmp_and_udp_exact_across_an_asymmetric_router(router, agent_factory):
    agent = agent_factory(router_config(router)).start()
    before = snapshot(router)
    pings = sh(f"ip netns exec {router.h1} ping -c 25 -i 0.02 -q 10.2.0.1")
    assert " 25 received" in pings.stdout
    report = iperf3(router, "-u", "-b", "20M", "-l", "1000", "-t", "3")
    assert "error" not in report, report.get("error")
    sent_datagrams = report["end"]["sum_sent"]["packets"]
    router.settle()
    agent.stop()
    after = snapshot(router)
    records = agent.records()

    # ping -c 25: requests enter on r1 and leave on r2a; replies come back on r2b (asymmetric) and leave on r1.
    for ifname, direction, icmp_type in (("r1", "ingress", 8), ("r2a", "egress", 8),
                                         ("r2b", "ingress", 0), ("r1", "egress", 0)):
        assert totals(records, interface=ifname, direction=direction, protocol="icmp",
                      icmpType=icmp_type) == (25, 25 * 84)
    assert totals(records, interface="r2a", direction="ingress", protocol="icmp") == (0, 0)
    # iperf3 counted its datagrams: 1000 octets of payload + 8 UDP + 20 IP each, plus the one
    # 4-octet datagram of its UDP "connect" handshake, which its report leaves out.
    for ifname, direction in (("r1", "ingress"), ("r2a", "egress")):
        assert totals(records, interface=ifname, direction=direction, protocol="udp",
                      dport=5201) == (sent_datagrams + 1, sent_datagrams * 1028 + 32)
    assert_matches_link_counters(records, router, before, after)
    assert {r["endReason"] for r in records} <= {"forced_end", "idle_timeout", "end_of_flow"}


def test_tcp_exact_over_many_drain_cycles(router, agent_factory):
    agent = agent_factory(router_config(router, drainInterval=0.1)).start()
    before = snapshot(router)
    report = iperf3(router, "-t", "4")
    payload = report["end"]["sum_sent"]["bytes"]
    router.settle()
    agent.stop()
    after = snapshot(router)
    records = agent.records()
    assert_matches_link_counters(records, router, before, after)
    data_packets, data_octets = totals(records, interface="r1", direction="ingress", protocol="tcp", dport=5201)
    # iperf3's payload travelled inside these flows (plus the control connection and headers).
    assert data_octets > payload > 0
    assert data_octets - payload < data_packets * 80


def test_ipv6_tcp_udp_icmpv6_exact(router, agent_factory):
    agent = agent_factory(router_config(router)).start()
    before = snapshot(router)
    pings = sh(f"ip netns exec {router.h1} ping -6 -c 15 -i 0.02 -q fd02::1")
    assert " 15 received" in pings.stdout
    udp = iperf3(router, "-u", "-b", "10M", "-l", "1200", "-t", "2", server_addr="fd02::1")
    tcp = iperf3(router, "-t", "2", server_addr="fd02::1")
    router.settle()
    agent.stop()
    after = snapshot(router)
    records = agent.records()
    # ICMPv6 echo request (128) in on r1, out on r2a; reply (129) back through r2b.
    for ifname, direction, icmp_type in (("r1", "ingress", 128), ("r2a", "egress", 128),
                                         ("r2b", "ingress", 129), ("r1", "egress", 129)):
        assert totals(records, interface=ifname, direction=direction, protocol="icmpv6",
                      icmpType=icmp_type) == (15, 15 * 104)
    datagrams = udp["end"]["sum_sent"]["packets"]
    assert totals(records, interface="r1", direction="ingress", protocol="udp", ipVersion=6) == \
        (datagrams + 1, datagrams * (1200 + 8 + 40) + (4 + 8 + 40))  # + iperf3's connect datagram
    assert totals(records, interface="r1", direction="ingress", protocol="tcp", ipVersion=6)[1] > \
        tcp["end"]["sum_sent"]["bytes"]
    assert_matches_link_counters(records, router, before, after)


def test_fragments_are_metered_first_with_ports_then_without(router, agent_factory):
    agent = agent_factory(router_config(router, names=["r1"])).start()
    before = link_stats(router.r, "r1")
    # 3000 octets of ICMP payload over a 1500 MTU: three fragments per echo request.
    sh(f"ip netns exec {router.h1} ping -c 6 -i 0.05 -s 3000 -q 10.2.0.1")
    router.settle()
    agent.stop()
    after = link_stats(router.r, "r1")
    records = agent.records()
    requests = [r for r in records if r["direction"] == "ingress" and r["protocol"] == "icmp"]
    first = [r for r in requests if r.get("icmpType") == 8]
    rest = [r for r in requests if r.get("icmpType") == 0]
    assert sum(r["packets"] for r in first) == 6
    assert sum(r["packets"] for r in rest) == 12
    assert all(r.get("fragmentId") for r in requests)
    assert sum(r["octets"] for r in requests) == 6 * (3000 + 8 + 3 * 20)
    assert sum(r["packets"] for r in requests) == after["rx_packets"] - before["rx_packets"]


def test_restart_under_traffic_loses_nothing(router, agent_factory, tmp_path):
    config = router_config(router, names=["r1"])
    first = agent_factory(config, keep_attached=True).start()
    before = link_stats(router.r, "r1")
    ping = subprocess.Popen(["ip", "netns", "exec", router.h1, "ping", "-c", "400", "-i", "0.01", "-q",
                             "10.2.0.1"], stdout=subprocess.PIPE, text=True)
    subprocess.run(["sleep", "1"])
    first.stop()
    subprocess.run(["sleep", "1"])  # metering goes on with no agent at all
    (tmp_path / "second").mkdir()
    second_config = dict(first.config, jsonLines=str(tmp_path / "second" / "flows.jsonl"))
    second = agent_factory(second_config, pin_path=first.pin_path)
    second.config_path = tmp_path / "second" / "kipfix.yaml"
    second.write_config(second_config)
    second.start()
    out, _ = ping.communicate(timeout=60)
    assert " 400 received" in out
    router.settle()
    second.stop()
    after = link_stats(router.r, "r1")
    records = first.records() + second.records()
    for direction, prefix, icmp_type in (("ingress", "rx", 8), ("egress", "tx", 0)):
        packets, octets = totals(records, direction=direction)
        assert packets == after[f"{prefix}_packets"] - before[f"{prefix}_packets"]
        assert octets + ETH_HEADER * packets == after[f"{prefix}_bytes"] - before[f"{prefix}_bytes"]
        assert totals(records, direction=direction, icmpType=icmp_type) == (400, 400 * 84)
    # The second agent found the first one's filters and pins, and removed them on its SIGTERM.
    assert "kipfix" not in sh(f"ip netns exec {router.r} tc filter show dev r1 ingress").stdout
