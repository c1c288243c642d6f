"""The configuration's error type, and how a bad value is shown in a message."""

from __future__ import annotations

import reprlib
from typing import Any

SHOWN_CHARACTERS = 200  # of a bad value, in a message
MAX_MESSAGE = 2000  # a whole message: a guard for messages built from other modules' words

_repr = reprlib.Repr()
_repr.maxlevel = 3
_repr.maxlist = _repr.maxtuple = _repr.maxdict = _repr.maxset = 8
_repr.maxstring = SHOWN_CHARACTERS
_repr.maxother = SHOWN_CHARACTERS
_repr.maxlong = 40


class ConfigError(ValueError):
    """A user mistake in the configuration; the message is ready to print.

    It names the key path, the bad value (shortened) and what is accepted.
    """

    def __init__(self, message: str):
        if len(message) > MAX_MESSAGE:
            message = f"{message[:MAX_MESSAGE - 40]}... ({len(message)} characters in all)"
        super().__init__(message)


def show(value: Any) -> str:
    """``repr(value)`` for a message, at most about SHOWN_CHARACTERS long whatever the value's size.

    reprlib stops at a few items and levels, so even a value standing for
    millions of nodes (YAML aliases) costs nothing to show.
    """
    text = _repr.repr(value)
    if len(text) > SHOWN_CHARACTERS:
        size = f" ({len(value)} characters)" if isinstance(value, str) else ""
        text = f"{text[:SHOWN_CHARACTERS - 3]}...{size}"
    return text


def show_key(key: Any) -> str:
    """A mapping key as a part of a key path: as written when short and printable, else shown as a value."""
    if isinstance(key, str) and len(key) <= 60 and key.isprintable() and key:
        return key
    return show(key)
