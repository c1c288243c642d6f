"""Data-path cost of kipfix: veth throughput with and without metering, and ns per packet.

Two scratch namespaces joined by a veth pair. Each round runs, in
alternating order, the same iperf3 test with nothing attached ("off") and
with kipfix's programs on ingress and egress of both veth ends ("on"):

- TCP throughput (receiver's bits/s),
- 64-byte UDP packet rate (also with an empty program on the same hooks):
  iperf3 -u -l 18 -b 0, so every IP packet is
  46 octets and every frame 60 (+ FCS = 64); the rate is what the receiving
  veth counted (its rx_packets) divided by iperf3's send time.

Then, with ``kernel.bpf_stats_enabled=1`` (set back afterwards), a short
"on" run of each gives the kernel's own run_time_ns / run_cnt of the two
programs: nanoseconds per packet (per skb for TCP, where GSO makes one skb
stand for many segments). The same UDP run with an empty program (returns
TC_ACT_UNSPEC) on the same hooks is the baseline: what bpf_stats reports
for doing nothing. A last, synthetic figure runs both programs a million
times on one frame with BPF_PROG_TEST_RUN (warm caches, no bpf_stats).
bpf_stats itself costs two clock reads per run, so it is
off during the throughput runs.

Run as root:  .venv/bin/python bench/bench_datapath.py [--duration 3] [--rounds 6]  (about 2 minutes)
Prints ratios measured in this run and PASS/MISS against the issue's targets;
it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import BpfStats, PinDir, VethPair, median, prog_stats, spread, test_run, udp_frame, verdict  # noqa: E402

from kipfix.agent.datapath import tc  # noqa: E402
from kipfix.agent.datapath.meter import Meter  # noqa: E402

TARGET_NS_PER_PACKET = 50.0
TARGET_TCP_RATIO = 0.95
TARGET_PPS_RATIO = 0.90
UDP_PAYLOAD = 18  # + 8 UDP + 20 IPv4 = 46-octet packet, 60-octet frame + 4 FCS = 64
SERVER_CPU, CLIENT_CPU = "1", "0"
# Named kipfix_* so tc.detach recognises (and removes) its filters.
EMPTY_FUNCTION = "kipfix_empty"
EMPTY_PROGRAM = """
#include <uapi/linux/pkt_cls.h>
int kipfix_empty(struct __sk_buff *skb) { return TC_ACT_UNSPEC; }
"""


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.pins = PinDir("datapath")
        self.veth = VethPair("dp")
        self.state_file = os.path.join(tempfile.mkdtemp(prefix="kipfix-bench-"), "tc-state.json")
        self.meter = Meter(args.max_flows, self.pins.path)
        self.programs = tc.Programs(self.meter.ingress_fd, self.meter.egress_fd)
        # Baseline for the per-packet figure: a program that does nothing, measured the same way.
        from bcc import BPF

        self._empty_bpf = BPF(text=EMPTY_PROGRAM)
        empty_fd = self._empty_bpf.load_func(EMPTY_FUNCTION, BPF.SCHED_CLS).fd
        self.empty_programs = tc.Programs(empty_fd, empty_fd, ingress_name=EMPTY_FUNCTION,
                                          egress_name=EMPTY_FUNCTION)
        self.attached: str | None = None
        self.server = subprocess.Popen(
            ["ip", "netns", "exec", self.veth.ns_b, "iperf3", "-s", "-B", self.veth.ip_b, "-A", SERVER_CPU],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def close(self) -> None:
        try:
            if self.attached:
                self.detach()
        finally:
            self.server.terminate()
            try:
                self.server.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.server.kill()
            self.meter.close()
            self._empty_bpf.cleanup()
            self.pins.close()
            self.veth.close()
            try:
                os.unlink(self.state_file)
                os.rmdir(os.path.dirname(self.state_file))
            except OSError:
                pass

    # -- what is attached: None, "kipfix" or "empty" ------------------------------------

    def attach(self, mode: str) -> None:
        programs = self.programs if mode == "kipfix" else self.empty_programs
        for ns, ifname in ((self.veth.ns_a, self.veth.if_a), (self.veth.ns_b, self.veth.if_b)):
            tc.attach(ns, ifname, programs, state_file=self.state_file)
        self.attached = mode

    def detach(self) -> None:
        for ns, ifname in ((self.veth.ns_a, self.veth.if_a), (self.veth.ns_b, self.veth.if_b)):
            tc.detach(ns, ifname, state_file=self.state_file)
        self.attached = None

    def metering(self, mode: str | bool | None) -> None:
        mode = "kipfix" if mode is True else (mode or None)
        if self.attached == mode:
            return
        if self.attached:
            self.detach()
        if mode:
            self.attach(mode)

    # -- iperf3 --------------------------------------------------------------------

    def iperf(self, *extra: str, seconds: float) -> dict:
        argv = ["ip", "netns", "exec", self.veth.ns_a, "iperf3", "-c", self.veth.ip_b, "-J",
                "-A", CLIENT_CPU, "-t", str(seconds), *extra]
        for attempt in range(20):  # the server may still be starting, or finishing the last test
            result = subprocess.run(argv, capture_output=True, text=True)
            report = json.loads(result.stdout or "{}")
            if result.returncode == 0 and "error" not in report:
                return report
            time.sleep(0.25)
        raise RuntimeError(f"iperf3 failed: {report.get('error') or result.stderr.strip()}")

    def tcp(self, seconds: float) -> float:
        """Receiver's TCP throughput, Gbit/s."""
        return self.iperf(seconds=seconds)["end"]["sum_received"]["bits_per_second"] / 1e9

    def udp(self, seconds: float) -> tuple[float, float, int]:
        """64-byte UDP: (kpps counted by the receiving veth, kpps the iperf3 server read, rx packets)."""
        before = self.veth.rx_packets("b")
        report = self.iperf("-u", "-l", str(UDP_PAYLOAD), "-b", "0", seconds=seconds)
        rx = self.veth.rx_packets("b") - before
        sent, received = report["end"]["sum_sent"], report["end"]["sum_received"]
        app_packets = received["packets"] - received["lost_packets"]
        return rx / sent["seconds"] / 1e3, app_packets / received["seconds"] / 1e3, rx

    # -- kernel time per packet ----------------------------------------------------------

    def kernel_ns(self, test, seconds: float, mode: str = "kipfix") -> tuple[float, float, float, int]:
        """(ingress ns/run, egress ns/run, both ns/run, runs) over one run with bpf_stats on."""
        programs = self.programs if mode == "kipfix" else self.empty_programs
        fds = (programs.ingress_fd, programs.egress_fd)
        if fds[0] == fds[1]:
            fds = fds[:1]
        self.metering(mode)
        with BpfStats():
            before = [prog_stats(fd) for fd in fds]
            test(seconds)
            after = [prog_stats(fd) for fd in fds]
        times = [a.run_time_ns - b.run_time_ns for a, b in zip(after, before)]
        runs = [a.run_cnt - b.run_cnt for a, b in zip(after, before)]
        per = [t / r if r else float("nan") for t, r in zip(times, runs)]
        return per[0], per[-1], sum(times) / max(sum(runs), 1), sum(runs)

    def metered_packets_at_receiver(self) -> int:
        """Packets kipfix counted on the receiving veth's ingress for traffic to it (drains the table)."""
        ifindex = int(subprocess.run(["ip", "netns", "exec", self.veth.ns_b, "cat",
                                      f"/sys/class/net/{self.veth.if_b}/ifindex"],
                                     capture_output=True, text=True, check=True).stdout)
        dst = bytes(int(x) for x in self.veth.ip_b.split("."))
        return sum(c.packets for _, k, c in self.meter.drain()
                   if k.ifindex == ifindex and k.direction == 0 and k.dst == dst)


