"""The crash journal's file format: checkpoints, deltas, cut-short records, other versions, the pin path lock.

(tests/test_crash_safety.py kills real agents; these check the file on its own.)
"""

from __future__ import annotations

import os
import pickle
import stat
import struct
import time

import pytest

from kipfix.agent.flows.cache import FlowCache
from kipfix.agent.flows.journal import (HEADER, RECORD, Journal, JournalError, JournalState, PinPathInUse,
                                        SendCursors, journal_path)
from kipfix.agent.flows.record import FlowCounters, FlowKey


def flow(i: int, packets: int = 1):
    now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    key = FlowKey(2, i % 2, 4, 17, bytes([10, 0, i // 256, i % 256]), b"\x0a\x00\x00\x01", 1000 + i, 53)
    return 1, key, FlowCounters(packets, 100 * packets, now, now)


def commit(journal: Journal, cache: FlowCache, maps=(1,), full=False) -> None:
    if full or journal.due():
        journal.checkpoint(JournalState(maps, cache.snapshot(), [], {"x": maps}, tuple(cache.held), {}))
    else:
        changed, removed = cache.take_changes()
        journal.append(JournalState(maps, changed, [], {"x": maps}, tuple(cache.held), {}, removed))


def restored(journal: Journal) -> tuple[FlowCache, JournalState]:
    state = Journal(journal.path).load()
    cache = FlowCache(15, 60, 1000)
    cache.restore(state.cache)
    return cache, state


def rows(cache: FlowCache) -> list:
    return [(k, e.counters, e.last_seen_ns) for k, e in cache._entries.items()]


def test_deltas_replay_to_the_same_cache(tmp_path):
    journal = Journal(str(tmp_path / "journal"))
    cache = FlowCache(15, 60, 1000)
    cache.ingest([flow(i) for i in range(50)])
    commit(journal, cache, (1,))  # the first commit is a checkpoint
    assert os.path.getsize(journal.log_path) == 0
    cache.ingest([flow(i, 2) for i in range(10)])  # changed
    cache.flush(match=lambda _n, key: key.sport < 1005)  # gone
    commit(journal, cache, (2,))
    cache.ingest([flow(i) for i in range(100, 105)])  # new
    commit(journal, cache, (3,))
    assert os.path.getsize(journal.log_path) > 0
    again, state = restored(journal)
    assert sorted(rows(again), key=str) == sorted(rows(cache), key=str)
    assert (state.maps, state.sinks, state.totals) == ((3,), {"x": (3,)}, tuple(cache.held))
    assert cache.held == [50, 50 - 5 + 10 * 2 - 5 * 2 + 5, 100 * (50 - 5 + 10 * 2 - 5 * 2 + 5)]
    for path in (journal.path, journal.log_path):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_a_record_cut_short_is_a_commit_that_did_not_happen(tmp_path):
    journal = Journal(str(tmp_path / "journal"))
    cache = FlowCache(15, 60, 1000)
    cache.ingest([flow(i) for i in range(5)])
    commit(journal, cache, (1,))
    cache.ingest([flow(7)])
    commit(journal, cache, (2,))
    good = os.path.getsize(journal.log_path)
    cache.ingest([flow(8)])
    commit(journal, cache, (3,))
    with open(journal.log_path, "r+b") as log:
        log.truncate(good + (os.path.getsize(journal.log_path) - good) // 2)  # killed mid-append
    again, state = restored(journal)
    assert state.maps == (2,) and len(again) == 6
    # a checkpoint starts a new generation: what the old log says no longer counts
    commit(journal, cache, (4,), full=True)
    with open(journal.log_path, "ab") as log:
        body = pickle.dumps({"maps": [99], "cache": [], "removed": [], "held": [], "sinks": {}, "names": {},
                             "totals": [0, 0, 0]})
        import zlib
        log.write(RECORD.pack(len(body), zlib.crc32(body), journal.generation ^ 1) + body)
    assert restored(journal)[1].maps == (4,)


def test_an_unusable_journal_says_what_it_held(tmp_path):
    journal = Journal(str(tmp_path / "journal"))
    cache = FlowCache(15, 60, 1000)
    cache.ingest([flow(i, 3) for i in range(4)])
    commit(journal, cache)
    data = bytearray(open(journal.path, "rb").read())
    data[-1] ^= 0xFF
    open(journal.path, "wb").write(bytes(data))
    with pytest.raises(JournalError) as err:
        Journal(journal.path).load()
    assert "damaged" in str(err.value) and err.value.lost == (4, 12, 1200)
    # another version's journal: not misread, counted from its header
    body = pickle.dumps({"schema": "0:other"})
    import zlib
    open(journal.path, "wb").write(HEADER.pack(b"KIPFIXJ1", zlib.crc32(body), 7, 8, 9) + body)
    with pytest.raises(JournalError) as err:
        Journal(journal.path).load()
    assert "another kipfix version" in str(err.value) and err.value.lost == (7, 8, 9)
    # plain data only: a journal naming a class is refused, never run
    body = pickle.dumps(os.system)
    open(journal.path, "wb").write(HEADER.pack(b"KIPFIXJ1", zlib.crc32(body), 0, 0, 0) + body)
    with pytest.raises(JournalError, match="only plain data"):
        Journal(journal.path).load()


def test_the_cursor_file_locks_the_pin_path_and_keeps_slots(tmp_path):
    path = journal_path(str(tmp_path), "/sys/fs/bpf/kipfix")
    assert path != journal_path(str(tmp_path), "/sys/fs/bpf/kipfix_")  # keyed by the exact pin path
    cursors = SendCursors(path + ".sent")
    with pytest.raises(PinPathInUse):
        SendCursors(path + ".sent")
    slot = cursors.take()
    cursors.write(slot, 42, (1, 5), (2, 0))
    cursors.close()
    again = SendCursors(path + ".sent")  # the lock went with the process (here: the fd)
    assert again.at_start[slot] == (42, (1, 5), (2, 0))
    assert stat.S_IMODE(os.stat(path + ".sent").st_mode) == 0o600
    # a slot freed is not handed out again before a commit: the journal on disk may still name it
    other = again.take()
    again.free(other)
    assert again.take() != other
    again.committed()
    again.close()
