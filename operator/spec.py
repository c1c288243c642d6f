"""A FlowExporter's spec: typed parse and the validation the CRD schema cannot do.

``parse_exporter(body)`` turns a FlowExporter object into an ``Exporter``
or raises ``SpecError`` whose message names the field (``spec.templates[0].
fields``), the bad value and what is accepted. The final word is the agent's
own schema: the exporter's contribution is rendered into an agent config and
checked with ``kipfix.agent.config.parse_config`` (unknown or unfillable
information elements, templates that do not fit a message, bad interface
patterns, ...).

Two things are checked differently here than on a node, on purpose:

- collector host names are checked for syntax only; the agent resolves them
  on its node (cluster DNS may answer there and not here, and a DNS hiccup
  must not mark a spec invalid);
- TLS files come from a Secret the agent reads; here they are stand-in files.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tempfile
import zlib
from dataclasses import dataclass, field
from typing import Any

from kipfix.agent import labelselector
from kipfix.agent.config import ConfigError, parse_config
from kipfix.agent.labelselector import selector_matches  # noqa: F401 -- render.py and tests use it from here
from kipfix.agent.export.address import split_address
# SECRET_PREFIX: "secret:NAME/KEY" is a key of a Secret the agent reads
from kipfix.agent.contract import DEFAULT_ACTIVE_TIMEOUT, DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_FLOWS, SECRET_PREFIX

TLS_SECRET_KEYS = {"ca": "ca.crt", "cert": "tls.crt", "key": "tls.key"}
TRANSPORTS = ("udp", "tcp", "tls")
STAND_IN_IP = "192.0.2.1"  # TEST-NET-1: replaces host names while validating, never contacted


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
    idle: int = int(DEFAULT_IDLE_TIMEOUT)
    active: int = int(DEFAULT_ACTIVE_TIMEOUT)
    max_flows: int = DEFAULT_MAX_FLOWS
    domain_fixed: int | None = 1  # None: per node

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
        raise SpecError(f"{path}: expected an object, got {type(value).__name__} {value!r}")
    return value


def _list(value: Any, path: str) -> list:
    if value is None:
        return []
    if not isinstance(value, list):
        raise SpecError(f"{path}: expected a list, got {type(value).__name__} {value!r}")
    return value


def _int(value: Any, path: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise SpecError(f"{path}: {value!r} is not accepted; accepted: an integer {lo}..{hi}")
    return value


def _strings(value: Any, path: str) -> tuple[str, ...]:
    items = _list(value, path)
    for i, item in enumerate(items):
        if not isinstance(item, str) or not item:
            raise SpecError(f"{path}[{i}]: {item!r} is not a non-empty string")
    return tuple(items)


def check_selector(selector: Any, path: str) -> dict:
    """A standard label selector (matchLabels, matchExpressions); SpecError names the bad part."""
    try:
        return labelselector.check_selector(selector, path)
    except ValueError as err:
        raise SpecError(str(err)) from None


# ---- sections ----------------------------------------------------------------

def _collector(data: Any, path: str) -> dict:
    data = _mapping(data, path)
    accepted = ("address", "transport", "tls", "maxMessageSize", "description")
    for key in data:
        if key not in accepted:
            raise SpecError(f"{path}.{key}: unknown key; accepted: {', '.join(accepted)}")
    address = data.get("address")
    try:
        split_address(address)
    except ValueError as err:
        raise SpecError(f"{path}.address: {err}") from None
    transport = data.get("transport", "udp")
    if transport not in TRANSPORTS:
        raise SpecError(f"{path}.transport: {transport!r} is not accepted; accepted: {', '.join(TRANSPORTS)}")
    out: dict[str, Any] = {"address": address, "transport": transport}
    if transport == "tls":
        tls = _mapping(data.get("tls"), f"{path}.tls")
        secret = tls.get("secretName")
        if not isinstance(secret, str) or not re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", secret):
            raise SpecError(f"{path}.tls.secretName: {secret!r} is not a Secret name; "
                            "accepted: a DNS subdomain name of a Secret in kipfix's namespace")
        out["tls"] = {key: f"{SECRET_PREFIX}{secret}/{item}" for key, item in TLS_SECRET_KEYS.items()}
        if tls.get("serverName"):
            out["tls"]["serverName"] = tls["serverName"]
    elif data.get("tls") is not None:
        raise SpecError(f"{path}.tls: only valid with transport tls (transport is {transport!r})")
    if "maxMessageSize" in data:
        out["maxMessageSize"] = _int(data["maxMessageSize"], f"{path}.maxMessageSize", 64, 65535)
    if data.get("description"):
        out["description"] = str(data["description"])
    return out


def _template(data: Any, path: str) -> tuple[int, tuple[str, ...], dict | None]:
    """(id, fields, select); ``select`` (ipVersion, protocols) is checked by the agent's schema."""
    data = _mapping(data, path)
    for key in data:
        if key not in ("id", "fields", "select"):
            raise SpecError(f"{path}.{key}: unknown key; accepted: id, fields, select")
    template_id = _int(data.get("id"), f"{path}.id", 256, 65535)
    fields = _strings(data.get("fields"), f"{path}.fields")
    if not fields:
        raise SpecError(f"{path}.fields: empty; a template needs at least one information element")
    select = data.get("select")
    return template_id, fields, (_mapping(select, f"{path}.select") if select is not None else None)


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
    seen: dict[int, int] = {}
    for i, (template_id, *_rest) in enumerate(templates):
        if template_id in seen:
            raise SpecError(f"spec.templates[{i}].id: {template_id} is already used by spec.templates[{seen[template_id]}]"
                            "; accepted: unique ids 256..65535")
        seen[template_id] = i
    interfaces = _mapping(spec.get("interfaces"), "spec.interfaces")
    host = _mapping(interfaces.get("host"), "spec.interfaces.host")
    pods = interfaces.get("pods")
    if pods is not None:
        pods = dict(_mapping(pods, "spec.interfaces.pods"))
        check_selector(pods.get("namespaceSelector"), "spec.interfaces.pods.namespaceSelector")
        check_selector(pods.get("podSelector"), "spec.interfaces.pods.podSelector")
        pods["interfaces"] = list(_strings(pods.get("interfaces", ["eth0"]), "spec.interfaces.pods.interfaces")
                                  or ["eth0"])
    if interfaces.get("host") is None and pods is None:
        raise SpecError("spec.interfaces: give host (names in the node's network namespace), pods, or both")
    timeouts = _mapping(spec.get("timeouts"), "spec.timeouts")
    idle = _int(timeouts.get("idle", int(DEFAULT_IDLE_TIMEOUT)), "spec.timeouts.idle", 1, 86400)
    active = _int(timeouts.get("active", int(DEFAULT_ACTIVE_TIMEOUT)), "spec.timeouts.active", 1, 86400)
    if idle > active:
        raise SpecError(f"spec.timeouts.idle: {idle} s is longer than spec.timeouts.active ({active} s); "
                        "accepted: idle <= active")
    domain = _mapping(spec.get("observationDomainId"), "spec.observationDomainId")
    per_node = domain.get("perNode") is True
    if per_node and "fixed" in domain:
        raise SpecError("spec.observationDomainId: give exactly one of fixed or perNode: true, not both")
    fixed = None if per_node else _int(domain.get("fixed", 1), "spec.observationDomainId.fixed", 0, 2**32 - 1)
    exporter = Exporter(
        name=meta.get("name", ""), uid=meta.get("uid", ""), created=str(meta.get("creationTimestamp", "")),
        generation=int(meta.get("generation") or 0), node_selector=selector, collectors=collectors,
        templates=templates,
        host_names=_strings(host.get("names"), "spec.interfaces.host.names") if interfaces.get("host") else (),
        host_exclude=_strings(host.get("exclude"), "spec.interfaces.host.exclude"), pods=pods,
        idle=idle, active=active,
        max_flows=_int(spec.get("maxFlows", DEFAULT_MAX_FLOWS), "spec.maxFlows", 16, 16_777_216),
        domain_fixed=fixed)
    if interfaces.get("host") is not None and not exporter.host_names:
        raise SpecError("spec.interfaces.host.names: empty; give interface names, globs (ens*) or /regex/")
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


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
        return True
    except ValueError:
        return False


