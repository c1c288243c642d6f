"""The element table's ``value`` column: where a flow record's value for an element comes from.

A value is a source followed by transforms, ``source | transform ...``:
``key.ifindex | ingress`` is the flow key's ifindex for ingress flows and 0
for egress flows. Every source and transform means one thing, stated here
once: ``Value.evaluate`` is that meaning in plain Python (the tests' oracle),
and the two encoders translate the same pieces, pypack.py into Python source
and flowpack.py into the C encoder's steps. An element whose value is made
of these pieces is one row of agent/data/elements.csv and nothing else.

Sources:
  record.ATTR       an attribute of the FlowRecord: an integer, or text (sent as UTF-8)
  key.ITEM          an item of its FlowKey: an integer, or a packed address (src, dst)
  exporter.NAME     a constant of the exporter: observation_domain_id, exporting_process_id, system_init_ms
  route.SIDE.ITEM   the route to the flow's src or dst address in its network namespace (routes.py)
  pod.SIDE.ITEM     the pod owning the src or dst address when the flow ended (kube/podmeta.py)
  LOOKUP.ITEM       a lookup declared with ``Lookup(..., sided=False)``: ``function(record)``, called once
                    per record, gives a tuple; the function is handed to the packer at run time
  INTEGER           that number

A new kind of source is one ``Lookup`` in LOOKUPS plus the function that
computes it; neither encoder needs a change. Transforms are guards (keep the
value for flows whose key matches, else 0 or all-zero octets) and integer
operations, applied in the order written.

Values are in the element's own unit: dateTimeMicroseconds elements give
microseconds, dateTimeNanoseconds nanoseconds since the Unix epoch; the
encoders write the type's wire format (NTP for those two, RFC 7011 6.1.9-10),
and the decoder gives the same numbers back.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from ...flows.record import INGRESS, EGRESS, PROTO_ICMP, PROTO_ICMPV6, FlowKey, FlowRecord

EXPORTER_CONSTANTS = ("observation_domain_id", "exporting_process_id", "system_init_ms")
SIDES = {"src": "src", "dst": "dst"}  # SIDE in a lookup source -> the FlowKey item holding that address
TEXT_ATTRIBUTES = frozenset(f.name for f in dataclasses.fields(FlowRecord) if f.type == "str")
INTEGER_ATTRIBUTES = frozenset(f.name for f in dataclasses.fields(FlowRecord)
                               if f.type in ("int", "EndReason"))
ADDRESS_KEY_ITEMS = frozenset(("src", "dst"))

INT, BYTES = "int", "bytes"  # what a source gives; text counts as bytes (UTF-8)


@dataclass(frozen=True)
class Lookup:
    """A value computed once per record (and side), whose items elements take.

    ``items`` maps each item name to INT or BYTES. ``sided`` lookups are
    asked about the flow's source or destination address (``route.src...``);
    the others get the whole record (``function(record)``).
    """

    name: str
    items: dict[str, str]
    description: str
    sided: bool = False

    def index(self, item: str) -> int:
        return list(self.items).index(item)


POD_ITEMS = ("name", "namespace", "node", "workload_name", "workload_kind")  # podmeta.PodInfo.encoded()'s order
LOOKUPS: dict[str, Lookup] = {
    "route": Lookup("route", {"prefix_length": INT, "next_hop": BYTES},
                    "the route to the address in the flow's network namespace (longest prefix match): its "
                    "prefix length and gateway (zeros on-link)", sided=True),
    "pod": Lookup("pod", dict.fromkeys(POD_ITEMS, BYTES),
                  "the pod owning the address when the flow ended: metadata.name, metadata.namespace, "
                  "spec.nodeName, its workload's name and kind (empty: no pod)", sided=True),
}
NOPOD = (b"",) * len(POD_ITEMS)  # what a pod lookup gives for an address no pod owns


@dataclass(frozen=True)
class Guard:
    """Keeps the value for flows whose key ``item`` is one of ``values`` (or, negated, none of them)."""

    item: str
    values: tuple[int, ...]
    negate: bool = False

    def holds(self, key: FlowKey) -> bool:
        return (getattr(key, self.item) in self.values) != self.negate


# Integer operations: name -> function. An argument may name an exporter constant.
OPERATIONS: dict[str, Callable[[int, int], int]] = {
    "div": lambda value, arg: value // arg,
    "shr": lambda value, arg: value >> arg,
    "sub": lambda value, arg: value - arg,
    "and": lambda value, arg: value & arg,
}


@dataclass(frozen=True)
class Transform:
    name: str
    description: str
    guard: Guard | None = None
    operations: tuple[tuple[str, int | str], ...] = ()


TRANSFORMS: dict[str, Transform] = {t.name: t for t in (
    Transform("ingress", "ingress flows only (0 for egress)", guard=Guard("direction", (INGRESS,))),
    Transform("egress", "egress flows only (0 for ingress)", guard=Guard("direction", (EGRESS,))),
    Transform("not_icmp", "0 for ICMP and ICMPv6 flows", guard=Guard("protocol", (PROTO_ICMP, PROTO_ICMPV6), True)),
    Transform("icmpv4", "ICMP flows only", guard=Guard("protocol", (PROTO_ICMP,))),
    Transform("icmpv6", "ICMPv6 flows only", guard=Guard("protocol", (PROTO_ICMPV6,))),
    Transform("ipv4", "IPv4 flows only (zeros for IPv6 flows)", guard=Guard("ip_version", (4,))),
    Transform("ipv6", "IPv6 flows only (zeros for IPv4 flows)", guard=Guard("ip_version", (6,))),
    Transform("s", "nanoseconds to seconds", operations=(("div", 10**9),)),
    Transform("ms", "nanoseconds to milliseconds", operations=(("div", 10**6),)),
    Transform("us", "nanoseconds to microseconds", operations=(("div", 10**3),)),
    Transform("uptime", "nanoseconds since the epoch to milliseconds since systemInitTimeMilliseconds, "
              "modulo 2^32", operations=(("div", 10**6), ("sub", "system_init_ms"), ("and", 0xFFFFFFFF))),
    Transform("dscp", "the DSCP of a ToS / traffic class octet (its top six bits)", operations=(("shr", 2),)),
)}


@dataclass(frozen=True)
class Source:
    """``kind`` is record, key, exporter, literal, zero, or a lookup's name."""

    kind: str
    name: str = ""   # attribute, key item, constant or lookup item; the number of a literal; INT or BYTES for zero
    side: str = ""   # src or dst, for sided lookups

    @property
    def text(self) -> str:
        if self.kind == "literal":
            return self.name
        if self.kind == "zero":
            return "0"
        return ".".join(p for p in (self.kind, self.side, self.name) if p)

    @property
    def lookup(self) -> Lookup | None:
        return LOOKUPS.get(self.kind)

    @property
    def gives(self) -> str:
        """INT or BYTES."""
        if self.kind == "record":
            return BYTES if self.name in TEXT_ATTRIBUTES else INT
        if self.kind == "key":
            return BYTES if self.name in ADDRESS_KEY_ITEMS else INT
        if self.lookup is not None:
            return self.lookup.items[self.name]
        if self.kind == "zero":
            return self.name
        return INT


