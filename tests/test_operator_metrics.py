"""Operator metrics (kipfix_operator_*) with a private registry: every metric and label.

The Reconciler runs against an in-memory stand-in of the API (FlowExporters,
Nodes, ConfigMaps, agent Leases), so the gauges come from a real
reconciliation; the handlers' error counting is driven through
handlers._reconcile and flowexporter_changed.
"""

from __future__ import annotations

import datetime as dt
import json
from types import SimpleNamespace

import kopf
import pytest
from kubernetes.client.rest import ApiException
from prometheus_client import CollectorRegistry
from urllib3.exceptions import ProtocolError

from kipfix.agent.contract import HASH_ANNOTATION, NODE_ANNOTATION, REPORT_ANNOTATION
from kipfix.operator import handlers
from kipfix.operator.metrics import OperatorMetrics, ready_value
from kipfix.operator.reconcile import Reconciler

V4 = ["flowStartMilliseconds", "flowEndMilliseconds", "sourceIPv4Address", "destinationIPv4Address",
      "octetDeltaCount", "packetDeltaCount"]


def exporter(name: str, role: str, created: str = "2026-01-01T00:00:00Z", **spec) -> dict:
    base = {"nodeSelector": {"matchLabels": {"role": role}}, "collectors": [{"address": "127.0.0.1:4739"}],
            "templates": [{"id": 256, "fields": list(V4)}], "interfaces": {"host": {"names": ["eth0"]}}}
    base.update(spec)
    return {"apiVersion": "kipfix.io/v1alpha1", "kind": "FlowExporter",
            "metadata": {"name": name, "uid": f"uid-{name}", "generation": 1,
                         "creationTimestamp": created}, "spec": base}


class FakeCluster:
    """Just the calls Reconciler makes, kept in dicts."""

    def __init__(self):
        self.exporters: dict[str, dict] = {}
        self.nodes: dict[str, dict] = {}
        self.configmaps: dict[str, dict] = {}
        self.leases: list[dict] = []
        self.fail: Exception | None = None

    # ApiClient
    def sanitize_for_serialization(self, obj):
        return obj

    # CustomObjectsApi
    def list_cluster_custom_object(self, *_):
        if self.fail is not None:
            raise self.fail
        return {"items": [json.loads(json.dumps(b)) for b in self.exporters.values()]}

    def patch_cluster_custom_object(self, *_):
        pass

    def patch_cluster_custom_object_status(self, *_):
        pass

    # CoreV1Api
    def list_node(self):
        return SimpleNamespace(items=[SimpleNamespace(metadata=SimpleNamespace(name=n, labels=labels))
                                      for n, labels in self.nodes.items()])

    def list_namespaced_config_map(self, *_args, **_kw):
        return SimpleNamespace(items=[SimpleNamespace(
            data=cm["data"], metadata=SimpleNamespace(
                name=cm["metadata"]["name"], annotations=cm["metadata"]["annotations"],
                labels=cm["metadata"]["labels"], resource_version="1",
                owner_references=[SimpleNamespace(**r) for r in cm["metadata"]["ownerReferences"]]))
            for cm in self.configmaps.values()])

    def create_namespaced_config_map(self, _namespace, body):
        self.configmaps[body["metadata"]["name"]] = body

    def replace_namespaced_config_map(self, name, _namespace, body):
        self.configmaps[name] = body

    def delete_namespaced_config_map(self, name, _namespace):
        self.configmaps.pop(name, None)

    # CoordinationV1Api
    def list_namespaced_lease(self, *_args, **_kw):
        return SimpleNamespace(items=self.leases)

    def report_applied(self, node: str) -> None:
        """The node's agent reports the config the operator rendered for it."""
        digest = next(cm["metadata"]["annotations"][HASH_ANNOTATION] for cm in self.configmaps.values()
                      if cm["metadata"]["annotations"][NODE_ANNOTATION] == node)
        now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        self.leases.append({"metadata": {"annotations": {REPORT_ANNOTATION: json.dumps(
                                {"configHash": digest, "configError": None, "errors": []})}},
                            "spec": {"holderIdentity": node, "renewTime": now, "leaseDurationSeconds": 30}})


@pytest.fixture
def setup():
    cluster = FakeCluster()
    reconciler = Reconciler("kipfix", api=cluster)
    reconciler.core = reconciler.custom = reconciler.coordination = cluster
    registry = CollectorRegistry()
    reconciler.metrics = OperatorMetrics(registry, lambda: reconciler.last_statuses)
    handlers.configure(reconciler)
    yield cluster, reconciler, registry
    handlers.configure(None)


def value(registry, name, **labels):
    return registry.get_sample_value(f"kipfix_operator_{name}", labels)


