"""The Python data-record encoder, the reference: values.py's pieces as Python source.

``compile_packer`` writes each element's value (values.Value) as one
expression over ``r`` (the FlowRecord) and its key's items, and
template.compile_packer joins them into one function that packs a whole
batch in a list comprehension: no per-field dispatch at run time. Lookups
(routes, pods, others) are bound once per record by comprehension clauses,
and only when an element uses them.
"""

from __future__ import annotations

import struct
from collections import Counter
from typing import Callable, Mapping, Sequence

from ...flows.record import FlowKey
from .infomodel import InformationElement
from .template import Template, compile_packer as compile_template
from .values import BYTES, NOPOD, SIDES, Source, Value, pod_table

# dateTimeMicroseconds and dateTimeNanoseconds (NTP format, RFC 7011 6.1.9-10) from microseconds and
# nanoseconds, inline: a function call per field costs more than the arithmetic.
NTP = {
    "dateTimeMicroseconds": "(((({v} // 1000000 + 2208988800) & 0xFFFFFFFF) << 32)"
                            " | ((({v} % 1000000) << 32) // 1000000) & 0xFFFFF800)",
    "dateTimeNanoseconds": "(((({v} // 1000000000 + 2208988800) & 0xFFFFFFFF) << 32)"
                           " | (({v} % 1000000000) << 32) // 1000000000)",
}
OPERATORS = {"div": "//", "shr": ">>", "sub": "-", "and": "&"}
KEY_IS_TUPLE = issubclass(FlowKey, tuple)  # unpacking the key once is cheaper than an attribute load per field


def key_item(item: str) -> str:
    return f"k_{item}" if KEY_IS_TUPLE else f"k.{item}"


class Bindings:
    """The comprehension clauses a packer needs, each added once, in the order first needed.

    ``shared`` counts how often each computed value (a source and operations,
    as written) is used in the template: one used twice or more, such as a
    flow's start in milliseconds for flowStartMilliseconds and
    flowStartSysUpTime, is computed once per record.
    """

    def __init__(self, pods_by_call: bool, shared: Counter | None = None):
        self.pods_by_call = pods_by_call
        self.shared = shared if shared is not None else Counter()
        self.clauses: dict[str, str] = {}
        self._computed: dict[str, str] = {}

    def computed(self, written: str, expression: str) -> str:
        """``expression`` (the value ``written``, bound names used), or a name bound to it if it is shared."""
        if self.shared[written] < 2:
            return expression
        if written not in self._computed:
            self._computed[written] = name = f"V{len(self._computed)}"
            self.clauses[name] = f"for {name} in ({expression},)"
        return self._computed[written]

    def lookup(self, source: Source) -> str:
        """The name bound to ``source``'s lookup result for the record."""
        if source.kind == "route":
            name, address = "R_" + source.side, key_item(SIDES[source.side])
            clause = f"for {name} in (rcache.get((r.netns, {address})) or route(r.netns, {address}),)"
        elif source.kind == "pod":
            name, address = "P_" + source.side, key_item(SIDES[source.side])
            get = f"pods({address})" if self.pods_by_call else f"pget({address}, NOPOD)"
            # a value that is no tuple is the IP's recent owners (podmeta.Succession): asked for the flow's end
            clause = (f"for {name} in ({get},) "
                      f"for {name} in ({name} if {name}.__class__ is tuple else {name}(r.end_ns),)")
        else:
            name = "L_" + source.kind
            clause = f"for {name} in (lookup_{source.kind}(r),)"
        self.clauses.setdefault(name, clause)
        return name


def source_expression(source: Source, bindings: Bindings, constants: Mapping[str, int]) -> str:
    kind = source.kind
    if kind == "zero":
        return 'b""' if source.gives == BYTES else "0"
    if kind == "literal":
        return source.name
    if kind == "exporter":
        return repr(constants[source.name])
    if kind == "record":
        return f"r.{source.name}.encode()" if source.gives == BYTES else f"r.{source.name}"
    if kind == "key":
        return key_item(source.name)
    item = f"{bindings.lookup(source)}[{source.lookup.index(source.name)}]"
    return f"utf8({item})" if source.lookup.items[source.name] == BYTES and kind not in ("route", "pod") else item


