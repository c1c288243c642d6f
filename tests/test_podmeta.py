"""Pod metadata: PodInfo from real Pod JSON, and the IP -> pod index."""

from __future__ import annotations

import copy
import ipaddress
import threading

import pytest

from kipfix.agent.kube.podmeta import EMPTY_META, MAX_CLAIMS, PodIndex, PodInfo, Succession, pod_info


def ip(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


def mapped(text: str) -> bytes:
    return ipaddress.IPv6Address("::ffff:" + text).packed


# As `kubectl get pod -o json` shows them (fields the index does not read trimmed).
DEPLOYMENT_POD = {
    "apiVersion": "v1", "kind": "Pod",
    "metadata": {
        "name": "web-7d9f8b6c5-x2x4q", "namespace": "shop", "uid": "3f1c2a9e-0d6b-4f57-9a51-1c3e5b7d9a01",
        "generateName": "web-7d9f8b6c5-", "creationTimestamp": "2026-11-22T08:00:00Z",
        "labels": {"app": "web", "pod-template-hash": "7d9f8b6c5"},
        "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-7d9f8b6c5",
                             "uid": "8e2f0c1a-5b3d-4c7e-9f10-2a4b6c8d0e12", "controller": True,
                             "blockOwnerDeletion": True}],
    },
    "spec": {"nodeName": "node-a", "containers": [{"name": "web", "image": "nginx:1.27"}]},
    "status": {"phase": "Running", "hostIP": "192.168.10.11", "hostIPs": [{"ip": "192.168.10.11"}],
               "podIP": "10.244.1.17", "podIPs": [{"ip": "10.244.1.17"}]},
}


def pod(name: str = "p", uid: str = "u", ips=("10.244.1.17",), **fields) -> PodInfo:
    return PodInfo(uid=uid, name=name, namespace=fields.pop("namespace", "default"),
                   node=fields.pop("node", "node-a"), ips=tuple(ips), phase=fields.pop("phase", "Running"), **fields)


# ---- pod_info ------------------------------------------------------------------

def test_deployment_pod_through_its_replicaset():
    info = pod_info(DEPLOYMENT_POD)
    assert info == PodInfo(uid="3f1c2a9e-0d6b-4f57-9a51-1c3e5b7d9a01", name="web-7d9f8b6c5-x2x4q",
                           namespace="shop", node="node-a", ips=("10.244.1.17",), workload_kind="Deployment",
                           workload_name="web", labels=(("app", "web"), ("pod-template-hash", "7d9f8b6c5")),
                           phase="Running", host_network=False, deleting=False)
    assert hash(info) == hash(pod_info(copy.deepcopy(DEPLOYMENT_POD)))  # hashable, labels included
    assert info.encoded() == (b"web-7d9f8b6c5-x2x4q", b"shop", b"node-a", b"web", b"Deployment")


def test_replicaset_not_made_by_a_deployment_stays_a_replicaset():
    obj = copy.deepcopy(DEPLOYMENT_POD)
    obj["metadata"]["labels"] = {"app": "web"}  # a hand-made ReplicaSet: no pod-template-hash
    assert (pod_info(obj).workload_kind, pod_info(obj).workload_name) == ("ReplicaSet", "web-7d9f8b6c5")
    obj["metadata"]["labels"]["pod-template-hash"] = "abc12"  # a hash that is not the name's suffix
    assert (pod_info(obj).workload_kind, pod_info(obj).workload_name) == ("ReplicaSet", "web-7d9f8b6c5")


