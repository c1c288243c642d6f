"""A FlowExporter's spec: its shape here, its values by the agent's own schema.

``parse_exporter(body)`` turns a FlowExporter object into an ``Exporter``
or raises ``SpecError`` whose message names the field (``spec.templates[0].
fields``), the bad value and what is accepted.

This module checks only what is particular to a FlowExporter: its shape
(``interfaces.host`` / ``pods``, ``observationDomainId.fixed`` or
``perNode``, ``tls.secretName``), that it names at least one collector and
template, and its node selector. Every value rule -- ranges, transports,
addresses, element names, interface patterns, timeouts, a template that must
fit a message -- belongs to the agent: the exporter's contribution is
rendered into an agent config and checked with the same pure
``kipfix.agent.config.parse_config`` the agent runs, with nothing stood in
for (host names are checked for syntax there; the agent resolves them on
its node, where cluster DNS answers; TLS files stay ``secret:NAME/KEY``
references the agent reads on its node). The agent's key paths are
rewritten into the spec's.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass, field
from typing import Any

from kipfix.agent import labelselector
from kipfix.agent.config import ConfigError, parse_config, show, show_key
from kipfix.agent.config.rules import (DEFAULT_OBSERVATION_DOMAIN_ID, DEFAULT_POD_INTERFACES, SECRET_NAME_MAX_LENGTH,
                                      SECRET_NAME_PATTERN)
from kipfix.agent.labelselector import selector_matches  # noqa: F401 -- render.py and tests use it from here
# SECRET_PREFIX: "secret:NAME/KEY" is a key of a Secret the agent reads
from kipfix.agent.contract import DEFAULT_ACTIVE_TIMEOUT, DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_FLOWS, SECRET_PREFIX

TLS_SECRET_KEYS = {"ca": "ca.crt", "cert": "tls.crt", "key": "tls.key"}
POD_KEYS = ("namespaceSelector", "podSelector", "interfaces")


class SpecError(ValueError):
    """An invalid FlowExporter spec; the message names the field and the bad value."""


@dataclass(frozen=True)
class Exporter:
    """One valid FlowExporter, ready to render."""

    name: str
    uid: str
    created: str  # metadata.creationTimestamp: older exporters win conflicts
    generation: int
    node_selector: dict = field(default_factory=dict)
    collectors: tuple[dict, ...] = ()  # agent config shape (tls files as secret: references)
    templates: tuple[tuple[int, tuple[str, ...], dict | None], ...] = ()  # (id, fields, select)
    host_names: tuple[str, ...] = ()
    host_exclude: tuple[str, ...] = ()
    pods: dict | None = None
    # checked by the agent's schema, as everything in the rendered config (_check_with_agent_schema)
    idle: int = int(DEFAULT_IDLE_TIMEOUT)
    active: int = int(DEFAULT_ACTIVE_TIMEOUT)
    max_flows: int = DEFAULT_MAX_FLOWS
    domain_fixed: int | None = DEFAULT_OBSERVATION_DOMAIN_ID  # None: per node

    @property
    def sort_key(self) -> tuple[str, str]:
        return (self.created, self.name)

    def domain_id(self, node: str) -> int:
        return self.domain_fixed if self.domain_fixed is not None else per_node_domain_id(node)

    def collector_summary(self) -> str:
        return ",".join(f"{c.get('transport', 'udp')}/{c['address']}" for c in self.collectors)


def per_node_domain_id(node: str) -> int:
    """A stable id from the node name: CRC-32 folded into 1..2^31-1."""
    return (zlib.crc32(node.encode()) & 0x7FFFFFFF) or 1


# ---- small checks ----------------------------------------------------------

def _mapping(value: Any, path: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SpecError(f"{path}: expected an object, got {type(value).__name__} {show(value)}")
    return value


def _list(value: Any, path: str) -> list:
    if value is None:
        return []
    if not isinstance(value, list):
        raise SpecError(f"{path}: expected a list, got {type(value).__name__} {show(value)}")
    return value


def check_selector(selector: Any, path: str) -> dict:
    """A standard label selector (matchLabels, matchExpressions); SpecError names the bad part."""
    try:
        return labelselector.check_selector(selector, path)
    except ValueError as err:
        raise SpecError(str(err)) from None


# ---- sections ----------------------------------------------------------------

def _collector(data: Any, path: str) -> dict:
    """The collector in the agent's shape: the Secret becomes ``secret:NAME/KEY`` file references."""
    data = _mapping(data, path)
    accepted = ("address", "transport", "tls", "maxMessageSize", "description", "pacing", "maxMessagesPerSecond",
                "sendBuffer")
    for key in data:
        if key not in accepted:
            raise SpecError(f"{path}.{show_key(key)}: unknown key; accepted: {', '.join(accepted)}")
    # the same spellings as before this module left the checks to the agent: rendered configs keep their hash
    out = {"address": data.get("address"), "transport": data.get("transport", "udp")}
    if "maxMessageSize" in data:
        out["maxMessageSize"] = data["maxMessageSize"]
    if data.get("description"):
        out["description"] = data["description"]
    if "tls" in data and data.get("transport") == "tls":
        tls = _mapping(data.get("tls"), f"{path}.tls")
        secret = tls.get("secretName")
        if not isinstance(secret, str) or len(secret) > SECRET_NAME_MAX_LENGTH or \
                not re.fullmatch(SECRET_NAME_PATTERN, secret):
            raise SpecError(f"{path}.tls.secretName: {show(secret)} is not a Secret name; "
                            "accepted: a DNS subdomain name of a Secret in kipfix's namespace")
        out["tls"] = {key: f"{SECRET_PREFIX}{secret}/{item}" for key, item in TLS_SECRET_KEYS.items()}
        if tls.get("serverName") is not None:
            out["tls"]["serverName"] = tls["serverName"]
    elif data.get("transport") == "tls":
        raise SpecError(f"{path}.tls.secretName: None is not a Secret name; accepted: a DNS subdomain name of a "
                        "Secret in kipfix's namespace (transport tls needs tls.secretName)")
    elif "tls" in data:
        out["tls"] = data["tls"]  # the agent says it is only valid with transport tls
    for key in ("pacing", "maxMessagesPerSecond", "sendBuffer"):  # the agent's own schema checks them
        if key in data:
            out[key] = data[key]
    return out