def computed(value: Value, bindings: Bindings, constants: Mapping[str, int]) -> tuple[list[str], str]:
    """(the value after each operation, as written; the expression for the last, shared ones bound)"""
    written = text = source_expression(value.source, bindings, constants)
    steps = []
    for name, arg in value.operations:
        operation = f" {OPERATORS[name]} {constants[arg] if isinstance(arg, str) else arg}"
        written, text = f"({written}{operation})", f"({text}{operation})"
        text = bindings.computed(written, text)
        steps.append(written)
    return steps, text


def expression(value: Value, element: InformationElement, bindings: Bindings, constants: Mapping[str, int]) -> str:
    _, text = computed(value, bindings, constants)
    if element.type in NTP and not value.guards:  # the NTP form uses its value twice
        text = bindings.computed(f"{value.source.text}:{value.operations}", text)
    conditions = []
    for guard in value.guards:
        values = guard.values[0] if len(guard.values) == 1 else guard.values
        operator = ("!=" if guard.negate else "==") if len(guard.values) == 1 else \
            ("not in" if guard.negate else "in")
        conditions.append(f"{key_item(guard.item)} {operator} {values!r}")
    if conditions:
        zero = 'b""' if value.source.gives == BYTES else "0"
        text = f"({text} if {' and '.join(conditions)} else {zero})"
    if element.type in NTP:
        text = NTP[element.type].format(v=text)
    return text


class Saturation:
    """Counts, per element, values that did not fit a reduced size and were sent as its largest value."""

    def __init__(self, elements: Sequence[InformationElement]):
        self.counts = [0] * len(elements)

    def clamp(self, index: int, element: InformationElement) -> Callable[[int], int]:
        counts = self.counts
        signed = element.type.startswith("signed")
        high = (1 << (8 * element.length - signed)) - 1
        low = -high - 1 if signed else 0

        def clamp(value: int) -> int:
            if not isinstance(value, int):
                raise struct.error(f"{element.name}: required argument is not an integer")
            if value > high or value < low < 0:
                counts[index] += 1
                return high if value > high else low
            if value < low:  # a negative value for an unsigned element is an error at any size
                raise struct.error(f"{element.name}: {value} is negative")
            return value

        return clamp


def compile_packer(template: Template, values: Sequence[Value], *, family: int | None, constants: Mapping[str, int],
                   route=None, pods=None, lookups: Mapping[str, Callable] | None = None):
    """``pack(records) -> [record bytes]`` for ``template``, whose elements take ``values``.

    The function's ``saturated`` lists, per element, the values sent as the
    largest a reduced size holds (RFC 7011 6.2) because they were larger.
    """
    table = pod_table(pods)
    values = [value.for_family(family) for value in values]
    shared: Counter = Counter()
    for element, value in zip(template.elements, values):
        steps, _ = computed(value, Bindings(table is None), constants)
        shared.update(steps)
        if element.type in NTP and not value.guards and steps:
            shared[f"{value.source.text}:{value.operations}"] += 2
    bindings = Bindings(pods_by_call=table is None, shared=shared)
    saturation = Saturation(template.elements)
    env = {"route": route, "rcache": getattr(route, "cache", {}), "pods": pods,
           "pget": (table if table is not None else {}).get, "NOPOD": NOPOD, "utf8": utf8}
    env.update({f"lookup_{name}": function for name, function in (lookups or {}).items()})
    expressions = []
    for i, (element, value) in enumerate(zip(template.elements, values)):
        text = expression(value, element, bindings, constants)
        if element.reduced:
            env[f"clamp_{i}"] = saturation.clamp(i, element)
            text = f"clamp_{i}({text})"
        expressions.append(text)
    bind = "for k in (r.key,)"
    if KEY_IS_TUPLE:
        bind += f" for ({', '.join(key_item(f) for f in FlowKey._fields)}) in (k,)"
    bind = " ".join([bind, *bindings.clauses.values()])
    pack = compile_template(template, expressions, env, bind=bind)
    pack.saturated = saturation.counts
    return pack


def utf8(value) -> bytes:
    """A lookup's octets: str as UTF-8, bytes as they are."""
    return value.encode() if isinstance(value, str) else value
