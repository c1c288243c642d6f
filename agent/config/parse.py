"""Plain data (a decoded YAML document) to an ``AgentConfig``: the schema, defaults and validation.

The shape follows linux-flow-exporter's YAML (``collectors``, ``templates``
with ``id`` and ``template``, ``interfaces``), so existing files load with at
most renamed timer keys.

Pure: no DNS, no file system, no clock. What needs the host -- names that
resolve, TLS files that are PEM, a writable jsonLines directory, a netns
path that is a network namespace, a pin path on bpffs -- is ``resolve.py``'s
job, in the agent. So the operator validates a FlowExporter with this very
parse, and a value is valid or not wherever it is parsed.

Every error names the key path, the bad value (shortened) and what is
accepted. The rules' numbers and patterns are in ``rules.py``.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from ..contract import (DEFAULT_ACTIVE_TIMEOUT, DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_FLOWS, DEFAULT_METRICS_PORT,
                        DEFAULT_PEN, DEFAULT_PIN_PATH)
from .errors import ConfigError, show, show_key
from .model import (AgentConfig, CollectorConfig, InterfaceSelection, MetricsBasicAuth, MetricsConfig, MetricsTLS,
                    PodSelection, TemplateConfig, Timeouts, TLSConfig)
from .rules import (DEFAULT_JSON_LINES_MODE, DEFAULT_PACING, JSON_LINES_MODE_PATTERN, MESSAGE_RATE_RANGE, PACING,
                    SEND_BUFFER_RANGE)
from .rules import (COLLECTOR_ADDRESS_MAX_LENGTH, COLLECTOR_ADDRESS_PATTERN, DEFAULT_DRAIN_INTERVAL,
                    DEFAULT_MESSAGE_SIZE, DEFAULT_METRICS_ADDRESS, DEFAULT_OBSERVATION_DOMAIN_ID,
                    DEFAULT_POD_INTERFACES, DEFAULT_QUEUE_SIZE, DEFAULT_TEMPLATE_REFRESH_MESSAGES,
                    DEFAULT_TEMPLATE_REFRESH_SECONDS, DESCRIPTION_MAX_LENGTH, DRAIN_INTERVAL_MAX,
                    ELEMENT_NAME_MAX_LENGTH, ENTERPRISE_NUMBER_RANGE, INTERFACE_PATTERN_MAX_LENGTH,
                    JSON_LINES_STDOUT, MAX_FLOWS_RANGE, MESSAGE_SIZE_RANGE, NETNS_MAX_LENGTH,
                    OBSERVATION_DOMAIN_ID_RANGE, PATH_MAX_LENGTH, PIN_PATH_PATTERN, PORT_RANGE, PROTOCOL_RANGE,
                    QUEUE_SIZE_RANGE, SELECT_IP_VERSIONS,
                    SERVER_NAME_MAX_LENGTH, TEMPLATE_ID_RANGE, TEMPLATE_REFRESH_MESSAGES_RANGE,
                    TEMPLATE_REFRESH_SECONDS_MAX, TIMEOUT_MAX, TRANSPORTS)

TOP_LEVEL_KEYS = ("collectors", "templates", "interfaces", "pods", "timeouts", "maxFlows", "drainInterval",
                  "observationDomainId", "enterpriseNumber", "jsonLines", "jsonLinesMode", "pinPath", "metrics")


# ---- value helpers ---------------------------------------------------------------

def _mapping(value: Any, path: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__} {show(value)}")
    return value


def _sequence(value: Any, path: str) -> list:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ConfigError(f"{path}: expected a list, got {type(value).__name__} {show(value)}")
    return value


def _reject_unknown(data: dict, accepted: tuple[str, ...], path: str) -> None:
    for key in data:
        if key not in accepted:
            raise ConfigError(f"{f'{path}.' if path else ''}{show_key(key)}: unknown key; accepted keys here: "
                              f"{', '.join(accepted)}")


def _int(value: Any, path: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{path}: {show(value)} is not an integer; accepted: {lo}..{hi}")
    if not lo <= value <= hi:
        raise ConfigError(f"{path}: {show(value)} is out of range; accepted: {lo}..{hi}")
    return value


def _seconds(value: Any, path: str, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{path}: {show(value)} is not a number of seconds; accepted: > 0 and <= {hi:g}")
    if not 0 < value <= hi:
        raise ConfigError(f"{path}: {show(value)} is out of range; accepted: > 0 and <= {hi:g} seconds")
    return float(value)


def _str(value: Any, path: str, max_length: int, what: str = "a string") -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{path}: {show(value)} is not a string; accepted: {what}")
    if len(value) > max_length:
        raise ConfigError(f"{path}: {show(value)} is longer than {max_length} characters; accepted: {what} "
                          f"of at most {max_length} characters")
    if "\0" in value:
        raise ConfigError(f"{path}: {show(value)} contains NUL; accepted: {what}")
    return value


def _strings(value: Any, path: str, max_length: int, what: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    return tuple(_str(v, f"{path}[{i}]", max_length, what) for i, v in enumerate(_sequence(value, path)))


def _bool(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{path}: {show(value)} is not accepted; accepted: true, false")
    return value


def _interface_patterns(value: Any, path: str) -> tuple[str, ...]:
    from ..datapath.ifselect import validate_patterns

    patterns = _strings(value, path, INTERFACE_PATTERN_MAX_LENGTH, "an interface name, glob (veth*) or /regex/")
    try:
        validate_patterns(patterns)
    except ValueError as err:
        raise ConfigError(f"{path}: {err}") from None
    return patterns


# ---- sections -----------------------------------------------------------------------

def _tls(data: Any, path: str) -> TLSConfig:
    data = _mapping(data, path)
    _reject_unknown(data, ("ca", "cert", "key", "serverName"), path)
    if "ca" not in data:
        raise ConfigError(f"{path}.ca: required for transport tls (a PEM file with the collector's CA)")
    files = {}
    for key in ("ca", "cert", "key"):
        value = data.get(key)
        if value is not None:
            value = _str(value, f"{path}.{key}", PATH_MAX_LENGTH, "the path of a PEM file")
            if not value:
                raise ConfigError(f"{path}.{key}: empty; accepted: the path of a PEM file")
        files[key] = value
    if (files["cert"] is None) != (files["key"] is None):
        raise ConfigError(f"{path}: cert and key go together (client authentication); give both or neither")
    server_name = data.get("serverName")
    if server_name is not None:
        server_name = _str(server_name, f"{path}.serverName", SERVER_NAME_MAX_LENGTH,
                           "the name in the collector's certificate")
    return TLSConfig(files["ca"], files["cert"], files["key"], server_name)


def _collector_address(value: Any, path: str) -> tuple[str, str, int]:
    from ..export.address import ACCEPTED, split_address

    address = _str(value, path, COLLECTOR_ADDRESS_MAX_LENGTH, ACCEPTED)
    if not re.fullmatch(COLLECTOR_ADDRESS_PATTERN, address):
        try:  # split_address says what is wrong more precisely (no port, IPv6 without brackets, ...)
            split_address(address)
        except ValueError as err:
            raise ConfigError(f"{path}: {err}") from None
        raise ConfigError(f"{path}: collector address {show(address)} has characters no host name has; "
                          f"accepted: {ACCEPTED}")
    try:
        host, port = split_address(address)
    except ValueError as err:
        raise ConfigError(f"{path}: {err}") from None
    return address, host, port


def _collector(data: Any, path: str) -> CollectorConfig:
    data = _mapping(data, path)
    _reject_unknown(data, ("address", "transport", "tls", "maxMessageSize", "templateRefreshSeconds",
                           "templateRefreshMessages", "queueSize", "description", "pacing", "maxMessagesPerSecond",
                           "sendBuffer"), path)
    if "address" not in data:
        raise ConfigError(f"{path}.address: required (host:port or [ipv6]:port)")
    address, host, port = _collector_address(data["address"], f"{path}.address")
    transport = data.get("transport", "udp")
    if transport not in TRANSPORTS:
        raise ConfigError(f"{path}.transport: {show(transport)} is not accepted; accepted: {', '.join(TRANSPORTS)}")
    tls = None
    if transport == "tls":
        tls = _tls(data.get("tls"), f"{path}.tls")
    elif "tls" in data:
        raise ConfigError(f"{path}.tls: only valid with transport tls (transport is {transport!r})")
    return CollectorConfig(
        address=address, host=host, port=port, transport=transport, tls=tls,
        max_message_size=_int(data.get("maxMessageSize", DEFAULT_MESSAGE_SIZE), f"{path}.maxMessageSize",
                              *MESSAGE_SIZE_RANGE),
        template_refresh_seconds=_seconds(data.get("templateRefreshSeconds", DEFAULT_TEMPLATE_REFRESH_SECONDS),
                                          f"{path}.templateRefreshSeconds", TEMPLATE_REFRESH_SECONDS_MAX),
        template_refresh_messages=_int(data.get("templateRefreshMessages", DEFAULT_TEMPLATE_REFRESH_MESSAGES),
                                       f"{path}.templateRefreshMessages", *TEMPLATE_REFRESH_MESSAGES_RANGE),
        queue_size=_int(data.get("queueSize", DEFAULT_QUEUE_SIZE), f"{path}.queueSize", *QUEUE_SIZE_RANGE),
        description=_str(data.get("description", ""), f"{path}.description", DESCRIPTION_MAX_LENGTH),
        **_sending(data, path, transport),
    )


def _sending(data: dict, path: str, transport: str) -> dict:
    """pacing and maxMessagesPerSecond (UDP only: TCP is paced by the collector's window), sendBuffer."""
    for key in ("pacing", "maxMessagesPerSecond"):
        if key in data and transport != "udp":
            raise ConfigError(f"{path}.{key}: only for transport udp (transport is {transport!r}: TCP paces "
                              "itself by the collector's window)")
    pacing = data.get("pacing", DEFAULT_PACING)
    if pacing not in PACING:
        raise ConfigError(f"{path}.pacing: {show(pacing)} is not accepted; accepted: spread (a drain's messages "
                          "over the drain interval), none (back to back)")
    out = {"pacing": pacing}
    if "maxMessagesPerSecond" in data:
        out["max_messages_per_second"] = _int(data["maxMessagesPerSecond"], f"{path}.maxMessagesPerSecond",
                                              *MESSAGE_RATE_RANGE)
    if "sendBuffer" in data:
        out["send_buffer"] = _int(data["sendBuffer"], f"{path}.sendBuffer", *SEND_BUFFER_RANGE)
    return out


def _template(data: Any, path: str) -> TemplateConfig:
    from ..export.ipfix.fields import check_template_fields

    data = _mapping(data, path)
    _reject_unknown(data, ("id", "template", "fields", "select"), path)
    if "id" not in data:
        raise ConfigError(f"{path}.id: required ({TEMPLATE_ID_RANGE[0]}..{TEMPLATE_ID_RANGE[1]})")
    template_id = _int(data["id"], f"{path}.id", *TEMPLATE_ID_RANGE)
    if ("template" in data) == ("fields" in data):
        raise ConfigError(f"{path}: give the element list as exactly one of 'template' or 'fields'")
    key = "template" if "template" in data else "fields"
    for i, item in enumerate(data[key] if isinstance(data[key], list) else ()):
        if isinstance(item, dict) and len(item) == 1:  # "- tcpControlBits: 1": YAML made a mapping of it
            (name, size), = item.items()
            raise ConfigError(f"{path}.{key}[{i}]: {show(item)} is a mapping; a reduced size is written in the "
                              f"element's string without a space: {show(f'{name}:{size}')}")
    names = _strings(data[key], f"{path}.{key}", ELEMENT_NAME_MAX_LENGTH, "an information element name")
    if not names:
        raise ConfigError(f"{path}.{key}: empty; a template needs at least one information element")
    try:
        check_template_fields(names)
    except ValueError as err:
        raise ConfigError(f"{path}.{key}: {err}") from None
    return TemplateConfig(template_id, names, *_template_selection(data.get("select"), f"{path}.select"))


def _template_selection(data: Any, path: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``select: {ipVersion: 4 | 6 | [4, 6], protocols: [tcp, udp, 1, ...]}``: the flows a template takes."""
    from ..export.ipfix.selection import protocol_number

    data = _mapping(data, path)
    _reject_unknown(data, ("ipVersion", "protocols"), path)
    versions = data.get("ipVersion", [])
    versions = versions if isinstance(versions, list) else [versions]
    for version in versions:
        if isinstance(version, bool) or version not in SELECT_IP_VERSIONS:
            raise ConfigError(f"{path}.ipVersion: {show(version)} is not accepted; accepted: 4, 6 or [4, 6]")
    protocols = data.get("protocols", [])
    protocols = protocols if isinstance(protocols, list) else [protocols]
    numbers = []
    for i, protocol in enumerate(protocols):
        try:
            numbers.append(protocol_number(protocol))
        except ValueError as err:
            raise ConfigError(f"{path}.protocols[{i}]: {err}") from None
    if "protocols" in data and not numbers:
        raise ConfigError(f"{path}.protocols: empty; accepted: protocol names or numbers "
                          f"{PROTOCOL_RANGE[0]}..{PROTOCOL_RANGE[1]} (leave the key out for every protocol)")
    return tuple(sorted(set(versions))), tuple(sorted(set(numbers)))


def _netns(value: Any, path: str) -> str:
    from ..datapath.netns import NetnsError, NetnsRef

    netns = _str(value if value is not None else "", path, NETNS_MAX_LENGTH, "a netns name or path")
    try:
        NetnsRef.parse(netns)
    except NetnsError:
        raise ConfigError(f"{path}: {show(netns)} is not accepted; accepted: \"\" or host (the host's netns), "
                          "a name from `ip netns` (no '/'), or an absolute path such as /proc/PID/ns/net") from None
    return netns


def _selection(data: Any, path: str) -> InterfaceSelection:
    data = _mapping(data, path)
    _reject_unknown(data, ("netns", "names", "exclude"), path)
    netns = _netns(data.get("netns"), f"{path}.netns")
    names = _interface_patterns(data.get("names"), f"{path}.names")
    if not names:
        raise ConfigError(f"{path}.names: empty; give interface names, globs (veth*) or /regex/")
    exclude = _interface_patterns(data.get("exclude"), f"{path}.exclude")
    return InterfaceSelection(netns, names, exclude)


def _pod_selection(data: Any, path: str) -> PodSelection:
    from ..labelselector import check_selector

    data = _mapping(data, path)
    _reject_unknown(data, ("namespaceSelector", "podSelector", "interfaces"), path)
    selectors = {}
    for key in ("namespaceSelector", "podSelector"):
        try:
            selectors[key] = check_selector(data.get(key), f"{path}.{key}")
        except ValueError as err:
            raise ConfigError(str(err)) from None
    names = _interface_patterns(data.get("interfaces", list(DEFAULT_POD_INTERFACES)), f"{path}.interfaces")
    return PodSelection(selectors["namespaceSelector"], selectors["podSelector"], names or DEFAULT_POD_INTERFACES)


def _timeouts(data: Any) -> Timeouts:
    data = _mapping(data, "timeouts")
    _reject_unknown(data, ("idle", "active"), "timeouts")
    idle = _seconds(data.get("idle", DEFAULT_IDLE_TIMEOUT), "timeouts.idle", TIMEOUT_MAX)
    active = _seconds(data.get("active", DEFAULT_ACTIVE_TIMEOUT), "timeouts.active", TIMEOUT_MAX)
    if idle > active:
        raise ConfigError(f"timeouts.idle: {idle:g} s is longer than timeouts.active ({active:g} s); "
                          "accepted: idle <= active")
    return Timeouts(idle, active)


def _file_path(value: Any, path: str, what: str) -> str:
    value = _str(value, path, PATH_MAX_LENGTH, what)
    if not value:
        raise ConfigError(f"{path}: empty; accepted: {what}")
    return value


def _metrics_tls(data: Any, path: str) -> MetricsTLS:
    data = _mapping(data, path)
    _reject_unknown(data, ("cert", "key", "clientCA"), path)
    for key in ("cert", "key"):
        if key not in data:
            raise ConfigError(f"{path}.{key}: required for HTTPS (a PEM file)")
    client_ca = data.get("clientCA")
    return MetricsTLS(_file_path(data["cert"], f"{path}.cert", "the path of a PEM certificate"),
                      _file_path(data["key"], f"{path}.key", "the path of its PEM private key"),
                      _file_path(client_ca, f"{path}.clientCA", "the path of a PEM CA certificate")
                      if client_ca is not None else None)


def _metrics_basic_auth(data: Any, path: str) -> MetricsBasicAuth:
    data = _mapping(data, path)
    _reject_unknown(data, ("username", "usernameFile", "passwordFile"), path)
    if ("username" in data) == ("usernameFile" in data):
        raise ConfigError(f"{path}: give the user as exactly one of username or usernameFile")
    if "passwordFile" not in data:
        raise ConfigError(f"{path}.passwordFile: required (a file holding the password, e.g. a mounted Secret)")
    username = data.get("username")
    if username is not None and (not isinstance(username, str) or not username or ":" in username
                                 or len(username) > 256):
        raise ConfigError(f"{path}.username: {show(username)} is not accepted; accepted: a non-empty string "
                          "without ':'")
    return MetricsBasicAuth(_file_path(data["passwordFile"], f"{path}.passwordFile", "the path of a file"),
                            username,
                            _file_path(data["usernameFile"], f"{path}.usernameFile", "the path of a file")
                            if "usernameFile" in data else None)


def _metrics(data: Any, path: str = "metrics") -> MetricsConfig:
    data = _mapping(data, path)
    _reject_unknown(data, ("address", "port", "enabled", "tls", "basicAuth"), path)
    address = _str(data.get("address", DEFAULT_METRICS_ADDRESS), f"{path}.address", 64, "an IP address")
    try:
        ipaddress.ip_address(address)
    except ValueError:
        raise ConfigError(f"{path}.address: {show(address)} is not an IP address; accepted: an IPv4 or IPv6 "
                          "address to listen on (0.0.0.0 or :: for all)") from None
    tls = _metrics_tls(data["tls"], f"{path}.tls") if data.get("tls") is not None else None
    basic_auth = _metrics_basic_auth(data["basicAuth"], f"{path}.basicAuth") \
        if data.get("basicAuth") is not None else None
    return MetricsConfig(address, _int(data.get("port", DEFAULT_METRICS_PORT), f"{path}.port", *PORT_RANGE),
                         _bool(data.get("enabled", True), f"{path}.enabled"), tls, basic_auth)


def parse_metrics_section(data: Any) -> MetricsConfig:
    """A document holding only a ``metrics:`` section (``kipfix agent --metrics-config``)."""
    data = _mapping(data, "(top level)")
    _reject_unknown(data, ("metrics",), "")
    return _metrics(data.get("metrics"))


def _file_mode(value: Any) -> int:
    # Only a quoted string: YAML reads an unquoted 0640 as octal but 640 as decimal.
    if not isinstance(value, str) or not re.fullmatch(JSON_LINES_MODE_PATTERN, value):
        raise ConfigError(f"jsonLinesMode: {show(value)} is not accepted; accepted: a quoted octal file mode "
                          "such as '0600' or '0640'")
    return int(value, 8)


def _json_lines(value: Any) -> str | None:
    if value is None:
        return None
    path = _str(value, "jsonLines", PATH_MAX_LENGTH, f"a file path, or {JSON_LINES_STDOUT} for stdout")
    if not path:
        raise ConfigError(f"jsonLines: empty; accepted: a file path, or {JSON_LINES_STDOUT} for stdout "
                          "(leave the key out to write no JSON lines)")
    return path


def _pin_path(value: Any) -> str:
    accepted = "an absolute path on a bpf filesystem such as /sys/fs/bpf/kipfix (letters, digits, . _ - /)"
    path = _str(value, "pinPath", PATH_MAX_LENGTH, accepted)
    if not re.fullmatch(PIN_PATH_PATTERN, path):
        raise ConfigError(f"pinPath: {show(path)} is not accepted; accepted: {accepted}")
    return path


def _check_template_selection(templates: tuple[TemplateConfig, ...]) -> None:
    from ..export.ipfix.selection import plan_templates

    try:
        plan_templates(templates)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _check_template_fits(template: TemplateConfig, collector: CollectorConfig, path: str) -> None:
    from ..export.ipfix.selection import record_lengths

    # Message header (16) + set header (4) + one record must fit, or nothing is ever sent; a template
    # may be sent as two (split per family, or a derived counterpart): the larger decides.
    need = 16 + 4 + max(record_lengths(template))
    if need > collector.max_message_size:
        raise ConfigError(f"{path}: {collector.max_message_size} octets cannot hold one record of template "
                          f"{template.id} ({need} octets with headers); accepted: >= {need}")


# ---- the document ------------------------------------------------------------------------

def parse_config(data: Any) -> AgentConfig:
    """Validate a decoded YAML document (a mapping; ``{}`` is every default) and build the AgentConfig."""
    if data is None:
        raise ConfigError("(top level): the document is empty; accepted: a mapping of configuration keys")
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
                              f" accepted: unique ids {TEMPLATE_ID_RANGE[0]}..{TEMPLATE_ID_RANGE[1]}")
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
    return AgentConfig(
        collectors=collectors,
        templates=templates,
        interfaces=interfaces,
        pods=pods,
        timeouts=_timeouts(data.get("timeouts")),
        max_flows=_int(data.get("maxFlows", DEFAULT_MAX_FLOWS), "maxFlows", *MAX_FLOWS_RANGE),
        drain_interval=_seconds(data.get("drainInterval", DEFAULT_DRAIN_INTERVAL), "drainInterval",
                                DRAIN_INTERVAL_MAX),
        observation_domain_id=_int(data.get("observationDomainId", DEFAULT_OBSERVATION_DOMAIN_ID),
                                   "observationDomainId", *OBSERVATION_DOMAIN_ID_RANGE),
        enterprise_number=_int(data.get("enterpriseNumber", DEFAULT_PEN), "enterpriseNumber",
                               *ENTERPRISE_NUMBER_RANGE),
        json_lines=_json_lines(data.get("jsonLines")),
        json_lines_mode=_file_mode(data.get("jsonLinesMode", DEFAULT_JSON_LINES_MODE)),
        pin_path=_pin_path(data.get("pinPath", DEFAULT_PIN_PATH)),
        metrics=_metrics(data.get("metrics")),
    )
