"""The FlowExporter CRD and the kipfix operator against a real API server.

The operator runs as a subprocess authenticated as a ServiceAccount whose
RBAC is exactly kipfix.operator.rbac.OPERATOR_RULES; the node side runs
``kipfix.agent.kube.KubernetesMode`` (the code behind ``kipfix agent
--kubernetes``) as a ServiceAccount with AGENT_RULES, with a recording
stand-in for the BPF Agent, so what is checked here is the API contract:
CRD schema and CEL, rendering, node selection, conflicts, status, watch
latency, garbage collection. Metering real traffic in a DaemonSet pod is the
chart's e2e test.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from kubernetes import client
from kubernetes.client.rest import ApiException

from agentproc import remove_state_files
from kipfix.agent.config import parse_config
from kipfix.agent.contract import CONFIG_KEY, HASH_ANNOTATION, config_hash, configmap_name
from kipfix.agent.kubeagent import KubernetesMode
from kipfix.operator.rbac import AGENT_RULES, OPERATOR_RULES

REPO = Path(__file__).resolve().parents[2]
CRDS = [REPO / "crds" / "flowexporter.yaml", REPO / "crds" / "kopf-peering.yaml"]
NAMESPACE = "kipfix-op-e2e"
GROUP, VERSION, PLURAL = "kipfix.io", "v1alpha1", "flowexporters"
V4 = ["flowStartMilliseconds", "flowEndMilliseconds", "sourceIPv4Address", "destinationIPv4Address",
      "octetDeltaCount", "packetDeltaCount"]
TEST_LABEL = "kipfix-op-e2e/role"


def wait_for(predicate, what: str, timeout: float = 30.0, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except ApiException as err:
            last = err
            if err.status != 404:
                raise
        if last and not isinstance(last, Exception):
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}; last: {last!r}")


def flowexporter(name: str, role: str, **spec) -> dict:
    base = {"nodeSelector": {"matchLabels": {TEST_LABEL: role}},
            "collectors": [{"address": "127.0.0.1:4739"}],
            "templates": [{"id": 256, "fields": list(V4)}],
            "interfaces": {"host": {"names": ["eth0"]}}}
    base.update(spec)
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "FlowExporter", "metadata": {"name": name}, "spec": base}


def _rbac_objects(name: str, rules: list[dict]) -> list[dict]:
    cluster = [{k: v for k, v in r.items() if k != "scope"} for r in rules if r["scope"] == "cluster"]
    namespaced = [{k: v for k, v in r.items() if k != "scope"} for r in rules if r["scope"] == "namespace"]
    subject = [{"kind": "ServiceAccount", "name": name, "namespace": NAMESPACE}]
    objects = [{"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": NAMESPACE}}]
    if cluster:
        objects += [
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
             "metadata": {"name": f"{NAMESPACE}-{name}"}, "rules": cluster},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
             "metadata": {"name": f"{NAMESPACE}-{name}"}, "subjects": subject,
             "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                         "name": f"{NAMESPACE}-{name}"}}]
    if namespaced:
        objects += [
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
             "metadata": {"name": name, "namespace": NAMESPACE}, "rules": namespaced},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
             "metadata": {"name": name, "namespace": NAMESPACE}, "subjects": subject,
             "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name}}]
    return objects


def install_crds(cluster, namespace: str) -> None:
    """Apply kipfix's CRDs, wait until the API serves them, and make ``namespace``."""
    for crd in CRDS:
        cluster.kubectl("apply", "-f", str(crd))
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=30s",
                    "crd/flowexporters.kipfix.io", "crd/clusterkopfpeerings.kopf.dev")
    cluster.kubectl("create", "namespace", namespace, check=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Env:
    def __init__(self, cluster, api):
        self.cluster = cluster
        self.api = api
        self.core = client.CoreV1Api(api)
        self.custom = client.CustomObjectsApi(api)
        self.created: list[str] = []

    def apply(self, body: dict, check: bool = True):
        return self.cluster.kubectl("apply", "-f", "-", input=json.dumps(body), check=check)

    def create(self, body: dict) -> dict:
        self.apply(body)
        self.created.append(body["metadata"]["name"])
        return self.get(body["metadata"]["name"])

    def get(self, name: str) -> dict:
        return self.custom.get_cluster_custom_object(GROUP, VERSION, PLURAL, name)

    def condition(self, name: str, kind: str = "Ready") -> dict:
        for cond in (self.get(name).get("status") or {}).get("conditions") or []:
            if cond["type"] == kind:
                return cond
        return {}

    def configmaps(self) -> dict[str, client.V1ConfigMap]:
        return {cm.metadata.name: cm for cm in self.core.list_namespaced_config_map(NAMESPACE).items
                if cm.metadata.name.startswith("kipfix-node-")}

    def node_config(self, node: str) -> client.V1ConfigMap | None:
        return self.configmaps().get(configmap_name(node))

    def delete(self, name: str) -> None:
        with contextlib.suppress(ApiException):
            self.custom.delete_cluster_custom_object(GROUP, VERSION, PLURAL, name)


@pytest.fixture(scope="module")
def env(cluster, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("operator")
    install_crds(cluster, NAMESPACE)
    for obj in _rbac_objects("kipfix-operator", OPERATOR_RULES) + _rbac_objects("kipfix-agent", AGENT_RULES):
        cluster.kubectl("apply", "-f", "-", input=json.dumps(obj))
    api = cluster.api()
    e = Env(cluster, api)
    e.operator_kubeconfig = cluster.serviceaccount_kubeconfig(NAMESPACE, "kipfix-operator")
    e.agent_kubeconfig = cluster.serviceaccount_kubeconfig(NAMESPACE, "kipfix-agent")
    port = _free_port()
    log_path = workdir / "operator.log"
    e.operator_log = log_path
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kipfix.operator", "--namespace", NAMESPACE, "--standalone",
             "--liveness", f"http://127.0.0.1:{port}/healthz", "--metrics-port", "0"],
            env={**os.environ, "KUBECONFIG": str(e.operator_kubeconfig)}, stdout=log, stderr=subprocess.STDOUT)
    e.operator = proc

    def alive():
        assert proc.poll() is None, f"operator exited: {log_path.read_text()}"
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as rsp:
                return rsp.status == 200
        return False

    wait_for(alive, "the operator's liveness endpoint")
    try:
        yield e
    finally:
        for name in e.created:
            e.delete(name)
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        print(log_path.read_text()[-20000:])
        # API retries while the fresh API server starts are kopf's business; handler failures are not
        errors = [line for line in log_path.read_text().splitlines()
                  if " ERROR " in line and "kopf._cogs.clients" not in line and "invalid spec" not in line]
        cluster.kubectl("delete", "namespace", NAMESPACE, "--wait=false", check=False)
        api.close()
        assert not errors, "operator logged errors:\n" + "\n".join(errors)


