"""Soak: the agent under churn and crashes for a while, then exact totals, and its RSS and fds.

    sudo .venv/bin/python bench/soak.py [--minutes 10] [--agent-kills 2] [--collector-every 60]

A "node" namespace forwards between "pods" and a server namespace. Pods
come and go all the time (a namespace each, a veth into the node, like a
CNI): each sends ICMP, UDP and TCP to the server for its lifetime. The
agent meters every veth of the node and its uplink (``names: [veth*,
up0]``, attached as they appear) and exports JSON lines and IPFIX over UDP
to ``kipfix collect``. Every ``--collector-every`` seconds the collector is
SIGKILLed and restarted 3 s later; the agent is SIGKILLed ``--agent-kills``
times, spread over the run, and restarted on the same pin path.

Ground truth is the kernel's own count: each pod's veth counters read when
its traffic stopped (before its namespace goes), the uplink's at the end
(no ARP, no IPv6: static neighbours, so only metered packets cross). What
the agent says is compared with it at the end:

- JSON lines: equal per interface and direction (the journal across kills);
- IPFIX on the wire (a capture of loopback, decoded): equal per direction,
  minus what the agent logged as in doubt; datagrams the collector's port
  refused while it was down are found by the ICMP errors that quote their
  IPFIX header, and compared with what the agent counted as refused;
- the agent's RSS and open files, sampled every 5 s per incarnation.

Not a test (it takes minutes): it prints, asserts nothing. Cleans up after
itself, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import atexit
import collections
import glob
import json
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from kipfix.agent.export.ipfix.decoder import MalformedMessage, TemplateStore, decode_message

TAG = f"ks{os.getpid() % 100000}"
NODE, SERVER = f"{TAG}node", f"{TAG}srv"
KIPFIX = str(Path(sys.executable).with_name("kipfix"))
TEMPLATE = ["flowStartMilliseconds", "flowEndMilliseconds", "sourceIPv4Address", "destinationIPv4Address",
            "protocolIdentifier", "flowDirection", "ingressInterface", "egressInterface", "packetDeltaCount",
            "octetDeltaCount"]
ETH = 14
UDP_SINK_PORT, TCP_SINK_PORT = 7001, 7002
DOUBT = re.compile(r"(\d+) flows \((\d+) packets, (\d+) octets\) were being sent when the agent was killed")
REFUSED = re.compile(r"(\d+) flows \((\d+) packets, (\d+) octets\) sent while it refused them are lost")

SINKS = f"""
import socket, threading
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("10.201.0.2", {UDP_SINK_PORT}))
t = socket.socket(); t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
t.bind(("10.201.0.2", {TCP_SINK_PORT})); t.listen(64)
def drain(c):
    while c.recv(65536): pass
    c.close()
def accept():
    while True:
        c, _ = t.accept(); threading.Thread(target=drain, args=(c,), daemon=True).start()
threading.Thread(target=accept, daemon=True).start()
while True: u.recv(65536)
"""
POD_TRAFFIC = f"""
import random, socket, sys, time
seconds, seed = float(sys.argv[1]), int(sys.argv[2])
rng = random.Random(seed)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
end = time.monotonic() + seconds
tcp_at = time.monotonic() + rng.uniform(0, seconds / 2)
while time.monotonic() < end:
    u.sendto(b"u" * rng.randrange(1, 1400), ("10.201.0.2", {UDP_SINK_PORT}))
    if time.monotonic() >= tcp_at:
        tcp_at = float("inf")
        with socket.create_connection(("10.201.0.2", {TCP_SINK_PORT})) as t:
            for _ in range(200):
                t.sendall(b"t" * 8192)
    time.sleep(0.01)
