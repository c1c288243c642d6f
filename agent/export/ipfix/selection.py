"""Which template takes each flow: every flow goes into exactly one data record per collector.

Collectors sum records, so a flow encoded under two templates is counted
twice. Each template therefore selects flows by IP version and protocol,
and the selections are resolved once, at start, into a table from (IP
version, protocol) to the one template that takes such flows:

- A template selects the IP versions its address elements can carry
  (IPv4 address elements: IPv4 flows; IPv6: IPv6 flows; none: both),
  narrowed by ``select.ipVersion`` and ``select.protocols``.
- A template naming IPv4 *and* IPv6 address elements is split in two, in
  place: the IPv4 part (without the IPv6-only elements) keeps its id and
  takes IPv4 flows, the IPv6 part gets a free id and takes IPv6 flows. A
  record never carries zero addresses of the other family.
- A single-family template without ``select.ipVersion`` gets a derived
  counterpart for the other family (the same elements, other addresses),
  which takes only what no configured template takes: it comes last.
- First match wins: a flow goes to the first template, in configuration
  order, that selects it (derived counterparts after every configured
  template). A configured template that no flow can reach, because earlier
  ones take all it selects, is refused.
- A flow that no template takes is counted and reported, never sent twice
  and never silently lost.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from . import fields

IP_VERSIONS = (4, 6)
# Protocol names a selection accepts besides numbers 0..255 (IANA protocol numbers, lower case).
PROTOCOL_NUMBERS = {"icmp": 1, "igmp": 2, "ipip": 4, "tcp": 6, "udp": 17, "ipv6": 41, "gre": 47, "esp": 50,
                    "ah": 51, "icmpv6": 58, "ipv6-icmp": 58, "ospf": 89, "pim": 103, "vrrp": 112, "l2tp": 115,
                    "sctp": 132, "udplite": 136}


def protocol_number(value) -> int:
    """A protocol given as a number 0..255 or an IANA name (tcp, udp, icmp, icmpv6, ...); ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a protocol")
    if isinstance(value, int):
        if 0 <= value <= 255:
            return value
        raise ValueError(f"{value} is out of range; accepted: 0..255 or a name ({', '.join(PROTOCOL_NUMBERS)})")
    if isinstance(value, str):
        text = value.strip().lower()
        if text.isdigit():
            return protocol_number(int(text))
        if text in PROTOCOL_NUMBERS:
            return PROTOCOL_NUMBERS[text]
    raise ValueError(f"{str(value)[:60]!r} is not a protocol; accepted: 0..255 or a name "
                     f"({', '.join(PROTOCOL_NUMBERS)})")


def describe_protocols(protocols) -> str:
    names = {v: k for k, v in reversed(PROTOCOL_NUMBERS.items())}
    return ", ".join(names.get(p, str(p)) for p in sorted(protocols))


@dataclass(frozen=True)
class TemplatePlan:
    """One template to send: its id, fields (as configured: a reduced size stays) and the flows it selects.

    ``family`` is 4 or 6 for a template that carries one family's addresses,
    None when it takes both. ``protocols`` is None for every protocol.
    ``source`` is the index of the configured template it comes from;
    ``derived`` marks a counterpart or the second part of a split.
    """

    id: int
    names: tuple[str, ...]
    family: int | None
    versions: frozenset
    protocols: frozenset | None
    source: int
    derived: bool = False
    fallback: bool = False  # a derived counterpart: after every configured template

    def selects(self, version: int, protocol: int) -> bool:
        return version in self.versions and (self.protocols is None or protocol in self.protocols)

    def describe(self) -> str:
        versions = "IPv4 and IPv6" if len(self.versions) == 2 else f"IPv{next(iter(self.versions))}"
        protocols = "" if self.protocols is None else f" of protocol {describe_protocols(self.protocols)}"
        return f"{versions} flows{protocols}"


def _address_family(spec: str) -> int | None:
    """4 or 6 for an address element (sourceIPv4Address, ipNextHopIPv6Address, ...), else None."""
    return fields.ADDRESS_TYPES.get(fields.parse_field(spec)[0].type)


def _element_family(spec: str) -> int | None:
    """The one IP version an element has a value for (IPv4 in its name: 4, IPv6: 6; icmpTypeCodeIPv4, the
    prefix lengths and next hops too), or None for both."""
    name = fields.canonical_name(spec)
    return 4 if "IPv4" in name else 6 if "IPv6" in name else None


def _family_of(specs: Sequence[str]) -> tuple[bool, bool]:
    families = {_address_family(s) for s in specs}
    return 4 in families, 6 in families


def _part(specs: Sequence[str], family: int) -> tuple[str, ...]:
    """The fields that have a value for ``family``'s flows (a split template's part)."""
    return tuple(s for s in specs if _element_family(s) in (None, family))


def _swap(specs: Sequence[str]) -> tuple[str, ...]:
    """The other family's elements in place of this family's (fields.counterpart, sizes kept); an element
    the template already names (icmpTypeCodeIPv4 in an IPv6 template) is not repeated."""
    seen, out = set(), []
    for spec in fields.counterpart(specs):
        name = fields.canonical_name(spec)
        if name not in seen:
            seen.add(name)
            out.append(spec)
    return tuple(out)


