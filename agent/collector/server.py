"""A small IPFIX collector for demos and tests: UDP and TCP (optionally TLS) on one address.

Templates are learned per transport session (UDP peer address, or TCP
connection) and observation domain, and so are observation points (the
options records scoped by observationPointId): a record's interface shows
as NAME@NETNS, unambiguous across network namespaces. Records are printed
as a table or as JSON lines, as they arrive.

Whatever arrives, it keeps serving: a malformed message is counted
(``malformed``, per peer too) and skipped (a malformed TCP stream is
closed, since it cannot be resynchronised); reports are one line per
peer at first, then at most one per peer every ``REPORT_SECONDS`` saying
how many more there were. Memory is bounded: records are printed and
dropped (``keep`` only for tests), templates are capped
(TemplateStore), at most ``max_connections`` TCP connections are served
and one idle for ``idle_timeout`` seconds is closed.
"""

from __future__ import annotations

import collections
import errno
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

REPORT_SECONDS = 10.0
MAX_CONNECTIONS = 64
IDLE_TIMEOUT = 600.0  # s: exporters send options records every minute or so; a silent one is gone
RECEIVE_BUFFER = 4 << 20
MAX_REPORTED_PEERS = 4096
MAX_ERRORS = 1000
MAX_POINTS = 65536  # observation points remembered, all exporters together


