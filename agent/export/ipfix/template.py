"""Templates (RFC 7011 3.4) and their compiled packing plans.

A template is compiled once into a packing function: consecutive fixed-length
fields share one ``struct.Struct``, variable-length fields are written between
them with a 1-octet (< 255) or 3-octet (255, then a 16-bit length) prefix
(RFC 7011 7), and so are integers of a reduced size struct has no format for
(RFC 7011 6.2: 3, 5, 6 or 7 octets). The function encodes a whole batch in
one list comprehension.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from .infomodel import INTEGER_TYPES, VARLEN, InformationElement

NTP_EPOCH_OFFSET = 2_208_988_800  # seconds from 1900-01-01 to 1970-01-01
ENTERPRISE_BIT = 0x8000
MAX_VARLEN = 65535


def ntp(ns: int) -> int:
    """Unix nanoseconds -> 64-bit NTP timestamp (dateTimeNanoseconds, RFC 7011 6.1.10)."""
    seconds, rest = divmod(ns, 1_000_000_000)
    return (((seconds + NTP_EPOCH_OFFSET) & 0xFFFFFFFF) << 32) | ((rest << 32) // 1_000_000_000)


def ntp_us(ns: int) -> int:
    """Unix nanoseconds -> dateTimeMicroseconds (NTP format, low 11 fraction bits zero)."""
    return ntp(ns - ns % 1000) & ~0x7FF


def from_ntp(value: int) -> int:
    """64-bit NTP timestamp -> Unix nanoseconds (exact for values made by ntp())."""
    seconds = (value >> 32) - NTP_EPOCH_OFFSET
    return seconds * 1_000_000_000 + (((value & 0xFFFFFFFF) * 1_000_000_000 + (1 << 31)) >> 32)


def varlen(data: bytes) -> bytes:
    """A variable-length field: 1-octet length below 255, else 255 and a 2-octet length."""
    n = len(data)
    if n < 255:
        return bytes((n,)) + data
    if n > MAX_VARLEN:
        data, n = data[:MAX_VARLEN], MAX_VARLEN
    return b"\xff" + n.to_bytes(2, "big") + data


def sized_int(value: int, length: int, signed: bool) -> bytes:
    """An integer in a length struct has no format for (3, 5, 6 or 7 octets); struct.error if it does not fit."""
    try:
        return value.to_bytes(length, "big", signed=signed)
    except (OverflowError, AttributeError) as err:
        raise struct.error(f"{value!r} does not fit {length} octets") from err


@dataclass(frozen=True)
class Template:
    """A (data or options) template: ``scope_count`` > 0 makes it an options template."""

    id: int
    elements: tuple[InformationElement, ...]
    scope_count: int = 0

    def __post_init__(self) -> None:
        if not 256 <= self.id <= 65535:
            raise ValueError(f"template id {self.id} is out of range; accepted: 256..65535")
        if not self.elements:
            raise ValueError(f"template {self.id} has no information elements; accepted: at least one")
        for e in self.elements:
            if not 0 < e.id < ENTERPRISE_BIT:
                raise ValueError(f"template {self.id}: element {e.name} has id {e.id}; accepted: 1..32767")

    @property
    def is_options(self) -> bool:
        return self.scope_count > 0

    @property
    def variable(self) -> bool:
        return any(e.variable_length for e in self.elements)

    @property
    def min_record_length(self) -> int:
        return sum(1 if e.variable_length else e.length for e in self.elements)

    def record(self) -> bytes:
        """The template record (or options template record) for a (options) template set."""
        if self.is_options:
            head = struct.pack("!HHH", self.id, len(self.elements), self.scope_count)
        else:
            head = struct.pack("!HH", self.id, len(self.elements))
        parts = [head]
        for e in self.elements:
            if e.pen:
                parts.append(struct.pack("!HHI", e.id | ENTERPRISE_BIT, e.length, e.pen))
            else:
                parts.append(struct.pack("!HH", e.id, e.length))
        return b"".join(parts)


def compile_packer(template: Template, expressions: Sequence[str], env: dict[str, Any],
                   bind: str = "") -> Callable[[Sequence[Any]], list[bytes]]:
    """Build ``pack(items) -> [record bytes]`` from one expression per element.

    Expressions see each item as ``r`` plus the names in ``env``; ``bind`` adds
    comprehension clauses (for example ``for k in (r.key,)``). Fixed-length
    expressions give a value struct accepts, variable-length ones give bytes.
    """
    if len(expressions) != len(template.elements):
        raise ValueError("one expression per element is needed")
    namespace = dict(env)
    namespace["varlen"] = varlen
    namespace["_int"] = sized_int
    parts: list[str] = []
    fmt, args = "", []

    def flush() -> None:
        nonlocal fmt, args
        if fmt:
            name = f"_s{len(parts)}"
            namespace[name] = struct.Struct("!" + fmt).pack
            parts.append(f"{name}({', '.join(args)})")
            fmt, args = "", []

    for element, expression in zip(template.elements, expressions):
        if element.variable_length:
            flush()
            parts.append(f"varlen({expression})")
        elif element.struct_code is not None:
            fmt += element.struct_code
            args.append(expression)
        elif element.type in INTEGER_TYPES and 0 < element.length < 8:  # 3, 5, 6 or 7 octets (RFC 7011 6.2)
            flush()
            signed = element.type.startswith("signed")
            parts.append(f"_int({expression}, {element.length}, {signed})")
        else:
            raise ValueError(f"{element.name}: {element.length} octets cannot hold its type {element.type}")
    flush()
    body = " + ".join(parts)
    source = f"def pack(items):\n    return [{body} for r in items {bind}]\n"
    exec(compile(source, f"<ipfix template {template.id}>", "exec"), namespace)
    return namespace["pack"]


# ---- generic values (options records, dummy flows, tests) --------------------

def _addr(value: Any) -> bytes:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    return ipaddress.ip_address(value).packed


def _mac(value: Any) -> bytes:
    if isinstance(value, str):
        return bytes.fromhex(value.replace(":", "").replace("-", ""))
    return bytes(value)


def _text(value: Any) -> bytes:
    return value.encode() if isinstance(value, str) else bytes(value)


_GENERIC = {
    "boolean": "(1 if {v} else 2)",
    "ipv4Address": "_addr({v})",
    "ipv6Address": "_addr({v})",
    "macAddress": "_mac({v})",
    "dateTimeMicroseconds": "ntp_us({v} * 1000)",
    "dateTimeNanoseconds": "ntp({v})",
    "string": "_text({v})",
    "octetArray": "_text({v})",
}


def compile_value_packer(template: Template) -> Callable[[Sequence[Sequence[Any]]], list[bytes]]:
    """``pack(rows) -> [record bytes]`` for rows of Python values, one per element.

    Values: int for integers and for dateTimeSeconds/Milliseconds/Microseconds/
    Nanoseconds (in those units since the Unix epoch); float; bool; addresses as
    text, ipaddress objects or packed bytes; str for string; bytes for octetArray.
    """
    expressions = [_GENERIC.get(e.type, "{v}").format(v=f"r[{i}]") for i, e in enumerate(template.elements)]
    env = {"_addr": _addr, "_mac": _mac, "_text": _text, "ntp": ntp, "ntp_us": ntp_us}
    return compile_packer(template, expressions, env)


__all__ = ["Template", "VARLEN", "compile_packer", "compile_value_packer", "ntp", "ntp_us", "from_ntp", "varlen"]
