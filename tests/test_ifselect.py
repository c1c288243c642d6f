"""Interface selection patterns: names, globs, /regex/, exclusions, validation."""

from __future__ import annotations

import pytest

from kipfix.agent.datapath.ifselect import PatternError, Selector, parse_pattern, validate_patterns

NAMES = ["lo", "eth0", "eth1", "eth10", "veth0a1b", "veth9", "cali1234abcd", "wg0", "br-lan"]


@pytest.mark.parametrize("pattern, kind", [
    ("eth0", "name"), ("veth*", "glob"), ("eth?", "glob"), ("eth[01]", "glob"),
    ("/^cali/", "regex"), ("br-lan", "name"),
])
def test_pattern_kinds(pattern, kind):
    assert parse_pattern(pattern).kind == kind


@pytest.mark.parametrize("names, exclude, expected", [
    (["eth0"], [], ["eth0"]),
    (["eth*"], [], ["eth0", "eth1", "eth10"]),
    (["eth?"], [], ["eth0", "eth1"]),
    (["eth[1-9]*"], [], ["eth1", "eth10"]),
    (["/^veth/"], [], ["veth0a1b", "veth9"]),
    (["/eth/"], [], ["eth0", "eth1", "eth10", "veth0a1b", "veth9"]),  # unanchored, like grep
    (["/^eth[0-9]$/"], [], ["eth0", "eth1"]),
    (["*"], ["lo", "/^cali/", "veth*"], ["eth0", "eth1", "eth10", "wg0", "br-lan"]),
    (["eth*", "wg0"], ["eth1*"], ["eth0", "wg0"]),
    (["ETH0"], [], []),  # names are case-sensitive, as the kernel's are
    (["nosuch0"], [], []),
])
def test_selection(names, exclude, expected):
    assert Selector(tuple(names), tuple(exclude)).select(NAMES) == expected


def test_exact_names_lists_only_plain_names_not_excluded():
    sel = Selector(("eth0", "veth*", "/x/", "wg0"), ("wg*",))
    assert sel.exact_names == ("eth0",)


def test_selectors_compare_by_their_patterns():
    assert Selector(("eth*",), ("eth1",)) == Selector(["eth*"], ["eth1"])
    assert Selector(("eth*",)) != Selector(("eth*",), ("eth1",))
    assert len({Selector(("a",)), Selector(("a",))}) == 1


@pytest.mark.parametrize("pattern, message", [
    ("/eth[/", "interface pattern '/eth[/': invalid regular expression"),
    ("/(?P<x/", "interface pattern '/(?P<x/': invalid regular expression"),
    ("//", "interface pattern '//': empty regular expression"),
    ("/eth0", "interface pattern '/eth0': a regular expression must end with '/'"),
    ("", "interface pattern '': empty"),
    ("eth 0", "interface pattern 'eth 0': interface names cannot contain"),
    ("a/b", "interface pattern 'a/b': interface names cannot contain"),
    ("averyveryverylongname", "interface pattern 'averyveryverylongname': longer than 15"),
    ("eth[0", "interface pattern 'eth[0': unbalanced '['"),
])
def test_invalid_patterns_are_named(pattern, message):
    with pytest.raises(PatternError) as err:
        parse_pattern(pattern)
    assert str(err.value).startswith(message)
    assert isinstance(err.value, ValueError)


def test_validate_patterns_reports_the_bad_one():
    validate_patterns(["eth0", "veth*", "/^x/"])
    with pytest.raises(ValueError, match=r"'/\(/'"):
        validate_patterns(["eth0", "/(/", "veth*"])
    with pytest.raises(PatternError):
        Selector(("eth0",), ("/[/",))


def test_fifteen_character_name_is_accepted():
    assert parse_pattern("a" * 15).kind == "name"
