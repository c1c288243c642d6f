"""Per-node agent configuration from every FlowExporter selecting the node.

Exporters are merged oldest first (creationTimestamp, then name). An exporter
joins a node's config when it is compatible with what is already there:

- collectors and templates are united; the same template id with different
  fields or selection, or the same collector address with different
  settings, conflicts; templates keep the order they have in the oldest
  exporter, then the next one's (a flow goes to the first template that
  selects it, and a template that no flow can reach conflicts);
- host interface and pod selections are listed side by side (the agent
  meters the union; one exporter's ``exclude`` never hides another's names);
- timeouts and the observation domain id must be equal, else they conflict;
- maxFlows: the largest wins (a bigger table serves both).

Note that the agent sends every template to every collector of the node, so
merged exporters share their collectors. An exporter that conflicts is left
out of that node (the older one stays) and gets a message naming both.

The result is one ``NodeConfig`` per node that at least one exporter joined:
the agent YAML, its hash and the exporters it came from (the ConfigMap's
owners).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import yaml

from kipfix.agent.config import ConfigError
from kipfix.agent.contract import config_hash

from .spec import Exporter, contribution, selector_matches, validate_agent_config


@dataclass
class NodeConfig:
    node: str
    doc: dict
    owners: list[Exporter] = field(default_factory=list)

    @property
    def text(self) -> str:
        return render_yaml(self.doc)

    @property
    def hash(self) -> str:
        return config_hash(self.text)


@dataclass
class Plan:
    nodes: dict[str, NodeConfig] = field(default_factory=dict)
    targeted: dict[str, list[str]] = field(default_factory=dict)    # exporter -> nodes selected
    configured: dict[str, list[str]] = field(default_factory=dict)  # exporter -> nodes it joined
    conflicts: dict[str, dict[str, str]] = field(default_factory=dict)  # exporter -> node -> message


def render_yaml(doc: dict) -> str:
    return yaml.safe_dump(doc, sort_keys=True, default_flow_style=False)


class Conflict(Exception):
    pass


def _merge(base: dict, part: dict, base_owners: list[Exporter], new: Exporter) -> dict:
    """``base`` plus ``part``, or Conflict naming what disagrees."""
    owners = ", ".join(repr(o.name) for o in base_owners)
    merged = {key: (list(value) if isinstance(value, list) else value) for key, value in base.items()}
    by_id = {t["id"]: t for t in base["templates"]}
    for template in part["templates"]:
        old = by_id.get(template["id"])
        if old is None:
            merged["templates"].append(template)
            by_id[template["id"]] = template
        elif old["fields"] != template["fields"]:
            raise Conflict(f"template id {template['id']} has fields {template['fields']} in FlowExporter "
                           f"{new.name!r} but {old['fields']} in FlowExporter {owners}")
        elif old.get("select") != template.get("select"):
            raise Conflict(f"template id {template['id']} selects {template.get('select') or 'every flow'} in "
                           f"FlowExporter {new.name!r} but {old.get('select') or 'every flow'} in FlowExporter "
                           f"{owners}")
    by_address = {c["address"]: c for c in base["collectors"]}
    for collector in part["collectors"]:
        old = by_address.get(collector["address"])
        if old is None:
            merged["collectors"].append(collector)
            by_address[collector["address"]] = collector
        elif old != collector:
            raise Conflict(f"collector {collector['address']} is configured differently in FlowExporter "
                           f"{new.name!r} ({collector}) and in FlowExporter {owners} ({old})")
    for key, what in (("timeouts", "timeouts"), ("observationDomainId", "observation domain id")):
        if base[key] != part[key]:
            raise Conflict(f"{what} {part[key]} in FlowExporter {new.name!r} differ from {base[key]} in "
                           f"FlowExporter {owners}")
    for key in ("interfaces", "pods"):
        for selection in part.get(key, []):
            merged.setdefault(key, [])
            if selection not in merged[key]:
                merged[key].append(selection)
    merged["maxFlows"] = max(base["maxFlows"], part["maxFlows"])
    return merged


def plan(exporters: Iterable[Exporter], nodes: dict[str, dict]) -> Plan:
    """Render every node. ``nodes`` maps node name -> labels; exporters must be valid."""
    result = Plan()
    ordered = sorted(exporters, key=lambda e: e.sort_key)
    for exporter in ordered:
        result.targeted[exporter.name] = sorted(n for n, labels in nodes.items()
                                                if selector_matches(exporter.node_selector, labels))
        result.configured[exporter.name] = []
    for node in sorted(nodes):
        config: NodeConfig | None = None
        for exporter in ordered:
            if node not in result.targeted[exporter.name]:
                continue
            part = contribution(exporter, node)
            if config is None:
                config = NodeConfig(node, part, [exporter])
            else:
                try:
                    merged = _merge(config.doc, part, config.owners, exporter)
                    validate_agent_config(merged)
                except Conflict as err:
                    result.conflicts.setdefault(exporter.name, {})[node] = str(err)
                    continue
                except ConfigError as err:
                    owners = ", ".join(repr(o.name) for o in config.owners)
                    result.conflicts.setdefault(exporter.name, {})[node] = (
                        f"merged with FlowExporter {owners} the node config is invalid: {err}")
                    continue
                config.doc = merged
                config.owners.append(exporter)
            result.configured[exporter.name].append(node)
        if config is not None:
            result.nodes[node] = config
    return result