def _schema():
    crd = yaml.safe_load(CRDS[0].read_text())
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def _object_paths(schema, path="flowexporter"):
    """Every path whose schema has properties (kubectl explain lists their fields)."""
    if schema.get("type") == "array":
        yield from _object_paths(schema["items"], path)
        return
    props = schema.get("properties") or {}
    if props:
        yield path, props
    for name, sub in props.items():
        if name != "metadata":
            yield from _object_paths(sub, f"{path}.{name}")


def test_kubectl_explain_documents_every_field(env):
    checked = 0
    paths = set()
    for path, props in _object_paths(_schema()):
        if not path.startswith("flowexporter.spec") and not path.startswith("flowexporter.status"):
            continue
        paths.add(path)
        out = " ".join(env.cluster.kubectl("explain", path).stdout.split())
        for name, sub in props.items():
            description = " ".join(sub["description"].split())
            assert f" {name} " in out, f"kubectl explain {path} does not list {name}:\n{out}"
            assert description[:60] in out, f"kubectl explain {path}: {name}'s description missing:\n{out}"
            checked += 1
    assert {"flowexporter.spec.interfaces.pods.podSelector.matchExpressions",
            "flowexporter.spec.collectors.tls", "flowexporter.status.conditions"} <= paths
    assert checked >= 59


@pytest.mark.parametrize("change, message", [
    (lambda s: s["templates"].append({"id": 256, "fields": ["octetDeltaCount"]}),
     "every template id must be unique"),
    (lambda s: s["templates"][0].update(id=255), "template ids 0..255 are reserved"),
    (lambda s: s["collectors"][0].update(transport="tls"), "tls: required with transport tls"),
    (lambda s: s["collectors"][0].update(transport="sctp"), 'Unsupported value: "sctp"'),
    (lambda s: s["collectors"][0].update(address="no-port"), "spec.collectors[0].address"),
    (lambda s: s.update(observationDomainId={"fixed": 1, "perNode": True}), "exactly one of fixed or perNode"),
    (lambda s: s.update(timeouts={"idle": 100, "active": 10}), "idle must not be longer than active"),
    (lambda s: s.update(maxFlows=8), "spec.maxFlows"),
    (lambda s: s.update(interfaces={}), "give host, pods or both"),
    (lambda s: s["templates"][0]["fields"].append("octetDeltaCount: 4"), "spec.templates[0].fields[6]"),
])
def test_the_api_rejects_what_the_schema_and_cel_forbid(env, change, message):
    body = flowexporter("e2e-rejected", "none")
    change(body["spec"])
    result = env.apply(body, check=False)
    assert result.returncode != 0, "the API accepted an invalid FlowExporter"
    assert message in result.stderr, result.stderr


