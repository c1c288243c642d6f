"""Which Information Elements kipfix fills, and how each comes from a FlowRecord.

Every fillable element has a Python expression over ``r`` (the FlowRecord),
``k`` (its key), values computed once per record (``BINDINGS``: times,
routes, pods) and a few exporter constants (``odid``, ``epid``, ``init_ms``); template.py compiles a template's
expressions into one packing function, so a batch is encoded without any
per-field dispatch. Variable-length expressions produce bytes.

Semantics worth knowing:
- ingressInterface is the metered ifindex for ingress flows (0 for egress
  flows); egressInterface the reverse. An ifindex is unique only within its
  network namespace: observationPointId names the (netns, ifindex) pair, and
  the observation point options records map it to names (options.py).
- Transport ports are 0 for ICMP/ICMPv6; the type and code go in
  icmpTypeCodeIPv4/IPv6 (type << 8 | code), as RFC 7012 defines them.
- Elements of the other address family than the record's are 0.
- forwardingStatus is 64 (forwarded, reason unknown) for egress flows and 0
  (unknown) for ingress flows (RFC 7270).
- flowStart/EndSysUpTime are milliseconds since systemInitTimeMilliseconds,
  the boot time of the exporting host.
- Prefix lengths and next hop come from the routing table of the record's
  network namespace (routes.py).
- Pod elements (sourcePodName, ..., destinationWorkloadKind) come from the
  pod owning the source or destination address when the flow ended
  (podmeta.PodIndex); empty strings when no pod owns it or no pod lookup was
  given (standalone agent).
"""

from __future__ import annotations

import re
from typing import Sequence

from ...flows.record import FlowKey
from .infomodel import InformationElement, default_model, lookup

Z4 = bytes(4)
Z16 = bytes(16)

# A pod value that is no tuple is the IP's recent owners (podmeta.Succession): asked for the flow's end.
OWNER_WHEN_ENDED = " for {p} in ({p} if {p}.__class__ is tuple else {p}(r.end_ns),)"
# Values several elements share, computed once per record when a template uses them.
BINDINGS = {
    "SM": "for SM in (r.start_ns // 1000000,)",
    "EM": "for EM in (r.end_ns // 1000000,)",
    "SD": "for SD in (divmod(r.start_ns, 1000000000),)",  # (seconds, nanoseconds)
    "ED": "for ED in (divmod(r.end_ns, 1000000000),)",
    "RS": "for RS in (rcache.get((r.netns, k.src)) or route(r.netns, k.src),)",  # (prefix length, next hop)
    "RD": "for RD in (rcache.get((r.netns, k.dst)) or route(r.netns, k.dst),)",
    # (name, namespace, node, workload name, workload kind) of the pod owning the address, encoded
    "PS": "for PS in (pget(k.src, NOPOD),)" + OWNER_WHEN_ENDED.format(p="PS"),
    "PD": "for PD in (pget(k.dst, NOPOD),)" + OWNER_WHEN_ENDED.format(p="PD"),
}
# The same through a lookup function, for a pod lookup without an ``encoded_by_address`` dict.
CALL_BINDINGS = {"PS": "for PS in (pods(k.src),)" + OWNER_WHEN_ENDED.format(p="PS"),
                 "PD": "for PD in (pods(k.dst),)" + OWNER_WHEN_ENDED.format(p="PD")}
NOPOD = (b"", b"", b"", b"", b"")
# dateTimeNanoseconds and dateTimeMicroseconds (NTP format, RFC 7011 6.1.9-10) from a (seconds,
# nanoseconds) pair, inline: a function call per field costs more than the arithmetic.
NTP = "(((({t}[0] + 2208988800) & 0xFFFFFFFF) << 32) | (({t}[1] << 32) // 1000000000))"
NTP_US = ("(((({t}[0] + 2208988800) & 0xFFFFFFFF) << 32)"
          " | ((({t}[1] - {t}[1] % 1000 << 32) // 1000000000) & 0xFFFFF800))")

