"""The agent's configuration: one schema for the agent and the operator.

- ``document``  octets to plain data: size, UTF-8, YAML with duplicate keys,
                deep nesting and alias bombs refused (pure)
- ``parse``     plain data to ``AgentConfig``: keys, types, ranges (pure)
- ``rules``     the numbers, enums and patterns of those checks, defined once
- ``model``     the ``AgentConfig`` dataclasses
- ``load``      a file: bounded read, then document and parse
- ``reload``    what a reload may not do (stop all metering or all export)
- ``resolve``   what only the host can tell: DNS, TLS files, jsonLines
                directory, netns, bpffs (the agent's; never the operator's)

The operator imports the pure parts (this package's names); ``resolve`` is
imported by the agent only, as ``kipfix.agent.config.resolve``.
"""

from .document import MAX_DOCUMENT_BYTES, parse_document
from .errors import ConfigError, show, show_key
from .load import config_from_bytes, load_config, load_metrics_config, read_config_file
from .model import (AgentConfig, CollectorConfig, InterfaceSelection, MetricsBasicAuth, MetricsConfig, MetricsTLS,
                    PodSelection, TemplateConfig, Timeouts, TLSConfig)
from .parse import TOP_LEVEL_KEYS, parse_config
from .reload import changed_keys, check_reload
from .rules import MAX_FLOWS_RANGE, MESSAGE_SIZE_RANGE, TRANSPORTS
from ..contract import DEFAULT_PIN_PATH

__all__ = [
    "AgentConfig", "CollectorConfig", "ConfigError", "DEFAULT_PIN_PATH", "InterfaceSelection", "MAX_DOCUMENT_BYTES",
    "MAX_FLOWS_RANGE", "MESSAGE_SIZE_RANGE", "MetricsBasicAuth", "MetricsConfig", "MetricsTLS", "PodSelection",
    "TLSConfig", "TOP_LEVEL_KEYS", "TRANSPORTS", "TemplateConfig", "Timeouts", "changed_keys", "check_reload",
    "config_from_bytes", "load_config", "load_metrics_config", "parse_config", "parse_document", "read_config_file",
    "show", "show_key",
]
