"""A configuration document: octets to plain data, refusing what no configuration looks like.

Pure: it works on octets already read (a file's, a ConfigMap key's) and
touches nothing else. The limits, and why:

- at most ``MAX_DOCUMENT_BYTES`` (1 MiB, also a ConfigMap's limit; a real
  configuration is a few KiB): a 50 MB file took 92 s and 1.9 GB of memory
  to be refused;
- UTF-8 text without NUL: a binary or Latin-1 file is named as such, with
  the place of the first bad octet;
- at most ``MAX_DEPTH`` levels of nesting: YAML scanners slow down with the
  square of the depth, and libyaml's composer recurses in C (200,000 ``[``
  crash the process);
- at most ``MAX_NODES`` values, counting what YAML aliases repeat: 460
  octets of nested anchors stand for billions of values, and whatever walks
  them (the schema, an error message) never ends; building 100,000 takes
  PyYAML about a second;
- no key twice in one mapping: YAML requires unique keys, and PyYAML would
  silently keep the last;
- exactly one document, and not an empty one.

The limits are checked on the parser's event stream, before any node is
built, and the scan stops at the first one exceeded, so a hostile document
costs at most a scan of its first megabyte.

Messages start with the key path or the line, never with the source: the
caller knows whether it read a file or a ConfigMap and says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

from .errors import SHOWN_CHARACTERS, ConfigError

MAX_DOCUMENT_BYTES = 1 << 20
MAX_DEPTH = 32  # a kipfix configuration needs 6 (pods[0].podSelector.matchExpressions[0].values[0])
MAX_NODES = 100_000  # a kipfix configuration has a few hundred

# libyaml when PyYAML was built with it (Debian's is): the pure-Python parser is 20 to 50 times slower.
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_MERGE_TAG = "tag:yaml.org,2002:merge"


def parse_document(data: bytes, empty_hint: str, final_newline: bool = False) -> Any:
    """The YAML document in ``data`` as plain Python data; ConfigError says what is wrong and where.

    ``empty_hint`` ends the message for an empty document: how to really
    stop, in the words of the caller (a file, a ConfigMap). With
    ``final_newline`` a text that does not end with a newline is refused as
    cut short (see load.py).
    """
    text = _text(data)
    if final_newline and text and not text.endswith("\n"):
        last = text.rsplit("\n", 1)[-1]
        last = last if len(last) <= 40 else "..." + last[-37:]
        raise ConfigError(f"the last line ({last!r}) has no newline at its end: the file looks truncated, cut short "
                          "while it was written; accepted: a complete file, ending with a newline (editors and "
                          "yaml.dump write one)")
    _scan(text)
    loader = _Loader(text)
    try:
        value = loader.get_single_data()
    except yaml.YAMLError as err:
        raise ConfigError(_yaml_problem(err)) from None
    finally:
        loader.dispose()
    if value is None:
        raise ConfigError(f"the document is empty (no YAML content, only blanks or comments); {empty_hint}")
    return value


def _where(data: bytes, offset: int) -> str:
    line = data.count(b"\n", 0, offset) + 1
    column = offset - (data.rfind(b"\n", 0, offset) + 1) + 1
    return f"line {line}, column {column} (octet {offset})"


def _text(data: bytes) -> str:
    if len(data) > MAX_DOCUMENT_BYTES:
        raise ConfigError(f"{len(data)} octets is too large; accepted: at most {MAX_DOCUMENT_BYTES} octets "
                          "(1 MiB; a kipfix configuration is a few KiB)")
    nul = data.find(b"\0")
    if nul >= 0:
        raise ConfigError(f"not a text file: a NUL octet at {_where(data, nul)}; accepted: a YAML text file "
                          "in UTF-8")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"not UTF-8 text: octet 0x{data[err.start]:02x} at {_where(data, err.start)} "
                          f"({err.reason}); accepted: a YAML text file in UTF-8 (convert a Latin-1 file "
                          "with iconv -f latin1 -t utf-8)") from None


@dataclass
class _Open:
    """A collection being scanned."""

    path: str
    mapping: bool
    anchor: str | None
    first_value: int  # the value count when it started: its expanded size is the difference
    index: int = 0  # items (a sequence) or keys and values (a mapping) seen so far
    key: str = "?"  # a mapping's current key, for the path of its value
    keys: dict = field(default_factory=dict)  # (tag, text) -> line, of a mapping's keys

    def child_path(self) -> str:
        if not self.mapping:
            return f"{self.path}[{self.index}]"
        return f"{self.path}.{self.key}" if self.path else self.key


def _shown_key(text: str) -> str:
    return text if len(text) <= 60 else text[:57] + "..."


def _check_new_key(mapping: _Open, tag: str, text: str, line: int) -> None:
    if tag == _MERGE_TAG:  # "<<: *base" may be given with keys that override the base's
        return
    first = mapping.keys.get((tag, text))
    if first is not None:
        where = f"lines {first} and {line}" if first != line else f"line {line}"
        raise ConfigError(f"{mapping.child_path()}: key given twice ({where}); accepted: each key once in a mapping")
    mapping.keys[(tag, text)] = line


def _scan(text: str) -> None:
    """Depth, documents, values (aliases expanded), aliases into themselves and duplicate keys, on events."""
    loader = _Loader(text)
    open_: list[_Open] = []
    sizes: dict[str, int] = {}  # anchor -> expanded size of the finished node it names
    values = documents = 0
    try:
        while loader.check_event():
            event = loader.get_event()
            if isinstance(event, yaml.DocumentStartEvent):
                documents += 1
                if documents > 1:
                    raise ConfigError(f"line {event.start_mark.line + 1}: a second YAML document; accepted: "
                                      "one document (no '---' between two configurations)")
                continue
            if not isinstance(event, (yaml.NodeEvent, yaml.CollectionEndEvent)):
                continue
            line = event.start_mark.line + 1
            if isinstance(event, yaml.CollectionEndEvent):
                done = open_.pop()
                if done.anchor is not None:
                    sizes[done.anchor] = values - done.first_value
                continue
            parent = open_[-1] if open_ else None
            if parent is not None and parent.mapping and parent.index % 2 == 0:  # a key
                parent.key = _shown_key(event.value) if isinstance(event, yaml.ScalarEvent) else "?"
                if isinstance(event, yaml.ScalarEvent):
                    _check_new_key(parent, loader.resolve(yaml.ScalarNode, event.value, event.implicit),
                                   event.value, line)
            path = parent.child_path() if parent is not None else ""
            if parent is not None:
                parent.index += 1
            if isinstance(event, yaml.AliasEvent):
                containing = any(o.anchor == event.anchor for o in open_)
                if containing or event.anchor not in sizes:
                    state = "the node that contains it" if containing else "no anchor before it"
                    raise ConfigError(f"{path or '(top level)'}: line {line}: alias *{_shown_key(event.anchor)} "
                                      f"refers to {state}; accepted: aliases to finished, anchored parts")
                values += sizes[event.anchor]
            else:
                values += 1
            if values > MAX_NODES:
                raise ConfigError(f"{path or '(top level)'}: line {line}: more than {MAX_NODES} values, counting "
                                  "what YAML aliases repeat; accepted: at most that many (a kipfix configuration "
                                  "has a few hundred; anchors nested into each other multiply)")
            if isinstance(event, yaml.ScalarEvent):
                if event.anchor is not None:
                    sizes[event.anchor] = 1
            elif isinstance(event, yaml.CollectionStartEvent):
                if len(open_) >= MAX_DEPTH:
                    raise ConfigError(f"{path or '(top level)'}: line {line}: nested deeper than {MAX_DEPTH} "
                                      f"levels; accepted: at most {MAX_DEPTH} (a kipfix configuration needs 6)")
                open_.append(_Open(path, isinstance(event, yaml.MappingStartEvent), event.anchor, values - 1))
    except yaml.YAMLError as err:
        raise ConfigError(_yaml_problem(err)) from None
    finally:
        loader.dispose()


def _yaml_problem(err: yaml.YAMLError) -> str:
    """One line from PyYAML's multi-line message: where, what, and in which construct."""
    if isinstance(err, yaml.MarkedYAMLError) and err.problem:
        mark = err.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        context = ""
        if err.context:
            at = f" at line {err.context_mark.line + 1}" if err.context_mark is not None else ""
            context = f" ({err.context}{at})"
        text = f"invalid YAML{where}: {err.problem}{context}"
    else:
        text = "invalid YAML: " + " ".join(str(err).split())
    if len(text) > 2 * SHOWN_CHARACTERS:
        text = text[:2 * SHOWN_CHARACTERS - 3] + "..."
    return text
