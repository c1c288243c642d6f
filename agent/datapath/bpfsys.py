"""The few bpf(2) commands kipfix needs on maps, through ctypes.

BCC compiles and loads the program; everything that only touches maps
(pinned-map inspection, batch drains, dump and flush from the CLI) goes
through these wrappers, so the CLI needs no compiler and a drain costs a
handful of syscalls however many flows there are.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
from dataclasses import dataclass

_SYS_BPF = {"x86_64": 321, "aarch64": 280}.get(platform.machine(), 321)

BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_OBJ_GET = 7
BPF_MAP_GET_FD_BY_ID = 14
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_MAP_LOOKUP_BATCH = 24
BPF_MAP_LOOKUP_AND_DELETE_BATCH = 25
BPF_MAP_DELETE_BATCH = 27

BPF_MAP_TYPE_PERCPU_HASH = 5
BPF_MAP_TYPE_PERCPU_ARRAY = 6
BPF_MAP_TYPE_ARRAY_OF_MAPS = 12

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class BpfError(OSError):
    pass


def _bpf(cmd: int, attr: ctypes.Structure) -> int:
    ret = _libc.syscall(_SYS_BPF, cmd, ctypes.byref(attr), ctypes.sizeof(attr))
    if ret < 0:
        err = ctypes.get_errno()
        raise BpfError(err, os.strerror(err))
    return ret


class _ObjAttr(ctypes.Structure):
    _fields_ = [("pathname", ctypes.c_uint64), ("bpf_fd", ctypes.c_uint32),
                ("file_flags", ctypes.c_uint32), ("path_fd", ctypes.c_int32), ("pad", ctypes.c_uint32)]


class _InfoAttr(ctypes.Structure):
    _fields_ = [("bpf_fd", ctypes.c_uint32), ("info_len", ctypes.c_uint32), ("info", ctypes.c_uint64)]


class _MapInfo(ctypes.Structure):
    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("key_size", ctypes.c_uint32),
                ("value_size", ctypes.c_uint32), ("max_entries", ctypes.c_uint32),
                ("map_flags", ctypes.c_uint32), ("name", ctypes.c_char * 16)]


class _ElemAttr(ctypes.Structure):
    _fields_ = [("map_fd", ctypes.c_uint32), ("pad", ctypes.c_uint32), ("key", ctypes.c_uint64),
                ("value", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


class _BatchAttr(ctypes.Structure):
    _fields_ = [("in_batch", ctypes.c_uint64), ("out_batch", ctypes.c_uint64), ("keys", ctypes.c_uint64),
                ("values", ctypes.c_uint64), ("count", ctypes.c_uint32), ("map_fd", ctypes.c_uint32),
                ("elem_flags", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


class _IdAttr(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint32), ("next_id", ctypes.c_uint32), ("open_flags", ctypes.c_uint32)]


@dataclass(frozen=True)
class MapInfo:
    type: int
    id: int
    key_size: int
    value_size: int
    max_entries: int
    name: str


def obj_get(path: str) -> int:
    """Open a pinned object; raises BpfError (ENOENT if not pinned)."""
    raw = os.fsencode(path) + b"\0"
    buf = ctypes.create_string_buffer(raw)
    return _bpf(BPF_OBJ_GET, _ObjAttr(pathname=ctypes.addressof(buf)))


def map_info(fd: int) -> MapInfo:
    info = _MapInfo()
    _bpf(BPF_OBJ_GET_INFO_BY_FD, _InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info),
                                           info=ctypes.addressof(info)))
    return MapInfo(info.type, info.id, info.key_size, info.value_size, info.max_entries,
                   info.name.decode(errors="replace"))


# struct bpf_prog_info (include/uapi/linux/bpf.h): offsets unchanged since 5.1. The buffer
# is larger than the struct; the kernel fills what it knows and the rest stays zero.
_PROG_INFO_SIZE = 256
_PROG_INFO_ID = 4
_PROG_INFO_NAME = 64
_PROG_INFO_RUN_TIME_NS = 192
_PROG_INFO_RUN_CNT = 200


@dataclass(frozen=True)
class ProgInfo:
    id: int
    name: str
    run_time_ns: int  # cumulative, counted only while bpf_stats is enabled
    run_cnt: int


def prog_info(fd: int) -> ProgInfo:
    """Id, name and bpf_stats run time/count of a loaded program."""
    buf = ctypes.create_string_buffer(_PROG_INFO_SIZE)
    _bpf(BPF_OBJ_GET_INFO_BY_FD, _InfoAttr(bpf_fd=fd, info_len=_PROG_INFO_SIZE, info=ctypes.addressof(buf)))
    raw = buf.raw
    return ProgInfo(int.from_bytes(raw[_PROG_INFO_ID:_PROG_INFO_ID + 4], "little"),
                    raw[_PROG_INFO_NAME:_PROG_INFO_NAME + 16].split(b"\0")[0].decode(errors="replace"),
                    int.from_bytes(raw[_PROG_INFO_RUN_TIME_NS:_PROG_INFO_RUN_TIME_NS + 8], "little"),
                    int.from_bytes(raw[_PROG_INFO_RUN_CNT:_PROG_INFO_RUN_CNT + 8], "little"))


def map_fd_by_id(map_id: int) -> int:
    return _bpf(BPF_MAP_GET_FD_BY_ID, _IdAttr(id=map_id))


def lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    kbuf = ctypes.create_string_buffer(key, len(key))
    vbuf = ctypes.create_string_buffer(value_size)
    try:
        _bpf(BPF_MAP_LOOKUP_ELEM, _ElemAttr(map_fd=fd, key=ctypes.addressof(kbuf), value=ctypes.addressof(vbuf)))
    except BpfError as err:
        if err.errno == errno.ENOENT:
            return None
        raise
    return vbuf.raw


def update(fd: int, key: bytes, value: bytes, flags: int = 0) -> None:
    kbuf = ctypes.create_string_buffer(key, len(key))
    vbuf = ctypes.create_string_buffer(value, len(value))
    _bpf(BPF_MAP_UPDATE_ELEM, _ElemAttr(map_fd=fd, key=ctypes.addressof(kbuf), value=ctypes.addressof(vbuf),
                                        flags=flags))


def delete(fd: int, key: bytes) -> bool:
    kbuf = ctypes.create_string_buffer(key, len(key))
    try:
        _bpf(BPF_MAP_DELETE_ELEM, _ElemAttr(map_fd=fd, key=ctypes.addressof(kbuf)))
    except BpfError as err:
        if err.errno == errno.ENOENT:
            return False
        raise
    return True


class BatchBuffers:
    """Key and value buffers for batch reads of one map, allocated once.

    A million-flow table needs ~150 MB of value buffer; allocating (and
    zero-filling) it on every drain cost more than the syscalls themselves.
    """

    def __init__(self, key_size: int, value_size: int, capacity: int):
        self.key_size, self.value_size, self.capacity = key_size, value_size, max(capacity, 1)
        self.keys = ctypes.create_string_buffer(self.capacity * key_size)
        self.values = ctypes.create_string_buffer(self.capacity * value_size)


def read_all(fd: int, key_size: int, value_size: int, capacity: int, delete: bool,
             buffers: BatchBuffers | None = None) -> tuple[memoryview, memoryview, int]:
    """Read (and with ``delete``, remove) every entry of a hash map in batches.

    ``value_size`` is the size of one value as the syscall returns it (for
    per-CPU maps: round_up(value, 8) * possible CPUs). Returns views of the
    key and value buffers (valid until ``buffers`` is used again) and the
    number of entries. Only call with ``delete`` on a table no program
    writes, or entries may be missed.
    """
    if buffers is None:
        buffers = BatchBuffers(key_size, value_size, capacity)
    elif (buffers.key_size, buffers.value_size) != (key_size, value_size) or buffers.capacity < capacity:
        raise ValueError("batch buffers do not fit this map")
    cmd = BPF_MAP_LOOKUP_AND_DELETE_BATCH if delete else BPF_MAP_LOOKUP_BATCH
    keys, values = buffers.keys, buffers.values
    in_batch = ctypes.c_uint32(0)
    out_batch = ctypes.c_uint32(0)
    total = 0
    first = True
    while total < capacity:
        attr = _BatchAttr(in_batch=0 if first else ctypes.addressof(in_batch),
                          out_batch=ctypes.addressof(out_batch),
                          keys=ctypes.addressof(keys) + total * key_size,
                          values=ctypes.addressof(values) + total * value_size,
                          count=capacity - total, map_fd=fd)
        try:
            _bpf(cmd, attr)
            done = False
        except BpfError as err:
            if err.errno != errno.ENOENT:
                raise
            done = True
        total += attr.count
        if done:
            break
        first = False
        in_batch.value = out_batch.value
    return memoryview(keys)[:total * key_size], memoryview(values)[:total * value_size], total


def delete_keys(fd: int, keys: memoryview, key_size: int) -> int:
    """Delete the packed ``keys`` (as ``read_all`` returned them) in batch syscalls; keys
    already gone are skipped. Returns the number deleted."""
    count = len(keys) // key_size
    if not count:
        return 0
    buffer = (ctypes.c_char * len(keys)).from_buffer_copy(keys)
    deleted = done = 0
    while done < count:
        attr = _BatchAttr(keys=ctypes.addressof(buffer) + done * key_size, count=count - done, map_fd=fd)
        try:
            _bpf(BPF_MAP_DELETE_BATCH, attr)
            return deleted + attr.count
        except BpfError as err:
            if err.errno != errno.ENOENT:
                raise
            # attr.count keys were deleted before one that is not there: skip it
            deleted += attr.count
            done += attr.count + 1
    return deleted


def possible_cpus() -> int:
    """Number of possible CPUs: the per-CPU value count the kernel returns."""
    with open("/sys/devices/system/cpu/possible", encoding="ascii") as handle:
        text = handle.read().strip()
    count = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        count += int(hi or lo) - int(lo) + 1
    return count
