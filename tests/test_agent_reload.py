"""Every bad input of issue 12, on SIGHUP to a real running agent and at a real agent's start.

One agent meters the router's r1 and exports IPFIX to `kipfix collect` (a
separate process). For each bad file: SIGHUP, the refusal is logged naming
the file and the key, kipfix_agent_reload_failures_total goes up by one,
and the agent still meters and exports: a burst of pings counted by ping
itself arrives at the collector as exactly that many echo requests. At
start, the same files end the agent with exit code 2 and one line, before
the BPF program is loaded: nothing is created under the pin path.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agentproc import KIPFIX, AgentProcess, wait_for
from router import Router, sh
from test_config_document import ANCHOR_BOMB

pytestmark = pytest.mark.root

TEMPLATE = ["flowStartMilliseconds", "flowEndMilliseconds", "sourceIPv4Address", "destinationIPv4Address",
            "protocolIdentifier", "icmpTypeCodeIPv4", "flowDirection", "packetDeltaCount", "octetDeltaCount"]
ECHO_REQUEST = 8 << 8


def free_port(kind: int = socket.SOCK_DGRAM) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def config_text(netns: str, collector_port: int, metrics_port: int, json_lines: str, pin_path: str,
                names: str = "[r1]") -> str:
    """A realistic file, written by hand: the README's order, comments, flow and block style."""
    template = "\n".join(f"      - {name}" for name in TEMPLATE)
    return (f"# kipfix on the test router\n"
            f"collectors:\n"
            f"  - address: 127.0.0.1:{collector_port}   # kipfix collect\n"
            f"    transport: udp\n"
            f"templates:\n"
            f"  - id: 256\n"
            f"    template:\n{template}\n"
            f"interfaces:\n"
            f"  - netns: {netns}\n"
            f"    names: {names}\n"
            f"timeouts: {{idle: 1, active: 2}}     # seconds\n"
            f"drainInterval: 0.2\n"
            f"metrics: {{address: 127.0.0.1, port: {metrics_port}}}\n"
            f"jsonLines: {json_lines}\n"
            f"pinPath: {pin_path}\n")


