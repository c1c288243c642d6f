"""IPFIX message decoding (RFC 7011): messages, sets, templates, records.

Malformed input raises MalformedMessage with the reason and the offset --
and nothing else, whatever the bytes: a value the element's type cannot
hold is malformed too. Data sets whose template is not (yet) known are
reported, not fatal (RFC 7011 8). Templates are learned per (peer,
observation domain), at most ``max_templates`` in all: the least recently
used go first, so no sender can grow the store without bound.
"""

from __future__ import annotations

import ipaddress
import struct
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

from .infomodel import DEFAULT_PEN, TYPES, VARLEN, InfoModel, InformationElement, default_model, reduced_lengths
from .message import HEADER, OPTIONS_TEMPLATE_SET_ID, SET_HEADER, TEMPLATE_SET_ID, VERSION
from .template import ENTERPRISE_BIT, from_ntp


class MalformedMessage(ValueError):
    """The bytes are not a valid IPFIX message; the text says why and where."""


@dataclass
class DecodedTemplate:
    id: int
    elements: tuple[InformationElement, ...]
    scope_count: int = 0

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.elements]

    @property
    def min_length(self) -> int:
        return sum(1 if e.length == VARLEN else e.length for e in self.elements)


@dataclass
class DecodedRecord:
    template_id: int
    values: dict[str, Any]
    scope: tuple[str, ...] = ()  # scope element names, for options records


@dataclass
class DecodedMessage:
    version: int
    length: int
    export_time: int
    sequence: int
    domain_id: int
    records: list[DecodedRecord] = field(default_factory=list)
    templates: list[DecodedTemplate] = field(default_factory=list)
    withdrawn: list[int] = field(default_factory=list)
    unknown_sets: list[int] = field(default_factory=list)  # set ids of data sets without a template

    @property
    def data_records(self) -> list[DecodedRecord]:
        return [r for r in self.records if not r.scope]

    @property
    def options_records(self) -> list[DecodedRecord]:
        return [r for r in self.records if r.scope]


def _converter(element: InformationElement, length: int) -> Callable[[bytes], Any]:
    kind = element.type
    if kind in ("ipv4Address", "ipv6Address"):
        return ipaddress.ip_address
    if kind == "macAddress":
        return lambda b: b.hex(":")
    if kind == "string":
        return lambda b: b.decode("utf-8", errors="replace")
    if kind == "octetArray":
        return bytes
    if kind == "boolean":
        return lambda b: b[0] == 1
    if kind in ("float32", "float64"):
        return lambda b: struct.unpack("!f" if len(b) == 4 else "!d", b)[0]
    if kind == "dateTimeNanoseconds":
        return lambda b: from_ntp(int.from_bytes(b, "big"))
    if kind == "dateTimeMicroseconds":
        return lambda b: (from_ntp(int.from_bytes(b, "big")) + 500) // 1000
    signed = kind.startswith("signed")
    return lambda b: int.from_bytes(b, "big", signed=signed)


MAX_TEMPLATES = 16384


class TemplateStore:
    """Templates learned per (peer, observation domain, template id), the least recently used
    evicted beyond ``max_templates`` (``evicted`` counts them)."""

    def __init__(self, model: InfoModel | None = None, max_templates: int = MAX_TEMPLATES):
        self.model = model or default_model(DEFAULT_PEN)
        self.max_templates = max_templates
        self.evicted = 0
        self._templates: OrderedDict[tuple[Any, int, int], DecodedTemplate] = OrderedDict()
        self._decoders: dict[tuple[Any, int, int], Callable] = {}

    def __len__(self) -> int:
        return len(self._templates)

    def get(self, peer: Any, domain: int, template_id: int) -> DecodedTemplate | None:
        key = (peer, domain, template_id)
        template = self._templates.get(key)
        if template is not None:
            self._templates.move_to_end(key)
        return template

    def add(self, peer: Any, domain: int, template: DecodedTemplate) -> None:
        key = (peer, domain, template.id)
        self._templates[key] = template
        self._templates.move_to_end(key)
        self._decoders.pop(key, None)
        while len(self._templates) > self.max_templates:
            old, _ = self._templates.popitem(last=False)
            self._decoders.pop(old, None)
            self.evicted += 1

    def withdraw(self, peer: Any, domain: int, template_id: int, set_id: int) -> None:
        for key in list(self._templates):
            if key[:2] != (peer, domain):
                continue
            template = self._templates[key]
            is_options = template.scope_count > 0
            if key[2] == template_id or (template_id == set_id and is_options == (set_id == OPTIONS_TEMPLATE_SET_ID)):
                del self._templates[key]
                self._decoders.pop(key, None)

    def forget_peer(self, peer: Any) -> None:
        for key in [k for k in self._templates if k[0] == peer]:
            del self._templates[key]
            self._decoders.pop(key, None)

    def element(self, element_id: int, length: int, pen: int) -> InformationElement:
        known = self.model.by_id(element_id, pen)
        if known is not None:
            return InformationElement(known.id, known.name, known.type, length, known.semantics, pen)
        name = f"{pen}.{element_id}" if pen else f"element{element_id}"
        return InformationElement(element_id, name, "octetArray", length, "default", pen)

    def decoder(self, peer: Any, domain: int, template: DecodedTemplate) -> Callable:
        key = (peer, domain, template.id)
        decode = self._decoders.get(key)
        if decode is None:
            decode = self._decoders[key] = _record_decoder(template)
        return decode


