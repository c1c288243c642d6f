"""Which pods are metered (PodMetering), the pods config key, and the veth deduplication rule.

PodMetering is driven here with PodInfo values and a finder over network
namespaces the test makes (real netns, real addresses); the watch that
feeds it in the agent is covered in tests/e2e/test_pods.py.
"""

from __future__ import annotations

import ipaddress
import subprocess
import uuid

import pytest

from kipfix.agent.config import ConfigError, PodSelection, parse_config
from kipfix.agent.flows.dedup import VethDedup
from kipfix.agent.flows.record import FlowCounters, FlowKey
from kipfix.agent.kube.podmeta import PodInfo
from kipfix.agent.kube.podmetering import PodMetering
from kipfix.agent.kube.podnetns import NetnsFinder

NODE = "node-1"


def pod(name, namespace="web", labels=(("app", "web"),), ips=("10.1.0.2",), node=NODE, phase="Running",
        host_network=False) -> PodInfo:
    return PodInfo(uid=f"uid-{namespace}-{name}", name=name, namespace=namespace, node=node, ips=tuple(ips),
                   labels=tuple(labels), phase=phase, host_network=host_network)


# ---- the pods config key --------------------------------------------------------------

def test_pods_config_defaults_and_errors():
    config = parse_config({"pods": [{"podSelector": {"matchLabels": {"app": "web"}}}]})
    assert config.pods == (PodSelection({}, {"matchLabels": {"app": "web"}}, ("eth0",)),)
    with pytest.raises(ConfigError, match=r"pods\[0\]\.podSelector\.matchExpressions\[0\]\.operator: 'Has' is not "
                                          r"accepted; accepted: In, NotIn, Exists, DoesNotExist"):
        parse_config({"pods": [{"podSelector": {"matchExpressions": [{"key": "a", "operator": "Has"}]}}]})
    with pytest.raises(ConfigError, match=r"pods\[0\]\.selector: unknown key; accepted keys here: namespaceSelector, "
                                          r"podSelector, interfaces"):
        parse_config({"pods": [{"selector": {}}]})
    with pytest.raises(ConfigError, match=r"pods\[0\]\.interfaces: interface pattern '/\[/': invalid regular expression"):
        parse_config({"pods": [{"interfaces": ["/[/"]}]})


def test_standalone_agent_refuses_pods(tmp_path):
    from kipfix.agent.daemon import run_agent

    path = tmp_path / "agent.yaml"
    path.write_text("pods:\n  - podSelector: {matchLabels: {app: web}}\n")
    assert run_agent(str(path)) == 2


# ---- PodMetering over real network namespaces -------------------------------------------

class Netns:
    def __init__(self, address: str | None):
        self.name = f"kxsel-{uuid.uuid4().hex[:8]}"
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        subprocess.run(["ip", "-n", self.name, "link", "add", "eth0", "type", "veth", "peer", "name", "eth1"],
                       check=True)
        if address:
            subprocess.run(["ip", "-n", self.name, "addr", "add", f"{address}/32", "dev", "eth0"], check=True)
        self.path = f"/var/run/netns/{self.name}"

    def delete(self):
        subprocess.run(["ip", "netns", "del", self.name], check=False)


@pytest.fixture
def netns_factory():
    made = []

    def make(address):
        made.append(Netns(address))
        return made[-1]

    yield make
    for ns in made:
        ns.delete()


