"""The Helm chart (deploy/helm/kipfix): lint, render with the default and every
ci/*-values.yaml, and check what Kubernetes would get: the agent's capabilities,
host paths and propagation, tolerations, replicas, RBAC equal to what the code
calls (kipfix.operator.rbac), the CRDs identical to crds/, the commands parsed
by kipfix's own CLI, and the schema rejecting bad values.

Needs the helm binary: tests/e2e/build-tools.sh builds it into
~/.cache/kipfix-e2e/bin (or have helm on PATH).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "deploy/helm/kipfix"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
NAMESPACE = "kipfix-system"
KUBE_VERSION = "1.33.0"  # helm built from its module defaults to an old one


def find_helm() -> str:
    cache = Path(os.environ.get("KIPFIX_E2E_CACHE", Path.home() / ".cache/kipfix-e2e")) / "bin/helm"
    if cache.is_file() and os.access(cache, os.X_OK):
        return str(cache)
    on_path = shutil.which("helm")
    if on_path:
        return on_path
    pytest.fail(f"no helm binary at {cache} or on PATH: run `bash tests/e2e/build-tools.sh` "
                "(builds helm from its Go module into ~/.cache/kipfix-e2e/bin)")


@pytest.fixture(scope="module")
def helm() -> str:
    return find_helm()


def run_helm(helm: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([helm, *args], capture_output=True, text=True)
    if check:
        assert result.returncode == 0, f"helm {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result


def render(helm: str, *values_files: Path, sets: tuple[str, ...] = (), check: bool = True):
    args = ["template", "kx", str(CHART), "--namespace", NAMESPACE, "--kube-version", KUBE_VERSION]
    for path in values_files:
        args += ["--values", str(path)]
    for item in sets:
        args += ["--set", item]
    result = run_helm(helm, *args, check=check)
    if not check:
        return result
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def one(docs, kind: str, component: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (
        component is None or d["metadata"]["labels"].get("app.kubernetes.io/component") == component)]
    assert len(found) == 1, f"{len(found)} {kind} objects for {component}"
    return found[0]


@pytest.fixture(scope="module")
def default_docs(helm):
    return render(helm)


# ---- lint and render ---------------------------------------------------------------

@pytest.mark.parametrize("values", [None, *CI_VALUES], ids=lambda p: p.name if p else "defaults")
def test_lint_is_clean(helm, values):
    args = ["lint", str(CHART), "--strict", "--namespace", NAMESPACE]
    if values:
        args += ["--values", str(values)]
    result = run_helm(helm, *args)
    assert "0 chart(s) failed" in result.stdout
    assert "[WARNING]" not in result.stdout and "[ERROR]" not in result.stdout, result.stdout


@pytest.mark.parametrize("values", CI_VALUES, ids=lambda p: p.name)
def test_every_ci_scenario_renders_the_workloads(helm, values):
    docs = render(helm, values)
    kinds = [d["kind"] for d in docs]
    assert kinds.count("DaemonSet") == 1 and kinds.count("Deployment") == 1
    for doc in docs:
        assert doc["metadata"]["name"] and len(doc["metadata"]["name"]) <= 63
        if doc["kind"] not in ("ClusterRole", "ClusterRoleBinding"):
            assert doc["metadata"]["namespace"] == NAMESPACE, doc["metadata"]


def test_ci_scenarios_cover_the_chart():
    names = {p.name for p in CI_VALUES}
    assert {"default-values.yaml", "privileged-values.yaml", "monitoring-values.yaml",
            "custom-values.yaml"} <= names


# ---- the agent DaemonSet -----------------------------------------------------------

def agent_pod(docs) -> dict:
    return one(docs, "DaemonSet", "agent")["spec"]["template"]["spec"]


def test_agent_uses_capabilities_not_privileged(default_docs):
    container = agent_pod(default_docs)["containers"][0]
    sc = container["securityContext"]
    assert sc["privileged"] is False
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert sorted(sc["capabilities"]["add"]) == ["BPF", "NET_ADMIN", "PERFMON", "SYS_ADMIN"]
    assert sc["readOnlyRootFilesystem"] is True
    # each added capability says why in the template
    template = (CHART / "templates/agent-daemonset.yaml").read_text()
    for cap in ("BPF:", "PERFMON:", "NET_ADMIN:", "SYS_ADMIN:"):
        assert f"#   {cap}" in template


def test_privileged_value_makes_the_agent_privileged(helm):
    pod = agent_pod(render(helm, sets=("agent.privileged=true",)))
    sc = pod["containers"][0]["securityContext"]
    assert sc["privileged"] is True and "capabilities" not in sc
    mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
    # Kubernetes allows Bidirectional only in privileged containers
    assert mounts["bpffs"]["mountPropagation"] == "Bidirectional"


def test_agent_host_network_paths_and_propagation(default_docs):
    pod = agent_pod(default_docs)
    assert pod["hostNetwork"] is True
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert pod["hostPID"] is True  # pod netns found through /proc/PID/ns/net, whatever the runtime
    volumes = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    assert volumes == {"bpffs": "/sys/fs/bpf", "modules": "/lib/modules", "headers": "/usr/src",
                       "netns": "/var/run/netns", "state": "/run/kipfix"}
    mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
    # same paths as on the node, so /lib/modules/<release>/build -> /usr/src/... resolves
    for name in ("bpffs", "modules", "headers", "netns", "state"):
        assert mounts[name]["mountPath"] == volumes[name]
    assert mounts["modules"]["readOnly"] is True and mounts["headers"]["readOnly"] is True
    assert mounts["netns"]["mountPropagation"] == "HostToContainer"
    assert mounts["bpffs"]["mountPropagation"] == "HostToContainer"   # Bidirectional needs privileged
    assert not mounts["bpffs"].get("readOnly") and not mounts["state"].get("readOnly")
    assert mounts["tmp"]["mountPath"] == "/tmp"  # the root filesystem is read-only


def test_agent_runs_on_every_node_and_knows_its_node(default_docs):
    pod = agent_pod(default_docs)
    assert pod["tolerations"] == [{"operator": "Exists"}]
    assert pod["priorityClassName"] == "system-node-critical"
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    ports = pod["containers"][0]["ports"]
    assert ports == [{"name": "metrics", "containerPort": 9469, "protocol": "TCP"}]


def test_custom_tolerations_replace_the_default(helm):
    pod = agent_pod(render(helm, CHART / "ci/custom-values.yaml"))
    assert pod["tolerations"] == [{"key": "node-role.kubernetes.io/control-plane", "operator": "Exists",
                                   "effect": "NoSchedule"}]
    # maps merge with the defaults (Helm), lists replace them
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux", "kipfix.io/export": "true"}
    assert pod["containers"][0]["image"].startswith("registry.example.com/net/kipfix@sha256:")


# ---- the operator Deployment -----------------------------------------------------

def test_operator_replicas_probes_and_peering(default_docs):
    deployment = one(default_docs, "Deployment", "operator")
    assert deployment["spec"]["replicas"] == 2
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert "--peering=kipfix" in container["args"]
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert {"name": "health", "containerPort": 8080, "protocol": "TCP"} in container["ports"]
    assert "--liveness=http://0.0.0.0:8080/healthz" in container["args"]
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    anti = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert anti[0]["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"


@pytest.mark.parametrize("values", [None, *CI_VALUES], ids=lambda p: p.name if p else "defaults")
def test_container_commands_parse_with_kipfix_cli(helm, values):
    """The chart's command lines are accepted by the CLI in the image."""
    from kipfix.agent.cli import build_parser

    docs = render(helm, *([values] if values else []))
    for kind, component in (("DaemonSet", "agent"), ("Deployment", "operator")):
        container = one(docs, kind, component)["spec"]["template"]["spec"]["containers"][0]
        assert container["command"] == ["kipfix"]
        args = build_parser().parse_args(container["args"])
        assert args.command == component
    agent_args = build_parser().parse_args(agent_pod(docs)["containers"][0]["args"])
    assert agent_args.kubernetes is True


