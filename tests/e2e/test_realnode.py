"""kipfix on a real node: the chart's pods run from the built image, pod traffic is exported.

A real kubelet with containerd, runc and the CNI bridge (realnode.py) joins
the test control plane. The image built from the Dockerfile is imported
into its containerd; ``helm install`` (image pull policy Never) then runs
the operator Deployment and the agent DaemonSet as real pods on that node.
A FlowExporter selects the pods of two test namespaces; a pod in
kipfix-e2e-a pings a pod in kipfix-e2e-b (``kubectl exec``, so the API
server -> kubelet -> containerd streaming path is real too), and the test's
collector (``kipfix collect --json``, listening on the root netns end of
the node's veth) must receive flows naming both pods and their
namespaces, with exactly the packets and octets ping reports on each pod's
eth0, each way.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from realnode import RealNode, build_images, missing_prerequisites, reclaim_stale
from test_operator import wait_for

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "kipfix"
NAMESPACE = "kipfix-rn"
RELEASE = "kxrn"
NODE_LABEL = "kipfix-e2e/real-node"
TRAFFIC_LABEL = "kipfix-e2e/traffic"
NS_A, NS_B = "kipfix-e2e-a", "kipfix-e2e-b"
KIPFIX = str(Path(sys.executable).with_name("kipfix"))
PING_COUNT, PING_SIZE = 7, 1000        # IPv4 packet = SIZE + 8 (ICMP) + 20 (IP) octets
INGRESS, EGRESS = 0, 1                 # flowDirection
POD_FIELDS = ["sourcePodName", "sourcePodNamespace", "sourceNodeName", "sourceWorkloadName",
              "sourceWorkloadKind", "destinationPodName", "destinationPodNamespace", "destinationNodeName",
              "destinationWorkloadName", "destinationWorkloadKind"]
TEMPLATE = {"id": 256, "fields": ["flowStartMilliseconds", "flowEndMilliseconds", "sourceIPv4Address",
                                  "destinationIPv4Address", "protocolIdentifier", "octetDeltaCount",
                                  "packetDeltaCount", "flowDirection", *POD_FIELDS]}


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u, socket.socket() as t:
        for _ in range(50):
            u.bind((host, 0))
            port = u.getsockname()[1]
            try:
                t.bind((host, port))
                return port
            except OSError:
                u.close()
                u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    raise RuntimeError("no free port")


@pytest.fixture(scope="module")
def real_node(cluster):
    if not cluster.own:
        pytest.skip("the real node joins the session's own control plane (not an existing cluster)")
    missing = missing_prerequisites(cluster.controlplane.bin_dir)
    if missing:
        pytest.skip("real node prerequisites missing: " + "; ".join(missing)
                    + " (scripts/install.sh --test installs them)")
    for line in reclaim_stale():  # nodes of an earlier run that was killed outright
        print(f"reclaimed {line}")
    t0 = time.monotonic()
    images = build_images()
    built = time.monotonic() - t0
    node = RealNode(cluster.controlplane, images=images, labels={NODE_LABEL: "true"})
    with node:
        node.timings["images built"] = built
        yield node
    print(f"real node timings (s): {node.timings}")
    assert node.leftovers() == [], "the real node left things behind"


class Collector:
    """``kipfix collect --json`` as a process; records parsed from its output file."""

    def __init__(self, host: str, workdir: Path):
        self.port = _free_port(host)
        self.out = workdir / "collector.jsonl"
        self.err = workdir / "collector.err"
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.proc = subprocess.Popen([KIPFIX, "collect", "--listen", f"{host}:{self.port}", "--json"],
                                         stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        self.address = f"{host}:{self.port}"
        wait_for(lambda: "listening" in self.err.read_text(), "the collector to listen", timeout=30)

    def records(self) -> list[dict]:
        out = []
        for line in self.out.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                out.append(json.loads(line))
        return out

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def traffic_pod(name: str, namespace: str, image: str) -> dict:
    return {
        "metadata": {"name": name, "namespace": namespace, "labels": {"app": name}},
        "spec": {
            "nodeSelector": {NODE_LABEL: "true"},
            "terminationGracePeriodSeconds": 0,
            "containers": [{"name": "traffic", "image": image, "imagePullPolicy": "Never",
                            "command": ["sleep", "infinity"]}],
        },
    }


def pod_ready(cluster, namespace: str, selector: str) -> dict | None:
    pods = json.loads(cluster.kubectl("get", "pods", "-n", namespace, "-l", selector, "-o", "json").stdout)["items"]
    for pod in pods:
        conds = {c["type"]: c["status"] for c in pod.get("status", {}).get("conditions", [])}
        if pod["status"].get("phase") == "Running" and conds.get("Ready") == "True" \
                and not pod["metadata"].get("deletionTimestamp"):
            return pod
    return None


def describe(cluster, namespace: str) -> str:
    return (cluster.kubectl("get", "pods,events", "-n", namespace, "-o", "wide", check=False).stdout
            + cluster.kubectl("describe", "pods", "-n", namespace, check=False).stdout[-4000:])


@pytest.mark.root
@pytest.mark.slow
@pytest.mark.timeout(1800)  # a cold image build (debootstrap, pip) takes minutes
def test_realnode_chart_pods_export_pod_traffic(cluster, real_node, tmp_path):
    node = real_node
    kipfix_image = node.images["kipfix"][0]
    traffic_image = node.images["traffic"][0]
    repository, tag = kipfix_image.rsplit(":", 1)
    collector = Collector(node.host_side_ip, tmp_path)
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({
        "image": {"repository": repository, "tag": tag, "pullPolicy": "Never"},
        "operator": {"replicas": 1, "nodeSelector": {NODE_LABEL: "true"}},
        "agent": {
            "nodeSelector": {NODE_LABEL: "true"}, "logLevel": "debug",
            # the node's own bpffs, pod netns folder and agent state (realnode.py)
            "hostPaths": {"bpffs": str(node.bpffs), "netns": str(node.netns_dir),
                          "state": str(node.agent_state)},
        },
    }))
    try:
        # -- helm install: operator and agent run as real pods from the imported image -----
        t0 = time.monotonic()
        cluster.helm("install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--create-namespace",
                     "--values", str(values))
        for component in ("operator", "agent"):
            wait_for(lambda: pod_ready(cluster, NAMESPACE, f"app.kubernetes.io/component={component}"),
                     f"the {component} pod Running and Ready on {node.name}", timeout=180, interval=1)
        pods = json.loads(cluster.kubectl("get", "pods", "-n", NAMESPACE, "-o", "json").stdout)["items"]
        assert {p["spec"]["nodeName"] for p in pods} == {node.name}
        assert {c["image"] for p in pods for c in p["spec"]["containers"]} == {kipfix_image}
        node.timings["chart pods ready"] = time.monotonic() - t0

        # -- two traffic pods in two namespaces ----------------------------------------------
        for ns in (NS_A, NS_B):
            cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(
                {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns, "labels": {TRAFFIC_LABEL: "true"}}}))
        deployment = {
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "pinger", "namespace": NS_A},
            "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "pinger"}},
                     "template": traffic_pod("pinger", NS_A, traffic_image)},
        }
        del deployment["spec"]["template"]["metadata"]["name"], deployment["spec"]["template"]["metadata"]["namespace"]
        cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(deployment))
        cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(
            {"apiVersion": "v1", "kind": "Pod", **traffic_pod("target", NS_B, traffic_image)}))
        a = wait_for(lambda: pod_ready(cluster, NS_A, "app=pinger"), "the pinger pod", timeout=120, interval=1)
        b = wait_for(lambda: pod_ready(cluster, NS_B, "app=target"), "the target pod", timeout=120, interval=1)
        a_ip, b_ip = a["status"]["podIP"], b["status"]["podIP"]
        assert ipaddress.ip_address(a_ip) in ipaddress.ip_network(node.pod_subnet)

        # -- the FlowExporter: pods of the two namespaces, to the test's collector --------------
        fe = {
            "apiVersion": "kipfix.io/v1alpha1", "kind": "FlowExporter",
            "metadata": {"name": "pods"},
            "spec": {
                "nodeSelector": {"matchLabels": {NODE_LABEL: "true"}},
                "collectors": [{"address": collector.address, "transport": "udp"}],
                "templates": [TEMPLATE],
                "interfaces": {"pods": {"namespaceSelector": {"matchLabels": {TRAFFIC_LABEL: "true"}},
                                        "interfaces": ["eth0"]}},
                "timeouts": {"idle": 1, "active": 60},
            },
        }
        cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(fe))

        def node_ready_in_status():
            obj = json.loads(cluster.kubectl("get", "flowexporter", "pods", "-o", "json").stdout)
            return obj.get("status", {}).get("nodesReady", 0) >= 1 and obj["status"]
        with contextlib.suppress(AssertionError):  # asserted after the traffic
            wait_for(node_ready_in_status, "the FlowExporter to report the real node ready", timeout=90, interval=1)

        def attached():  # the agent says it metered both pods' eth0
            log = cluster.kubectl("logs", "-n", NAMESPACE, "-l", "app.kubernetes.io/component=agent",
                                  "--tail", "-1", check=False).stdout
            return all(f"pod {label}: network namespace" in log
                       for label in (f"{NS_A}/{a['metadata']['name']}", f"{NS_B}/target")) and log
        with contextlib.suppress(AssertionError):  # only a log line: the flows below are the proof
            wait_for(attached, "the agent to attach to both pods", timeout=60, interval=1)
        time.sleep(2)

        # -- traffic: ping from pod A to pod B, through kubectl exec --------------------------------
        ping = cluster.kubectl("exec", "-n", NS_A, a["metadata"]["name"], "--", "ping", "-n", "-q",
                               "-c", str(PING_COUNT), "-s", str(PING_SIZE), "-i", "0.2", "-W", "2", b_ip)
        m = re.search(r"(\d+) packets transmitted, (\d+) received", ping.stdout)
        assert m, ping.stdout
        sent, received = int(m.group(1)), int(m.group(2))
        assert sent == received == PING_COUNT, ping.stdout
        octets = PING_SIZE + 28

        want = {  # (source, destination, direction): where it is metered
            (a_ip, b_ip, EGRESS): sent,      # leaves pod A's eth0
            (a_ip, b_ip, INGRESS): sent,     # enters pod B's eth0
            (b_ip, a_ip, EGRESS): received,  # the replies leave pod B's eth0
            (b_ip, a_ip, INGRESS): received,  # and enter pod A's eth0
        }

        def totals() -> dict:
            got: dict = {}
            for rec in collector.records():
                f = rec["fields"]
                if f.get("protocolIdentifier") != 1:
                    continue
                key = (f.get("sourceIPv4Address"), f.get("destinationIPv4Address"), f.get("flowDirection"))
                if key in want:
                    packets, octs = got.get(key, (0, 0))
                    got[key] = (packets + f["packetDeltaCount"], octs + f["octetDeltaCount"])
            return got

        def all_in():
            got = totals()
            return got if all(got.get(k, (0, 0))[0] >= n for k, n in want.items()) else None
        try:
            wait_for(all_in, "the ping's flows at the collector", timeout=60, interval=1)
        except AssertionError:
            raise AssertionError(
                f"flows at the collector: {totals()}, want {want}; last records: "
                f"{collector.records()[-6:]}\nagent log:\n"
                + cluster.kubectl("logs", "-n", NAMESPACE, "-l", "app.kubernetes.io/component=agent",
                                  "--tail", "60", check=False).stdout) from None
        time.sleep(3)  # nothing more may arrive
        got = totals()
        assert got == {k: (n, n * octets) for k, n in want.items()}, f"packets/octets {got}, ping sent {sent}"
        print(f"ping {sent}x{PING_SIZE} B {a_ip} -> {b_ip}: (src, dst, direction) -> (packets, octets) {got}")

        # -- pod metadata on every record of the pair ------------------------------------------------
        pods_by_ip = {a_ip: (a["metadata"]["name"], NS_A, "pinger", "Deployment"),
                      b_ip: ("target", NS_B, "", "")}
        for rec in collector.records():
            f = rec["fields"]
            key = (f.get("sourceIPv4Address"), f.get("destinationIPv4Address"), f.get("flowDirection"))
            if f.get("protocolIdentifier") != 1 or key not in want:
                continue
            for side, ip in (("source", key[0]), ("destination", key[1])):
                name, ns, workload, kind = pods_by_ip[ip]
                assert (f[f"{side}PodName"], f[f"{side}PodNamespace"], f[f"{side}NodeName"],
                        f[f"{side}WorkloadName"], f[f"{side}WorkloadKind"]) == (name, ns, node.name, workload, kind), f

        # -- the agent reported the node ready with this configuration -------------------------------
        wait_for(node_ready_in_status, "the FlowExporter to report the real node ready", timeout=30, interval=1)
    except BaseException:
        for ns in (NAMESPACE, NS_A, NS_B):
            print(f"--- {ns}\n{describe(cluster, ns)}")
        print("--- agent log\n" + cluster.kubectl("logs", "-n", NAMESPACE, "-l", "app.kubernetes.io/component=agent",
                                                 "--tail", "80", check=False).stdout)
        print("--- operator log\n" + cluster.kubectl("logs", "-n", NAMESPACE, "-l", "app.kubernetes.io/component=operator",
                                                    "--tail", "40", check=False).stdout)
        print("--- kubelet log\n" + node.log_tail("kubelet", 40))
        print("--- collector stderr\n" + collector.err.read_text()[-2000:])
        raise
    finally:
        collector.stop()
        cluster.kubectl("delete", "flowexporter", "pods", "--ignore-not-found", "--wait=true", "--timeout=60s", check=False)
        cluster.helm("uninstall", RELEASE, "--namespace", NAMESPACE, "--wait", "--timeout", "120s", check=False)
        cluster.kubectl("delete", "clusterkopfpeering", "kipfix", "--ignore-not-found", check=False)
        for ns in (NS_A, NS_B, NAMESPACE):
            cluster.kubectl("delete", "namespace", ns, "--ignore-not-found", "--wait=true", "--timeout=120s",
                            check=False)


@pytest.mark.root
def test_realnode_failed_start_leaves_nothing(cluster, tmp_path):
    """A node whose start fails (here: an image archive that does not exist) undoes everything."""
    if not cluster.own:
        pytest.skip("the real node joins the session's own control plane (not an existing cluster)")
    missing = missing_prerequisites(cluster.controlplane.bin_dir)
    if missing:
        pytest.skip("real node prerequisites missing: " + "; ".join(missing))
    node = RealNode(cluster.controlplane, images={"broken": ("localhost/none:1", tmp_path / "missing.tar")})
    with pytest.raises(Exception, match="missing.tar"):
        with node:
            pass
    assert node.dir is not None and node.leftovers() == []
