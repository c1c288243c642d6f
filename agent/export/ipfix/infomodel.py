"""The IPFIX information model: every Information Element kipfix knows, from one table.

``agent/data/elements.csv`` has one row per element: IANA id or PEN and id,
name, abstract data type, length, semantics, and how kipfix fills it in a
flow record (values.py). This module reads it into an ``ElementTable``; the
encoders, the decoder, config validation and docs/elements.md all use that.
Names are matched case-insensitively, so both the IANA spelling
(``flowEndMilliseconds``) and the capitalised one of linux-flow-exporter
configs (``FlowEndMilliseconds``) work.
"""

from __future__ import annotations

import csv
import functools
from dataclasses import dataclass
from importlib import resources
from typing import Iterable

from ...contract import DEFAULT_PEN
from . import values as value_sources

VARLEN = 65535  # RFC 7011 7: field length 65535 announces a variable-length field

# Abstract data type -> (default length, struct format character or None).
# Variable-length types (string, octetArray) have length None.
TYPES: dict[str, tuple[int | None, str | None]] = {
    "unsigned8": (1, "B"),
    "unsigned16": (2, "H"),
    "unsigned32": (4, "I"),
    "unsigned64": (8, "Q"),
    "signed8": (1, "b"),
    "signed16": (2, "h"),
    "signed32": (4, "i"),
    "signed64": (8, "q"),
    "float32": (4, "f"),
    "float64": (8, "d"),
    "boolean": (1, "B"),
    "macAddress": (6, "6s"),
    "ipv4Address": (4, "4s"),
    "ipv6Address": (16, "16s"),
    "dateTimeSeconds": (4, "I"),
    "dateTimeMilliseconds": (8, "Q"),
    "dateTimeMicroseconds": (8, "Q"),
    "dateTimeNanoseconds": (8, "Q"),
    "string": (None, None),
    "octetArray": (None, None),
}
INTEGER_TYPES = frozenset(t for t in TYPES if t.startswith(("unsigned", "signed")))
BYTES_TYPES = frozenset(("macAddress", "ipv4Address", "ipv6Address", "string", "octetArray"))


def reduced_lengths(data_type: str) -> range | tuple[int, ...]:
    """Lengths RFC 7011 6.2 allows below the type's own: any for integers (dropping leading zero or
    sign octets), float32 for float64, none for the other types."""
    if data_type in INTEGER_TYPES:
        return range(1, TYPES[data_type][0])
    return (4,) if data_type == "float64" else ()


@dataclass(frozen=True, slots=True)
class InformationElement:
    """One Information Element: ``pen`` is 0 for IANA elements; ``length`` may be a reduced size."""

    id: int
    name: str
    type: str
    length: int  # octets on the wire; VARLEN for variable-length elements
    semantics: str = "default"
    pen: int = 0

    @property
    def variable_length(self) -> bool:
        return self.length == VARLEN

    @property
    def reduced(self) -> bool:
        """Sent in fewer octets than its type's (RFC 7011 6.2)."""
        return not self.variable_length and self.length != TYPES[self.type][0]

    @property
    def struct_code(self) -> str | None:
        """struct format of the value in network byte order (None if variable, or a length struct has
        no code for, such as a 3-octet integer)."""
        if not self.reduced:
            return TYPES[self.type][1]
        if self.type == "float64" and self.length == 4:
            return "f"
        code = {1: "b", 2: "h", 4: "i", 8: "q"}.get(self.length) if self.type in INTEGER_TYPES else None
        return code if code is None or self.type.startswith("signed") else code.upper()


@dataclass(frozen=True)
class Element:
    """One row of the element table: the element, how a flow record fills it (None: never), and
    what kipfix puts there. ``pen`` None is the exporter's own PEN (kipfix's elements)."""

    id: int
    name: str
    type: str
    length: int
    semantics: str
    pen: int | None
    value: value_sources.Value | None
    description: str = ""

    def element(self, exporter_pen: int = DEFAULT_PEN) -> InformationElement:
        return InformationElement(self.id, self.name, self.type, self.length, self.semantics,
                                  exporter_pen if self.pen is None else self.pen)