"""


def sh(cmd: str, check: bool = True) -> str:
    result = subprocess.run(cmd, shell=True, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise RuntimeError(f"{cmd}: {result.stderr.strip()}")
    return result.stdout


def mac(ns: str, ifname: str) -> str:
    return json.loads(sh(f"ip -n {ns} -j link show dev {ifname}"))[0]["address"]


def counters(ns: str, ifname: str) -> tuple[int, int, int, int]:
    stats = json.loads(sh(f"ip -n {ns} -s -j link show dev {ifname}"))[0]["stats64"]
    return stats["rx"]["packets"], stats["rx"]["bytes"], stats["tx"]["packets"], stats["tx"]["bytes"]


def quiet(ns: str) -> None:
    for knob in ("net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1",
                 "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0"):
        sh(f"ip netns exec {ns} sysctl -qw {knob}")


def link(ns_a: str, if_a: str, ip_a: str, ns_b: str, if_b: str, ip_b: str) -> None:
    """A veth between two namespaces, /24 addresses, static neighbours both ways (no ARP on the wire)."""
    tmp = f"ks{random.randrange(1 << 32):08x}"  # an interface name has at most 15 characters
    sh(f"ip link add {tmp}a type veth peer name {tmp}b")
    sh(f"ip link set {tmp}a netns {ns_a} name {if_a}")
    sh(f"ip link set {tmp}b netns {ns_b} name {if_b}")
    for ns, ifname, ip in ((ns_a, if_a, ip_a), (ns_b, if_b, ip_b)):
        sh(f"ip -n {ns} addr add {ip}/24 dev {ifname}")
        sh(f"ip netns exec {ns} ethtool -K {ifname} tso off gso off gro off")
        sh(f"ip -n {ns} link set {ifname} up")
    sh(f"ip -n {ns_a} neigh replace {ip_b} lladdr {mac(ns_b, if_b)} dev {if_a} nud permanent")
    sh(f"ip -n {ns_b} neigh replace {ip_a} lladdr {mac(ns_a, if_a)} dev {if_b} nud permanent")


class Topology:
    def __init__(self) -> None:
        self.pods: dict[int, dict] = {}
        self.truth: dict[tuple[str, str], list[int]] = collections.defaultdict(lambda: [0, 0])
        self.sinks = None

    def create(self) -> None:
        for ns in (NODE, SERVER):
            sh(f"ip netns add {ns}")
            sh(f"ip -n {ns} link set lo up")
            quiet(ns)
        sh(f"ip netns exec {NODE} sysctl -qw net.ipv4.ip_forward=1")
        link(NODE, "up0", "10.201.0.1", SERVER, "eth0", "10.201.0.2")
        sh(f"ip -n {SERVER} route add 10.200.0.0/16 via 10.201.0.1")
        self.sinks = subprocess.Popen(["ip", "netns", "exec", SERVER, sys.executable, "-c", SINKS])

    def add_pod(self, index: int) -> str:
        ns, veth = f"{TAG}p{index}", f"veth{index}"
        sh(f"ip netns add {ns}")
        sh(f"ip -n {ns} link set lo up")
        quiet(ns)
        subnet = f"10.200.{index % 250}"
        link(ns, "eth0", f"{subnet}.2", NODE, veth, f"{subnet}.1")
        sh(f"ip -n {ns} route add default via {subnet}.1")
        self.pods[index] = {"ns": ns, "veth": veth, "procs": []}
        return veth

    def start_traffic(self, index: int, seconds: float) -> None:
        pod = self.pods[index]
        pod["procs"] = [
            subprocess.Popen(["ip", "netns", "exec", pod["ns"], "ping", "-q", "-i", "0.05", "-w", str(int(seconds)),
                              "10.201.0.2"], stdout=subprocess.DEVNULL),
            subprocess.Popen(["ip", "netns", "exec", pod["ns"], sys.executable, "-c", POD_TRAFFIC, str(seconds),
                              str(index)])]

    def remove_pod(self, index: int) -> None:
        """Stop its traffic, wait for its veth to be quiet, take its counters, delete it."""
        pod = self.pods.pop(index)
        for proc in pod["procs"]:
            proc.kill()
            proc.wait()
        last = None
        while True:
            now = counters(NODE, pod["veth"])
            if now == last:
                break
            last = now
            time.sleep(0.3)
        rx_packets, rx_bytes, tx_packets, tx_bytes = now
        self.truth[(pod["veth"], "ingress")] = [rx_packets, rx_bytes - ETH * rx_packets]
        self.truth[(pod["veth"], "egress")] = [tx_packets, tx_bytes - ETH * tx_packets]
        sh(f"ip netns del {pod['ns']}")

    def finish(self) -> None:
        for index in list(self.pods):
            self.remove_pod(index)
        rx_packets, rx_bytes, tx_packets, tx_bytes = counters(NODE, "up0")
        self.truth[("up0", "ingress")] = [rx_packets, rx_bytes - ETH * rx_packets]
        self.truth[("up0", "egress")] = [tx_packets, tx_bytes - ETH * tx_packets]

    def destroy(self) -> None:
        if self.sinks is not None:
            self.sinks.kill()
        for pod in self.pods.values():
            for proc in pod["procs"]:
                proc.kill()
        for ns in glob.glob(f"/var/run/netns/{TAG}*"):
            sh(f"ip netns del {os.path.basename(ns)}", check=False)


def attached(ifname: str) -> bool:
    return "kipfix" in sh(f"tc -n {NODE} filter show dev {ifname} ingress", check=False)


class Agent:
    def __init__(self, workdir: Path, collector_port: int):
        self.pin = f"/sys/fs/bpf/kipfix-soak-{os.getpid()}"
        self.jsonl = workdir / "flows.jsonl"
        self.config = workdir / "kipfix.yaml"
        self.config.write_text(json.dumps({
            "interfaces": [{"netns": NODE, "names": ["veth*", "up0"]}],
            "collectors": [{"address": f"127.0.0.1:{collector_port}"}],
            "templates": [{"id": 256, "template": TEMPLATE}],
            "timeouts": {"idle": 5, "active": 20}, "drainInterval": 1, "jsonLines": str(self.jsonl),
            "pinPath": self.pin, "metrics": {"enabled": False}}))
        self.logs: list[Path] = []
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None
        self.samples: list[tuple[int, float, int, int]] = []  # (pid, time, RSS KiB, open fds)

    def start(self) -> None:
        log = self.workdir / f"agent-{len(self.logs)}.log"
        self.logs.append(log)
        self._log = open(log, "w")
        self.proc = subprocess.Popen([KIPFIX, "agent", "--config", str(self.config)], stdout=self._log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while "kipfix agent running" not in log.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"agent did not start:\n{log.read_text()}")
            time.sleep(0.1)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self._log.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(120)
            self._log.close()

    def sample(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        pid = self.proc.pid
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            rss = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))
            fds = len(os.listdir(f"/proc/{pid}/fd"))
        except (OSError, StopIteration):
            return
        self.samples.append((pid, time.monotonic(), rss, fds))

    def text(self) -> str:
        return "".join(log.read_text() for log in self.logs if log.exists())

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        shutil.rmtree(self.pin, ignore_errors=True)
        stem = self.pin.replace("/", "_")
        for path in [f"/run/kipfix/netns-ids{stem}.json", *glob.glob(f"/run/kipfix/journal{stem}-*")]:
            if os.path.exists(path):
                os.unlink(path)


class CollectorProcess:
    def __init__(self, workdir: Path, port: int):
        self.workdir, self.port = workdir, port
        self.runs = 0
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.runs += 1
        out = open(self.workdir / f"collected-{self.runs}.jsonl", "w")
        self.proc = subprocess.Popen([KIPFIX, "collect", "--listen", f"127.0.0.1:{self.port}", "--json"],
                                     stdout=out, stderr=subprocess.DEVNULL)
        out.close()
        while f":{self.port:04X} " not in Path("/proc/net/udp").read_text():
            time.sleep(0.05)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def records(self) -> int:
        total = 0
        for path in self.workdir.glob("collected-*.jsonl"):
            for line in path.read_text().splitlines():
                if '"template": 256' in line:
                    total += 1
        return total


def read_pcap(path: Path):
    """(IPv4 protocol, IP payload) of every frame of a libpcap file captured on lo."""
    data = path.read_bytes()
    offset = 24
    while offset + 16 <= len(data):
        _sec, _usec, captured, _length = struct.unpack_from("=IIII", data, offset)
        frame = data[offset + 16:offset + 16 + captured]
        offset += 16 + captured
        if len(frame) < ETH + 20 or frame[12:14] != b"\x08\x00":
            continue
        header = (frame[ETH] & 0x0F) * 4
        yield frame[ETH + 9], frame[ETH + header:]


def wire_totals(pcap: Path, port: int) -> dict:
    """Per direction (packets, octets) in the IPFIX data records sent to ``port``, and those of the
    messages an ICMP port unreachable came back for (refused), by their quoted IPFIX header."""
    messages = []
    refused_headers = set()
    for protocol, payload in read_pcap(pcap):
        if protocol == 17 and struct.unpack_from("!H", payload, 2)[0] == port:
            messages.append(payload[8:])
        elif protocol == 1 and payload[0] == 3 and payload[1] == 3:  # ICMP port unreachable
            inner = payload[8:]
            header = (inner[0] & 0x0F) * 4
            if inner[9] == 17 and struct.unpack_from("!H", inner, header + 2)[0] == port:
                refused_headers.add(bytes(inner[header + 8:header + 8 + 16]))
    store = TemplateStore()
    totals = {"sent": collections.Counter(), "refused": collections.Counter(), "messages": len(messages),
              "refused_messages": 0, "malformed": 0}
    for message in messages:
        try:
            decoded = decode_message(message, store, "agent")
        except MalformedMessage:
            totals["malformed"] += 1
            continue
        refused = message[:16] in refused_headers
        totals["refused_messages"] += refused
        for record in decoded.data_records:
            direction = "egress" if record.values["flowDirection"] else "ingress"
            for kind in ("sent",) + (("refused",) if refused else ()):
                totals[kind][(direction, "packets")] += record.values["packetDeltaCount"]
                totals[kind][(direction, "octets")] += record.values["octetDeltaCount"]
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--agent-kills", type=int, default=2)
    parser.add_argument("--collector-every", type=float, default=60)
    parser.add_argument("--pods", type=int, default=6, help="pods alive at once")
    parser.add_argument("--pod-seconds", type=float, default=30, help="lifetime of a pod's traffic")
    args = parser.parse_args()
    duration = args.minutes * 60
    workdir = Path(tempfile.mkdtemp(prefix="kipfix-soak-"))
    topo = Topology()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    agent = Agent(workdir, port)
    collector = CollectorProcess(workdir, port)
    capture = None

    def cleanup() -> None:
        if capture is not None and capture.poll() is None:
            capture.kill()
        if collector.proc is not None and collector.proc.poll() is None:
            collector.proc.kill()
        agent.cleanup()
        topo.destroy()
    atexit.register(cleanup)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))

    print(f"soak: {args.minutes:g} min, {args.pods} pods of {args.pod_seconds:g} s, collector SIGKILLed every "
          f"{args.collector_every:g} s, agent SIGKILLed {args.agent_kills} times; work dir {workdir}", flush=True)
    print(f"load at start: {open('/proc/loadavg').read().split()[:3]}", flush=True)
    topo.create()
    pcap = workdir / "ipfix.pcap"
    capture_log = workdir / "dumpcap.log"
    with open(capture_log, "w") as log:  # a file: its running counts would fill a pipe
        capture = subprocess.Popen(["dumpcap", "-i", "lo", "-P", "-B", "64", "-f", f"udp port {port} or icmp",
                                    "-w", str(pcap)], stdout=subprocess.DEVNULL, stderr=log)
    while "Capturing on" not in capture_log.read_text():
        if capture.poll() is not None:
            raise RuntimeError(f"dumpcap: {capture_log.read_text()}")
        time.sleep(0.1)
    collector.start()
    agent.start()
    started = time.monotonic()
    kills_at = [started + duration * (i + 1) / (args.agent_kills + 1) + 7 for i in range(args.agent_kills)]
    next_collector_kill = started + args.collector_every
    collector_back_at = None
    next_sample = started
    next_pod = started
    index = 0
    events = collections.Counter()
    while time.monotonic() < started + duration:
        now = time.monotonic()
        if now >= next_sample:
            agent.sample()
            next_sample = now + 5
        if collector_back_at is None and now >= next_collector_kill:
            collector.kill()
            events["collector kills"] += 1
            collector_back_at = now + 3
        if collector_back_at is not None and now >= collector_back_at:
            collector.start()
            collector_back_at = None
            next_collector_kill = now + args.collector_every - 3
        if kills_at and now >= kills_at[0]:
            kills_at.pop(0)
            agent.kill()
            events["agent kills"] += 1
            agent.start()
        if now >= next_pod:
            oldest = [i for i in topo.pods if now - topo.pods[i]["born"] >= args.pod_seconds]
            for old in oldest:
                topo.remove_pod(old)
                events["pods deleted"] += 1
            if len(topo.pods) < args.pods:
                veth = topo.add_pod(index)
                topo.pods[index]["born"] = time.monotonic()
                deadline = time.monotonic() + 60
                while not attached(veth) and time.monotonic() < deadline:
                    time.sleep(0.05)  # metered from its first packet on
                topo.start_traffic(index, args.pod_seconds)
                events["pods created"] += 1
                index += 1
            next_pod = time.monotonic() + args.pod_seconds / args.pods
        time.sleep(0.05)
    if collector_back_at is not None:
        collector.start()
    topo.finish()
    time.sleep(2)
    agent.sample()
    agent.stop()
    time.sleep(3)  # the collector gets the last messages
    capture.send_signal(signal.SIGINT)
    capture.wait(60)
    capture_err = capture_log.read_text().replace("\r", "\n")
    collector.kill()

    # ---- figures -------------------------------------------------------------------------
    print(f"load at end: {open('/proc/loadavg').read().split()[:3]}; {dict(events)}")
    print(f"capture: {' '.join(line for line in capture_err.splitlines() if 'dropped' in line)}")
    records = [json.loads(line) for line in agent.jsonl.read_text().splitlines() if line.strip()]
    jsonl = collections.defaultdict(lambda: [0, 0])
    for record in records:
        jsonl[(record["interface"], record["direction"])][0] += record["packets"]
        jsonl[(record["interface"], record["direction"])][1] += record["octets"]
    truth = {k: tuple(v) for k, v in topo.truth.items()}
    wrong = {k: (tuple(jsonl.get(k, (0, 0))), v) for k, v in truth.items() if tuple(jsonl.get(k, (0, 0))) != v}
    extra = set(jsonl) - set(truth)
    total = [sum(v[0] for v in truth.values()), sum(v[1] for v in truth.values())]
    print(f"truth: {len(truth)} interface directions, {total[0]} packets, {total[1]} IP octets")
    print(f"JSON lines: {len(records)} records; interface directions that differ from the truth: {len(wrong)} "
          f"{dict(list(wrong.items())[:5])}; not in the truth: {sorted(extra)[:5]}")
    text = agent.text()
    doubt = [sum(int(m[1]) for m in DOUBT.findall(text)), sum(int(m[2]) for m in DOUBT.findall(text))]
    refused_logged = [sum(int(m[1]) for m in REFUSED.findall(text)), sum(int(m[2]) for m in REFUSED.findall(text))]
    wire = wire_totals(pcap, port)
    for direction in ("ingress", "egress"):
        want = [sum(v[i] for (_, d), v in truth.items() if d == direction) for i in (0, 1)]
        got = [wire["sent"][(direction, "packets")], wire["sent"][(direction, "octets")]]
        print(f"IPFIX on the wire, {direction}: {got[0]} packets, {got[1]} octets; truth {want[0]} / {want[1]}; "
              f"difference {want[0] - got[0]} / {want[1] - got[1]}")
    refused_wire = [wire["refused"][("ingress", "packets")] + wire["refused"][("egress", "packets")],
                    wire["refused"][("ingress", "octets")] + wire["refused"][("egress", "octets")]]
    print(f"  {wire['messages']} messages ({wire['malformed']} undecodable); in doubt at the agent kills: "
          f"{doubt[0]} packets, {doubt[1]} octets")
    print(f"  refused at the collector's closed port: {wire['refused_messages']} messages, {refused_wire[0]} "
          f"packets, {refused_wire[1]} octets (ICMP errors on the wire); the agent counted {refused_logged[0]} "
          f"packets, {refused_logged[1]} octets")
    print(f"kipfix collect (killed {collector.runs - 1} times) printed {collector.records()} data records")
    by_pid = collections.defaultdict(list)
    for pid, when, rss, fds in agent.samples:
        by_pid[pid].append((when, rss, fds))
    for pid, samples in by_pid.items():
        steady = samples[len(samples) // 5:] or samples  # after the first fifth: start-up is over
        print(f"agent pid {pid}: {len(samples)} samples over {samples[-1][0] - samples[0][0]:.0f} s; RSS "
              f"{min(s[1] for s in steady) / 1024:.1f}..{max(s[1] for s in steady) / 1024:.1f} MiB "
              f"(first {steady[0][1] / 1024:.1f}, last {steady[-1][1] / 1024:.1f}); open fds "
              f"{min(s[2] for s in steady)}..{max(s[2] for s in steady)} (first {steady[0][2]}, last "
              f"{steady[-1][2]})")
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
