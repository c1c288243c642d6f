"""kopf handlers: every event that can change a node's config reconciles.

- FlowExporter create / update (spec) / resume: reconcile; an invalid spec
  ends in ``kopf.PermanentError`` (after its status says why), so kopf posts
  an Event and waits for the next spec change instead of retrying.
- FlowExporter deleted: no finalizer (deletion is never blocked); the
  DELETED event re-renders the nodes it shared with other exporters, and the
  garbage collector removes ConfigMaps it owned alone.
- Node added, deleted or relabelled: reconcile (an in-memory label cache
  filters out status-only updates; kipfix never writes to Node objects).
- A timer per FlowExporter refreshes its status from the agents' reports.

Every reconciliation covers all exporters and nodes, so events arriving in a
burst (every Node at start, several timers) share one: a handler skips when a
reconciliation that started after its event has already run.

API errors become ``kopf.TemporaryError`` so kopf retries with a delay.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import kopf

from .reconcile import GROUP, PLURAL, VERSION, Reconciler

log = logging.getLogger("kipfix.operator")

STATUS_INTERVAL = 5.0  # seconds between status refreshes from agent reports
RETRY_DELAY = 5.0

_state: dict[str, Any] = {"reconciler": None, "labels": {}}


def configure(reconciler: Reconciler) -> None:
    _state["reconciler"] = reconciler
    _state["labels"] = {}


def _reconcile(reason: str, since: float | None = None):
    from kubernetes.client.rest import ApiException
    from urllib3.exceptions import HTTPError

    reconciler: Reconciler = _state["reconciler"]
    if since is None:
        since = time.monotonic()  # a reconciliation that starts after this moment sees this event
    try:
        return reconciler.reconcile(reason, since=since)
    except ApiException as err:
        _count_error(reconciler, "temporary")
        raise kopf.TemporaryError(f"API error while reconciling ({reason}): {err.status} {err.reason}",
                                  delay=RETRY_DELAY) from None
    except HTTPError as err:
        _count_error(reconciler, "temporary")
        raise kopf.TemporaryError(f"API unreachable while reconciling ({reason}): {err}",
                                  delay=RETRY_DELAY) from None
    except Exception:
        _count_error(reconciler, "temporary")  # kopf retries any error but PermanentError
        raise


def _count_error(reconciler: Reconciler, kind: str) -> None:
    if reconciler.metrics is not None:
        reconciler.metrics.error(kind)


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
def flowexporter_changed(name: str, reason: str, **_: Any) -> None:
    outcomes = _reconcile(f"FlowExporter {name} {reason}")
    outcome = outcomes.get(name)
    if outcome is not None and outcome.invalid:
        _count_error(_state["reconciler"], "permanent")
        raise kopf.PermanentError(f"invalid spec: {outcome.invalid}")


@kopf.on.event(GROUP, VERSION, PLURAL)
def flowexporter_deleted(event: dict, name: str, **_: Any) -> None:
    if event.get("type") == "DELETED":
        _reconcile(f"FlowExporter {name} deleted")


@kopf.timer(GROUP, VERSION, PLURAL, interval=STATUS_INTERVAL, initial_delay=STATUS_INTERVAL)
def refresh_status(name: str, **_: Any) -> None:
    # one reconciliation serves every exporter's timer that fires within half a period
    _reconcile(f"status of {name}", since=time.monotonic() - STATUS_INTERVAL / 2)


@kopf.on.event("", "v1", "nodes")
def node_event(event: dict, name: str, labels: Any, **_: Any) -> None:
    known: dict = _state["labels"]
    if event.get("type") == "DELETED":
        known.pop(name, None)
        _reconcile(f"node {name} deleted")
        return
    current = dict(labels or {})
    if known.get(name) == current:
        return
    first = name not in known
    known[name] = current
    _reconcile(f"node {name} {'seen' if first else 'relabelled'}")
