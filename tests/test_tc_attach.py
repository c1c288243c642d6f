"""tc attach/detach on real veth pairs in namespaces the tests create."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from kipfix.agent.datapath import tc
from kipfix.agent.datapath.netns import NetnsError, NetnsNotFound, NetnsRef, netns_cookie, run_in_netns
from kipfix.agent.datapath.tc import HANDLE, PRIO, InterfaceNotFound, Programs

try:  # fixtures (conftest may import them too); tests/ may or may not be a package
    from netns_fixtures import *  # noqa: F401,F403
except ImportError:
    from tests.netns_fixtures import *  # noqa: F401,F403

pytestmark = pytest.mark.root


def tc_json(ns: str, *args: str) -> list[dict]:
    out = subprocess.run(["tc", "-n", ns, "-j", *args], check=True, capture_output=True,
                         text=True).stdout
    return json.loads(out) if out.strip() else []


def filters(ns: str, ifname: str, hook: str) -> list[dict]:
    """Filters with a handle (not the per-priority header lines), as `tc` sees them."""
    return [f for f in tc_json(ns, "filter", "show", "dev", ifname, hook) if "options" in f]


def has_clsact(ns: str, ifname: str) -> bool:
    return any(q["kind"] == "clsact" for q in tc_json(ns, "qdisc", "show", "dev", ifname))


def add_foreign_filter(ns: str, ifindex: int, fd: int, hook: str = "ingress") -> None:
    """A non-kipfix bpf filter at the kernel's default priority (no prio given)."""
    with tc_iproute(ns) as ipr:
        ipr.tc("add-filter", "bpf", ifindex, 1, fd=fd, name="foreign",
               parent=tc.PARENTS[hook], classid=1, direct_action=True)


def tc_iproute(ns: str):
    from kipfix.agent.datapath.netns import iproute

    return iproute(NetnsRef.parse(ns))


def ifindex_of(ns: str, ifname: str) -> int:
    with tc_iproute(ns) as ipr:
        return ipr.link_lookup(ifname=ifname)[0]


# ---- NetnsRef ---------------------------------------------------------------------

def test_netns_ref_parse():
    assert NetnsRef.parse("") == NetnsRef.parse("host") == NetnsRef.parse(None)
    assert NetnsRef.parse("host").is_host
    assert NetnsRef.parse("blue") == NetnsRef("name", "blue")
    assert NetnsRef.parse("blue").path == "/var/run/netns/blue"
    assert NetnsRef.parse("/proc/42/ns/net") == NetnsRef("path", "/proc/42/ns/net")
    assert str(NetnsRef.parse("/proc/42/ns/net")) == "/proc/42/ns/net"
    with pytest.raises(NetnsError, match="'a/b'"):
        NetnsRef.parse("a/b")


def test_unknown_netns_is_named_in_the_error(tc_programs, tc_state_file):
    with pytest.raises(NetnsNotFound, match="netns 'kx-no-such-ns'"):
        tc.attach("kx-no-such-ns", "eth0", tc_programs)
    with pytest.raises(NetnsNotFound, match="/proc/999999999/ns/net"):
        tc.status("/proc/999999999/ns/net")


def test_netns_cookie_differs_per_netns_and_matches_by_path(netns_factory):
    a, b = netns_factory.netns(), netns_factory.netns()
    pid = netns_factory.sleeper(a)
    cookie_a = netns_cookie(a)
    assert cookie_a != netns_cookie(b)
    assert cookie_a != netns_cookie("host")
    assert netns_cookie(f"/proc/{pid}/ns/net") == cookie_a


def test_run_in_netns_does_not_leak_fds_or_change_caller_netns(netns_factory):
    ns = netns_factory.netns()
    before_fds = len(os.listdir("/proc/self/fd"))
    own = os.stat("/proc/thread-self/ns/net").st_ino
    for _ in range(20):
        inside = run_in_netns(ns, lambda: os.stat("/proc/thread-self/ns/net").st_ino)
        assert inside == os.stat(f"/var/run/netns/{ns}").st_ino
        tc.status(ns)
    assert os.stat("/proc/thread-self/ns/net").st_ino == own
    assert len(os.listdir("/proc/self/fd")) == before_fds


# ---- attach / detach ----------------------------------------------------------------

def test_attach_creates_filters_on_both_hooks_and_is_idempotent(veth_pair, tc_programs,
                                                               tc_state_file):
    ns, ifname = veth_pair.ns_a, veth_pair.if_a
    ifindex = tc.attach(ns, ifname, tc_programs)
    assert ifindex == ifindex_of(ns, ifname)
    first = {hook: filters(ns, ifname, hook) for hook in ("ingress", "egress")}
    for hook, found in first.items():
        assert len(found) == 1, found
        assert found[0]["pref"] == PRIO
        assert found[0]["options"]["handle"] == hex(HANDLE)
        assert found[0]["options"]["bpf_name"] == f"kipfix_{hook}"
        assert found[0]["options"]["direct-action"] is True

    for _ in range(3):
        assert tc.attach(ns, ifname, tc_programs) == ifindex
    again = {hook: filters(ns, ifname, hook) for hook in ("ingress", "egress")}
    assert again == first
    assert sum(q["kind"] == "clsact" for q in tc_json(ns, "qdisc", "show", "dev", ifname)) == 1


