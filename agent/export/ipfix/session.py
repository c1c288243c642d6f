"""Per transport session and observation domain state (RFC 7011 8, 10).

- Template IDs: configured templates keep their IDs; split parts and
  derived counterparts (selection.py) get free IDs, which are logged.
- Sequence number: data records sent before this message in this session
  and domain, modulo 2^32. Template and options template sets do not advance
  it; options data records do (they are data records).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator, Sequence

from . import fields
from .message import OPTIONS_TEMPLATE_SET_ID, TEMPLATE_SET_ID, Packed, pack_sets
from .selection import TemplatePlan, plan_templates
from .template import Template

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FlowTemplate:
    """A template for flow records, and which records it takes (selection.TemplatePlan).

    ``family`` is 4 or 6 when it carries only that IP version's addresses,
    None when it takes both. ``configured_id`` is the config template it came from.
    """

    template: Template
    family: int | None
    configured_id: int
    derived: bool = False
    plan: TemplatePlan | None = None


def build_flow_templates(configs: Sequence, enterprise_number: int) -> list[FlowTemplate]:
    """Compile config templates (``id``, ``fields``, optional ``ip_versions``/``protocols``) into
    the templates to send, each flow taken by exactly one of them (selection.plan_templates)."""
    seen: set[int] = set()
    for config in configs:
        if not 256 <= config.id <= 65535:
            raise ValueError(f"template id {config.id} is out of range; accepted: 256..65535")
        if config.id in seen:
            raise ValueError(f"template id {config.id} is used twice; accepted: unique ids 256..65535")
        seen.add(config.id)
        fields.check_template_fields(config.fields)
    result = []
    for plan in plan_templates(configs):
        configured_id = configs[plan.source].id
        if plan.derived:
            how = "derived counterpart, for what no configured template takes" if plan.fallback else \
                "the IPv6 part of a template naming both families' addresses"
            log.info("template %d (%s) is template %d's %s", plan.id, plan.describe(), configured_id, how)
        result.append(FlowTemplate(Template(plan.id, fields.elements(plan.names, enterprise_number)), plan.family,
                                   configured_id, plan.derived, plan))
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
        """All templates and options templates; does not advance the sequence number.

        Data templates share one set; each options template has a set of its own
        (pmacct's nfacctd reads only the first options template of a set).
        """
        data = [t.record() for t in self.templates if not t.is_options]
        groups = [(TEMPLATE_SET_ID, data)] if data else []
        groups += [(OPTIONS_TEMPLATE_SET_ID, [t.record()]) for t in self.templates if t.is_options]
        self.messages_since_templates = 0
        return [p.message for p in pack_sets(groups, max_size=self.max_message_size, export_time=export_time,
                                             sequence=self.sequence, domain=self.domain_id, data=False,
                                             separate=frozenset((OPTIONS_TEMPLATE_SET_ID,)))]

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
