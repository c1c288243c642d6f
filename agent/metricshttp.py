"""Serving ``/metrics``: plain HTTP, or HTTPS with optional client certificates, and optional
HTTP basic authentication.

prometheus_client's MetricsHandler renders the registry; this adds what an
endpoint on a router or a node needs when more than its operators can reach
it: TLS (``metrics.tls``: cert, key), client certificates signed by
``metrics.tls.clientCA`` (required once a CA is given), and basic
authentication (``metrics.basicAuth``: the password from a file, compared in
constant time). The TLS handshake runs in the connection's own thread with a
timeout, so a client that stalls it cannot hold up the others.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import socket
import ssl
import threading
from http.server import ThreadingHTTPServer
from typing import Any

from prometheus_client import MetricsHandler

HANDSHAKE_TIMEOUT = 10.0
REALM = "kipfix"


def tls_server_context(cert: str, key: str, client_ca: str | None) -> ssl.SSLContext:
    """ValueError naming the file that does not load."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as err:
        raise ValueError(f"metrics.tls: certificate {cert!r} and key {key!r} do not load as a PEM pair: "
                         f"{err}") from None
    if client_ca:
        try:
            context.load_verify_locations(cafile=client_ca)
        except (ssl.SSLError, OSError) as err:
            raise ValueError(f"metrics.tls.clientCA: {client_ca!r} is not a usable PEM CA certificate: "
                             f"{err}") from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple, handler: type, context: ssl.SSLContext | None):
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.context = context
        super().__init__(address, handler)

    def finish_request(self, request: socket.socket, client_address: Any) -> None:
        if self.context is None:
            super().finish_request(request, client_address)
            return
        request.settimeout(HANDSHAKE_TIMEOUT)
        try:
            secure = self.context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError):
            return  # no certificate, a wrong one, plain HTTP, or too slow: nothing to answer
        try:
            super().finish_request(secure, client_address)
        finally:
            secure.close()


def _handler(registry: Any, credentials: tuple[bytes, bytes] | None) -> type:
    base = MetricsHandler.factory(registry)

    class Handler(base):
        def do_GET(self) -> None:
            if credentials is not None and not self._authorized():
                self.send_response(401)
                self.send_header("WWW-Authenticate", f'Basic realm="{REALM}"')
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            super().do_GET()

        def _authorized(self) -> bool:
            scheme, _, value = (self.headers.get("Authorization") or "").partition(" ")
            if scheme.lower() != "basic":
                return False
            try:
                user, _, password = base64.b64decode(value.strip(), validate=True).partition(b":")
            except (binascii.Error, ValueError):
                return False
            # both compared, always: the time taken says nothing about which one is wrong
            return hmac.compare_digest(user, credentials[0]) & hmac.compare_digest(password, credentials[1])

        def log_message(self, *args) -> None:  # one line per scrape is noise
            pass

    return Handler


def read_credentials(username: str | None, username_file: str | None, password_file: str) -> tuple[bytes, bytes]:
    """The basic authentication user and password; ValueError naming a file that cannot be read."""
    def read(path: str, what: str) -> bytes:
        try:
            with open(path, "rb") as handle:
                value = handle.read().rstrip(b"\r\n")
        except OSError as err:
            raise ValueError(f"metrics.basicAuth.{what}: cannot read {path!r}: {err.strerror or err}") from None
        if not value:
            raise ValueError(f"metrics.basicAuth.{what}: {path!r} is empty")
        return value
    user = read(username_file, "usernameFile") if username_file else (username or "").encode()
    return user, read(password_file, "passwordFile")


def serve(address: str, port: int, registry: Any, tls: Any = None, basic_auth: Any = None) -> _Server:
    """Serve ``registry`` on ``address:port`` from a daemon thread; ``tls`` and ``basic_auth`` are the
    config's MetricsTLS / MetricsBasicAuth (or None). OSError if it cannot listen, ValueError for
    files that do not load."""
    context = tls_server_context(tls.cert, tls.key, tls.client_ca) if tls is not None else None
    credentials = (read_credentials(basic_auth.username, basic_auth.username_file, basic_auth.password_file)
                   if basic_auth is not None else None)
    server = _Server((address, port), _handler(registry, credentials), context)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server