def _record_decoder(template: DecodedTemplate) -> Callable[[bytes, int, int], tuple[dict, int]]:
    """``decode(data, offset, end) -> (values, next offset)``; MalformedMessage on overrun."""
    plan = [(e.name, e.length, _converter(e, e.length)) for e in template.elements]
    names = [e.name for e in template.elements]
    # An element a template repeats (RFC 7011 4.2: first and last observationTime*) decodes to a list.
    repeated = {n for n in names if names.count(n) > 1}

    def decode(data: bytes, offset: int, end: int) -> tuple[dict, int]:
        values = {}
        for name, length, convert in plan:
            if length == VARLEN:
                if offset >= end:
                    raise MalformedMessage(f"template {template.id}: {name}: length octet beyond the set end")
                length = data[offset]
                offset += 1
                if length == 255:
                    if offset + 2 > end:
                        raise MalformedMessage(f"template {template.id}: {name}: 3-octet length beyond the set end")
                    length = int.from_bytes(data[offset:offset + 2], "big")
                    offset += 2
            if offset + length > end:
                raise MalformedMessage(f"template {template.id}: {name}: {length} octets run past the set end "
                                       f"at offset {offset}")
            if name in repeated:
                values.setdefault(name, []).append(convert(data[offset:offset + length]))
            else:
                values[name] = convert(data[offset:offset + length])
            offset += length
        return values, offset

    return decode


def _parse_template_set(data: bytes, offset: int, end: int, set_id: int, store: TemplateStore,
                        peer: Any, domain: int, message: DecodedMessage) -> None:
    while end - offset >= 4:
        template_id, count = struct.unpack_from("!HH", data, offset)
        offset += 4
        if count == 0:  # withdrawal (RFC 7011 8.1)
            if template_id != set_id and template_id < 256:
                raise MalformedMessage(f"template withdrawal for invalid template id {template_id}")
            store.withdraw(peer, domain, template_id, set_id)
            message.withdrawn.append(template_id)
            continue
        if template_id < 256:
            raise MalformedMessage(f"template id {template_id} at offset {offset - 4} is reserved; "
                                   "template ids are 256..65535")
        scope_count = 0
        if set_id == OPTIONS_TEMPLATE_SET_ID:
            if offset + 2 > end:
                raise MalformedMessage(f"options template {template_id}: scope field count beyond the set end")
            (scope_count,) = struct.unpack_from("!H", data, offset)
            offset += 2
            if scope_count == 0 or scope_count > count:
                raise MalformedMessage(f"options template {template_id}: scope field count {scope_count} "
                                       f"is not 1..{count}")
        elements = []
        for _ in range(count):
            if offset + 4 > end:
                raise MalformedMessage(f"template {template_id}: field specifier beyond the set end")
            element_id, length = struct.unpack_from("!HH", data, offset)
            offset += 4
            pen = 0
            if element_id & ENTERPRISE_BIT:
                if offset + 4 > end:
                    raise MalformedMessage(f"template {template_id}: enterprise number beyond the set end")
                (pen,) = struct.unpack_from("!I", data, offset)
                offset += 4
                element_id &= ~ENTERPRISE_BIT
            if length == 0:
                raise MalformedMessage(f"template {template_id}: element {element_id} has length 0")
            element = store.element(element_id, length, pen)
            if length == VARLEN and TYPES[element.type][0] is not None:  # RFC 7011 7: strings and octets
                raise MalformedMessage(f"template {template_id}: {element.name} ({element.type}) is declared "
                                       "variable-length; only string and octetArray elements can be")
            default = TYPES[element.type][0]
            reduced = reduced_lengths(element.type)  # RFC 7011 6.2
            if length != VARLEN and default is not None and length != default and length not in reduced:
                sizes = f" (or {reduced[0]}..{reduced[-1]}, reduced)" if len(reduced) > 1 else \
                    f" (or {reduced[0]}, reduced)" if reduced else ""
                raise MalformedMessage(f"template {template_id}: {element.name} has length {length}; "
                                       f"its type {element.type} needs {default}{sizes}")
            elements.append(element)
        template = DecodedTemplate(template_id, tuple(elements), scope_count)
        store.add(peer, domain, template)
        message.templates.append(template)
    if offset != end and any(data[offset:end]):
        raise MalformedMessage(f"template set: {end - offset} trailing octets are not zero padding")