@pytest.mark.parametrize("kind, owner, extra, expected", [
    ("DaemonSet", "kube-proxy", {"controller-revision-hash": "5c9d7b8f4d", "pod-template-generation": "1"},
     ("DaemonSet", "kube-proxy")),
    ("StatefulSet", "db", {"controller-revision-hash": "db-6b8c9d7f5",
                           "statefulset.kubernetes.io/pod-name": "db-0"}, ("StatefulSet", "db")),
    # a CronJob's Job (nightly-29400480): the name alone cannot prove it, so it stays a Job
    ("Job", "nightly-29400480", {"batch.kubernetes.io/job-name": "nightly-29400480",
                                 "controller-uid": "c0ffee00-0000-4000-8000-000000000001"},
     ("Job", "nightly-29400480")),
    ("Node", "node-a", {}, ("Node", "node-a")),  # a static pod's mirror
])
def test_controllers_as_they_are(kind, owner, extra, expected):
    obj = copy.deepcopy(DEPLOYMENT_POD)
    obj["metadata"]["labels"] = extra
    obj["metadata"]["ownerReferences"] = [
        {"apiVersion": "v1", "kind": "ConfigMap", "name": "not-a-controller", "uid": "x"},  # ignored
        {"apiVersion": "apps/v1", "kind": kind, "name": owner, "uid": "y", "controller": True},
    ]
    assert (pod_info(obj).workload_kind, pod_info(obj).workload_name) == expected


def test_bare_pod_has_no_workload():
    obj = copy.deepcopy(DEPLOYMENT_POD)
    del obj["metadata"]["ownerReferences"]
    del obj["metadata"]["labels"]
    info = pod_info(obj)
    assert (info.workload_kind, info.workload_name, info.labels) == ("", "", ())
    obj["metadata"]["ownerReferences"] = [{"kind": "ReplicaSet", "name": "orphan-1", "uid": "z"}]  # no controller
    assert (pod_info(obj).workload_kind, pod_info(obj).workload_name) == ("", "")


def test_dual_stack_pod_ips_in_canonical_form():
    obj = copy.deepcopy(DEPLOYMENT_POD)
    obj["status"]["podIPs"] = [{"ip": "10.244.1.17"}, {"ip": "fd00:10:244:1:0:0:0:11"}]
    assert pod_info(obj).ips == ("10.244.1.17", "fd00:10:244:1::11")
    del obj["status"]["podIPs"]  # older API servers: podIP only
    assert pod_info(obj).ips == ("10.244.1.17",)


def test_pending_pod_without_ip_or_node():
    obj = {"metadata": {"name": "new", "namespace": "default", "uid": "u-new"}, "spec": {},
           "status": {"phase": "Pending"}}
    assert pod_info(obj) == PodInfo(uid="u-new", name="new", namespace="default", phase="Pending")


def test_host_network_and_deleting():
    obj = copy.deepcopy(DEPLOYMENT_POD)
    obj["spec"]["hostNetwork"] = True
    obj["status"]["podIP"], obj["status"]["podIPs"] = "192.168.10.11", [{"ip": "192.168.10.11"}]
    obj["metadata"]["deletionTimestamp"] = "2026-11-22T08:05:00Z"
    obj["metadata"]["deletionGracePeriodSeconds"] = 30
    info = pod_info(obj)
    assert (info.host_network, info.deleting, info.ips) == (True, True, ("192.168.10.11",))
    assert info.indexed_ips == ()


# ---- PodIndex ----------------------------------------------------------------------

def test_lookup_ipv4_as_4_octets_and_ipv4_mapped_and_ipv6():
    index = PodIndex()
    index.upsert(pod("web", "u1", ("10.244.1.17", "fd00:10:244:1::11"), namespace="shop",
                     workload_kind="Deployment", workload_name="web"))
    info = index.get("u1")
    assert index.lookup(ip("10.244.1.17")) is info
    assert index.lookup(mapped("10.244.1.17")) is info
    assert index.lookup(ip("fd00:10:244:1::11")) is info
    assert index.lookup(ip("10.244.1.18")) is None
    assert index.lookup(b"\x01\x02") is None
    want = (b"web", b"shop", b"node-a", b"web", b"Deployment")
    assert index(ip("10.244.1.17")) == index(mapped("10.244.1.17")) == index(ip("fd00:10:244:1::11")) == want
    assert index(ip("10.244.1.18")) == EMPTY_META == (b"",) * 5
    assert len(index) == 1


def test_encoded_values_are_made_once_per_pod_not_per_lookup():
    index = PodIndex([pod("web", "u1", ("10.244.1.17", "fd00::11"))])
    assert index(ip("10.244.1.17")) is index(ip("10.244.1.17")) is index(ip("fd00::11"))


