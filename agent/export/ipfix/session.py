"""Per transport session and observation domain state (RFC 7011 8, 10).

- Template IDs: configured templates keep their IDs; a template that names
  addresses of only one family gets a derived counterpart for the other
  family (same fields, other addresses) under a free ID, which is logged.
- Sequence number: data records sent before this message in this session
  and domain, modulo 2^32. Template and options template sets do not advance
  it; options data records do (they are data records).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

from . import fields
from .message import OPTIONS_TEMPLATE_SET_ID, TEMPLATE_SET_ID, Packed, pack_sets
from .template import Template

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FlowTemplate:
    """A template for flow records, and which records it takes.

    ``family`` is 4 or 6 when it takes only records of that IP version, None
    when it takes all. ``configured_id`` is the config template it came from.
    """

    template: Template
    family: int | None
    configured_id: int
    derived: bool = False


def free_ids(used: Iterable[int]) -> Iterator[int]:
    """Unused template IDs: above the highest used one first, then from 256 up."""
    used = set(used)
    top = max(used, default=255)
    for candidate in list(range(top + 1, 65536)) + list(range(256, top)):
        if candidate not in used:
            used.add(candidate)
            yield candidate


def build_flow_templates(configs: Sequence, enterprise_number: int) -> list[FlowTemplate]:
    """Compile config templates (objects with ``id`` and ``fields``) plus derived counterparts."""
    seen: set[int] = set()
    for config in configs:
        if not 256 <= config.id <= 65535:
            raise ValueError(f"template id {config.id} is out of range; accepted: 256..65535")
        if config.id in seen:
            raise ValueError(f"template id {config.id} is used twice; accepted: unique ids 256..65535")
        seen.add(config.id)
        fields.check_template_fields(config.fields)
    ids = free_ids(seen)
    result = []
    for config in configs:
        family = fields.template_family(config.fields)
        result.append(FlowTemplate(Template(config.id, fields.elements(config.fields, enterprise_number)),
                                   family, config.id))
        other = fields.counterpart(config.fields)
        if other is not None:
            derived_id = next(ids)
            other_family = 6 if family == 4 else 4
            log.info("template %d names only IPv%d addresses: IPv%d flows use derived template %d",
                     config.id, family, other_family, derived_id)
            result.append(FlowTemplate(Template(derived_id, fields.elements(other, enterprise_number)),
                                       other_family, config.id, derived=True))
    return result


class ExportSession:
    """Sequence numbers and template sending for one collector and domain."""

    def __init__(self, domain_id: int, max_message_size: int, templates: Sequence[Template]):
        self.domain_id = domain_id
        self.max_message_size = max_message_size
        self.templates = list(templates)
        self.sequence = 0
        self.messages_since_templates = 0

    def reset(self) -> None:
        """A new transport session (TCP reconnect): sequence numbers start again."""
        self.sequence = 0
        self.messages_since_templates = 0

    def template_messages(self, export_time: int) -> list[bytes]:
        """All templates and options templates; does not advance the sequence number."""
        data = [t.record() for t in self.templates if not t.is_options]
        options = [t.record() for t in self.templates if t.is_options]
        groups = [(sid, recs) for sid, recs in ((TEMPLATE_SET_ID, data), (OPTIONS_TEMPLATE_SET_ID, options))
                  if recs]
        self.messages_since_templates = 0
        return [p.message for p in pack_sets(groups, max_size=self.max_message_size, export_time=export_time,
                                             sequence=self.sequence, domain=self.domain_id, data=False)]

    def withdrawal_message(self, export_time: int) -> bytes:
        """Withdraw all (data) templates (RFC 7011 8.1), before closing a TCP session; never over UDP.

        The options templates end with the session anyway; their 4-octet
        withdrawal record (RFC 7011 8.1) is not sent because Wireshark's
        dissector (4.0) takes it for a malformed options template.
        """
        groups = [(TEMPLATE_SET_ID, [bytes((0, TEMPLATE_SET_ID, 0, 0))])]
        (packed,) = pack_sets(groups, max_size=self.max_message_size, export_time=export_time,
                              sequence=self.sequence, domain=self.domain_id, data=False)
        return packed.message

    def data_messages(self, groups: Sequence[tuple], export_time: int,
                      too_large: list | None = None) -> Iterator[Packed]:
        """Data messages for ``(template id, [record bytes][, fixed length])`` groups.

        The sequence number advances past a message when the next one is asked
        for (so a template message sent in between carries the right number, and
        a message that failed to send and ends the iteration is not counted).
        """
        for packed in pack_sets(groups, max_size=self.max_message_size, export_time=export_time,
                                sequence=self.sequence, domain=self.domain_id, skip_too_large=too_large):
            self.messages_since_templates += 1
            yield packed
            self.sequence = (self.sequence + packed.records) & 0xFFFFFFFF
