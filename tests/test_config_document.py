"""The configuration file as octets: what no configuration looks like is refused, fast, with a short message.

Every input of issue 12 that is about the file itself (binary, Latin-1,
empty, 50 MB, an anchor bomb, duplicate keys) plus the ways YAML parsers
are known to fall over (deep nesting, aliases into themselves, several
documents, a FIFO). The SIGHUP and start-up behaviour with the same inputs
is in test_agent_reload.py.
"""

from __future__ import annotations

import os
import threading

import pytest
import yaml

from kipfix.agent.config import ConfigError, config_from_bytes, load_config, parse_config, parse_document
from kipfix.agent.config.document import MAX_DEPTH, MAX_DOCUMENT_BYTES, MAX_NODES

# The 460-octet kind of file of issue 12: nine anchors, each nine times the one before (9^9 strings).
ANCHOR_BOMB = (
    b'jsonLines: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
    b'x1: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nx2: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\n'
    b'x3: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\nx4: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]\n'
    b'x5: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]\nx6: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]\n'
    b'x7: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]\ncollectors: [*h,*h,*h,*h,*h,*h,*h,*h,*h]\n')
GOOD = b"interfaces:\n  - names: [eth0]\nmaxFlows: 1024\n"


def document(data: bytes):
    return parse_document(data, "HINT")


@pytest.mark.parametrize("data, message", [
    (bytes(range(256)) * 4, "not a text file: a NUL octet at line 1, column 1 (octet 0); accepted: a YAML text "
                            "file in UTF-8"),
    ("maxFlows: 1024\ninterfaces:\n  - names: [eth0]   # caf\xe9\n".encode("latin-1"),
     "not UTF-8 text: octet 0xe9 at line 3, column 26 (octet 52) (invalid continuation byte); accepted: a YAML "
     "text file in UTF-8 (convert a Latin-1 file with iconv -f latin1 -t utf-8)"),
    (b"", "the document is empty (no YAML content, only blanks or comments); HINT"),
    (b"# nothing but a comment\n\n", "the document is empty"),
    (b"---\n", "the document is empty"),
    (b"maxFlows: 1024\ntimeouts: {idle: 5}\nmaxFlows: 2048\n",
     "maxFlows: key given twice (lines 1 and 3); accepted: each key once in a mapping"),
    (b"timeouts: {idle: 5, idle: 6}\n", "timeouts.idle: key given twice (line 1)"),
    (b"interfaces:\n  - names: [eth0]\n    names: [eth1]\n", "interfaces[0].names: key given twice (lines 2 and 3)"),
    (ANCHOR_BOMB, f"more than {MAX_NODES} values, counting what YAML aliases repeat"),
    (b"a: &x [1, *x]\n", "a[1]: line 1: alias *x refers to the node that contains it"),
    (b"a: [*nowhere]\n", "a[0]: line 1: alias *nowhere refers to no anchor before it"),
    (b"[" * 200_000, f"line 1: nested deeper than {MAX_DEPTH} levels"),
    (b"maxFlows: 1024\n---\nmaxFlows: 2048\n", "line 2: a second YAML document; accepted: one document"),
    (b"interfaces: [\n", "invalid YAML at line 2, column 1: did not find expected node content"),
    (b"x" * (MAX_DOCUMENT_BYTES + 1), f"{MAX_DOCUMENT_BYTES + 1} octets is too large; accepted: at most "
                                      f"{MAX_DOCUMENT_BYTES} octets"),
])
def test_what_no_configuration_looks_like_is_refused(data, message):
    with pytest.raises(ConfigError) as err:
        document(data)
    assert message in str(err.value)
    assert len(str(err.value)) < 400


def test_the_anchor_bomb_is_as_small_as_the_issue_says_and_stands_for_billions():
    assert len(ANCHOR_BOMB) <= 460
    # what PyYAML alone makes of it: shared lists, 9^9 strings for anything that walks them
    data = yaml.safe_load(ANCHOR_BOMB)
    assert data["collectors"][0][0][0][0][0][0][0][0][0] == "lol"


def test_aliases_that_repeat_a_part_and_merge_keys_are_fine():
    data = document(b"base: &v4 [sourceIPv4Address, destinationIPv4Address]\n"
                    b"t: {<<: {idle: 5}, active: 10}\nu: [*v4, *v4]\n")
    assert data["u"] == [["sourceIPv4Address", "destinationIPv4Address"]] * 2
    assert data["t"] == {"idle": 5, "active": 10}
    # keys that only look alike are different keys: the integer 1 and the string "1"
    assert document(b"{1: a, '1': b}") == {1: "a", "1": "b"}


