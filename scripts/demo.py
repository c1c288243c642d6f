"""kipfix demo: meter real traffic in namespaces and show the IPFIX flows a collector got.

Creates two network namespaces joined by a veth pair, runs `kipfix agent`
on one end with a YAML config exporting to `kipfix collect` on loopback,
sends ping (IPv4 and IPv6) and iperf3 (TCP and UDP) traffic, stops the
agent (which exports every remaining flow) and prints what the collector
decoded. Everything it creates is removed at the end, even on Ctrl-C.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

BIN = Path(sys.executable).with_name("kipfix")
TAG = uuid.uuid4().hex[:4]
CLIENT, SERVER = f"kfdemo{TAG}c", f"kfdemo{TAG}s"
PIN = f"/sys/fs/bpf/kipfix-demo-{TAG}"


def sh(cmd: str) -> None:
    subprocess.run(cmd, shell=True, check=True, stdout=subprocess.DEVNULL)


def say(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("127.0.0.1", 0))
        return udp.getsockname()[1]


def make_namespaces() -> None:
    for ns in (CLIENT, SERVER):
        sh(f"ip netns add {ns}")
        sh(f"ip -n {ns} link set lo up")
    sh(f"ip link add kfd{TAG}c type veth peer name kfd{TAG}s")
    sh(f"ip link set kfd{TAG}c netns {CLIENT} name eth0")
    sh(f"ip link set kfd{TAG}s netns {SERVER} name eth0")
    for ns, host in ((CLIENT, 1), (SERVER, 2)):
        sh(f"ip -n {ns} addr add 192.0.2.{host}/24 dev eth0")
        sh(f"ip -n {ns} addr add 2001:db8::{host}/64 dev eth0 nodad")
        sh(f"ip -n {ns} link set eth0 up")


def wait_for_line(path: Path, text: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in path.read_text():
            return
        if proc.poll() is not None:
            raise SystemExit(f"demo: process exited early:\n{path.read_text()}")
        time.sleep(0.1)
    raise SystemExit(f"demo: timed out waiting for {text!r}")


def main() -> int:
    if os.geteuid() != 0:
        print("the demo needs root (network namespaces and BPF)", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="kipfix-demo-"))
    procs: list[subprocess.Popen] = []
    try:
        say(f"creating namespaces {CLIENT} (192.0.2.1, 2001:db8::1) and {SERVER} (192.0.2.2, 2001:db8::2)")
        make_namespaces()

        port = free_port()
        say(f"starting the built-in IPFIX collector on 127.0.0.1:{port}")
        collected = work / "collector.txt"
        collector = subprocess.Popen([BIN, "collect", "--listen", f"127.0.0.1:{port}"],
                                     stdout=open(collected, "w"), stderr=subprocess.STDOUT)
        procs.append(collector)
        wait_for_line(collected, "listening", collector)

        config = work / "kipfix.yaml"
        config.write_text(f"""\
collectors:
  - address: 127.0.0.1:{port}
    transport: udp
templates:
  - id: 1024
    template: [FlowStartMilliseconds, FlowEndMilliseconds, OctetDeltaCount, PacketDeltaCount,
               IpVersion, FlowDirection, ProtocolIdentifier, SourceIPv4Address, DestinationIPv4Address,
               SourceTransportPort, DestinationTransportPort, IngressInterface, FlowEndReason]
interfaces:
  - netns: {CLIENT}
    names: [eth0]
timeouts: {{idle: 2, active: 10}}
drainInterval: 0.5
pinPath: {PIN}
""")
        say(f"starting kipfix agent --config {config}")
        print(config.read_text(), end="")
        agent_log = work / "agent.log"
        agent = subprocess.Popen([BIN, "agent", "--config", str(config)], stdout=open(agent_log, "w"),
                                 stderr=subprocess.STDOUT)
        procs.append(agent)
        wait_for_line(agent_log, "kipfix agent running", agent)

        say("traffic: ping x5 (IPv4), ping x3 (IPv6), iperf3 TCP 2 s, iperf3 UDP 1 s")
        sh(f"ip netns exec {CLIENT} ping -c 5 -i 0.2 -q 192.0.2.2")
        sh(f"ip netns exec {CLIENT} ping -6 -c 3 -i 0.2 -q 2001:db8::2")
        for udp in ("", "-u -b 10M"):
            server = subprocess.Popen(["ip", "netns", "exec", SERVER, "iperf3", "-s", "-1"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            procs.append(server)
            time.sleep(0.5)
            sh(f"ip netns exec {CLIENT} iperf3 -c 192.0.2.2 -t {1 if udp else 2} {udp}")
            server.wait(timeout=30)

        say("stopping the agent: it ends and exports every flow still in its cache")
        time.sleep(2.5)
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=30)
        time.sleep(1)
        collector.send_signal(signal.SIGINT)
        collector.wait(timeout=10)

        say("flows the collector received (decoded from IPFIX)")
        lines = collected.read_text().splitlines()
        flows = [line for line in lines if not line.startswith(("options", "listening"))]
        print("\n".join(flows))
        print(f"\n{len(flows) - 1} flow records received; cleaning up")
        return 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        for ns in (CLIENT, SERVER):
            subprocess.run(["ip", "netns", "del", ns], stderr=subprocess.DEVNULL)
        shutil.rmtree(PIN, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
