"""FlowExporter status from the render plan and the agents' node reports.

Each agent keeps a Lease ``kipfix-agent-<node>`` in kipfix's namespace: it
renews ``spec.renewTime`` every few seconds and writes its report as JSON in
the annotation ``kipfix.io/report`` (see ``kipfix.agent.kube``)::

    {"configHash": "…", "configError": null, "interfaces": ["eth0"],
     "errors": [], "warnings": [], "lastExportTime": "2026-…Z", "exportedFlows": 12}

A configured node is ready when its lease is current, the agent applied the
config hash the operator rendered for the node, and reports no error.
Warnings (a pod selection matching no pod there) are listed in nodeErrors
with reason AgentWarning but leave the node ready.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field

from kipfix.agent.contract import REPORT_ANNOTATION

MAX_NODE_ERRORS = 100


@dataclass(frozen=True)
class NodeReport:
    node: str
    renewed: dt.datetime | None
    duration: int
    config_hash: str | None = None
    config_error: str | None = None
    interfaces: tuple[str, ...] = ()
    errors: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()  # e.g. a pod selection matching no pod on the node: reported, still ready
    last_export: str | None = None


def parse_time(text: str | None) -> dt.datetime | None:
    if not text:
        return None
    try:
        value = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)


def format_time(value: dt.datetime) -> str:
    return value.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_lease(lease: dict) -> NodeReport | None:
    """The report in an agent's Lease (as a plain dict), or None if it is not one."""
    meta, spec = lease.get("metadata") or {}, lease.get("spec") or {}
    node = spec.get("holderIdentity") or ""
    if not node:
        return None
    try:
        report = json.loads((meta.get("annotations") or {}).get(REPORT_ANNOTATION) or "{}")
    except ValueError:
        report = {"configError": "unreadable report annotation"}
    return NodeReport(
        node=node, renewed=parse_time(spec.get("renewTime")), duration=int(spec.get("leaseDurationSeconds") or 30),
        config_hash=report.get("configHash"), config_error=report.get("configError"),
        interfaces=tuple(report.get("interfaces") or ()), errors=tuple(report.get("errors") or ()),
        warnings=tuple(report.get("warnings") or ()), last_export=report.get("lastExportTime"))


def node_problem(node: str, expected_hash: str, report: NodeReport | None,
                 now: dt.datetime) -> tuple[str, str] | None:
    """(reason, message) when a configured node is not ready, else None."""
    if report is None:
        return "AgentMissing", f"no report from the kipfix agent on node {node} (is the DaemonSet pod running?)"
    if report.renewed is None or (now - report.renewed).total_seconds() > report.duration:
        seen = format_time(report.renewed) if report.renewed else "never"
        return "AgentStale", f"the kipfix agent on node {node} last reported at {seen}"
    if report.config_error:
        return "AgentError", f"node {node}: {report.config_error}"
    if report.config_hash != expected_hash:
        return "ConfigPending", (f"node {node}: agent runs config {report.config_hash or 'none'}, "
                                 f"not yet {expected_hash}")
    if report.errors:
        return "AgentError", f"node {node}: {'; '.join(report.errors)}"
    return None


def condition(kind: str, status: bool, reason: str, message: str, generation: int,
              old: list[dict] | None, now: dt.datetime) -> dict:
    """A condition that keeps lastTransitionTime while its status stays the same."""
    text = "True" if status else "False"
    previous = next((c for c in old or () if c.get("type") == kind), None)
    since = previous.get("lastTransitionTime") if previous and previous.get("status") == text else None
    return {"type": kind, "status": text, "reason": reason, "message": message,
            "observedGeneration": generation, "lastTransitionTime": since or format_time(now)}


@dataclass
class ExporterOutcome:
    """What the operator found for one FlowExporter, before looking at agents."""

    name: str
    generation: int
    collectors: str = ""
    invalid: str | None = None       # the spec error; the previous valid spec may still be in force
    in_force: bool = False           # some spec of this exporter is rendered (current or previous)
    targeted: list[str] = field(default_factory=list)
    configured: list[str] = field(default_factory=list)
    conflicts: dict[str, str] = field(default_factory=dict)


def exporter_status(outcome: ExporterOutcome, node_hashes: dict[str, str], reports: dict[str, NodeReport],
                    old_conditions: list[dict] | None, now: dt.datetime) -> dict:
    """The status object for one FlowExporter."""
    errors = [{"node": node, "reason": "Conflict", "message": message}
              for node, message in sorted(outcome.conflicts.items())]
    ready = 0
    for node in outcome.configured:
        problem = node_problem(node, node_hashes.get(node, ""), reports.get(node), now)
        if problem is None:
            ready += 1
            report = reports.get(node)
            errors += [{"node": node, "reason": "AgentWarning", "message": f"node {node}: {warning}"}
                       for warning in (report.warnings if report else ())]
        else:
            errors.append({"node": node, "reason": problem[0], "message": problem[1]})
    targeted = len(outcome.targeted)
    if outcome.invalid:
        ready_cond = (False, "InvalidSpec", outcome.invalid + (
            "; the previously applied spec stays in force" if outcome.in_force else "; nothing rendered"))
    elif targeted == 0:
        ready_cond = (False, "NoNodesSelected", "spec.nodeSelector selects no node")
    elif ready == targeted:
        ready_cond = (True, "AllNodesReady", f"{ready}/{targeted} nodes export")
    else:
        first = errors[0]["message"] if errors else "waiting for agents"
        ready_cond = (False, "NodesNotReady", f"{ready}/{targeted} nodes ready; {first}")
    degraded_reasons = []
    if outcome.invalid:
        degraded_reasons.append("InvalidSpec")
    if errors:
        degraded_reasons.append(errors[0]["reason"])
    if degraded_reasons:
        messages = []
        if outcome.invalid:
            messages.append(outcome.invalid)
        messages += [e["message"] for e in errors[:3]]
        if len(errors) > 3:
            messages.append(f"and {len(errors) - 3} more in status.nodeErrors")
        degraded = (True, degraded_reasons[0], "; ".join(messages))
    else:
        degraded = (False, "AsExpected", "no problem reported")
    if len(errors) > MAX_NODE_ERRORS:  # keep the object small on big clusters; the count stays exact
        errors = errors[:MAX_NODE_ERRORS - 1] + [{
            "node": "(more)", "reason": "Truncated",
            "message": f"{len(errors) - MAX_NODE_ERRORS + 1} more nodes with problems not listed"}]
    return {
        "observedGeneration": outcome.generation,
        "collectors": outcome.collectors,
        "nodesTargeted": targeted,
        "nodesConfigured": len(outcome.configured),
        "nodesReady": ready,
        "nodesSummary": f"{ready}/{targeted}",
        "nodeErrors": errors,
        "conditions": [
            condition("Ready", *ready_cond, outcome.generation, old_conditions, now),
            condition("Degraded", *degraded, outcome.generation, old_conditions, now),
        ],
    }
