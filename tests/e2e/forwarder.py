"""A TCP relay for e2e tests: the API server listens on loopback, agents reach it from other netns.

The listening socket may live in any network namespace (``socket_in_netns``);
each accepted connection is relayed to ``target`` in the netns that made the
relay's upstream sockets (the test's own, the root netns).
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import threading

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


def socket_in_netns(netns_path: str, family=socket.AF_INET, kind=socket.SOCK_STREAM) -> socket.socket:
    """A socket created inside another network namespace (it stays there).

    setns() changes only the calling thread's netns: a helper thread enters
    the netns, makes the socket and ends; the socket keeps its namespace.
    """
    result: list = []

    def make() -> None:
        try:
            _setns(netns_path)
            result.append(socket.socket(family, kind))
        except BaseException as e:  # noqa: BLE001 -- re-raised in the caller
            result.append(e)

    t = threading.Thread(target=make)
    t.start()
    t.join()
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


class TcpForwarder:
    """Listens on ``host:port`` (in ``netns_path``, else here) and relays each connection to ``target``."""

    def __init__(self, host: str, target: tuple[str, int], port: int = 0, netns_path: str | None = None):
        self.target = target
        self.server = socket_in_netns(netns_path) if netns_path else socket.socket()
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
