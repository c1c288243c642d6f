"""The pinned kernel flow tables: swap-and-drain, read, delete, loss counter.

Works on the pinned maps alone, so the agent and the CLI (dump, flush) share
it and neither needs the program to be compiled.
"""

from __future__ import annotations

import errno
import os
import struct
from dataclasses import dataclass

from . import bpfsys
from ..flows.record import FlowCounters, FlowKey
from .kernelflow import (KEY, UNMETERED_STRIDE, VALUE_STRIDE, decode_table, encode_key, sum_unmetered,
                         unmetered_times)

FLOW_TABLES = ("flows_a", "flows_b")
ACTIVE_SLOT = "active_table"
TABLE_FULL = "table_full"
ZERO = struct.pack("=i", 0)

KernelFlow = tuple[int, FlowKey, FlowCounters]  # (netns_id, key, counters)


class TablesNotFound(RuntimeError):
    pass


@dataclass
class TakenTable:
    """Flows read from a table no program writes, not yet deleted from it.

    The agent journals them before it deletes them (``FlowTables.clear``): a
    crash in between finds them in both places, and the journal says which
    map it holds (``map_id``), so the restarted agent clears the table
    instead of counting its flows twice.
    """

    map_id: int
    fd: int
    keys: bytes
    flows: list


@dataclass
class _Table:
    name: str
    fd: int
    id: int
    max_entries: int