def test_reduced_sizes_reach_the_node_config(env):
    env.cluster.nodes.add("op-reduced", {TEST_LABEL: "reduced"})
    fields = V4 + ["tcpControlBits:1", "ingressInterface:2"]
    env.create(flowexporter("e2e-reduced", "reduced", templates=[{"id": 256, "fields": fields}]))
    cm = wait_for(lambda: env.node_config("op-reduced"), "the ConfigMap of op-reduced")
    assert parse_config(yaml.safe_load(cm.data[CONFIG_KEY])).templates[0].fields == tuple(fields)
    env.delete("e2e-reduced")


def test_render_relabel_conflict_invalid_and_delete(env):
    nodes = env.cluster.nodes
    for name, role in (("op-a", "edge"), ("op-b", "edge"), ("op-c", "core")):
        nodes.add(name, {TEST_LABEL: role})

    env.create(flowexporter("e2e-edge", "edge"))
    cms = wait_for(lambda: (lambda c: c if set(c) >= {configmap_name("op-a"), configmap_name("op-b")} else None)(
        env.configmaps()), "ConfigMaps for the edge nodes")
    assert configmap_name("op-c") not in cms
    cm = cms[configmap_name("op-a")]
    config = parse_config(yaml.safe_load(cm.data[CONFIG_KEY]))
    assert [c.address for c in config.collectors] == ["127.0.0.1:4739"]
    assert config.interfaces[0].names == ("eth0",)
    assert cm.metadata.annotations[HASH_ANNOTATION] == config_hash(cm.data[CONFIG_KEY])
    fe = env.get("e2e-edge")
    assert [(r.kind, r.name, r.uid) for r in cm.metadata.owner_references] == [
        ("FlowExporter", "e2e-edge", fe["metadata"]["uid"])]
    status = wait_for(lambda: (env.get("e2e-edge").get("status") or {}).get("nodesTargeted") == 2
                      and env.get("e2e-edge")["status"], "status with 2 targeted nodes")
    assert (status["nodesConfigured"], status["nodesReady"]) == (2, 0)
    assert {e["reason"] for e in status["nodeErrors"]} == {"AgentMissing"}
    ready = env.condition("e2e-edge")
    assert (ready["status"], ready["reason"], ready["observedGeneration"]) == ("False", "NodesNotReady", 1)
    printed = env.cluster.kubectl("get", "fe", "e2e-edge").stdout
    assert "udp/127.0.0.1:4739" in printed and "0/2" in printed, printed

    # idempotent: nothing is rewritten while nothing changes
    versions = {n: c.metadata.resource_version for n, c in env.configmaps().items()}
    fe_version = env.get("e2e-edge")["metadata"]["resourceVersion"]
    time.sleep(6)  # longer than the operator's status refresh period; nothing may change in it
    assert {n: c.metadata.resource_version for n, c in env.configmaps().items()} == versions
    assert env.get("e2e-edge")["metadata"]["resourceVersion"] == fe_version  # no status rewrite either

    # relabel: c joins, a leaves
    nodes.label("op-c", {TEST_LABEL: "edge"})
    wait_for(lambda: env.node_config("op-c"), "op-c's ConfigMap after it joined")
    nodes.label("op-a", {TEST_LABEL: None})
    wait_for(lambda: env.node_config("op-a") is None, "op-a's ConfigMap removed after it left")

    # an invalid spec the schema cannot see: Ready=False naming it, config unchanged
    before = env.node_config("op-b").data[CONFIG_KEY]
    env.apply(flowexporter("e2e-edge", "edge", templates=[{"id": 256, "fields": V4 + ["fooBar"]}]))
    cond = wait_for(lambda: (lambda c: c if c.get("reason") == "InvalidSpec" else None)(env.condition("e2e-edge")),
                    "Ready=False InvalidSpec")
    assert cond["status"] == "False" and cond["observedGeneration"] == 2
    assert "spec.templates[0].fields: unknown information element 'fooBar'" in cond["message"]
    assert "previously applied spec stays in force" in cond["message"]
    assert env.node_config("op-b").data[CONFIG_KEY] == before

    # fixed again, with a second collector: the nodes follow
    env.apply(flowexporter("e2e-edge", "edge", collectors=[{"address": "127.0.0.1:4739"},
                                                          {"address": "127.0.0.1:4740", "transport": "tcp"}]))
    wait_for(lambda: "127.0.0.1:4740" in env.node_config("op-b").data[CONFIG_KEY], "the new collector rendered")
    wait_for(lambda: env.condition("e2e-edge").get("reason") == "NodesNotReady", "InvalidSpec cleared")

    # a conflicting exporter is refused on the shared nodes, naming both
    env.create(flowexporter("e2e-conflict", "edge", templates=[{"id": 256, "fields": ["octetDeltaCount"]}]))
    errors = wait_for(lambda: [e for e in (env.get("e2e-conflict").get("status") or {}).get("nodeErrors") or []
                               if e["reason"] == "Conflict"], "Conflict node errors")
    assert {e["node"] for e in errors} == {"op-b", "op-c"}
    assert "template id 256" in errors[0]["message"]
    assert "'e2e-conflict'" in errors[0]["message"] and "'e2e-edge'" in errors[0]["message"]
    assert "octetDeltaCount" not in env.node_config("op-b").data[CONFIG_KEY].split("templates:")[0]
    degraded = env.condition("e2e-conflict", "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "Conflict")

    # a compatible one merges: two owners
    env.create(flowexporter("e2e-extra", "edge", collectors=[{"address": "127.0.0.1:4741"}],
                            templates=[{"id": 300, "fields": ["octetDeltaCount", "packetDeltaCount"]}]))
    cm = wait_for(lambda: (lambda c: c if c and len(c.metadata.owner_references) == 2 else None)(
        env.node_config("op-b")), "op-b's ConfigMap owned by two FlowExporters")
    assert sorted(r.name for r in cm.metadata.owner_references) == ["e2e-edge", "e2e-extra"]
    assert "127.0.0.1:4741" in cm.data[CONFIG_KEY]

    # deleting one re-renders without it; deleting all removes the ConfigMaps
    env.delete("e2e-extra")
    wait_for(lambda: "127.0.0.1:4741" not in env.node_config("op-b").data[CONFIG_KEY], "e2e-extra's part gone")
    env.delete("e2e-conflict")
    env.delete("e2e-edge")
    wait_for(lambda: env.node_config("op-b") is None and env.node_config("op-c") is None,
             "ConfigMaps removed after the FlowExporters were deleted")
    for name in ("op-a", "op-b", "op-c"):
        nodes.remove(name)


class RecordingAgent:
    """Stands in for the BPF Agent: records each config it is given."""

    instances: list["RecordingAgent"] = []

    def __init__(self, config, keep_attached=False):
        self.configs = [(time.monotonic(), config)]
        self._stop = threading.Event()
        RecordingAgent.instances.append(self)

    def offer(self, config, applied=None):
        self.configs.append((time.monotonic(), config))
        if applied is not None:
            applied(None)

    def state(self):
        config = self.configs[-1][1]
        return {"interfaces": [n for s in config.interfaces for n in s.names], "errors": [],
                "lastExportTime": None, "exportedFlows": 0}

    def request_stop(self, *_):
        self._stop.set()

    def run(self):
        self._stop.wait()


def test_agent_follows_its_node_config_and_reports_ready(env, cluster):
    from controlplane import api_client

    cluster.nodes.add("op-agent", {TEST_LABEL: "agent"})
    agent_api = api_client(env.agent_kubeconfig)
    RecordingAgent.instances.clear()
    mode = KubernetesMode("op-agent", NAMESPACE, api=agent_api, agent_factory=RecordingAgent, serve_metrics=False)
    thread = threading.Thread(target=mode.run, daemon=True)
    thread.start()
    try:
        env.create(flowexporter("e2e-agent", "agent"))
        agent = wait_for(lambda: RecordingAgent.instances and RecordingAgent.instances[0], "the agent started")
        assert [c.address for c in agent.configs[0][1].collectors] == ["127.0.0.1:4739"]
        status = wait_for(lambda: (lambda s: s if s.get("nodesReady") == 1 else None)(
            env.get("e2e-agent").get("status") or {}), "nodesReady 1", timeout=30)
        assert status["nodesTargeted"] == 1 and status["nodeErrors"] == []
        ready = env.condition("e2e-agent")
        assert (ready["status"], ready["reason"]) == ("True", "AllNodesReady")
        assert "1/1" in env.cluster.kubectl("get", "fe", "e2e-agent").stdout

        # a spec change reaches the agent within 5 s of the ConfigMap change (a watch, not a poll)
        env.apply(flowexporter("e2e-agent", "agent", collectors=[{"address": "127.0.0.1:4750"}]))
        wait_for(lambda: "127.0.0.1:4750" in (env.node_config("op-agent").data[CONFIG_KEY]), "ConfigMap updated")
        changed = time.monotonic()
        wait_for(lambda: len(agent.configs) >= 2, "the agent received the new config", timeout=5)
        assert agent.configs[-1][0] - changed < 5
        assert [c.address for c in agent.configs[-1][1].collectors] == ["127.0.0.1:4750"]

        # the FlowExporter goes: the ConfigMap goes, the agent gets the empty config (detach all)
        env.delete("e2e-agent")
        wait_for(lambda: len(agent.configs) >= 3, "the empty config after deletion", timeout=30)
        assert agent.configs[-1][1].interfaces == () and agent.configs[-1][1].collectors == ()
    finally:
        mode.request_stop()
        thread.join(timeout=10)
        agent_api.close()
        cluster.nodes.remove("op-agent")


def _tc_filters(ifname: str) -> str:
    return "".join(subprocess.run(["tc", "filter", "show", "dev", ifname, direction], capture_output=True,
                                  text=True).stdout for direction in ("ingress", "egress"))


def _report(env, node: str) -> dict:
    lease = client.CoordinationV1Api(env.api).read_namespaced_lease(f"kipfix-agent-{node}", NAMESPACE)
    return json.loads(lease.metadata.annotations["kipfix.io/report"])


@pytest.mark.root
@pytest.mark.slow
def test_real_agent_in_kubernetes_mode_attaches_reports_and_detaches(env, cluster, tmp_path):
    """`kipfix agent --kubernetes` with BPF: a host interface made for the test (its veth peer
    lives in a throw-away netns, so deleting that netns removes both)."""
    import uuid

    suffix = uuid.uuid4().hex[:8]
    scratch, ifname, peer = f"kxkube-{suffix}", f"kxk{suffix}", f"kxq{suffix}"
    node = f"op-real-{suffix}"
    pin_path = f"/sys/fs/bpf/kipfix-test-{suffix}"
    subprocess.run(["ip", "netns", "add", scratch], check=True)
    proc = None
    log_path = tmp_path / "agent.log"
    try:
        subprocess.run(["ip", "link", "add", ifname, "type", "veth", "peer", "name", peer, "netns", scratch],
                       check=True)
        subprocess.run(["ip", "link", "set", ifname, "up"], check=True)
        cluster.nodes.add(node, {TEST_LABEL: f"real-{suffix}"})
        with open(log_path, "w") as log:
            proc = subprocess.Popen(
                [str(Path(sys.executable).with_name("kipfix")), "--log-level", "debug", "agent", "--kubernetes"],
                env={**os.environ, "KUBECONFIG": str(env.agent_kubeconfig), "NODE_NAME": node,
                     "POD_NAMESPACE": NAMESPACE, "KIPFIX_PIN_PATH": pin_path},
                stdout=log, stderr=subprocess.STDOUT)
        wait_for(lambda: _report(env, node), "the agent's first report (before any config)")
        assert "kipfix" not in _tc_filters(ifname)

        env.create(flowexporter(f"e2e-real-{suffix}", f"real-{suffix}",
                                interfaces={"host": {"names": [ifname]}}))
        report = wait_for(lambda: (lambda r: r if ifname in r["interfaces"] else None)(_report(env, node)),
                          "the agent attached and reported the interface", timeout=120)
        assert report["configError"] is None and report["errors"] == []
        assert report["configHash"] == env.node_config(node).metadata.annotations[HASH_ANNOTATION]
        assert "kipfix" in _tc_filters(ifname)
        wait_for(lambda: (env.get(f"e2e-real-{suffix}").get("status") or {}).get("nodesReady") == 1,
                 "nodesReady 1 from the real agent's report", timeout=30)

        env.delete(f"e2e-real-{suffix}")
        wait_for(lambda: "kipfix" not in _tc_filters(ifname), "filters removed after the FlowExporter went",
                 timeout=30)
        wait_for(lambda: _report(env, node)["interfaces"] == [], "the report shows nothing attached")
        proc.terminate()
        assert proc.wait(timeout=30) == 0, log_path.read_text()
    finally:
        if proc and proc.poll() is None:
            proc.kill()
            proc.wait()
        subprocess.run(["ip", "netns", "del", scratch], check=False)
        subprocess.run(["rm", "-rf", pin_path], check=False)
        remove_state_files(pin_path)  # netns ids and the crash journal in /run/kipfix
        with contextlib.suppress(Exception):
            cluster.nodes.remove(node)
        print(log_path.read_text()[-5000:] if log_path.exists() else "")


def _configmap_body(node: str, text: str | None = None, binary: bytes | None = None) -> dict:
    """The node's ConfigMap as a test writes it: without the operator's labels, so the operator leaves it alone."""
    body = {"metadata": {"name": configmap_name(node), "namespace": NAMESPACE}, "data": {}}
    if text is not None:
        body["data"] = {CONFIG_KEY: text}
    if binary is not None:
        import base64

        body["binaryData"] = {CONFIG_KEY: base64.b64encode(binary).decode()}
    return body


def _agent_metric(port: int, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as rsp:
        text = rsp.read().decode()
    return next(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)


@pytest.mark.root
@pytest.mark.slow
def test_a_bad_configmap_never_takes_the_real_agent_down(env, cluster, tmp_path):
    """`kipfix agent --kubernetes` with BPF, fed ConfigMaps a test writes: each bad one is refused in the Lease
    report (configHash stays), counted, and the agent keeps metering and exporting exactly what ping sent."""
    import uuid

    from test_agent_reload import ANCHOR_BOMB, TEMPLATE, Collector, free_port

    suffix = uuid.uuid4().hex[:6]
    a, b = f"kxcma-{suffix}", f"kxcmb-{suffix}"  # two namespaces of the test's, a veth between them
    node, pin_path = f"op-cm-{suffix}", f"/sys/fs/bpf/kipfix-test-{suffix}"
    collector = Collector(tmp_path / "collected.jsonl")
    metrics_port = free_port(socket.SOCK_STREAM)
    good = (f"collectors:\n  - address: 127.0.0.1:{collector.port}\n"
            f"templates:\n  - id: 256\n    template: [{', '.join(TEMPLATE)}]\n"
            f"interfaces:\n  - netns: {a}\n    names: [va]\n"
            f"timeouts: {{idle: 1, active: 2}}\ndrainInterval: 0.2\n"
            f"metrics: {{address: 127.0.0.1, port: {metrics_port}}}\n")
    not_pem = tmp_path / "ca.crt"
    not_pem.write_text("test CA bytes\n")
    bad = {  # ConfigMap -> what the configError says
        "NUL in the text": (_configmap_body(node, good + "# \0\n"), "not a text file: a NUL octet at line 12, column 3"),
        "Latin-1 octets (binaryData)": (_configmap_body(node, binary="# Zürich\n".encode("latin-1")),
                                        f"ConfigMap {configmap_name(node)} has no key 'config.yaml'"),
        "netns a/b": (_configmap_body(node, good.replace(f"netns: {a}", "netns: a/b")),
                      "interfaces[0].netns: 'a/b' is not accepted"),
        "jsonLines in a missing directory": (_configmap_body(node, good + "jsonLines: /nonexistent-kipfix/f.jsonl\n"),
                                             "jsonLines: '/nonexistent-kipfix/f.jsonl': directory "
                                             "'/nonexistent-kipfix' does not exist"),
        "TLS ca that is not PEM": (_configmap_body(node, good.replace(
            "templates:", f"  - address: 127.0.0.1:{free_port()}\n    transport: tls\n    tls: {{ca: {not_pem}}}\n"
                          "templates:")), "collectors[1].tls.ca: file"),
        "empty": (_configmap_body(node, ""), "the document is empty (no YAML content, only blanks or comments); to "
                                             "stop kipfix on this node, delete the FlowExporters that select it"),
        "cut short": (_configmap_body(node, good[:good.index("va]") + 2]),
                      "invalid YAML at line 9, column 1: did not find expected ',' or ']'"),
        "anchor bomb": (_configmap_body(node, ANCHOR_BOMB.decode()), "more than 100000 values"),
        "duplicate keys": (_configmap_body(node, good + "maxFlows: 1024\nmaxFlows: 2048\n"),
                           "maxFlows: key given twice (lines 12 and 13)"),
    }
    proc = None
    log_path = tmp_path / "agent.log"
    try:
        subprocess.run(["ip", "netns", "add", a], check=True)
        subprocess.run(["ip", "netns", "add", b], check=True)
        subprocess.run(["ip", "-n", a, "link", "add", "va", "type", "veth", "peer", "name", "vb", "netns", b],
                       check=True)
        for ns, ifname, address in ((a, "va", "10.250.0.1/30"), (b, "vb", "10.250.0.2/30")):
            subprocess.run(["ip", "-n", ns, "addr", "add", address, "dev", ifname], check=True)
            subprocess.run(["ip", "-n", ns, "link", "set", ifname, "up"], check=True)
        env.core.create_namespaced_config_map(NAMESPACE, _configmap_body(node, good))
        with open(log_path, "w") as log:
            proc = subprocess.Popen(
                [str(Path(sys.executable).with_name("kipfix")), "--log-level", "debug", "agent", "--kubernetes"],
                env={**os.environ, "KUBECONFIG": str(env.agent_kubeconfig), "NODE_NAME": node,
                     "POD_NAMESPACE": NAMESPACE, "KIPFIX_PIN_PATH": pin_path}, stdout=log, stderr=subprocess.STDOUT)
        report = wait_for(lambda: (lambda r: r if "va" in " ".join(r["interfaces"]) else None)(_report(env, node)),
                          "the agent attached and reported va", timeout=120)
        assert report["configHash"] == config_hash(good) and report["configError"] is None

        def exports_pings(count=5):
            start_ms = int(time.time() * 1000)
            out = subprocess.run(["ip", "netns", "exec", b, "ping", "-c", str(count), "-i", "0.05", "-q",
                                  "10.250.0.1"], capture_output=True, text=True).stdout
            assert f"{count} packets transmitted, {count} received" in out, out

            def echo_requests():
                return sum(r["packetDeltaCount"] for r in collector.records()
                           if r.get("icmpTypeCodeIPv4") == 8 << 8 and r["flowDirection"] == 0
                           and r["sourceIPv4Address"] == "10.250.0.2" and r["flowStartMilliseconds"] >= start_ms)
            wait_for(lambda: echo_requests() >= count, f"{count} echo requests at the collector")
            time.sleep(0.5)
            assert echo_requests() == count

        exports_pings()
        for name, (body, reason) in bad.items():
            failures = _agent_metric(metrics_port, "kipfix_agent_reload_failures_total")
            env.core.replace_namespaced_config_map(configmap_name(node), NAMESPACE, body)
            report = wait_for(lambda: (lambda r: r if reason in (r["configError"] or "") else None)(_report(env, node)),
                              f"the configError for {name}: {reason}")
            assert report["configHash"] == config_hash(good), name
            assert len(report["configError"]) < 1000
            wait_for(lambda: _agent_metric(metrics_port, "kipfix_agent_reload_failures_total") > failures,
                     f"{name} counted in reload_failures_total")
            assert proc.poll() is None, log_path.read_text()[-3000:]
            exports_pings()
        env.core.replace_namespaced_config_map(configmap_name(node), NAMESPACE, _configmap_body(node, good))
        wait_for(lambda: _report(env, node)["configError"] is None, "back to the running config: no error")
        assert "Traceback" not in log_path.read_text()
        proc.terminate()
        assert proc.wait(timeout=30) == 0, log_path.read_text()[-3000:]
    finally:
        if proc and proc.poll() is None:
            proc.kill()
            proc.wait()
        collector.stop()
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], check=False)
        subprocess.run(["rm", "-rf", pin_path], check=False)
        remove_state_files(pin_path)  # netns ids and the crash journal in /run/kipfix
        with contextlib.suppress(ApiException):
            env.core.delete_namespaced_config_map(configmap_name(node), NAMESPACE)
        with contextlib.suppress(ApiException):
            client.CoordinationV1Api(env.api).delete_namespaced_lease(f"kipfix-agent-{node}", NAMESPACE)
        print(log_path.read_text()[-5000:] if log_path.exists() else "")