def decode_message(data: bytes, store: TemplateStore, peer: Any = None) -> DecodedMessage:
    """Decode one whole message; learn its templates into ``store``."""
    if len(data) < HEADER.size:
        raise MalformedMessage(f"message of {len(data)} octets is shorter than the 16-octet header")
    version, length, export_time, sequence, domain = HEADER.unpack_from(data)
    if version != VERSION:
        raise MalformedMessage(f"version {version} is not IPFIX (10)")
    if length != len(data):
        raise MalformedMessage(f"header length {length} differs from the {len(data)} octets received")
    message = DecodedMessage(version, length, export_time, sequence, domain)
    offset = HEADER.size
    while offset < length:
        if length - offset < SET_HEADER.size:
            raise MalformedMessage(f"{length - offset} octets at offset {offset} cannot hold a set header")
        set_id, set_length = SET_HEADER.unpack_from(data, offset)
        if set_length < SET_HEADER.size or offset + set_length > length:
            raise MalformedMessage(f"set {set_id} at offset {offset} has length {set_length}, "
                                   f"outside 4..{length - offset}")
        start, end = offset + SET_HEADER.size, offset + set_length
        if set_id in (TEMPLATE_SET_ID, OPTIONS_TEMPLATE_SET_ID):
            _parse_template_set(data, start, end, set_id, store, peer, domain, message)
        elif set_id >= 256:
            template = store.get(peer, domain, set_id)
            if template is None:
                message.unknown_sets.append(set_id)
            else:
                decode = store.decoder(peer, domain, template)
                scope = tuple(template.names[:template.scope_count])
                minimum = max(template.min_length, 1)
                position = start
                while end - position >= minimum:
                    try:
                        values, position = decode(data, position, end)
                    except MalformedMessage:
                        raise
                    except Exception as err:  # noqa: BLE001 - a value its type cannot hold is malformed input
                        raise MalformedMessage(f"data set {set_id}: record {len(message.records) + 1} at offset "
                                               f"{position}: {type(err).__name__}: {err}") from None
                    message.records.append(DecodedRecord(set_id, values, scope))
                if position != end and any(data[position:end]):
                    raise MalformedMessage(f"data set {set_id}: {end - position} trailing octets are not "
                                           "zero padding")
        else:
            raise MalformedMessage(f"set id {set_id} at offset {offset} is reserved; accepted: 2, 3, 256..65535")
        offset = end
    return message


def read_stream_message(read_exactly: Callable[[int], bytes]) -> bytes | None:
    """Read one message from a stream (TCP); None at a clean end of stream."""
    head = read_exactly(4)
    if not head:
        return None
    if len(head) < 4:
        raise MalformedMessage("stream ended inside a message header")
    version, length = struct.unpack("!HH", head)
    if version != VERSION:
        raise MalformedMessage(f"version {version} is not IPFIX (10); the stream is out of sync")
    if length < HEADER.size:
        raise MalformedMessage(f"header length {length} is shorter than the 16-octet header")
    rest = read_exactly(length - 4)
    if len(rest) < length - 4:
        raise MalformedMessage(f"stream ended after {len(rest) + 4} of {length} octets of a message")
    return head + rest