class FlowTables:
    """File descriptors of the pinned maps under ``pin_path``."""

    def __init__(self, pin_path: str):
        self.pin_path = pin_path
        self.cpus = bpfsys.possible_cpus()
        self._fds: list[int] = []
        self._buffers: bpfsys.BatchBuffers | None = None  # made at the first read, re-used after
        self._last_count = 0
        self.last_drain_entries = 0
        try:
            self.tables = [self._open_table(name) for name in FLOW_TABLES]
            self.active_fd = self._open(ACTIVE_SLOT)
            self.full_fd = self._open(TABLE_FULL)
        except Exception:
            self.close()
            raise

    def _open(self, name: str) -> int:
        path = os.path.join(self.pin_path, name)
        try:
            fd = bpfsys.obj_get(path)
        except bpfsys.BpfError as err:
            if err.errno == errno.ENOENT:
                raise TablesNotFound(f"no kipfix flow table pinned at {path}: is the metering program "
                                     "loaded? (kipfix meter attach, or a running kipfix agent)") from None
            raise
        self._fds.append(fd)
        return fd

    def _open_table(self, name: str) -> _Table:
        fd = self._open(name)
        info = bpfsys.map_info(fd)
        return _Table(name, fd, info.id, info.max_entries)

    @property
    def capacity(self) -> int:
        return self.tables[0].max_entries

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()
        self._buffers = None

    def __enter__(self) -> "FlowTables":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the active slot --------------------------------------------------------

    def ensure_active(self) -> None:
        """Point the program at a table if the slot is empty (fresh pins)."""
        if bpfsys.lookup(self.active_fd, ZERO, 4) is None:
            bpfsys.update(self.active_fd, ZERO, struct.pack("=i", self.tables[0].fd))

    def _active_index(self) -> int:
        raw = bpfsys.lookup(self.active_fd, ZERO, 4)
        if raw is None:
            return 0
        map_id = struct.unpack("=I", raw)[0]
        return 1 if map_id == self.tables[1].id else 0

    # -- reading --------------------------------------------------------------

    def _read(self, table: _Table, delete: bool) -> list[KernelFlow]:
        if self._buffers is None:
            self._buffers = bpfsys.BatchBuffers(KEY.size, VALUE_STRIDE * self.cpus, self.capacity)
        keys, values, count = bpfsys.read_all(table.fd, KEY.size, VALUE_STRIDE * self.cpus,
                                              table.max_entries, delete, self._buffers)
        self._last_count = count
        return decode_table(keys, values, count, self.cpus)

    def inactive(self) -> _Table:
        """The table the program does not write (after a drain, or one cut short)."""
        return self.tables[1 - self._active_index()]

    def take(self, table: _Table | None = None) -> TakenTable:
        """Swap tables and read the one the program left, without deleting anything;
        with ``table``, read that (inactive) table without swapping."""
        if table is None:
            active = self.tables[self._active_index()]
            spare = self.tables[1 - self.tables.index(active)]
            bpfsys.update(self.active_fd, ZERO, struct.pack("=i", spare.fd))  # returns after an RCU grace period
            table = active
        flows, keys = self._read_keys(table)
        self.last_drain_entries = self._last_count
        return TakenTable(table.id, table.fd, keys, flows)

    def _read_keys(self, table: _Table) -> tuple[list[KernelFlow], bytes]:
        if self._buffers is None:
            self._buffers = bpfsys.BatchBuffers(KEY.size, VALUE_STRIDE * self.cpus, self.capacity)
        keys, values, count = bpfsys.read_all(table.fd, KEY.size, VALUE_STRIDE * self.cpus,
                                              table.max_entries, False, self._buffers)
        self._last_count = count
        return decode_table(keys, values, count, self.cpus), bytes(keys)

    @staticmethod
    def clear(taken: TakenTable) -> None:
        """Delete what ``take`` read (the table is not written meanwhile: nothing else is in it)."""
        bpfsys.delete_keys(taken.fd, memoryview(taken.keys), KEY.size)

    def clear_table(self, table: _Table) -> int:
        """Delete everything in an inactive table (its flows are already journaled)."""
        _flows, keys = self._read_keys(table)
        return bpfsys.delete_keys(table.fd, memoryview(keys), KEY.size)

    def drain(self) -> list[KernelFlow]:
        """Swap tables, then read and clear the one the program left.

        The slot update returns after running programs finished (RCU grace
        period), so no packet is counted into the old table after this point
        and nothing counted in it is missed.
        """
        active = self._active_index()
        spare = 1 - active
        bpfsys.update(self.active_fd, ZERO, struct.pack("=i", self.tables[spare].fd))
        # Leftovers of a drain cut short (agent killed) stay in that table and
        # are counted again by the program on the next swap: late, never lost.
        flows = self._read(self.tables[active], delete=True)
        self.last_drain_entries = self._last_count
        return flows

    def peek(self) -> list[KernelFlow]:
        """Both tables as they are, without clearing (for dump)."""
        merged: dict[tuple[int, FlowKey], FlowCounters] = {}
        for table in self.tables:
            for netns_id, key, counters in self._read(table, delete=False):
                known = merged.get((netns_id, key))
                if known is None:
                    merged[(netns_id, key)] = counters
                else:
                    known.merge(counters)
        return [(netns_id, key, counters) for (netns_id, key), counters in merged.items()]

    def entries(self) -> int:
        """Keys the last drain found in its table: the occupancy over one drain
        interval. Free to read at scrape time; counting a live table would cost
        a full batch read."""
        return self.last_drain_entries

    def delete(self, netns_id: int, key: FlowKey) -> bool:
        raw = encode_key(netns_id, key)
        removed = [bpfsys.delete(t.fd, raw) for t in self.tables]
        return any(removed)

    def unmetered(self) -> tuple[int, int]:
        """Cumulative (packets, octets) the kernel could not meter: table full."""
        raw = bpfsys.lookup(self.full_fd, ZERO, UNMETERED_STRIDE * self.cpus)
        return sum_unmetered(raw, self.cpus) if raw else (0, 0)

    def unmetered_times(self) -> tuple[int, int] | None:
        """Kernel monotonic ns of the first and last packet counted in unmetered(); None before the first."""
        raw = bpfsys.lookup(self.full_fd, ZERO, UNMETERED_STRIDE * self.cpus)
        return unmetered_times(raw, self.cpus) if raw else None
