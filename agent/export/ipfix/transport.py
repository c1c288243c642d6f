"""IPFIX transports (RFC 7011 10): UDP, TCP, and TLS over TCP.

A transport only moves whole messages. Reconnecting, template (re)sending
and sequence numbers belong to the exporter's collector session, which asks
``stream`` to know whether templates go once per connection (TCP, TLS) or
periodically (UDP).
"""

from __future__ import annotations

import os
import select
import socket
import ssl
from typing import Any

CONNECT_TIMEOUT = 5.0
SEND_TIMEOUT = 10.0


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


class UdpTransport:
    stream = False

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.sock: socket.socket | None = None
        self.peer = None

    @property
    def connected(self) -> bool:
        return self.sock is not None

    def connect(self) -> None:
        family, kind, proto, _, peer = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_DGRAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.settimeout(SEND_TIMEOUT)
        self.sock, self.peer = sock, peer

    def send(self, message: bytes) -> None:
        try:
            self.sock.sendto(message, self.peer)  # unconnected: no ICMP errors on later sends
        except OSError as err:
            raise TransportError(err.errno, f"UDP send to {self.host}:{self.port}: {err.strerror or err}") from err

    def alive(self) -> bool:
        return self.sock is not None

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


class TcpTransport:
    stream = True

    def __init__(self, host: str, port: int, context: ssl.SSLContext | None = None,
                 server_name: str | None = None):
        self.host, self.port = host, port
        self.context, self.server_name = context, server_name
        self.sock: socket.socket | None = None

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

    def send(self, message: bytes) -> None:
        if self.sock is None:
            raise TransportError(0, f"not connected to {self.host}:{self.port}")
        try:
            self.sock.sendall(message)
        except OSError as err:
            self.close()
            raise TransportError(err.errno, f"send to {self.host}:{self.port}: {err.strerror or err}") from err

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            finally:
                self.sock = None


def make_transport(collector: Any) -> UdpTransport | TcpTransport:
    """The transport for a CollectorConfig (host, port, transport, tls)."""
    if collector.transport == "udp":
        return UdpTransport(collector.host, collector.port)
    if collector.transport == "tcp":
        return TcpTransport(collector.host, collector.port)
    if collector.transport == "tls":
        if collector.tls is None:
            raise ValueError(f"collector {collector.address}: transport tls needs a CA file (tls.ca)")
        return TcpTransport(collector.host, collector.port, tls_context(collector.tls), collector.tls.server_name)
    raise ValueError(f"collector {collector.address}: transport {collector.transport!r} is not accepted; "
                     "accepted: udp, tcp, tls")