# ---- RBAC ------------------------------------------------------------------------------

def triples(rules) -> set[tuple[str, str, str]]:
    """(apiGroup, resource, verb) for every combination a rule grants."""
    out = set()
    for rule in rules:
        assert set(rule) - {"scope"} <= {"apiGroups", "resources", "verbs", "resourceNames"}, rule
        assert "resourceNames" not in rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    out.add((group, resource, verb))
    return out


def granted(docs, service_account: str) -> dict[str, set]:
    """What a ServiceAccount gets, by scope, through the chart's bindings."""
    roles = {(d["kind"], d["metadata"]["name"]): d for d in docs if d["kind"] in ("Role", "ClusterRole")}
    out = {"cluster": set(), "namespace": set()}
    for binding in docs:
        if binding["kind"] not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        if not any(s["kind"] == "ServiceAccount" and s["name"] == service_account
                   and s["namespace"] == NAMESPACE for s in binding["subjects"]):
            continue
        role = roles[(binding["roleRef"]["kind"], binding["roleRef"]["name"])]
        scope = "cluster" if binding["kind"] == "ClusterRoleBinding" else "namespace"
        if scope == "namespace":
            assert binding["metadata"]["namespace"] == NAMESPACE
        out[scope] |= triples(role["rules"])
    return out


