"""AttachmentManager: reconcile, follow link events, reload differences, shutdown."""

from __future__ import annotations

import subprocess
import time
from types import SimpleNamespace

import pytest

from kipfix.agent.datapath import tc
from kipfix.agent.datapath.attachments import AttachmentManager, Attached
from kipfix.agent.config import InterfaceSelection
from kipfix.agent.datapath.netnsids import NetnsIds, classid

try:  # fixtures (conftest may import them too); tests/ may or may not be a package
    from netns_fixtures import *  # noqa: F401,F403
except ImportError:
    from tests.netns_fixtures import *  # noqa: F401,F403

pytestmark = pytest.mark.root

EVENT_BOUND = 2.0  # the bound from netlink event to attachment


def wait_for(predicate, timeout: float = EVENT_BOUND, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s")
        time.sleep(0.02)


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def kipfix_filters(ns: str) -> set[tuple[str, str]]:
    return {(a.ifname, a.direction) for a in tc.status(ns)}


def ifindex_of(ns: str, ifname: str) -> int:
    import json
    out = subprocess.run(["ip", "-n", ns, "-j", "link", "show", "dev", ifname], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out)[0]["ifindex"]


@pytest.fixture
def manager_factory(tc_programs, tc_state_file, tmp_path):
    made = []

    def make(**kwargs) -> AttachmentManager:
        meter = SimpleNamespace(ingress_fd=tc_programs.ingress_fd, egress_fd=tc_programs.egress_fd)
        ids = NetnsIds(str(tmp_path / "netns-ids.json"))
        manager = AttachmentManager(meter, ids, **kwargs)
        made.append(manager)
        return manager

    yield make
    for manager in made:
        manager.detach_all()
        manager.close()


def sel(netns: str, *names: str, exclude: tuple[str, ...] = ()) -> InterfaceSelection:
    return InterfaceSelection(netns, tuple(names), exclude)


def test_attaches_matching_interfaces_with_globs_and_exclusions(netns_factory, manager_factory):
    ns = netns_factory.netns()
    keep1, keep2, skip = (netns_factory.iface(ns, f"kxm{i}") for i in ("a0", "a1", "b0"))
    other = netns_factory.iface(ns, "kxother")
    manager = manager_factory()
    manager.apply([sel(ns, "kxm*", exclude=("/b0$/",))])
    assert manager.attached() == [Attached(ns, keep1, ifindex_of(ns, keep1)),
                                  Attached(ns, keep2, ifindex_of(ns, keep2))]
    assert kipfix_filters(ns) == {(keep1, "ingress"), (keep1, "egress"),
                                  (keep2, "ingress"), (keep2, "egress")}
    assert manager.interface_names(ns) == {ifindex_of(ns, keep1): keep1,
                                           ifindex_of(ns, keep2): keep2}
    assert skip not in manager.interface_names(ns).values()
    assert other not in manager.interface_names(ns).values()
    assert manager.error_count == 0


def test_filter_classid_carries_the_netns_id(netns_factory, manager_factory):
    ns = netns_factory.netns()
    dev = netns_factory.iface(ns)
    manager = manager_factory()
    manager.apply([sel(ns, dev)])
    netns_id = manager.netns_id(ns)
    assert netns_id is not None
    flowid = f"{classid(netns_id) >> 16:x}:{classid(netns_id) & 0xffff:x}"
    out = subprocess.run(["tc", "-n", ns, "filter", "show", "dev", dev, "ingress"],
                         check=True, capture_output=True, text=True).stdout
    assert f"flowid {flowid} kipfix_ingress" in out
    assert manager.ifname(netns_id, ifindex_of(ns, dev)) == dev


def test_interface_that_appears_later_is_attached(netns_factory, manager_factory):
    ns = netns_factory.netns()
    manager = manager_factory()
    manager.apply([sel(ns, "kxlate*")])
    assert manager.attached() == []
    peer_ns = netns_factory.netns()
    if_a, _ = netns_factory.veth(ns, peer_ns, if_a="kxlate0")
    wait_for(lambda: (if_a, "egress") in kipfix_filters(ns), what="kxlate0 attached")
    assert manager.attached() == [Attached(ns, if_a, ifindex_of(ns, if_a))]


def test_recreated_interface_is_attached_again(netns_factory, manager_factory):
    ns = netns_factory.netns()
    dev = netns_factory.iface(ns, "kxre0")
    manager = manager_factory()
    manager.apply([sel(ns, dev)])
    old = ifindex_of(ns, dev)
    assert manager.attached() == [Attached(ns, dev, old)]
    ip("-n", ns, "link", "del", dev)
    netns_factory.iface(ns, dev)
    new = ifindex_of(ns, dev)
    assert new != old
    wait_for(lambda: manager.attached() == [Attached(ns, dev, new)], what="re-created kxre0 attached")
    assert kipfix_filters(ns) == {(dev, "ingress"), (dev, "egress")}
    assert manager.error_count == 0


def test_disappearing_interface_is_forgotten_without_error(netns_factory, manager_factory):
    ns = netns_factory.netns()
    gone, stays = netns_factory.iface(ns, "kxgo0"), netns_factory.iface(ns, "kxgo1")
    manager = manager_factory()
    manager.apply([sel(ns, "kxgo*")])
    netns_id = manager.netns_id(ns)
    gone_index = ifindex_of(ns, gone)
    ip("-n", ns, "link", "del", gone)
    wait_for(lambda: [a.ifname for a in manager.attached()] == [stays], what="kxgo0 forgotten")
    assert manager.error_count == 0
    assert manager.ifname(netns_id, gone_index) == gone  # late flows still get a name
    manager.detach_all()
    assert manager.error_count == 0
    assert kipfix_filters(ns) == set()


def test_renamed_out_of_the_selection_is_detached(netns_factory, manager_factory):
    ns = netns_factory.netns()
    dev = netns_factory.iface(ns, "kxren0")
    manager = manager_factory()
    manager.apply([sel(ns, "kxren*")])
    ip("-n", ns, "link", "set", dev, "name", "kxother0")
    wait_for(lambda: manager.attached() == [], what="renamed interface detached")
    assert kipfix_filters(ns) == set()
    ip("-n", ns, "link", "set", "kxother0", "name", "kxren1")
    wait_for(lambda: [a.ifname for a in manager.attached()] == ["kxren1"], what="renamed back")


def test_apply_changes_only_the_difference(netns_factory, manager_factory, monkeypatch):
    ns = netns_factory.netns()
    a, b, c = (netns_factory.iface(ns, f"kxdiff{i}") for i in range(3))
    calls: list[tuple[str, str]] = []
    real_attach, real_detach = tc.attach_link, tc.detach_link

    def attach_link(ipr, netns, cookie, ifindex, ifname, *rest):
        calls.append(("attach", ifname))
        return real_attach(ipr, netns, cookie, ifindex, ifname, *rest)

    def detach_link(ipr, netns, cookie, ifindex, ifname, *rest):
        calls.append(("detach", ifname))
        return real_detach(ipr, netns, cookie, ifindex, ifname, *rest)

    monkeypatch.setattr(tc, "attach_link", attach_link)
    monkeypatch.setattr(tc, "detach_link", detach_link)
    manager = manager_factory()
    manager.apply([sel(ns, a, b)])
    assert sorted(calls) == [("attach", a), ("attach", b)]
    ids_before = {(x.ifname, x.direction): x.prog_id for x in tc.status(ns)}
    calls.clear()
    manager.apply([sel(ns, a, b)])  # unchanged: nothing happens
    assert calls == []
    manager.apply([sel(ns, b, c)])
    assert sorted(calls) == [("attach", c), ("detach", a)]
    assert [x.ifname for x in manager.attached()] == [b, c]
    after = {(x.ifname, x.direction): x.prog_id for x in tc.status(ns)}
    assert after[(b, "ingress")] == ids_before[(b, "ingress")]
    assert set(after) == {(b, "ingress"), (b, "egress"), (c, "ingress"), (c, "egress")}
    calls.clear()
    manager.apply([])  # the netns leaves the configuration: everything in it is detached
    assert sorted(calls) == [("detach", b), ("detach", c)]
    assert tc.status(ns) == []


def test_bad_entries_are_reported_and_the_rest_stay_attached(netns_factory, manager_factory):
    ns = netns_factory.netns()
    good = netns_factory.iface(ns, "kxgood0")
    seen = []
    manager = manager_factory(on_error=seen.append)
    manager.apply([sel(ns, good, "kxmissing0"), sel("kx-no-such-netns", "eth0")])
    assert [a.ifname for a in manager.attached()] == [good]
    messages = sorted(str(e) for e in manager.errors)
    assert manager.error_count == 2 == len(seen)
    assert messages[0].startswith(f"interface 'kxmissing0' not found in netns {ns}")
    assert messages[1].startswith("netns 'kx-no-such-netns' (/var/run/netns/kx-no-such-netns): "
                                  "does not exist")
    # the missing interface is attached when it appears
    netns_factory.iface(ns, "kxmissing0")
    wait_for(lambda: len(manager.attached()) == 2, what="kxmissing0 attached")


def test_interface_in_another_netns_is_named(netns_factory, manager_factory):
    ns_a, ns_b = netns_factory.netns(), netns_factory.netns()
    if_a, if_b = netns_factory.veth(ns_a, ns_b)
    manager = manager_factory()
    manager.apply([sel(ns_a, if_b)])
    assert manager.attached() == []
    assert [str(e) for e in manager.errors] == [
        f"interface {if_b!r} is not in netns {ns_a} (it is in netns {ns_b}); "
        "kipfix attaches it when it appears"]


def test_netns_that_appears_later_and_disappears(netns_factory, manager_factory):
    name = f"kxlate-{unique_ifname('')}"
    manager = manager_factory(recheck_interval=0.2)
    manager.apply([sel(name, "kxd*")])
    assert manager.error_count == 1
    ip("netns", "add", name)
    netns_factory.namespaces.append(name)
    netns_factory.iface(name, "kxd0")
    wait_for(lambda: [a.ifname for a in manager.attached()] == ["kxd0"], timeout=5,
             what="interface in a netns created later attached")
    netns_factory.remove(name)
    wait_for(lambda: manager.attached() == [], timeout=5, what="vanished netns forgotten")
    assert manager.error_count == 1


def test_netns_by_proc_path(netns_factory, manager_factory):
    ns = netns_factory.netns()
    dev = netns_factory.iface(ns, "kxpath0")
    pid = netns_factory.sleeper(ns)
    path = f"/proc/{pid}/ns/net"
    manager = manager_factory()
    manager.apply([sel(path, "kxpath*")])
    assert manager.attached() == [Attached(path, dev, ifindex_of(ns, dev))]
    assert kipfix_filters(ns) == {(dev, "ingress"), (dev, "egress")}
    netns_factory.iface(ns, "kxpath1")
    wait_for(lambda: len(manager.attached()) == 2, what="kxpath1 attached via path netns")


def test_detach_all_removes_filters_and_owned_clsact(netns_factory, manager_factory):
    ns = netns_factory.netns()
    mine, foreign = netns_factory.iface(ns, "kxall0"), netns_factory.iface(ns, "kxall1")
    subprocess.run(["tc", "-n", ns, "qdisc", "add", "dev", foreign, "clsact"], check=True)
    manager = manager_factory()
    manager.apply([sel(ns, "kxall*")])
    assert len(kipfix_filters(ns)) == 4
    manager.detach_all()
    assert kipfix_filters(ns) == set()
    assert manager.attached() == []
    def qdiscs(dev: str) -> str:
        return subprocess.run(["tc", "-n", ns, "qdisc", "show", "dev", dev], check=True,
                              capture_output=True, text=True).stdout

    assert "clsact" in qdiscs(foreign)  # not kipfix's: stays
    assert "clsact" not in qdiscs(mine)  # kipfix made it: removed
    assert manager.error_count == 0


def test_close_leaves_attachments_in_place(netns_factory, manager_factory):
    ns = netns_factory.netns()
    dev = netns_factory.iface(ns, "kxkeep0")
    manager = manager_factory()
    manager.apply([sel(ns, dev)])
    manager.close()
    assert kipfix_filters(ns) == {(dev, "ingress"), (dev, "egress")}
    tc.detach(ns, dev)  # the next process (kipfix meter detach) can still clean up
    assert kipfix_filters(ns) == set()


def test_manager_does_not_leak_fds_or_threads(netns_factory, manager_factory):
    import os
    import threading

    ns = netns_factory.netns()
    netns_factory.iface(ns, "kxfd0")
    fds_before = len(os.listdir("/proc/self/fd"))
    threads_before = threading.active_count()
    for _ in range(5):
        manager = manager_factory()
        manager.apply([sel(ns, "kxfd*"), sel("kx-absent-netns", "x")])
        assert len(manager.attached()) == 1
        manager.detach_all()
        manager.close()
    assert len(os.listdir("/proc/self/fd")) == fds_before
    assert threading.active_count() == threads_before


def test_netns_id_is_released_some_time_after_its_netns_left(netns_factory, manager_factory,
                                                            tmp_path):
    ns_a, ns_b = netns_factory.netns(), netns_factory.netns()
    netns_factory.iface(ns_a, "kxid0")
    netns_factory.iface(ns_b, "kxid0")
    manager = manager_factory(recheck_interval=0.1, id_release_delay=0.3)
    manager.apply([sel(ns_a, "kxid0"), sel(ns_b, "kxid0")])
    id_a, id_b = manager.netns_id(ns_a), manager.netns_id(ns_b)
    assert id_a != id_b
    manager.apply([sel(ns_b, "kxid0")])
    assert manager.netns_ids.label(id_a) == ns_a  # kept for a while for late flows
    wait_for(lambda: manager.netns_ids.label(id_a) != ns_a, timeout=5, what="id released")
    assert manager.netns_ids.label(id_b) == ns_b


def test_burst_of_new_interfaces_is_attached(netns_factory, manager_factory):
    """Many links at once (a dump may be interrupted meanwhile): all attached, no error."""
    ns, peers = netns_factory.netns(), netns_factory.netns()
    manager = manager_factory()
    manager.apply([sel(ns, "kxburst*")])
    batch = "\n".join(f"link add kxburst{i} type veth peer name kxpeer{i} netns {peers}"
                      for i in range(30))
    subprocess.run(["ip", "-n", ns, "-batch", "-"], input=batch, text=True, check=True)
    wait_for(lambda: len(manager.attached()) == 30, what="30 new interfaces attached")
    assert len(tc.status(ns)) == 60
    assert manager.error_count == 0
