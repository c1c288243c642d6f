"""A packet capture (dumpcap) on interfaces of one network namespace: the ground truth of what crossed them."""

from __future__ import annotations

import signal
import subprocess
import sys

from agentproc import wait_for

INGRESS, EGRESS = "ingress", "egress"


class Capture:
    """dumpcap on some interfaces of one netns: the ground truth of what crossed them."""

    def __init__(self, netns: str, interfaces: list[str], path):
        self.netns, self.interfaces, self.path = netns, interfaces, path
        cmd = ["ip", "netns", "exec", netns, "dumpcap", "-q", "-B", "32", "-w", str(path)]
        for ifname in interfaces:
            cmd += ["-i", ifname]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for line in self.proc.stderr:
            if "Capturing on" in line:
                return
        raise AssertionError(f"dumpcap did not start in {netns}")

    PROBE = """
import socket, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((sys.argv[1], 0))
s.send(bytes(6) + bytes.fromhex("020000000001") + bytes.fromhex("88b5") + bytes(46))
"""

    def probes(self) -> int:
        out = subprocess.run(["tshark", "-r", str(self.path), "-Y", "eth.type == 0x88b5"], capture_output=True,
                             text=True).stdout
        return len(out.splitlines())

    def sync(self) -> None:
        """Send a non-IP frame (neither metered nor a flow) until the capture file shows it: then the capture
        runs, and everything before it is in the file."""
        seen = self.probes()

        def arrived() -> bool:
            for ifname in self.interfaces:
                subprocess.run(["ip", "netns", "exec", self.netns, sys.executable, "-c", self.PROBE, ifname],
                               check=True)
            return self.probes() > seen
        wait_for(arrived, 30, f"the capture in {self.netns} to see a probe", interval=0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            self.proc.wait(30)

    def packets(self, macs: dict[str, str]) -> list[dict]:
        fields = ["frame.interface_name", "eth.src", "ip.src", "ip.dst", "ipv6.src", "ipv6.dst", "ip.proto",
                  "ipv6.nxt", "tcp.srcport", "tcp.dstport", "udp.srcport", "udp.dstport", "icmp.type", "icmp.code",
                  "icmpv6.type", "icmpv6.code", "tcp.flags", "ip.len", "ipv6.plen"]
        cmd = ["tshark", "-r", str(self.path), "-T", "fields", "-E", "occurrence=f"]
        for f in fields:
            cmd += ["-e", f]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        packets = []
        for line in out.splitlines():
            v = dict(zip(fields, line.split("\t")))
            if not (v["ip.src"] or v["ipv6.src"]):
                continue  # not IP: not a flow
            ifname = v["frame.interface_name"]
            six = not v["ip.src"]
            proto = int(v["ipv6.nxt"] if six else v["ip.proto"])
            sport = int(v["tcp.srcport"] or v["udp.srcport"] or 0)
            dport = int(v["tcp.dstport"] or v["udp.dstport"] or 0)
            icmp = (v["icmpv6.type"], v["icmpv6.code"]) if six else (v["icmp.type"], v["icmp.code"])
            packets.append({
                "netns": self.netns, "ifname": ifname,
                "direction": EGRESS if v["eth.src"] == macs[(self.netns, ifname)] else INGRESS,
                "src": v["ipv6.src" if six else "ip.src"], "dst": v["ipv6.dst" if six else "ip.dst"],
                "proto": proto, "sport": sport, "dport": dport,
                "icmp": (int(icmp[0]), int(icmp[1])) if icmp[0] else None,
                "flags": int(v["tcp.flags"], 16) if v["tcp.flags"] else 0,
                "octets": int(v["ipv6.plen"]) + 40 if six else int(v["ip.len"]),
            })
        return packets
