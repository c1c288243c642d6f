"""Crash safety: what only the agent's memory holds, written beside the pins' lifetime.

A drain reads the inactive kernel table without deleting anything; the
agent then folds the flows into its cache, hands the ended ones to the
sinks, and *commits* the journal -- what changed in the flow cache, the
records queued for each collector and the ids of the kernel tables just
read -- before it deletes those flows from the kernel and lets the senders
send them. A process killed at any moment leaves either the previous commit,
with the flows it had not committed still in the kernel, or the new one, and
the map ids say which tables it covers.

A commit is either a checkpoint (everything, written to a temporary file
and renamed over the journal) or a delta appended to ``JOURNAL.log``: the
cache rows that changed and the keys that left, and the rest whole (it is
small). A delta costs what the drain changed, not what the cache holds; a
checkpoint comes when the log outgrows the journal. Each log record carries
its checkpoint's generation and a CRC: records of an older checkpoint, and
a record cut short by the kill, are not replayed (that commit did not
happen).

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

import collections
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
RECORD = struct.Struct("!IIQ")  # a log record: body length, CRC-32 of the body, checkpoint generation
# The body's shape depends on these; another version's journal is counted, not misread.
SCHEMA = "3:" + ",".join(FlowKey._fields) + ":" + ",".join(f.name for f in dataclasses.fields(FlowCounters))
# batch serial; position after the last message sent; end of the message being sent (= the former
# when none is): positions are (set index, record index) in the batch's groups
CURSOR = struct.Struct("!QIIII")
MAX_SLOTS = 4096
MIN_LOG_BYTES = 1 << 20  # the log may grow to the journal's size, and to this at least, before a checkpoint


def journal_path(state_dir: str, pin_path: str) -> str:
    """The journal of the tables pinned at ``pin_path`` (the log adds ``.log``, the cursors ``.sent``)."""
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
    """What a commit holds. ``maps``: ids of the kernel tables whose flows are in here.

    For a checkpoint, ``cache`` is every row of the flow cache; for a delta,
    ``cache`` is the rows that changed and ``removed`` the keys that left.
    """

    maps: tuple[int, ...] = ()
    cache: list = field(default_factory=list)  # FlowCache rows: (netns id, key tuple, counters or None, last seen)
    held: list = field(default_factory=list)  # drained flows a sink-side filter holds back one drain
    sinks: dict[str, Any] = field(default_factory=dict)  # each sink's own state, plain data
    totals: tuple[int, int, int] = (0, 0, 0)  # flows, packets, octets held in the cache
    names: dict = field(default_factory=dict)  # (netns id, ifindex) -> interface name
    removed: list = field(default_factory=list)


class _PlainData(pickle.Unpickler):
    """Builtin containers, numbers, strings and bytes only: never a class or a function."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"the journal names {module}.{name}: only plain data is accepted")


def _dumps(data: Any) -> bytes:
    buffer = io.BytesIO()
    pickler = pickle.Pickler(buffer, protocol=5)
    pickler.fast = True  # no memo: a few times faster for many small tuples, and nothing here is shared
    pickler.dump(data)
    return buffer.getvalue()


def _loads(data: bytes) -> Any:
    return _PlainData(io.BytesIO(data)).load()


