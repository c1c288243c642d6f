"""The agent's report to the operator: the node's Lease and its ``kipfix.io/report`` annotation.

``spec.renewTime`` is the heartbeat; the annotation (JSON: configHash,
configError, interfaces, errors, warnings, lastExportTime, exportedFlows) is
what the operator aggregates into each FlowExporter's status.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
from typing import Any

from ..contract import (AGENT_REPORT_COMPONENT, COMPONENT_LABEL, LEASE_SECONDS, NAME_LABEL, NODE_ANNOTATION,
                        REPORT_ANNOTATION, lease_name)


def now_micro() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class NodeReporter:
    """Keeps the node's Lease and its report annotation current."""

    def __init__(self, api: Any, node: str, namespace: str):
        from kubernetes import client

        self.coordination = client.CoordinationV1Api(api)
        self.node, self.namespace, self.name = node, namespace, lease_name(node)
        self.report: dict[str, Any] = {"configHash": None, "configError": None, "interfaces": [],
                                       "errors": [], "warnings": [], "lastExportTime": None, "exportedFlows": 0}
        self._lock = threading.Lock()

    def update(self, **fields: Any) -> None:
        with self._lock:
            self.report.update(fields)

    def body(self) -> dict:
        with self._lock:
            report = json.dumps(self.report, sort_keys=True)
        return {
            "metadata": {"name": self.name, "namespace": self.namespace,
                         "labels": {NAME_LABEL[0]: NAME_LABEL[1], COMPONENT_LABEL: AGENT_REPORT_COMPONENT},
                         "annotations": {REPORT_ANNOTATION: report, NODE_ANNOTATION: self.node}},
            "spec": {"holderIdentity": self.node, "leaseDurationSeconds": LEASE_SECONDS, "renewTime": now_micro()},
        }

    def publish(self) -> None:
        from kubernetes.client.rest import ApiException

        body = self.body()
        try:
            self.coordination.patch_namespaced_lease(self.name, self.namespace, body)
        except ApiException as err:
            if err.status != 404:
                raise
            self.coordination.create_namespaced_lease(self.namespace, body)
