"""Prometheus metrics of the operator (prefix ``kipfix_operator_``).

- Per-FlowExporter numbers (``flowexporters`` by Ready, ``nodes_targeted``,
  ``nodes_configured``, ``nodes_healthy``) are read at scrape time by
  ``OperatorCollector`` from the statuses the last reconciliation computed,
  so the series of a deleted FlowExporter disappear with the reconciliation
  that follows its deletion. ``nodes_targeted`` and ``nodes_healthy`` carry
  the same labels: the alert KipfixNodeNotReady subtracts one from the other.
- Reconciliations, their errors and their durations are counted as they
  happen through ``OperatorMetrics``.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger("kipfix.operator")

PREFIX = "kipfix_operator_"
READY_VALUES = ("true", "false", "unknown")
ERROR_KINDS = ("temporary", "permanent")
RECONCILE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# name -> status object (as FlowExporter.status: nodesTargeted, nodesConfigured, nodesReady, conditions)
Results = Callable[[], "dict[str, dict] | None"]


def ready_value(status: dict) -> str:
    """true, false or unknown: the status of the Ready condition."""
    for cond in status.get("conditions") or ():
        if cond.get("type") == "Ready":
            return {"True": "true", "False": "false"}.get(cond.get("status"), "unknown")
    return "unknown"


class OperatorCollector(Collector):
    """Reads the last reconciliation's statuses at scrape time."""

    def __init__(self, results: Results):
        self.results = results

    def describe(self) -> list[Metric]:
        return list(self._families())

    def _families(self) -> tuple[GaugeMetricFamily, ...]:
        return (
            GaugeMetricFamily(PREFIX + "flowexporters", "FlowExporters by the status of their Ready condition",
                              labels=["ready"]),
            GaugeMetricFamily(PREFIX + "nodes_targeted", "Nodes a FlowExporter's nodeSelector selects",
                              labels=["flowexporter"]),
            GaugeMetricFamily(PREFIX + "nodes_configured", "Nodes whose ConfigMap includes the FlowExporter "
                              "(targeted minus conflicts)", labels=["flowexporter"]),
            GaugeMetricFamily(PREFIX + "nodes_healthy", "Configured nodes whose agent reports the current "
                              "config applied, without errors", labels=["flowexporter"]),
        )

    def collect(self) -> Iterator[Metric]:
        exporters, targeted, configured, healthy = self._families()
        results = self.results() or {}
        counts = dict.fromkeys(READY_VALUES, 0)
        for name, status in sorted(results.items()):
            counts[ready_value(status)] += 1
            targeted.add_metric([name], status.get("nodesTargeted", 0))
            configured.add_metric([name], status.get("nodesConfigured", 0))
            healthy.add_metric([name], status.get("nodesReady", 0))
        for value, count in counts.items():
            exporters.add_metric([value], count)
        yield from (exporters, targeted, configured, healthy)


class OperatorMetrics:
    """The operator's metrics in ``registry``; ``results`` returns the last reconciliation's statuses."""

    def __init__(self, registry: CollectorRegistry, results: Results):
        self.reconciles = Counter(PREFIX + "reconciles", "Reconciliations run (events arriving in a burst "
                                  "share one)", registry=registry)
        self.errors = Counter(PREFIX + "reconcile_errors", "Failed reconciliations: temporary (API error, "
                              "retried) or permanent (invalid spec, waits for the next change)", ["kind"],
                              registry=registry)
        for kind in ERROR_KINDS:
            self.errors.labels(kind)
        self.duration = Histogram(PREFIX + "reconcile_duration_seconds", "Time of one reconciliation",
                                  buckets=RECONCILE_BUCKETS, registry=registry)
        self.collector = OperatorCollector(results)
        registry.register(self.collector)

    def reconciled(self, seconds: float) -> None:
        self.reconciles.inc()
        self.duration.observe(seconds)

    def error(self, kind: str) -> None:
        self.errors.labels(kind).inc()


def start_operator_metrics(reconciler: Any, address: str, port: int,
                           registry: CollectorRegistry | None = None) -> OperatorMetrics | None:
    """Count ``reconciler`` into ``registry`` (default: the global one, with process_* metrics) and
    serve it on http://address:port/metrics. A port that cannot be opened is logged; the operator
    runs on without metrics."""
    from prometheus_client import start_http_server

    if registry is None:
        from prometheus_client import REGISTRY as registry
    where = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
    try:
        start_http_server(port, addr=address, registry=registry)
    except OSError as err:
        log.error("cannot serve metrics on %s: %s; running without metrics (set --metrics-port, or "
                  "--metrics-port=0)", where, err.strerror or err)
        return None
    metrics = OperatorMetrics(registry, lambda: reconciler.last_statuses)
    reconciler.metrics = metrics
    log.info("serving metrics on http://%s/metrics", where)
    return metrics
