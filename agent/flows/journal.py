"""Crash safety: what only the agent's memory holds, written beside the pins' lifetime.

A drain reads the inactive kernel table without deleting anything; the
agent then folds the flows into its cache, hands the ended ones to the
sinks, and *commits* the journal -- the flow cache, the records queued for
each collector and the ids of the kernel tables just read -- before it
deletes those flows from the kernel and lets the senders send them. A
commit is one atomic rename, so a process killed at any moment leaves
either the previous journal, with the flows it had not committed still in
the kernel, or the new one, and the map ids say which tables it covers.

What was sent after the last commit is in the cursor file: each collector
session owns a slot where its sender writes, before and after every
message, how far into which batch it got (one small ``pwrite``, which a
killed process cannot leave half done). A restarted agent resends only
what lies past the cursor, so nothing is sent twice. The one window left
is the message being sent when the process died: it may or may not have
left (the send and the write after it are two system calls), so it is
neither sent again nor silently dropped: the restarted agent counts its
records as ``in_doubt`` and logs them.

Files live in /run (tmpfs, like bpffs: both end at a reboot), mode 0600,
named after the pin path so two agents with different pin paths never
share them; the cursor file is also an exclusive lock on the pin path.
They survive the process (kill -9, OOM), not the machine: nothing is
fsynced.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import hashlib
import io
import logging
import os
import pickle
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

from .record import FlowCounters, FlowKey

log = logging.getLogger(__name__)

MAGIC = b"KIPFIXJ1"
# magic, CRC-32 of the body, and what the body holds (flows, packets, octets): readable even when
# the body is not (another version's schema), so a journal that cannot be replayed is still counted
HEADER = struct.Struct("!8sIQQQ")
# The body's shape depends on these; another version's journal is counted, not misread.
SCHEMA = "2:" + ",".join(FlowKey._fields) + ":" + ",".join(f.name for f in dataclasses.fields(FlowCounters))
# batch serial; position after the last message sent; end of the message being sent (= the former
# when none is): positions are (set index, record index) in the batch's groups
CURSOR = struct.Struct("!QIIII")
MAX_SLOTS = 4096


def journal_path(state_dir: str, pin_path: str) -> str:
    """The journal of the tables pinned at ``pin_path`` (the cursor file adds ``.sent``)."""
    digest = hashlib.sha256(pin_path.encode()).hexdigest()[:8]
    return os.path.join(state_dir, f"journal{pin_path.replace('/', '_')}-{digest}")


class JournalError(Exception):
    """The journal cannot be used; ``lost`` is what it held, as (flows, packets, octets)."""

    def __init__(self, message: str, lost: tuple[int, int, int] = (0, 0, 0)):
        super().__init__(message)
        self.lost = lost


class PinPathInUse(RuntimeError):
    pass


@dataclass
class JournalState:
    """One commit. ``maps``: ids of the kernel tables whose flows are in here."""

    maps: tuple[int, ...] = ()
    cache: list = field(default_factory=list)  # FlowCache.snapshot()
    held: list = field(default_factory=list)  # drained flows a sink-side filter holds back one drain
    sinks: dict[str, Any] = field(default_factory=dict)  # each sink's own state, plain data
    totals: tuple[int, int, int] = (0, 0, 0)  # flows, packets, octets held in the above
    names: dict = field(default_factory=dict)  # (netns id, ifindex) -> interface name


class _PlainData(pickle.Unpickler):
    """Builtin containers, numbers, strings and bytes only: never a class or a function."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"the journal names {module}.{name}: only plain data is accepted")


def _private_file(path: str) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    os.fchmod(fd, 0o600)
    return fd


class Journal:
    def __init__(self, path: str):
        self.path = path
        os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)

    def load(self) -> JournalState | None:
        """The last commit; None if there is none. JournalError if it cannot be used."""
        try:
            with open(self.path, "rb") as handle:
                data = handle.read()
        except FileNotFoundError:
            return None
        except OSError as err:
            raise JournalError(f"cannot read {self.path}: {err.strerror or err}") from None
        if len(data) < HEADER.size or data[:8] != MAGIC:
            raise JournalError(f"{self.path} is not a kipfix journal")
        _magic, crc, *lost = HEADER.unpack_from(data)
        lost = tuple(lost)
        body = data[HEADER.size:]
        if zlib.crc32(body) != crc:
            raise JournalError(f"{self.path} is damaged (checksum)", lost)
        try:
            raw = _PlainData(io.BytesIO(body)).load()
        except Exception as err:  # noqa: BLE001 - any undecodable body is one error
            raise JournalError(f"{self.path} cannot be decoded: {err}", lost) from None
        if not isinstance(raw, dict) or raw.get("schema") != SCHEMA:
            schema = raw.get("schema") if isinstance(raw, dict) else None
            raise JournalError(f"{self.path} was written by another kipfix version (schema {schema!r})", lost)
        return JournalState(tuple(raw["maps"]), raw["cache"], raw["held"], raw["sinks"], lost, raw["names"])

    def commit(self, state: JournalState) -> None:
        """Replace the journal with ``state`` in one rename. OSError if it cannot be written."""
        body = pickle.dumps({"schema": SCHEMA, "maps": list(state.maps), "cache": state.cache,
                             "held": state.held, "sinks": state.sinks, "names": state.names}, protocol=5)
        header = HEADER.pack(MAGIC, zlib.crc32(body), *state.totals)
        tmp = self.path + ".tmp"
        fd = _private_file(tmp)
        try:
            os.ftruncate(fd, 0)
            view = memoryview(header + body)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        os.replace(tmp, self.path)

    def remove(self) -> None:
        for path in (self.path, self.path + ".tmp"):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


class SendCursors:
    """Slots where senders record how far they got; also the pin path's lock.

    Opening takes an exclusive lock: a second agent on the same pin path
    would count the same tables twice, so it is refused (PinPathInUse).
    """

    def __init__(self, path: str):
        self.path = path
        os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
        self.fd = _private_file(path)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(self.fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EACCES):
                raise PinPathInUse(f"another kipfix agent holds {path}: it uses the same pinPath") from None
            raise
        self._used: set[int] = set()
        self._freed: set[int] = set()  # reusable once a commit no longer names them
        # What the previous agent's senders wrote, read before any slot is reset.
        raw = os.pread(self.fd, MAX_SLOTS * CURSOR.size, 0)
        self.at_start = {slot: (serial, (done_set, done_record), (doubt_set, doubt_record))
                         for slot, (serial, done_set, done_record, doubt_set, doubt_record)
                         in enumerate(CURSOR.iter_unpack(raw[:len(raw) - len(raw) % CURSOR.size]))}

    def take(self) -> int:
        """A free slot for one sender, reset (the journal records whose it is)."""
        slot = next(i for i in range(MAX_SLOTS) if i not in self._used and i not in self._freed)
        self._used.add(slot)
        self.write(slot, 0, (0, 0))
        return slot

    def free(self, slot: int) -> None:
        """The sender is gone; the slot is reused after the next commit (``committed``): until then
        the journal on disk may still name it."""
        self._used.discard(slot)
        self._freed.add(slot)

    def committed(self) -> None:
        self._freed.clear()

    def write(self, slot: int, serial: int, done: tuple[int, int], sending: tuple[int, int] | None = None) -> None:
        """Batch ``serial`` was sent up to ``done``; with ``sending``, a message up to there is about
        to be sent."""
        os.pwrite(self.fd, CURSOR.pack(serial, *done, *(sending or done)), slot * CURSOR.size)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