def test_two_peered_operators_one_pauses(env, cluster, tmp_path):
    """kopf peering with random priorities: of two replicas exactly one handles events."""
    cluster.nodes.add("op-peering", {TEST_LABEL: "peering"})
    procs, logs = [], []
    for i in range(2):
        path = tmp_path / f"operator-{i}.log"
        logs.append(path)
        with open(path, "w") as log:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "kipfix.operator", "--namespace", NAMESPACE, "--peering", "kipfix-e2e",
                 "--liveness", f"http://127.0.0.1:{_free_port()}/healthz", "--metrics-port", "0"],
                env={**os.environ, "KUBECONFIG": str(env.operator_kubeconfig)}, stdout=log,
                stderr=subprocess.STDOUT))

    def priority(path):
        match = re.search(r"\(priority (\d+)\)", path.read_text())
        return int(match.group(1)) if match else None

    def low_paused():
        text = logs[low].read_text()
        return "Pausing operations in favour of" in text or "Resuming operations" not in text

    try:
        try:
            wait_for(lambda: len((env.custom.get_cluster_custom_object(
                "kopf.dev", "v1", "clusterkopfpeerings", "kipfix-e2e").get("status") or {})) == 2,
                "both replicas in the peering object", timeout=60)
            wait_for(lambda: all(priority(p) for p in logs), "both replicas' priorities in their logs")
            low = min(range(2), key=lambda i: priority(logs[i]))
            wait_for(low_paused, "the lower-priority replica paused")
            wait_for(lambda: "Resuming operations" in logs[1 - low].read_text(), "the other replica active")
        except AssertionError as err:
            raise AssertionError(f"{err}\n" + "\n".join(p.read_text()[-3000:] for p in logs)) from None
        assert "Pausing operations" not in logs[1 - low].read_text()
        assert all(p.poll() is None for p in procs)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        cluster.nodes.remove("op-peering")


