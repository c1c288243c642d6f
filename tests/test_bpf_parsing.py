"""The metering program's parser, fed with hand-built frames.

Frames are injected with an AF_PACKET socket on one end of a veth pair and
metered on the other end's ingress. This kernel has no 802.1Q or SCTP
module, so raw frames are the way to exercise those parsers; the stack
drops the frames after tc, which does not matter to the meter.
"""

from __future__ import annotations

import ipaddress
import json
import shutil
import struct
import subprocess
import sys
import uuid

import pytest

from kipfix.agent.datapath import tc
from kipfix.agent.flows.record import EGRESS, INGRESS
from kipfix.agent.datapath.meter import Meter
from router import sh

pytestmark = pytest.mark.root

A4, B4 = ipaddress.ip_address("10.80.0.1").packed, ipaddress.ip_address("10.80.0.2").packed
A6, B6 = ipaddress.ip_address("fd80::1").packed, ipaddress.ip_address("fd80::2").packed


@pytest.fixture(scope="module")
def meter():
    pin = f"/sys/fs/bpf/kipfix-test-{uuid.uuid4().hex[:8]}"
    meter = Meter(4096, pin)
    yield meter
    meter.close()
    shutil.rmtree(pin, ignore_errors=True)


@pytest.fixture
def wire(meter):
    """(sender netns, receiver netns, receiver ifindex, macs) with kipfix on the receiver."""
    tag = uuid.uuid4().hex[:6]
    ns_a, ns_b = f"kfp{tag}a", f"kfp{tag}b"
    try:
        for ns in (ns_a, ns_b):
            sh(f"ip netns add {ns}")
        sh(f"ip link add kfp{tag}a type veth peer name kfp{tag}b")
        sh(f"ip link set kfp{tag}a netns {ns_a} name wa")
        sh(f"ip link set kfp{tag}b netns {ns_b} name wb")
        for ns, ifname in ((ns_a, "wa"), (ns_b, "wb")):
            sh(f"ip netns exec {ns} sysctl -qw net.ipv6.conf.all.disable_ipv6=1")
            sh(f"ip -n {ns} link set {ifname} up")
        tc.attach(ns_b, "wb", tc.Programs(meter.ingress_fd, meter.egress_fd, classid=0x4B00_0007))
        meter.drain()  # start from an empty table
        ifindex = json.loads(sh(f"ip -n {ns_b} -j link show wb").stdout)[0]["ifindex"]
        macs = [json.loads(sh(f"ip -n {ns} -j link show {i}").stdout)[0]["address"]
                for ns, i in ((ns_a, "wa"), (ns_b, "wb"))]
        yield ns_a, ns_b, ifindex, macs
    finally:
        for ns in (ns_a, ns_b):
            sh(f"ip netns del {ns}", check=False)


INJECT = """
import socket, sys
frames = [bytes.fromhex(line) for line in sys.stdin.read().split()]
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("wa", 0))
for frame in frames:
    s.send(frame)
"""


def inject(ns: str, frames: list[bytes]) -> None:
    subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", INJECT],
                   input="\n".join(f.hex() for f in frames), text=True, check=True)


def mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


def ipv4(proto: int, payload: bytes, options: bytes = b"", ttl: int = 61, tos: int = 0x28,
         frag: int = 0, ident: int = 0x1234) -> bytes:
    ihl = 5 + len(options) // 4
    header = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, tos, ihl * 4 + len(payload), ident, frag, ttl, proto, 0,
                         A4, B4)
    return header + options + payload


def ipv6(next_header: int, payload: bytes, hop_limit: int = 33) -> bytes:
    return struct.pack("!IHBB16s16s", 0x6_0A_00000, len(payload), next_header, hop_limit, A6, B6) + payload


def udp(sport: int, dport: int, data: bytes = b"x" * 10) -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(data), 0) + data


def tcp(sport: int, dport: int, flags: int) -> bytes:
    return struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, flags, 1024, 0, 0)


def ether(macs, ethertype: int, payload: bytes, tags: list[tuple[int, int]] = ()) -> bytes:
    frame = mac(macs[1]) + mac(macs[0])
    for tpid, vid in tags:
        frame += struct.pack("!HH", tpid, vid)
    return frame + struct.pack("!H", ethertype) + payload


def flows_by_key(meter, ifindex):
    return {(k.protocol, k.sport, k.dport, k.ip_version): (netns_id, c)
            for netns_id, k, c in meter.tables.peek() if k.ifindex == ifindex and k.direction == INGRESS}


