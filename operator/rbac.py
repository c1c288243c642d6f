"""Exactly which API calls the operator and the agent make, as PolicyRules.

The Helm chart's RBAC test checks its ClusterRoles/Roles against these.
``scope`` says where the chart must grant the rule: "cluster" (ClusterRole)
or "namespace" (Role in the namespace kipfix is installed in). Everything
else in the rule is the Kubernetes PolicyRule shape.
"""

from __future__ import annotations

OPERATOR_RULES: list[dict] = [
    # handlers watch FlowExporters; kopf patches its progress annotations and
    # the operator its kipfix.io/last-valid-spec annotation
    {"scope": "cluster", "apiGroups": ["kipfix.io"], "resources": ["flowexporters"],
     "verbs": ["get", "list", "watch", "patch"]},
    # conditions, node counts, per-node errors
    {"scope": "cluster", "apiGroups": ["kipfix.io"], "resources": ["flowexporters/status"],
     "verbs": ["get", "patch"]},
    # nodeSelector matching; node label changes re-render (read only: no annotations on nodes)
    {"scope": "cluster", "apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "watch"]},
    # kopf posts Events about handler outcomes (core/v1 events)
    {"scope": "cluster", "apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
    # kopf peering between the two replicas; the operator creates the "kipfix" object if missing
    {"scope": "cluster", "apiGroups": ["kopf.dev"], "resources": ["clusterkopfpeerings"],
     "verbs": ["get", "list", "watch", "patch", "create"]},
    # kopf looks up the CRDs it serves at start
    {"scope": "cluster", "apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"],
     "verbs": ["get", "list", "watch"]},
    # the per-node agent configs kipfix-node-<node>
    {"scope": "namespace", "apiGroups": [""], "resources": ["configmaps"],
     "verbs": ["get", "list", "create", "update", "delete"]},
    # the agents' reports kipfix-agent-<node>
    {"scope": "namespace", "apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
     "verbs": ["get", "list"]},
]

AGENT_RULES: list[dict] = [
    # its own node's config: list + watch with fieldSelector metadata.name=kipfix-node-<node>
    {"scope": "namespace", "apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list", "watch"]},
    # TLS material for collectors with transport tls (ca.crt, tls.crt, tls.key)
    {"scope": "namespace", "apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]},
    # its report kipfix-agent-<node>: patch, create on first start
    {"scope": "namespace", "apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
     "verbs": ["get", "create", "patch"]},
    # pods: its own node's (fieldSelector spec.nodeName) to meter inside them, and every pod's
    # IPs, names and owners for the Kubernetes metadata elements
    {"scope": "cluster", "apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"]},
    # namespace labels, for spec.interfaces.pods.namespaceSelector
    {"scope": "cluster", "apiGroups": [""], "resources": ["namespaces"], "verbs": ["list", "watch"]},
]