def _template(data: Any, path: str) -> tuple[Any, tuple, dict | None]:
    """(id, fields, select); the agent's schema checks the values (select: ipVersion, protocols)."""
    data = _mapping(data, path)
    for key in data:
        if key not in ("id", "fields", "select"):
            raise SpecError(f"{path}.{show_key(key)}: unknown key; accepted: id, fields, select")
    fields = data.get("fields")
    if not isinstance(fields, list) or not fields:
        raise SpecError(f"{path}.fields: {show(fields)} is not accepted; accepted: a non-empty list of "
                        "information element names")
    select = data.get("select")
    return data.get("id"), tuple(fields), (_mapping(select, f"{path}.select") if select is not None else None)


def parse_exporter(body: dict) -> Exporter:
    """Typed FlowExporter or SpecError naming the first problem."""
    meta = body.get("metadata") or {}
    spec = _mapping(body.get("spec"), "spec")
    selector = check_selector(spec.get("nodeSelector"), "spec.nodeSelector")
    collectors = tuple(_collector(c, f"spec.collectors[{i}]")
                       for i, c in enumerate(_list(spec.get("collectors"), "spec.collectors")))
    if not collectors:
        raise SpecError("spec.collectors: empty; give at least one collector (address host:port)")
    templates = tuple(_template(t, f"spec.templates[{i}]")
                      for i, t in enumerate(_list(spec.get("templates"), "spec.templates")))
    if not templates:
        raise SpecError("spec.templates: empty; give at least one template (id, fields)")
    interfaces = _mapping(spec.get("interfaces"), "spec.interfaces")
    host = _mapping(interfaces.get("host"), "spec.interfaces.host")
    pods = interfaces.get("pods")
    if pods is not None:
        pods = dict(_mapping(pods, "spec.interfaces.pods"))
        for key in pods:
            if key not in POD_KEYS:
                raise SpecError(f"spec.interfaces.pods.{show_key(key)}: unknown key; accepted: {', '.join(POD_KEYS)}")
        pods["interfaces"] = list(_list(pods.get("interfaces"), "spec.interfaces.pods.interfaces")
                                  or DEFAULT_POD_INTERFACES)
    if interfaces.get("host") is None and pods is None:
        raise SpecError("spec.interfaces: give host (names in the node's network namespace), pods, or both")
    host_names = tuple(_list(host.get("names"), "spec.interfaces.host.names"))
    if interfaces.get("host") is not None and not host_names:
        raise SpecError("spec.interfaces.host.names: empty; give interface names, globs (ens*) or /regex/")
    timeouts = _mapping(spec.get("timeouts"), "spec.timeouts")
    domain = _mapping(spec.get("observationDomainId"), "spec.observationDomainId")
    per_node = domain.get("perNode") is True
    if "observationDomainId" in spec and per_node == ("fixed" in domain):  # absent altogether: fixed 1
        raise SpecError("spec.observationDomainId: give exactly one of fixed or perNode: true "
                        f"({'both given' if per_node else 'neither given'})")
    exporter = Exporter(
        name=meta.get("name", ""), uid=meta.get("uid", ""), created=str(meta.get("creationTimestamp", "")),
        generation=int(meta.get("generation") or 0), node_selector=selector, collectors=collectors,
        templates=templates, host_names=host_names,
        host_exclude=tuple(_list(host.get("exclude"), "spec.interfaces.host.exclude")), pods=pods,
        idle=timeouts.get("idle", int(DEFAULT_IDLE_TIMEOUT)), active=timeouts.get("active", int(DEFAULT_ACTIVE_TIMEOUT)),
        max_flows=spec.get("maxFlows", DEFAULT_MAX_FLOWS),
        domain_fixed=None if per_node else domain.get("fixed", DEFAULT_OBSERVATION_DOMAIN_ID))
    _check_with_agent_schema(exporter)
    return exporter