def test_ip_reused_by_a_new_pod_and_the_old_one_removed_late():
    index = PodIndex()
    index.upsert(pod("old", "u-old", ("10.244.1.17",)))
    index.upsert(pod("new", "u-new", ("10.244.1.17",)))  # the old pod's delete event is still on its way
    assert index.lookup(ip("10.244.1.17")).name == "new"
    index.upsert(pod("old", "u-old", ("10.244.1.17",), phase="Failed"))
    index.remove("u-old")
    assert index.lookup(ip("10.244.1.17")).name == "new"
    assert index(ip("10.244.1.17"))[0] == b"new"
    assert len(index) == 1
    index.remove("u-new")
    assert index.lookup(ip("10.244.1.17")) is None and index(ip("10.244.1.17")) == EMPTY_META
    assert len(index) == 0 and index.encoded_by_address == {}


class Clock:
    """Wall-clock nanoseconds the test sets."""

    def __init__(self, now: int = 1_000):
        self.now = now

    def __call__(self) -> int:
        return self.now


def test_flows_that_ended_before_a_takeover_keep_the_previous_owner():
    clock = Clock(1_000)
    index = PodIndex(clock=clock)
    index.upsert(pod("old", "u-old", ("10.244.1.17",)))
    clock.now = 5_000
    index.upsert(pod("new", "u-new", ("10.244.1.17",)))
    for key in (ip("10.244.1.17"), mapped("10.244.1.17")):
        value = index.encoded_by_address[key]
        assert isinstance(value, Succession)
        assert [value(t)[0] for t in (0, 999, 1_000, 4_999)] == [b"old"] * 4  # before the oldest claim: its owner
        assert [value(t)[0] for t in (5_000, 10**19)] == [b"new"] * 2
        assert index(key, 4_999)[0] == b"old" and index(key, 5_000)[0] == b"new"
        assert index(key)[0] == b"new"  # no time: the owner now
    assert index.lookup(ip("10.244.1.17")).name == "new"
    clock.now = 6_000
    index.upsert(pod("new", "u-new", ("10.244.1.17",), node="node-b"))  # the owner changes, its claim stays
    value = index.encoded_by_address[ip("10.244.1.17")]
    assert (value(4_999)[:3], value(5_000)[:3]) == ((b"old", b"default", b"node-a"), (b"new", b"default", b"node-b"))
    index.remove("u-old")  # swept: only the current owner is left, a plain tuple again
    assert index.encoded_by_address[ip("10.244.1.17")] == (b"new", b"default", b"node-b", b"", b"")
    assert index(ip("10.244.1.17"), 0)[0] == b"new"


def test_an_ip_passed_on_several_times_and_its_history_bounded():
    clock = Clock(0)
    index = PodIndex(clock=clock)
    for i in range(MAX_CLAIMS + 3):
        clock.now = i * 100
        index.upsert(pod(f"p{i}", f"u{i}", ("10.0.0.9",)))
    value = index.encoded_by_address[ip("10.0.0.9")]
    assert len(value.claims) == MAX_CLAIMS
    oldest = 3
    assert value(0)[0] == f"p{oldest}".encode()  # older owners are forgotten; the oldest kept answers
    assert [value(i * 100 + 50)[0] for i in range(oldest, MAX_CLAIMS + 3)] == [
        f"p{i}".encode() for i in range(oldest, MAX_CLAIMS + 3)]
    index.remove("u5")  # a former owner removed: its span goes to the owner before it
    assert index(ip("10.0.0.9"), 550)[0] == b"p4"
    index.remove(f"u{MAX_CLAIMS + 2}")  # the current owner removed: nobody owns the IP, history and all
    assert ip("10.0.0.9") not in index.encoded_by_address and index(ip("10.0.0.9"), 550) == EMPTY_META
    assert index.lookup(ip("10.0.0.9")) is None
    for i in range(MAX_CLAIMS + 2):
        index.remove(f"u{i}")
    assert len(index) == 0 and index.encoded_by_address == {}


