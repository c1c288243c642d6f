"""A template's fields: which elements it may name, at which size, and the packer that fills them.

A field is an element name from the element table (infomodel.py,
agent/data/elements.csv) that has a value for flow records, optionally
followed by a reduced size in octets (RFC 7011 6.2): ``tcpControlBits:1``
sends the TCP flags in one octet (pmacct reads only that), ``octetDeltaCount:4``
the octets in four. Only integer elements can be reduced, to fewer octets
than their type's. A value too large for the reduced size is sent as the
largest the size holds (all ones) and counted per element (the packer's
``saturated``); RFC 7011 6.2 leaves the choice of a size that fits every
value to whoever configures it, and saturation keeps the error bounded and
visible, where dropping high octets would wrap a counter silently.

Templates naming addresses of one family only get a counterpart for the
other family (``counterpart``): every name with IPv4 in it becomes its IPv6
twin (sourceIPv4Address -> sourceIPv6Address, icmpTypeCodeIPv4 ->
icmpTypeCodeIPv6), in place.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Sequence

from . import flowpack, pypack
from .infomodel import (INTEGER_TYPES, TYPES, Element, ElementTable, InformationElement, default_model, lookup,
                        reduced_lengths, table)
from .values import NOPOD, POD_ITEMS, pod_table

__all__ = ["NOPOD", "POD_ELEMENTS", "POD_NAMES", "ROUTE_ELEMENTS", "canonical_name", "check_template_fields",
           "compile_flow_packer", "counterpart", "elements", "fillable_names", "fixed_record_length", "lookup",
           "parse_field", "pod_table", "template_family", "uses_routes"]


def _named(kind: str) -> tuple[str, ...]:
    return tuple(row.name for row in table().fillable() if row.value.source.kind == kind)


POD_NAMES = _named("pod")  # sourcePodName ... destinationWorkloadKind, in table order
POD_ELEMENTS = tuple(name[len("source"):] for name in POD_NAMES[:len(POD_ITEMS)])  # PodName, ..., WorkloadKind
ROUTE_ELEMENTS = frozenset(_named("route"))
ADDRESS_TYPES = {"ipv4Address": 4, "ipv6Address": 6}
EXAMPLE = "e.g. tcpControlBits:1 or octetDeltaCount:4"
KIND_OF_TYPE = {"ipv4Address": "an address", "ipv6Address": "an address", "macAddress": "an address",
                "dateTimeSeconds": "a timestamp", "dateTimeMilliseconds": "a timestamp",
                "dateTimeMicroseconds": "a timestamp", "dateTimeNanoseconds": "a timestamp",
                "string": "a string", "octetArray": "an octet array", "boolean": "a boolean",
                "float32": "a floating-point number", "float64": "a floating-point number"}


def fillable_names() -> list[str]:
    return sorted(row.name for row in table().fillable())


def parse_field(spec: str, rows: ElementTable | None = None) -> tuple[Element, int | None]:
    """``NAME`` or ``NAME:OCTETS`` -> (its table row, the reduced size or None); ValueError naming it."""
    rows = rows or table()
    name, colon, size = str(spec).partition(":")
    row = rows.row(name)  # ValueError names an unknown element
    if row.value is None:
        raise ValueError(f"information element {name!r} is known but kipfix cannot fill it; "
                         f"accepted: {', '.join(sorted(r.name for r in rows.fillable()))}")
    if not colon:
        return row, None
    if not size.strip().isdigit():
        raise ValueError(f"information element {spec!r}: size {size!r} is not a number of octets; "
                         f"accepted: NAME, or NAME:OCTETS for a reduced size ({EXAMPLE})")
    length, full = int(size), TYPES[row.type][0]
    if row.type not in INTEGER_TYPES:
        kind = KIND_OF_TYPE.get(row.type, row.type)
        raise ValueError(f"information element {spec!r}: {row.name} is {kind}"
                         f"{'' if kind.endswith(row.type) else f' ({row.type})'} and cannot be sent in fewer "
                         f"octets; accepted: a reduced size for integer elements only (RFC 7011 6.2), {EXAMPLE}")
    allowed = reduced_lengths(row.type)
    if not allowed:
        raise ValueError(f"information element {spec!r}: {row.name} is an {row.type}, already a single octet; "
                         f"accepted: {row.name} without a size")
    if length not in allowed:
        raise ValueError(f"information element {spec!r}: {row.name} ({row.type}) takes {full} octets, a reduced "
                         f"size must be fewer; accepted: {allowed[0]}..{allowed[-1]}, {EXAMPLE}")
    return row, length


def canonical_name(spec: str, rows: ElementTable | None = None) -> str:
    """The IANA spelling of a fillable element (a size after it is checked and left out); ValueError if unknown,
    not fillable or a bad size."""
    return parse_field(spec, rows)[0].name


def check_template_fields(specs: Sequence[str], rows: ElementTable | None = None) -> None:
    """ValueError for an unknown, unfillable or duplicated element, or a size it cannot have.
    ``rows``: the element table (default: kipfix's; extended with elements declared at run time)."""
    seen: dict[str, str] = {}
    for spec in specs:
        canonical = canonical_name(spec, rows)
        if canonical in seen:
            raise ValueError(f"information element {spec!r} appears twice (first as {seen[canonical]!r}); "
                             "accepted: each element at most once per template")
        seen[canonical] = spec


def template_family(specs: Sequence[str]) -> int | None:
    """4 or 6 if the template names addresses of only that family, else None."""
    families = {ADDRESS_TYPES.get(parse_field(s)[0].type) for s in specs} - {None}
    return families.pop() if len(families) == 1 else None


def _twin(name: str) -> str:
    """The other family's element (sourceIPv4Address -> sourceIPv6Address), or ``name`` if it has none."""
    for this, other in (("IPv4", "IPv6"), ("IPv6", "IPv4")):
        if this in name:
            try:
                return canonical_name(name.replace(this, other))
            except ValueError:
                return name
    return name


def counterpart(specs: Sequence[str]) -> tuple[str, ...] | None:
    """The same template for the other address family, or None if not single-family.

    Elements are replaced in place (sourceIPv4Address -> sourceIPv6Address, ...),
    so collectors see the same field order; a reduced size stays.
    """
    if template_family(specs) is None:
        return None
    twins = []
    for spec in specs:
        row, size = parse_field(spec)
        twins.append(_twin(row.name) + ("" if size is None else f":{size}"))
    return tuple(twins)


def elements(specs: Sequence[str], enterprise_number: int,
             rows: ElementTable | None = None) -> tuple[InformationElement, ...]:
    """The template's elements, kipfix's own under ``enterprise_number``, each at its (reduced) size."""
    model = default_model(enterprise_number) if rows is None else rows.model(enterprise_number)
    result = []
    for spec in specs:
        row, size = parse_field(spec, rows)
        element = model.lookup(row.name)
        result.append(element if size is None else dataclasses.replace(element, length=size))
    return tuple(result)


def _record_length(specs: Sequence[str]) -> int:
    # variable-length elements count at their shortest (one length octet)
    return sum(1 if e.variable_length else e.length for e in elements(specs, 1))


def fixed_record_length(specs: Sequence[str]) -> int:
    """Octets of one data record without its variable-length content.

    For a single-family template this is the larger of it and its derived
    counterpart, since both are sent.
    """
    other = counterpart(specs)
    return max(_record_length(specs), _record_length(other) if other else 0)


def uses_routes(specs: Sequence[str]) -> bool:
    return any(canonical_name(s) in ROUTE_ELEMENTS for s in specs)


def compile_flow_packer(template, *, observation_domain_id: int, exporting_process_id: int,
                        system_init_ms: int, route=None, pods=None, family: int | None = None,
                        lookups: Mapping[str, Callable] | None = None, rows: ElementTable | None = None):
    """``pack(records) -> [record bytes]`` for FlowRecords under ``template``.

    Each element is filled as its row of the element table says (``rows``,
    default: kipfix's). ``family`` 4 or 6 compiles for records of that IP
    version only (no per-record family tests). ``route(netns, address) ->
    (prefix_length, next_hop_packed)`` is required when the template uses
    prefix-length or next-hop elements; if it has a ``cache`` dict keyed
    (netns, address), hits skip the call. ``pods(packed_address) -> (name,
    namespace, node, workload name, workload kind)`` as bytes (empty bytes
    when unknown) fills the pod elements; if it has an ``encoded_by_address``
    dict (a podmeta.PodIndex), the packer reads that directly and never calls
    it. A value that is not a tuple (a podmeta.Succession) is called with the
    record's ``end_ns`` and gives the tuple. Without ``pods`` the pod
    elements are empty strings. ``lookups`` give the functions of other
    lookups (values.LOOKUPS) by name.

    The C encoder (flowpack.py) packs when it is built, the Python packer
    (pypack.py) otherwise; both give the same bytes. The packer's
    ``saturated`` counts, per element, values sent as the largest a reduced
    size holds.
    """
    rows = rows or table()
    values = [rows.row(e.name).value for e in template.elements]
    unfillable = [e.name for e, v in zip(template.elements, values) if v is None]
    if unfillable:
        raise ValueError(f"template {template.id}: kipfix cannot fill {', '.join(unfillable)}")
    if route is None and any(v.source.kind == "route" for v in values):
        raise ValueError(f"template {template.id} needs routing lookups but no route resolver was given")
    constants = {"observation_domain_id": observation_domain_id, "exporting_process_id": exporting_process_id,
                 "system_init_ms": system_init_ms}
    options = dict(family=family, constants=constants, route=route, pods=pods, lookups=lookups)
    fast = flowpack.compile_packer(template, values, **options)
    return fast if fast is not None else pypack.compile_packer(template, values, **options)
