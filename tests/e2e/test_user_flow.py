"""The whole Kubernetes flow as a user does it, with real traffic.

helm install the chart -> the FlowExporter CRD is served -> kubectl apply
examples/flowexporter.yaml (a copy pointing at the test's collector and
selecting the test's nodes, otherwise the example's shape) -> the operator,
running as a process with the chart's operator ServiceAccount (so the
chart's RBAC is what it gets), renders one ConfigMap per selected node -> the
DaemonSet controller creates one agent pod per node with the chart's spec ->
one real ``kipfix agent --kubernetes`` per node, with the chart's agent
ServiceAccount, runs in that node's own network namespace (``ip netns exec``)
as its host, meters ping traffic to a "pod" netns and exports IPFIX to a
collector -> the FlowExporter status shows the nodes ready. Then a spec
change (second collector, new template) that every agent follows within
5 s, a node joining and one leaving, invalid specs refused by the API (CEL)
and by the operator while the running config stays, and the deletion, after
which no tc filter is left in any node netns.

Network (all made by the test, removed at the end): node i is netns
``kxuf-<id>-n<i>`` with ``eth9`` = 10.250.i.2/30 (its veth to the root netns,
whose end is 10.250.i.1) and ``eth0`` = 10.250.i.5/30 (its veth to the pod
netns ``kxuf-<id>-p<i>``, 10.250.i.6). Node 1's root-side veth also carries
10.250.0.1/32: the collectors and a TCP forwarder to the API server (which
listens on 127.0.0.1 only) listen there, and every node routes 10.250.0.1 via
its eth9. The example's interface selection (eth*, ens*, bondN, not eth9)
then meters eth0 and leaves the uplink alone.
"""

from __future__ import annotations

import contextlib
import copy
import ipaddress
import json
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml
from kubernetes import client
from kubernetes.client.rest import ApiException

from kipfix.agent.collector.server import Collector
from kipfix.agent.contract import CONFIG_KEY, HASH_ANNOTATION, configmap_name, lease_name
from agentproc import remove_state_files
from forwarder import TcpForwarder
from test_operator import _free_port, wait_for

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "kipfix"
EXAMPLE = REPO / "examples" / "flowexporter.yaml"
NAMESPACE = "kipfix-flow-e2e"
RELEASE = "kx"
GROUP, VERSION, PLURAL = "kipfix.io", "v1alpha1", "flowexporters"
AGENT_LABEL = "kipfix-e2e-flow/agent"  # the chart's agent.nodeSelector (set by the test)
SITE_LABEL = "kipfix-e2e-flow/site"    # the FlowExporter's nodeSelector
SERVICE_IP = "10.250.0.1"              # collectors and the API forwarder, in the root netns
KIPFIX = str(Path(sys.executable).with_name("kipfix"))
# node name -> (index, site label, runs an agent pod)
NODES = {"flow-a": (1, "edge", True), "flow-b": (2, "edge", True), "flow-c": (3, "core", True),
         "flow-d": (4, "core", False)}
AGENT_NODES = [n for n, (_, _, agent) in NODES.items() if agent]
# Placed first and selecting ICMP: pings go to it (a flow goes to the first template that selects it), the
# rest to template 256 as before.
NEW_TEMPLATE = {"id": 300, "fields": ["sourceIPv4Address", "destinationIPv4Address", "protocolIdentifier",
                                      "flowDirection", "packetDeltaCount"], "select": {"protocols": ["icmp"]}}
INGRESS, EGRESS = 0, 1  # flowDirection


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(list(args), capture_output=True, text=True, timeout=60)
    if check and result.returncode:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}): {result.stdout}{result.stderr}")
    return result


