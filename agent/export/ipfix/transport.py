"""IPFIX transports (RFC 7011 10): UDP, TCP, and TLS over TCP.

A transport only moves whole messages. Reconnecting, template (re)sending
and sequence numbers belong to the exporter's collector session, which asks
``stream`` to know whether templates go once per connection (TCP, TLS) or
periodically (UDP).

What a transport can tell about delivery, for counting losses:
- UDP sockets are connected, so the kernel reports an ICMP port or host
  unreachable for an earlier datagram as an error (``check``); a message
  sent some time ago with no error since counts as delivered
  (``last_delivered``).
- TCP/TLS ``send`` returns where the message ends in the stream (bytes the
  peer acknowledged + bytes still queued, both from the kernel, so TLS
  framing is included), and ``acked_at_close`` keeps the peer's
  acknowledged byte count (TCP_INFO, which outlives a reset) when the
  connection ends: every message ending after it was not acknowledged.
"""

from __future__ import annotations

import fcntl
import os
import select
import socket
import ssl
import struct
import termios
import time
from typing import Any

CONNECT_TIMEOUT = 5.0
SEND_TIMEOUT = 10.0
# struct tcp_info: tcpi_bytes_acked (u64) since Linux 4.1, at this offset on every architecture
TCP_INFO_LENGTH = 128
TCPI_BYTES_ACKED = 120
SIOCOUTQ = termios.TIOCOUTQ  # bytes written and not acknowledged (sockios.h: SIOCOUTQ == TIOCOUTQ)
SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)


class TransportError(OSError):
    """Sending failed; for stream transports the connection is closed."""


def tls_context(tls: Any) -> ssl.SSLContext:
    """Client context from a TLSConfig (ca_file, cert_file, key_file); ValueError naming a bad file."""
    for label, path in (("CA file", tls.ca_file), ("certificate file", tls.cert_file),
                        ("key file", tls.key_file)):
        if path is not None and not os.path.isfile(path):
            raise ValueError(f"TLS {label} {path!r} does not exist; accepted: a readable PEM file")
    if (tls.cert_file is None) != (tls.key_file is None):
        raise ValueError("TLS client certificate and key go together; give both files or neither")
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_verify_locations(cafile=tls.ca_file)
    except (ssl.SSLError, OSError) as err:
        raise ValueError(f"TLS CA file {tls.ca_file!r} is not a usable PEM CA certificate: {err}") from None
    if tls.cert_file:
        try:
            context.load_cert_chain(tls.cert_file, tls.key_file)
        except (ssl.SSLError, OSError) as err:
            raise ValueError(f"TLS certificate {tls.cert_file!r} and key {tls.key_file!r} do not load as a "
                             f"PEM pair: {err}") from None
    return context  # check_hostname and CERT_REQUIRED are on by default


def set_send_buffer(sock: socket.socket, size: int) -> int:
    """Ask for a ``size``-octet send buffer (above net.core.wmem_max too, with CAP_NET_ADMIN);
    returns what the kernel gave (it doubles the request for its bookkeeping)."""
    if size:
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, size)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)


class UdpTransport:
    stream = False

    def __init__(self, host: str, port: int, send_buffer: int = 0):
        self.host, self.port = host, port
        self.send_buffer = send_buffer
        self.sock: socket.socket | None = None
        self.peer = None
        self.last_delivered = 0.0  # Unix time of the last message no error came back for
        self.unconfirmed_since: float | None = None  # monotonic time of the first message not yet confirmed
        self._last_sent = (0.0, 0.0)  # (monotonic, Unix time) of the last message

    @property
    def connected(self) -> bool:
        return self.sock is not None

    def connect(self) -> None:
        family, kind, proto, _, peer = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_DGRAM)[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(SEND_TIMEOUT)
            set_send_buffer(sock, self.send_buffer)
            sock.connect(peer)  # connected: ICMP errors about our datagrams come back on this socket
        except OSError as err:
            sock.close()
            raise TransportError(err.errno, f"UDP to {self.host}:{self.port}: {err.strerror or err}") from err
        self.sock, self.peer = sock, peer

    def check(self, settle: float = 0.0) -> None:
        """TransportError if the collector's host refused an earlier message (ICMP unreachable);
        otherwise messages sent ``settle`` s ago or earlier count as delivered."""
        code = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)  # reading it clears it
        if code:
            self.unconfirmed_since = None
            raise TransportError(code, f"UDP to {self.host}:{self.port}: {os.strerror(code)} (an ICMP error "
                                       "about an earlier message)")
        if self.unconfirmed_since is None:
            return
        now = time.monotonic()
        last_mono, last_wall = self._last_sent
        if now - last_mono >= settle:
            self.last_delivered = last_wall
            self.unconfirmed_since = None
        elif now - self.unconfirmed_since >= settle:
            self.last_delivered = time.time() - settle
            self.unconfirmed_since = last_mono

    def send(self, message: bytes) -> None:
        self.check(settle=float("inf"))  # a pending error: this message is not sent
        try:
            self.sock.send(message)
        except OSError as err:
            raise TransportError(err.errno, f"UDP send to {self.host}:{self.port}: {err.strerror or err}") from err
        self._last_sent = (time.monotonic(), time.time())
        if self.unconfirmed_since is None:
            self.unconfirmed_since = self._last_sent[0]

    def alive(self) -> bool:
        return self.sock is not None

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self.unconfirmed_since = None