def _test_ca(directory: Path) -> bytes:
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-days", "2", "-keyout", "ca.key", "-out", "ca.pem", "-subj", "/CN=kipfix e2e collector CA"],
                   cwd=directory, check=True, capture_output=True)
    return (directory / "ca.pem").read_bytes()


def _secret(name: str, data: dict[str, bytes]) -> dict:
    import base64

    return {"metadata": {"name": name}, "type": "Opaque",
            "data": {key: base64.b64encode(value).decode() for key, value in data.items()}}


def test_agent_reads_tls_files_from_the_secret(env, cluster, tmp_path):
    from controlplane import api_client

    node = "op-tls"
    cluster.nodes.add(node, {TEST_LABEL: "tls"})
    ca = _test_ca(tmp_path)
    env.core.create_namespaced_secret(NAMESPACE, _secret("collector-tls", {"ca.crt": ca}))
    env.core.create_namespaced_secret(NAMESPACE, _secret("collector-tls-not-pem", {"ca.crt": b"test CA bytes\n"}))
    agent_api = api_client(env.agent_kubeconfig)
    RecordingAgent.instances.clear()
    mode = KubernetesMode(node, NAMESPACE, api=agent_api, agent_factory=RecordingAgent, serve_metrics=False)
    thread = threading.Thread(target=mode.run, daemon=True)
    thread.start()
    try:
        env.create(flowexporter("e2e-tls", "tls", collectors=[{
            "address": "127.0.0.1:4741", "transport": "tls",
            "tls": {"secretName": "collector-tls", "serverName": "collector.test"}}]))
        agent = wait_for(lambda: RecordingAgent.instances and RecordingAgent.instances[0], "the agent started")
        tls = agent.configs[0][1].collectors[0].tls
        assert Path(tls.ca_file).read_bytes() == ca
        assert (tls.cert_file, tls.key_file, tls.server_name) == (None, None, "collector.test")
        wait_for(lambda: (env.get("e2e-tls").get("status") or {}).get("nodesReady") == 1, "the node ready")
        # a Secret that does not exist, then one whose ca.crt is not PEM: the agent keeps its config, says why,
        # and the FlowExporter's status names the node and the reason
        for secret, reason in (("no-such-secret", "Secret 'no-such-secret' not found"),
                               ("collector-tls-not-pem", "collectors[0].tls.ca: Secret 'collector-tls-not-pem' key "
                                                         "'ca.crt' is not a PEM CA certificate (ssl: [X509: "
                                                         "NO_CERTIFICATE_OR_CRL_FOUND]")):
            env.apply(flowexporter("e2e-tls", "tls", collectors=[{
                "address": "127.0.0.1:4741", "transport": "tls", "tls": {"secretName": secret}}]))
            report = wait_for(lambda: (lambda r: r if reason in (r["configError"] or "") else None)(_report(env, node)),
                              f"the agent's configError naming {secret}")
            assert f"ConfigMap {NAMESPACE}/{configmap_name(node)} key config.yaml: " in report["configError"]
            assert len(agent.configs) == 1
            errors = wait_for(lambda: [e for e in (env.get("e2e-tls").get("status") or {}).get("nodeErrors") or []
                                       if e["reason"] == "AgentError" and reason in e["message"]],
                              "AgentError in the FlowExporter status")
            assert errors[0]["node"] == node and errors[0]["message"].startswith(f"node {node}: config ")
            assert env.condition("e2e-tls")["status"] == "False"
        # back to the good Secret: the error goes, the node is ready again
        env.apply(flowexporter("e2e-tls", "tls", collectors=[{
            "address": "127.0.0.1:4741", "transport": "tls",
            "tls": {"secretName": "collector-tls", "serverName": "collector.test"}}]))
        wait_for(lambda: _report(env, node)["configError"] is None, "the configError cleared")
        wait_for(lambda: (env.get("e2e-tls").get("status") or {}).get("nodesReady") == 1, "the node ready again")
    finally:
        env.delete("e2e-tls")
        mode.request_stop()
        thread.join(timeout=10)
        agent_api.close()
        cluster.nodes.remove(node)
        for secret in ("collector-tls", "collector-tls-not-pem"):
            with contextlib.suppress(ApiException):
                env.core.delete_namespaced_secret(secret, NAMESPACE)