def expected(rules) -> dict[str, set]:
    return {scope: triples([r for r in rules if r["scope"] == scope]) for scope in ("cluster", "namespace")}


def test_rbac_grants_exactly_what_the_code_calls(default_docs):
    from kipfix.operator.rbac import AGENT_RULES, OPERATOR_RULES

    operator_sa = one(default_docs, "ServiceAccount", "operator")["metadata"]["name"]
    agent_sa = one(default_docs, "ServiceAccount", "agent")["metadata"]["name"]
    assert granted(default_docs, operator_sa) == expected(OPERATOR_RULES)
    assert granted(default_docs, agent_sa) == expected(AGENT_RULES)
    pods = {c: one(default_docs, k, c)["spec"]["template"]["spec"]["serviceAccountName"]
            for k, c in (("Deployment", "operator"), ("DaemonSet", "agent"))}
    assert pods == {"operator": operator_sa, "agent": agent_sa}
    # nothing else is granted to anyone: no wildcards, no extra roles
    for doc in default_docs:
        if doc["kind"] in ("Role", "ClusterRole"):
            for rule in doc["rules"]:
                assert "*" not in rule["verbs"] and "*" not in rule["resources"], rule


def test_rbac_follows_existing_service_accounts(helm):
    from kipfix.operator.rbac import AGENT_RULES, OPERATOR_RULES

    docs = render(helm, CHART / "ci/custom-values.yaml")
    assert not [d for d in docs if d["kind"] == "ServiceAccount"]
    assert granted(docs, "flows-operator-existing") == expected(OPERATOR_RULES)
    assert granted(docs, "flows-agent-existing") == expected(AGENT_RULES)


def test_rbac_off(helm):
    docs = render(helm, sets=("rbac.create=false",))
    assert not [d for d in docs if "Role" in d["kind"]]


# ---- files copied from elsewhere in the repository ---------------------------------------