class NodeNet:
    """A node's host netns, wired to the root netns and to one pod netns."""

    def __init__(self, run_id: str, index: int):
        self.index = index
        self.ns, self.pod_ns = f"kxuf-{run_id}-n{index}", f"kxuf-{run_id}-p{index}"
        self.root_if = f"kxu{run_id}{index}"
        self.gateway, self.address = f"10.250.{index}.1", f"10.250.{index}.2"
        self.host_ip, self.pod_ip = f"10.250.{index}.5", f"10.250.{index}.6"

    def create(self) -> None:
        run("ip", "netns", "add", self.ns)
        run("ip", "netns", "add", self.pod_ns)
        run("ip", "link", "add", self.root_if, "type", "veth", "peer", "name", "eth9", "netns", self.ns)
        run("ip", "addr", "add", f"{self.gateway}/30", "dev", self.root_if)
        run("ip", "link", "set", self.root_if, "up")
        run("ip", "-n", self.ns, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", self.pod_ns)
        for ns, ifname, address in ((self.ns, "eth9", self.address), (self.ns, "eth0", self.host_ip),
                                    (self.pod_ns, "eth0", self.pod_ip)):
            run("ip", "-n", ns, "addr", "add", f"{address}/30", "dev", ifname)
            run("ip", "-n", ns, "link", "set", ifname, "up")
            run("ip", "-n", ns, "link", "set", "lo", "up")
        run("ip", "-n", self.ns, "route", "add", f"{SERVICE_IP}/32", "via", self.gateway, "dev", "eth9")

    def delete(self) -> None:
        # deleting the netns removes its veths, and so their ends in the root netns
        for ns in (self.ns, self.pod_ns):
            run("ip", "netns", "del", ns, check=False)
        run("ip", "link", "del", self.root_if, check=False)

    def ping(self, count: int) -> None:
        run("ip", "netns", "exec", self.ns, "ping", "-n", "-q", "-c", str(count), "-i", "0.2", "-W", "2",
            self.pod_ip)

    def kipfix_filters(self) -> str:
        """Every kipfix tc filter on any interface of the node netns."""
        out = []
        for line in run("ip", "-n", self.ns, "-o", "link", "show").stdout.splitlines():
            ifname = line.split(":")[1].strip().split("@")[0]
            for direction in ("ingress", "egress"):
                shown = run("tc", "-n", self.ns, "filter", "show", "dev", ifname, direction, check=False).stdout
                out += [f"{ifname} {direction}: {x}" for x in shown.splitlines() if "kipfix" in x]
        return "\n".join(out)


class Flow:
    """Everything the test set up; ``close()`` removes all of it (also after a failure)."""

    def __init__(self, cluster, workdir: Path):
        self.cluster = cluster
        self.workdir = workdir
        self.run_id = uuid.uuid4().hex[:6]
        self.api = cluster.api()
        self.core = client.CoreV1Api(self.api)
        self.custom = client.CustomObjectsApi(self.api)
        self.coord = client.CoordinationV1Api(self.api)
        self.nets = {name: NodeNet(self.run_id, index) for name, (index, _, _) in NODES.items()
                     if NODES[name][2]}
        self.agents: dict[str, subprocess.Popen] = {}
        self.collectors: list[Collector] = []
        self.cleanups: list = []
        self.operator: subprocess.Popen | None = None
        self.manifest = workdir / "flowexporter.yaml"

    # -- API views ---------------------------------------------------------------------

    def fe(self) -> dict:
        return self.custom.get_cluster_custom_object(GROUP, VERSION, PLURAL, "uplinks")

    def status(self) -> dict:
        return self.fe().get("status") or {}

    def condition(self, kind: str = "Ready") -> dict:
        return next((c for c in self.status().get("conditions") or [] if c["type"] == kind), {})

    def configmap(self, node: str) -> client.V1ConfigMap | None:
        try:
            return self.core.read_namespaced_config_map(configmap_name(node), NAMESPACE)
        except ApiException as err:
            if err.status == 404:
                return None
            raise

    def report(self, node: str) -> dict:
        lease = self.coord.read_namespaced_lease(lease_name(node), NAMESPACE)
        return json.loads((lease.metadata.annotations or {}).get("kipfix.io/report") or "{}")

    def apply(self, spec: dict, check: bool = True) -> subprocess.CompletedProcess:
        self.manifest.write_text(yaml.safe_dump(spec, sort_keys=False))
        return self.cluster.kubectl("apply", "-f", str(self.manifest), check=check)

    # -- processes ---------------------------------------------------------------------

    def start_operator(self, deployment: client.V1Deployment, kubeconfig: Path) -> None:
        """The operator Deployment's own command, args and env, as a process (liveness on loopback)."""
        container = deployment.spec.template.spec.containers[0]
        assert container.command == ["kipfix"]
        port = _free_port()
        args = [f"--liveness=http://127.0.0.1:{port}/healthz" if a.startswith("--liveness=") else a
                for a in container.args]
        env = {e.name: e.value for e in container.env or [] if e.value is not None}
        env["POD_NAMESPACE"] = NAMESPACE  # downward API metadata.namespace
        assert {e.name for e in container.env} == {"POD_NAMESPACE"}, container.env
        self.operator_log = self.workdir / "operator.log"
        with open(self.operator_log, "w") as log:
            self.operator = subprocess.Popen([KIPFIX, *args], env={**os.environ, **env, "KUBECONFIG": str(kubeconfig)},
                                             stdout=log, stderr=subprocess.STDOUT)

        def alive():
            assert self.operator.poll() is None, f"operator exited: {self.operator_log.read_text()}"
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as rsp:
                    return rsp.status == 200
            return False

        wait_for(alive, "the operator's liveness endpoint", timeout=60)

    def start_agent(self, node: str, pod: client.V1Pod, kubeconfig: Path) -> None:
        """The agent pod's command and args, in the node's netns (its host), as the agent ServiceAccount."""
        container = pod.spec.containers[0]
        assert container.command == ["kipfix"]
        pin_path = f"/sys/fs/bpf/kipfix-e2e-flow-{self.run_id}-{node}"
        self.cleanups.append(lambda: run("rm", "-rf", pin_path, check=False))
        self.cleanups.append(lambda: remove_state_files(pin_path))  # netns ids and the crash journal
        args = [("--log-level=debug" if a.startswith("--log-level=") else a) for a in container.args]
        env = {"KUBECONFIG": str(kubeconfig), "NODE_NAME": node, "POD_NAMESPACE": NAMESPACE,  # downward API
               "KIPFIX_PIN_PATH": pin_path, "KIPFIX_TC_STATE": str(self.workdir / f"tc-state-{node}.json")}
        with open(self.workdir / f"agent-{node}.log", "w") as log:
            self.agents[node] = subprocess.Popen(["ip", "netns", "exec", self.nets[node].ns, KIPFIX, *args],
                                                 env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)

    def agent_log(self, node: str) -> str:
        path = self.workdir / f"agent-{node}.log"
        return path.read_text()[-4000:] if path.exists() else ""

    def close(self) -> None:
        for proc in [*self.agents.values(), self.operator]:
            if proc and proc.poll() is None:
                proc.terminate()
        for proc in [*self.agents.values(), self.operator]:
            if proc:
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        for collector in self.collectors:
            collector.stop()
        for cleanup in reversed(self.cleanups):
            with contextlib.suppress(Exception):
                cleanup()
        for net in self.nets.values():
            net.delete()
        self.api.close()


def ping_packets(collector: Collector, since: int, net: NodeNet, template: int, src: str, dst: str,
                 direction: int) -> int:
    """packetDeltaCount summed over ICMP data records of ``template`` from ``net``'s agent since message ``since``."""
    src, dst = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    total = 0
    for received in list(collector.received[since:]):
        if received.message is None or received.peer[0] != net.address:
            continue
        for record in received.message.data_records:
            v = record.values
            if (record.template_id == template and v.get("sourceIPv4Address") == src
                    and v.get("destinationIPv4Address") == dst and v.get("protocolIdentifier") == 1
                    and v.get("flowDirection") == direction):
                total += v["packetDeltaCount"]
    return total


def assert_ping_exported(collector: Collector, net: NodeNet, count: int, template: int = 256) -> None:
    """Ping ``count`` times from the node to its pod; the collector gets exactly that many per direction."""
    since = len(collector.received)
    net.ping(count)
    for direction, src, dst in ((EGRESS, net.host_ip, net.pod_ip), (INGRESS, net.pod_ip, net.host_ip)):
        got = wait_for(lambda: (lambda n: n if n >= count else None)(
            ping_packets(collector, since, net, template, src, dst, direction)),
            f"{count} {'egress' if direction else 'ingress'} packets of template {template} from {net.ns}",
            timeout=60)
        assert got == count, f"{net.ns} template {template} direction {direction}: {got} packets, sent {count}"


def helm_values(path: Path) -> Path:
    path.write_text(yaml.safe_dump({
        # no kubelet pulls or runs anything here: the test runs the commands itself
        "image": {"repository": "kipfix.invalid/kipfix-e2e", "tag": "e2e", "pullPolicy": "Never"},
        "agent": {"nodeSelector": {"kubernetes.io/os": "linux", AGENT_LABEL: "true"}},
        "operator": {"nodeSelector": {AGENT_LABEL: "true"}},
    }))
    return path


def flowexporter_from_example(collector: Collector) -> dict:
    """examples/flowexporter.yaml with the test's collector, node selector and a 1 s idle timeout."""
    doc = yaml.safe_load(EXAMPLE.read_text())
    assert doc["metadata"]["name"] == "uplinks" and len(doc["spec"]["collectors"]) == 1
    assert doc["spec"]["interfaces"]["host"] == {"names": ["eth*", "ens*", "/^bond[0-9]+$/"], "exclude": ["eth9"]}
    doc["spec"]["collectors"][0]["address"] = f"{collector.host}:{collector.port}"
    doc["spec"]["nodeSelector"] = {"matchLabels": {SITE_LABEL: "edge"}}
    doc["spec"]["timeouts"]["idle"] = 1  # a ping's flows end (and are exported) a second after it
    return doc


@pytest.fixture
def flow(cluster, tmp_path):
    f = Flow(cluster, tmp_path)
    try:
        yield f
    finally:
        with contextlib.suppress(ApiException):
            f.custom.delete_cluster_custom_object(GROUP, VERSION, PLURAL, "uplinks")
        f.close()
        cluster.helm("uninstall", RELEASE, "--namespace", NAMESPACE, "--wait", "--timeout", "120s", check=False)
        # the operator creates its ClusterKopfPeering itself (helm does not own it)
        cluster.kubectl("delete", "clusterkopfpeering", "kipfix", "--ignore-not-found", check=False)
        cluster.kubectl("delete", "namespace", NAMESPACE, "--wait=false", "--ignore-not-found", check=False)
        for name in NODES:
            with contextlib.suppress(Exception):
                cluster.nodes.remove(name)
        for name in ("operator.log", *(f"agent-{n}.log" for n in AGENT_NODES)):
            path = tmp_path / name
            if path.exists():
                print(f"--- {name}\n{path.read_text()[-6000:]}")


@pytest.mark.root
@pytest.mark.slow
def test_user_flow_helm_apply_agents_export_follow_and_delete(cluster, flow):
    # -- the nodes, each with its own network namespace as its host ------------------------
    for name, (index, site, agent) in NODES.items():
        labels = {SITE_LABEL: site, **({AGENT_LABEL: "true"} if agent else {})}
        cluster.nodes.add(name, labels, internal_ip=f"10.250.{index}.2")
    for net in flow.nets.values():
        net.create()
    first = flow.nets["flow-a"]
    run("ip", "addr", "add", f"{SERVICE_IP}/32", "dev", first.root_if)
    api_host, api_port = flow.api.configuration.host.split("//")[1].rsplit(":", 1)  # 127.0.0.1, port
    forwarder = TcpForwarder(SERVICE_IP, (api_host, int(api_port)))
    flow.cleanups.append(forwarder.close)
    collector = Collector(SERVICE_IP, 0, out=None, err=None).start()
    flow.collectors.append(collector)

    # -- 1. helm install: the CRD is served ------------------------------------------------
    cluster.helm("install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--create-namespace",
                 "--values", str(helm_values(flow.workdir / "values.yaml")))
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd/flowexporters.kipfix.io")
    assert "flowexporters" in cluster.kubectl("api-resources", "--api-group=kipfix.io", "-o", "name").stdout

    apps = client.AppsV1Api(flow.api)
    daemonset = apps.list_namespaced_daemon_set(
        NAMESPACE, label_selector=f"app.kubernetes.io/instance={RELEASE},app.kubernetes.io/component=agent").items
    deployment = apps.list_namespaced_deployment(
        NAMESPACE, label_selector=f"app.kubernetes.io/instance={RELEASE},app.kubernetes.io/component=operator").items
    assert len(daemonset) == 1 and len(deployment) == 1
    daemonset, deployment = daemonset[0], deployment[0]

    # -- 3. the operator as a process with the chart's operator ServiceAccount -----------------
    operator_sa = deployment.spec.template.spec.service_account_name
    flow.start_operator(deployment, cluster.serviceaccount_kubeconfig(NAMESPACE, operator_sa,
                                                                      flow.workdir / "operator.kubeconfig"))

    # -- 4. one agent pod per agent node, with the chart's spec --------------------------------
    selector = ",".join(f"{k}={v}" for k, v in daemonset.spec.selector.match_labels.items())

    def agent_pods():
        pods = [p for p in flow.core.list_namespaced_pod(NAMESPACE, label_selector=selector).items
                if not p.metadata.deletion_timestamp]
        return pods if sorted(p.spec.node_name for p in pods) == AGENT_NODES and all(
            p.status.phase == "Running" for p in pods) else None

    pods = {p.spec.node_name: p for p in wait_for(agent_pods, f"Running agent pods on exactly {AGENT_NODES}",
                                                    timeout=60)}
    manifest = yaml.safe_load_all(cluster.helm("get", "manifest", RELEASE, "--namespace", NAMESPACE).stdout)
    chart_pod = next(d for d in manifest if d and d["kind"] == "DaemonSet")["spec"]["template"]["spec"]
    for node, pod in pods.items():
        spec = pod.spec
        assert spec.host_network is True and spec.dns_policy == "ClusterFirstWithHostNet"
        assert spec.service_account_name == chart_pod["serviceAccountName"]
        sc = spec.containers[0].security_context
        assert sc.privileged is False and sc.allow_privilege_escalation is False and sc.run_as_user == 0
        assert sc.capabilities.drop == ["ALL"]
        assert sorted(sc.capabilities.add) == ["BPF", "NET_ADMIN", "PERFMON", "SYS_ADMIN"]
        assert sc.capabilities.add == chart_pod["containers"][0]["securityContext"]["capabilities"]["add"]
        volumes = {v.name: (v.host_path.path, v.host_path.type) for v in spec.volumes if v.host_path}
        assert volumes == {v["name"]: (v["hostPath"]["path"], v["hostPath"]["type"])
                           for v in chart_pod["volumes"] if "hostPath" in v}
        assert set(volumes) == {"bpffs", "modules", "headers", "netns", "state"}
        mounts = {m.name: (m.mount_path, m.mount_propagation, bool(m.read_only))
                  for m in spec.containers[0].volume_mounts if not m.name.startswith("kube-api-access")}
        assert mounts == {m["name"]: (m["mountPath"], m.get("mountPropagation"), bool(m.get("readOnly")))
                          for m in chart_pod["containers"][0]["volumeMounts"]}
        assert spec.containers[0].args == chart_pod["containers"][0]["args"]
        assert pod.status.host_ip == flow.nets[node].address

    # -- 5. one real agent per agent node, its node's netns as its host ----------------------
    agent_sa = daemonset.spec.template.spec.service_account_name
    agent_kubeconfig = cluster.serviceaccount_kubeconfig(NAMESPACE, agent_sa, flow.workdir / "agent.kubeconfig")
    doc = yaml.safe_load(agent_kubeconfig.read_text())
    # inside a node netns the API server is at the forwarder; its certificate names localhost
    doc["clusters"][0]["cluster"].update(server=f"https://{SERVICE_IP}:{forwarder.port}", **{"tls-server-name": "localhost"})
    agent_kubeconfig.write_text(yaml.safe_dump(doc))
    for node in AGENT_NODES:
        flow.start_agent(node, pods[node], agent_kubeconfig)
    for node in AGENT_NODES:
        wait_for(lambda: flow.agents[node].poll() is None and flow.report(node),
                 f"{node}'s agent reports through the forwarder", timeout=60)

    # -- 2. kubectl apply the example ----------------------------------------------------------
    spec = flowexporter_from_example(collector)
    flow.apply(spec)
    selected = ["flow-a", "flow-b"]

    # one ConfigMap per selected (edge) node; the core nodes flow-c and flow-d get none
    wait_for(lambda: all(flow.configmap(n) for n in selected), "ConfigMaps for the edge nodes")
    assert flow.configmap("flow-c") is None and flow.configmap("flow-d") is None
    config = yaml.safe_load(flow.configmap("flow-a").data[CONFIG_KEY])
    assert [c["address"] for c in config["collectors"]] == [f"{SERVICE_IP}:{collector.port}"]

    # -- 6. real traffic, exact counts, status ready --------------------------------------------
    for node in selected:
        wait_for(lambda: (lambda r: r if "eth0" in r.get("interfaces", []) else None)(flow.report(node)),
                 f"{node}'s agent attached to eth0", timeout=180)
        assert "eth9" not in flow.report(node)["interfaces"]
        assert "kipfix" in flow.nets[node].kipfix_filters()
    for count, node in zip((5, 7), selected):
        assert_ping_exported(collector, flow.nets[node], count)
    status = wait_for(lambda: (lambda s: s if s.get("nodesReady") == 2 else None)(flow.status()),
                      "nodesReady 2", timeout=60)
    assert (status["nodesTargeted"], status["nodesConfigured"]) == (2, 2) and status["nodeErrors"] == []
    assert (flow.condition()["status"], flow.condition()["reason"]) == ("True", "AllNodesReady")
    assert "2/2" in cluster.kubectl("get", "fe", "uplinks").stdout

    # -- 7a. a second collector and a new template: every agent follows within 5 s -----------------
    second = Collector(SERVICE_IP, 0, out=None, err=None).start()
    flow.collectors.append(second)
    hashes = {n: flow.configmap(n).metadata.annotations[HASH_ANNOTATION] for n in selected}
    changed = copy.deepcopy(spec)
    changed["spec"]["collectors"].append({"address": f"{SERVICE_IP}:{second.port}", "transport": "udp",
                                          "description": "second collector"})
    changed["spec"]["templates"].insert(0, NEW_TEMPLATE)
    flow.apply(changed)
    rendered_at: dict[str, float] = {}
    followed_at: dict[str, float] = {}
    deadline = time.monotonic() + 60
    while len(followed_at) < len(selected) and time.monotonic() < deadline:
        for node in selected:
            if node not in rendered_at and flow.configmap(node).metadata.annotations[HASH_ANNOTATION] != hashes[node]:
                rendered_at[node] = time.monotonic()
            if node in rendered_at and node not in followed_at and any(
                    r.message and r.peer[0] == flow.nets[node].address
                    and any(t.id == NEW_TEMPLATE["id"] for t in r.message.templates)
                    for r in list(second.received)):
                followed_at[node] = time.monotonic()
        second.wait_for(lambda c: False, 0.05)
    assert set(followed_at) == set(selected), (rendered_at, followed_at)
    print("spec change followed after", {n: round(followed_at[n] - rendered_at[n], 2) for n in selected}, "s")
    for node in selected:
        assert followed_at[node] - rendered_at[node] < 5, f"{node} took {followed_at[node] - rendered_at[node]:.1f} s"
    for count, node in zip((4, 6), selected):
        since = len(collector.received)
        assert_ping_exported(second, flow.nets[node], count, template=NEW_TEMPLATE["id"])
        for direction, src, dst in ((EGRESS, flow.nets[node].host_ip, flow.nets[node].pod_ip),
                                    (INGRESS, flow.nets[node].pod_ip, flow.nets[node].host_ip)):
            # the first collector gets the same flows, once: in the new template, none in 256
            wait_for(lambda: ping_packets(collector, since, flow.nets[node], NEW_TEMPLATE["id"], src, dst,
                                          direction) >= count, "the new template at the first collector", timeout=30)
            assert ping_packets(collector, since, flow.nets[node], NEW_TEMPLATE["id"], src, dst, direction) == count
            assert ping_packets(collector, since, flow.nets[node], 256, src, dst, direction) == 0

    # -- 7b. relabel: flow-c joins, flow-a leaves ------------------------------------------------------
    cluster.nodes.label("flow-c", {SITE_LABEL: "edge"})
    wait_for(lambda: flow.configmap("flow-c"), "flow-c's ConfigMap after it joined")
    wait_for(lambda: (lambda r: r if "eth0" in r.get("interfaces", []) else None)(flow.report("flow-c")),
             "flow-c's agent attached to eth0", timeout=180)
    assert_ping_exported(second, flow.nets["flow-c"], 3, template=NEW_TEMPLATE["id"])
    cluster.nodes.label("flow-a", {SITE_LABEL: None})
    wait_for(lambda: flow.configmap("flow-a") is None, "flow-a's ConfigMap removed after it left")
    wait_for(lambda: flow.report("flow-a").get("interfaces") == [], "flow-a's agent detached", timeout=30)
    wait_for(lambda: not flow.nets["flow-a"].kipfix_filters(), "no tc filter left on flow-a", timeout=30)
    selected = ["flow-b", "flow-c"]
    wait_for(lambda: (lambda s: s if s.get("nodesReady") == 2 and s.get("nodesTargeted") == 2 else None)(
        flow.status()), "nodesReady 2 of 2 (flow-b, flow-c)", timeout=60)
    wait_for(lambda: flow.condition().get("status") == "True", "Ready=True after the relabelling")

    # -- 7c. invalid specs: refused by the API (CEL) and by the operator; the running config stays ------
    duplicate = copy.deepcopy(changed)
    duplicate["spec"]["templates"].append({"id": 256, "fields": ["octetDeltaCount"]})
    result = flow.apply(duplicate, check=False)
    assert result.returncode != 0 and "every template id must be unique" in result.stderr, result.stderr
    before = {n: flow.configmap(n).data[CONFIG_KEY] for n in selected}
    unknown = copy.deepcopy(changed)
    unknown["spec"]["templates"][0]["fields"].append("fooBar")
    flow.apply(unknown)
    cond = wait_for(lambda: (lambda c: c if c.get("reason") == "InvalidSpec" else None)(flow.condition()),
                    "Ready=False InvalidSpec")
    assert cond["status"] == "False"
    assert "spec.templates[0].fields: unknown information element 'fooBar'" in cond["message"], cond["message"]
    assert {n: flow.configmap(n).data[CONFIG_KEY] for n in selected} == before
    assert_ping_exported(second, flow.nets["flow-b"], 2, template=NEW_TEMPLATE["id"])  # still exporting
    assert all(flow.report(n)["configError"] is None for n in selected)

    # -- 7d. delete: ConfigMaps removed, every agent detaches, no tc filter anywhere ---------------------
    cluster.kubectl("delete", "-f", str(flow.manifest))
    wait_for(lambda: all(flow.configmap(n) is None for n in NODES), "every node ConfigMap removed")
    for node in AGENT_NODES:
        wait_for(lambda: flow.report(node).get("interfaces") == [], f"{node}'s agent detached", timeout=30)
        wait_for(lambda: not flow.nets[node].kipfix_filters(), f"no kipfix tc filter in {node}'s netns", timeout=30)
        assert flow.agents[node].poll() is None, flow.agent_log(node)

    # the agents stop cleanly (SIGTERM, as the kubelet does); the operator logged no handler errors
    for node in AGENT_NODES:
        flow.agents[node].terminate()
    for node in AGENT_NODES:
        assert flow.agents[node].wait(timeout=30) == 0, flow.agent_log(node)
    for net in flow.nets.values():
        assert not net.kipfix_filters()
    errors = [line for line in flow.operator_log.read_text().splitlines()
              if " ERROR " in line and "kopf._cogs.clients" not in line and "invalid spec" not in line]
    assert not errors, "operator logged errors:\n" + "\n".join(errors)
    assert not collector.errors and not second.errors, collector.errors + second.errors
