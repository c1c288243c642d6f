"""What the agent and the operator agree on: object names, labels, annotations, keys and defaults.

Both sides import this module and nothing else of each other's runtime:
the operator renders ConfigMaps the agent reads and reads the Leases the
agent writes, so every name and default they share is defined here once.
Pure Python: no Kubernetes client, no file system access at import.
"""

from __future__ import annotations

import hashlib
import os

# ---- defaults of the agent configuration ---------------------------------------

DEFAULT_PIN_PATH = "/sys/fs/bpf/kipfix"
DEFAULT_METRICS_PORT = 9469  # agent /metrics
DEFAULT_OPERATOR_METRICS_PORT = 9470
DEFAULT_PEN = 32473  # RFC 5612 documentation PEN: kipfix's enterprise elements unless configured
DEFAULT_MAX_FLOWS = 65536
DEFAULT_IDLE_TIMEOUT = 15.0
DEFAULT_ACTIVE_TIMEOUT = 60.0

# ---- node ConfigMap (operator -> agent) ----------------------------------------

CONFIGMAP_PREFIX = "kipfix-node-"
CONFIG_KEY = "config.yaml"
HASH_ANNOTATION = "kipfix.io/config-hash"
NODE_ANNOTATION = "kipfix.io/node"
SOURCES_ANNOTATION = "kipfix.io/flowexporters"
SECRET_PREFIX = "secret:"  # "secret:NAME/KEY" in a rendered config: a key of a Secret the agent reads

# ---- node Lease (agent -> operator) --------------------------------------------

LEASE_PREFIX = "kipfix-agent-"
REPORT_ANNOTATION = "kipfix.io/report"
LEASE_SECONDS = 30
RENEW_SECONDS = 10

# ---- labels ------------------------------------------------------------------------

NAME_LABEL = ("app.kubernetes.io/name", "kipfix")
COMPONENT_LABEL = "app.kubernetes.io/component"
NODE_CONFIG_COMPONENT = "node-config"
AGENT_REPORT_COMPONENT = "agent-report"

# ---- API access and environment -------------------------------------------------

REQUEST_TIMEOUT = (10, 30)  # (connect, read) seconds of every API call (kube.client.api_client)
PIN_PATH_ENV = "KIPFIX_PIN_PATH"  # where the DaemonSet mounts bpffs for kipfix (default DEFAULT_PIN_PATH)
SA_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


def _object_name(prefix: str, node: str) -> str:
    name = prefix + node
    if len(name) <= 253:
        return name
    digest = hashlib.sha256(node.encode()).hexdigest()[:10]
    return f"{name[:242]}-{digest}"


def configmap_name(node: str) -> str:
    """The ConfigMap holding ``node``'s agent config."""
    return _object_name(CONFIGMAP_PREFIX, node)


def lease_name(node: str) -> str:
    """The Lease in which ``node``'s agent reports."""
    return _object_name(LEASE_PREFIX, node)


def config_hash(text: str) -> str:
    """Short hash of a rendered config: the operator writes it, the agent reports the one it applied."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def default_namespace() -> str:
    """kipfix's namespace: POD_NAMESPACE, else the service account's, else ``kipfix``."""
    if os.environ.get("POD_NAMESPACE"):
        return os.environ["POD_NAMESPACE"]
    try:
        with open(SA_NAMESPACE_FILE, encoding="utf-8") as handle:
            return handle.read().strip()
    except OSError:
        return "kipfix"