class Collector:
    """`kipfix collect --json` in its own process, its records read back from its output."""

    def __init__(self, path: Path):
        self.port = free_port()
        self.path = path
        self._out = open(path, "w")
        self.proc = subprocess.Popen([KIPFIX, "collect", "--listen", f"127.0.0.1:{self.port}", "--json"],
                                     stdout=self._out, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        line = self.proc.stderr.readline()
        assert "listening for IPFIX" in line, line

    def records(self) -> list[dict]:
        return [json.loads(line)["fields"] for line in self.path.read_text().splitlines() if line.strip()]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self._out.close()


@dataclass
class Running:
    router: Router
    agent: AgentProcess
    collector: Collector
    metrics_port: int
    good: str

    def failures(self) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as response:
            text = response.read().decode()
        return next(s.value for f in text_string_to_metric_families(text) for s in f.samples
                    if s.name == "kipfix_agent_reload_failures_total")

    def peak_rss_kib(self) -> int:
        status = Path(f"/proc/{self.agent.proc.pid}/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))

    def echo_requests_since(self, start_ms: int) -> tuple[int, int]:
        """(packets, octets) of echo requests h1 -> h2 entering r1, in records that started at start_ms or later."""
        packets = octets = 0
        for r in self.collector.records():
            if (r.get("icmpTypeCodeIPv4") == ECHO_REQUEST and r["flowDirection"] == 0
                    and r["sourceIPv4Address"] == "10.1.0.1" and r["destinationIPv4Address"] == "10.2.0.1"
                    and r["flowStartMilliseconds"] >= start_ms):
                packets += r["packetDeltaCount"]
                octets += r["octetDeltaCount"]
        return packets, octets

    def assert_meters_and_exports(self, count: int = 5) -> None:
        start_ms = int(time.time() * 1000)
        out = sh(f"ip netns exec {self.router.h1} ping -c {count} -i 0.05 -q 10.2.0.1").stdout
        assert f"{count} packets transmitted, {count} received" in out, out
        # the flow ends 1 s after its last packet (idle timeout) and reaches the collector
        wait_for(lambda: self.echo_requests_since(start_ms)[0] >= count, 30, f"{count} echo requests at the collector")
        time.sleep(0.5)  # a late duplicate would show here
        assert self.echo_requests_since(start_ms) == (count, 84 * count)


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reload")
    collector = Collector(tmp / "collected.jsonl")
    try:
        with Router() as router:
            metrics_port = free_port(socket.SOCK_STREAM)
            agent = AgentProcess(tmp, {})
            good = config_text(router.r, collector.port, metrics_port, str(tmp / "flows.jsonl"), agent.pin_path)
            agent.config_path.write_text(good)
            try:
                agent.start()
                agent.wait_log("attached kipfix to r1")
                run = Running(router, agent, collector, metrics_port, good)
                run.assert_meters_and_exports()
                yield run
            finally:
                agent.cleanup()
    finally:
        collector.stop()


def latin1(run: Running, tmp: Path) -> bytes:
    return run.good.replace("# kipfix on the test router", "# kipfix, Zürich").encode("latin-1")


def with_line(old: str, new: str) -> Callable[[Running, Path], bytes]:
    def make(run: Running, tmp: Path) -> bytes:
        assert old in run.good
        return run.good.replace(old, new).encode()
    return make


def not_pem(run: Running, tmp: Path) -> bytes:
    ca = tmp / "ca.crt"
    ca.write_text("test CA bytes\n")
    collector = f"  - address: 127.0.0.1:{free_port()}\n    transport: tls\n    tls: {{ca: {ca}}}\n"
    return run.good.replace("templates:\n", collector + "templates:\n").encode()


def cut_before(line: str) -> Callable[[Running, Path], bytes]:
    """The file cut at the end of the line before ``line``: a truncation that still parses."""
    def make(run: Running, tmp: Path) -> bytes:
        return run.good[:run.good.index(line)].encode()
    return make


def cut_inside(text: str, keep: int) -> Callable[[Running, Path], bytes]:
    """The file cut in the middle of ``text``, after ``keep`` of its characters."""
    def make(run: Running, tmp: Path) -> bytes:
        return run.good[:run.good.index(text) + keep].encode()
    return make


def fifty_megabytes(run: Running, tmp: Path) -> bytes:
    return run.good.encode() + b"# padding\n" * 5_000_000


@dataclass
class Case:
    make: Callable[[Running, Path], bytes]
    message: str


CASES = {
    "binary file": Case(lambda run, tmp: bytes(range(256)) * 16,
                        "not a text file: a NUL octet at line 1, column 1 (octet 0); accepted: a YAML text file"),
    "Latin-1 file": Case(latin1, "not UTF-8 text: octet 0xfc at line 1, column 12"),
    "netns a/b": Case(with_line("  - netns: ", "  - netns: a/b\n    # was: "),
                      "interfaces[0].netns: 'a/b' is not accepted; accepted: \"\" or host"),
    "jsonLines in a missing directory": Case(
        with_line("jsonLines: ", "jsonLines: /nonexistent-kipfix/flows.jsonl\n# was: "),
        "jsonLines: '/nonexistent-kipfix/flows.jsonl': directory '/nonexistent-kipfix' does not exist"),
    "TLS ca that is not PEM": Case(not_pem, "collectors[1].tls.ca: file '"),
    "empty file": Case(lambda run, tmp: b"", "the document is empty (no YAML content, only blanks or comments); "
                                             "to stop kipfix, stop the agent (SIGTERM"),
    "only a comment": Case(lambda run, tmp: b"# kipfix on the test router\n", "the document is empty"),
    "cut inside a line": Case(cut_inside("    names: [r1]", 12), "has no newline at its end: the file looks "
                                                              "truncated"),
    "cut inside the template list": Case(cut_inside("      - destinationIPv4Address", 16),
                                         "has no newline at its end"),
    "cut before interfaces": Case(cut_before("interfaces:"),
                                  "interfaces: the new configuration selects no interface, the running one 1 "
                                  "selection(s); refused"),
    "cut in the template list at a line end": Case(cut_before("      - protocolIdentifier"),
                                                   "interfaces: the new configuration selects no interface"),
    "cut before templates": Case(cut_before("templates:"),
                                 "templates: collectors are configured but no template says what to export"),
    "cut after an interface's netns": Case(cut_before("    names: [r1]"), "interfaces[0].names: empty"),
    "50 MB file": Case(fifty_megabytes, f"octets is too large; accepted: at most {1 << 20} octets"),
    "YAML anchor bomb": Case(lambda run, tmp: ANCHOR_BOMB, "more than 100000 values, counting what YAML aliases"),
    "duplicate keys": Case(lambda run, tmp: (run.good + "maxFlows: 2048\nmaxFlows: 4096\n").encode(),
                           "maxFlows: key given twice (lines 25 and 26); accepted: each key once in a mapping"),
    "pinPath outside bpffs": Case(with_line("pinPath: ", "pinPath: /tmp/kipfix-pins\n# was: "),
                                  "pinPath: '/tmp/kipfix-pins' is on a "),
}


@pytest.mark.parametrize("name", CASES)
def test_a_bad_reload_is_refused_and_the_agent_keeps_metering_and_exporting(running, name, tmp_path):
    case = CASES[name]
    agent = running.agent
    failures, seen = running.failures(), len(agent.log())
    peak = running.peak_rss_kib()
    agent.config_path.write_bytes(case.make(running, tmp_path))
    agent.signal(signal.SIGHUP)
    wait_for(lambda: "reload failed" in agent.log()[seen:], 30, "the refusal in the agent's log")
    line = next(line for line in agent.log()[seen:].splitlines() if "reload failed" in line)
    assert f"reload failed, keeping the running configuration: {agent.config_path}: " in line
    assert case.message in line, line
    assert len(line) < 1000 and "Traceback" not in agent.log()[seen:]
    assert "configuration generation" not in agent.log()[seen:]
    wait_for(lambda: running.failures() == failures + 1, 10, "reload_failures_total counted once")
    assert agent.proc.poll() is None
    assert running.peak_rss_kib() - peak < 50_000  # the 50 MB file is not read, let alone parsed
    running.assert_meters_and_exports()


def test_after_all_that_a_good_reload_applies(running):
    agent = running.agent
    seen = len(agent.log())
    agent.config_path.write_text(running.good.replace("idle: 1, active: 2", "idle: 1, active: 3"))
    agent.signal(signal.SIGHUP)
    wait_for(lambda: "applied (changed: timeouts)" in agent.log()[seen:], 30, "the good reload applied")
    running.assert_meters_and_exports(7)


# ---- at start ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def start_template(tmp_path_factory):
    """A good file for a start (no router: nothing gets that far), with its own pin path."""
    tmp = tmp_path_factory.mktemp("start")
    pin_path = f"/sys/fs/bpf/kipfix-test-{uuid.uuid4().hex[:8]}"
    good = config_text("kfnosuchnetns", free_port(), free_port(socket.SOCK_STREAM), str(tmp / "flows.jsonl"),
                       pin_path)
    return Running(None, None, None, 0, good), pin_path


@pytest.mark.parametrize("name", [n for n in CASES if not n.startswith("cut ") or n == "cut before templates"])
def test_a_bad_file_at_start_exits_2_with_one_line_before_anything_is_loaded(start_template, name, tmp_path):
    template, pin_path = start_template
    path = tmp_path / "kipfix.yaml"
    path.write_bytes(CASES[name].make(template, tmp_path))
    result = subprocess.run([KIPFIX, "agent", "--config", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and " ERROR " in lines[0], result.stderr
    assert f"{path}: " in lines[0] and "Traceback" not in result.stderr
    if not name.startswith("cut "):  # a start has nothing to compare a cut file with: it is just invalid
        assert CASES[name].message in lines[0], lines[0]
    assert len(lines[0]) < 1000
    assert not os.path.exists(pin_path) and not os.path.exists("/tmp/kipfix-pins")
    assert "metering program loaded" not in result.stderr


def test_pin_path_outside_bpffs_is_one_line_at_start(start_template, tmp_path):
    template, _ = start_template
    pins = tmp_path / "pins"
    path = tmp_path / "kipfix.yaml"
    path.write_text(template.good.replace("pinPath: ", f"pinPath: {pins}\n# was: "))
    result = subprocess.run([KIPFIX, "agent", "--config", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and f"pinPath: '{pins}' is on a " in result.stderr
    assert "not bpf; accepted: a directory on a bpf filesystem, such as /sys/fs/bpf/kipfix" in result.stderr
    assert not pins.exists()


def test_a_kubernetes_agent_with_its_pin_path_outside_bpffs_exits_2_before_calling_the_api(tmp_path):
    env = {**os.environ, "NODE_NAME": "node-x", "KIPFIX_PIN_PATH": str(tmp_path / "pins"),
           "KUBECONFIG": str(tmp_path / "no-such-kubeconfig")}
    result = subprocess.run([KIPFIX, "agent", "--kubernetes"], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert f"KIPFIX_PIN_PATH: pinPath: '{tmp_path / 'pins'}' is on a " in result.stderr
    assert not (tmp_path / "pins").exists()