def test_nodes_targeted_configured_healthy_and_ready_per_flowexporter(setup):
    cluster, reconciler, registry = setup
    # before the first reconciliation: no FlowExporter series, the Ready counts are 0
    assert [value(registry, "flowexporters", ready=r) for r in ("true", "false", "unknown")] == [0, 0, 0]
    assert value(registry, "nodes_targeted", flowexporter="edge") is None

    cluster.nodes = {"n1": {"role": "edge"}, "n2": {"role": "edge"}, "n3": {"role": "core"}}
    cluster.exporters = {"edge": exporter("edge", "edge"), "core": exporter("core", "core"),
                                          # newer, same template id, other fields: refused on the nodes it shares with "edge"
                         "clash": exporter("clash", "edge", created="2026-01-02T00:00:00Z",
                                           templates=[{"id": 256, "fields": ["octetDeltaCount"]}])}
    reconciler.reconcile()
    for name, targeted in (("edge", 2), ("core", 1), ("clash", 2)):
        assert value(registry, "nodes_targeted", flowexporter=name) == targeted
        assert value(registry, "nodes_healthy", flowexporter=name) == 0
    assert value(registry, "nodes_configured", flowexporter="edge") == 2
    assert value(registry, "nodes_configured", flowexporter="core") == 1
    assert value(registry, "nodes_configured", flowexporter="clash") == 0
    assert value(registry, "flowexporters", ready="false") == 3  # no agent has reported yet
    assert value(registry, "flowexporters", ready="true") == 0

    for node in ("n1", "n2", "n3"):
        cluster.report_applied(node)
    reconciler.reconcile()
    assert value(registry, "nodes_healthy", flowexporter="edge") == 2
    assert value(registry, "nodes_healthy", flowexporter="core") == 1
    assert value(registry, "nodes_healthy", flowexporter="clash") == 0
    assert value(registry, "flowexporters", ready="true") == 2
    assert value(registry, "flowexporters", ready="false") == 1

    # the series of a deleted FlowExporter disappear with the next reconciliation
    del cluster.exporters["clash"]
    reconciler.reconcile()
    for metric in ("nodes_targeted", "nodes_configured", "nodes_healthy"):
        assert value(registry, metric, flowexporter="clash") is None
    assert value(registry, "flowexporters", ready="false") == 0
    assert value(registry, "flowexporters", ready="true") == 2


def test_ready_value_is_unknown_without_a_ready_condition():
    assert ready_value({}) == "unknown"
    assert ready_value({"conditions": [{"type": "Degraded", "status": "True"}]}) == "unknown"
    assert ready_value({"conditions": [{"type": "Ready", "status": "Unknown"}]}) == "unknown"
    assert ready_value({"conditions": [{"type": "Ready", "status": "True"}]}) == "true"
    registry = CollectorRegistry()
    OperatorMetrics(registry, lambda: {"a": {"nodesTargeted": 3}, "b": {"conditions": []}})
    assert value(registry, "flowexporters", ready="unknown") == 2
    assert value(registry, "nodes_targeted", flowexporter="a") == 3
    assert value(registry, "nodes_healthy", flowexporter="b") == 0


def test_reconciles_durations_and_errors_by_kind(setup):
    cluster, reconciler, registry = setup
    assert value(registry, "reconciles_total") == 0
    assert value(registry, "reconcile_errors_total", kind="temporary") == 0
    assert value(registry, "reconcile_errors_total", kind="permanent") == 0
    cluster.nodes = {"n1": {"role": "edge"}}
    cluster.exporters = {"edge": exporter("edge", "edge")}
    handlers._reconcile("test")
    handlers._reconcile("test")
    # an event older than the last reconciliation is served by it: not counted again
    handlers._reconcile("test", since=reconciler.last_started - 1)
    assert value(registry, "reconciles_total") == 2
    assert value(registry, "reconcile_duration_seconds_count") == 2
    assert value(registry, "reconcile_duration_seconds_sum") > 0
    assert value(registry, "reconcile_duration_seconds_bucket", le="+Inf") == 2

    for failure in (ApiException(status=500, reason="boom"), ProtocolError("connection reset")):
        cluster.fail = failure
        with pytest.raises(kopf.TemporaryError):
            handlers._reconcile("test")
    assert value(registry, "reconcile_errors_total", kind="temporary") == 2
    assert value(registry, "reconciles_total") == 4  # failed ones are reconciliations too
    # statuses of the last successful reconciliation stay until the next one succeeds
    assert value(registry, "nodes_targeted", flowexporter="edge") == 1

    cluster.fail = None
    cluster.exporters["edge"]["spec"]["templates"][0]["fields"].append("fooBar")
    with pytest.raises(kopf.PermanentError):
        handlers.flowexporter_changed(name="edge", reason="update")
    assert value(registry, "reconcile_errors_total", kind="permanent") == 1
    assert value(registry, "reconcile_errors_total", kind="temporary") == 2
    assert value(registry, "flowexporters", ready="false") == 1
