"""The built-in collector survives any input (issue 12 item 6).

The decoder is fuzzed with hypothesis (any bytes, and random but
well-framed messages with random templates) and may only return or raise
MalformedMessage. The real listener then takes a few thousand hostile
datagrams and TCP streams: it keeps decoding good messages, counts every
bad one, reports them per peer without flooding, keeps memory bounded,
limits TCP connections and closes idle ones.
"""

from __future__ import annotations

import io
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

from hypothesis import HealthCheck, given, settings, strategies as st

from kipfix.agent.collector.server import Collector, PeerReports
from kipfix.agent.config import CollectorConfig, TemplateConfig
from kipfix.agent.export.ipfix.decoder import MalformedMessage, TemplateStore, decode_message
from kipfix.agent.export.ipfix.dummy import MINIMAL_TEMPLATE, dummy_records
from kipfix.agent.export.ipfix.exporter import IpfixExporter
from kipfix.agent.export.ipfix.options import ExportCounters
from kipfix.agent.export.ipfix.session import ExportSession
from kipfix.agent.export.sink import MeteringStats

KIPFIX = str(Path(sys.executable).with_name("kipfix"))
# The datagram of issue 12: a template declaring sourceIPv4Address variable-length, and a record
# giving it 0 octets. It used to raise ValueError in the UDP thread and end it.
ISSUE_DATAGRAM = bytes.fromhex("000a00210000000000000000000000010002000c012e00010008ffff012e000500")


def header(length: int, version: int = 10, domain: int = 1) -> bytes:
    return struct.pack("!HHIII", version, length, 0, 0, domain)


def valid_messages(count: int = 40) -> list[bytes]:
    """Templates, options and data messages as kipfix sends them."""
    exporter = IpfixExporter([], [TemplateConfig(256, MINIMAL_TEMPLATE),
                                  TemplateConfig(300, ("flowStartMilliseconds", "interfaceName",
                                                       "sourceIPv6Address", "packetDeltaCount"))], 1)
    templates = [ft.template for ft in exporter.flow_templates] + exporter.options.templates
    session = ExportSession(1, 1400, templates)
    messages = session.template_messages(0)
    messages += [p.message for p in session.data_messages(exporter.encode(dummy_records(count)), 0)]
    messages += [p.message for p in session.data_messages(
        exporter.options.groups(MeteringStats(observation_points=((1, 1, "eth0", "host"),)), ExportCounters(), 0),
        0)]
    return messages


VALID = valid_messages()
_store = TemplateStore()
_decoded = [decode_message(m, _store, "peer") for m in VALID]
RECORDS_IN_VALID = sum(len(d.records) for d in _decoded)  # data and options
DATA_IN_VALID = sum(len(d.data_records) for d in _decoded)


def decodes_or_is_malformed(data: bytes, store: TemplateStore) -> None:
    try:
        decode_message(data, store, "peer")
    except MalformedMessage:
        pass


# ---- the decoder, fuzzed ---------------------------------------------------------------

@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_any_bytes_decode_or_are_malformed(data):
    decodes_or_is_malformed(header(16 + len(data)) + data, TemplateStore())
    decodes_or_is_malformed(data, TemplateStore())


FIELD = st.tuples(st.integers(0, 0xFFFF), st.sampled_from([0, 1, 2, 3, 4, 6, 8, 16, 65535]) | st.integers(0, 0xFFFF),
                  st.integers(0, 2**32 - 1))


