"""The agent over its life: end reasons, reloads, mistakes, a full table."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from agentproc import totals, wait_for
from kipfix.agent.datapath.netnsids import default_path
from router import link_stats, sh
from test_metering_exact import iperf3

pytestmark = pytest.mark.root


def kipfix_filters(netns: str, ifname: str) -> str:
    return sh(f"tc -n {netns} filter show dev {ifname} ingress").stdout + \
        sh(f"tc -n {netns} filter show dev {ifname} egress").stdout


def test_idle_active_and_end_of_flow_reasons(router, agent_factory):
    proc = agent_factory({"interfaces": [{"netns": router.r, "names": ["r1"]}],
                  "timeouts": {"idle": 1, "active": 2}}).start()
    before = link_stats(router.r, "r1")
    sh(f"ip netns exec {router.h1} ping -c 1 -q 10.2.0.1")
    wait_for(lambda: any(r["protocol"] == "icmp" and r["endReason"] == "idle_timeout" for r in proc.records()),
             10, "the ping's idle-timeout record")
    iperf3(router, "-t", "5", "-b", "50M")
    router.settle()
    proc.stop()
    after = link_stats(router.r, "r1")
    records = proc.records()
    data = [r for r in records if r["direction"] == "ingress" and r["protocol"] == "tcp"
            and r["dport"] == 5201]
    reasons = [r["endReason"] for r in data]
    assert reasons.count("active_timeout") >= 2, reasons
    assert "end_of_flow" in reasons, reasons
    # The deltas of each connection add up to what crossed the interface.
    packets, octets = totals(records, direction="ingress")
    assert packets == after["rx_packets"] - before["rx_packets"]
    assert octets + 14 * packets == after["rx_bytes"] - before["rx_bytes"]
    for record in records:
        assert record["flowStartMilliseconds"] <= record["flowEndMilliseconds"]


def test_sighup_applies_the_difference_and_a_bad_file_keeps_the_running_config(router, agent_factory):
    config = {"interfaces": [{"netns": router.r, "names": ["r1"]}]}
    proc = agent_factory(config).start()
    proc.wait_log("attached kipfix to r1")
    assert "kipfix_ingress" not in kipfix_filters(router.r, "r2a")
    before = link_stats(router.r, "r1")
    ping = subprocess.Popen(["ip", "netns", "exec", router.h1, "ping", "-c", "150", "-i", "0.02", "-q",
                             "10.2.0.1"], stdout=subprocess.PIPE, text=True)

    proc.write_config(dict(proc.config, interfaces=[{"netns": router.r, "names": ["r1", "r2a"]}]))
    proc.signal(signal.SIGHUP)
    proc.wait_log("configuration generation 2 applied")
    wait_for(lambda: "kipfix_ingress" in kipfix_filters(router.r, "r2a"), 5, "r2a attached after SIGHUP")

    proc.write_config(dict(proc.config, timeouts={"idle": -1}))
    proc.signal(signal.SIGHUP)
    proc.wait_log("reload failed, keeping the running configuration")
    assert "timeouts.idle: -1 is out of range" in proc.log()

    out, _ = ping.communicate(timeout=30)
    # Not "150 received": creating r2a's clsact qdisc mid-traffic makes the kernel deactivate
    # r2a's queues for an instant (qdisc_graft -> dev_deactivate), which can drop a request
    # there, with or without kipfix. r1's qdisc existed before the ping, so r1 sees all 150.
    assert "150 packets transmitted" in out
    router.settle()
    proc.stop()
    after = link_stats(router.r, "r1")
    records = proc.records()
    # r1 was metered throughout both reloads: nothing lost.
    assert totals(records, interface="r1", direction="ingress")[0] == after["rx_packets"] - before["rx_packets"]
    assert totals(records, interface="r1", direction="ingress", icmpType=8) == (150, 150 * 84)
    assert totals(records, interface="r2a", direction="egress")[0] > 0
    # SIGTERM detached everything, removed the clsact qdiscs kipfix created and the netns ids.
    assert not os.path.exists(default_path(proc.pin_path))
    for ifname in ("r1", "r2a"):
        assert "kipfix" not in kipfix_filters(router.r, ifname)
        assert "clsact" not in sh(f"tc -n {router.r} qdisc show dev {ifname}").stdout


def test_unknown_interface_and_netns_are_reported_and_the_rest_is_metered(router, agent_factory):
    proc = agent_factory({"interfaces": [{"netns": router.r, "names": ["r1", "nosuch0"]},
                                 {"netns": "kfnonexistent", "names": ["eth0"]}]}).start()
    proc.wait_log("attached kipfix to r1")
    wait_for(lambda: "nosuch0" in proc.log() and "kfnonexistent" in proc.log(), 5, "both mistakes logged")
    sh(f"ip netns exec {router.h1} ping -c 5 -i 0.02 -q 10.2.0.1")
    router.settle()
    proc.stop()
    assert proc.proc.returncode == 0
    assert totals(proc.records(), interface="r1", direction="ingress", icmpType=8) == (5, 5 * 84)
    lines = [line for line in proc.log().splitlines() if "nosuch0" in line]
    assert lines and all("ERROR" in line or "WARNING" in line for line in lines)


def test_invalid_config_at_start_exits_with_the_message(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("maxFlows: 3\n")
    result = subprocess.run([sys.executable, "-m", "kipfix.agent.cli", "agent", "--config", str(path)],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "maxFlows: 3 is out of range; accepted: 16..16777216" in result.stderr


def test_full_table_is_logged_with_the_lost_counts(router, agent_factory):
    proc = agent_factory({"interfaces": [{"netns": router.r, "names": ["r1"]}], "maxFlows": 16,
                  "drainInterval": 3}).start()
    proc.wait_log("attached kipfix to r1")
    # 40 distinct UDP flows in one drain interval: 16 fit, 24 datagrams (28 octets each) do not.
    # The router blackholes them, so no reply competes for the table.
    sh(f"ip -n {router.r} route add blackhole 10.9.0.0/24")
    script = ("import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
              "for port in range(40): s.sendto(b'', ('10.9.0.1', 20000 + port))")
    sh(f"ip netns exec {router.h1} {sys.executable} -c \"{script}\"")
    proc.wait_log("flow table full", timeout=10)
    assert "24 packets / 672 octets not metered" in proc.log()
    dump = subprocess.run([sys.executable, "-m", "kipfix.agent.cli", "dump", "--pin-path", proc.pin_path],
                          capture_output=True, text=True)
    assert "table full: 24 packets, 672 octets not metered" in dump.stderr
