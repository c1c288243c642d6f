"""Pytest fixtures: throw-away network namespaces, veth pairs and tc programs.

Import them from conftest.py (``from netns_fixtures import *`` or by name).
Everything a fixture creates is removed at teardown, also when the test fails;
tests never touch the host's own interfaces.

Fixtures
- ``netns_factory``: NetnsFactory; ``.netns()`` makes a uniquely named netns
  (lo up), ``.veth(ns_a, ns_b)`` a veth pair between two of them,
  ``.iface(ns, name)`` one interface in a netns,
  ``.sleeper(ns)`` a process living in a netns (for /proc/PID/ns/net).
- ``veth_pair``: two netns joined by a veth pair with IPv4 addresses (IPv6
  off, so packet counts are exact): VethPair(ns_a, ns_b, if_a, if_b, ip_a, ip_b).
- ``tc_state_file``: a private kipfix tc state file (also set as
  $KIPFIX_TC_STATE) so tests never write /run/kipfix.
- ``tc_programs``: kipfix.agent.datapath.tc.Programs of a trivial BCC SCHED_CLS program
  returning TC_ACT_UNSPEC (session scope).
- ``bpf_counter``: factory: ``bpf_counter(action=-1)`` loads a SCHED_CLS
  program that counts packets and returns ``action``; returns a
  BpfCounter(fd, count()).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass

import pytest

__all__ = ["netns_factory", "veth_pair", "tc_state_file", "tc_programs", "bpf_counter",
           "NetnsFactory", "VethPair", "BpfCounter", "link_stats", "ping", "unique_ifname"]


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


def unique_ifname(prefix: str = "kx") -> str:
    """An interface name unlikely to exist anywhere (<= 15 characters)."""
    return f"{prefix}{uuid.uuid4().hex[:8]}"[:15]


def link_stats(ns: str, ifname: str) -> dict:
    """``ip -s link`` counters of an interface: {'rx': {...}, 'tx': {...}}."""
    out = _ip("-n", ns, "-s", "-j", "link", "show", "dev", ifname).stdout
    return json.loads(out)[0]["stats64"]


def ping(ns: str, address: str, count: int = 3, check: bool = True) -> subprocess.CompletedProcess:
    """ping from inside ``ns`` (fast interval, bounded wait)."""
    return subprocess.run(["ip", "netns", "exec", ns, "ping", "-q", "-n", "-c", str(count),
                           "-i", "0.05", "-W", "1", address],
                          check=check, capture_output=True, text=True)


class NetnsFactory:
    def __init__(self) -> None:
        self.namespaces: list[str] = []
        self.processes: list[subprocess.Popen] = []
        self._scratch: str | None = None

    def netns(self, prefix: str = "kxtest") -> str:
        name = f"{prefix}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        _ip("netns", "add", name)
        self.namespaces.append(name)
        _ip("-n", name, "link", "set", "lo", "up")
        return name

    def veth(self, ns_a: str, ns_b: str, if_a: str | None = None, if_b: str | None = None,
             up: bool = True) -> tuple[str, str]:
        """A veth pair if_a (in ns_a) <-> if_b (in ns_b), IPv6 off on both."""
        if_a = if_a or unique_ifname("kxa")
        if_b = if_b or unique_ifname("kxb")
        _ip("-n", ns_a, "link", "add", if_a, "type", "veth", "peer", "name", if_b, "netns", ns_b)
        for ns, ifname in ((ns_a, if_a), (ns_b, if_b)):
            subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-q", "-w",
                            f"net.ipv6.conf.{ifname}.disable_ipv6=1"],
                           check=True, capture_output=True)
            if up:
                _ip("-n", ns, "link", "set", ifname, "up")
        return if_a, if_b

    def iface(self, ns: str, ifname: str | None = None) -> str:
        """One interface in ``ns`` (this kernel has no dummy driver: a veth whose
        peer lives in a scratch netns, so it is the only new name in ``ns``)."""
        if self._scratch is None:
            self._scratch = self.netns("kxscratch")
        ifname = ifname or unique_ifname("kxi")
        _ip("-n", ns, "link", "add", ifname, "type", "veth", "peer", "name",
            unique_ifname("kxp"), "netns", self._scratch)
        return ifname

    def sleeper(self, ns: str) -> int:
        """PID of a process running inside ``ns`` until teardown."""
        proc = subprocess.Popen(["ip", "netns", "exec", ns, "sleep", "3600"])
        self.processes.append(proc)
        want = os.stat(f"/var/run/netns/{ns}").st_ino
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # wait for the exec's setns
            try:
                if os.stat(f"/proc/{proc.pid}/ns/net").st_ino == want:
                    return proc.pid
            except FileNotFoundError:
                break
            time.sleep(0.01)
        raise RuntimeError(f"process in netns {ns} did not start")

    def remove(self, ns: str) -> None:
        _ip("netns", "del", ns, check=False)
        if ns in self.namespaces:
            self.namespaces.remove(ns)

    def cleanup(self) -> None:
        for proc in self.processes:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            proc.wait()
        for ns in list(self.namespaces):
            self.remove(ns)


@dataclass(frozen=True)
class VethPair:
    ns_a: str
    ns_b: str
    if_a: str
    if_b: str
    ip_a: str
    ip_b: str


@pytest.fixture
def netns_factory():
    factory = NetnsFactory()
    try:
        yield factory
    finally:
        factory.cleanup()


_subnet = iter(range(1, 250))


@pytest.fixture
def veth_pair(netns_factory) -> VethPair:
    ns_a = netns_factory.netns("kxa")
    ns_b = netns_factory.netns("kxb")
    if_a, if_b = netns_factory.veth(ns_a, ns_b)
    net = next(_subnet)
    ip_a, ip_b = f"10.213.{net}.1", f"10.213.{net}.2"
    _ip("-n", ns_a, "addr", "add", f"{ip_a}/24", "dev", if_a)
    _ip("-n", ns_b, "addr", "add", f"{ip_b}/24", "dev", if_b)
    return VethPair(ns_a, ns_b, if_a, if_b, ip_a, ip_b)


@pytest.fixture
def tc_state_file(tmp_path, monkeypatch) -> str:
    path = str(tmp_path / "tc-state.json")
    monkeypatch.setenv("KIPFIX_TC_STATE", path)
    return path


@pytest.fixture(scope="session")
def tc_programs():
    from bcc import BPF

    from kipfix.agent.datapath.tc import Programs

    bpf = BPF(text=b"int kipfix_test(struct __sk_buff *skb) { return -1; }")
    fn = bpf.load_func(b"kipfix_test", BPF.SCHED_CLS)
    yield Programs(fn.fd, fn.fd)
    bpf.cleanup()


_COUNTER_C = """
BPF_ARRAY(counts, u64, 1);
int count_packets(struct __sk_buff *skb) {
    int key = 0;
    u64 *value = counts.lookup(&key);
    if (value)
        __sync_fetch_and_add(value, 1);
    return ACTION;
}
"""


@dataclass
class BpfCounter:
    bpf: object
    fd: int

    def count(self) -> int:
        return sum(v.value for v in self.bpf[b"counts"].values())


@pytest.fixture
def bpf_counter():
    from bcc import BPF

    loaded = []

    def make(action: int = -1) -> BpfCounter:
        bpf = BPF(text=_COUNTER_C.encode(), cflags=[f"-DACTION={action}"])
        fn = bpf.load_func(b"count_packets", BPF.SCHED_CLS)
        loaded.append(bpf)
        return BpfCounter(bpf, fn.fd)

    yield make
    for bpf in loaded:
        bpf.cleanup()
