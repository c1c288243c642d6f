"""The IPFIX collectors users run, started for real: goflow2, nfdump's nfcapd, pmacct's nfacctd.

Each listens on a loopback UDP port in a temp dir, logs to a file, and after
``stop()`` gives its records as plain dicts (its own field names) from its
own output: goflow2's JSON lines, `nfdump -o json` of nfcapd's file, and
nfacctd's print plugin (JSON, aggregated per key, summed over its refresh
intervals). goflow2 is built by tests/interop/build-goflow2.sh
(scripts/install.sh --test) into ~/.cache/kipfix-collectors.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
from pathlib import Path

from agentproc import wait_for

GOFLOW2 = os.path.join(os.environ.get("KIPFIX_COLLECTORS_CACHE", os.path.expanduser("~/.cache/kipfix-collectors")),
                       "bin", "goflow2")
# Lines that mean a collector could not read something kipfix sent.
ERROR_WORDS = re.compile(r"error|warn|fail|invalid|malformed|skip|unknown template|drop", re.IGNORECASE)


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class CollectorProcess:
    name = "collector"

    def __init__(self, workdir: Path):
        self.dir = workdir / self.name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_udp_port()
        self.log_path = self.dir / "log"
        self.proc: subprocess.Popen | None = None
        self.errors: list[str] = []  # error lines its log had when it was asked to stop

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> "CollectorProcess":
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.command(), stdout=self._log, stderr=subprocess.STDOUT, cwd=self.dir)
        wait_for(self.listening, 30, f"{self.name} listening on UDP {self.port}")
        return self

    def listening(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()}")
        return f":{self.port:04X} " in Path("/proc/net/udp").read_text()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.errors = self.error_lines()  # not what it says while shutting down
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None:
            self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def error_lines(self) -> list[str]:
        return [line for line in self.log().splitlines() if ERROR_WORDS.search(line)]

    def records(self) -> list[dict]:
        raise NotImplementedError


class Goflow2(CollectorProcess):
    """goflow2 with one socket and ONE worker: with its default of two workers per socket, two workers
    decode datagrams of one exporter concurrently, so the data right after a new exporter's first
    templates can be decoded before them and is lost ("template not found")."""

    name = "goflow2"

    def command(self) -> list[str]:
        return [GOFLOW2, "-listen", f"netflow://127.0.0.1:{self.port}?count=1&workers=1", "-format", "json",
                "-transport.file", str(self.dir / "flows.json"), "-addr", "127.0.0.1:0"]

    def records(self) -> list[dict]:
        path = self.dir / "flows.json"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


class Nfcapd(CollectorProcess):
    name = "nfcapd"

    def command(self) -> list[str]:
        return ["nfcapd", "-w", str(self.dir / "flows"), "-b", "127.0.0.1", "-p", str(self.port), "-t", "3600",
                "-B", str(4 << 20)]

    def start(self) -> "CollectorProcess":
        (self.dir / "flows").mkdir(exist_ok=True)
        return super().start()

    def records(self) -> list[dict]:
        """What `nfdump -o json` prints for the files nfcapd wrote (complete only after stop())."""
        files = sorted(glob.glob(str(self.dir / "flows" / "nfcapd.2*")))
        out = []
        for path in files:
            text = subprocess.run(["nfdump", "-r", path, "-o", "json"], capture_output=True, text=True,
                                  check=True).stdout
            out += json.loads(text) if text.strip() else []
        return out


class Nfacctd(CollectorProcess):
    """pmacct's nfacctd, print plugin: one JSON line per aggregate and refresh interval.

    The aggregate holds every key the tests compare, and observationPointId
    (IE 138) as a custom primitive, so no two observation points fold together.
    """

    name = "nfacctd"

    def command(self) -> list[str]:
        (self.dir / "primitives.lst").write_text(
            "name=obs_point field_type=138 len=8 semantics=u_int\n")
        (self.dir / "nfacctd.conf").write_text("\n".join([
            "daemonize: false",
            "nfacctd_ip: 127.0.0.1",
            f"nfacctd_port: {self.port}",
            f"nfacctd_pipe_size: {4 << 20}",
            "plugins: print",
            "print_output: json",
            f"print_output_file: {self.dir / 'flows.json'}",
            "print_output_file_append: true",
            "print_refresh_time: 1",
            f"aggregate_primitives: {self.dir / 'primitives.lst'}",
            "aggregate: src_host, dst_host, src_port, dst_port, proto, tcpflags, in_iface, out_iface, obs_point",
            "",
        ]))
        return ["nfacctd", "-f", str(self.dir / "nfacctd.conf")]

    def records(self) -> list[dict]:
        path = self.dir / "flows.json"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []

    def error_lines(self) -> list[str]:
        # pmacct prints its build options at start ('--disable-option-checking', ...): not errors
        return [line for line in super().error_lines() if "--build=" not in line]


def goflow2_available() -> bool:
    return os.access(GOFLOW2, os.X_OK)


def missing_collectors() -> list[str]:
    missing = [] if goflow2_available() else [f"goflow2 ({GOFLOW2}: run scripts/install.sh --test)"]
    missing += [tool for tool in ("nfcapd", "nfdump", "nfacctd", "tshark", "dumpcap") if shutil.which(tool) is None]
    return missing
