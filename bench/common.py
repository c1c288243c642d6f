"""What both benchmarks share: bpf(2) calls the agent does not need, the
kernel's BPF run-time statistics, scratch network namespaces, and printing.

Not part of the agent: nothing in kipfix.agent imports this.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import shutil
import signal
import statistics
import struct
import subprocess
from dataclasses import dataclass

from kipfix.agent.datapath import bpfsys

BPF_PROG_TEST_RUN = 10
BPF_MAP_UPDATE_BATCH = 26
BPF_PROG_INFO_SIZE = 256  # larger than struct bpf_prog_info; the kernel fills what it knows
# Offsets in struct bpf_prog_info (include/uapi/linux/bpf.h, unchanged since 5.1).
_PROG_INFO_NAME = 64
_PROG_INFO_RUN_TIME_NS = 192
_PROG_INFO_RUN_CNT = 200


# ---- bpf(2) ---------------------------------------------------------------------

def update_batch(fd: int, keys: bytes, values: bytes, count: int) -> int:
    """BPF_MAP_UPDATE_BATCH: insert ``count`` entries in one syscall; returns how many went in."""
    kbuf = ctypes.create_string_buffer(keys, len(keys))
    vbuf = ctypes.create_string_buffer(values, len(values))
    attr = bpfsys._BatchAttr(keys=ctypes.addressof(kbuf), values=ctypes.addressof(vbuf),
                             count=count, map_fd=fd)
    bpfsys._bpf(BPF_MAP_UPDATE_BATCH, attr)
    return attr.count


class _TestRunAttr(ctypes.Structure):
    _fields_ = [("prog_fd", ctypes.c_uint32), ("retval", ctypes.c_uint32), ("data_size_in", ctypes.c_uint32),
                ("data_size_out", ctypes.c_uint32), ("data_in", ctypes.c_uint64), ("data_out", ctypes.c_uint64),
                ("repeat", ctypes.c_uint32), ("duration", ctypes.c_uint32), ("ctx_size_in", ctypes.c_uint32),
                ("ctx_size_out", ctypes.c_uint32), ("ctx_in", ctypes.c_uint64), ("ctx_out", ctypes.c_uint64),
                ("flags", ctypes.c_uint32), ("cpu", ctypes.c_uint32), ("batch_size", ctypes.c_uint32),
                ("pad", ctypes.c_uint32)]


def test_run(fd: int, frame: bytes, repeat: int) -> int:
    """BPF_PROG_TEST_RUN: run a tc program ``repeat`` times on ``frame``; mean ns per run (kernel-measured)."""
    buf = ctypes.create_string_buffer(frame, len(frame))
    attr = _TestRunAttr(prog_fd=fd, data_size_in=len(frame), data_in=ctypes.addressof(buf), repeat=repeat)
    bpfsys._bpf(BPF_PROG_TEST_RUN, attr)
    return attr.duration


def udp_frame(src: str, dst: str, sport: int, dport: int, payload: bytes) -> bytes:
    """An Ethernet + IPv4 + UDP frame (checksums left zero: nothing verifies them)."""
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0x4000, 64, 17, 0,
                     bytes(int(x) for x in src.split(".")), bytes(int(x) for x in dst.split(".")))
    return b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00" + ip + udp


@dataclass(frozen=True)
class ProgStats:
    name: str
    run_time_ns: int
    run_cnt: int


def prog_stats(fd: int) -> ProgStats:
    """run_time_ns and run_cnt of a loaded program (BPF_OBJ_GET_INFO_BY_FD)."""
    buf = ctypes.create_string_buffer(BPF_PROG_INFO_SIZE)
    attr = bpfsys._InfoAttr(bpf_fd=fd, info_len=BPF_PROG_INFO_SIZE, info=ctypes.addressof(buf))
    bpfsys._bpf(bpfsys.BPF_OBJ_GET_INFO_BY_FD, attr)
    raw = buf.raw
    name = raw[_PROG_INFO_NAME:_PROG_INFO_NAME + 16].split(b"\0")[0].decode(errors="replace")
    return ProgStats(name, int.from_bytes(raw[_PROG_INFO_RUN_TIME_NS:_PROG_INFO_RUN_TIME_NS + 8], "little"),
                     int.from_bytes(raw[_PROG_INFO_RUN_CNT:_PROG_INFO_RUN_CNT + 8], "little"))


class BpfStats:
    """``kernel.bpf_stats_enabled=1`` while inside; the previous value is put back."""

    PATH = "/proc/sys/kernel/bpf_stats_enabled"

    def __enter__(self) -> "BpfStats":
        with open(self.PATH, encoding="ascii") as handle:
            self.previous = handle.read().strip()
        self._write("1")
        return self

    def __exit__(self, *exc) -> None:
        self._write(self.previous)

    def _write(self, value: str) -> None:
        with open(self.PATH, "w", encoding="ascii") as handle:
            handle.write(value)


# ---- scratch namespaces -----------------------------------------------------------

def _interrupt(signum, _frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def interrupt_on_signals() -> None:
    """SIGTERM and SIGINT (even if inherited as ignored) raise KeyboardInterrupt, so cleanup runs."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _interrupt)


def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, check=check)


class VethPair:
    """Two fresh namespaces joined by a veth pair, with /30 addresses; removed by ``close``.

    Names carry the pid so concurrent runs (and other people's tests) never
    collide. ``close`` runs on normal exit, on an exception, at interpreter
    exit and on SIGTERM/SIGINT; deleting a namespace deletes its veth end.
    """

    def __init__(self, tag: str = "bench") -> None:
        pid = os.getpid()
        self.ns_a, self.ns_b = f"kipfix-{tag}-a-{pid}", f"kipfix-{tag}-b-{pid}"
        self.if_a, self.if_b = f"kb{pid}a"[:15], f"kb{pid}b"[:15]
        self.ip_a, self.ip_b = "10.231.0.1", "10.231.0.2"
        self._closed = False
        atexit.register(self.close)
        interrupt_on_signals()
        try:
            run("ip", "netns", "add", self.ns_a)
            run("ip", "netns", "add", self.ns_b)
            run("ip", "link", "add", self.if_a, "netns", self.ns_a, "type", "veth",
                "peer", "name", self.if_b, "netns", self.ns_b)
            for ns, ifname, ip in ((self.ns_a, self.if_a, self.ip_a), (self.ns_b, self.if_b, self.ip_b)):
                run("ip", "-n", ns, "addr", "add", f"{ip}/30", "dev", ifname)
                run("ip", "-n", ns, "link", "set", ifname, "up")
                run("ip", "-n", ns, "link", "set", "lo", "up")
        except Exception:
            self.close()
            raise

    def rx_packets(self, side: str = "b") -> int:
        ns, ifname = (self.ns_b, self.if_b) if side == "b" else (self.ns_a, self.if_a)
        out = run("ip", "netns", "exec", ns, "cat", f"/sys/class/net/{ifname}/statistics/rx_packets").stdout
        return int(out)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for ns in (self.ns_a, self.ns_b):
            run("ip", "netns", "del", ns, check=False)


class PinDir:
    """A private bpffs folder for a benchmark's Meter; removed by ``close``."""

    def __init__(self, tag: str) -> None:
        self.path = f"/sys/fs/bpf/kipfix-bench-{tag}-{os.getpid()}"
        atexit.register(self.close)
        interrupt_on_signals()

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


# ---- printing ------------------------------------------------------------------------

def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def spread(values: list[float], fmt: str = "{:.3g}") -> str:
    return "[" + ", ".join(fmt.format(v) for v in values) + "]"
