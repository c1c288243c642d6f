"""IPFIX data record encoding rate, minimal and full template, on one core.

Encodes whole batches per template (IpfixExporter.encode, as export() does),
with the C encoder and with the Python one (KIPFIX_ENCODER=python), then
frames them into messages (ExportSession.data_messages, 1400 octets). Each
figure is printed with the ratio to a plain copy of the same number of bytes
measured in the same run. Not a test: only the two encoders' bytes are
compared.

    .venv/bin/python bench/bench_ipfix_encode.py [--records N] [--repeat R] [--wire N]

The --wire part (default 1,000,000 records) times IpfixExporter.export() and
close() to a loopback UDP socket: encoding, framing and sendto, no kernel table.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

from kipfix.agent.config import TemplateConfig
from kipfix.agent.export.ipfix import fields, flowpack
from kipfix.agent.export.ipfix.dummy import MINIMAL_TEMPLATE, dummy_records
from kipfix.agent.export.ipfix.exporter import IpfixExporter
from kipfix.agent.export.routes import RouteResolver
from kipfix.agent.export.ipfix.session import ExportSession


def best(repeat: int, function) -> tuple[float, object]:
    """Fastest of ``repeat`` runs (seconds) and the last result."""
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return min(times), result


def copy_time(size: int, repeat: int) -> float:
    """A plain copy of ``size`` bytes into a buffer allocated beforehand (memcpy speed)."""
    source = (os.urandom(1 << 20) * (size // (1 << 20) + 1))[:size]
    target = bytearray(size)

    def copy():
        target[:] = source

    seconds, _ = best(repeat, copy)
    return seconds


def encode_time(names: tuple[str, ...], chunks, repeat: int, resolver, encoder: str) -> tuple[float, list, object]:
    """Best time to encode every chunk with ``encoder`` ("c" or "python"), the batches, the exporter."""
    os.environ["KIPFIX_ENCODER"] = encoder  # read when the exporter compiles its packers
    try:
        exporter = IpfixExporter([], [TemplateConfig(256, names)], observation_domain_id=1, exporting_process_id=1,
                                 route_resolver=resolver)
    finally:
        del os.environ["KIPFIX_ENCODER"]

    def encode():
        return [exporter.encode(c) for c in chunks]

    encode(), encode()  # warm caches (routes) and code paths
    seconds, encoded = best(repeat, encode)
    return seconds, encoded, exporter


def bench(name: str, names: tuple[str, ...], records, chunk: int, repeat: int, resolver=None) -> None:
    chunks = [records[i:i + chunk] for i in range(0, len(records), chunk)]
    python_seconds, python_encoded, _ = encode_time(names, chunks, repeat, resolver, "python")
    seconds, encoded, exporter = encode_time(names, chunks, repeat, resolver, "c")
    if not flowpack.AVAILABLE:
        print("  (the C encoder is not built: both lines are the Python encoder)")
    assert encoded == python_encoded, "the C and Python encoders disagree"
    size = sum(len(r) for groups in encoded for g in groups for r in g[1])
    session = ExportSession(1, 1400, [ft.template for ft in exporter.flow_templates])

    def frame():
        return [p.message for groups in encoded for p in session.data_messages(groups, 0)]

    frame_seconds, messages = best(repeat, frame)
    copy = copy_time(size, repeat)
    n = len(records)
    print(f"{name}: {len(names)} elements, {size / n:.1f} octets/record")
    print(f"  encode (C)        {n / seconds:>12,.0f} records/s  {size / seconds / 1e6:8.1f} MB/s  "
          f"{seconds / copy:7.1f}x a plain copy of {size:,} bytes ({copy * 1e3:.2f} ms)")
    print(f"  encode (Python)   {n / python_seconds:>12,.0f} records/s  {size / python_seconds / 1e6:8.1f} MB/s  "
          f"{python_seconds / copy:7.1f}x copy; the C encoder is {python_seconds / seconds:.1f}x faster")
    print(f"  encode (C) + msgs {n / (seconds + frame_seconds):>12,.0f} records/s  "
          f"({len(messages):,} messages of <= 1400 octets)  {(seconds + frame_seconds) / copy:7.1f}x copy")


def bench_wire(records, max_message_size: int = 1400) -> None:
    """export() + close() of every record to a UDP socket on loopback that a thread drains."""
    import socket
    import threading

    from kipfix.agent.config import CollectorConfig
    from kipfix.agent.export.sink import MeteringStats

    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    sink.bind(("127.0.0.1", 0))
    sink.settimeout(0.5)
    received = [0, 0]

    def drain():
        while True:
            try:
                data = sink.recv(65535)
            except (socket.timeout, OSError):
                return
            received[0] += 1
            received[1] += len(data)

    thread = threading.Thread(target=drain)
    thread.start()
    port = sink.getsockname()[1]
    config = CollectorConfig(f"127.0.0.1:{port}", "127.0.0.1", port, "udp", max_message_size=max_message_size,
                             queue_size=len(records))
    exporter = IpfixExporter([config], [TemplateConfig(256, MINIMAL_TEMPLATE)], observation_domain_id=1)
    start = time.perf_counter()
    exporter.export(records, MeteringStats())
    queued = time.perf_counter() - start
    exporter.close(600)
    seconds = time.perf_counter() - start
    thread.join()
    sink.close()
    sent = exporter.counters()[f"udp://127.0.0.1:{port}"]
    print(f"wire (minimal template, UDP {max_message_size}-octet messages, loopback):")
    print(f"  {len(records):,} records in {seconds:.2f} s = {len(records) / seconds:,.0f} records/s "
          f"(export() returned after {queued:.2f} s); {sent.messages:,} messages sent, "
          f"{received[0]:,} received, {sent.not_sent_flows:,} flows not sent")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--chunk", type=int, default=1024, help="records per encoded batch (export()'s chunk)")
    parser.add_argument("--wire", type=int, default=1_000_000, metavar="N",
                        help="also send N records through IpfixExporter to a loopback UDP socket (0: skip)")
    args = parser.parse_args()
    records = dummy_records(args.records)
    for r in records:  # all IPv4, so every record goes to the configured template
        if r.key.ip_version == 6:
            r.key = dataclasses.replace(r.key, ip_version=4, src=r.key.src[:4], dst=r.key.dst[:4]) \
                if dataclasses.is_dataclass(r.key) else r.key._replace(ip_version=4, src=r.key.src[:4],
                                                                        dst=r.key.dst[:4])
    print(f"{args.records:,} IPv4 records, batches of {args.chunk}, best of {args.repeat} runs, one core")
    bench("minimal template", MINIMAL_TEMPLATE, records, args.chunk, args.repeat)
    resolver = RouteResolver()  # prefix lengths and next hop from the host's table (cached per address)
    try:
        every = tuple(fields.fillable_names())
        # issue 3's full template: every IANA element kipfix fills; then with the pod elements too
        bench("full template", tuple(n for n in every if n not in fields.POD_NAMES), records, args.chunk,
              args.repeat, resolver)
        bench("full template + pod metadata", every, records, args.chunk, args.repeat, resolver)
    finally:
        resolver.close()
    if args.wire:
        wire = (records * (args.wire // len(records) + 1))[:args.wire]
        bench_wire(wire)


if __name__ == "__main__":
    main()