def plan_templates(configs: Sequence) -> list[TemplatePlan]:
    """The templates to send for config templates (``id``, ``fields``, ``ip_versions``, ``protocols``).

    Configured parts come first, in configuration order, then derived
    counterparts. ValueError names the template (``templates[i]``) for a
    selection that cannot work.
    """
    ids = free_ids(c.id for c in configs)
    configured: list[TemplatePlan] = []
    fallbacks: list[TemplatePlan] = []
    for index, config in enumerate(configs):
        where = f"templates[{index}] (id {config.id})"
        names = tuple(config.fields)  # as given: a reduced size (tcpControlBits:1) stays
        protocols = frozenset(config.protocols) if getattr(config, "protocols", ()) else None
        chosen = frozenset(getattr(config, "ip_versions", ()) or ())
        has4, has6 = _family_of(names)
        if chosen:
            for family, has in ((4, has4), (6, has6)):
                if has and family not in chosen:
                    named = ", ".join(fields.canonical_name(n) for n in names if _address_family(n) == family)
                    raise ValueError(f"{where}: select.ipVersion {sorted(chosen)} leaves out IPv{family} flows, "
                                     f"but the template names IPv{family} addresses ({named}); accepted: "
                                     f"select IPv{family} too, or remove those elements")
            for family, has in ((4, has4), (6, has6)):
                other = 6 if family == 4 else 4
                if has and not (has4 and has6) and other in chosen:
                    raise ValueError(f"{where}: select.ipVersion takes IPv{other} flows, but the template names "
                                     f"only IPv{family} addresses, so their addresses would be missing; "
                                     f"accepted: ipVersion {family} (or leave ipVersion out: IPv{other} flows "
                                     f"no template takes then go to a derived IPv{other} template)")
        if has4 and has6:
            parts = [(4, _part(names, 4), config.id, False), (6, _part(names, 6), next(ids), True)]
            configured += [TemplatePlan(tid, part, family, frozenset((family,)), protocols, index, derived)
                           for family, part, tid, derived in parts]
        elif has4 or has6:
            family = 4 if has4 else 6
            configured.append(TemplatePlan(config.id, names, family, frozenset((family,)), protocols, index))
            if not chosen:
                other = 6 if family == 4 else 4
                fallbacks.append(TemplatePlan(0, _swap(names), other, frozenset((other,)), protocols,
                                              index, derived=True, fallback=True))
        else:
            versions = chosen or frozenset(IP_VERSIONS)
            family = next(iter(versions)) if len(versions) == 1 else None
            configured.append(TemplatePlan(config.id, names, family, versions, protocols, index))
    table = _route(configured)
    taking = [p for p in configured if p.id in table.values()]
    for plan in configured:
        if not any(p.source == plan.source for p in taking):
            earlier = sorted({p.id for p in configured[:configured.index(plan)] if _overlap(p, plan)})
            raise ValueError(f"templates[{plan.source}] (id {configs[plan.source].id}): takes no flow: every "
                             f"flow it selects ({plan.describe()}) goes to an earlier template "
                             f"({', '.join(map(str, earlier))}); accepted: a flow goes to the first template "
                             "that selects it, so put narrower selections (select.protocols) first, or remove "
                             "this template")
    kept = taking  # a split part that earlier templates shadow is left out
    for plan in fallbacks:
        if -1 in _route(kept + [plan]).values():
            kept.append(TemplatePlan(next(ids), plan.names, plan.family, plan.versions, plan.protocols,
                                     plan.source, derived=True, fallback=True))
    return kept


def record_lengths(config) -> list[int]:
    """Shortest record of each template ``config`` can be sent as (alone, as in plan_templates)."""
    lengths = []
    for plan in plan_templates([config]):
        lengths.append(sum(1 if e.variable_length else e.length for e in fields.elements(plan.names, 1)))
    return lengths


def _overlap(a: TemplatePlan, b: TemplatePlan) -> bool:
    return any(a.selects(v, p) and b.selects(v, p) for v in IP_VERSIONS for p in range(256))


def _route(plans: Sequence[TemplatePlan]) -> dict[tuple[int, int], int]:
    """(IP version, protocol) -> template id of the first plan that selects it (id -1 for a plan without one yet)."""
    table = {}
    for version in IP_VERSIONS:
        for protocol in range(256):
            for plan in plans:
                if plan.selects(version, protocol):
                    table[(version, protocol)] = plan.id or -1
                    break
    return table


def route_table(plans: Sequence[TemplatePlan]) -> dict[tuple[int, int], int]:
    """(IP version, protocol) -> index in ``plans`` of the template that takes such flows; missing: none."""
    table = {}
    for version in IP_VERSIONS:
        for protocol in range(256):
            for index, plan in enumerate(plans):
                if plan.selects(version, protocol):
                    table[(version, protocol)] = index
                    break
    return table


def unselected(plans: Sequence[TemplatePlan]) -> dict[int, list[int]]:
    """IP version -> protocols no template takes (empty lists left out)."""
    table = route_table(plans)
    gaps = {v: [p for p in range(256) if (v, p) not in table] for v in IP_VERSIONS}
    return {v: ps for v, ps in gaps.items() if ps}


def free_ids(used):
    """Unused template IDs: above the highest used one first, then from 256 up."""
    used = set(used)
    top = max(used, default=255)
    for candidate in list(range(top + 1, 65536)) + list(range(256, top)):
        if candidate not in used:
            used.add(candidate)
            yield candidate
