"""Interface selection: which interfaces of a network namespace kipfix meters.

A pattern is one of

- an exact name (``eth0``),
- a shell glob (``veth*``, ``eth[0-3]``, ``tap?``), matched against the whole
  name, case-sensitively,
- a regular expression between slashes (``/^cali[0-9a-f]+$/``), matched with
  ``re.search`` (unanchored, like grep: anchor it with ``^``/``$``).

A ``Selector`` holds the names to include and those to exclude (same
syntaxes); an interface is selected when it matches an include pattern and no
exclude pattern.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from typing import Iterable

IFNAMSIZ = 16  # including the terminating NUL
_GLOB_CHARS = set("*?[")


class PatternError(ValueError):
    """A pattern that can never be valid; the message names it."""


@dataclass(frozen=True)
class Pattern:
    """One compiled pattern; ``kind`` is "name", "glob" or "regex"."""

    text: str
    kind: str
    _regex: re.Pattern | None = field(default=None, compare=False, repr=False)

    def matches(self, ifname: str) -> bool:
        if self.kind == "name":
            return ifname == self.text
        if self.kind == "glob":
            return fnmatch.fnmatchcase(ifname, self.text)
        return self._regex.search(ifname) is not None

    @property
    def is_exact(self) -> bool:
        return self.kind == "name"


def parse_pattern(text: str) -> Pattern:
    """Compile one pattern; raise PatternError naming it when it is invalid."""
    if not isinstance(text, str):
        raise PatternError(f"interface pattern {text!r}: expected a string")
    if text == "":
        raise PatternError("interface pattern '': empty; give a name, a glob (veth*) or /regex/")
    if len(text) >= 2 and text.startswith("/") and text.endswith("/"):
        body = text[1:-1]
        if body == "":
            raise PatternError(f"interface pattern {text!r}: empty regular expression")
        try:
            return Pattern(text, "regex", re.compile(body))
        except re.error as err:
            raise PatternError(f"interface pattern {text!r}: invalid regular expression: {err}") from None
    if text.startswith("/"):
        raise PatternError(f"interface pattern {text!r}: a regular expression must end with '/' "
                           "(write /regex/)")
    if "/" in text or any(c.isspace() for c in text) or "\0" in text:
        raise PatternError(f"interface pattern {text!r}: interface names cannot contain '/', "
                           "whitespace or NUL")
    if _GLOB_CHARS & set(text):
        if text.count("[") != text.count("]"):
            raise PatternError(f"interface pattern {text!r}: unbalanced '[' in glob")
        return Pattern(text, "glob")
    if len(text) >= IFNAMSIZ:
        raise PatternError(f"interface pattern {text!r}: longer than {IFNAMSIZ - 1} characters, "
                           "the kernel's limit for an interface name")
    return Pattern(text, "name")


def validate_patterns(patterns: Iterable[str]) -> None:
    """Raise PatternError (a ValueError) for the first invalid pattern."""
    for text in patterns:
        parse_pattern(text)


@dataclass(frozen=True)
class Selector:
    """Include and exclude patterns for one network namespace."""

    names: tuple[str, ...]
    exclude: tuple[str, ...] = ()
    _include: tuple[Pattern, ...] = field(default=(), compare=False, repr=False)
    _exclude: tuple[Pattern, ...] = field(default=(), compare=False, repr=False)

    def __post_init__(self) -> None:
        names = tuple(self.names)
        exclude = tuple(self.exclude)
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "exclude", exclude)
        object.__setattr__(self, "_include", tuple(parse_pattern(p) for p in names))
        object.__setattr__(self, "_exclude", tuple(parse_pattern(p) for p in exclude))

    def matches(self, ifname: str) -> bool:
        return (any(p.matches(ifname) for p in self._include)
                and not any(p.matches(ifname) for p in self._exclude))

    def select(self, ifnames: Iterable[str]) -> list[str]:
        """The names out of ``ifnames`` this selector chooses, in their order."""
        return [n for n in ifnames if self.matches(n)]

    @property
    def exact_names(self) -> tuple[str, ...]:
        """Include patterns that are plain names (expected to exist), minus excluded ones."""
        return tuple(p.text for p in self._include
                     if p.is_exact and not any(x.matches(p.text) for x in self._exclude))


def matches_any(selectors: Iterable[Selector], ifname: str) -> bool:
    return any(s.matches(ifname) for s in selectors)