def test_a_pod_moving_to_another_ip_takes_no_history_along():
    clock = Clock(100)
    index = PodIndex([pod("a", "u-a", ("10.0.0.1",)), pod("b", "u-b", ("10.0.0.2",))], clock=clock)
    clock.now = 200
    index.upsert(pod("b", "u-b", ("10.0.0.1",)))  # b takes a's IP and gives up its own
    assert index(ip("10.0.0.2"), 150) == EMPTY_META
    assert index(ip("10.0.0.1"), 150)[0] == b"a" and index(ip("10.0.0.1"), 200)[0] == b"b"
    index.upsert(pod("a", "u-a", ("10.0.0.1",), deleting=True))  # the old owner, deleting, does not retake it
    assert index(ip("10.0.0.1"))[0] == b"b"


def test_deleting_pod_keeps_its_ip_but_does_not_take_a_live_pods():
    index = PodIndex([pod("old", "u-old", ("10.244.1.17",))])
    index.upsert(pod("old", "u-old", ("10.244.1.17",), deleting=True))  # grace period: still sends
    assert index.lookup(ip("10.244.1.17")).name == "old"
    index.upsert(pod("new", "u-new", ("10.244.1.17",)))
    index.upsert(pod("old", "u-old", ("10.244.1.17",), deleting=True))  # a late update of the old pod
    assert index.lookup(ip("10.244.1.17")).name == "new"


def test_finished_pods_release_their_ips():
    for phase in ("Succeeded", "Failed"):
        index = PodIndex([pod("job", "u1", ("10.244.1.30",))])
        index.upsert(pod("job", "u1", ("10.244.1.30",), phase=phase))
        assert index.lookup(ip("10.244.1.30")) is None
        assert index.get("u1").phase == phase and len(index) == 1  # the pod is still known


def test_host_network_pods_are_not_indexed_by_ip():
    index = PodIndex([pod("kube-proxy-x", "u1", ("192.168.10.11",), host_network=True),
                      pod("node-exporter-y", "u2", ("192.168.10.11",), host_network=True)])
    assert index.lookup(ip("192.168.10.11")) is None
    assert index(ip("192.168.10.11")) == EMPTY_META
    assert len(index) == 2 and index.get("u1").name == "kube-proxy-x"


def test_update_moves_ips_and_renames():
    index = PodIndex([pod("web", "u1", ("10.244.1.17",))])
    index.upsert(pod("web", "u1", ("10.244.1.18", "fd00::18"), node="node-b"))
    assert index.lookup(ip("10.244.1.17")) is None
    assert index(ip("10.244.1.18"))[2] == b"node-b" and index.lookup(ip("fd00::18")).node == "node-b"


def test_remove_unknown_uid_and_replace_all():
    index = PodIndex([pod("a", "u1", ("10.0.0.1",)), pod("b", "u2", ("10.0.0.2",))])
    assert index.remove("nope") is None
    index.replace_all([pod("b", "u2", ("10.0.0.2",)), pod("c", "u3", ("10.0.0.3",))])
    assert sorted(p.name for p in index.pods()) == ["b", "c"]
    assert index.lookup(ip("10.0.0.1")) is None and index.lookup(ip("10.0.0.3")).name == "c"


def test_concurrent_writers_and_lock_free_readers():
    index = PodIndex()
    errors = []

    def writer(base: int) -> None:
        for i in range(2000):
            address = f"10.{base}.{i // 250}.{i % 250}"
            index.upsert(pod(f"p{base}-{i}", f"u{base}-{i}", (address,)))
            if i % 2:
                index.remove(f"u{base}-{i}")

    def reader() -> None:
        for _ in range(20000):
            value = index(ip("10.1.0.0"))
            if value not in (EMPTY_META, (b"p1-0", b"default", b"node-a", b"", b"")):
                errors.append(value)

    threads = [threading.Thread(target=writer, args=(b,)) for b in (1, 2, 3)] + [threading.Thread(target=reader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(index) == 3 * 1000
    # 1000 IPv4 addresses per writer, each under its 4-octet and its IPv4-mapped form
    assert len(index.encoded_by_address) == 3 * 1000 * 2
