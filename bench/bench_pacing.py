"""What pacing buys at a collector's default receive buffer: one drain's burst, back to back and spread.

For each receiver -- kipfix collect with a 64 KiB receive buffer, goflow2 and
pmacct's nfacctd with their defaults (the system's net.core.rmem_default) --
one drain's worth of records (about 140 datagrams of 1400 octets) is handed
to the exporter at once, first with ``pacing: none`` (back to back, as
before), then with ``pacing: spread`` (over 80 % of a 1 s drain interval).
What the receiver's own output holds is compared with what was sent.

    .venv/bin/python bench/bench_pacing.py [--rounds 3] [--datagrams 140]

goflow2 comes from scripts/install.sh --test (~/.cache/kipfix-collectors);
a receiver that is not installed is skipped. Everything runs on loopback in
a temp dir, removed at the end. Not a test: it prints, asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from kipfix.agent.collector.server import Collector
from kipfix.agent.config import CollectorConfig, TemplateConfig
from kipfix.agent.export.ipfix.dummy import dummy_records
from kipfix.agent.export.ipfix.exporter import IpfixExporter
from kipfix.agent.export.sink import MeteringStats

GOFLOW2 = os.path.join(os.environ.get("KIPFIX_COLLECTORS_CACHE", os.path.expanduser("~/.cache/kipfix-collectors")),
                       "bin", "goflow2")
TEMPLATE = ("flowStartMilliseconds", "flowEndMilliseconds", "sourceIPv4Address", "destinationIPv4Address",
            "sourceTransportPort", "destinationTransportPort", "protocolIdentifier", "packetDeltaCount",
            "octetDeltaCount")
RECORDS_PER_DATAGRAM = 30  # 1400-octet messages of this template (16 + 4 + 30 x 45 = 1370)
PACE_WINDOW = 0.8  # the agent spreads over 80 % of its drain interval; here a 1 s one


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


class Receiver:
    name = ""

    def __init__(self, workdir: Path):
        self.dir = workdir / self.name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_udp_port()
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self._log = open(self.dir / "log", "w")
        self.proc = subprocess.Popen(self.command(), stdout=self._log, stderr=subprocess.STDOUT, cwd=self.dir)
        if not wait(lambda: f":{self.port:04X} " in Path("/proc/net/udp").read_text(), 30):
            raise RuntimeError(f"{self.name} is not listening: {(self.dir / 'log').read_text()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self._log.close()

    def lines(self, name: str) -> list[dict]:
        path = self.dir / name
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


class Goflow2(Receiver):
    name = "goflow2"

    def command(self) -> list[str]:
        # one worker: with two, a new exporter's first data can be decoded before its templates
        return [GOFLOW2, "-listen", f"netflow://127.0.0.1:{self.port}?count=1&workers=1", "-format", "json",
                "-transport.file", str(self.dir / "flows.json"), "-addr", "127.0.0.1:0"]

    def packets(self) -> int:
        return sum(int(r.get("packets", 0)) for r in self.lines("flows.json"))


class Nfacctd(Receiver):
    name = "nfacctd"

    def command(self) -> list[str]:
        (self.dir / "nfacctd.conf").write_text("\n".join([
            "daemonize: false", "nfacctd_ip: 127.0.0.1", f"nfacctd_port: {self.port}", "plugins: print",
            "print_output: json", f"print_output_file: {self.dir / 'flows.json'}", "print_output_file_append: true",
            "print_refresh_time: 1", "aggregate: src_host, dst_host, src_port, dst_port, proto", ""]))
        return ["nfacctd", "-f", str(self.dir / "nfacctd.conf")]

    def packets(self) -> int:
        return sum(int(r.get("packets", 0)) for r in self.lines("flows.json"))


class KipfixCollect:
    name = "kipfix collect (64 KiB buffer)"

    def __init__(self, workdir: Path):
        self.collector = Collector(out=None, err=None, keep=False, receive_buffer=32768)  # the kernel doubles it
        self.port = self.collector.port
        self.sent_packets = 0

    def start(self) -> None:
        self.collector.start()

    def stop(self) -> None:
        self.collector.stop()

    def packets(self) -> int:
        return self.collector.data_records  # records, compared with records sent below


def one_burst(receiver_class, workdir: Path, pacing: str, datagrams: int, seed: int) -> tuple[int, int, int]:
    """(datagrams sent, what was sent, what arrived): packets for goflow2/nfacctd, records for kipfix."""
    receiver = receiver_class(workdir)
    receiver.start()
    config = CollectorConfig(f"127.0.0.1:{receiver.port}", "127.0.0.1", receiver.port, "udp", pacing=pacing)
    exporter = IpfixExporter([config], [TemplateConfig(256, TEMPLATE)], 1, pace_window=PACE_WINDOW)
    (session,) = exporter.sessions
    try:
        time.sleep(0.5)  # templates first, like an exporter that has been running
        records = [r for r in dummy_records(datagrams * RECORDS_PER_DATAGRAM * 4 // 3, seed=seed)
                   if r.key.ip_version == 4][:datagrams * RECORDS_PER_DATAGRAM]
        before = session.counters.messages
        exporter.export(records, MeteringStats())
        wait(lambda: session.queued_flows == 0, 30)
        sent_messages = session.counters.messages - before
        sent = len(records) if isinstance(receiver, KipfixCollect) else sum(r.packets for r in records)
        wait(lambda: receiver.packets() >= sent, 4)  # nfacctd prints once a second
        time.sleep(1.5)
        return sent_messages, sent, receiver.packets()
    finally:
        exporter.close(1)
        receiver.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--datagrams", type=int, default=140)
    args = parser.parse_args()
    receivers = [KipfixCollect]
    receivers += [Goflow2] if os.access(GOFLOW2, os.X_OK) else []
    receivers += [Nfacctd] if shutil.which("nfacctd") else []
    print(f"load: {open('/proc/loadavg').read().split()[:3]}; net.core.rmem_default "
          f"{Path('/proc/sys/net/core/rmem_default').read_text().strip()}")
    print(f"{'receiver':<32} {'pacing':<7} {'datagrams':>9} {'sent':>9} {'arrived':>9} {'lost':>7}")
    with tempfile.TemporaryDirectory(prefix="kipfix-pacing-") as tmp:
        for receiver_class in receivers:
            for round_ in range(args.rounds):
                for pacing in ("none", "spread"):
                    messages, sent, arrived = one_burst(receiver_class, Path(tmp) / f"{round_}-{pacing}", pacing,
                                                        args.datagrams, seed=round_)
                    print(f"{receiver_class.name:<32} {pacing:<7} {messages:>9} {sent:>9} {arrived:>9} "
                          f"{100 * (sent - arrived) / sent:>6.1f}%", flush=True)


if __name__ == "__main__":
    main()