@st.composite
def framed_messages(draw):
    """Well-framed messages: random (options) templates, then data sets for them with random bytes."""
    sets = []
    ids = draw(st.lists(st.integers(250, 320), min_size=1, max_size=4))
    for template_id in ids:
        fields = draw(st.lists(FIELD, min_size=0, max_size=6))
        body = b""
        for element_id, length, pen in fields:
            body += struct.pack("!HH", element_id, length) + (struct.pack("!I", pen) if element_id & 0x8000 else b"")
        options = draw(st.booleans())
        if options:
            scope = draw(st.integers(0, len(fields) + 1))
            record = struct.pack("!HHH", template_id, len(fields), scope) + body
            sets.append(struct.pack("!HH", 3, 4 + len(record)) + record)
        else:
            record = struct.pack("!HH", template_id, len(fields)) + body
            sets.append(struct.pack("!HH", 2, 4 + len(record)) + record)
    for template_id in draw(st.lists(st.sampled_from(ids), max_size=4)):
        payload = draw(st.binary(max_size=60))
        sets.append(struct.pack("!HH", template_id, 4 + len(payload)) + payload)
    body = b"".join(sets)
    return header(16 + len(body)) + body


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(framed_messages())
def test_random_templates_and_records_decode_or_are_malformed(data):
    store = TemplateStore()
    decodes_or_is_malformed(data, store)
    decodes_or_is_malformed(data, store)  # the same again, now with its templates known


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(range(len(VALID))), st.lists(st.tuples(st.integers(0, 1399), st.integers(0, 255)),
                                                     min_size=1, max_size=8), st.integers(0, 1400))
def test_damaged_kipfix_messages_decode_or_are_malformed(index, flips, cut):
    store = TemplateStore()
    for message in VALID[:2]:  # templates
        decode_message(message, store, "peer")
    data = bytearray(VALID[index])
    for position, value in flips:
        if position < len(data):
            data[position] = value
    decodes_or_is_malformed(bytes(data[:max(cut, 4)]), store)


def test_the_issue_datagram_is_malformed_at_its_template():
    try:
        decode_message(ISSUE_DATAGRAM, TemplateStore(), "peer")
    except MalformedMessage as err:
        assert "sourceIPv4Address (ipv4Address) is declared variable-length" in str(err)
    else:
        raise AssertionError("accepted")


def test_templates_are_bounded():
    store = TemplateStore(max_templates=100)
    for domain in range(300):
        for template_id in (256, 257):
            body = struct.pack("!HH", 2, 12) + struct.pack("!HHHH", template_id, 1, 2, 8)
            decode_message(header(16 + len(body), domain=domain) + body, store, "peer")
    assert (len(store), store.evicted) == (100, 500)
    assert store.get("peer", 299, 257) is not None and store.get("peer", 0, 256) is None


def test_reports_are_limited_per_peer():
    lines = []
    reports = PeerReports(lines.append, interval=10)
    for i in range(1000):
        reports.report("192.0.2.1:5", "malformed", f"bad {i}", now=i * 0.01)
    reports.report("192.0.2.2:5", "malformed", "other peer", now=5)
    reports.report("192.0.2.1:5", "malformed", "bad again", now=10.5)
    reports.flush(now=30, force=True)
    assert lines == ["bad 0", "other peer", "bad again (and 999 more from 192.0.2.1:5 in the last 10 s)"]


# ---- the real listener -------------------------------------------------------------------

