"""The kipfix command line as an operator types it: meter, dump, flush."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from router import sh

pytestmark = pytest.mark.root
KIPFIX = str(Path(sys.executable).with_name("kipfix"))
# ICMPv6 the kernel sends by itself at any moment (MLD reports, router and neighbour discovery):
# metered like any packet, so a flow of these may appear between two dumps.
KERNEL_ICMPV6_TYPES = {130, 131, 132, 133, 134, 135, 136, 137, 143}


def ours(flow: dict) -> bool:
    """A flow the test's own traffic made (``kipfix dump --json``)."""
    return not (flow["protocol"] == 58 and flow["dport"] >> 8 in KERNEL_ICMPV6_TYPES)


def dump_json(pin: str) -> list[dict]:
    return [json.loads(line) for line in kipfix("dump", "--json", "--pin-path", pin).stdout.splitlines()]


def kipfix(*args, check=True) -> subprocess.CompletedProcess:
    result = subprocess.run([KIPFIX, "--log-level", "warning", *args], capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"kipfix {' '.join(args)} exited {result.returncode}:\n{result.stderr}")
    return result


@pytest.fixture
def pair(tmp_path, monkeypatch):
    """Two namespaces joined by a veth, IPv4 and IPv6, static neighbours; a private pin path and tc state."""
    tag = uuid.uuid4().hex[:6]
    a, b = f"kfc{tag}a", f"kfc{tag}b"
    pin = f"/sys/fs/bpf/kipfix-test-{tag}"
    monkeypatch.setenv("KIPFIX_TC_STATE", str(tmp_path / "tc-state.json"))
    try:
        for ns in (a, b):
            sh(f"ip netns add {ns}")
        sh(f"ip link add kfc{tag}a type veth peer name kfc{tag}b")
        for ns, dev, host in ((a, f"kfc{tag}a", 1), (b, f"kfc{tag}b", 2)):
            sh(f"ip link set {dev} netns {ns} name eth0")
            sh(f"ip -n {ns} addr add 10.81.0.{host}/24 dev eth0")
            sh(f"ip -n {ns} addr add fd81::{host}/64 dev eth0 nodad")
            sh(f"ip -n {ns} link set eth0 up")
        yield a, b, pin
    finally:
        kipfix("meter", "detach", "--netns", a, "-i", "eth0", check=False)
        for ns in (a, b):
            sh(f"ip netns del {ns}", check=False)
        shutil.rmtree(pin, ignore_errors=True)
        sh(f"rm -f /run/kipfix/netns-ids{pin.replace('/', '_')}.json", check=False)


def test_attach_status_dump_flush_detach(pair):
    a, _b, pin = pair
    kipfix("meter", "attach", "--netns", a, "-i", "eth0", "--pin-path", pin, "--max-flows", "1024")
    kipfix("meter", "attach", "--netns", a, "-i", "eth0", "--pin-path", pin, "--max-flows", "1024")  # idempotent
    status = kipfix("meter", "status", "--netns", a).stdout.splitlines()
    assert status[0].split() == ["NETNS", "IFNAME", "IFINDEX", "DIR", "PROG", "NAME"]
    assert sorted(line.split()[3] for line in status[1:]) == ["egress", "ingress"]
    ifindex = int(status[1].split()[2])

    sh(f"ip netns exec {a} ping -c 4 -i 0.02 -q 10.81.0.2")
    sh(f"ip netns exec {a} ping -6 -c 3 -i 0.02 -q fd81::2")

    table = kipfix("dump", "--pin-path", pin).stdout.splitlines()
    assert table[0].split() == ["IFINDEX", "DIR", "PROTO", "SRC", "DST", "PKTS", "BYTES", "NETNS"]
    rows = [line.split() for line in table[1:]]
    assert [str(ifindex), "egr", "icmp(8/0)", "10.81.0.1", "10.81.0.2", "4", "336", a] in rows
    assert [str(ifindex), "ing", "icmp(0/0)", "10.81.0.2", "10.81.0.1", "4", "336", a] in rows
    assert [str(ifindex), "egr", "icmpv6(128/0)", "[fd81::1]", "[fd81::2]", "3", "312", a] in rows

    flows = dump_json(pin)
    echo = [f for f in flows if f["protocol"] == 1 and f["dport"] == 8 << 8]
    assert [(f["src"], f["dst"], f["packets"], f["bytes"], f["direction"]) for f in echo] == \
        [("10.81.0.1", "10.81.0.2", 4, 336, "egress")]

    flushed = kipfix("flush", "--pin-path", pin, "-i", str(ifindex), "-p", "icmp", "-s", "10.81.0.1", "-S", "0",
                     "-d", "10.81.0.2", "-D", str(8 << 8))
    assert flushed.stdout.strip() == "flushed 1 flow entries (4 packets)"
    after = dump_json(pin)
    assert not [f for f in after if f["protocol"] == 1 and f["dport"] == 8 << 8]
    assert len([f for f in after if ours(f)]) == len([f for f in flows if ours(f)]) - 1

    assert "flushed" in kipfix("flush", "--all", "--pin-path", pin).stdout
    assert [f for f in dump_json(pin) if ours(f)] == []

    detached = kipfix("meter", "detach", "--netns", a, "-i", "eth0")
    assert "detached 2 kipfix filters" in detached.stdout
    assert sh(f"tc -n {a} qdisc show dev eth0").stdout.count("clsact") == 0