def synthetic_ns(bench: "Bench", rounds: int, repeat: int) -> tuple[list[int], list[int]]:
    """BPF_PROG_TEST_RUN on one 64-byte UDP frame, kipfix ingress vs the empty program, alternating."""
    frame = udp_frame(bench.veth.ip_a, bench.veth.ip_b, 40000, 5201, bytes(UDP_PAYLOAD))
    kipfix, empty = [], []
    for _ in range(rounds):
        kipfix.append(test_run(bench.meter.ingress_fd, frame, repeat))
        empty.append(test_run(bench.empty_programs.ingress_fd, frame, repeat))
    bench.meter.drain()
    return kipfix, empty


# --breakdown: what the kipfix program's main parts cost alone on this machine.
BREAKDOWN_PROGRAM = """
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
struct key48 { __u8 b[48]; };
struct value48 { __u64 a[6]; };
BPF_TABLE("percpu_hash", struct key48, struct value48, table, 1024);
int kipfix_b_empty(struct __sk_buff *skb) { return TC_ACT_UNSPEC; }
int kipfix_b_ktime(struct __sk_buff *skb) { return bpf_ktime_get_ns() ? TC_ACT_UNSPEC : 1; }
int kipfix_b_coarse(struct __sk_buff *skb) { return bpf_ktime_get_coarse_ns() ? TC_ACT_UNSPEC : 1; }
int kipfix_b_lookup(struct __sk_buff *skb) {
    struct key48 key = {};
    key.b[0] = skb->len;
    struct value48 *v = table.lookup(&key);
    if (!v) {
        struct value48 zero = {};
        table.update(&key, &zero);
        return TC_ACT_UNSPEC;
    }
    v->a[0]++;
    return TC_ACT_UNSPEC;
}
"""
BREAKDOWN = (("kipfix_b_empty", "empty program"), ("kipfix_b_ktime", "one bpf_ktime_get_ns()"),
             ("kipfix_b_coarse", "one bpf_ktime_get_coarse_ns()"),
             ("kipfix_b_lookup", "one per-CPU hash lookup+increment, 48-octet key"))


