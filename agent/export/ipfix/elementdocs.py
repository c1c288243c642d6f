"""docs/elements.md and the README's table of kipfix's own elements, made from the element table.

    .venv/bin/python -m kipfix.agent.export.ipfix.elementdocs --write   # after changing agent/data/elements.csv

tests/test_element_table.py fails while either file differs from what this renders.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .infomodel import VARLEN, Element, ElementTable, reduced_lengths, table
from .values import LOOKUPS, TRANSFORMS

README_BEGIN = "<!-- kipfix elements: made by python -m kipfix.agent.export.ipfix.elementdocs --write -->"
README_END = "<!-- end of kipfix elements -->"


def _octets(row: Element) -> str:
    if row.length == VARLEN:
        return "variable"
    sizes = reduced_lengths(row.type)
    if not sizes or not row.type.startswith(("unsigned", "signed")):
        return str(row.length)
    return f"{row.length} (or {sizes[0]})" if len(sizes) == 1 else f"{row.length} (or {sizes[0]}..{sizes[-1]})"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def kipfix_table(rows: ElementTable) -> str:
    """kipfix's own elements (numbered under the exporter's PEN), for the README and the docs page."""
    lines = ["| element | id | meaning |", "| --- | --- | --- |"]
    lines += [f"| `{r.name}` | {r.id} | {_cell(r.description)} |" for r in rows.rows if r.pen is None]
    return "\n".join(lines)


def render(rows: ElementTable | None = None) -> str:
    rows = rows or table()
    filled = [r for r in rows.rows if r.value is not None and r.pen == 0]
    known = [r for r in rows.rows if r.value is None]
    out = [
        "# Information elements",
        "",
        "<!-- made from agent/data/elements.csv by python -m kipfix.agent.export.ipfix.elementdocs --write;",
        "     do not edit (tests/test_element_table.py checks it is current) -->",
        "",
        "Every element kipfix knows is one row of `agent/data/elements.csv`. Both encoders (C and Python),",
        "the built-in collector (`kipfix collect`), configuration checks and this page are made from it.",
        "A template names elements by their IANA name, in either spelling (`flowEndMilliseconds` or",
        "`FlowEndMilliseconds`). An integer element may be given a reduced size, `NAME:OCTETS`",
        "(RFC 7011 6.2): `tcpControlBits:1` sends the TCP flags in one octet; a value too large for the",
        "size is sent as the largest it holds (all ones) and counted in",
        "`kipfix_agent_ipfix_saturated_values_total`. The *octets* column gives the sizes each takes.",
        "",
        "Wireshark's IPFIX dissector (tshark 4.0, Debian 12) decodes every reduced size kipfix sends but",
        "`sourceTransportPort:1`, `destinationTransportPort:1`, `icmpTypeCodeIPv6:1` and `flowStartSysUpTime`",
        "or `flowEndSysUpTime` in fewer than 4 octets, which it shows as malformed packets (they are valid",
        "IPFIX: the built-in collector decodes them).",
        "",
        "## How to read the value column",
        "",
        "A value is a source and transforms, `source | transform ...`.",
        "",
        "| source | what it is |",
        "| --- | --- |",
        "| `record.ATTR` | the flow record's attribute (packets, octets, times in ns since the epoch, TCP flags, "
        "TTLs, ToS, VLAN ids, fragment id, end reason; interface and netns names as UTF-8) |",
        "| `key.ITEM` | the flow key: ifindex, direction (0 ingress, 1 egress), ip_version, protocol, src, dst, "
        "sport, dport (ICMP: type << 8 \\| code) |",
        "| `exporter.NAME` | the exporter's observation_domain_id, exporting_process_id, system_init_ms |",
    ]
    for name, lookup in LOOKUPS.items():
        shape = f"{name}.SIDE.ITEM" if lookup.sided else f"{name}.ITEM"
        side = " (SIDE: src or dst address)" if lookup.sided else ""
        out.append(f"| `{shape}` | {_cell(lookup.description)}{side}; ITEM: {', '.join(lookup.items)} |")
    out += ["| a number | that number |", "", "| transform | what it does |", "| --- | --- |"]
    out += [f"| `{t.name}` | {_cell(t.description)} |" for t in TRANSFORMS.values()]
    out += [
        "",
        "Time values are in the element's unit; `dateTimeMicroseconds` and `dateTimeNanoseconds` go on the",
        "wire in NTP format (RFC 7011 6.1.9-10).",
        "",
        "## IANA elements kipfix fills",
        "",
        "| element | id | type | octets | value | what kipfix puts there |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    out += [f"| `{r.name}` | {r.id} | {r.type} | {_octets(r)} | `{_cell(r.value.text)}` | {_cell(r.description)} |"
            for r in sorted(filled, key=lambda r: r.id)]
    out += [
        "",
        "## kipfix's own elements",
        "",
        "Strings numbered under the exporter's Private Enterprise Number (`enterpriseNumber`, default 32473),",
        "used in templates by name like any IANA element:",
        "",
        "| element | id | type | value | what kipfix puts there |",
        "| --- | --- | --- | --- | --- |",
    ]
    out += [f"| `{r.name}` | {r.id} | {r.type} | `{_cell(r.value.text)}` | {_cell(r.description)} |"
            for r in rows.rows if r.pen is None and r.value is not None]
    out += [
        "",
        "## Adding an element",
        "",
        "One row in `agent/data/elements.csv`, then `python -m kipfix.agent.export.ipfix.elementdocs --write`.",
        "A value made of the sources and transforms above needs nothing else: a new `record.ATTR` (say",
        "`observationPointId` from `record.observation_point`) is read by both encoders by name. A new kind",
        "of source is one `Lookup` in `agent/export/ipfix/values.py` and the function computing it, handed to",
        "the exporter (`lookups={name: function}`): `function(record)` gives a tuple whose items rows name",
        "(`nat.post_source`, for postNATSourceIPv4Address from conntrack). Elements declared at run time",
        "(enrichment hooks) are rows too: `ElementTable.extended(rows)`. The tests take every row from the",
        "table; a new row is checked through both encoders and the decoder without a test change.",
        "",
        "## Elements kipfix knows but does not fill in flow records",
        "",
        "Options records use some of them; the built-in collector decodes all of them by name.",
        "",
        "| element | id | type |",
        "| --- | --- | --- |",
    ]
    out += [f"| `{r.name}` | {r.id} | {r.type} |" for r in known]
    return "\n".join(out) + "\n"


def readme_with_table(readme: str, rows: ElementTable | None = None) -> str:
    """``readme`` with the part between README_BEGIN and README_END made anew."""
    start, end = readme.index(README_BEGIN) + len(README_BEGIN), readme.index(README_END)
    return readme[:start] + "\n" + kipfix_table(rows or table()) + "\n" + readme[end:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="write docs/elements.md and README.md's table")
    parser.add_argument("--repo", type=Path, default=Path.cwd(), help="repository root (default: .)")
    args = parser.parse_args(argv)
    if not args.write:
        sys.stdout.write(render())
        return 0
    (args.repo / "docs").mkdir(exist_ok=True)
    (args.repo / "docs" / "elements.md").write_text(render(), encoding="utf-8")
    readme = args.repo / "README.md"
    readme.write_text(readme_with_table(readme.read_text(encoding="utf-8")), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
