"""kill -9 at any moment loses nothing and sends nothing twice (issue 12).

The agent meters the router's r1 and exports IPFIX over UDP to a collector
that outlives it, and JSON lines; it is killed with SIGKILL inside each
window of its cycle (tests/crashpoint.py stops it exactly there) or at
random moments, and restarted on the same pin path. Ground truth: ping's
own count and r1's kernel counters (ip -s link). The collector's sums must
equal them exactly; the only records allowed to miss are those the agent
says were in doubt (being sent at the kill), and then the sums plus those
equal the truth.
"""

from __future__ import annotations

import os
import random
import re
import stat
import subprocess
import time

import pytest

from agentproc import totals, wait_for
from kipfix.agent.collector.server import Collector
from kipfix.agent.datapath.netnsids import STATE_DIR
from kipfix.agent.flows.journal import journal_path
from router import link_stats, sh

pytestmark = pytest.mark.root

TEMPLATE = ["flowStartMilliseconds", "flowEndMilliseconds", "sourceIPv4Address", "destinationIPv4Address",
            "protocolIdentifier", "icmpTypeCodeIPv4", "flowDirection", "packetDeltaCount", "octetDeltaCount"]
ETH_HEADER = 14
DOUBT = re.compile(r"(\d+) flows \((\d+) packets, (\d+) octets\) were being sent when the agent was killed")


@pytest.fixture
def collector():
    server = Collector("127.0.0.1", 0, out=None, err=None).start()
    yield server
    server.stop()


def agent_config(collector: Collector, router) -> dict:
    return {"interfaces": [{"netns": router.r, "names": ["r1"]}],
            "collectors": [{"address": f"127.0.0.1:{collector.port}"}],
            "templates": [{"id": 256, "template": TEMPLATE}],
            "timeouts": {"idle": 1, "active": 2}, "drainInterval": 0.1}


def collected(collector: Collector) -> dict[str, tuple[int, int]]:
    """(packets, octets) per direction in the collector's data records."""
    out = {"ingress": [0, 0], "egress": [0, 0], "requests": [0, 0]}
    for record in collector.records(256):
        values = record.values
        side = out["egress" if values["flowDirection"] else "ingress"]
        side[0] += values["packetDeltaCount"]
        side[1] += values["octetDeltaCount"]
        if values["flowDirection"] == 0 and values["protocolIdentifier"] == 1 \
                and values["icmpTypeCodeIPv4"] == 8 << 8:
            out["requests"][0] += values["packetDeltaCount"]
            out["requests"][1] += values["octetDeltaCount"]
    return {k: tuple(v) for k, v in out.items()}


def in_doubt(logs: str) -> tuple[int, int]:
    """(packets, octets) the restarted agents said were in doubt."""
    found = DOUBT.findall(logs)
    return sum(int(p) for _f, p, _o in found), sum(int(o) for _f, _p, o in found)


def start_ping(router, count: int, interval: float) -> subprocess.Popen:
    return subprocess.Popen(["ip", "netns", "exec", router.h1, "ping", "-c", str(count), "-i", str(interval),
                             "-q", "10.2.0.1"], stdout=subprocess.PIPE, text=True)


def ping_report(ping: subprocess.Popen) -> tuple[int, int]:
    out, _ = ping.communicate(timeout=120)
    sent, received = re.search(r"(\d+) packets transmitted, (\d+) received", out).groups()
    return int(sent), int(received)


