"""Losses are counted, bursts are paced (issue 12 item 7, issue 11 item 8).

- UDP to a port nothing listens on: the connected socket turns the ICMP
  port unreachable into a counted send error; the message it follows is
  counted as refused, later flows are held and templates sent as probes;
  a collector started on the port gets the held flows and, in the
  Exporting Process Reliability options record, the refused count.
- TCP to a collector that hangs and then dies: what its TCP did not
  acknowledge is counted, exactly: the collector's decoded records, plus
  those acknowledged but never read (peeked from its socket before it
  dies), plus the counted ones, plus those still queued, are all records.
- A burst that a small receive buffer drops when sent back to back arrives
  whole when spread over the drain interval.
"""

from __future__ import annotations

import socket
import struct
import threading
import time

from kipfix.agent.collector.server import Collector
from kipfix.agent.config import CollectorConfig, TemplateConfig
from kipfix.agent.export.ipfix.decoder import MalformedMessage, TemplateStore, decode_message, read_stream_message
from kipfix.agent.export.ipfix.dummy import MINIMAL_TEMPLATE, dummy_records
from kipfix.agent.export.ipfix.exporter import IpfixExporter
from kipfix.agent.export.ipfix.transport import make_transport
from kipfix.agent.export.sink import MeteringStats
from kipfix.agent.metrics import metered_transport

TEMPLATES = [TemplateConfig(256, MINIMAL_TEMPLATE)]