# Elements whose value depends on the record's address family: (IPv4 record, IPv6 record).
# RS and RD are the (prefix length, next hop) routes of the source and destination.
BY_FAMILY: dict[str, tuple[str, str]] = {
    "sourceIPv4Address": ("k.src", "Z4"),
    "destinationIPv4Address": ("k.dst", "Z4"),
    "sourceIPv6Address": ("Z16", "k.src"),
    "destinationIPv6Address": ("Z16", "k.dst"),
    "sourceIPv4PrefixLength": ("RS[0]", "0"),
    "destinationIPv4PrefixLength": ("RD[0]", "0"),
    "sourceIPv6PrefixLength": ("0", "RS[0]"),
    "destinationIPv6PrefixLength": ("0", "RD[0]"),
    "ipNextHopIPv4Address": ("RD[1]", "Z4"),
    "ipNextHopIPv6Address": ("Z16", "RD[1]"),
}
# name -> expression. Elements not listed here or in BY_FAMILY cannot be filled by kipfix.
EXPRESSIONS: dict[str, str] = {
    "flowStartMilliseconds": "SM",
    "flowEndMilliseconds": "EM",
    "flowStartSeconds": "SD[0]",
    "flowEndSeconds": "ED[0]",
    "flowStartMicroseconds": NTP_US.format(t="SD"),
    "flowEndMicroseconds": NTP_US.format(t="ED"),
    "flowStartNanoseconds": NTP.format(t="SD"),
    "flowEndNanoseconds": NTP.format(t="ED"),
    "flowStartSysUpTime": "(SM - init_ms) & 0xFFFFFFFF",
    "flowEndSysUpTime": "(EM - init_ms) & 0xFFFFFFFF",
    "systemInitTimeMilliseconds": "init_ms",
    "octetDeltaCount": "r.octets",
    "packetDeltaCount": "r.packets",
    "ipVersion": "k.ip_version",
    "ingressInterface": "(0 if k.direction else k.ifindex)",
    "egressInterface": "(k.ifindex if k.direction else 0)",
    "flowDirection": "k.direction",
    "protocolIdentifier": "k.protocol",
    "sourceTransportPort": "(0 if k.protocol == 1 or k.protocol == 58 else k.sport)",
    "destinationTransportPort": "(0 if k.protocol == 1 or k.protocol == 58 else k.dport)",
    "tcpControlBits": "r.tcp_flags",
    "icmpTypeCodeIPv4": "(k.dport if k.protocol == 1 else 0)",
    "icmpTypeCodeIPv6": "(k.dport if k.protocol == 58 else 0)",
    "ipClassOfService": "r.tos",
    "ipDiffServCodePoint": "r.tos >> 2",
    "minimumTTL": "r.min_ttl",
    "maximumTTL": "r.max_ttl",
    "vlanId": "r.vlan_id",
    "dot1qVlanId": "r.vlan_id",
    "dot1qCustomerVlanId": "r.inner_vlan_id",
    "flowEndReason": "r.end_reason",
    "forwardingStatus": "(64 if k.direction else 0)",
    "fragmentIdentification": "r.fragment_id",
    "observationPointId": "r.observation_point_id",
    "interfaceName": "r.interface_name.encode()",
    "observationDomainId": "odid",
    "exportingProcessId": "epid",
    "networkNamespace": "r.netns.encode()",
}
POD_ELEMENTS = ("PodName", "PodNamespace", "NodeName", "WorkloadName", "WorkloadKind")  # order of PS/PD
POD_NAMES = tuple(f"{side}{suffix}" for side in ("source", "destination") for suffix in POD_ELEMENTS)
EXPRESSIONS.update({name: f"{'PS' if name.startswith('source') else 'PD'}[{i % len(POD_ELEMENTS)}]"
                    for i, name in enumerate(POD_NAMES)})
EXPRESSIONS.update({name: f"({v4} if k.ip_version == 4 else {v6})" for name, (v4, v6) in BY_FAMILY.items()})
_FILLABLE = {name.casefold(): name for name in EXPRESSIONS}

ROUTE_ELEMENTS = frozenset(n for n, (v4, v6) in BY_FAMILY.items() if "RS" in v4 + v6 or "RD" in v4 + v6)

# IPv4 element -> IPv6 counterpart, for deriving the other family's template.
V4_TO_V6 = {
    "sourceIPv4Address": "sourceIPv6Address",
    "destinationIPv4Address": "destinationIPv6Address",
    "sourceIPv4PrefixLength": "sourceIPv6PrefixLength",
    "destinationIPv4PrefixLength": "destinationIPv6PrefixLength",
    "ipNextHopIPv4Address": "ipNextHopIPv6Address",
    "icmpTypeCodeIPv4": "icmpTypeCodeIPv6",
}
V6_TO_V4 = {v6: v4 for v4, v6 in V4_TO_V6.items()}
V4_ADDRESSES = frozenset(("sourceIPv4Address", "destinationIPv4Address", "ipNextHopIPv4Address"))
V6_ADDRESSES = frozenset(("sourceIPv6Address", "destinationIPv6Address", "ipNextHopIPv6Address"))


def fillable_names() -> list[str]:
    return sorted(EXPRESSIONS)


def canonical_name(name: str) -> str:
    """The IANA spelling of a fillable element; ValueError if unknown or not fillable."""
    element = lookup(name)  # ValueError names an unknown element
    canonical = _FILLABLE.get(element.name.casefold())
    if canonical is None:
        raise ValueError(f"information element {name!r} is known but kipfix cannot fill it; "
                         f"accepted: {', '.join(fillable_names())}")
    return canonical


def check_template_fields(names: Sequence[str]) -> None:
    """ValueError for an unknown, unfillable or duplicated element name."""
    seen: dict[str, str] = {}
    for name in names:
        canonical = canonical_name(name)
        if canonical in seen:
            raise ValueError(f"information element {name!r} appears twice (first as {seen[canonical]!r}); "
                             "accepted: each element at most once per template")
        seen[canonical] = name