def test_status_reports_every_attachment(veth_pair, tc_programs, tc_state_file):
    ns = veth_pair.ns_a
    ifindex = tc.attach(ns, veth_pair.if_a, tc_programs)
    found = tc.status(ns)
    by_dir = {a.direction: a for a in found}
    assert sorted(by_dir) == ["egress", "ingress"]
    for direction, att in by_dir.items():
        assert (att.netns, att.ifname, att.ifindex) == (ns, veth_pair.if_a, ifindex)
        assert att.prog_name == f"kipfix_{direction}"
        expected_id = filters(ns, veth_pair.if_a, direction)[0]["options"]["prog"]["id"]
        assert att.prog_id == expected_id > 0
    assert tc.status(ns, [veth_pair.if_a]) == found
    assert tc.status(veth_pair.ns_b) == []


def test_detach_removes_filters_and_the_clsact_kipfix_created(veth_pair, tc_programs,
                                                             tc_state_file):
    ns, ifname = veth_pair.ns_a, veth_pair.if_a
    assert not has_clsact(ns, ifname)
    tc.attach(ns, ifname, tc_programs)
    assert has_clsact(ns, ifname)
    assert tc.detach(ns, ifname) == 2
    assert filters(ns, ifname, "ingress") == filters(ns, ifname, "egress") == []
    assert not has_clsact(ns, ifname)
    assert tc.detach(ns, ifname) == 0  # nothing left: a second detach is harmless


def test_ownership_survives_process_boundaries(veth_pair, tc_programs, tc_state_file):
    """attach and detach in different processes: detach still removes kipfix's clsact."""
    ns, ifname = veth_pair.ns_a, veth_pair.if_a
    tc.attach(ns, ifname, tc_programs)
    with open(tc_state_file) as f:
        state = json.load(f)
    assert [e["ifname"] for e in state["clsact_owned"].values()] == [ifname]
    code = ("from kipfix.agent.datapath import tc; import sys; "
            f"sys.exit(0 if tc.detach({ns!r}, {ifname!r}) == 2 else 1)")
    subprocess.run([os.sys.executable, "-c", code], check=True,
                   env={**os.environ, "KIPFIX_TC_STATE": tc_state_file})
    assert not has_clsact(ns, ifname)
    with open(tc_state_file) as f:
        assert json.load(f)["clsact_owned"] == {}


def test_detach_keeps_foreign_clsact_and_foreign_filter(veth_pair, tc_programs, bpf_counter,
                                                       tc_state_file):
    ns, ifname = veth_pair.ns_a, veth_pair.if_a
    subprocess.run(["tc", "-n", ns, "qdisc", "add", "dev", ifname, "clsact"], check=True)
    foreign = bpf_counter()
    add_foreign_filter(ns, ifindex_of(ns, ifname), foreign.fd, "ingress")
    tc.attach(ns, ifname, tc_programs)
    assert len(filters(ns, ifname, "ingress")) == 2
    tc.detach(ns, ifname)
    left = filters(ns, ifname, "ingress")
    assert [f["options"]["bpf_name"] for f in left] == ["foreign"]
    assert has_clsact(ns, ifname)


def test_detach_keeps_kipfix_clsact_while_a_foreign_filter_uses_it(veth_pair, tc_programs,
                                                                  bpf_counter, tc_state_file):
    ns, ifname = veth_pair.ns_a, veth_pair.if_a
    tc.attach(ns, ifname, tc_programs)
    foreign = bpf_counter()
    add_foreign_filter(ns, ifindex_of(ns, ifname), foreign.fd, "egress")
    tc.detach(ns, ifname)
    assert [f["options"]["bpf_name"] for f in filters(ns, ifname, "egress")] == ["foreign"]
    assert has_clsact(ns, ifname)


def test_foreign_filter_still_sees_every_packet(veth_pair, tc_state_file, bpf_counter):
    """kipfix at its prio returns TC_ACT_UNSPEC: the default-prio filter behind it
    counts every packet the interface received, as `ip -s link` counts them."""
    ns, ifname = veth_pair.ns_a, veth_pair.if_a
    ifindex = ifindex_of(ns, ifname)
    subprocess.run(["tc", "-n", ns, "qdisc", "add", "dev", ifname, "clsact"], check=True)
    foreign = bpf_counter(-1)
    add_foreign_filter(ns, ifindex, foreign.fd, "ingress")
    meter = bpf_counter(-1)
    tc.attach(ns, ifname, Programs(meter.fd, None))
    rx_before = link_stats(ns, ifname)["rx"]["packets"]
    ping(veth_pair.ns_b, veth_pair.ip_a, count=7)
    received = link_stats(ns, ifname)["rx"]["packets"] - rx_before
    assert received >= 7
    assert foreign.count() == received
    assert meter.count() == received


