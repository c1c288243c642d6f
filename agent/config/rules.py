"""The configuration's value rules, each defined here once.

``parse.py`` applies them. The FlowExporter CRD (crds/flowexporter.yaml, and
its copy in the Helm chart) and the chart's values.schema.json repeat some of
them as ranges, enums, patterns, lengths and defaults so that the API server
refuses a bad value early; tests/test_schema_consistency.py checks that every
such copy equals the rule here. Defaults the operator shares (ports, PEN,
timeouts, maxFlows, pin path) live in ``kipfix.agent.contract``.
"""

from __future__ import annotations

# ---- collectors -------------------------------------------------------------------

TRANSPORTS = ("udp", "tcp", "tls")
# host:port with a DNS name or IPv4 address, or [IPv6]:port (a zone id allowed for link-local collectors);
# 261: room for a 253-character DNS name, a colon and a 5-digit port (and brackets).
COLLECTOR_ADDRESS_PATTERN = r"^(\[[0-9A-Fa-f:.]+(%[A-Za-z0-9_.-]+)?\]|[A-Za-z0-9._-]+):[0-9]{1,5}$"
COLLECTOR_ADDRESS_MAX_LENGTH = 261
MESSAGE_SIZE_RANGE = (64, 65_535)  # octets; an IPFIX message length is 16 bits
DEFAULT_MESSAGE_SIZE = 1400  # below a 1500-octet MTU with IP and UDP headers
TEMPLATE_REFRESH_SECONDS_MAX = 86_400
DEFAULT_TEMPLATE_REFRESH_SECONDS = 60
TEMPLATE_REFRESH_MESSAGES_RANGE = (1, 1_000_000)
DEFAULT_TEMPLATE_REFRESH_MESSAGES = 100
QUEUE_SIZE_RANGE = (1, 16_777_216)
DEFAULT_QUEUE_SIZE = 65_536
SERVER_NAME_MAX_LENGTH = 253  # a DNS name
# In Kubernetes, TLS files come from a Secret in the agent's namespace (secret:NAME/KEY in a rendered config).
SECRET_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"  # a DNS subdomain name
SECRET_NAME_MAX_LENGTH = 253
SECRET_KEY_PATTERN = r"^[-._a-zA-Z0-9]+$"  # a Secret's data key
DESCRIPTION_MAX_LENGTH = 256
PACING = ("spread", "none")  # UDP: a drain's messages spread over the drain interval, or back to back
DEFAULT_PACING = "spread"
MESSAGE_RATE_RANGE = (1, 10_000_000)  # maxMessagesPerSecond (UDP)
SEND_BUFFER_RANGE = (4096, 256 << 20)  # sendBuffer: SO_SNDBUF octets

# ---- templates ----------------------------------------------------------------------

TEMPLATE_ID_RANGE = (256, 65_535)  # RFC 7011 3.4.1: 0..255 are set ids
ELEMENT_NAME_MAX_LENGTH = 128
# An element name, optionally with a reduced size in octets (tcpControlBits:1); fields.py checks the rest.
ELEMENT_FIELD_PATTERN = r"^[A-Za-z][A-Za-z0-9_]*(:[0-9]{1,2})?$"
SELECT_IP_VERSIONS = (4, 6)  # select.ipVersion
PROTOCOL_RANGE = (0, 255)  # select.protocols: IANA protocol numbers (or names, export/ipfix/selection.py)

# ---- interfaces -----------------------------------------------------------------------

INTERFACE_PATTERN_MAX_LENGTH = 256  # a name, glob or /regex/
NETNS_MAX_LENGTH = 4096  # PATH_MAX
DEFAULT_POD_INTERFACES = ("eth0",)

# ---- the agent ------------------------------------------------------------------------

TIMEOUT_MAX = 86_400  # seconds; timeouts are > 0
DRAIN_INTERVAL_MAX = 60  # seconds; > 0
DEFAULT_DRAIN_INTERVAL = 1.0
MAX_FLOWS_RANGE = (16, 16_777_216)
OBSERVATION_DOMAIN_ID_RANGE = (0, 2**32 - 1)
DEFAULT_OBSERVATION_DOMAIN_ID = 1
ENTERPRISE_NUMBER_RANGE = (1, 2**32 - 1)
PORT_RANGE = (1, 65_535)
DEFAULT_METRICS_ADDRESS = "0.0.0.0"
# The pin path reaches the BPF program as a C string (-DPIN_PATH="..."): no quotes, spaces or backslashes.
PIN_PATH_PATTERN = r"^/[A-Za-z0-9._/-]*$"
PATH_MAX_LENGTH = 4096
JSON_LINES_STDOUT = "-"
DEFAULT_JSON_LINES_MODE = "0600"  # flow records say who talked to whom: not for every local user
JSON_LINES_MODE_PATTERN = r"^0?[0-7]{3}$"  # a quoted octal file mode