class PeerReports:
    """Report lines limited per peer and kind: the first at once, then one per ``interval``
    with the number of the others; ``write(text)`` prints."""

    def __init__(self, write: Callable[[str], None], interval: float = REPORT_SECONDS):
        self.write = write
        self.interval = interval
        self._lock = threading.Lock()
        # (peer, kind) -> [time of the last line, reports since it, last text]
        self._state: collections.OrderedDict[tuple, list] = collections.OrderedDict()

    def report(self, peer: str, kind: str, text: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            key = (peer, kind)
            state = self._state.get(key)
            if state is None:
                self._state[key] = state = [now, 0, text]
                while len(self._state) > MAX_REPORTED_PEERS:
                    self._state.popitem(last=False)
            elif now - state[0] < self.interval:
                state[1] += 1
                state[2] = text
                return
            else:
                suppressed = state[1]
                state[:] = [now, 0, text]
                if suppressed:
                    text = f"{text} (and {suppressed} more from {peer} in the last {self.interval:g} s)"
            self._state.move_to_end(key)
        self.write(text)

    def flush(self, now: float | None = None, force: bool = False) -> None:
        """Say how many reports were held back, for peers whose interval is over (all: ``force``)."""
        now = time.monotonic() if now is None else now
        lines = []
        with self._lock:
            for (peer, _kind), state in self._state.items():
                if state[1] and (force or now - state[0] >= self.interval):
                    lines.append(f"{state[2]} (and {state[1]} more from {peer} in the last "
                                 f"{now - state[0]:.0f} s)")
                    state[:] = [now, 0, state[2]]
        for line in lines:
            self.write(line)

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

    def __init__(self, limit: int = MAX_POINTS):
        self.limit = limit  # the least recently learned go first: no sender grows this without bound
        self._points: collections.OrderedDict[tuple, tuple[str, str, int]] = collections.OrderedDict()

    def learn(self, peer: Any, domain: int, record: DecodedRecord) -> None:
        v = record.values
        if record.scope[:1] == ("observationPointId",):
            key = (peer, domain, v["observationPointId"])
            self._points[key] = (v.get("networkNamespace", ""), v.get("interfaceName", ""),
                                 v.get("ingressInterface"))
            self._points.move_to_end(key)
            while len(self._points) > self.limit:
                self._points.popitem(last=False)

    def __len__(self) -> int:
        return len(self._points)

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


def peer_text(peer: Any) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"[{peer[0]}]:{peer[1]}" if ":" in str(peer[0]) else f"{peer[0]}:{peer[1]}"
    return str(peer)


class Collector:
    """Listen on ``host:port`` (port 0: any free port, same for UDP and TCP).

    ``out`` receives the printed records (None: print nothing). ``keep``:
    True keeps every received message in ``received`` (tests), False none,
    a number the last that many.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, json_lines: bool = False,
                 out: TextIO | None = sys.stdout, err: TextIO | None = sys.stderr,
                 tls_context: ssl.SSLContext | None = None, enterprise_number: int = DEFAULT_PEN,
                 keep: bool | int = True, receive_buffer: int = RECEIVE_BUFFER,
                 max_connections: int = MAX_CONNECTIONS, idle_timeout: float = IDLE_TIMEOUT,
                 max_templates: int | None = None):
        self.json_lines = json_lines
        self.out, self.err = out, err
        self.tls_context = tls_context
        self.max_connections, self.idle_timeout = max_connections, idle_timeout
        self.store = TemplateStore(default_model(enterprise_number),
                                   **({} if max_templates is None else {"max_templates": max_templates}))
        self.points = ObservationPoints()
        self._keep_at_most = None if keep is True else int(keep)
        self.keep = self._keep_at_most is None or self._keep_at_most > 0
        self.received: list[Received] = []  # a list: tests index and slice it
        self.data_records = 0
        self.messages_received = 0
        self.malformed = 0  # messages (and TCP streams) rejected
        self.malformed_by_peer: collections.Counter[str] = collections.Counter()
        self.connections_refused = 0  # over max_connections
        self.idle_closed = 0
        self.errors: list[str] = []  # the latest rejections (at most MAX_ERRORS)
        self.output_closed = False  # whoever read our output went away (kipfix collect | head)
        self.reports = PeerReports(self._report)
        self._cond = threading.Condition()
        self._stopping = False
        self._threads: list[threading.Thread] = []
        self._connections: set[socket.socket] = set()
        self._header_printed = False
        self.udp, self.tcp = self._bind(host, port, receive_buffer)
        self.host, self.port = host, self.udp.getsockname()[1]

    def _bind(self, host: str, port: int, receive_buffer: int) -> tuple[socket.socket, socket.socket]:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0][0]
        for _ in range(20):
            udp = socket.socket(family, socket.SOCK_DGRAM)
            udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
            udp.bind((host, port))
            udp.settimeout(1.0)  # wakes now and then to print held-back reports
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
        """Serve until ``count`` data records arrived, ``timeout`` s passed (None: forever) or the
        output was closed."""
        self.start()
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            self.wait_for(lambda c: c.output_closed or (count is not None and c.data_records >= count),
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
        for sock in [self.udp, self.tcp, *list(self._connections)]:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        for thread in list(self._threads):
            thread.join(2)
        self.reports.flush(force=True)

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
            except socket.timeout:
                self.reports.flush()
                continue
            except OSError:
                return
            if self._stopping or peer is None:
                return
            self._guarded("udp", peer, data)

    def _guarded(self, transport: str, peer: Any, data: bytes, key: Any = None) -> bool:
        """``_handle``, and whatever it raises is one more rejected message, never the end of this thread."""
        try:
            return self._handle(transport, peer, data, key)
        except Exception as err:  # noqa: BLE001 - no input may stop the collector
            self._reject(transport, peer, data, f"cannot be handled: {type(err).__name__}: {err}")
            return False

    def _serve_tcp(self) -> None:
        while not self._stopping:
            try:
                conn, peer = self.tcp.accept()
            except OSError:
                if self._stopping:
                    return
                time.sleep(0.1)  # e.g. EMFILE: try again rather than stop listening for good
                continue
            with self._cond:
                full = len(self._connections) >= self.max_connections
                if not full:
                    self._connections.add(conn)
                else:
                    self.connections_refused += 1
                self._cond.notify_all()
            if full:
                conn.close()
                self.reports.report(peer_text(peer), "refused", f"refused TCP connection from {peer_text(peer)}: "
                                    f"{self.max_connections} connections are open (the limit)")
                continue
            thread = threading.Thread(target=self._serve_connection, args=(conn, peer), daemon=True)
            thread.start()
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)

    def _serve_connection(self, conn: socket.socket, peer: Any) -> None:
        key = ("tcp", peer)
        raw = conn
        try:
            conn.settimeout(self.idle_timeout)  # a read waiting this long ends the connection
            if self.tls_context is not None:
                conn = self.tls_context.wrap_socket(conn, server_side=True)
                with self._cond:
                    self._connections.discard(raw)
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
                if not self._guarded("tcp", peer, data, key):
                    return
        except socket.timeout:
            with self._cond:
                self.idle_closed += 1
                self._cond.notify_all()
            self.reports.report(peer_text(peer), "idle", f"closed TCP connection from {peer_text(peer)}: "
                                f"nothing received for {self.idle_timeout:g} s")
        except (OSError, ssl.SSLError, ValueError) as err:
            if not self._stopping:
                self.reports.report(peer_text(peer), "connection", f"connection from {peer_text(peer)}: {err}")
        finally:
            with self._cond:
                self._connections.discard(conn)
                self._connections.discard(raw)
                self._cond.notify_all()
            self.store.forget_peer(key)
            conn.close()

    def _handle(self, transport: str, peer: Any, data: bytes, key: Any = None) -> bool:
        key = key or (transport, peer)
        try:
            message = decode_message(data, self.store, key)
        except MalformedMessage as err:
            self._reject(transport, peer, data, str(err) + ("; closing the connection" if transport == "tcp"
                                                            else ""))
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
            self.reports.report(peer_text(peer), "unknown-set", f"{transport} {peer_text(peer)} domain "
                                f"{message.domain_id}: data set {set_id} without a known template skipped")
        with self._cond:
            if self.keep:
                self._keep(Received(transport, peer, data, message))
            self.messages_received += 1
            self.data_records += len(message.data_records)
            if self.out is not None and lines and not self.output_closed:
                try:
                    self.out.write("\n".join(lines) + "\n")
                    self.out.flush()
                except BrokenPipeError:
                    self.output_closed = True  # serve() ends; kipfix collect exits as a filter does
                except OSError as err:
                    if err.errno != errno.EPIPE:
                        raise
                    self.output_closed = True
            self._cond.notify_all()
        return True

    def _reject(self, transport: str, peer: Any, data: bytes, reason: str) -> None:
        who = peer_text(peer)
        text = f"rejected {transport} message from {who}: {reason}"
        with self._cond:
            self.malformed += 1
            self.malformed_by_peer[who] += 1
            if len(self.malformed_by_peer) > MAX_REPORTED_PEERS:
                self.malformed_by_peer = collections.Counter(dict(self.malformed_by_peer.most_common(
                    MAX_REPORTED_PEERS // 2)))
            self.errors.append(text)
            if len(self.errors) > 2 * MAX_ERRORS:
                del self.errors[:-MAX_ERRORS]
            if self.keep:
                self._keep(Received(transport, peer, data, None, reason))
            self._cond.notify_all()
        self.reports.report(who, "malformed", text)

    def _keep(self, received: Received) -> None:
        self.received.append(received)
        at_most = self._keep_at_most
        if at_most is not None and len(self.received) > 2 * at_most:
            del self.received[:-at_most]  # trimmed now and then, not on every message

    def _report(self, text: str) -> None:
        if self.err is not None:
            try:
                print(text, file=self.err, flush=True)
            except (OSError, ValueError):
                pass

    # -- for tests -----------------------------------------------------------------

    def messages(self) -> list[DecodedMessage]:
        with self._cond:
            return [r.message for r in self.received if r.message is not None]

    def records(self, template_id: int | None = None) -> list[DecodedRecord]:
        return [rec for m in self.messages() for rec in m.data_records
                if template_id is None or rec.template_id == template_id]