class TcpTransport:
    stream = True

    def __init__(self, host: str, port: int, context: ssl.SSLContext | None = None,
                 server_name: str | None = None, send_buffer: int = 0):
        self.host, self.port = host, port
        self.context, self.server_name = context, server_name
        self.send_buffer = send_buffer
        self.sock: socket.socket | None = None
        self.acked_at_close: int | None = None  # the peer's acknowledged bytes when the last connection ended
        self.last_delivered = 0.0

    @property
    def connected(self) -> bool:
        return self.sock is not None

    def connect(self) -> None:
        try:
            sock = socket.create_connection((self.host, self.port), timeout=CONNECT_TIMEOUT)
        except OSError as err:
            raise TransportError(err.errno, f"connect to {self.host}:{self.port}: {err.strerror or err}") from err
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            set_send_buffer(sock, self.send_buffer)
            if self.context is not None:
                sock = self.context.wrap_socket(sock, server_hostname=self.server_name or self.host)
        except (OSError, ssl.SSLError) as err:
            sock.close()
            raise TransportError(getattr(err, "errno", None) or 0,
                                 f"TLS handshake with {self.host}:{self.port}: {err}") from err
        sock.settimeout(SEND_TIMEOUT)
        self.sock = sock

    def alive(self) -> bool:
        """False if the collector closed the connection (it never sends us data)."""
        if self.sock is None:
            return False
        try:
            readable, _, _ = select.select([self.sock], [], [], 0)
            if readable:
                if isinstance(self.sock, ssl.SSLSocket):
                    self.sock.setblocking(False)
                    try:
                        data = self.sock.recv(1)
                    except ssl.SSLWantReadError:
                        return True
                    finally:
                        self.sock.settimeout(SEND_TIMEOUT)
                else:
                    data = self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
                if not data:
                    self.close()
                    return False
        except (OSError, ValueError):
            self.close()
            return False
        return True

    def check(self, settle: float = 0.0) -> None:
        """TCP reports failures on send and in ``alive``."""

    def send(self, message: bytes) -> int | None:
        """Send all of ``message``; returns where it ends in the stream, in the numbering of
        ``acked`` (None if the kernel cannot tell)."""
        if self.sock is None:
            raise TransportError(0, f"not connected to {self.host}:{self.port}")
        try:
            self.sock.sendall(message)
        except OSError as err:
            self.close()
            raise TransportError(err.errno, f"send to {self.host}:{self.port}: {err.strerror or err}") from err
        self.last_delivered = time.time()
        acked = self.acked()
        if acked is None:
            return None
        try:
            return acked + struct.unpack("=i", fcntl.ioctl(self.sock.fileno(), SIOCOUTQ, b"\0" * 4))[0]
        except OSError:
            return None

    def acked(self) -> int | None:
        """Bytes of this connection the peer's TCP acknowledged (TCP_INFO tcpi_bytes_acked)."""
        if self.sock is None:
            return None
        try:
            info = self.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_LENGTH)
        except OSError:
            return None
        if len(info) < TCPI_BYTES_ACKED + 8:
            return None
        return struct.unpack_from("=Q", info, TCPI_BYTES_ACKED)[0]

    def close(self) -> None:
        if self.sock is not None:
            self.acked_at_close = self.acked()  # before the fd goes: what the peer acknowledged
            try:
                self.sock.close()
            finally:
                self.sock = None


def make_transport(collector: Any) -> UdpTransport | TcpTransport:
    """The transport for a CollectorConfig (host, port, transport, tls)."""
    send_buffer = getattr(collector, "send_buffer", 0)
    if collector.transport == "udp":
        return UdpTransport(collector.host, collector.port, send_buffer)
    if collector.transport == "tcp":
        return TcpTransport(collector.host, collector.port, send_buffer=send_buffer)
    if collector.transport == "tls":
        if collector.tls is None:
            raise ValueError(f"collector {collector.address}: transport tls needs a CA file (tls.ca)")
        return TcpTransport(collector.host, collector.port, tls_context(collector.tls), collector.tls.server_name,
                            send_buffer)
    raise ValueError(f"collector {collector.address}: transport {collector.transport!r} is not accepted; "
                     "accepted: udp, tcp, tls")