@dataclass(frozen=True)
class Value:
    source: Source
    transforms: tuple[Transform, ...] = ()

    @property
    def text(self) -> str:
        return " | ".join([self.source.text] + [t.name for t in self.transforms])

    @property
    def guards(self) -> tuple[Guard, ...]:
        return tuple(t.guard for t in self.transforms if t.guard is not None)

    @property
    def operations(self) -> tuple[tuple[str, int | str], ...]:
        return tuple(op for t in self.transforms for op in t.operations)

    def for_family(self, family: int | None) -> "Value":
        """The value for records of IP version ``family`` only: its ip_version guards decided (None: as is)."""
        if family is None or not any(g.item == "ip_version" for g in self.guards):
            return self
        key = FlowKey(0, 0, family, 0, b"", b"", 0, 0)
        if not all(g.holds(key) for g in self.guards if g.item == "ip_version"):
            return Value(Source("zero", self.source.gives))
        return Value(self.source, tuple(t for t in self.transforms
                                        if t.guard is None or t.guard.item != "ip_version"))

    def evaluate(self, record: FlowRecord, context: "Context") -> int | bytes:
        """This value for ``record``: an int, or bytes for addresses and strings."""
        zero: int | bytes = b"" if self.source.gives == BYTES else 0
        if self.source.kind == "zero" or not all(g.holds(record.key) for g in self.guards):
            return zero
        value = context.source(self.source, record)
        for name, arg in self.operations:
            value = OPERATIONS[name](value, context.constants[arg] if isinstance(arg, str) else arg)
        return value