def validate_agent_config(doc: dict) -> None:
    """parse_config on a rendered doc, without DNS and with stand-in TLS files; ConfigError."""
    with tempfile.TemporaryDirectory(prefix="kipfix-validate-") as tmp:
        stand_in = os.path.join(tmp, "stand-in.pem")
        with open(stand_in, "w", encoding="ascii") as handle:
            handle.write("stand-in\n")
        checked = dict(doc)
        checked["collectors"] = []
        for collector in doc.get("collectors", []):
            collector = dict(collector)
            host, port = split_address(collector["address"])
            if not _is_ip(host.strip("[]")):
                collector["address"] = f"{STAND_IN_IP}:{port}"
            if "tls" in collector:
                collector["tls"] = {k: (stand_in if isinstance(v, str) and v.startswith(SECRET_PREFIX) else v)
                                    for k, v in collector["tls"].items()}
            checked["collectors"].append(collector)
        parse_config(checked)


def spec_path(agent_message: str) -> str:
    """Rewrite an agent config key path (templates[0].fields: ...) into the spec's (spec.templates[0]...)."""
    message = re.sub(r"^interfaces\[\d+\]", "spec.interfaces.host", agent_message)
    message = re.sub(r"^observationDomainId", "spec.observationDomainId.fixed", message)
    if not message.startswith("spec."):
        message = "spec." + message
    return message


def _check_with_agent_schema(exporter: Exporter) -> None:
    try:
        validate_agent_config(contribution(exporter, "validation"))
    except ConfigError as err:
        raise SpecError(spec_path(str(err))) from None
