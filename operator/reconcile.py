"""One reconciliation: read FlowExporters, Nodes, node ConfigMaps and agent
reports; write the ConfigMaps and statuses that differ.

ConfigMaps: one per node, ``kipfix-node-<node>`` in kipfix's namespace, key
``config.yaml`` (the merged agent config), annotations ``kipfix.io/node``,
``kipfix.io/config-hash`` and ``kipfix.io/flowexporters`` (the sources), and
one owner reference per contributing FlowExporter. Why one per node and not
one per (FlowExporter, node): the agent watches exactly one object, merging
and conflict detection happen in one place (here), and the status can say
which exporter lost a conflict. With several owners, Kubernetes' garbage
collector deletes the ConfigMap only once every owner is gone (also when the
operator is down); while the operator runs, deleting one exporter re-renders
its nodes without it.

Every step compares before writing, so a reconciliation with nothing new
writes nothing. Everything runs under one lock: handlers of different
objects never interleave their writes.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import threading
import time
from typing import Any

from kubernetes.client.rest import ApiException

from kipfix.agent.contract import (AGENT_REPORT_COMPONENT, COMPONENT_LABEL, CONFIG_KEY, HASH_ANNOTATION, NAME_LABEL,
                                   NODE_ANNOTATION, NODE_CONFIG_COMPONENT, SOURCES_ANNOTATION, configmap_name)
from kipfix.agent.kube.client import api_client

from . import render, status
from .spec import Exporter, SpecError, parse_exporter

log = logging.getLogger("kipfix.operator")

GROUP, VERSION, PLURAL, KIND = "kipfix.io", "v1alpha1", "flowexporters", "FlowExporter"
LAST_VALID_ANNOTATION = "kipfix.io/last-valid-spec"
NODE_CONFIG_SELECTOR = f"{NAME_LABEL[0]}={NAME_LABEL[1]},{COMPONENT_LABEL}={NODE_CONFIG_COMPONENT}"
AGENT_REPORT_SELECTOR = f"{NAME_LABEL[0]}={NAME_LABEL[1]},{COMPONENT_LABEL}={AGENT_REPORT_COMPONENT}"


class Outcome(dict):
    """exporter name -> status.ExporterOutcome of the last reconciliation."""


def exporter_or_previous(body: dict) -> tuple[Exporter | None, str | None, bool]:
    """(exporter to render, spec error, whether the exporter is the previous valid spec)."""
    try:
        return parse_exporter(body), None, False
    except SpecError as err:
        error = str(err)
    previous = (body.get("metadata", {}).get("annotations") or {}).get(LAST_VALID_ANNOTATION)
    if previous:
        try:
            return parse_exporter({**body, "spec": json.loads(previous)}), error, True
        except (SpecError, ValueError):
            pass
    return None, error, False


def configmap_body(config: render.NodeConfig, namespace: str) -> dict:
    return {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {
            "name": configmap_name(config.node), "namespace": namespace,
            "labels": {NAME_LABEL[0]: NAME_LABEL[1], COMPONENT_LABEL: NODE_CONFIG_COMPONENT},
            "annotations": {NODE_ANNOTATION: config.node, HASH_ANNOTATION: config.hash,
                            SOURCES_ANNOTATION: ",".join(o.name for o in config.owners)},
            "ownerReferences": [{"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "name": o.name, "uid": o.uid}
                                for o in config.owners],
        },
        "data": {CONFIG_KEY: config.text},
    }


def _same_configmap(existing: Any, desired: dict) -> bool:
    meta = existing.metadata
    owners = sorted((r.name, r.uid) for r in meta.owner_references or ())
    want_owners = sorted((r["name"], r["uid"]) for r in desired["metadata"]["ownerReferences"])
    annotations = meta.annotations or {}
    labels = meta.labels or {}
    return (existing.data == desired["data"] and owners == want_owners
            and all(annotations.get(k) == v for k, v in desired["metadata"]["annotations"].items())
            and all(labels.get(k) == v for k, v in desired["metadata"]["labels"].items()))


@contextlib.contextmanager
def _gone_is_fine():
    """Swallow 404 Not Found: the object went away between the list and the write."""
    try:
        yield
    except ApiException as err:
        if err.status != 404:
            raise


def _comparable(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=str))


class Reconciler:
    def __init__(self, namespace: str, api: Any = None):
        from kubernetes import client

        self.namespace = namespace
        self.api = api or api_client()
        self.core = client.CoreV1Api(self.api)
        self.custom = client.CustomObjectsApi(self.api)
        self.coordination = client.CoordinationV1Api(self.api)
        self.lock = threading.Lock()
        self.writes = 0  # ConfigMap and status writes, for tests and logs
        self.last_started = float("-inf")
        self.last_outcome: Outcome | None = None
        self.last_statuses: dict[str, dict] | None = None  # name -> status computed by the last reconciliation
        self.metrics: Any = None  # metrics.OperatorMetrics when metrics are served

    # -- reads ------------------------------------------------------------------------

    def _exporters(self) -> list[dict]:
        items = self.custom.list_cluster_custom_object(GROUP, VERSION, PLURAL)["items"]
        return [fe for fe in items if not fe["metadata"].get("deletionTimestamp")]

    def _nodes(self) -> dict[str, dict]:
        return {n.metadata.name: dict(n.metadata.labels or {}) for n in self.core.list_node().items}

    def _reports(self) -> dict[str, status.NodeReport]:
        leases = self.coordination.list_namespaced_lease(self.namespace, label_selector=AGENT_REPORT_SELECTOR)
        reports = {}
        for lease in leases.items:
            report = status.parse_lease(self.api.sanitize_for_serialization(lease))
            if report is not None:
                reports[report.node] = report
        return reports

    # -- the reconciliation -------------------------------------------------------------

    def reconcile(self, reason: str = "", since: float | None = None) -> Outcome:
        """Reconcile everything; with ``since`` (a time.monotonic() value), skip it when a reconciliation
        that started after ``since`` already saw the change (events arriving in a burst coalesce)."""
        with self.lock:
            if since is not None and self.last_started >= since and self.last_outcome is not None:
                return self.last_outcome
            self.last_started = time.monotonic()
            self.last_outcome = None
            try:
                self.last_outcome = self._reconcile(reason)
            finally:
                if self.metrics is not None:
                    self.metrics.reconciled(time.monotonic() - self.last_started)
            return self.last_outcome

    def _reconcile(self, reason: str) -> Outcome:
        bodies = self._exporters()
        nodes = self._nodes()
        outcomes = Outcome()
        renderable: list[Exporter] = []
        for body in bodies:
            meta = body["metadata"]
            exporter, error, previous = exporter_or_previous(body)
            outcome = status.ExporterOutcome(name=meta["name"], generation=int(meta.get("generation") or 0),
                                             invalid=error, in_force=exporter is not None)
            if exporter is not None:
                outcome.collectors = exporter.collector_summary()
                renderable.append(exporter)
                if not previous:
                    self._remember_valid_spec(body)
            outcomes[meta["name"]] = outcome
        plan = render.plan(renderable, nodes)
        for name, outcome in outcomes.items():
            outcome.targeted = plan.targeted.get(name, [])
            outcome.configured = plan.configured.get(name, [])
            outcome.conflicts = plan.conflicts.get(name, {})
        self._write_configmaps(plan)
        self._write_statuses(bodies, outcomes, {n: c.hash for n, c in plan.nodes.items()})
        if reason:
            log.debug("reconciled (%s): %d FlowExporters, %d node configs", reason, len(bodies), len(plan.nodes))
        return outcomes

    def _remember_valid_spec(self, body: dict) -> None:
        text = json.dumps(body.get("spec") or {}, sort_keys=True, separators=(",", ":"))
        if (body["metadata"].get("annotations") or {}).get(LAST_VALID_ANNOTATION) == text:
            return
        with _gone_is_fine():  # deleted meanwhile
            self.custom.patch_cluster_custom_object(GROUP, VERSION, PLURAL, body["metadata"]["name"],
                                                    {"metadata": {"annotations": {LAST_VALID_ANNOTATION: text}}})

    def _write_configmaps(self, plan: render.Plan) -> None:
        existing = {cm.metadata.name: cm for cm in self.core.list_namespaced_config_map(
            self.namespace, label_selector=NODE_CONFIG_SELECTOR).items}
        for node, config in plan.nodes.items():
            desired = configmap_body(config, self.namespace)
            name = desired["metadata"]["name"]
            current = existing.pop(name, None)
            if current is None:
                self.core.create_namespaced_config_map(self.namespace, desired)
                log.info("node %s: created ConfigMap %s (config %s from %s)", node, name, config.hash,
                         ", ".join(o.name for o in config.owners))
            elif not _same_configmap(current, desired):
                try:
                    self.core.replace_namespaced_config_map(
                        name, self.namespace, {**desired, "metadata": {
                            **desired["metadata"], "resourceVersion": current.metadata.resource_version}})
                except ApiException as err:
                    if err.status != 404:
                        raise
                    # the garbage collector removed it meanwhile (its owners were deleted): create it anew
                    self.core.create_namespaced_config_map(self.namespace, desired)
                log.info("node %s: updated ConfigMap %s (config %s from %s)", node, name, config.hash,
                         ", ".join(o.name for o in config.owners))
            else:
                continue
            self.writes += 1
        for name, current in existing.items():
            with _gone_is_fine():  # the garbage collector may have been first
                self.core.delete_namespaced_config_map(name, self.namespace)
            self.writes += 1
            log.info("node %s: no FlowExporter selects it any more; deleted ConfigMap %s",
                     (current.metadata.annotations or {}).get(NODE_ANNOTATION, "?"), name)

    def _write_statuses(self, bodies: list[dict], outcomes: Outcome, hashes: dict[str, str]) -> None:
        reports = self._reports()
        now = dt.datetime.now(dt.timezone.utc)
        computed = {}
        for body in bodies:
            name = body["metadata"]["name"]
            old = body.get("status") or {}
            new = status.exporter_status(outcomes[name], hashes, reports, old.get("conditions"), now)
            computed[name] = new
            if all(_comparable(old.get(k)) == _comparable(v) for k, v in new.items()):
                continue
            with _gone_is_fine():  # deleted meanwhile: nothing to report
                self.custom.patch_cluster_custom_object_status(GROUP, VERSION, PLURAL, name, {"status": new})
                self.writes += 1
        self.last_statuses = computed  # read by the metrics at scrape time
