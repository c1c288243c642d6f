"""Prefix lengths and next hops from the kernel routing table, per namespace.

``RouteResolver.lookup(netns, address)`` asks the kernel which route a
destination takes (``ip route get``: honours policy routing), then finds that
route's prefix length by longest-prefix match over the same table. Results
are cached per (namespace, address); a netlink listener per namespace
clears the cache on any route change.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading

log = logging.getLogger(__name__)

RTMGRP_IPV4_ROUTE = 0x40
RTMGRP_IPV6_ROUTE = 0x400
RTN_UNICAST = 1
MAX_CACHE = 65536
NO_ROUTE4 = (0, bytes(4))
NO_ROUTE6 = (0, bytes(16))


def _open(netns: str):
    from pyroute2 import IPRoute, NetNS

    return NetNS(netns) if netns else IPRoute()


class _Namespace:
    def __init__(self, netns: str):
        self.netns = netns
        self.lock = threading.Lock()
        self.ipr = _open(netns)
        self.cache: dict[bytes, tuple[int, bytes]] = {}
        self.tables: dict[tuple[int, int], list] = {}  # (family, table) -> [(network, prefixlen, gateway)]
        self.generation = 0
        self.listener = threading.Thread(target=self._listen, name=f"routes-{netns or 'host'}", daemon=True)
        self.listener.start()

    def _listen(self) -> None:
        try:
            monitor = _open(self.netns)
            monitor.bind(groups=RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE)
        except Exception as err:  # noqa: BLE001 - without a monitor the cache just lives longer
            log.warning("cannot watch route changes in %s: %s", self.netns or "host namespace", err)
            return
        try:
            while True:
                if monitor.get():
                    self.invalidate()
        except Exception:  # noqa: BLE001 - socket closed at exit
            return

    def invalidate(self) -> None:
        with self.lock:
            self.cache.clear()
            self.tables.clear()
            self.generation += 1

    def _table(self, family: int, table: int) -> list:
        routes = self.tables.get((family, table))
        if routes is None:
            routes = []
            for msg in self.ipr.get_routes(family=family, table=table):
                if msg["type"] != RTN_UNICAST:
                    continue
                dst = msg.get_attr("RTA_DST")
                length = msg["dst_len"]
                network = ipaddress.ip_network(f"{dst or ('0.0.0.0' if family == socket.AF_INET else '::')}"
                                               f"/{length}", strict=False)
                routes.append((network, length, msg.get_attr("RTA_GATEWAY")))
            routes.sort(key=lambda r: -r[1])
            self.tables[(family, table)] = routes
        return routes

    def lookup(self, address: bytes) -> tuple[int, bytes]:
        found = self.cache.get(address)
        if found is not None:
            return found
        with self.lock:
            found = self._resolve(address)
            if len(self.cache) >= MAX_CACHE:
                self.cache.clear()
            self.cache[address] = found
        return found

    def _resolve(self, address: bytes) -> tuple[int, bytes]:
        ip = ipaddress.ip_address(address)
        family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
        none = NO_ROUTE4 if ip.version == 4 else NO_ROUTE6
        try:
            (answer,) = self.ipr.route("get", dst=str(ip))[:1]
        except Exception:  # noqa: BLE001 - unreachable: no route
            return none
        table = answer.get_attr("RTA_TABLE") or answer["table"]
        gateway = answer.get_attr("RTA_GATEWAY")
        next_hop = ipaddress.ip_address(gateway).packed if gateway else none[1]
        for network, length, _ in self._table(family, table):
            if ip in network:
                return (length, next_hop)
        return (0, next_hop)

    def close(self) -> None:
        try:
            self.ipr.close()
        except Exception:  # noqa: BLE001
            pass


class RouteResolver:
    """``lookup(netns, packed address) -> (prefix length, next hop packed)``.

    ``netns`` is a namespace name (under /var/run/netns), a path, or "" for
    the host's. Unknown routes give (0, zero address).
    """

    def __init__(self) -> None:
        self._namespaces: dict[str, _Namespace] = {}
        self._lock = threading.Lock()

    def _namespace(self, netns: str) -> _Namespace:
        ns = self._namespaces.get(netns)
        if ns is None:
            with self._lock:
                ns = self._namespaces.get(netns)
                if ns is None:
                    ns = self._namespaces[netns] = _Namespace(netns)
        return ns

    def lookup(self, netns: str, address: bytes) -> tuple[int, bytes]:
        try:
            ns = self._namespace(netns)
        except Exception as err:  # noqa: BLE001 - a vanished namespace must not stop export
            log.warning("cannot read routes of namespace %r: %s", netns, err)
            return NO_ROUTE4 if len(address) == 4 else NO_ROUTE6
        return ns.lookup(address)

    __call__ = lookup

    def invalidate(self) -> None:
        for ns in list(self._namespaces.values()):
            ns.invalidate()

    def close(self) -> None:
        for ns in list(self._namespaces.values()):
            ns.close()
        self._namespaces.clear()
