"""End to end: N flows in the kernel table -> IPFIX datagrams on the wire.

Fills the metering program's active table with N distinct flows (written
directly with BPF_MAP_UPDATE_BATCH, as bench_drain.py does: no packets),
then runs the agent's own pipeline once, timing each stage: swap and drain
(kernel -> flow tuples), flow cache (ingest, then forced end of every flow
-> records), IPFIX export (encode, frame and send over UDP to a receiver on
loopback, until the exporter's queue is empty). The receiver counts the
datagrams it gets, as a check. Baseline in the same run: the drain stage
alone, so the shares show where the time goes.

Usage: sudo .venv/bin/python bench/bench_export.py [--flows N] [--template minimal|full]
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_drain import FILL_BATCH, active_table, make_keys, make_value  # noqa: E402
from common import PinDir, update_batch  # noqa: E402

from kipfix.agent.config import CollectorConfig, TemplateConfig  # noqa: E402
from kipfix.agent.flows.cache import FlowCache  # noqa: E402
from kipfix.agent.flows.gcpause import gc_paused  # noqa: E402
from kipfix.agent.export.ipfix.exporter import IpfixExporter  # noqa: E402
from kipfix.agent.export.ipfix.fields import fillable_names  # noqa: E402
from kipfix.agent.datapath.kernelflow import KEY, VALUE_STRIDE  # noqa: E402
from kipfix.agent.datapath.meter import Meter  # noqa: E402
from kipfix.agent.export.sink import MeteringStats  # noqa: E402

MINIMAL = ["flowEndMilliseconds", "flowStartMilliseconds", "octetDeltaCount", "packetDeltaCount", "ipVersion",
           "flowDirection", "sourceIPv4Address", "destinationIPv4Address"]


class Receiver:
    """Counts UDP datagrams and octets on a loopback port until stopped."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 20)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.5)
        self.port = self.sock.getsockname()[1]
        self.datagrams = self.octets = 0
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop:
            try:
                data = self.sock.recv(65535)
            except socket.timeout:
                continue
            self.datagrams += 1
            self.octets += len(data)

    def stop(self):
        self._stop = True
        self._thread.join()
        self.sock.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--flows", type=int, default=1_000_000)
    parser.add_argument("--template", choices=["minimal", "full"], default="minimal")
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("needs root (bpf)")
    n = args.flows
    fields = MINIMAL if args.template == "minimal" else fillable_names()

    pins = PinDir("export")
    meter = Meter(n, pins.path)
    receiver = Receiver()
    exporter = None
    try:
        tables = meter.tables
        keys = make_keys(n)
        value, _packets = make_value(tables.cpus, one_cpu=True)
        stride = VALUE_STRIDE * tables.cpus
        table = active_table(tables)
        values = value * min(n, FILL_BATCH)
        for start in range(0, n, FILL_BATCH):
            count = min(FILL_BATCH, n - start)
            update_batch(table.fd, keys[start * KEY.size:(start + count) * KEY.size], values[:count * stride], count)

        collector = CollectorConfig(address=f"127.0.0.1:{receiver.port}", host="127.0.0.1", port=receiver.port,
                                    queue_size=n + 1)
        exporter = IpfixExporter([collector], [TemplateConfig(256, tuple(fields))], 1)
        cache = FlowCache(idle_timeout=15, active_timeout=60, capacity=n + 1)

        t0 = time.perf_counter()
        flows = meter.drain()
        t1 = time.perf_counter()
        with gc_paused():  # as the daemon's cycle does
            cache.ingest(flows)
            records = cache.flush()
        t2 = time.perf_counter()
        exporter.export(records, MeteringStats())
        exporter.close(timeout=600)
        t3 = time.perf_counter()
        counters = next(iter(exporter.counters().values()))
        time.sleep(0.5)
    finally:
        receiver.stop()
        meter.close()
        pins.close()

    total = t3 - t0
    print(f"== kipfix end-to-end export: {n:,} flows in the kernel table -> IPFIX over UDP on loopback "
          f"({args.template} template, {len(fields)} elements) ==")
    print(f"total {total:.2f} s = {n / total:,.0f} records/s   ({len(records):,} records exported)")
    for name, seconds in (("swap + drain + decode (baseline)", t1 - t0), ("flow cache: ingest + forced end", t2 - t1),
                          ("IPFIX encode + send", t3 - t2)):
        print(f"  {name:<34} {seconds:6.2f} s  {n / seconds:>12,.0f} records/s  share {seconds / total:5.1%}  "
              f"x{seconds / (t1 - t0):.2f} of the drain")
    print(f"exporter: {counters.messages:,} messages, {counters.records:,} records, {counters.octets:,} octets sent; "
          f"{counters.not_sent_flows:,} flows not sent")
    print(f"receiver on loopback got {receiver.datagrams:,} datagrams, {receiver.octets:,} octets "
          "(a Python receiver may fall behind; the exporter's counters are what left)")
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