def _private_file(path: str, flags: int = os.O_RDWR) -> int:
    fd = os.open(path, flags | os.O_CREAT | os.O_CLOEXEC, 0o600)
    os.fchmod(fd, 0o600)
    return fd


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class Journal:
    def __init__(self, path: str):
        self.path = path
        self.log_path = path + ".log"
        os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
        self.generation = 0
        self._journal_bytes = 0
        self._log_bytes = 0
        self._log_fd = -1

    # -- reading --------------------------------------------------------------------------

    def load(self) -> JournalState | None:
        """The last commit: the checkpoint with its log replayed; None if there is none.
        JournalError if it cannot be used."""
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
            raw = _loads(body)
        except Exception as err:  # noqa: BLE001 - any undecodable body is one error
            raise JournalError(f"{self.path} cannot be decoded: {err}", lost) from None
        if not isinstance(raw, dict) or raw.get("schema") != SCHEMA:
            schema = raw.get("schema") if isinstance(raw, dict) else None
            raise JournalError(f"{self.path} was written by another kipfix version (schema {schema!r})", lost)
        cache = collections.OrderedDict(((row[0], row[1]), row) for row in raw["cache"])
        state = JournalState(tuple(raw["maps"]), [], raw["held"], raw["sinks"], lost, raw["names"])
        for delta in self._log_records(raw["generation"]):
            for row in delta["cache"]:
                cache[(row[0], row[1])] = row
                cache.move_to_end((row[0], row[1]))
            for cache_key in delta["removed"]:
                cache.pop(tuple(cache_key), None)
            state = JournalState(tuple(delta["maps"]), [], delta["held"], delta["sinks"], tuple(delta["totals"]),
                                 delta["names"])
        state.cache = list(cache.values())
        return state

    def _log_records(self, generation: int):
        """The log's records of ``generation``, up to the first that is cut short or damaged."""
        try:
            with open(self.log_path, "rb") as handle:
                data = handle.read()
        except FileNotFoundError:
            return
        except OSError as err:
            log.warning("cannot read %s (%s): replaying the journal without it", self.log_path, err.strerror)
            return
        offset = 0
        while offset + RECORD.size <= len(data):
            length, crc, record_generation = RECORD.unpack_from(data, offset)
            body = data[offset + RECORD.size:offset + RECORD.size + length]
            if len(body) < length or zlib.crc32(body) != crc:
                return  # the commit being written when the agent died: it did not happen
            offset += RECORD.size + length
            if record_generation != generation:
                continue  # left over from before the checkpoint
            try:
                yield _loads(body)
            except Exception:  # noqa: BLE001 - a record that does not decode ends the replay like a torn one
                return

    # -- writing -------------------------------------------------------------------------

    def due(self) -> bool:
        """True when the next commit should be a checkpoint: none yet, or the log outgrew the journal."""
        return self._log_fd < 0 or self._log_bytes > max(self._journal_bytes, MIN_LOG_BYTES)

    def checkpoint(self, state: JournalState) -> None:
        """Replace the journal with ``state`` (every cache row) in one rename, and start a new log.
        OSError if it cannot be written."""
        generation = int.from_bytes(os.urandom(8), "big")
        body = _dumps({"schema": SCHEMA, "generation": generation, "maps": list(state.maps), "cache": state.cache,
                       "held": state.held, "sinks": state.sinks, "names": state.names})
        header = HEADER.pack(MAGIC, zlib.crc32(body), *state.totals)
        tmp = self.path + ".tmp"
        fd = _private_file(tmp)
        try:
            os.ftruncate(fd, 0)
            _write_all(fd, header + body)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)  # the commit: log records of the old generation are dead from here
        self.generation = generation
        self._journal_bytes = len(header) + len(body)
        if self._log_fd >= 0:
            os.close(self._log_fd)
        self._log_fd = _private_file(self.log_path, os.O_WRONLY | os.O_TRUNC | os.O_APPEND)
        self._log_bytes = 0

    def append(self, delta: JournalState) -> None:
        """Commit what changed since the last commit (one append). OSError if it cannot be written;
        the next commit is then a checkpoint."""
        body = _dumps({"maps": list(delta.maps), "cache": delta.cache, "removed": delta.removed,
                       "held": delta.held, "sinks": delta.sinks, "names": delta.names, "totals": list(delta.totals)})
        try:
            _write_all(self._log_fd, RECORD.pack(len(body), zlib.crc32(body), self.generation) + body)
        except OSError:
            os.close(self._log_fd)
            self._log_fd = -1  # a record may be half written: only a checkpoint is sure to count
            raise
        self._log_bytes += RECORD.size + len(body)

    def close(self) -> None:
        if self._log_fd >= 0:
            os.close(self._log_fd)
            self._log_fd = -1

    def remove(self) -> None:
        self.close()
        for path in (self.path, self.path + ".tmp", self.log_path):
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