def test_vlan_single_and_double_tagged(meter, wire):
    ns_a, _ns_b, ifindex, macs = wire
    packet = ipv4(17, udp(1111, 2222))
    inject(ns_a, [ether(macs, 0x0800, packet, tags=[(0x8100, 100)])] * 3)
    inject(ns_a, [ether(macs, 0x0800, ipv4(17, udp(3333, 4444)), tags=[(0x88A8, 200), (0x8100, 300)])] * 4)
    flows = flows_by_key(meter, ifindex)
    netns_id, single = flows[(17, 1111, 2222, 4)]
    assert (single.packets, single.octets, single.vlan_id, single.inner_vlan_id) == (3, 3 * len(packet), 100, 0)
    assert netns_id == 7  # from the filter's classid
    _, double = flows[(17, 3333, 4444, 4)]
    assert (double.packets, double.vlan_id, double.inner_vlan_id) == (4, 200, 300)


def test_ipv4_options_ttl_tos_and_tcp_flags(meter, wire):
    ns_a, _ns_b, ifindex, macs = wire
    options = bytes([1, 1, 1, 1, 1, 1, 1, 0])  # NOPs + end of list: IHL 7
    frames = [ether(macs, 0x0800, ipv4(6, tcp(5000, 80, 0x02), options=options, ttl=64)),
              ether(macs, 0x0800, ipv4(6, tcp(5000, 80, 0x10), options=options, ttl=50)),
              ether(macs, 0x0800, ipv4(6, tcp(5000, 80, 0x11), options=options, ttl=55, tos=0xB8))]
    inject(ns_a, frames)
    _, flow = flows_by_key(meter, ifindex)[(6, 5000, 80, 4)]
    assert (flow.packets, flow.octets) == (3, 3 * (28 + 20))
    assert (flow.tcp_flags, flow.min_ttl, flow.max_ttl, flow.tos) == (0x13, 50, 64, 0xB8)


def test_ipv6_extension_headers_are_skipped(meter, wire):
    ns_a, _ns_b, ifindex, macs = wire
    hop_by_hop = bytes([60, 0]) + bytes([1, 4, 0, 0, 0, 0])       # -> destination options
    dest_opts = bytes([43, 0]) + bytes([1, 4, 0, 0, 0, 0])        # -> routing
    routing = bytes([17, 0, 0, 0, 0, 0, 0, 0])                    # type 0, 0 segments left -> UDP
    payload = hop_by_hop + dest_opts + routing + udp(7000, 53)
    inject(ns_a, [ether(macs, 0x86DD, ipv6(0, payload))] * 2)
    _, flow = flows_by_key(meter, ifindex)[(17, 7000, 53, 6)]
    assert (flow.packets, flow.octets, flow.min_ttl) == (2, 2 * (40 + len(payload)), 33)
    assert flow.tos == 0x0A


def test_ipv6_fragments_first_with_ports_rest_without(meter, wire):
    ns_a, _ns_b, ifindex, macs = wire
    first = bytes([17, 0]) + struct.pack("!HI", 0x0001, 0xCAFE) + udp(8000, 9000, b"y" * 16)   # offset 0, MF
    second = bytes([17, 0]) + struct.pack("!HI", 3 << 3, 0xCAFE) + b"z" * 16                  # offset 24
    inject(ns_a, [ether(macs, 0x86DD, ipv6(44, first)), ether(macs, 0x86DD, ipv6(44, second))])
    flows = flows_by_key(meter, ifindex)
    _, head = flows[(17, 8000, 9000, 6)]
    _, tail = flows[(17, 0, 0, 6)]
    assert (head.packets, head.fragment_id, tail.packets, tail.fragment_id) == (1, 0xCAFE, 1, 0xCAFE)


def test_sctp_ports_other_protocols_without_ports_and_icmp_type_code(meter, wire):
    ns_a, _ns_b, ifindex, macs = wire
    sctp = struct.pack("!HHII", 3868, 3869, 0, 0)
    gre = struct.pack("!HH", 0, 0x0800) + b"\0" * 20
    icmp = bytes([3, 1, 0, 0, 0, 0, 0, 0])  # destination unreachable, host unreachable
    inject(ns_a, [ether(macs, 0x0800, ipv4(132, sctp))] * 2 + [ether(macs, 0x0800, ipv4(47, gre))] * 3
           + [ether(macs, 0x0800, ipv4(1, icmp))])
    flows = flows_by_key(meter, ifindex)
    assert flows[(132, 3868, 3869, 4)][1].packets == 2
    assert flows[(47, 0, 0, 4)][1].packets == 3
    assert flows[(1, 0, (3 << 8) | 1, 4)][1].packets == 1


def test_arp_and_other_non_ip_frames_pass_unmetered(meter, wire):
    ns_a, ns_b, ifindex, macs = wire
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, mac(macs[0]), A4, b"\0" * 6, B4)
    lldp = b"\x02\x07\x04" + mac(macs[0]) + b"\0" * 30
    before = json.loads(sh(f"ip -n {ns_b} -s -j link show wb").stdout)[0]["stats64"]["rx"]["packets"]
    inject(ns_a, [ether(macs, 0x0806, arp)] * 5 + [ether(macs, 0x88CC, lldp)] * 2)
    after = json.loads(sh(f"ip -n {ns_b} -s -j link show wb").stdout)[0]["stats64"]["rx"]["packets"]
    assert after - before == 7  # they did arrive
    assert flows_by_key(meter, ifindex) == {}


