"""The parsed configuration: plain frozen values, with the defaults of every key."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..contract import (DEFAULT_ACTIVE_TIMEOUT, DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_FLOWS, DEFAULT_METRICS_PORT,
                        DEFAULT_PEN, DEFAULT_PIN_PATH)
from .rules import (DEFAULT_DRAIN_INTERVAL, DEFAULT_JSON_LINES_MODE, DEFAULT_MESSAGE_SIZE, DEFAULT_METRICS_ADDRESS,
                    DEFAULT_OBSERVATION_DOMAIN_ID, DEFAULT_PACING, DEFAULT_POD_INTERFACES, DEFAULT_QUEUE_SIZE,
                    DEFAULT_TEMPLATE_REFRESH_MESSAGES, DEFAULT_TEMPLATE_REFRESH_SECONDS)


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
    max_message_size: int = DEFAULT_MESSAGE_SIZE
    template_refresh_seconds: float = float(DEFAULT_TEMPLATE_REFRESH_SECONDS)
    template_refresh_messages: int = DEFAULT_TEMPLATE_REFRESH_MESSAGES
    queue_size: int = DEFAULT_QUEUE_SIZE
    description: str = ""
    pacing: str = DEFAULT_PACING  # UDP only
    max_messages_per_second: int = 0  # UDP only; 0: no cap
    send_buffer: int = 0  # SO_SNDBUF octets; 0: the system's default


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
    names: tuple[str, ...] = DEFAULT_POD_INTERFACES

    def describe(self) -> str:
        parts = [f"{what} {sel}" for what, sel in (("namespaceSelector", self.namespace_selector),
                                                   ("podSelector", self.pod_selector)) if sel]
        return f"pods ({', '.join(parts) or 'all'}) interfaces {', '.join(self.names)}"


@dataclass(frozen=True)
class Timeouts:
    idle: float = DEFAULT_IDLE_TIMEOUT
    active: float = DEFAULT_ACTIVE_TIMEOUT


@dataclass(frozen=True)
class MetricsTLS:
    """HTTPS for /metrics; with ``client_ca``, scrapers must show a certificate it signed."""

    cert: str
    key: str
    client_ca: str | None = None


@dataclass(frozen=True)
class MetricsBasicAuth:
    password_file: str
    username: str | None = None
    username_file: str | None = None


@dataclass(frozen=True)
class MetricsConfig:
    """Where the agent serves Prometheus metrics (``/metrics``), and how scrapers prove who they are."""

    address: str = DEFAULT_METRICS_ADDRESS
    port: int = DEFAULT_METRICS_PORT
    enabled: bool = True
    tls: MetricsTLS | None = None
    basic_auth: MetricsBasicAuth | None = None


@dataclass(frozen=True)
class AgentConfig:
    collectors: tuple[CollectorConfig, ...] = ()
    templates: tuple[TemplateConfig, ...] = ()
    interfaces: tuple[InterfaceSelection, ...] = ()
    pods: tuple[PodSelection, ...] = ()
    timeouts: Timeouts = field(default_factory=Timeouts)
    max_flows: int = DEFAULT_MAX_FLOWS
    drain_interval: float = DEFAULT_DRAIN_INTERVAL
    observation_domain_id: int = DEFAULT_OBSERVATION_DOMAIN_ID
    enterprise_number: int = DEFAULT_PEN
    json_lines: str | None = None
    json_lines_mode: int = int(DEFAULT_JSON_LINES_MODE, 8)
    pin_path: str = DEFAULT_PIN_PATH
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