@dataclass
class Context:
    """What a value may read besides the record: exporter constants, route and pod lookups, other lookups."""

    constants: Mapping[str, int]
    route: Callable | None = None
    pods: Any = None
    lookups: Mapping[str, Callable] = dataclasses.field(default_factory=dict)

    def source(self, source: Source, record: FlowRecord) -> int | bytes:
        kind = source.kind
        if kind == "record":
            value = getattr(record, source.name)
            return value.encode() if isinstance(value, str) else value
        if kind == "key":
            return getattr(record.key, source.name)
        if kind == "exporter":
            return self.constants[source.name]
        if kind == "literal":
            return int(source.name)
        lookup = LOOKUPS[kind]
        if kind == "route":
            result = self.route(record.netns, getattr(record.key, SIDES[source.side]))
        elif kind == "pod":
            result = pod_owner(self.pods, getattr(record.key, SIDES[source.side]), record.end_ns)
        else:
            result = self.lookups[kind](record)
        value = result[lookup.index(source.name)]
        return value.encode() if isinstance(value, str) else value


def pod_table(pods) -> dict | None:
    """The dict a packer reads pods from (a PodIndex's ``encoded_by_address``; an empty one for no pods),
    or None when ``pods`` is a plain function the packer must call."""
    return {} if pods is None else getattr(pods, "encoded_by_address", None)


def pod_owner(pods, address: bytes, end_ns: int) -> tuple:
    """The encoded values of the pod that owned ``address`` at ``end_ns`` (NOPOD: none)."""
    table = pod_table(pods)
    owner = table.get(address, NOPOD) if table is not None else pods(address)
    return owner if owner.__class__ is tuple else owner(end_ns)


def parse(text: str) -> Value:
    """``source | transform ...`` -> Value; ValueError naming the bad piece and what is accepted."""
    source_text, *transform_names = (p.strip() for p in text.split("|"))
    transforms = []
    for name in transform_names:
        if name not in TRANSFORMS:
            raise ValueError(f"value {text!r}: unknown transform {name!r}; accepted: {', '.join(TRANSFORMS)}")
        transforms.append(TRANSFORMS[name])
    return Value(_source(source_text, text), tuple(transforms))


def _source(text: str, whole: str) -> Source:
    if text.isdigit():
        return Source("literal", text)
    kind, _, rest = text.partition(".")
    if kind == "record" and rest in TEXT_ATTRIBUTES | INTEGER_ATTRIBUTES:
        return Source("record", rest)
    if kind == "key" and rest in FlowKey._fields:
        return Source("key", rest)
    if kind == "exporter" and rest in EXPORTER_CONSTANTS:
        return Source("exporter", rest)
    lookup = LOOKUPS.get(kind)
    if lookup is not None:
        side, _, item = rest.partition(".") if lookup.sided else ("", "", rest)
        if (side in SIDES) == lookup.sided and item in lookup.items:
            return Source(kind, item, side)
    attributes = ", ".join(sorted(INTEGER_ATTRIBUTES | TEXT_ATTRIBUTES))
    lookups = ", ".join(f"{n}.{'SIDE.' if l.sided else ''}ITEM ({', '.join(l.items)})" for n, l in LOOKUPS.items())
    raise ValueError(f"value {whole!r}: unknown source {text!r}; accepted: record.ATTR ({attributes}), "
                     f"key.ITEM ({', '.join(FlowKey._fields)}), exporter.NAME ({', '.join(EXPORTER_CONSTANTS)}), "
                     f"{lookups}, or an integer")
