"""Operator and Kubernetes-mode agent metrics against a real API server, scraped by a real Prometheus.

The operator runs as a process (``python -m kipfix.operator``) with its
metrics on a free loopback port; Prometheus (Debian's package, the helper of
tests/test_prometheus_scrape.py) scrapes it every second and evaluates
deploy/prometheus/kipfix-alerts.yaml. The agents' reports are Leases written
by the test through the agent's own NodeReporter, so a FlowExporter becomes
Ready without BPF.

The agent side runs ``KubernetesMode`` (the code behind ``kipfix agent
--kubernetes``) with a stand-in for the BPF Agent and a ConfigMap written by
the test (the operator renders no ``metrics`` section, so the test's own
config picks the port).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import urllib.request

import pytest
import yaml
from kubernetes import client
from kubernetes.client.rest import ApiException
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from test_operator import GROUP, PLURAL, V4, VERSION, install_crds, wait_for
from test_prometheus_scrape import ALERTS, Prometheus, free_port, needs_prometheus

from kipfix.agent.contract import CONFIG_KEY, HASH_ANNOTATION, configmap_name
from kipfix.agent.kubeagent import KubernetesMode
from kipfix.agent.kube.report import NodeReporter

NAMESPACE = "kipfix-opm-e2e"
LABEL = "kipfix-opm-e2e/role"
EXPORTER = "e2e-metrics"
NODES = ("opm-a", "opm-b", "opm-c")

pytestmark = needs_prometheus


def flowexporter(templates=None) -> dict:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "FlowExporter", "metadata": {"name": EXPORTER},
            "spec": {"nodeSelector": {"matchLabels": {LABEL: "metrics"}},
                     "collectors": [{"address": "127.0.0.1:4739"}],
                     "templates": templates or [{"id": 256, "fields": list(V4)}],
                     "interfaces": {"host": {"names": ["eth0"]}}}}


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def stack(cluster, tmp_path_factory):
    """(admin ApiClient, Prometheus scraping the operator's metrics)."""
    workdir = tmp_path_factory.mktemp("operator-metrics")
    install_crds(cluster, NAMESPACE)
    api = cluster.api()
    health, metrics = free_port(), free_port()
    log_path = workdir / "operator.log"
    with open(log_path, "w") as log:
        operator = subprocess.Popen(
            [sys.executable, "-m", "kipfix.operator", "--namespace", NAMESPACE, "--standalone",
             "--liveness", f"http://127.0.0.1:{health}/healthz",
             "--metrics-address", "127.0.0.1", "--metrics-port", str(metrics)],
            env={**os.environ, "KUBECONFIG": str(cluster.kubeconfig)}, stdout=log, stderr=subprocess.STDOUT)
    prometheus = Prometheus(workdir, [f"127.0.0.1:{metrics}"], [ALERTS])
    config = yaml.safe_load((prometheus.dir / "prometheus.yml").read_text())
    config["scrape_configs"][0]["job_name"] = "kipfix-operator"
    (prometheus.dir / "prometheus.yml").write_text(yaml.safe_dump(config))

    def serving():
        assert operator.poll() is None, f"operator exited: {log_path.read_text()}"
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=1) as rsp:
                return rsp.status == 200
        return False

    try:
        wait_for(serving, "the operator's metrics endpoint")
        prometheus.start()
        wait_for(lambda: prometheus.value('up{job="kipfix-operator"}') == 1, "the operator scraped (up == 1)")
        yield api, prometheus
    finally:
        with contextlib.suppress(ApiException):
            client.CustomObjectsApi(api).delete_cluster_custom_object(GROUP, VERSION, PLURAL, EXPORTER)
        prometheus.stop()
        _stop(operator)
        print(log_path.read_text()[-10000:])
        cluster.kubectl("delete", "namespace", NAMESPACE, "--wait=false", check=False)
        api.close()


class Reports:
    """Agents' Leases for ``nodes``, renewed every few seconds, each reporting the config rendered for its node."""

    def __init__(self, api, nodes):
        self.core = client.CoreV1Api(api)
        self.reporters = [NodeReporter(api, node, NAMESPACE) for node in nodes]
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        while not self.stop.is_set():
            for reporter in self.reporters:
                with contextlib.suppress(ApiException):
                    cm = self.core.read_namespaced_config_map(configmap_name(reporter.node), NAMESPACE)
                    reporter.update(configHash=cm.metadata.annotations[HASH_ANNOTATION], configError=None)
                    reporter.publish()
            self.stop.wait(2)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *_):
        self.stop.set()
        self.thread.join(timeout=10)