def breakdown(bench: "Bench", rounds: int, repeat: int) -> list[tuple[str, float]]:
    from bcc import BPF

    bpf = BPF(text=BREAKDOWN_PROGRAM)
    try:
        frame = udp_frame(bench.veth.ip_a, bench.veth.ip_b, 40000, 5201, bytes(UDP_PAYLOAD))
        fds = [(label, bpf.load_func(name, BPF.SCHED_CLS).fd) for name, label in BREAKDOWN]
        fds.append(("kipfix_ingress (the whole program)", bench.meter.ingress_fd))
        runs = {label: [] for label, _ in fds}
        for _ in range(rounds):
            for label, fd in fds:
                runs[label].append(test_run(fd, frame, repeat))
        bench.meter.drain()
        return [(label, median(values)) for label, values in runs.items()]
    finally:
        bpf.cleanup()


def noise(baseline: list[float]) -> str:
    """A warning when the baseline runs alone vary more than the targets' margins."""
    if len(baseline) < 2:
        return ""
    swing = (max(baseline) - min(baseline)) / median(baseline)
    return f"  (off runs alone vary by {swing:.0%}: treat as noisy)" if swing > 0.10 else ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=3, help="seconds per throughput run (default 3)")
    parser.add_argument("--rounds", type=int, default=6, help="off/on pairs per test (default 6)")
    parser.add_argument("--stats-duration", type=float, default=1,
                        help="seconds of each bpf_stats run per round (default 1)")
    parser.add_argument("--max-flows", type=int, default=65536)
    parser.add_argument("--breakdown", action="store_true",
                        help="also time the program's parts alone (clock read, hash lookup) with BPF_PROG_TEST_RUN")
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("needs root (namespaces, tc, bpf)")

    started = time.monotonic()
    load_start = f"{os.getloadavg()[0]:.2f}"
    bench = Bench(args)
    tcp = {False: [], True: []}
    pps = {False: [], True: [], "empty": []}
    app_pps = {False: [], True: [], "empty": []}
    udp_ns, tcp_ns, udp_split, empty_ns = [], [], [], []
    checks = []
    try:
        # Warm-up (ARP, iperf3 server, page cache), not counted.
        bench.tcp(1)
        bench.udp(1)
        for rnd in range(args.rounds):
            order = (False, True) if rnd % 2 == 0 else (True, False)
            for on in order:
                bench.metering(on)
                tcp[on].append(bench.tcp(args.duration))
            # the empty program next to the pair: what clsact + cls_bpf cost with no work at all
            for on in (*order, "empty") if rnd % 2 == 0 else ("empty", *order):
                bench.metering(on)
                if on is True:
                    bench.meter.drain()
                wire, app, rx = bench.udp(args.duration)
                pps[on].append(wire)
                app_pps[on].append(app)
                if on is True:
                    checks.append((bench.metered_packets_at_receiver(), rx))
            ing, egr, both, _ = bench.kernel_ns(bench.udp, args.stats_duration)
            udp_ns.append(both)
            udp_split.append((ing, egr))
            tcp_ns.append(bench.kernel_ns(bench.tcp, args.stats_duration)[2])
            empty_ns.append(bench.kernel_ns(bench.udp, args.stats_duration, "empty")[2])
            bench.metering(False)
            print(f"round {rnd + 1}/{args.rounds}: TCP off/on {tcp[False][-1]:.2f}/{tcp[True][-1]:.2f} Gbit/s, "
                  f"UDP64 off/on {pps[False][-1]:.0f}/{pps[True][-1]:.0f} kpps, "
                  f"{udp_ns[-1]:.1f} ns/packet (empty program {empty_ns[-1]:.1f})", flush=True)
        bench.metering(False)
        synth_kipfix, synth_empty = synthetic_ns(bench, args.rounds, 1_000_000)
        parts = breakdown(bench, args.rounds, 1_000_000) if args.breakdown else []
        unmetered = bench.meter.tables.unmetered()
    finally:
        bench.close()

    # Each round's on and off runs are adjacent in time, so their ratio cancels slow drift
    # (other load on the machine); the headline is the median of those paired ratios.
    tcp_pairs = [on / off for on, off in zip(tcp[True], tcp[False])]
    pps_pairs = [on / off for on, off in zip(pps[True], pps[False])]
    app_pairs = [on / off for on, off in zip(app_pps[True], app_pps[False])]
    empty_pairs = [empty / off for empty, off in zip(pps["empty"], pps[False])]
    tcp_ratio, pps_ratio, app_ratio = median(tcp_pairs), median(pps_pairs), median(app_pairs)
    ns = median(udp_ns)
    print()
    print("== kipfix data path benchmark ==")
    print(f"veth pair between two netns; 'on' = kipfix on ingress+egress of both ends, 'off' = nothing attached; "
          f"{args.rounds} interleaved rounds of {args.duration:g} s; {os.cpu_count()} CPUs; "
          f"kernel {platform.release()}")
    print(f"TCP throughput (Gbit/s)        off {median(tcp[False]):7.2f} {spread(tcp[False])}  "
          f"on {median(tcp[True]):7.2f} {spread(tcp[True])}")
    print(f"  ratio on/off {tcp_ratio:.3f} (median of per-round ratios {spread(tcp_pairs, '{:.2f}')}; ratio of medians "
          f"{median(tcp[True]) / median(tcp[False]):.3f})   target >= {TARGET_TCP_RATIO}  "
          f"{verdict(tcp_ratio >= TARGET_TCP_RATIO)}{noise(tcp[False])}")
    print(f"64-byte UDP rate, receiving veth (kpps)  off {median(pps[False]):7.1f} {spread(pps[False])}  "
          f"on {median(pps[True]):7.1f} {spread(pps[True])}")
    print(f"  ratio on/off {pps_ratio:.3f} (median of per-round ratios {spread(pps_pairs, '{:.2f}')}; ratio of medians "
          f"{median(pps[True]) / median(pps[False]):.3f})   target >= {TARGET_PPS_RATIO}  "
          f"{verdict(pps_ratio >= TARGET_PPS_RATIO)}{noise(pps[False])}")
    print(f"  baseline, the empty program on the same hooks: {median(pps['empty']):.1f} kpps "
          f"{spread(pps['empty'])}, ratio empty/off {median(empty_pairs):.3f} (per round "
          f"{spread(empty_pairs, '{:.2f}')}): the share of the ratio that is clsact + cls_bpf, not kipfix's work")
    print(f"64-byte UDP rate, read by iperf3 server (kpps)  off {median(app_pps[False]):7.1f}  "
          f"on {median(app_pps[True]):7.1f}  ratio {app_ratio:.3f} (for reference: the server also drops "
          f"what its socket cannot take)")
    print(f"kernel time per packet, 64-byte UDP (bpf_stats run_time_ns/run_cnt, both programs): median {ns:.1f} ns "
          f"{spread(udp_ns, '{:.1f}')}   target <= {TARGET_NS_PER_PACKET:g} ns  {verdict(ns <= TARGET_NS_PER_PACKET)}")
    print("  ingress/egress per round: " + ", ".join(f"{i:.1f}/{e:.1f}" for i, e in udp_split))
    print(f"  baseline, a program that only returns TC_ACT_UNSPEC, same hooks and traffic: median "
          f"{median(empty_ns):.1f} ns {spread(empty_ns, '{:.1f}')}; kipfix over it: {ns - median(empty_ns):.1f} ns, "
          f"ratio {ns / median(empty_ns):.2f}")
    sk, se = median(synth_kipfix), median(synth_empty)
    print(f"  synthetic, BPF_PROG_TEST_RUN x1,000,000 of one 64-byte UDP frame (no bpf_stats, warm caches): kipfix "
          f"{sk:.0f} ns {spread(synth_kipfix, '{:.0f}')}, empty program {se:.0f} ns {spread(synth_empty, '{:.0f}')}; "
          f"kipfix over it {sk - se:.0f} ns, ratio {sk / se:.2f}")
    if parts:
        floor = parts[0][1]
        print("  breakdown, BPF_PROG_TEST_RUN ns per run (over the empty program): "
              + "; ".join(f"{label} {value:.0f} ({value - floor:+.0f})" for label, value in parts))
    print(f"kernel time per skb, TCP (one skb may be many GSO segments): median {median(tcp_ns):.1f} ns "
          f"{spread(tcp_ns, '{:.1f}')}")
    print("cross-check, packets to the receiver in each metered UDP run, kipfix ingress count vs veth rx_packets: "
          + ", ".join(f"{m}/{r}" for m, r in checks)
          + f" (rx_packets also counts ARP, which is not metered); unmetered (table full): {unmetered[0]}")
    print(f"load average at start/end: {load_start} / {os.getloadavg()[0]:.2f} (other work on the machine widens "
          f"the spread)")
    print(f"(whole run {time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; cleaned up", file=sys.stderr)
        sys.exit(130)
