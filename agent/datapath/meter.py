"""Compile and load the metering program, re-using compatible pinned tables.

Pinned tables outlive the agent, so a restart neither detaches metering nor
loses what was counted meanwhile. Before BCC opens the pins, each one is
checked against the layout this agent was built with: a table that only
differs in size (maxFlows changed) is re-pinned as ``retired-MAPID`` and
drained at the first drain -- after the filters were re-attached to the new
program, so what the old program counted until then is not lost -- and
unpinned once its flows are journaled (a crash before that finds it again);
a table of another layout is replaced with a log line saying so.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import subprocess

from . import bpfsys
from .kernelflow import KEY, UNMETERED, VALUE, VALUE_STRIDE, decode_table
from .tables import ACTIVE_SLOT, FLOW_TABLES, TABLE_FULL, FlowTables, KernelFlow, TakenTable

log = logging.getLogger("kipfix.meter")

BPFFS = "/sys/fs/bpf"
INGRESS_FUNCTION = "kipfix_ingress"
EGRESS_FUNCTION = "kipfix_egress"
RETIRED_PREFIX = "retired-"


def _expected_layouts(max_flows: int) -> dict[str, tuple[int, int, int, int | None]]:
    """name -> (map type, key size, value size, max entries or None for any)."""
    flows = (bpfsys.BPF_MAP_TYPE_PERCPU_HASH, KEY.size, VALUE.size, max_flows)
    return {FLOW_TABLES[0]: flows, FLOW_TABLES[1]: flows,
            ACTIVE_SLOT: (bpfsys.BPF_MAP_TYPE_ARRAY_OF_MAPS, 4, 4, 1),
            TABLE_FULL: (bpfsys.BPF_MAP_TYPE_PERCPU_ARRAY, 4, UNMETERED.size, 1)}


def ensure_bpffs(path: str = BPFFS) -> None:
    with open("/proc/self/mounts", encoding="utf-8") as mounts:
        if any(line.split()[1:3] == [path, "bpf"] for line in mounts):
            return
    result = subprocess.run(["mount", "-t", "bpf", "bpf", path], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"bpf filesystem is not mounted at {path} and mounting it failed: "
                           f"{result.stderr.strip()}; mount it with 'mount -t bpf bpf {path}' "
                           "(in a pod: a hostPath volume for /sys/fs/bpf)")


def _active_table_id(pin_path: str) -> int | None:
    """Map id of the table the pinned slot points the program at (None: no slot, or empty)."""
    try:
        fd = bpfsys.obj_get(os.path.join(pin_path, ACTIVE_SLOT))
    except bpfsys.BpfError:
        return None
    try:
        raw = bpfsys.lookup(fd, struct.pack("=i", 0), 4)
    except bpfsys.BpfError:
        raw = None
    finally:
        os.close(fd)
    return struct.unpack("=I", raw)[0] if raw else None


def reconcile_pins(pin_path: str, max_flows: int) -> None:
    """Remove pins the new program cannot share; re-pin resized flow tables as retired.

    A retired table keeps in its name whether the program was writing it
    (``-live``): the journal may name a table it holds, but once the
    program writes into it again only the inactive one is really covered.
    """
    expected = _expected_layouts(max_flows)
    active = _active_table_id(pin_path)
    stale = []
    tables_replaced = False
    for name, (map_type, key_size, value_size, max_entries) in expected.items():
        path = os.path.join(pin_path, name)
        try:
            fd = bpfsys.obj_get(path)
        except bpfsys.BpfError as err:
            if err.errno == errno.ENOENT:
                continue
            raise
        try:
            info = bpfsys.map_info(fd)
        finally:
            os.close(fd)
        same_layout = (info.type, info.key_size, info.value_size) == (map_type, key_size, value_size)
        if same_layout and max_entries in (None, info.max_entries):
            continue
        if same_layout and name in FLOW_TABLES:
            # They hold counts, and the old program may add more until it is replaced.
            live = "-live" if active in (None, info.id) else ""  # unknown: never taken as journaled
            os.rename(path, os.path.join(pin_path, f"{RETIRED_PREFIX}{info.id}{live}"))
            log.warning("pinned table %s was made for maxFlows %d, the config asks for %d: replacing it "
                        "and carrying its flows over at the first drain", path, info.max_entries, max_flows)
            tables_replaced = True
            continue
        log.warning("pinned map %s has an incompatible layout (type %d, key %d, value %d; this agent "
                    "needs type %d, key %d, value %d): replacing it", path, info.type, info.key_size,
                    info.value_size, map_type, key_size, value_size)
        stale.append(path)
        tables_replaced = tables_replaced or name in FLOW_TABLES
    if tables_replaced:
        # The slot's inner-map template must match the new tables.
        slot = os.path.join(pin_path, ACTIVE_SLOT)
        if os.path.exists(slot) and slot not in stale:
            stale.append(slot)
    for path in stale:
        os.unlink(path)


class _Retired:
    """A flow table of an earlier size, pinned as retired-MAPID until its flows are journaled."""

    def __init__(self, path: str):
        self.path = path
        self.live = path.endswith("-live")  # the program was writing it when it was retired
        self.fd = bpfsys.obj_get(path)
        info = bpfsys.map_info(self.fd)
        self.map_id, self.max_entries = info.id, info.max_entries

    def take(self, cpus: int) -> TakenTable:
        keys, values, count = bpfsys.read_all(self.fd, KEY.size, VALUE_STRIDE * cpus, self.max_entries, False)
        return TakenTable(self.map_id, self.fd, bytes(keys), decode_table(keys, values, count, cpus))

    def release(self) -> None:
        """Unpin and close: the map goes when no program uses it any more."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(self.fd)


