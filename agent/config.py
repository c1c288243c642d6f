"""The agent's configuration file: schema, defaults and validation.

The shape follows linux-flow-exporter's YAML (``collectors``, ``templates``
with ``id`` and ``template``, ``interfaces``), so existing files load with at
most renamed timer keys. The operator imports this module to render and
validate per-node configuration, so it is the one schema for both.

Every error names the key path, the bad value and what is accepted.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from typing import Any

import yaml

from .contract import (DEFAULT_ACTIVE_TIMEOUT, DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_FLOWS, DEFAULT_METRICS_PORT,
                       DEFAULT_PEN, DEFAULT_PIN_PATH)

MAX_FLOWS_RANGE = (16, 16_777_216)
MESSAGE_SIZE_RANGE = (64, 65_535)
TRANSPORTS = ("udp", "tcp", "tls")


class ConfigError(ValueError):
    """A user mistake in the configuration; the message is ready to print."""


@dataclass(frozen=True)
class TLSConfig:
    ca_file: str
    cert_file: str | None = None
    key_file: str | None = None
    server_name: str | None = None


@dataclass(frozen=True)
class CollectorConfig:
    address: str
    host: str
    port: int
    transport: str = "udp"
    tls: TLSConfig | None = None
    max_message_size: int = 1400
    template_refresh_seconds: float = 60.0
    template_refresh_messages: int = 100
    queue_size: int = 65536
    description: str = ""


@dataclass(frozen=True)
class TemplateConfig:
    """A template; ``ip_versions`` and ``protocols`` (``select``) narrow the flows it takes (empty: all
    its address elements can carry). Each flow goes to the first template that selects it."""

    id: int
    fields: tuple[str, ...]
    ip_versions: tuple[int, ...] = ()
    protocols: tuple[int, ...] = ()


@dataclass(frozen=True)
class InterfaceSelection:
    """Interfaces to meter in one network namespace ("" is the host's)."""

    netns: str = ""
    names: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()


@dataclass(frozen=True)
class PodSelection:
    """Interfaces inside the network namespaces of selected pods on the node.

    Selectors are Kubernetes label selectors as dicts (empty: all). Only
    ``kipfix agent --kubernetes`` can meter pods: it watches them.
    """

    namespace_selector: dict = field(default_factory=dict)
    pod_selector: dict = field(default_factory=dict)
    names: tuple[str, ...] = ("eth0",)

    def describe(self) -> str:
        parts = [f"{what} {sel}" for what, sel in (("namespaceSelector", self.namespace_selector),
                                                   ("podSelector", self.pod_selector)) if sel]
        return f"pods ({', '.join(parts) or 'all'}) interfaces {', '.join(self.names)}"


@dataclass(frozen=True)
class Timeouts:
    idle: float = DEFAULT_IDLE_TIMEOUT
    active: float = DEFAULT_ACTIVE_TIMEOUT


@dataclass(frozen=True)
class MetricsConfig:
    """Where the agent serves Prometheus metrics (``/metrics``)."""

    address: str = "0.0.0.0"
    port: int = DEFAULT_METRICS_PORT
    enabled: bool = True


@dataclass(frozen=True)
class AgentConfig:
    collectors: tuple[CollectorConfig, ...] = ()
    templates: tuple[TemplateConfig, ...] = ()
    interfaces: tuple[InterfaceSelection, ...] = ()
    pods: tuple[PodSelection, ...] = ()
    timeouts: Timeouts = field(default_factory=Timeouts)
    max_flows: int = DEFAULT_MAX_FLOWS
    drain_interval: float = 1.0
    observation_domain_id: int = 1
    enterprise_number: int = DEFAULT_PEN
    json_lines: str | None = None
    pin_path: str = DEFAULT_PIN_PATH
    metrics: MetricsConfig = field(default_factory=MetricsConfig)


# ---- parsing helpers -------------------------------------------------------

def _mapping(value: Any, path: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__} {value!r}")
    return value


def _sequence(value: Any, path: str) -> list:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ConfigError(f"{path}: expected a list, got {type(value).__name__} {value!r}")
    return value


def _reject_unknown(data: dict, accepted: tuple[str, ...], path: str) -> None:
    for key in data:
        if key not in accepted:
            where = f"{path}.{key}" if path else str(key)
            raise ConfigError(f"{where}: unknown key; accepted keys here: {', '.join(accepted)}")


def _int(value: Any, path: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{path}: {value!r} is not an integer; accepted: {lo}..{hi}")
    if not lo <= value <= hi:
        raise ConfigError(f"{path}: {value} is out of range; accepted: {lo}..{hi}")
    return value


def _seconds(value: Any, path: str, hi: float = 86_400) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{path}: {value!r} is not a number of seconds; accepted: > 0 and <= {hi:g}")
    if not 0 < value <= hi:
        raise ConfigError(f"{path}: {value!r} is out of range; accepted: > 0 and <= {hi:g} seconds")
    return float(value)


def _str(value: Any, path: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{path}: {value!r} is not a string")
    return value


def _strings(value: Any, path: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    return tuple(_str(v, f"{path}[{i}]") for i, v in enumerate(_sequence(value, path)))


# ---- sections ----------------------------------------------------------------

def _tls(data: Any, path: str) -> TLSConfig:
    data = _mapping(data, path)
    _reject_unknown(data, ("ca", "cert", "key", "serverName"), path)
    if "ca" not in data:
        raise ConfigError(f"{path}.ca: required for transport tls (a PEM file with the collector's CA)")
    files = {k: data.get(k) for k in ("ca", "cert", "key")}
    for key, value in files.items():
        if value is None:
            continue
        _str(value, f"{path}.{key}")
        if not os.path.isfile(value):
            raise ConfigError(f"{path}.{key}: file {value!r} does not exist; accepted: a readable PEM file")
    if (files["cert"] is None) != (files["key"] is None):
        raise ConfigError(f"{path}: cert and key go together (client authentication); give both or neither")
    server_name = data.get("serverName")
    return TLSConfig(files["ca"], files["cert"], files["key"],
                     _str(server_name, f"{path}.serverName") if server_name is not None else None)


def _collector(data: Any, path: str) -> CollectorConfig:
    from .export.address import parse_collector_address

    data = _mapping(data, path)
    _reject_unknown(data, ("address", "transport", "tls", "maxMessageSize", "templateRefreshSeconds",
                           "templateRefreshMessages", "queueSize", "description"), path)
    if "address" not in data:
        raise ConfigError(f"{path}.address: required (host:port or [ipv6]:port)")
    address = _str(data["address"], f"{path}.address")
    try:
        host, port = parse_collector_address(address)
    except ValueError as err:
        raise ConfigError(f"{path}.address: {err}") from None
    transport = data.get("transport", "udp")
    if transport not in TRANSPORTS:
        raise ConfigError(f"{path}.transport: {transport!r} is not accepted; accepted: {', '.join(TRANSPORTS)}")
    tls = None
    if transport == "tls":
        tls = _tls(data.get("tls"), f"{path}.tls")
    elif "tls" in data:
        raise ConfigError(f"{path}.tls: only valid with transport tls (transport is {transport!r})")
    return CollectorConfig(
        address=address, host=host, port=port, transport=transport, tls=tls,
        max_message_size=_int(data.get("maxMessageSize", 1400), f"{path}.maxMessageSize", *MESSAGE_SIZE_RANGE),
        template_refresh_seconds=_seconds(data.get("templateRefreshSeconds", 60),
                                          f"{path}.templateRefreshSeconds"),
        template_refresh_messages=_int(data.get("templateRefreshMessages", 100),
                                       f"{path}.templateRefreshMessages", 1, 1_000_000),
        queue_size=_int(data.get("queueSize", 65536), f"{path}.queueSize", 1, 16_777_216),
        description=_str(data.get("description", ""), f"{path}.description"),
    )


def _template(data: Any, path: str) -> TemplateConfig:
    from .export.ipfix.fields import check_template_fields

    data = _mapping(data, path)
    _reject_unknown(data, ("id", "template", "fields", "select"), path)
    if "id" not in data:
        raise ConfigError(f"{path}.id: required (256..65535)")
    template_id = _int(data["id"], f"{path}.id", 256, 65535)
    if ("template" in data) == ("fields" in data):
        raise ConfigError(f"{path}: give the element list as exactly one of 'template' or 'fields'")
    key = "template" if "template" in data else "fields"
    names = _strings(data[key], f"{path}.{key}")
    if not names:
        raise ConfigError(f"{path}.{key}: empty; a template needs at least one information element")
    try:
        check_template_fields(names)
    except ValueError as err:
        raise ConfigError(f"{path}.{key}: {err}") from None
    return TemplateConfig(template_id, names, *_template_selection(data.get("select"), f"{path}.select"))


def _template_selection(data: Any, path: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``select: {ipVersion: 4 | 6 | [4, 6], protocols: [tcp, udp, 1, ...]}``: the flows a template takes."""
    from .export.ipfix.selection import protocol_number

    data = _mapping(data, path)
    _reject_unknown(data, ("ipVersion", "protocols"), path)
    versions = data.get("ipVersion", [])
    versions = versions if isinstance(versions, list) else [versions]
    for version in versions:
        if isinstance(version, bool) or version not in (4, 6):
            raise ConfigError(f"{path}.ipVersion: {version!r:.60} is not accepted; accepted: 4, 6 or [4, 6]")
    protocols = data.get("protocols", [])
    protocols = protocols if isinstance(protocols, list) else [protocols]
    numbers = []
    for i, protocol in enumerate(protocols):
        try:
            numbers.append(protocol_number(protocol))
        except ValueError as err:
            raise ConfigError(f"{path}.protocols[{i}]: {err}") from None
    if "protocols" in data and not numbers:
        raise ConfigError(f"{path}.protocols: empty; accepted: protocol names or numbers (leave the key out "
                          "for every protocol)")
    return tuple(sorted(set(versions))), tuple(sorted(set(numbers)))


def _selection(data: Any, path: str) -> InterfaceSelection:
    from .datapath.ifselect import validate_patterns

    data = _mapping(data, path)
    _reject_unknown(data, ("netns", "names", "exclude"), path)
    netns = data.get("netns", "") or ""
    _str(netns, f"{path}.netns")
    names = _strings(data.get("names"), f"{path}.names")
    if not names:
        raise ConfigError(f"{path}.names: empty; give interface names, globs (veth*) or /regex/")
    exclude = _strings(data.get("exclude"), f"{path}.exclude")
    for key, patterns in (("names", names), ("exclude", exclude)):
        try:
            validate_patterns(patterns)
        except ValueError as err:
            raise ConfigError(f"{path}.{key}: {err}") from None
    return InterfaceSelection(netns, names, exclude)


def _pod_selection(data: Any, path: str) -> PodSelection:
    from .datapath.ifselect import validate_patterns
    from .labelselector import check_selector

    data = _mapping(data, path)
    _reject_unknown(data, ("namespaceSelector", "podSelector", "interfaces"), path)
    selectors = {}
    for key in ("namespaceSelector", "podSelector"):
        try:
            selectors[key] = check_selector(data.get(key), f"{path}.{key}")
        except ValueError as err:
            raise ConfigError(str(err)) from None
    names = _strings(data.get("interfaces", ["eth0"]), f"{path}.interfaces") or ("eth0",)
    try:
        validate_patterns(names)
    except ValueError as err:
        raise ConfigError(f"{path}.interfaces: {err}") from None
    return PodSelection(selectors["namespaceSelector"], selectors["podSelector"], names)


def _timeouts(data: Any) -> Timeouts:
    data = _mapping(data, "timeouts")
    _reject_unknown(data, ("idle", "active"), "timeouts")
    idle = _seconds(data.get("idle", DEFAULT_IDLE_TIMEOUT), "timeouts.idle")
    active = _seconds(data.get("active", DEFAULT_ACTIVE_TIMEOUT), "timeouts.active")
    return Timeouts(idle, active)


def _metrics(data: Any) -> MetricsConfig:
    data = _mapping(data, "metrics")
    _reject_unknown(data, ("address", "port", "enabled"), "metrics")
    address = _str(data.get("address", "0.0.0.0"), "metrics.address")
    try:
        ipaddress.ip_address(address)
    except ValueError:
        raise ConfigError(f"metrics.address: {address!r} is not an IP address; accepted: an IPv4 or IPv6 "
                          "address to listen on (0.0.0.0 or :: for all)") from None
    enabled = data.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ConfigError(f"metrics.enabled: {enabled!r} is not accepted; accepted: true, false")
    return MetricsConfig(address, _int(data.get("port", DEFAULT_METRICS_PORT), "metrics.port", 1, 65535), enabled)


TOP_LEVEL_KEYS = ("collectors", "templates", "interfaces", "pods", "timeouts", "maxFlows", "drainInterval",
                  "observationDomainId", "enterpriseNumber", "jsonLines", "pinPath", "metrics")


def parse_config(data: Any) -> AgentConfig:
    """Validate a decoded YAML document and build the AgentConfig."""
    data = _mapping(data, "(top level)")
    _reject_unknown(data, TOP_LEVEL_KEYS, "")
    collectors = tuple(_collector(c, f"collectors[{i}]")
                       for i, c in enumerate(_sequence(data.get("collectors"), "collectors")))
    templates = tuple(_template(t, f"templates[{i}]")
                      for i, t in enumerate(_sequence(data.get("templates"), "templates")))
    seen: dict[int, int] = {}
    for i, template in enumerate(templates):
        if template.id in seen:
            raise ConfigError(f"templates[{i}].id: {template.id} is already used by templates[{seen[template.id]}];"
                              " accepted: unique ids 256..65535")
        seen[template.id] = i
    _check_template_selection(templates)
    if collectors and not templates:
        raise ConfigError("templates: collectors are configured but no template says what to export")
    for i, collector in enumerate(collectors):
        for template in templates:
            _check_template_fits(template, collector, f"collectors[{i}].maxMessageSize")
    interfaces = tuple(_selection(s, f"interfaces[{i}]")
                       for i, s in enumerate(_sequence(data.get("interfaces"), "interfaces")))
    pods = tuple(_pod_selection(s, f"pods[{i}]") for i, s in enumerate(_sequence(data.get("pods"), "pods")))
    json_lines = data.get("jsonLines")
    if json_lines is not None:
        _str(json_lines, "jsonLines")
    config = AgentConfig(
        collectors=collectors,
        templates=templates,
        interfaces=interfaces,
        pods=pods,
        timeouts=_timeouts(data.get("timeouts")),
        max_flows=_int(data.get("maxFlows", DEFAULT_MAX_FLOWS), "maxFlows", *MAX_FLOWS_RANGE),
        drain_interval=_seconds(data.get("drainInterval", 1.0), "drainInterval", hi=60),
        observation_domain_id=_int(data.get("observationDomainId", 1), "observationDomainId", 0, 2**32 - 1),
        enterprise_number=_int(data.get("enterpriseNumber", DEFAULT_PEN), "enterpriseNumber", 1, 2**32 - 1),
        json_lines=json_lines,
        pin_path=_str(data.get("pinPath", DEFAULT_PIN_PATH), "pinPath"),
        metrics=_metrics(data.get("metrics")),
    )
    if config.timeouts.idle > config.timeouts.active:
        raise ConfigError(f"timeouts.idle: {config.timeouts.idle:g} s is longer than timeouts.active "
                          f"({config.timeouts.active:g} s); accepted: idle <= active")
    return config


def _check_template_selection(templates: tuple[TemplateConfig, ...]) -> None:
    from .export.ipfix.selection import plan_templates

    try:
        plan_templates(templates)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _check_template_fits(template: TemplateConfig, collector: CollectorConfig, path: str) -> None:
    from .export.ipfix.selection import record_lengths

    # Message header (16) + set header (4) + one record must fit, or nothing is ever sent; a template
    # may be sent as two (split per family, or a derived counterpart): the larger decides.
    need = 16 + 4 + max(record_lengths(template))
    if need > collector.max_message_size:
        raise ConfigError(f"{path}: {collector.max_message_size} octets cannot hold one record of template "
                          f"{template.id} ({need} octets with headers); accepted: >= {need}")


def load_config(path: str) -> AgentConfig:
    """Read and validate a YAML file; ConfigError names what is wrong."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle)
    except OSError as err:
        raise ConfigError(f"cannot read config file {path!r}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {err}") from None
    try:
        return parse_config(data)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
