"""Pods metered inside their network namespaces, with a real API server and real BPF.

One ``kipfix agent --kubernetes`` (ServiceAccount with exactly AGENT_RULES)
meters a node whose pods are network namespaces the test makes: a "node"
netns ``kxpn-<id>`` with bridge ``br0`` (10.78.0.1/16) and, per pod, a veth
``eth0`` in the pod's netns and ``kxv<n>`` on the bridge. Pod objects are
created in the API bound to a node registered for the test; the test plays
the kubelet (status Running with the pod's IP) and the runtime (the netns).
Half of the pods' netns are named (``ip netns add``, found under
/var/run/netns), half belong only to a process (``unshare -n``, found
through /proc/PID/ns/net). The node's ConfigMap is written by the test, as
the operator would render it; collectors are the built-in collector on
loopback.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml
from kubernetes import client
from kubernetes.client.rest import ApiException

from agentproc import remove_state_files
from controlplane import SimulatedNodes
from kipfix.agent.collector.server import Collector
from kipfix.agent.contract import CONFIG_KEY, configmap_name, lease_name
from kipfix.operator.rbac import AGENT_RULES
from test_operator import NAMESPACE, _free_port, _rbac_objects, install_crds, wait_for
from test_user_flow import run as sh

pytestmark = [pytest.mark.root, pytest.mark.slow]

KIPFIX = str(Path(sys.executable).with_name("kipfix"))
BRIDGE_IP = "10.78.0.1"
REMOTE_IP = "10.78.200.9"  # a pod on another node
EGRESS, INGRESS = 1, 0
FORCED_END = 4
TEMPLATE = ["sourceIPv4Address", "destinationIPv4Address", "protocolIdentifier", "flowDirection",
            "packetDeltaCount", "octetDeltaCount", "flowEndReason", "interfaceName",
            "sourcePodName", "sourcePodNamespace", "sourceNodeName", "destinationPodName",
            "destinationPodNamespace", "destinationNodeName"]


class FakePod:
    """A pod's sandbox: a netns with eth0 on the node's bridge (named, or held by a process)."""

    def __init__(self, node: "PodNode", index: int, ip: str, named: bool, ifname: str = "eth0"):
        self.node, self.index, self.ip, self.named, self.ifname = node, index, ip, named, ifname
        self.name = f"{node.id}-p{index}"
        self.host_veth = f"kxv{node.id[:4]}{index}"
        self.proc: subprocess.Popen | None = None

    @property
    def netns_path(self) -> str:
        return f"/var/run/netns/{self.name}" if self.named else f"/proc/{self.proc.pid}/ns/net"

    def exec(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return sh("nsenter", f"--net={self.netns_path}", *args, check=check)

    def create(self) -> "FakePod":
        if self.named:
            sh("ip", "netns", "add", self.name)
        else:
            self.proc = subprocess.Popen(["unshare", "--net", "--", "sleep", "infinity"])
            wait_for(lambda: os.stat(self.netns_path).st_ino != os.stat("/proc/self/ns/net").st_ino,
                     "the unshared netns", timeout=10, interval=0.01)
        no_ipv6(self.exec)  # no router solicitations or MLD reports: only the test's packets
        sh("ip", "-n", self.node.ns, "link", "add", self.host_veth, "type", "veth", "peer", "name", self.ifname,
           "netns", self.name if self.named else str(self.proc.pid))
        sh("ip", "-n", self.node.ns, "link", "set", self.host_veth, "master", "br0", "up")
        self.exec("ip", "addr", "add", f"{self.ip}/16", "dev", self.ifname)
        self.exec("ip", "link", "set", self.ifname, "up")
        self.exec("ip", "link", "set", "lo", "up")
        return self

    def delete(self) -> None:
        sh("ip", "-n", self.node.ns, "link", "del", self.host_veth, check=False)
        if self.named:
            sh("ip", "netns", "del", self.name, check=False)
        elif self.proc is not None:
            self.proc.kill()
            self.proc.wait()

    def filters(self) -> str:
        if not os.path.exists(self.netns_path):
            return ""
        return self.exec("tc", "filter", "show", "dev", self.ifname, "ingress", check=False).stdout

    def ping(self, dst: str, count: int, size: int = 56) -> None:
        self.exec("ping", "-q", "-c", str(count), "-i", "0.05", "-s", str(size), "-W", "2", dst)


def no_ipv6(run) -> None:
    for scope in ("all", "default"):
        run("sysctl", "-qw", f"net.ipv6.conf.{scope}.disable_ipv6=1")


class PodNode:
    """The node: its netns and bridge, its Node object, its ConfigMap, and one agent process."""

    def __init__(self, cluster, tmp: Path):
        self.cluster, self.tmp = cluster, tmp
        self.id = uuid.uuid4().hex[:6]
        self.ns = f"kxpn-{self.id}"
        self.node = f"pods-{self.id}"
        self.pin_path = f"/sys/fs/bpf/kipfix-test-pods-{self.id}"
        self.api = cluster.api()
        self.core = client.CoreV1Api(self.api)
        self.nodes = SimulatedNodes(self.api, run_pods=False)  # the test plays this node's kubelet
        self.collector = Collector("127.0.0.1", 0).start()
        self.metrics_port = _free_port()
        self.proc: subprocess.Popen | None = None
        self.log_path = tmp / "agent.log"
        self.pods: list[FakePod] = []

    def start(self, pods_config: list[dict]) -> None:
        sh("ip", "netns", "add", self.ns)
        no_ipv6(lambda *args: sh("ip", "netns", "exec", self.ns, *args))
        sh("ip", "-n", self.ns, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", self.ns, "addr", "add", f"{BRIDGE_IP}/16", "dev", "br0")
        sh("ip", "-n", self.ns, "link", "set", "br0", "up")
        self.nodes.add(self.node, {"kipfix-e2e-pods": self.id})
        self.write_config(pods_config)
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                [KIPFIX, "--log-level", "debug", "agent", "--kubernetes"],
                env={**os.environ, "KUBECONFIG": str(self.cluster.serviceaccount_kubeconfig(NAMESPACE, "kipfix-agent")),
                     "NODE_NAME": self.node, "POD_NAMESPACE": NAMESPACE, "KIPFIX_PIN_PATH": self.pin_path,
                     "KIPFIX_TC_STATE": str(self.tmp / "tc-state.json")},
                stdout=log, stderr=subprocess.STDOUT)
        wait_for(lambda: self.report().get("configHash"), "the agent's first report with its config", timeout=60)
        wait_for(lambda: self.metric("config_generation"), "the agent running (metrics served)", timeout=120,
                 interval=0.5)

    def config(self, pods_config: list[dict]) -> dict:
        return {"collectors": [{"address": f"127.0.0.1:{self.collector.port}"}],
                "templates": [{"id": 256, "fields": TEMPLATE}],
                "interfaces": [{"netns": self.ns, "names": ["kxv*"]}],  # the host side of every pod's veth
                "pods": pods_config,
                "timeouts": {"idle": 5, "active": 300}, "drainInterval": 0.2,
                "metrics": {"address": "127.0.0.1", "port": self.metrics_port}}

    def write_config(self, pods_config: list[dict]) -> None:
        body = {"metadata": {"name": configmap_name(self.node), "namespace": NAMESPACE},
                "data": {CONFIG_KEY: yaml.safe_dump(self.config(pods_config))}}
        try:
            self.core.replace_namespaced_config_map(configmap_name(self.node), NAMESPACE, body)
        except ApiException as err:
            if err.status != 404:
                raise
            self.core.create_namespaced_config_map(NAMESPACE, body)

    def report(self) -> dict:
        try:
            lease = client.CoordinationV1Api(self.api).read_namespaced_lease(lease_name(self.node), NAMESPACE)
        except ApiException:
            return {}
        return json.loads((lease.metadata.annotations or {}).get("kipfix.io/report") or "{}")

    def metric(self, name: str, labels: str = "") -> float | None:
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()
        except OSError:
            return None
        for line in text.splitlines():
            if line.startswith(f"kipfix_agent_{name}{labels} ") or line.startswith(f"kipfix_agent_{name}{labels}{{"):
                return float(line.rsplit(" ", 1)[1])
        return None

    def agent_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def add_pod(self, namespace: str, name: str, labels: dict, index: int, named: bool = True,
                ifname: str = "eth0", sandbox: bool = True) -> FakePod:
        pod = FakePod(self, index, f"10.78.{index // 250}.{index % 250 + 2}", named, ifname)
        if sandbox:
            pod.create()
        self.pods.append(pod)
        pod.k8s_name, pod.k8s_namespace = name, namespace
        self.core.create_namespaced_pod(namespace, {
            "metadata": {"name": name, "labels": labels},
            "spec": {"nodeName": self.node, "containers": [{"name": "c", "image": "kipfix.invalid/none"}],
                     "tolerations": [{"operator": "Exists"}]}})
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.core.patch_namespaced_pod_status(name, namespace, {"status": {
            "phase": "Running", "podIP": pod.ip, "podIPs": [{"ip": pod.ip}], "hostIP": "127.0.0.1",
            "startTime": now, "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": now}]}})
        pod.running_at = time.monotonic()
        return pod

    def delete_pod(self, pod: FakePod) -> None:
        with contextlib.suppress(ApiException):
            self.core.delete_namespaced_pod(pod.k8s_name, pod.k8s_namespace, grace_period_seconds=0)

    def close(self) -> None:
        try:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        finally:
            for pod in self.pods:
                pod.delete()
            sh("ip", "netns", "del", self.ns, check=False)
            with contextlib.suppress(ApiException):
                self.core.delete_namespaced_pod("remote", "kxpods-b", grace_period_seconds=0)
            sh("rm", "-rf", self.pin_path, check=False)
            remove_state_files(self.pin_path)  # netns ids and the crash journal in /run/kipfix
            with contextlib.suppress(Exception):
                self.core.delete_namespaced_config_map(configmap_name(self.node), NAMESPACE)
            self.nodes.close()
            self.collector.stop()


def icmp_totals(collector: Collector, **match) -> tuple[int, int]:
    """(packets, octets) of ICMP records whose values match ``match``."""
    packets = octets = 0
    for record in collector.records(256):
        v = record.values
        if v.get("protocolIdentifier") == 1 and all(v.get(k) == want for k, want in match.items()):
            packets += v["packetDeltaCount"]
            octets += v["octetDeltaCount"]
    return packets, octets


@pytest.fixture(scope="module")
def rbac(cluster):
    install_crds(cluster, NAMESPACE)
    for obj in _rbac_objects("kipfix-agent", AGENT_RULES):
        cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(obj))
    for ns, team in (("kxpods-a", "a"), ("kxpods-b", "b")):
        cluster.kubectl("create", "namespace", ns, check=False)
        cluster.kubectl("label", "namespace", ns, f"team={team}", "--overwrite")
    wait_for(lambda: _default_sa(cluster), "default ServiceAccounts in the pod namespaces")
    yield


def _default_sa(cluster) -> bool:
    core = client.CoreV1Api(cluster.api())
    try:
        for ns in ("kxpods-a", "kxpods-b"):
            core.read_namespaced_service_account("default", ns)
    except ApiException:
        return False
    return True


@pytest.fixture
def podnode(cluster, rbac, tmp_path):
    node = PodNode(cluster, tmp_path)
    try:
        yield node
    finally:
        node.close()
        print(node.log_path.read_text()[-8000:] if node.log_path.exists() else "")


def test_pods_are_metered_named_deduplicated_and_reported(podnode):
    podnode.start([{"podSelector": {"matchLabels": {"app": "web"}}, "interfaces": ["eth0"]},
                   {"namespaceSelector": {"matchLabels": {"team": "nobody"}}}])
    web_a = podnode.add_pod("kxpods-a", "web-a", {"app": "web"}, 10, named=True)
    web_b = podnode.add_pod("kxpods-b", "web-b", {"app": "web"}, 11, named=False)
    db = podnode.add_pod("kxpods-a", "db", {"app": "db"}, 12, named=True)  # not selected
    podnode.add_pod("kxpods-b", "web-odd", {"app": "web"}, 13, named=True, ifname="net1")
    lost = podnode.add_pod("kxpods-b", "web-lost", {"app": "web"}, 14, sandbox=False)  # no netns has its IP

    for pod in (web_a, web_b):
        wait_for(lambda p=pod: "kipfix" in p.filters(), f"kipfix attached in {pod.k8s_name}", timeout=5)
    assert "kipfix" not in db.filters()
    report = wait_for(lambda: (lambda r: r if len(r.get("errors") or []) >= 2 else None)(podnode.report()),
                      "errors for web-odd and web-lost in the node report", timeout=30)
    errors = " | ".join(report["errors"])
    assert "pod kxpods-b/web-odd:" in errors and "eth0" in errors, errors
    assert "pod kxpods-b/web-lost: network namespace not found" in errors and lost.ip in errors, errors
    assert any("pods[1]" in w and "matches no running pod" in w for w in report["warnings"]), report
    assert "pod kxpods-a/web-a/eth0" in report["interfaces"] and "pod kxpods-b/web-b/eth0" in report["interfaces"]
    log = podnode.log_path.read_text()
    assert "pod kxpods-b/web-odd" in log and "pod kxpods-b/web-lost" in log
    # web-a, web-b and web-odd (netns found, no eth0 in it); web-lost waits for its netns
    assert podnode.metric("pods_metered", '{state="metered"}') == 3
    assert podnode.metric("pods_metered", '{state="netns_not_found"}') == 1

    # A pod on another node: named through the cluster-wide pod watch (its address answers on br0).
    podnode.nodes.add(f"{podnode.node}-b")
    podnode.core.create_namespaced_pod("kxpods-b", {
        "metadata": {"name": "remote"},
        "spec": {"nodeName": f"{podnode.node}-b", "containers": [{"name": "c", "image": "kipfix.invalid/none"}]}})
    podnode.core.patch_namespaced_pod_status("remote", "kxpods-b", {"status": {
        "phase": "Running", "podIP": REMOTE_IP, "podIPs": [{"ip": REMOTE_IP}]}})
    sh("ip", "-n", podnode.ns, "addr", "add", f"{REMOTE_IP}/32", "dev", "br0")
    time.sleep(1)  # the watch event reaches the agent's index
    web_a.ping(REMOTE_IP, 4)
    remote = dict(sourcePodName="web-a", destinationPodName="remote", destinationPodNamespace="kxpods-b",
                  destinationNodeName=f"{podnode.node}-b", interfaceName="eth0", flowDirection=EGRESS)
    got = wait_for(lambda: (lambda t: t if t[0] >= 4 else None)(icmp_totals(podnode.collector, **remote)),
                   "web-a's pings to the pod on the other node, named", timeout=30)
    assert got == (4, 336)

    web_a.ping(web_b.ip, 5, size=100)  # 5 x 128 octets each way
    db.ping(web_b.ip, 3)               # 3 x 84 octets each way
    names = {"sourcePodName": "web-a", "sourcePodNamespace": "kxpods-a", "sourceNodeName": podnode.node,
             "destinationPodName": "web-b", "destinationPodNamespace": "kxpods-b", "destinationNodeName": podnode.node}
    expected = {  # (match, packets, octets): measured by ping, not by kipfix
        "web-a eth0 egress": (dict(names, interfaceName="eth0", flowDirection=EGRESS), 5, 640),
        "web-b eth0 ingress": (dict(names, interfaceName="eth0", flowDirection=INGRESS), 5, 640),
        "db's veth, host side": (dict(sourcePodName="db", destinationPodName="web-b",
                                      interfaceName=db.host_veth, flowDirection=INGRESS), 3, 252),
        "web-b eth0, from db": (dict(sourcePodName="db", sourcePodNamespace="kxpods-a",
                                     interfaceName="eth0", flowDirection=INGRESS), 3, 252),
    }
    for what, (match, packets, octets) in expected.items():
        got = wait_for(lambda m=match, p=packets: (lambda t: t if t[0] >= p else None)(icmp_totals(podnode.collector, **m)),
                       what, timeout=30)
        assert got == (packets, octets), (what, got)
    # The pod side won: the host side of web-a's and web-b's veths exported none of these packets...
    for veth in (web_a.host_veth, web_b.host_veth):
        assert icmp_totals(podnode.collector, interfaceName=veth, sourcePodName="web-a") == (0, 0)
        assert icmp_totals(podnode.collector, interfaceName=veth, destinationPodName="web-a") == (0, 0)
    # ...and the agent counted what it left out: on web-a's veth its 4+4 packets with the remote pod and
    # 5+5 with web-b; on web-b's veth 5+5 with web-a and 3+3 with db: 34 packets.
    assert wait_for(lambda: podnode.metric("deduplicated_packets_total") == 34, "34 deduplicated packets", timeout=10)

    # The earlier flows ended idle (timeouts.idle 5 s); new ones are cut short by web-b's deletion.
    web_a.ping(web_b.ip, 2)
    podnode.delete_pod(web_b)
    podnode.pods.remove(web_b)
    web_b.delete()
    forced = dict(names, interfaceName="eth0", flowDirection=INGRESS, flowEndReason=FORCED_END)
    got = wait_for(lambda: (lambda t: t if t[0] >= 2 else None)(icmp_totals(podnode.collector, **forced)),
                   "web-b's flows flushed (forced end) when it was deleted", timeout=10)
    assert got == (2, 168)
    wait_for(lambda: "pod kxpods-b/web-b/eth0" not in podnode.report().get("interfaces", []),
             "web-b gone from the report", timeout=15)


def test_two_hundred_pod_cycles_leak_nothing(podnode):
    """Pods come and go 200 times (10 at a time); each is metered within 5 s of Running, its flows end
    as forced end with its exact packet count, and the agent ends with what it had before."""
    podnode.start([{"podSelector": {"matchLabels": {"app": "churn"}}}])
    state_file = podnode.tmp / "tc-state.json"
    ids_file = Path("/run/kipfix") / ("netns-ids" + podnode.pin_path.replace("/", "_") + ".json")

    def ids() -> int:
        return len(json.loads(ids_file.read_text())) if ids_file.exists() else 0

    def owned() -> int:
        if not state_file.exists():
            return 0
        return sum(len(v) if isinstance(v, (list, dict)) else 1 for v in json.loads(state_file.read_text()).values())

    def settled() -> bool:
        return (podnode.metric("cache_flows") == 0 and podnode.metric("kernel_flows") == 0 and ids() == 1
                and not podnode.report().get("errors") and podnode.metric("pods_metered", '{state="metered"}') == 0)

    latencies: list[float] = []
    baseline: dict[str, int] = {}
    cycles, wave, count = 200, 10, 2
    for start in range(0, cycles, wave):
        pods = [podnode.add_pod("kxpods-a" if i % 2 else "kxpods-b", f"churn-{i}", {"app": "churn"},
                                100 + (i % wave), named=bool(i % 2)) for i in range(start, start + wave)]
        for pod in pods:
            wait_for(lambda p=pod: "kipfix" in p.filters(), f"kipfix attached in {pod.k8s_name}", timeout=10,
                     interval=0.02)
            latencies.append(time.monotonic() - pod.running_at)
        threads = [threading.Thread(target=pod.ping, args=(BRIDGE_IP, count)) for pod in pods]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for pod in pods:
            podnode.delete_pod(pod)
            pod.delete()
            podnode.pods.remove(pod)
        if start == 0:  # after the first wave: threads, sockets and caches are warm
            wait_for(settled, "the agent idle after the first wave", timeout=30, interval=0.2)
            baseline = {"fds": podnode.agent_fds(), "owned": owned()}
    wait_for(settled, "the agent idle after 200 cycles", timeout=60, interval=0.2)
    fds, still_owned = podnode.agent_fds(), owned()
    print(f"agent fds {baseline['fds']} after the first wave, {fds} after {cycles} cycles; "
          f"tc state entries {baseline['owned']} -> {still_owned}; netns ids {ids()}")
    assert fds <= baseline["fds"] + 3, (baseline, fds)  # a leak per cycle would show as +190
    assert still_owned == baseline["owned"]
    assert podnode.metric("kernel_flows") == 0 and podnode.metric("cache_flows") == 0
    for i in range(cycles):
        name = f"churn-{i}"
        got = wait_for(lambda n=name: (lambda t: t if t[0] >= count else None)(
            icmp_totals(podnode.collector, sourcePodName=n, interfaceName="eth0", flowDirection=EGRESS)),
            f"{name}'s {count} echo requests", timeout=30)
        assert got == (count, count * 84), (name, got)
        reasons = {r.values["flowEndReason"] for r in podnode.collector.records(256)
                   if r.values.get("sourcePodName") == name and r.values.get("interfaceName") == "eth0"}
        assert reasons == {FORCED_END}, (name, reasons)
    assert max(latencies) < 5.0, f"slowest attach {max(latencies):.2f} s after Running"
    print(f"attach after Running: median {sorted(latencies)[len(latencies) // 2] * 1000:.0f} ms, "
          f"max {max(latencies) * 1000:.0f} ms over {len(latencies)} pods")
