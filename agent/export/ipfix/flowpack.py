"""The C data-record encoder (_flowpack.c): each element's value as a step.

``compile_packer`` gives the same ``pack(records) -> [record bytes]`` as the
Python packer (pypack.py), 3 to 5 times as fast for wide templates, or None
when the extension was not built or a value needs something the C encoder
has no step for (a signed, float or boolean element, more guards or
operations than a step holds); the caller then uses the Python packer.
The C encoder knows no element: every step is made here from the element
table's value (values.py), so a new element, or a new kind of lookup, needs
no C.

KIPFIX_ENCODER=python in the environment forces the Python packer (for
comparisons and benchmarks).
"""

from __future__ import annotations

import os
import struct
from typing import Callable, Mapping

from ...flows.record import FlowKey, FlowRecord
from .infomodel import BYTES_TYPES, InformationElement
from .values import BYTES, NOPOD, SIDES, Source, Value, pod_table

try:
    from . import _flowpack
except ImportError:  # built by pip install (python3-dev and gcc); without it, the Python packer
    _flowpack = None

AVAILABLE = _flowpack is not None
INTEGER_TYPES = ("unsigned8", "unsigned16", "unsigned32", "unsigned64", "dateTimeSeconds", "dateTimeMilliseconds",
                 "dateTimeMicroseconds", "dateTimeNanoseconds")


class Program:
    """The steps of one packer, and the record attributes and lookups they read."""

    def __init__(self, constants: Mapping[str, int], route, pods, lookups: Mapping[str, Callable]):
        self.constants = constants
        self.route, self.pods, self.functions = route, pods, lookups
        self.slots = ["key"]  # the C encoder reads the key from slot 0
        self.lookups: list[tuple] = []
        self._lookup_index: dict[tuple[str, str], int] = {}

    def slot(self, name: str) -> int:
        if name not in self.slots:
            self.slots.append(name)
        return self.slots.index(name)

    def lookup(self, source: Source) -> int:
        """Index of the lookup ``source`` takes an item of (added the first time)."""
        key = (source.kind, source.side)
        if key not in self._lookup_index:
            address = FlowKey._fields.index(SIDES[source.side]) if source.side else 0
            if source.kind == "route":
                entry = (_flowpack.L_ROUTE, self.route, getattr(self.route, "cache", {}), address, self.slot("netns"))
            elif source.kind == "pod":
                table = pod_table(self.pods)
                entry = (_flowpack.L_POD, self.pods if table is None else None, table, address, self.slot("end_ns"))
            else:
                entry = (_flowpack.L_CALL, self.functions[source.kind], None, 0, 0)
            self._lookup_index[key] = len(self.lookups)
            self.lookups.append(entry)
        return self._lookup_index[key]

    def _source(self, source: Source) -> tuple[int, int, int, int]:
        """(source code, index, item, constant)"""
        kind = source.kind
        if kind == "zero":
            return _flowpack.S_CONST, 0, 0, 0
        if kind == "literal":
            return _flowpack.S_CONST, 0, 0, int(source.name)
        if kind == "exporter":
            return _flowpack.S_CONST, 0, 0, self.constants[source.name]
        if kind == "record":
            return _flowpack.S_SLOT, self.slot(source.name), 0, 0
        if kind == "key":
            return _flowpack.S_KEY, FlowKey._fields.index(source.name), 0, 0
        return _flowpack.S_LOOKUP, self.lookup(source), source.lookup.index(source.name), 0

    def step(self, element: InformationElement, value: Value) -> tuple | None:
        """The step writing ``element`` from ``value``, or None if the C encoder cannot."""
        if element.variable_length:
            kind = _flowpack.KIND_VARLEN
        elif element.type in BYTES_TYPES:
            kind = _flowpack.KIND_BYTES
        elif element.type in INTEGER_TYPES and 1 <= element.length <= 8:
            kind = _flowpack.KIND_INT
        else:
            return None
        if (kind == _flowpack.KIND_INT) == (value.source.gives == BYTES):
            return None
        guards = tuple((FlowKey._fields.index(g.item), int(g.negate), g.values) for g in value.guards)
        operations = tuple((getattr(_flowpack, "OP_" + name.upper()),
                            self.constants[arg] if isinstance(arg, str) else arg) for name, arg in value.operations)
        source, index, item, constant = self._source(value.source)
        if (len(guards) > _flowpack.MAX_GUARDS or len(operations) > _flowpack.MAX_OPS
                or any(len(g[2]) > _flowpack.MAX_GUARD_VALUES or not 0 <= min(g[2]) <= max(g[2]) < 2**64
                       for g in guards)
                or any(not 0 <= arg < 2**64 for _, arg in operations) or not 0 <= constant < 2**64
                or len(self.slots) > _flowpack.MAX_SLOTS or len(self.lookups) > _flowpack.MAX_LOOKUPS):
            return None
        wire_format = {"dateTimeMicroseconds": _flowpack.F_NTP_US,
                       "dateTimeNanoseconds": _flowpack.F_NTP}.get(element.type, _flowpack.F_PLAIN)
        return (source, index, item, constant, guards, operations, wire_format,
                0 if element.variable_length else element.length, kind, element.reduced)


def compile_packer(template, values, *, family: int | None, constants: Mapping[str, int], route=None, pods=None,
                   lookups: Mapping[str, Callable] | None = None):
    """The C packer for ``template`` whose elements take ``values`` (values.Value), or None (see module doc).

    Its ``saturated`` gives, per element, the values sent as the largest a
    reduced size holds because they were larger.
    """
    if _flowpack is None or os.environ.get("KIPFIX_ENCODER", "").lower() == "python":
        return None
    program = Program(constants, route, pods, lookups or {})
    steps = []
    for element, value in zip(template.elements, values):
        step = program.step(element, value.for_family(family))
        if step is None:
            return None
        steps.append(step)
    return _flowpack.Packer(tuple(steps), tuple(program.slots), tuple(program.lookups), FlowRecord, NOPOD,
                            struct.error)