def retired_tables(pin_path: str) -> list[_Retired]:
    out = []
    for name in sorted(os.listdir(pin_path)):
        if name.startswith(RETIRED_PREFIX):
            try:
                out.append(_Retired(os.path.join(pin_path, name)))
            except bpfsys.BpfError as err:
                log.warning("cannot open retired table %s (%s): its flows are not carried over",
                            os.path.join(pin_path, name), err)
    return out


class Meter:
    """The loaded program (ingress and egress entry points) and its tables."""

    def __init__(self, max_flows: int, pin_path: str):
        from .requirements import require_runtime

        self.headers = require_runtime()
        ensure_bpffs()
        os.makedirs(pin_path, exist_ok=True)
        self.pin_path = pin_path
        self.max_flows = max_flows
        reconcile_pins(pin_path, max_flows)
        self.retired = retired_tables(pin_path)
        self._bpf = self._compile(max_flows, pin_path)
        from bcc import BPF

        self.ingress_fn = self._bpf.load_func(INGRESS_FUNCTION.encode(), BPF.SCHED_CLS)
        self.egress_fn = self._bpf.load_func(EGRESS_FUNCTION.encode(), BPF.SCHED_CLS)
        self.tables = FlowTables(pin_path)
        self.tables.ensure_active()
        log.info("metering program loaded (maxFlows %d, tables pinned under %s, kernel headers: %s)",
                 max_flows, pin_path, self.headers.description)

    @staticmethod
    def _compile(max_flows: int, pin_path: str):
        from bcc import BPF

        from kipfix.bpf import SOURCE

        cflags = [f"-DMAX_FLOWS={max_flows}", f'-DPIN_PATH="{pin_path}"', "-w"]
        return BPF(src_file=str(SOURCE).encode(), cflags=cflags)

    @property
    def ingress_fd(self) -> int:
        return self.ingress_fn.fd

    @property
    def egress_fd(self) -> int:
        return self.egress_fn.fd

    def drain(self) -> list[KernelFlow]:
        """Swap, read and clear at once (for tools and benchmarks: a crash in between loses
        what was read; the agent uses ``take`` and ``clear`` around its journal)."""
        taken = self.take()
        self.clear(taken)
        return [flow for table in taken for flow in table.flows]

    def take(self) -> list[TakenTable]:
        """Swap tables and read the one the program left, and any retired table; nothing is
        deleted until ``clear``."""
        taken = [self.tables.take()]
        taken += [retired.take(self.tables.cpus) for retired in self.retired]
        return taken

    def take_inactive(self, journaled: set[int]) -> list[TakenTable]:
        """At start: read what a killed agent left in tables no program writes -- the inactive
        table and retired ones -- except tables whose flows the journal already holds
        (``journaled`` map ids): those are cleared unread."""
        taken = []
        inactive = self.tables.inactive()
        if inactive.id in journaled:
            self.tables.clear_table(inactive)
        else:
            taken.append(self.tables.take(inactive))
        for retired in list(self.retired):
            if retired.map_id in journaled and not retired.live:
                retired.release()
                self.retired.remove(retired)
            else:
                taken.append(retired.take(self.tables.cpus))
        return taken

    def clear(self, taken: list[TakenTable]) -> None:
        """Delete what ``take`` read; retired tables are unpinned."""
        for table in taken:
            retired = next((r for r in self.retired if r.map_id == table.map_id), None)
            if retired is None:
                self.tables.clear(table)
            else:
                retired.release()
                self.retired.remove(retired)

    def close(self) -> None:
        """Release this process's handles; pins and attached filters stay."""
        for retired in self.retired:
            os.close(retired.fd)
        self.retired = []
        self.tables.close()
        self._bpf.cleanup()