def test_the_limits_leave_room_for_any_real_configuration():
    names = ", ".join(f"eth{i}" for i in range(MAX_NODES - 10))
    data = document(f"interfaces: [{{names: [{names}]}}]\n".encode())
    assert len(data["interfaces"][0]["names"]) == MAX_NODES - 10
    nested = b"pods: [{podSelector: {matchExpressions: [{key: a, operator: In, values: [x]}]}}]\n"
    assert parse_config(document(nested)).pods[0].pod_selector["matchExpressions"][0]["values"] == ["x"]


def test_a_top_level_that_is_not_a_mapping_is_named():
    with pytest.raises(ConfigError, match=r"^\(top level\): expected a mapping, got list \[1, 2\]"):
        config_from_bytes(b"[1, 2]\n")


# ---- files -------------------------------------------------------------------------------

def test_a_binary_file_names_the_file(tmp_path):
    path = tmp_path / "kipfix.yaml"
    path.write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)))
    with pytest.raises(ConfigError) as err:
        load_config(str(path))
    assert str(err.value).startswith(f"{path}: not a text file: a NUL octet at line 1, column 8 (octet 7)")


def test_a_latin1_file_names_the_file_and_the_line(tmp_path):
    path = tmp_path / "kipfix.yaml"
    path.write_bytes("interfaces:\n  - names: [eth0]\ncollectors:\n  - address: 127.0.0.1:4739\n"
                     "    description: Zürich\n".encode("latin-1"))
    with pytest.raises(ConfigError) as err:
        load_config(str(path))
    assert str(err.value).startswith(f"{path}: not UTF-8 text: octet 0xfc at line 5, column 19")


def test_a_50_mb_file_is_refused_after_reading_one_mebibyte(tmp_path):
    path = tmp_path / "huge.yaml"
    with open(path, "wb") as handle:
        handle.write(b"interfaces:\n  - names:\n")
        handle.write(b"      - eth0\n" * (50_000_000 // 13))
    assert path.stat().st_size > 49_000_000
    with pytest.raises(ConfigError) as err:
        load_config(str(path))
    assert str(err.value) == (f"{path}: {MAX_DOCUMENT_BYTES + 1} octets is too large; accepted: at most "
                              f"{MAX_DOCUMENT_BYTES} octets (1 MiB; a kipfix configuration is a few KiB)")


def test_a_fifo_is_refused_without_blocking(tmp_path):
    path = tmp_path / "kipfix.yaml"
    os.mkfifo(path)
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("error", _error(load_config, str(path))))
    thread.start()
    thread.join(timeout=10)
    assert not thread.is_alive(), "reading a FIFO blocked"
    assert result["error"] == f"config file {str(path)!r} is not a regular file; accepted: a YAML file"


def test_a_directory_and_a_missing_file_are_named(tmp_path):
    assert _error(load_config, str(tmp_path)) == f"config file {str(tmp_path)!r} is not a regular file; " \
                                                 "accepted: a YAML file"
    assert _error(load_config, "/nonexistent.yaml") == "cannot read config file '/nonexistent.yaml': " \
                                                       "No such file or directory"


def test_on_reload_a_file_must_end_with_a_newline(tmp_path):
    path = tmp_path / "kipfix.yaml"
    path.write_bytes(GOOD.rstrip(b"\n"))
    assert load_config(str(path)).max_flows == 1024  # at start a missing final newline is fine
    assert _error(load_config, str(path), reloading=True) == (
        f"{path}: the last line ('maxFlows: 1024') has no newline at its end: the file looks truncated, cut short "
        "while it was written; accepted: a complete file, ending with a newline (editors and "
        "yaml.dump write one)")
    path.write_bytes(GOOD)
    assert load_config(str(path), reloading=True).max_flows == 1024
    # what the file is comes first: a binary file is named as one, not as a truncated one
    path.write_bytes(bytes(range(256)))
    assert "not a text file" in _error(load_config, str(path), reloading=True)


def _error(function, *args, **kwargs) -> str:
    try:
        function(*args, **kwargs)
    except ConfigError as err:
        return str(err)
    raise AssertionError("no ConfigError")