# ---- the agent's own rules -----------------------------------------------------

def contribution(exporter: Exporter, node: str) -> dict:
    """This exporter's part of a node's agent config (agent YAML shape)."""
    doc: dict[str, Any] = {
        "collectors": [dict(c) for c in exporter.collectors],
        "templates": [{"id": tid, "fields": list(fields), **({"select": dict(select)} if select else {})}
                      for tid, fields, select in exporter.templates],
        "interfaces": [],
        "timeouts": {"idle": exporter.idle, "active": exporter.active},
        "maxFlows": exporter.max_flows,
        "observationDomainId": exporter.domain_id(node),
    }
    if exporter.host_names:
        selection: dict[str, Any] = {"netns": "", "names": list(exporter.host_names)}
        if exporter.host_exclude:
            selection["exclude"] = list(exporter.host_exclude)
        doc["interfaces"].append(selection)
    if exporter.pods is not None:
        doc["pods"] = [{key: exporter.pods[key] for key in ("namespaceSelector", "podSelector", "interfaces")
                        if exporter.pods.get(key) is not None}]
    return doc


def validate_agent_config(doc: dict) -> None:
    """The agent's own parse of a rendered node config, as the agent will run it; ConfigError."""
    parse_config(doc)


# Agent key paths and the FlowExporter fields they come from (contribution() is the other direction).
_SPEC_PATHS = (
    (r"interfaces\[\d+\]", "spec.interfaces.host"),
    (r"pods\[\d+\]", "spec.interfaces.pods"),
    (r"observationDomainId", "spec.observationDomainId.fixed"),
    (r"(collectors|templates)\[(\d+)\]", r"spec.\1[\2]"),
    (r"(timeouts\.idle|timeouts\.active|timeouts|maxFlows)", r"spec.\1"),
)


def spec_path(agent_message: str) -> str:
    """Rewrite the agent's key paths in a message (templates[0].fields: ...) into the spec's
    (spec.templates[0].fields: ...), wherever they appear in it."""
    message = agent_message
    for agent, spec in _SPEC_PATHS:
        message = re.sub(rf"(?<![\w.]){agent}(?![\w])", spec, message)
    if not message.startswith("spec."):
        message = "spec." + message
    return message


def _check_with_agent_schema(exporter: Exporter) -> None:
    try:
        validate_agent_config(contribution(exporter, "validation"))
    except ConfigError as err:
        raise SpecError(spec_path(str(err))) from None