def unknown(name: str) -> ValueError:
    return ValueError(f"unknown information element {name!r}; names follow the IANA IPFIX registry "
                      "(for example flowEndMilliseconds or FlowEndMilliseconds)")


class ElementTable:
    """The rows by (case-folded) name, in table order."""

    def __init__(self, rows: Iterable[Element]):
        self.rows = tuple(rows)
        self._by_name = {}
        for row in self.rows:
            if row.name.casefold() in self._by_name:
                raise ValueError(f"element table: {row.name} appears twice")
            self._by_name[row.name.casefold()] = row

    def row(self, name: str) -> Element:
        """The row called ``name`` (case-insensitive); ValueError naming it if unknown."""
        row = self._by_name.get(str(name).casefold())
        if row is None:
            raise unknown(name)
        return row

    def fillable(self) -> list[Element]:
        return [row for row in self.rows if row.value is not None]

    def extended(self, rows: Iterable[Element]) -> "ElementTable":
        """This table plus ``rows`` (elements declared at run time)."""
        return ElementTable(self.rows + tuple(rows))

    def model(self, exporter_pen: int = DEFAULT_PEN) -> "InfoModel":
        return InfoModel([row.element(exporter_pen) for row in self.rows])


def _row(fields: dict[str, str], where: str) -> Element:
    data_type, length = fields["type"], fields["length"]
    if data_type not in TYPES:
        raise ValueError(f"{where}: unsupported data type {data_type!r}; accepted: {', '.join(TYPES)}")
    expected = TYPES[data_type][0]
    if (length == "v") != (expected is None) or (expected is not None and int(length) != expected):
        raise ValueError(f"{where}: length {length!r} is not {data_type}'s ({expected or 'v'})")
    value = value_sources.parse(fields["value"]) if fields["value"] else None
    if value is not None and (value.source.gives == value_sources.BYTES) != (data_type in BYTES_TYPES):
        raise ValueError(f"{where}: value {fields['value']!r} gives {value.source.gives}, "
                         f"which a {data_type} element cannot hold")
    if value is not None and value.operations and value.source.gives != value_sources.INT:
        raise ValueError(f"{where}: value {fields['value']!r}: integer operations on octets")
    pen = fields["pen"]
    return Element(int(fields["id"]), fields["name"], data_type, VARLEN if length == "v" else int(length),
                   fields["semantics"], 0 if pen == "" else None if pen == "exporter" else int(pen), value,
                   fields["description"])


def read_table(text: str, filename: str = "elements.csv") -> ElementTable:
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    return ElementTable(_row(fields, f"{filename}: {fields['name']}") for fields in csv.DictReader(lines))


@functools.cache
def table() -> ElementTable:
    """The element table shipped with kipfix (agent/data/elements.csv)."""
    return read_table(resources.files("kipfix.agent").joinpath("data", "elements.csv").read_text(encoding="utf-8"))


class InfoModel:
    """Elements by (case-folded) name and by (pen, id)."""

    def __init__(self, elements: list[InformationElement]):
        self._by_name: dict[str, InformationElement] = {}
        self._by_id: dict[tuple[int, int], InformationElement] = {}
        for element in elements:
            self.add(element)

    def add(self, element: InformationElement) -> None:
        self._by_name[element.name.casefold()] = element
        self._by_id[(element.pen, element.id)] = element

    def lookup(self, name: str) -> InformationElement:
        element = self._by_name.get(str(name).casefold())
        if element is None:
            raise unknown(name)
        return element

    def by_id(self, element_id: int, pen: int = 0) -> InformationElement | None:
        return self._by_id.get((pen, element_id))

    def elements(self) -> list[InformationElement]:
        return list(self._by_id.values())


@functools.cache
def default_model(enterprise_number: int = DEFAULT_PEN) -> InfoModel:
    """Every element of the table, kipfix's own under ``enterprise_number``."""
    return table().model(enterprise_number)


def lookup(name: str) -> InformationElement:
    """The element called ``name`` (case-insensitive); ValueError naming it if unknown."""
    return default_model().lookup(name)