def test_truncated_headers_are_not_metered_and_do_not_break_the_program(meter, wire):
    ns_a, _ns_b, ifindex, macs = wire
    inject(ns_a, [ether(macs, 0x0800, b"\x45\x00"), ether(macs, 0x86DD, b"\x60"),
                  ether(macs, 0x8100, b"\x00")])
    inject(ns_a, [ether(macs, 0x0800, ipv4(17, udp(1, 2)))])
    assert list(flows_by_key(meter, ifindex)) == [(17, 1, 2, 4)]


def test_table_full_is_counted_not_silent(wire):
    ns_a, ns_b, _ifindex, macs = wire
    pin = f"/sys/fs/bpf/kipfix-test-{uuid.uuid4().hex[:8]}"
    small = Meter(16, pin)
    try:
        tc.attach(ns_b, "wb", tc.Programs(small.ingress_fd, small.egress_fd, classid=0x4B00_0007))
        packet = ipv4(17, udp(1, 2))
        inject(ns_a, [ether(macs, 0x0800, ipv4(17, udp(1000 + i, 53))) for i in range(40)])
        flows = small.tables.peek()
        assert len(flows) == 16
        assert small.tables.unmetered() == (24, 24 * len(packet))
        first, last = small.tables.unmetered_times()  # RFC 7011 4.2: first and last ignored packet
        assert min(c.first_ns for _n, _k, c in flows) <= first <= last
        assert last >= max(c.last_ns for _n, _k, c in flows)
    finally:
        small.close()
        shutil.rmtree(pin, ignore_errors=True)


def test_egress_direction_is_recorded(meter, wire):
    ns_a, ns_b, ifindex, macs = wire
    # A raw frame sent from B's side goes through B's egress hook.
    script = INJECT.replace('"wa"', '"wb"')
    frame = mac(macs[0]) + mac(macs[1]) + struct.pack("!H", 0x0800) + ipv4(17, udp(4242, 4343))
    subprocess.run(["ip", "netns", "exec", ns_b, sys.executable, "-c", script], input=frame.hex(), text=True,
                   check=True)
    egress = [(k.sport, c.packets) for _n, k, c in meter.tables.peek()
              if k.ifindex == ifindex and k.direction == EGRESS]
    assert egress == [(4242, 1)]


def test_octets_are_ip_octets_not_the_padded_frame(meter, wire):
    """Short packets travel in 60-octet Ethernet frames; a real NIC hands the padding up on ingress, a raw
    socket sends it on egress. IPFIX octets are the IP packet's: its header's length, never the padding."""
    ns_a, ns_b, ifindex, macs = wire
    tc.attach(ns_a, "wa", tc.Programs(meter.ingress_fd, meter.egress_fd, classid=0x4B00_0008))
    sender_ifindex = json.loads(sh(f"ip -n {ns_a} -j link show wa").stdout)[0]["ifindex"]
    short_udp = ipv4(17, udp(5001, 5002, b"hi"))                 # 30 octets of IP
    pure_ack = ipv4(6, tcp(5003, 5004, 0x10))                     # 40 octets of IP: a pure TCP ACK
    small_v6 = ipv6(17, udp(5005, 5006, b"hello"))                # 53 octets of IP, 13 octets of trailer
    frames = [ether(macs, 0x0800, short_udp), ether(macs, 0x0800, pure_ack), ether(macs, 0x86DD, small_v6)]
    frames = [f + bytes(max(60 - len(f), 0)) if len(f) < 60 else f + bytes(13) for f in frames]
    assert [len(f) for f in frames] == [60, 60, 80]
    before = json.loads(sh(f"ip -n {ns_b} -s -j link show wb").stdout)[0]["stats64"]["rx"]["bytes"]
    inject(ns_a, frames * 5)
    after = json.loads(sh(f"ip -n {ns_b} -s -j link show wb").stdout)[0]["stats64"]["rx"]["bytes"]
    assert after - before == 5 * (60 + 60 + 80)  # the padding went over the wire
    seen = {(k.ifindex, k.direction, k.sport): (c.packets, c.octets) for _n, k, c in meter.tables.peek()
            if k.sport in (5001, 5003, 5005)}
    for where in ((ifindex, INGRESS), (sender_ifindex, EGRESS)):
        assert {sport: seen.get((*where, sport)) for sport in (5001, 5003, 5005)} == \
            {5001: (5, 5 * 30), 5003: (5, 5 * 40), 5005: (5, 5 * 53)}, where
