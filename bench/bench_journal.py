"""What the crash journal costs per drain, against the flow cache's own ingest of the same flows.

    .venv/bin/python bench/bench_journal.py [--flows 1000 65536 1000000] [--runs 3]

For each size N, a flow cache holds N flows. Then, each measured against
the ingest that made the change (the baseline, in the same run):

- a drain that touches all N flows, and its commit: a delta of N rows;
- a drain that touches 1 % of them (the usual case: most cached flows wait
  for their idle timeout), and its delta;
- a checkpoint of all N (every so often: when the log outgrew the journal);
- loading and restoring the journal, what a restarted agent pays once.

No root needed: the journal goes to a temp dir under /run (tmpfs, as the
agent's) if writable, else /tmp.
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import tempfile
import time

from kipfix.agent.flows.cache import FlowCache
from kipfix.agent.flows.gcpause import gc_paused
from kipfix.agent.flows.journal import Journal, JournalState
from kipfix.agent.flows.record import FlowCounters, FlowKey


def flows(count: int) -> list:
    now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    out = []
    for i in range(count):
        key = FlowKey(2 + i % 8, i % 2, 4, 6, (167772160 + i).to_bytes(4, "big"), b"\x0a\x00\x00\x01",
                      1024 + i % 60000, 443)
        out.append((1, key, FlowCounters(1 + i % 50, 100 + i % 1400, now, now, 0x18, 64, 64, 0)))
    return out


def timed(function) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--flows", type=int, nargs="+", default=[1000, 65536, 1_000_000])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    base = "/run" if os.access("/run", os.W_OK) else None
    print(f"load: {open('/proc/loadavg').read().split()[:3]}; journal in {base or tempfile.gettempdir()}")
    print(f"{'flows':>9}  {'all touched: ingest / delta':>28}  {'1 % touched: ingest / delta':>28}  "
          f"{'checkpoint':>10} {'MB':>5}  {'load+restore':>12}")
    with tempfile.TemporaryDirectory(prefix="kipfix-journal-bench-", dir=base) as tmp:
        for count in args.flows:
            drained = flows(count)
            few = drained[::100]
            figures = collections.defaultdict(list)
            for run in range(args.runs):
                journal = Journal(os.path.join(tmp, f"journal-{count}-{run}"))
                cache = FlowCache(15, 60, count + 1)
                with gc_paused():
                    figures["ingest"].append(timed(lambda: cache.ingest(drained)))
                    figures["checkpoint"].append(timed(lambda: journal.checkpoint(
                        JournalState((1,), cache.snapshot(), [], {}, tuple(cache.held), {}))))
                    size = os.path.getsize(journal.path) / 1e6

                    def delta():
                        changed, removed = cache.take_changes()
                        journal.append(JournalState((2,), changed, [], {}, tuple(cache.held), {}, removed))
                    figures["ingest all"].append(timed(lambda: cache.ingest(drained)))
                    figures["delta all"].append(timed(delta))
                    figures["ingest few"].append(timed(lambda: cache.ingest(few)))
                    figures["delta few"].append(timed(delta))
                    figures["load"].append(timed(lambda: FlowCache(15, 60, count + 1).restore(journal.load().cache)))
                journal.remove()
            m = {k: statistics.median(v) for k, v in figures.items()}
            print(f"{count:>9}  {m['ingest all']:>9.4f} s / {m['delta all']:>7.4f} s ({m['delta all'] / m['ingest all']:>4.1f}x)"
                  f"  {m['ingest few']:>9.4f} s / {m['delta few']:>7.4f} s ({m['delta few'] / m['ingest few']:>4.1f}x)"
                  f"  {m['checkpoint']:>8.3f} s {size:>5.1f}  {m['load']:>10.3f} s", flush=True)


if __name__ == "__main__":
    main()
