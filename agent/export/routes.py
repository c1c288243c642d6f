"""Prefix lengths and next hops from the kernel routing table, per namespace.

``RouteResolver.lookup(netns, address)`` finds the route an address takes:
its prefix length and next hop. Without policy routing (only the local,
main and default rules) that is a longest-prefix match over the main
table, done in Python over an index built once per namespace and family --
a drain can hold a million distinct addresses, and a netlink round trip
each took minutes. With policy rules, the kernel is asked per address
(``ip route get``) and the prefix length looked up in the table it names.
A netlink listener per namespace drops indexes and caches on any route or
rule change. Netlink sockets for another namespace are opened from a thread
that entered it (no helper processes).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time

from ..datapath.netns import run_in_netns

log = logging.getLogger(__name__)

RTMGRP_IPV4_ROUTE = 0x40
RTMGRP_IPV4_RULE = 0x80
RTMGRP_IPV6_ROUTE = 0x400
RTMGRP_IPV6_RULE = 0x80000
RTN_UNICAST = 1
RTM_F_LOOKUP_TABLE = 0x1000
MAIN_TABLES = {253, 254, 255}  # default, main, local: the rules every namespace starts with
MAX_CACHE = 65536
RETRY_SECONDS = 10  # how often to retry a namespace that could not be opened
NO_ROUTE4 = (0, bytes(4))
NO_ROUTE6 = (0, bytes(16))


def no_route(address: bytes) -> tuple[int, bytes]:
    """(prefix length, next hop) of an address no route covers, in the address's family."""
    return NO_ROUTE4 if len(address) == 4 else NO_ROUTE6


def _route_monitor() -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
    sock.bind((0, RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE | RTMGRP_IPV4_RULE | RTMGRP_IPV6_RULE))
    sock.settimeout(0.25)  # how often the listener checks for close()
    return sock


class _PrefixIndex:
    """Longest-prefix match over one routing table: one dict per prefix length."""

    def __init__(self, width: int, routes: list[tuple[int, int, bytes, int]]):
        self.width = width
        self.by_length: dict[int, dict[int, tuple[int, bytes]]] = {}
        # (network, prefix length, next hop, metric); the lowest metric wins a tie
        for network, length, next_hop, _metric in sorted(routes, key=lambda r: r[3]):
            self.by_length.setdefault(length, {}).setdefault(network >> (width - length), (length, next_hop))
        self.lengths = sorted(self.by_length, reverse=True)

    def match(self, address: bytes) -> tuple[int, bytes] | None:
        value = int.from_bytes(address, "big")
        for length in self.lengths:
            found = self.by_length[length].get(value >> (self.width - length))
            if found is not None:
                return found
        return None