def wait(predicate, timeout: float = 20, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def exporter_to(port: int, transport: str = "udp", **options) -> IpfixExporter:
    config = CollectorConfig(f"127.0.0.1:{port}", "127.0.0.1", port, transport, **options)
    return IpfixExporter([config], TEMPLATES, 1, reconnect_initial=0.05, reconnect_max=0.2,
                         transport_factory=metered_transport)


def test_udp_refused_by_the_collector_host_is_counted_held_and_resumed():
    port = free_udp_port()
    first = Collector(port=port, out=None, err=None).start()
    exporter = exporter_to(port, pacing="none")
    (session,) = exporter.sessions
    try:
        exporter.export(dummy_records(10, seed=1), MeteringStats())
        assert first.wait_for(lambda c: c.data_records == 10, 10)
        first.stop()  # the port closes: the host answers ICMP port unreachable from now on

        exporter.export(dummy_records(10, seed=2), MeteringStats())  # sent, and refused
        wait(lambda: session.counters.not_sent_by_reason["refused"] == 10, what="the refused message counted")
        assert (session.counters.not_sent_flows, session.counters.not_sent_packets,
                session.counters.not_sent_octets) == (10, sum(r.packets for r in dummy_records(10, seed=2)),
                                                      sum(r.octets for r in dummy_records(10, seed=2)))
        assert session.transport.errors()[("send", "econnrefused")] >= 1
        exporter.export(dummy_records(10, seed=3), MeteringStats())  # held while probes are refused
        time.sleep(1.0)
        assert session.queued_flows == 10
        delivered = session.transport.last_success

        second = Collector(port=port, out=None, err=None).start()  # the collector is back
        try:
            assert second.wait_for(lambda c: c.data_records == 10, 20)
            wait(lambda: session.queued_flows == 0, what="the held flows sent")
            reliability = [r.values for m in second.messages() for r in m.options_records
                           if "notSentFlowTotalCount" in r.values]
            assert reliability and reliability[-1]["notSentFlowTotalCount"] == 10
            wait(lambda: session.transport.last_success > delivered, what="last export moving again")
        finally:
            second.stop()
    finally:
        exporter.close(1)
        first.stop()
    # every record: delivered to the first collector, refused, or delivered to the second
    assert first.data_records + 10 + second.data_records == 30


class HangingCollector:
    """Accepts one TCP connection, decodes ``read_first`` records, then stops reading (hangs)."""

    def __init__(self, read_first: int):
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)  # inherited by the connection
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(1)
        self.port = self.listener.getsockname()[1]
        self.read_first = read_first
        self.read = 0
        self.store = TemplateStore()
        self.hung = threading.Event()
        self.conn: socket.socket | None = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.conn, _ = self.listener.accept()

        def read_exactly(size: int) -> bytes:  # unbuffered: nothing beyond the last message leaves the socket
            data = b""
            while len(data) < size:
                chunk = self.conn.recv(size - len(data))
                if not chunk:
                    break
                data += chunk
            return data
        while self.read < self.read_first:
            data = read_stream_message(read_exactly)
            self.read += len(decode_message(data, self.store, "peer").data_records)
        self.hung.set()

    def die(self) -> int:
        """Records acknowledged by its TCP but never read (decoded from a peek at its socket), then
        close with them unread: its TCP resets the connection, as a killed process's does."""
        self.listener.close()
        unread = self.conn.recv(1 << 24, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        records = offset = 0
        while offset + 4 <= len(unread):
            length = struct.unpack_from("!H", unread, offset + 2)[0]
            if offset + length > len(unread):
                break  # its end was not acknowledged: the exporter counts this one
            try:
                records += len(decode_message(unread[offset:offset + length], self.store, "peer").data_records)
            except MalformedMessage:
                raise AssertionError("the stream is out of step") from None
            offset += length
        self.conn.close()
        return records


def test_tcp_collector_that_hangs_then_dies_counts_what_was_not_acknowledged():
    collector = HangingCollector(read_first=2000)
    exporter = exporter_to(collector.port, "tcp", send_buffer=16384)
    (session,) = exporter.sessions
    total = 20_000
    try:
        for seed in range(total // 1000):
            exporter.export(dummy_records(1000, seed=seed), MeteringStats())
        assert collector.hung.wait(20)
        last = None
        while last != session.counters.messages:  # the sender is stuck: both buffers are full
            last = session.counters.messages
            time.sleep(0.5)
        unread = collector.die()
        wait(lambda: session.counters.not_sent_by_reason["unacknowledged"] > 0, what="unacknowledged counted")
        wait(lambda: session.transport.errors().get(("connect", "econnrefused")), what="reconnects refused")
    finally:
        exporter.close(0)
    lost = session.counters.not_sent_by_reason
    assert set(lost) == {"unacknowledged", "not_sent_at_exit"}
    assert collector.read + unread + lost["unacknowledged"] + lost["not_sent_at_exit"] == total
    assert session.counters.not_sent_flows == lost["unacknowledged"] + lost["not_sent_at_exit"]


def test_send_buffer_is_set_on_the_socket():
    port = free_udp_port()
    for transport in ("udp", "tcp"):
        listener = None
        if transport == "tcp":
            listener = socket.create_server(("127.0.0.1", 0))
            port = listener.getsockname()[1]
        sender = make_transport(CollectorConfig(f"127.0.0.1:{port}", "127.0.0.1", port, transport,
                                                send_buffer=300_000))
        sender.connect()
        try:
            # the kernel doubles the request for its own bookkeeping (socket(7))
            assert sender.sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == 600_000
        finally:
            sender.close()
            if listener is not None:
                listener.close()


def burst(pacing: str, pace_window: float) -> tuple[int, int]:
    """(messages sent, messages a collector with a 128 KiB receive buffer got) for 140 datagrams'
    worth of records handed over at once."""
    collector = Collector(out=None, err=None, keep=False, receive_buffer=65536).start()
    config = CollectorConfig(f"127.0.0.1:{collector.port}", "127.0.0.1", collector.port, "udp", pacing=pacing)
    exporter = IpfixExporter([config], TEMPLATES, 1, pace_window=pace_window)
    (session,) = exporter.sessions
    try:
        time.sleep(0.2)  # templates and options out of the way
        before = session.counters.messages
        exporter.export(dummy_records(140 * 42), MeteringStats())  # 42 minimal records per 1400 octets
        wait(lambda: session.queued_flows == 0, 30, "the burst sent")
        sent = session.counters.messages
        time.sleep(0.5)
        assert sent - before >= 140
        return sent, collector.messages_received
    finally:
        exporter.close(1)
        collector.stop()


def test_a_burst_a_small_receive_buffer_drops_arrives_whole_when_paced():
    sent, received = burst("none", 0)
    assert received < sent  # back to back: the receive buffer overflowed
    sent, received = burst("spread", 2.0)
    assert received == sent