def hostile_datagrams(count: int, rng: random.Random) -> list[bytes]:
    out = [ISSUE_DATAGRAM]
    while len(out) < count:
        kind = rng.randrange(4)
        if kind == 0:
            out.append(bytes(rng.randrange(256) for _ in range(rng.randrange(0, 200))))
        elif kind == 1:
            data = bytearray(rng.choice(VALID))
            for _ in range(rng.randrange(1, 6)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            out.append(bytes(data))
        elif kind == 2:
            data = rng.choice(VALID)
            out.append(data[:rng.randrange(len(data))])
        else:
            out.append(ISSUE_DATAGRAM)
    return out


def test_thousands_of_hostile_datagrams_leave_the_listener_decoding():
    err = io.StringIO()
    collector = Collector(out=None, err=err, keep=False).start()
    rng = random.Random(12)
    sent = 0
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            datagrams = hostile_datagrams(3000, rng)
            for start in range(0, len(datagrams), 200):  # in steps the listener keeps up with: none dropped
                for data in datagrams[start:start + 200]:
                    sock.sendto(data, ("127.0.0.1", collector.port))
                    sent += 1
                assert collector.wait_for(lambda c: c.malformed + c.messages_received == sent, 30)
            # and then kipfix's own messages decode as ever
            before = collector.data_records
            for data in VALID:
                sock.sendto(data, ("127.0.0.1", collector.port))
            assert collector.wait_for(lambda c: c.data_records - before == DATA_IN_VALID, 10)
    finally:
        collector.stop()
    assert collector.malformed >= 1000 and collector.malformed_by_peer  # most of them are malformed
    assert len(collector.received) == 0  # keep=False: nothing piles up
    lines = err.getvalue().splitlines()
    # one peer: a line at first, then a summary at most every 10 s (and at stop)
    assert 1 <= len([line for line in lines if line.startswith("rejected udp")]) <= 10, lines[:20]


def test_tcp_streams_are_limited_closed_when_idle_or_broken():
    collector = Collector(out=None, err=None, keep=False, max_connections=3, idle_timeout=1.0).start()
    try:
        open_ = [socket.create_connection(("127.0.0.1", collector.port)) for _ in range(3)]
        assert collector.wait_for(lambda c: len(c._connections) == 3, 10)
        extra = socket.create_connection(("127.0.0.1", collector.port))
        assert extra.recv(1) == b""  # refused: closed at once
        assert collector.connections_refused == 1
        # a garbage stream is closed and counted; the others go on
        open_[0].sendall(b"\x00\x05" + os.urandom(200))
        assert open_[0].recv(1) == b""
        # idle connections are closed after idle_timeout
        for sock in open_[1:]:
            assert sock.recv(1) == b""
        assert collector.wait_for(lambda c: c.idle_closed == 2 and c.malformed == 1, 10)
        # and a good exporter still gets in
        exporter = IpfixExporter([CollectorConfig("x", "127.0.0.1", collector.port, "tcp")],
                                 [TemplateConfig(256, MINIMAL_TEMPLATE)], 1)
        exporter.export(dummy_records(5), MeteringStats())
        exporter.close(5)
        assert collector.wait_for(lambda c: c.data_records >= 5, 10)
        for sock in [*open_, extra]:
            sock.close()
    finally:
        collector.stop()


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


def test_kipfix_collect_memory_stays_flat_and_a_closed_pipe_ends_it():
    read_end, write_end = os.pipe()
    process = subprocess.Popen([KIPFIX, "collect", "--listen", "127.0.0.1:0", "--json"], stdout=write_end,
                               stderr=subprocess.PIPE, text=True)
    os.close(write_end)
    reader = os.fdopen(read_end, "rb")
    try:
        port = int(process.stderr.readline().split("127.0.0.1:")[1].split()[0])
        def send_and_read(rounds: int) -> None:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                for _ in range(rounds):
                    for message in VALID:
                        sock.sendto(message, ("127.0.0.1", port))
                    for _line in range(RECORDS_IN_VALID):  # every record comes out as a JSON line
                        assert reader.readline().startswith(b"{")
        send_and_read(50)
        first = rss_kib(process.pid)
        send_and_read(500)  # 500 x len(VALID) messages
        assert rss_kib(process.pid) - first < 8 * 1024  # kept everything before: tens of MB here
        reader.close()  # the reader goes away: the next write ends it as SIGPIPE ends a filter
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            for message in VALID:
                sock.sendto(message, ("127.0.0.1", port))
        assert process.wait(30) == -signal.SIGPIPE
        rest = process.stderr.read()
        assert "Broken pipe" not in rest and "Traceback" not in rest, rest
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_keeping_a_number_of_messages_keeps_at_most_twice_that():
    collector = Collector(out=None, err=None, keep=5).start()
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            for _ in range(8):
                for data in VALID:
                    sock.sendto(data, ("127.0.0.1", collector.port))
        assert collector.wait_for(lambda c: c.messages_received == 8 * len(VALID), 10)
        assert 5 <= len(collector.received) <= 10 and collector.received[-1].raw == VALID[-1]
    finally:
        collector.stop()
