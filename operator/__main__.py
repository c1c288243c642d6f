"""``python -m kipfix.operator`` / ``kipfix operator``: run the kopf operator.

Two replicas are safe: kopf peering (ClusterKopfPeering "kipfix", created
here if missing; CRD in crds/kopf-peering.yaml) with a random priority per
process, so exactly one replica handles events and the other stands by and
takes over when the first stops renewing. ``--standalone`` turns peering off
(one replica only). The liveness endpoint (also fit for readiness) is
``--liveness`` (default http://0.0.0.0:8080/healthz). Prometheus metrics
(kipfix_operator_*, see metrics.py) are served on ``--metrics-address`` and
``--metrics-port`` (default 0.0.0.0:9470; port 0 turns them off).
"""

from __future__ import annotations

import argparse
import logging
import random
import sys

from kipfix.agent.contract import DEFAULT_OPERATOR_METRICS_PORT, default_namespace
from kipfix.agent.kube.client import load_kube_config

PEERING_NAME = "kipfix"
METRICS_PORT = DEFAULT_OPERATOR_METRICS_PORT

log = logging.getLogger("kipfix.operator")


def ensure_peering(api, name: str) -> None:
    """Create the ClusterKopfPeering object if it is missing (the CRD comes with the chart)."""
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    custom = client.CustomObjectsApi(api)
    try:
        custom.get_cluster_custom_object("kopf.dev", "v1", "clusterkopfpeerings", name)
    except ApiException as err:
        if err.status != 404:
            raise
        try:
            custom.create_cluster_custom_object("kopf.dev", "v1", "clusterkopfpeerings",
                                                {"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering",
                                                 "metadata": {"name": name}})
        except ApiException as err:
            if err.status != 409:  # the other replica created it at the same moment
                raise


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port; accepted: 0 (off) to 65535")
    return port


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--namespace", default=None,
                        help="namespace of the node ConfigMaps and agent Leases (default: POD_NAMESPACE, "
                             "the service account's namespace, or kipfix)")
    parser.add_argument("--liveness", default="http://0.0.0.0:8080/healthz",
                        help="liveness/readiness endpoint URL (kopf)")
    parser.add_argument("--standalone", action="store_true", help="no peering (run a single replica only)")
    parser.add_argument("--peering", default=PEERING_NAME, help="ClusterKopfPeering object name")
    parser.add_argument("--metrics-port", type=_port, default=METRICS_PORT,
                        help=f"port of the Prometheus metrics endpoint /metrics (default {METRICS_PORT}; "
                             "0 disables it)")
    parser.add_argument("--metrics-address", default="0.0.0.0",
                        help="address the metrics endpoint listens on (default 0.0.0.0)")


def main(argv: list[str] | None = None, prog: str = "python -m kipfix.operator") -> int:
    parser = argparse.ArgumentParser(prog=prog,
                                     description="FlowExporter operator: renders per-node agent ConfigMaps")
    add_arguments(parser)
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    args = parser.parse_args(argv)
    logging.basicConfig(force=True, level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(args)


def run(args: argparse.Namespace) -> int:
    """Run until SIGTERM/SIGINT (``args`` from add_arguments)."""
    import kopf

    namespace = args.namespace or default_namespace()
    api = load_kube_config()

    from . import handlers
    from .reconcile import LAST_VALID_ANNOTATION, Reconciler

    reconciler = Reconciler(namespace, api)
    handlers.configure(reconciler)
    if args.metrics_port:
        from .metrics import start_operator_metrics
        start_operator_metrics(reconciler, args.metrics_address, args.metrics_port)
    if not args.standalone:
        ensure_peering(api, args.peering)
    priority = random.randint(1, 2**15)

    @kopf.on.startup()
    def configure(settings: kopf.OperatorSettings, **_):
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="kopf.kipfix.io")
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            prefix="kopf.kipfix.io", key="last-handled-configuration",
            ignored_fields=[("metadata", "annotations", LAST_VALID_ANNOTATION)])
        settings.peering.priority = priority
        settings.peering.clusterwide = True
        settings.peering.name = args.peering
        settings.posting.level = logging.WARNING
        settings.watching.server_timeout = 120

    log.info("kipfix operator: ConfigMaps in namespace %s, %s (priority %d), liveness %s", namespace,
             "standalone" if args.standalone else f"peering {args.peering!r}", priority, args.liveness)
    kopf.run(clusterwide=True, standalone=args.standalone, peering_name=None if args.standalone else args.peering,
             liveness_endpoint=args.liveness)
    return 0


if __name__ == "__main__":
    sys.exit(main())
