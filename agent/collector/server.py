"""A small IPFIX collector for demos and tests: UDP and TCP (optionally TLS) on one address.

Templates are learned per transport session (UDP peer address, or TCP
connection) and observation domain, and so are observation points (the
options records scoped by observationPointId): a record's interface shows
as NAME@NETNS, unambiguous across network namespaces. Records are printed as a table or as
JSON lines; malformed messages are reported with the reason and skipped
(a malformed TCP stream is closed, since it cannot be resynchronised).
"""

from __future__ import annotations

import ipaddress
import json
import socket
import ssl
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, TextIO

from ..flows.record import PROTO_NAMES
from ..export.ipfix.decoder import (DecodedMessage, DecodedRecord, MalformedMessage, TemplateStore, decode_message,
                                    read_stream_message)
from ..export.ipfix.infomodel import DEFAULT_PEN, default_model


@dataclass
class Received:
    transport: str  # "udp" or "tcp"
    peer: Any
    raw: bytes
    message: DecodedMessage | None
    error: str | None = None


def _json_value(value: Any) -> Any:
    if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return str(value)
    if isinstance(value, (bytes, bytearray)):
        return value.hex()
    return value


def record_json(peer: Any, message: DecodedMessage, record: DecodedRecord, point: tuple | None = None) -> str:
    """One JSON line; ``point`` (netns, interface name, ifindex) adds the record's observation point."""
    data = {"peer": f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer),
            "domain": message.domain_id, "sequence": message.sequence, "template": record.template_id}
    if record.scope:
        data["scope"] = list(record.scope)
    data["fields"] = {k: _json_value(v) for k, v in record.values.items()}
    if point is not None:
        data["observationPoint"] = dict(zip(("netns", "interface", "ifindex"), point))
    return json.dumps(data)


TABLE_HEADER = (f"{'start':<23} {'dur(s)':>7} {'proto':<6} {'source':<41} {'destination':<41} "
                f"{'interface':<16} {'dir':<3} {'packets':>9} {'octets':>12}")


class ObservationPoints:
    """observationPointId -> (netns, interface name, ifindex), per exporter and domain, from the options
    records scoped by observationPointId: an ifindex alone is ambiguous across network namespaces."""

    def __init__(self):
        self._points: dict[tuple, tuple[str, str, int]] = {}

    def learn(self, peer: Any, domain: int, record: DecodedRecord) -> None:
        v = record.values
        if record.scope[:1] == ("observationPointId",):
            self._points[(peer, domain, v["observationPointId"])] = (
                v.get("networkNamespace", ""), v.get("interfaceName", ""), v.get("ingressInterface"))

    def lookup(self, peer: Any, domain: int, record: DecodedRecord) -> tuple[str, str, int] | None:
        point = record.values.get("observationPointId")
        return None if point is None else self._points.get((peer, domain, point))


def _endpoint(values: dict, side: str) -> str:
    address = values.get(f"{side}IPv4Address") or values.get(f"{side}IPv6Address")
    if address is not None and int(address) == 0:
        address = values.get(f"{side}IPv6Address") if address.version == 4 else address
    port = values.get(f"{side}TransportPort")
    text = "-" if address is None else (f"[{address}]" if address.version == 6 and port is not None
                                          else str(address))
    return f"{text}:{port}" if port is not None else text


def _pod(values: dict, side: str) -> str:
    name = values.get(f"{side}PodName")
    return f"{values.get(f'{side}PodNamespace', '')}/{name}" if name else "-"


def record_line(record: DecodedRecord, point: tuple | None = None) -> str:
    """A table row; records with pod elements get ``pods NAMESPACE/NAME -> NAMESPACE/NAME`` after it.

    The interface column is ``NAME@NETNS`` when the record's observation point is known (``point``:
    netns, name, ifindex), else the ifindex.
    """
    v = record.values
    if record.scope:
        return f"options {record.template_id}: " + " ".join(f"{k}={_json_value(x)}" for k, x in v.items())
    start, end = v.get("flowStartMilliseconds"), v.get("flowEndMilliseconds")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(start / 1000)) + f".{start % 1000:03d}" \
        if start is not None else "-"
    duration = f"{(end - start) / 1000:.3f}" if start is not None and end is not None else "-"
    proto = v.get("protocolIdentifier")
    proto = PROTO_NAMES.get(proto, str(proto)) if proto is not None else "-"
    interface = v.get("ingressInterface") or v.get("egressInterface") or "-"
    if point is not None:
        interface = f"{point[1]}@{point[0]}"
    direction = {0: "in", 1: "out"}.get(v.get("flowDirection"), "-")
    line = (f"{when:<23} {duration:>7} {proto:<6} {_endpoint(v, 'source'):<41} "
            f"{_endpoint(v, 'destination'):<41} {interface!s:<16} {direction:<3} "
            f"{v.get('packetDeltaCount', '-')!s:>9} {v.get('octetDeltaCount', '-')!s:>12}")
    if "sourcePodName" in v or "destinationPodName" in v:
        line += f"  pods {_pod(v, 'source')} -> {_pod(v, 'destination')}"
    return line