@pytest.mark.root
def test_selected_pods_get_their_netns_and_the_rest_is_left_alone(netns_factory):
    a, b, c = (netns_factory(ip) for ip in ("10.66.0.2", "10.66.0.3", "fd00:66::4"))
    metering = PodMetering(NODE, NetnsFinder(runtime_dirs=["/var/run/netns"]))
    metering.configure((PodSelection({"matchLabels": {"team": "shop"}}, {"matchLabels": {"app": "web"}},
                                     ("eth0",)),
                        PodSelection({}, {"matchExpressions": [{"key": "tier", "operator": "Exists"}]},
                                     ("eth0", "net1"))))
    metering.namespace_changed("web", {"team": "shop"})
    metering.namespace_changed("db", {"team": "data"})
    pods = [
        pod("web-1", ips=("10.66.0.2",)),                                           # selection 0
        pod("db-1", namespace="db", labels=(("app", "web"), ("tier", "1")), ips=("10.99.0.9", "fd00:66::4")),
        pod("web-2", namespace="db", ips=("10.66.0.3",)),                           # namespace not selected
        pod("web-3", ips=("10.66.0.3",), phase="Pending"),                         # not running
        pod("web-4", ips=("10.66.0.3",), host_network=True),                       # host's netns
        pod("web-5", ips=("10.66.0.3",), node="node-2"),                           # another node
    ]
    for info in pods:
        metering.pod_changed(info)
    assert metering.refresh() is True
    assert {s.netns: s.names for s in metering.attach_selections()} == {a.path: ("eth0",),
                                                                        c.path: ("eth0", "net1")}
    assert metering.refresh() is False  # nothing changed: nothing to apply
    assert metering.errors() == [] and metering.take_ended() == []
    assert metering.pod_of_netns(c.path).label == "db/db-1"

    # A pod whose IPs no netns holds is an error naming it, until its netns appears.
    metering.pod_changed(pod("web-6", ips=("10.66.0.7",)))
    metering.refresh()
    assert metering.errors() == [
        "pod web/web-6: network namespace not found (no netns under /var/run/netns or /proc/*/ns/net holds "
        "its IPs 10.66.0.7); retrying"]
    late = netns_factory("10.66.0.7")
    assert metering.refresh() is True and metering.errors() == []
    assert late.path in {s.netns for s in metering.attach_selections()}

    # Relabelled out of the selection, then deleted: each ends once, with its netns.
    metering.pod_changed(pod("web-1", labels=(("app", "api"),), ips=("10.66.0.2",)))
    metering.pod_deleted("uid-db-db-1")
    assert metering.refresh() is True
    assert sorted(p.netns for p in metering.take_ended()) == sorted([a.path, c.path])
    assert metering.take_ended() == []
    assert b.path not in {s.netns for s in metering.attach_selections()}


def test_a_selection_matching_no_pod_is_a_warning_naming_it():
    metering = PodMetering(NODE, NetnsFinder(runtime_dirs=[]))
    metering.configure((PodSelection({}, {"matchLabels": {"app": "web"}}, ("eth0",)),
                        PodSelection({"matchLabels": {"team": "none"}}, {}, ("eth0",))))
    metering.pod_changed(pod("web-1", ips=()))
    assert metering.warnings() == [
        "pods[1]: pods (namespaceSelector {'matchLabels': {'team': 'none'}}) interfaces eth0 matches no running "
        "pod on node node-1"]


# ---- deduplication ---------------------------------------------------------------------

def _key(ifindex, direction, src="10.0.0.2", dst="10.0.0.3"):
    return FlowKey(ifindex, direction, 4, 1, ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed,
                   0, 0x0800)


def _flow(netns_id, ifindex, direction, packets, **kw):
    return (netns_id, _key(ifindex, direction, **kw), FlowCounters(packets, packets * 84, 1, 2))


HOST, POD = (1, 7), (2, 2)  # (netns id, ifindex): the host end of the veth and the pod's eth0


def test_host_side_twin_is_dropped_in_the_same_drain_or_when_cached():
    dedup = VethDedup()
    dedup.set_pairs({HOST: POD})
    pod_egress = _flow(*POD, 1, 5)
    host_ingress = _flow(*HOST, 0, 5)     # the same packets entering the host end
    other = _flow(1, 9, 0, 3)            # an interface with no metered pod side
    assert dedup.filter([pod_egress, host_ingress, other], lambda key: False) == [pod_egress, other]
    assert (dedup.dropped_packets, dedup.dropped_octets) == (5, 420)
    # Next drain: the host side's packets arrive alone; the pod side's flow is in the cache.
    assert dedup.filter([_flow(*HOST, 0, 2)], lambda key: key == (POD[0], pod_egress[1])) == []
    assert dedup.dropped_packets == 7


def test_host_side_flow_without_twin_is_held_one_drain_then_kept():
    dedup = VethDedup()
    dedup.set_pairs({HOST: POD})
    lonely = _flow(*HOST, 1, 4, src="10.0.0.9")
    assert dedup.filter([lonely], lambda key: False) == []         # held: its twin may be one table behind
    assert dedup.filter([], lambda key: False) == [lonely]         # no twin came: the host side saw it alone
    late = _flow(*HOST, 1, 4, src="10.0.0.8")
    assert dedup.filter([late], lambda key: False) == []
    twin = _flow(*POD, 0, 4, src="10.0.0.8")
    assert dedup.filter([twin], lambda key: False) == [twin]       # the twin came one drain later: dropped
    assert dedup.dropped_packets == 4
    held = _flow(*HOST, 1, 1, src="10.0.0.7")
    assert dedup.filter([held], lambda key: False, final=True) == [held]  # the last drain holds nothing back


def test_without_pairs_flows_pass_untouched():
    flows = [_flow(*HOST, 0, 5), _flow(*POD, 1, 5)]
    assert VethDedup().filter(flows, lambda key: False) is flows