def check_totals(proc, collector, router, before, sent: int) -> None:
    """Stop the agent; the collector and the JSON lines hold exactly what crossed r1."""
    router.settle()
    assert proc.stop() == 0
    after = link_stats(router.r, "r1")
    truth = {"ingress": (after["rx_packets"] - before["rx_packets"], after["rx_bytes"] - before["rx_bytes"]),
             "egress": (after["tx_packets"] - before["tx_packets"], after["tx_bytes"] - before["tx_bytes"])}
    assert truth["ingress"][0] >= sent
    records = proc.records()
    for direction, (packets, octets) in truth.items():  # JSON lines: written before the journal, cut at restart
        assert totals(records, direction=direction) == (packets, octets - ETH_HEADER * packets), direction
    assert totals(records, direction="ingress", icmpType=8) == (sent, sent * 84)

    doubt_packets, doubt_octets = in_doubt(proc.all_logs())
    want_packets = truth["ingress"][0] + truth["egress"][0] - doubt_packets

    def arrived():
        got = collected(collector)
        return got["ingress"][0] + got["egress"][0] >= want_packets
    wait_for(arrived, 30, f"{want_packets} packets at the collector")
    time.sleep(0.5)  # anything more would be a duplicate: give it the time to arrive
    got = collected(collector)
    if doubt_packets == 0:
        for direction, (packets, octets) in truth.items():
            assert got[direction] == (packets, octets - ETH_HEADER * packets), (direction, got, truth)
        assert got["requests"] == (sent, sent * 84)
    else:
        assert got["ingress"][0] + got["egress"][0] + doubt_packets == truth["ingress"][0] + truth["egress"][0]
        assert got["ingress"][1] + got["egress"][1] + doubt_octets == \
            sum(octets - ETH_HEADER * packets for packets, octets in truth.values())


@pytest.mark.parametrize("point, nth", [("before-commit", 12), ("after-commit", 12), ("after-clear", 12),
                                        ("sent", 3), ("sending", 2)])
def test_a_kill_in_each_window_of_the_cycle(point, nth, router, agent_factory, collector):
    proc = agent_factory(agent_config(collector, router))
    before = link_stats(router.r, "r1")
    proc.start(crash=(point, nth), wait=False)
    proc.wait_log("attached kipfix to r1", timeout=60)
    ping = start_ping(router, 300, 0.01)
    assert proc.proc.wait(60) == -9
    assert f"crashpoint: SIGKILL at {point} #{nth}" in proc.log()
    proc._log.close()
    proc.start()
    sent, _received = ping_report(ping)
    assert sent == 300
    check_totals(proc, collector, router, before, sent)
    doubt_packets, _ = in_doubt(proc.all_logs())
    assert (doubt_packets > 0) == (point == "sending")  # the message about to leave is counted, not resent


def test_a_kill_during_recovery_and_a_resize(router, agent_factory, collector):
    """Killed after a swap (the table it journaled last is the one the program writes again), then
    while taking over, then by a restart that changes maxFlows before its first commit: the retired
    tables stay pinned until their flows are journaled, and the one the program was writing is read
    even though the journal names it."""
    config = agent_config(collector, router)
    proc = agent_factory(dict(config, maxFlows=64))
    before = link_stats(router.r, "r1")
    proc.start(crash=("before-commit", 15), wait=False)
    proc.wait_log("attached kipfix to r1", timeout=60)
    ping = start_ping(router, 400, 0.01)
    assert proc.proc.wait(60) == -9
    proc._log.close()
    proc.start(crash=("recovery", 1), wait=False)
    assert proc.proc.wait(60) == -9
    proc._log.close()
    proc.write_config(dict(proc.config, maxFlows=128))
    proc.start(crash=("before-commit", 1), wait=False)  # the first commit would hold the retired tables
    assert proc.proc.wait(60) == -9
    assert "made for maxFlows 64, the config asks for 128" in proc.log()
    proc._log.close()
    retired = sorted(name for name in os.listdir(proc.pin_path) if name.startswith("retired-"))
    assert len(retired) == 2 and len([name for name in retired if name.endswith("-live")]) == 1, retired
    proc.start()
    assert not [name for name in os.listdir(proc.pin_path) if name.startswith("retired-")]
    sent, _received = ping_report(ping)
    assert sent == 400
    check_totals(proc, collector, router, before, sent)


def test_random_kills_lose_nothing(router, agent_factory, collector):
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    print(f"seed {seed}")
    proc = agent_factory(agent_config(collector, router))
    before = link_stats(router.r, "r1")
    proc.start()
    proc.wait_log("attached kipfix to r1")
    ping = start_ping(router, 1500, 0.005)
    for _ in range(5):
        time.sleep(rng.uniform(0.3, 1.5))
        proc.kill()
        proc.start(wait=rng.random() < 0.6)  # some kills land while the next agent starts and recovers
    proc.wait_log("kipfix agent running", timeout=60)
    sent, _received = ping_report(ping)
    assert sent == 1500
    check_totals(proc, collector, router, before, sent)
    journal = journal_path(STATE_DIR, proc.pin_path)
    assert stat.S_IMODE(os.stat(journal + ".sent").st_mode) == 0o600