def template_family(names: Sequence[str]) -> int | None:
    """4 or 6 if the template names addresses of only that family, else None."""
    canonical = {canonical_name(n) for n in names}
    has4, has6 = bool(canonical & V4_ADDRESSES), bool(canonical & V6_ADDRESSES)
    if has4 and not has6:
        return 4
    if has6 and not has4:
        return 6
    return None


def counterpart(names: Sequence[str]) -> tuple[str, ...] | None:
    """The same template for the other address family, or None if not single-family.

    Elements are replaced in place (sourceIPv4Address -> sourceIPv6Address, ...),
    so collectors see the same field order.
    """
    family = template_family(names)
    if family is None:
        return None
    mapping = V4_TO_V6 if family == 4 else V6_TO_V4
    return tuple(mapping.get(n, n) for n in (canonical_name(n) for n in names))


def elements(names: Sequence[str], enterprise_number: int) -> tuple[InformationElement, ...]:
    model = default_model(enterprise_number)
    return tuple(model.lookup(canonical_name(n)) for n in names)


def _record_length(names: Sequence[str]) -> int:
    # variable-length elements count at their shortest (one length octet)
    return sum(1 if e.variable_length else e.length for e in elements(names, 1))


def fixed_record_length(names: Sequence[str]) -> int:
    """Octets of one data record without its variable-length content.

    For a single-family template this is the larger of it and its derived
    counterpart, since both are sent.
    """
    other = counterpart(names)
    return max(_record_length(names), _record_length(other) if other else 0)


def uses_routes(names: Sequence[str]) -> bool:
    return any(canonical_name(n) in ROUTE_ELEMENTS for n in names)


def flow_expression(name: str, family: int | None) -> str:
    """The expression filling ``name`` for records of ``family`` (None: either)."""
    if family is not None and name in BY_FAMILY:
        return BY_FAMILY[name][0 if family == 4 else 1]
    return EXPRESSIONS[name]


def pod_table(pods) -> dict | None:
    """The dict a packer reads pods from (a PodIndex's ``encoded_by_address``; an empty one for no pods),
    or None when ``pods`` is a plain function the packer must call."""
    return {} if pods is None else getattr(pods, "encoded_by_address", None)


def compile_flow_packer(template, *, observation_domain_id: int, exporting_process_id: int,
                        system_init_ms: int, route=None, pods=None, family: int | None = None):
    """``pack(records) -> [record bytes]`` for FlowRecords under ``template``.

    ``family`` 4 or 6 compiles for records of that IP version only (no
    per-record family tests). ``route(netns, address) -> (prefix_length,
    next_hop_packed)`` is required when the template uses prefix-length or
    next-hop elements; if it has a ``cache`` dict keyed (netns, address),
    hits skip the call. ``pods(packed_address) -> (name, namespace, node,
    workload name, workload kind)`` as bytes (empty bytes when unknown) fills
    the pod elements; if it has an ``encoded_by_address`` dict (a
    podmeta.PodIndex), the packer reads that directly and never calls it.
    A value that is not a tuple (a podmeta.Succession) is called with the
    record's ``end_ns`` and gives the tuple.
    Without ``pods`` the pod elements are empty strings.

    The C encoder (flowpack.py) packs when it is built, the Python packer
    compiled here otherwise; both give the same bytes.
    """
    from . import flowpack
    from .template import compile_packer

    names = [canonical_name(e.name) for e in template.elements]
    if route is None and uses_routes(names):
        raise ValueError(f"template {template.id} needs routing lookups but no route resolver was given")
    fast = flowpack.compile_packer(template, names, family=family, observation_domain_id=observation_domain_id,
                                   exporting_process_id=exporting_process_id, system_init_ms=system_init_ms,
                                   route=route, pods=pods)
    if fast is not None:
        return fast
    expressions = [flow_expression(n, family) for n in names]
    table = pod_table(pods)
    bindings = BINDINGS if table is not None else {**BINDINGS, **CALL_BINDINGS}  # no dict: call pods()
    bind = "for k in (r.key,)"
    if issubclass(FlowKey, tuple):  # unpacking the key once is cheaper than an attribute load per field
        expressions = [re.sub(r"\bk\.(\w+)", r"k_\1", e) for e in expressions]
        bind += f" for ({', '.join('k_' + f for f in FlowKey._fields)}) in (k,)"
        bindings = {s: re.sub(r"\bk\.(\w+)", r"k_\1", c) for s, c in bindings.items()}
    for symbol, clause in bindings.items():
        if any(re.search(rf"\b{symbol}\b", e) for e in expressions):
            bind += " " + clause
    env = {"Z4": Z4, "Z16": Z16, "odid": observation_domain_id, "epid": exporting_process_id,
           "init_ms": system_init_ms, "route": route, "rcache": getattr(route, "cache", {}),
           "pods": pods, "pget": (table if table is not None else {}).get, "NOPOD": NOPOD}
    return compile_packer(template, expressions, env, bind=bind)
