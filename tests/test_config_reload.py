"""What a reload may not do, and every way to cut a realistic file short.

The realistic file is the README's own example. Writing it cut at any of its
octets and reloading must be refused -- except where the cut falls at the
end of a line and what is left is a complete, smaller configuration, which
nothing can tell from a file written that way on purpose. Those few points
are listed here, so a change that lets more through fails.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from kipfix.agent.config import ConfigError, changed_keys, check_reload, config_from_bytes, parse_config

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_example() -> bytes:
    text = README.read_text(encoding="utf-8")
    return re.search(r"The configuration has the shape.*?```yaml\n(.*?)```", text, re.S).group(1).encode()


REASONS = {  # why a cut file is refused: each is seen among the cuts of the README's example
    "empty": "the document is empty",
    "no newline at the end": "has no newline at its end",
    "meters nothing": "the new configuration selects no interface",
    "collectors without templates": "collectors are configured but no template",
    "a template without its id's list": "give the element list as exactly one of",
    "a template without elements": "a template needs at least one information element",
    "an interface selection without names": "names: empty",
}


def reload(running, data: bytes):
    new = config_from_bytes(data, reloading=True)
    check_reload(running, new)
    return new


def test_a_reload_that_stops_all_metering_is_refused_and_says_how_to_stop():
    running = parse_config({"interfaces": [{"names": ["eth0"]}], "jsonLines": "-"})
    with pytest.raises(ConfigError) as err:
        check_reload(running, parse_config({"jsonLines": "-"}))
    assert str(err.value) == (
        "interfaces: the new configuration selects no interface, the running one 1 selection(s); refused, because "
        "an empty or truncated file looks like this, and the running configuration stays; to stop kipfix, stop "
        "the agent (SIGTERM, e.g. systemctl stop kipfix): it exports what it counted and detaches")


def test_a_reload_that_stops_all_export_is_refused():
    running = parse_config({"interfaces": [{"names": ["eth0"]}], "jsonLines": "/var/log/kipfix.jsonl",
                            "collectors": [{"address": "192.0.2.1:4739"}],
                            "templates": [{"id": 256, "template": ["octetDeltaCount"]}]})
    with pytest.raises(ConfigError) as err:
        check_reload(running, parse_config({"interfaces": [{"names": ["eth0"]}]}))
    assert str(err.value).startswith(
        "collectors: the new configuration exports nowhere (no collectors, no jsonLines), the running one to "
        "192.0.2.1:4739, jsonLines /var/log/kipfix.jsonl; refused")
    assert "to stop kipfix, stop the agent" in str(err.value)


def test_a_reload_may_change_everything_else():
    running = parse_config({"interfaces": [{"names": ["eth0"]}], "jsonLines": "-"})
    new = parse_config({"interfaces": [{"names": ["eth1"]}], "collectors": [{"address": "192.0.2.1:4739"}],
                        "templates": [{"id": 256, "template": ["octetDeltaCount"]}]})
    check_reload(running, new)
    assert changed_keys(running, new) == ["collectors", "templates", "interfaces", "jsonLines"]
    # an agent that meters nothing may be given something to meter, and the other way round it may not
    check_reload(parse_config({}), new)


def test_every_truncation_of_the_readme_example_is_refused_unless_it_ends_a_line_as_a_smaller_config():
    data = readme_example()
    full = config_from_bytes(data)
    assert full.interfaces and full.collectors and full.json_lines  # the example meters and exports
    accepted, reasons = {}, set()
    for cut in range(len(data)):
        try:
            accepted[cut] = reload(full, data[:cut])
        except ConfigError as err:
            reasons.add(next((reason for reason, words in REASONS.items() if words in str(err)), str(err)))
    assert reasons == set(REASONS), reasons
    # what gets through: a cut at a line end, leaving a shorter but complete configuration
    assert all(data[cut - 1:cut] == b"\n" for cut in accepted)
    last_lines = {data[:cut].decode().splitlines()[-1].split(":")[0].strip(" -") for cut in accepted}
    assert last_lines == {"names", "exclude", "timeouts", "maxFlows", "drainInterval", "observationDomainId"}
    # and what such a cut loses is named in the reload's log line (changed: ...)
    lost = {cut: changed_keys(full, new) for cut, new in accepted.items()}
    assert sorted(set(map(tuple, lost.values()))) == [("interfaces", "jsonLines"), ("jsonLines",)]
    # the README says how many
    said = re.search(r"of the (\d+) places this example can be cut, (\d+) do", " ".join(README.read_text().split()))
    assert (int(said.group(1)), int(said.group(2))) == (len(data), len(accepted))
