"""A TCP relay for e2e tests: the API server listens on loopback, agents reach it from other netns.

The listening socket may live in any network namespace (made there by a
thread that entered it); each accepted connection is relayed to ``target``
from the test's own netns.
"""
from __future__ import annotations

import contextlib
import socket
import threading

from kipfix.agent.datapath.netns import run_in_netns


class TcpForwarder:
    """Listens on ``host:port`` (in ``netns_path``, else here) and relays each connection to ``target``."""

    def __init__(self, host: str, target: tuple[str, int], port: int = 0, netns_path: str | None = None):
        self.target = target
        self.server = run_in_netns(netns_path or "host", socket.socket)
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.server.bind((host, port))
        self.server.listen(128)
        self.port = self.server.getsockname()[1]
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, name="api-forwarder", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=10)
                upstream.settimeout(None)
            except OSError:
                conn.close()
                continue
            with self._lock:
                if self._closed:
                    conn.close()
                    upstream.close()
                    return
                self._sockets |= {conn, upstream}
            pair = [conn, upstream, 2]  # the two sockets, and how many directions still run
            for src, dst in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pump, args=(src, dst, pair), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, pair: list) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
            with self._lock:
                pair[2] -= 1
                done = pair[2] == 0
                if done:  # a half-closed connection still carries the other direction
                    self._sockets.difference_update(pair[:2])
            if done:
                for sock in pair[:2]:
                    sock.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            sockets = [self.server, *self._sockets]
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