class Collector:
    """Listen on ``host:port`` (port 0: any free port, same for UDP and TCP).

    ``out`` receives the printed records (None: print nothing); every received
    message is also kept in ``received`` for programmatic use.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, json_lines: bool = False,
                 out: TextIO | None = sys.stdout, err: TextIO | None = sys.stderr,
                 tls_context: ssl.SSLContext | None = None, enterprise_number: int = DEFAULT_PEN,
                 keep: bool = True):
        self.json_lines = json_lines
        self.out, self.err = out, err
        self.tls_context = tls_context
        self.keep = keep
        self.store = TemplateStore(default_model(enterprise_number))
        self.points = ObservationPoints()
        self.received: list[Received] = []
        self.data_records = 0
        self.errors: list[str] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._threads: list[threading.Thread] = []
        self._connections: set[socket.socket] = set()
        self._header_printed = False
        self.udp, self.tcp = self._bind(host, port)
        self.host, self.port = host, self.udp.getsockname()[1]

    def _bind(self, host: str, port: int) -> tuple[socket.socket, socket.socket]:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0][0]
        for _ in range(20):
            udp = socket.socket(family, socket.SOCK_DGRAM)
            udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            udp.bind((host, port))
            chosen = udp.getsockname()[1]
            tcp = socket.socket(family, socket.SOCK_STREAM)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                tcp.bind((host, chosen))
            except OSError:
                udp.close()
                tcp.close()
                if port:
                    raise
                continue
            tcp.listen(16)
            return udp, tcp
        raise OSError(f"no port free for both UDP and TCP on {host}")

    # -- running -------------------------------------------------------------------

    def start(self) -> "Collector":
        """Serve in background threads (tests); stop() ends them."""
        for target, name in ((self._serve_udp, "udp"), (self._serve_tcp, "tcp")):
            thread = threading.Thread(target=target, name=f"collector-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def serve(self, count: int | None = None, timeout: float | None = None) -> int:
        """Serve until ``count`` data records arrived or ``timeout`` s passed (None: forever)."""
        self.start()
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            self.wait_for(lambda c: count is not None and c.data_records >= count,
                          None if deadline is None else max(deadline - time.monotonic(), 0))
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()
        return self.data_records

    def wait_for(self, predicate: Callable[["Collector"], bool], timeout: float | None) -> bool:
        """Block until ``predicate(self)`` holds (True) or the timeout passes (False)."""
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self), timeout)

    def stop(self) -> None:
        self._stopping = True
        for sock in [self.udp, self.tcp, *self._connections]:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        for thread in self._threads:
            thread.join(2)

    def close_connections(self) -> None:
        """Drop every TCP connection (tests: a collector restart)."""
        for sock in list(self._connections):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    # -- input ---------------------------------------------------------------------

    def _serve_udp(self) -> None:
        while not self._stopping:
            try:
                data, peer = self.udp.recvfrom(65535)
            except OSError:
                return
            if self._stopping or peer is None:
                return
            self._handle("udp", peer, data)

    def _serve_tcp(self) -> None:
        while not self._stopping:
            try:
                conn, peer = self.tcp.accept()
            except OSError:
                return
            thread = threading.Thread(target=self._serve_connection, args=(conn, peer), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _serve_connection(self, conn: socket.socket, peer: Any) -> None:
        key = ("tcp", peer)
        try:
            if self.tls_context is not None:
                conn = self.tls_context.wrap_socket(conn, server_side=True)
            self._connections.add(conn)
            reader = conn.makefile("rb")
            while not self._stopping:
                try:
                    data = read_stream_message(reader.read)
                except MalformedMessage as err:
                    self._reject("tcp", peer, b"", str(err) + "; closing the connection")
                    return
                if data is None:
                    return
                if not self._handle("tcp", peer, data, key):
                    self._report(f"closing TCP connection from {peer[0]}:{peer[1]}")
                    return
        except (OSError, ssl.SSLError) as err:
            if not self._stopping:
                self._report(f"connection from {peer[0]}:{peer[1]}: {err}")
        finally:
            self._connections.discard(conn)
            self.store.forget_peer(key)
            conn.close()

    def _handle(self, transport: str, peer: Any, data: bytes, key: Any = None) -> bool:
        key = key or (transport, peer)
        try:
            message = decode_message(data, self.store, key)
        except MalformedMessage as err:
            self._reject(transport, peer, data, str(err))
            return False
        lines = []
        for record in message.records:
            if record.scope:
                self.points.learn(key, message.domain_id, record)
            point = self.points.lookup(key, message.domain_id, record)
            if self.json_lines:
                lines.append(record_json(peer, message, record, point))
            else:
                if not self._header_printed and not record.scope:
                    lines.append(TABLE_HEADER)
                    self._header_printed = True
                lines.append(record_line(record, point))
        for set_id in sorted(set(message.unknown_sets)):
            self._report(f"{transport} {peer[0]}:{peer[1]} domain {message.domain_id}: data set {set_id} "
                         "without a known template skipped")
        with self._cond:
            if self.keep:
                self.received.append(Received(transport, peer, data, message))
            self.data_records += len(message.data_records)
            if self.out is not None and lines:
                self.out.write("\n".join(lines) + "\n")
                self.out.flush()
            self._cond.notify_all()
        return True

    def _reject(self, transport: str, peer: Any, data: bytes, reason: str) -> None:
        text = f"rejected {transport} message from {peer[0]}:{peer[1]}: {reason}"
        with self._cond:
            self.errors.append(text)
            if self.keep:
                self.received.append(Received(transport, peer, data, None, reason))
            self._cond.notify_all()
        self._report(text)

    def _report(self, text: str) -> None:
        if self.err is not None:
            print(text, file=self.err, flush=True)

    # -- for tests -----------------------------------------------------------------

    def messages(self) -> list[DecodedMessage]:
        with self._cond:
            return [r.message for r in self.received if r.message is not None]

    def records(self, template_id: int | None = None) -> list[DecodedRecord]:
        return [rec for m in self.messages() for rec in m.data_records
                if template_id is None or rec.template_id == template_id]