def test_operator_metrics_follow_a_flowexporter(stack, cluster):
    api, prometheus = stack
    custom = client.CustomObjectsApi(api)
    where = f'flowexporter="{EXPORTER}"'
    for node in NODES:
        cluster.nodes.add(node, {LABEL: "metrics"})
    cluster.nodes.add("opm-other", {LABEL: "elsewhere"})
    try:
        # other FlowExporters of the session count too: compare with what was there before
        baseline = {r: prometheus.value(f'kipfix_operator_flowexporters{{ready="{r}"}}') for r in ("true", "false")}
        cluster.kubectl("apply", "-f", "-", input=json.dumps(flowexporter()))
        assert prometheus.settle(f"kipfix_operator_nodes_targeted{{{where}}}", len(NODES)) == len(NODES)
        assert prometheus.settle(f"kipfix_operator_nodes_configured{{{where}}}", len(NODES)) == len(NODES)
        assert prometheus.value(f"kipfix_operator_nodes_healthy{{{where}}}") == 0
        # the alert's expression matches targeted and healthy label for label
        assert prometheus.value(f"kipfix_operator_nodes_targeted{{{where}}} - kipfix_operator_nodes_healthy > 0"
                                ) == len(NODES)
        assert prometheus.value('kipfix_operator_flowexporters{ready="false"}') == baseline["false"] + 1

        with Reports(api, NODES):
            assert prometheus.settle(f"kipfix_operator_nodes_healthy{{{where}}}", len(NODES)) == len(NODES)
            assert prometheus.settle('kipfix_operator_flowexporters{ready="true"}',
                                     baseline["true"] + 1) == baseline["true"] + 1
            assert prometheus.value('kipfix_operator_flowexporters{ready="false"}') == baseline["false"]

            # an invalid spec the schema cannot see: Ready=False, a permanent error
            cluster.kubectl("apply", "-f", "-", input=json.dumps(flowexporter(
                templates=[{"id": 256, "fields": V4 + ["fooBar"]}])))
            assert prometheus.settle('kipfix_operator_flowexporters{ready="false"}',
                                     baseline["false"] + 1) == baseline["false"] + 1
            assert prometheus.value('kipfix_operator_flowexporters{ready="true"}') == baseline["true"]
            wait_for(lambda: (prometheus.value('kipfix_operator_reconcile_errors_total{kind="permanent"}') or 0) >= 1,
                     "a permanent reconcile error counted")
            # the previous spec stays in force: the nodes stay targeted and healthy
            assert prometheus.value(f"kipfix_operator_nodes_healthy{{{where}}}") == len(NODES)

        assert prometheus.value("kipfix_operator_reconciles_total") > 0
        assert prometheus.value("kipfix_operator_reconcile_duration_seconds_count") > 0
        assert prometheus.value('kipfix_operator_reconcile_errors_total{kind="temporary"}') is not None
        rules = [r for g in prometheus.api("rules")["groups"] for r in g["rules"] if r["name"] == "KipfixNodeNotReady"]
        assert [r["health"] for r in rules] == ["ok"]

        # deleted: its series go with the next reconciliation
        custom.delete_cluster_custom_object(GROUP, VERSION, PLURAL, EXPORTER)
        wait_for(lambda: not prometheus.query(f"{{__name__=~\"kipfix_operator_nodes_.*\",{where}}}"),
                 "the FlowExporter's series gone")
        assert prometheus.settle('kipfix_operator_flowexporters{ready="false"}',
                                 baseline["false"]) == baseline["false"]
    finally:
        for node in (*NODES, "opm-other"):
            cluster.nodes.remove(node)


class StandInAgent:
    """Stands in for the BPF Agent: what the metrics read (generation, state) and what
    KubernetesMode calls."""

    def __init__(self, config, keep_attached=False):
        self.config = config
        self.generation = 1
        self._stop = threading.Event()

    def offer(self, config, applied=None):
        self.config = config
        self.generation += 1
        if applied is not None:
            applied(None)

    def state(self):
        return {"interfaces": [], "errors": [], "lastExportTime": None, "exportedFlows": 0}

    def request_stop(self, *_):
        self._stop.set()

    def run(self):
        self._stop.wait()


def _scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as rsp:
        text = rsp.read().decode()
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples
            if not s.labels}


def test_agent_in_kubernetes_mode_serves_its_metrics(stack, cluster):
    api, _prometheus = stack
    core = client.CoreV1Api(api)
    node = "opm-agent"
    port = free_port()
    config = {"collectors": [{"address": "127.0.0.1:4739"}], "templates": [{"id": 256, "fields": list(V4)}],
              "metrics": {"address": "127.0.0.1", "port": port}}
    # written by the test, without the operator's labels: the operator leaves it alone
    configmap = {"metadata": {"name": configmap_name(node), "namespace": NAMESPACE},
                 "data": {CONFIG_KEY: yaml.safe_dump(config)}}
    core.create_namespaced_config_map(NAMESPACE, configmap)
    mode = KubernetesMode(node, NAMESPACE, api=api, agent_factory=StandInAgent, metrics_registry=CollectorRegistry())
    thread = threading.Thread(target=mode.run, daemon=True)
    thread.start()
    try:
        samples = wait_for(lambda: (lambda s: s if "kipfix_agent_config_generation" in s else None)(
            _scrape_or_empty(port)), "the agent's metrics endpoint")
        assert samples["kipfix_agent_config_generation"] == 1
        assert samples["kipfix_agent_reload_failures_total"] == 0

        config["collectors"] = [{"address": "127.0.0.1:4740"}]
        core.replace_namespaced_config_map(configmap_name(node), NAMESPACE,
                                           {**configmap, "data": {CONFIG_KEY: yaml.safe_dump(config)}})
        wait_for(lambda: _scrape(port)["kipfix_agent_config_generation"] == 2, "generation 2 after a new config")

        # a rejected config is a reload failure; the generation stays
        core.replace_namespaced_config_map(configmap_name(node), NAMESPACE, {
            **configmap, "data": {CONFIG_KEY: yaml.safe_dump({**config, "timeouts": {"idle": -1}})}})
        wait_for(lambda: _scrape(port)["kipfix_agent_reload_failures_total"] == 1, "the rejected config counted")
        assert _scrape(port)["kipfix_agent_config_generation"] == 2
    finally:
        mode.request_stop()
        thread.join(timeout=10)
        with contextlib.suppress(ApiException):
            core.delete_namespaced_config_map(configmap_name(node), NAMESPACE)


def _scrape_or_empty(port: int) -> dict[str, float]:
    try:
        return _scrape(port)
    except OSError:
        return {}
