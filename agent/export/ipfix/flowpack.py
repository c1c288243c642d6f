"""The C data-record encoder (_flowpack.c): which step fills each element.

``compile_packer`` gives the same ``pack(records) -> [record bytes]`` as
fields.compile_flow_packer's Python packer, 4 to 5 times as fast for wide
templates (1.6 times for the minimal one), or None
when the extension was not built or the template names an element it has no
step for; the caller then uses the Python packer. STEPS mirrors
fields.EXPRESSIONS; tests/test_flowpack.py checks that every fillable element
has a step and that both encoders give the same bytes.

KIPFIX_ENCODER=python in the environment forces the Python packer (for
comparisons and benchmarks).
"""

from __future__ import annotations

import os
import struct

from ...flows import record as flow
from .fields import NOPOD, POD_ELEMENTS, POD_NAMES, pod_table
from .infomodel import InformationElement

try:
    from . import _flowpack
except ImportError:  # built by pip install (python3-dev and gcc); without it, the Python packer
    _flowpack = None

AVAILABLE = _flowpack is not None


def _steps() -> dict[str, tuple[str, int | str]]:
    """name -> (opcode name, argument); an argument given as a name is an exporter constant."""
    steps: dict[str, tuple[str, int | str]] = {
        "flowStartMilliseconds": ("V_START_MS", 0),
        "flowEndMilliseconds": ("V_END_MS", 0),
        "flowStartSeconds": ("V_START_S", 0),
        "flowEndSeconds": ("V_END_S", 0),
        "flowStartMicroseconds": ("V_START_NTP_US", 0),
        "flowEndMicroseconds": ("V_END_NTP_US", 0),
        "flowStartNanoseconds": ("V_START_NTP", 0),
        "flowEndNanoseconds": ("V_END_NTP", 0),
        "flowStartSysUpTime": ("V_START_UPTIME", 0),
        "flowEndSysUpTime": ("V_END_UPTIME", 0),
        "systemInitTimeMilliseconds": ("V_CONST", "init_ms"),
        "octetDeltaCount": ("V_OCTETS", 0),
        "packetDeltaCount": ("V_PACKETS", 0),
        "ipVersion": ("V_IP_VERSION", 0),
        "ingressInterface": ("V_INGRESS", 0),
        "egressInterface": ("V_EGRESS", 0),
        "flowDirection": ("V_DIRECTION", 0),
        "protocolIdentifier": ("V_PROTOCOL", 0),
        "sourceTransportPort": ("V_SPORT", 0),
        "destinationTransportPort": ("V_DPORT", 0),
        "tcpControlBits": ("V_TCP_FLAGS", 0),
        "icmpTypeCodeIPv4": ("V_ICMP4", 0),
        "icmpTypeCodeIPv6": ("V_ICMP6", 0),
        "ipClassOfService": ("V_TOS", 0),
        "ipDiffServCodePoint": ("V_DSCP", 0),
        "minimumTTL": ("V_MIN_TTL", 0),
        "maximumTTL": ("V_MAX_TTL", 0),
        "vlanId": ("V_VLAN", 0),
        "dot1qVlanId": ("V_VLAN", 0),
        "dot1qCustomerVlanId": ("V_INNER_VLAN", 0),
        "flowEndReason": ("V_END_REASON", 0),
        "forwardingStatus": ("V_FORWARDING", 0),
        "fragmentIdentification": ("V_FRAGMENT", 0),
        "observationPointId": ("V_OBS_POINT", 0),
        "interfaceName": ("B_INTERFACE_NAME", 0),
        "observationDomainId": ("V_CONST", "odid"),
        "exportingProcessId": ("V_CONST", "epid"),
        "networkNamespace": ("B_NETNS", 0),
    }
    for i, name in enumerate(POD_NAMES):
        steps[name] = ("B_SRC_POD" if name.startswith("source") else "B_DST_POD", i % len(POD_ELEMENTS))
    return steps


STEPS = _steps()
# Elements of one address family: (opcode, the family they are filled for), zero for the other family.
FAMILY_STEPS: dict[str, tuple[str, int]] = {
    "sourceIPv4Address": ("B_SRC", 4),
    "destinationIPv4Address": ("B_DST", 4),
    "sourceIPv6Address": ("B_SRC", 6),
    "destinationIPv6Address": ("B_DST", 6),
    "sourceIPv4PrefixLength": ("V_SRC_PREFIX", 4),
    "destinationIPv4PrefixLength": ("V_DST_PREFIX", 4),
    "sourceIPv6PrefixLength": ("V_SRC_PREFIX", 6),
    "destinationIPv6PrefixLength": ("V_DST_PREFIX", 6),
    "ipNextHopIPv4Address": ("B_NEXT_HOP", 4),
    "ipNextHopIPv6Address": ("B_NEXT_HOP", 6),
}


def step_names() -> set[str]:
    return set(STEPS) | set(FAMILY_STEPS)


def _kind(element: InformationElement) -> int | None:
    if element.variable_length:
        return _flowpack.KIND_VARLEN
    code = element.struct_code
    if code is None or struct.calcsize("!" + code) != element.length:
        return None
    if code.endswith("s"):
        return _flowpack.KIND_BYTES
    return _flowpack.KIND_INT if code in "BHIQ" else None


def _step(name: str, element: InformationElement, family: int | None, constants: dict[str, int]) -> tuple | None:
    kind = _kind(element)
    if name in FAMILY_STEPS:
        op, for_family = FAMILY_STEPS[name]
        if family is None:
            arg = for_family  # filled for records of that family only, tested per record
        elif family == for_family:
            arg = 0  # every record this packer sees is of that family
        else:
            op, arg = ("B_ZERO" if op.startswith("B_") else "V_CONST"), 0
    elif name in STEPS:
        op, arg = STEPS[name]
        arg = constants[arg] if isinstance(arg, str) else arg
    else:
        return None
    if kind is None or (kind == _flowpack.KIND_INT) == op.startswith("B_"):
        return None
    return (getattr(_flowpack, op), arg, element.length, kind)


def compile_packer(template, names, *, family: int | None, observation_domain_id: int,
                   exporting_process_id: int, system_init_ms: int, route, pods):
    """The C packer for ``template`` (``names``: its elements' IANA names), or None (see module doc)."""
    if _flowpack is None or os.environ.get("KIPFIX_ENCODER", "").lower() == "python":
        return None
    constants = {"odid": observation_domain_id, "epid": exporting_process_id, "init_ms": system_init_ms}
    program = [_step(n, e, family, constants) for n, e in zip(names, template.elements)]
    if None in program:
        return None
    table = pod_table(pods)
    lookup = pods if table is None else None
    return _flowpack.Packer(program, flow.FlowRecord, system_init_ms, route, getattr(route, "cache", {}),
                            table, lookup, NOPOD, struct.error)
