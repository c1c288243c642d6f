"""The IPFIX information model: Information Elements and their encodings.

The IANA registry subset lives in ``agent/data/iana-ipfix-elements.csv``;
kipfix's enterprise-specific elements in ``agent/data/kipfix-elements.csv``
(numbered under the exporter's Private Enterprise Number). Names are matched
case-insensitively, so both the IANA spelling (``flowEndMilliseconds``) and
the capitalised one used in existing configs (``FlowEndMilliseconds``) work.
"""

from __future__ import annotations

import csv
import functools
from dataclasses import dataclass, replace
from importlib import resources

from ...contract import DEFAULT_PEN

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


@dataclass(frozen=True, slots=True)
class InformationElement:
    """One Information Element: ``pen`` is 0 for IANA elements."""

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
    def enterprise(self) -> bool:
        return self.pen != 0

    @property
    def struct_code(self) -> str | None:
        """struct format of the value in network byte order (None if variable)."""
        return TYPES[self.type][1]

    def with_pen(self, pen: int) -> "InformationElement":
        return replace(self, pen=pen)


def _read(filename: str, pen: int) -> list[InformationElement]:
    text = resources.files("kipfix.agent").joinpath("data", filename).read_text(encoding="utf-8")
    rows = csv.DictReader(line for line in text.splitlines() if line and not line.startswith("#"))
    elements = []
    for row in rows:
        if row["type"] not in TYPES:
            raise ValueError(f"{filename}: element {row['name']}: unsupported data type {row['type']!r}")
        length = VARLEN if row["length"] == "v" else int(row["length"])
        elements.append(InformationElement(int(row["id"]), row["name"], row["type"], length,
                                           row["semantics"], pen))
    return elements


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
            raise ValueError(f"unknown information element {name!r}; names follow the IANA IPFIX registry "
                             "(for example flowEndMilliseconds or FlowEndMilliseconds)")
        return element

    def by_id(self, element_id: int, pen: int = 0) -> InformationElement | None:
        return self._by_id.get((pen, element_id))

    def elements(self) -> list[InformationElement]:
        return list(self._by_id.values())

    def names(self) -> list[str]:
        return sorted(e.name for e in self._by_name.values())


@functools.cache
def default_model(enterprise_number: int = DEFAULT_PEN) -> InfoModel:
    """IANA elements plus kipfix's own elements under ``enterprise_number``."""
    return InfoModel(_read("iana-ipfix-elements.csv", 0) + _read("kipfix-elements.csv", enterprise_number))


def lookup(name: str) -> InformationElement:
    """The element called ``name`` (case-insensitive); ValueError naming it if unknown."""
    return default_model().lookup(name)