def test_chart_copies_are_in_sync_with_their_sources():
    """crds/ (byte for byte), the alert rules and rbac.py's rules."""
    result = subprocess.run([sys.executable, str(REPO / "deploy/helm/sync.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, (result.stdout + result.stderr +
                                    "\nrun: .venv/bin/python deploy/helm/sync.py")


def test_chart_crds_are_identical_to_crds_dir():
    sources = sorted(p.name for p in (REPO / "crds").glob("*.yaml"))
    assert "flowexporter.yaml" in sources
    assert sorted(p.name for p in (CHART / "crds").iterdir()) == sources
    for name in sources:
        assert (CHART / "crds" / name).read_bytes() == (REPO / "crds" / name).read_bytes(), name


# ---- Services and Prometheus ------------------------------------------------------------

def test_metrics_services_and_scrape_annotations(default_docs):
    service = one(default_docs, "Service", "agent")
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["ports"] == [{"name": "metrics", "port": 9469, "targetPort": "metrics",
                                         "protocol": "TCP"}]
    assert service["metadata"]["annotations"] == {"prometheus.io/scrape": "true", "prometheus.io/port": "9469",
                                                  "prometheus.io/path": "/metrics"}
    selector = service["spec"]["selector"]
    labels = one(default_docs, "DaemonSet", "agent")["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= labels.items()
    # the operator serves its metrics by default (the KipfixNodeNotReady alert needs them)
    service = one(default_docs, "Service", "operator")
    assert service["spec"]["ports"] == [{"name": "metrics", "port": 9470, "targetPort": "metrics",
                                         "protocol": "TCP"}]
    assert service["metadata"]["annotations"]["prometheus.io/port"] == "9470"
    container = one(default_docs, "Deployment", "operator")["spec"]["template"]["spec"]["containers"][0]
    assert "--metrics-port=9470" in container["args"]
    assert {"name": "metrics", "containerPort": 9470, "protocol": "TCP"} in container["ports"]
    assert not [d for d in default_docs if d["kind"] in ("ServiceMonitor", "PrometheusRule")]


def test_operator_metrics_off_and_servicemonitors(helm):
    docs = render(helm, sets=("serviceMonitor.enabled=true",))
    assert {m["metadata"]["labels"]["app.kubernetes.io/component"]
            for m in docs if m["kind"] == "ServiceMonitor"} == {"agent", "operator"}
    docs = render(helm, sets=("operator.metrics.enabled=false", "serviceMonitor.enabled=true"))
    assert not [d for d in docs if d["kind"] == "Service"
                and d["metadata"]["labels"]["app.kubernetes.io/component"] == "operator"]
    container = one(docs, "Deployment", "operator")["spec"]["template"]["spec"]["containers"][0]
    assert "--metrics-port=0" in container["args"]
    assert [p["name"] for p in container["ports"]] == ["health"]
    assert {m["metadata"]["labels"]["app.kubernetes.io/component"]
            for m in docs if m["kind"] == "ServiceMonitor"} == {"agent"}


def test_servicemonitor_and_prometheusrule(helm):
    docs = render(helm, CHART / "ci/monitoring-values.yaml")
    monitor = one(docs, "ServiceMonitor", "agent")
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert monitor["spec"]["endpoints"][0]["interval"] == "30s"
    assert "annotations" not in one(docs, "Service", "agent")["metadata"]
    rule = one(docs, "PrometheusRule")
    source = yaml.safe_load((REPO / "deploy/prometheus/kipfix-alerts.yaml").read_text())
    assert rule["spec"]["groups"] == source["groups"]


# ---- values.schema.json --------------------------------------------------------------------

@pytest.mark.parametrize("bad, message", [
    ("agent.capabilities={BPF,CHOWN}", "agent.capabilities.1"),
    ("image.pullPolicy=Sometimes", "image.pullPolicy"),
    ("operator.logLevel=verbose", "operator.logLevel"),
    ("agent.metricsPort=70000", "agent.metricsPort"),
    ("agent.hostPaths.bpffs=relative/path", "agent.hostPaths.bpffs"),
    ("agent.privileged=yes", "agent.privileged"),
    ("agent.nosuchkey=1", "nosuchkey"),
    ("image.digest=latest", "image.digest"),
    ("operator.standalone=true", "operator.replicas"),
    ("agent.metrics.address=eth0", "agent.metrics.address"),
    ("agent.metrics.tls.secretName=Not_A_Name", "agent.metrics.tls.secretName"),
    ("agent.metrics.basicAuth.user=x", "agent.metrics.basicAuth"),
])
def test_schema_rejects_bad_values(helm, bad, message):
    result = render(helm, sets=(bad,), check=False)
    assert result.returncode != 0, f"--set {bad} was accepted"
    assert "values don't meet the specifications of the schema" in result.stderr, result.stderr
    # helm < 3.18 names the value a.b.1, later versions /a/b/1
    assert message in result.stderr or "/" + message.replace(".", "/") in result.stderr, result.stderr


def test_schema_requires_the_top_level_sections(helm, tmp_path):
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert {"image", "operator", "agent", "rbac"} <= set(schema["required"])
    # a values file cannot drop a required key: null deletes it, and the schema says so
    result = render(helm, sets=("agent.hostPaths.netns=null",), check=False)
    assert result.returncode != 0 and "netns" in result.stderr, result.stderr


# values whose content is a Kubernetes object, documented by Kubernetes: their
# inner keys need no comment of their own
KUBERNETES_OBJECTS = {"resources", "podSecurityContext", "securityContext", "seccompProfile",
                      "updateStrategy", "nodeSelector", "tolerations", "affinity"}


def test_values_are_commented_key_by_key():
    """Every key of values.yaml has a comment line right above it (node-exporter style)."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    uncommented, path = [], []   # path: (indent, key) of the enclosing keys
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or stripped.startswith("-") or ":" not in stripped:
            continue
        indent = len(line) - len(line.lstrip())
        while path and path[-1][0] >= indent:
            path.pop()
        key = stripped.split(":", 1)[0]
        inside_object = any(k in KUBERNETES_OBJECTS for _, k in path)
        path.append((indent, key))
        if inside_object or stripped == "{}":
            continue
        if not lines[i - 1].strip().startswith("#"):
            uncommented.append(f"values.yaml:{i + 1}: {'.'.join(k for _, k in path)}")
    assert not uncommented, "keys without a comment:\n" + "\n".join(uncommented)


# ---- agent metrics: HTTPS, client certificates, basic authentication -------------------------

def test_agent_metrics_tls_and_basic_auth(helm, tmp_path):
    """The rendered --metrics-config names exactly the files the Secrets are mounted as, and the agent's
    own loader accepts it once those files exist."""
    from kipfix.agent.config import load_metrics_config

    docs = render(helm, CHART / "ci/secure-metrics-values.yaml")
    pod = agent_pod(docs)
    container = pod["containers"][0]
    assert "--metrics-config=/etc/kipfix/metrics/metrics.yaml" in container["args"]
    config_map = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-metrics"))
    settings = yaml.safe_load(config_map["data"]["metrics.yaml"])["metrics"]
    assert settings == {"address": "0.0.0.0", "port": 9469,
                        "tls": {"cert": "/etc/kipfix/metrics/tls/tls.crt", "key": "/etc/kipfix/metrics/tls/tls.key",
                                "clientCA": "/etc/kipfix/metrics/client-ca/ca.crt"},
                        "basicAuth": {"usernameFile": "/etc/kipfix/metrics/auth/username",
                                      "passwordFile": "/etc/kipfix/metrics/auth/password"}}
    # every file the settings name is a key of a Secret mounted at that path, read-only, 0400
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounted = {}
    for name, volume in volumes.items():
        if "secret" in volume:
            assert volume["secret"]["defaultMode"] == 0o400
            for item in volume["secret"]["items"]:
                mounted[f"{mounts[name]}/{item['path']}"] = (volume["secret"]["secretName"], item["key"])
    named = [settings["tls"]["cert"], settings["tls"]["key"], settings["tls"]["clientCA"],
             *settings["basicAuth"].values()]
    assert {path: mounted[path] for path in named} == {
        "/etc/kipfix/metrics/tls/tls.crt": ("kipfix-metrics-tls", "tls.crt"),
        "/etc/kipfix/metrics/tls/tls.key": ("kipfix-metrics-tls", "tls.key"),
        "/etc/kipfix/metrics/client-ca/ca.crt": ("kipfix-metrics-clients", "ca.crt"),
        "/etc/kipfix/metrics/auth/username": ("kipfix-metrics-auth", "username"),
        "/etc/kipfix/metrics/auth/password": ("kipfix-metrics-auth", "password")}
    assert volumes["metrics-config"]["configMap"]["name"] == config_map["metadata"]["name"]
    # the agent's own loader takes the rendered file (files stand in for the mounted Secrets)
    text = config_map["data"]["metrics.yaml"].replace("/etc/kipfix/metrics", str(tmp_path))
    for path in named:
        target = tmp_path / Path(path).relative_to("/etc/kipfix/metrics")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("x\n")
    (tmp_path / "metrics.yaml").write_text(text)
    loaded = load_metrics_config(str(tmp_path / "metrics.yaml"))
    assert (loaded.port, loaded.tls.client_ca, loaded.basic_auth.password_file) == (
        9469, str(tmp_path / "client-ca/ca.crt"), str(tmp_path / "auth/password"))
    # the ServiceMonitor scrapes with https, the client certificate and the same credentials
    endpoint = one(docs, "ServiceMonitor", "agent")["spec"]["endpoints"][0]
    assert endpoint["scheme"] == "https"
    assert endpoint["tlsConfig"]["keySecret"] == {"name": "kipfix-prometheus-client", "key": "tls.key"}
    assert endpoint["basicAuth"] == {"username": {"name": "kipfix-metrics-auth", "key": "username"},
                                     "password": {"name": "kipfix-metrics-auth", "key": "password"}}


def test_agent_metrics_plain_by_default(default_docs):
    container = agent_pod(default_docs)["containers"][0]
    assert not [a for a in container["args"] if a.startswith("--metrics-config")]
    assert not [d for d in default_docs if d["kind"] == "ConfigMap"]