def _next_hop(msg, width: int) -> bytes:
    gateway = msg.get_attr("RTA_GATEWAY")
    if gateway is None:
        for hop in msg.get_attr("RTA_MULTIPATH") or ():  # ECMP: the first hop stands for the route
            gateway = hop.get_attr("RTA_GATEWAY")
            if gateway:
                break
    return ipaddress.ip_address(gateway).packed if gateway else bytes(width // 8)


class _Namespace:
    def __init__(self, netns: str, on_change=lambda: None):
        from pyroute2 import IPRoute

        self.netns = netns
        self.on_change = on_change
        self.lock = threading.Lock()
        self.ipr = run_in_netns(netns, IPRoute)
        self.monitor = run_in_netns(netns, _route_monitor)
        self.tables: dict[tuple[int, int], list] = {}  # (family, table) -> [(network, prefixlen, gateway)]
        self.indexes: dict[int, _PrefixIndex | None] = {}  # family -> index; None: policy routing in use
        self.generation = 0
        self.closed = False
        self.listener = threading.Thread(target=self._listen, name=f"routes-{netns or 'host'}", daemon=True)
        self.listener.start()

    def _listen(self) -> None:
        while not self.closed:
            try:
                data = self.monitor.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            if data:
                self.invalidate()

    def invalidate(self) -> None:
        with self.lock:
            self.tables.clear()
            self.indexes.clear()
            self.generation += 1
            self.on_change()

    def _index(self, family: int) -> _PrefixIndex | None:
        if family in self.indexes:
            return self.indexes[family]
        index = None
        if all(rule.get_attr("FRA_TABLE", rule["table"]) in MAIN_TABLES for rule in self.ipr.get_rules(family=family)):
            width = 32 if family == socket.AF_INET else 128
            routes = []
            for msg in self.ipr.get_routes(family=family, table=254):
                if msg["type"] != RTN_UNICAST:
                    continue
                dst = msg.get_attr("RTA_DST")
                network = int.from_bytes(ipaddress.ip_address(dst).packed, "big") if dst else 0
                routes.append((network, msg["dst_len"], _next_hop(msg, width), msg.get_attr("RTA_PRIORITY") or 0))
            index = _PrefixIndex(width, routes)
        self.indexes[family] = index
        return index

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
        """The route of ``address``: from the table's index, without a lock, once that is built."""
        family = socket.AF_INET if len(address) == 4 else socket.AF_INET6
        index = self.indexes.get(family)
        if index is not None:
            return index.match(address) or no_route(address)
        with self.lock:  # building the index, or asking the kernel: netlink, one caller at a time
            return self._resolve(address)

    def _resolve(self, address: bytes) -> tuple[int, bytes]:
        family = socket.AF_INET if len(address) == 4 else socket.AF_INET6
        none = no_route(address)
        index = self._index(family)
        if index is not None:
            return index.match(address) or none
        return self._resolve_with_policy(address, family, none)

    def _resolve_with_policy(self, address: bytes, family: int, none: tuple[int, bytes]) -> tuple[int, bytes]:
        ip = ipaddress.ip_address(address)
        try:
            # RTM_F_LOOKUP_TABLE: report the table the lookup used (as `ip route get` does), not main
            (answer,) = self.ipr.route("get", dst=str(ip), flags=RTM_F_LOOKUP_TABLE)[:1]
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
        self.closed = True
        self.listener.join(2)
        for handle in (self.monitor, self.ipr):
            try:
                handle.close()
            except Exception:  # noqa: BLE001 - already closed
                pass


class RouteResolver:
    """``lookup(netns, packed address) -> (prefix length, next hop packed)``.

    ``netns`` is a namespace name (under /var/run/netns), a path, or "" for
    the host's. Unknown routes give (0, zero address).
    """

    def __init__(self) -> None:
        self._namespaces: dict[str, _Namespace] = {}
        self._lock = threading.Lock()
        # (netns, address) -> result, read directly by compiled packers; cleared on any route change
        self.cache: dict[tuple[str, bytes], tuple[int, bytes]] = {}
        self._failed: dict[str, float] = {}  # namespaces that could not be opened -> when

    def _open(self, netns: str) -> _Namespace | None:
        """The namespace's routes, or None while it cannot be opened (retried every RETRY_SECONDS)."""
        failed = self._failed.get(netns)
        if failed is not None and time.monotonic() - failed < RETRY_SECONDS:
            return None
        try:
            with self._lock:
                ns = self._namespaces.get(netns)
                if ns is None:
                    ns = self._namespaces[netns] = _Namespace(netns, self.cache.clear)
        except Exception as err:  # noqa: BLE001 - a vanished namespace must not stop export
            if failed is None:
                log.warning("cannot read routes of namespace %r (%s): prefix lengths and next hops of its "
                            "flows are 0 until it can; retrying every %d s", netns, err, RETRY_SECONDS)
            self._failed[netns] = time.monotonic()
            return None
        self._failed.pop(netns, None)
        return ns

    def lookup(self, netns: str, address: bytes) -> tuple[int, bytes]:
        ns = self._namespaces.get(netns) or self._open(netns)
        if ns is None:
            return no_route(address)
        generation = ns.generation
        found = ns.lookup(address)
        # Cached without a lock (a drain can bring a million new addresses): a route change since
        # the lookup moved the generation, and the entry is taken out again; one after this point
        # clears the whole cache.
        if len(self.cache) >= MAX_CACHE:
            self.cache.clear()
        key = (netns, address)
        self.cache[key] = found
        if ns.generation != generation:
            self.cache.pop(key, None)
        return found

    __call__ = lookup  # what the packers call, one frame less

    def invalidate(self) -> None:
        self.cache.clear()
        for ns in list(self._namespaces.values()):
            ns.invalidate()

    def close(self) -> None:
        for ns in list(self._namespaces.values()):
            ns.close()
        self._namespaces.clear()