def test_kipfix_runs_before_default_prio_filters(veth_pair, tc_state_file, bpf_counter):
    """A default-prio filter that drops everything cannot hide packets from kipfix."""
    ns, ifname = veth_pair.ns_a, veth_pair.if_a
    subprocess.run(["tc", "-n", ns, "qdisc", "add", "dev", ifname, "clsact"], check=True)
    dropper = bpf_counter(2)  # TC_ACT_SHOT
    add_foreign_filter(ns, ifindex_of(ns, ifname), dropper.fd, "ingress")
    meter = bpf_counter(-1)
    tc.attach(ns, ifname, Programs(meter.fd, None))
    # ARP replies cannot come back through the dropper: give the sender the neighbour.
    mac = json.loads(subprocess.run(["ip", "-n", ns, "-j", "link", "show", "dev", ifname],
                                    check=True, capture_output=True, text=True).stdout)[0]["address"]
    subprocess.run(["ip", "-n", veth_pair.ns_b, "neigh", "replace", veth_pair.ip_a, "lladdr", mac,
                    "dev", veth_pair.if_b, "nud", "permanent"], check=True)
    rx_before = link_stats(ns, ifname)["rx"]["packets"]
    assert ping(veth_pair.ns_b, veth_pair.ip_a, count=3, check=False).returncode != 0
    received = link_stats(ns, ifname)["rx"]["packets"] - rx_before
    assert received == 3
    assert meter.count() == received == dropper.count()


def test_attach_by_proc_pid_path(veth_pair, netns_factory, tc_programs, tc_state_file):
    pid = netns_factory.sleeper(veth_pair.ns_b)
    path = f"/proc/{pid}/ns/net"
    ifindex = tc.attach(path, veth_pair.if_b, tc_programs)
    found = tc.status(path)
    assert {(a.netns, a.ifname, a.ifindex, a.direction) for a in found} == {
        (path, veth_pair.if_b, ifindex, "ingress"), (path, veth_pair.if_b, ifindex, "egress")}
    assert len(tc.status(veth_pair.ns_b)) == 2  # same netns seen by name
    assert tc.detach(path, veth_pair.if_b) == 2
    assert not has_clsact(veth_pair.ns_b, veth_pair.if_b)


def test_unknown_interface_is_named(veth_pair, tc_programs, tc_state_file):
    with pytest.raises(InterfaceNotFound) as err:
        tc.attach(veth_pair.ns_a, "kxnope0", tc_programs)
    assert str(err.value) == f"interface 'kxnope0' not found in netns {veth_pair.ns_a}"


def test_interface_in_another_netns_is_named(veth_pair, tc_programs, tc_state_file):
    with pytest.raises(InterfaceNotFound) as err:
        tc.attach(veth_pair.ns_a, veth_pair.if_b, tc_programs)
    assert str(err.value) == (f"interface {veth_pair.if_b!r} is not in netns {veth_pair.ns_a} "
                              f"(it is in netns {veth_pair.ns_b})")
    assert filters(veth_pair.ns_b, veth_pair.if_b, "ingress") == []


def test_ownership_entries_of_vanished_interfaces_are_pruned(netns_factory, tc_programs,
                                                            tc_state_file):
    ns = netns_factory.netns()
    first, second = netns_factory.iface(ns), netns_factory.iface(ns)
    tc.attach(ns, first, tc_programs)
    subprocess.run(["ip", "-n", ns, "link", "del", first], check=True)
    tc.attach(ns, second, tc_programs)
    with open(tc_state_file) as f:
        assert [e["ifname"] for e in json.load(f)["clsact_owned"].values()] == [second]


def test_default_state_file_and_override(monkeypatch, tmp_path):
    monkeypatch.delenv("KIPFIX_TC_STATE", raising=False)
    assert tc.OwnershipState().path == "/run/kipfix/tc-state.json"
    monkeypatch.setenv("KIPFIX_TC_STATE", str(tmp_path / "s.json"))
    assert tc.OwnershipState().path == str(tmp_path / "s.json")
    assert tc.OwnershipState(str(tmp_path / "x.json")).path == str(tmp_path / "x.json")


def test_attach_never_replaces_a_foreign_filter_in_kipfix_slot(veth_pair, bpf_counter,
                                                              tc_programs, tc_state_file):
    ns, ifname = veth_pair.ns_a, veth_pair.if_a
    subprocess.run(["tc", "-n", ns, "qdisc", "add", "dev", ifname, "clsact"], check=True)
    foreign = bpf_counter()
    with tc_iproute(ns) as ipr:
        ipr.tc("add-filter", "bpf", ifindex_of(ns, ifname), HANDLE, fd=foreign.fd, name="foreign",
               parent=tc.PARENT_INGRESS, classid=1, direct_action=True, prio=PRIO)
    with pytest.raises(tc.TcError, match="a foreign filter \\(foreign\\) holds kipfix's ingress"):
        tc.attach(ns, ifname, tc_programs)
    assert [f["options"]["bpf_name"] for f in filters(ns, ifname, "ingress")] == ["foreign"]
    tc.detach(ns, ifname)
    assert [f["options"]["bpf_name"] for f in filters(ns, ifname, "ingress")] == ["foreign"]