def test_mistakes_get_one_line_each(pair):
    a, _b, pin = pair
    result = kipfix("meter", "attach", "--netns", a, "-i", "eth0", "-i", "nosuch0", "--pin-path", pin, check=False)
    assert result.returncode == 1
    assert "attached kipfix to eth0" in result.stdout  # the good one is attached anyway
    assert [line for line in result.stderr.splitlines() if "nosuch0" in line] == \
        [f"kipfix: interface 'nosuch0' not found in netns {a}"]

    result = kipfix("meter", "status", "--netns", "kfnonexistent", check=False)
    assert result.returncode == 1 and "kfnonexistent" in result.stderr and "Traceback" not in result.stderr

    result = kipfix("dump", "--pin-path", "/sys/fs/bpf/kipfix-nothing-here", check=False)
    assert result.returncode == 1
    assert "no kipfix flow table pinned at /sys/fs/bpf/kipfix-nothing-here/flows_a" in result.stderr

    result = kipfix("flush", "--pin-path", pin, "-i", "3", check=False)
    assert result.returncode == 2 and "needs all of -i, -p, -s, -S, -d, -D" in result.stderr

    result = kipfix("flush", "--pin-path", pin, "-p", "gre2", check=False)
    assert result.returncode == 2 and "protocol 'gre2'" in result.stderr


def run_into_closed_pipe(*args) -> subprocess.CompletedProcess:
    """``kipfix ARGS | head -0``, deterministically: stdout is a pipe nobody reads any more."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run([KIPFIX, *args], stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(write_end)


def test_a_closed_pipe_ends_every_printing_command_quietly(pair):
    """``kipfix dump | head`` and friends end as a Unix filter does: killed by SIGPIPE, nothing on stderr."""
    a, _b, pin = pair
    kipfix("meter", "attach", "--netns", a, "-i", "eth0", "--pin-path", pin, "--max-flows", "1024")
    sh(f"ip netns exec {a} ping -c 3 -i 0.02 -q 10.81.0.2")
    for args in (["dump", "--pin-path", pin], ["dump", "--json", "--pin-path", pin],
                 ["meter", "status", "--netns", a], ["dependency-check"], ["dependency-check", "--json"],
                 ["--help"], ["dump", "--help"], ["--version"]):
        result = run_into_closed_pipe(*args)
        assert (result.returncode, result.stderr) == (-signal.SIGPIPE, ""), args
    # as a user types it: head gets its line, and nothing else is printed
    shell = subprocess.run(f"{KIPFIX} dump --pin-path {pin} | head -1", shell=True, capture_output=True, text=True)
    assert shell.stdout.splitlines()[0].split()[:2] == ["IFINDEX", "DIR"]
    assert shell.stderr == ""
