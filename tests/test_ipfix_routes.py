"""RouteResolver against routes the test configures in its own namespace."""

from __future__ import annotations

import ipaddress
import subprocess
import time

from kipfix.agent.export.routes import RouteResolver

from test_ipfix_roundtrip import ROUTES, route_netns  # noqa: F401 - fixture


def ip(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


def answer(prefix: int, hop: str | None, family: int) -> tuple[int, bytes]:
    return prefix, ipaddress.ip_address(hop or ("0.0.0.0" if family == 4 else "::")).packed


def test_prefix_length_and_next_hop_by_name_and_path(route_netns):  # noqa: F811
    resolver = RouteResolver()
    try:
        for netns in (route_netns, f"/var/run/netns/{route_netns}"):
            for address, (prefix, hop) in ROUTES.items():
                assert resolver(netns, address) == answer(prefix, hop, 4 if len(address) == 4 else 6)
        # no route at all in that namespace: no default route was configured
        assert resolver(route_netns, ip("192.0.2.1")) == (0, bytes(4))
        assert resolver(route_netns, ip("2001:db8::1")) == (0, bytes(16))
        # a namespace that does not exist gives "unknown", not an exception
        assert resolver("kipfix-no-such-netns", ip("10.0.0.1")) == (0, bytes(4))
    finally:
        resolver.close()


def test_route_change_refreshes_the_cache(route_netns):  # noqa: F811
    resolver = RouteResolver()
    try:
        assert resolver(route_netns, ip("10.88.4.5")) == answer(16, "10.77.1.1", 4)
        assert (route_netns, ip("10.88.4.5")) in resolver.cache
        subprocess.run(["ip", "-n", route_netns, "route", "add", "10.88.4.0/24", "via", "10.77.1.9"], check=True)
        deadline = time.monotonic() + 10
        while resolver(route_netns, ip("10.88.4.5")) != answer(24, "10.77.1.9", 4) and time.monotonic() < deadline:
            time.sleep(0.05)  # the netlink notification clears the cache
        assert resolver(route_netns, ip("10.88.4.5")) == answer(24, "10.77.1.9", 4)
    finally:
        resolver.close()


def test_a_route_change_during_a_lookup_leaves_no_stale_entry(route_netns):  # noqa: F811
    """The cache is written without a lock: an answer from before a route change must not stay in it."""
    resolver = RouteResolver()
    address = ip("10.88.4.5")
    try:
        assert resolver(route_netns, address) == answer(16, "10.77.1.1", 4)
        resolver.cache.clear()
        ns = resolver._namespaces[route_netns]
        real = ns.lookup

        def changed_meanwhile(packed):
            found = real(packed)
            ns.invalidate()  # what the netlink listener does on a route change, between lookup and caching
            return found

        ns.lookup = changed_meanwhile
        assert resolver(route_netns, address) == answer(16, "10.77.1.1", 4)
        assert (route_netns, address) not in resolver.cache
        ns.lookup = real
        assert resolver(route_netns, address) == answer(16, "10.77.1.1", 4)
        assert resolver.cache[(route_netns, address)] == answer(16, "10.77.1.1", 4)
    finally:
        resolver.close()


def test_missing_namespace_is_reported_once(caplog):
    resolver = RouteResolver()
    try:
        with caplog.at_level("WARNING", logger="kipfix.agent.export.routes"):
            for _ in range(100):
                assert resolver("kipfix-no-such-netns", ip("10.0.0.1")) == (0, bytes(4))
                assert resolver("kipfix-no-such-netns", ip("fd00::1")) == (0, bytes(16))
        assert len([r for r in caplog.records if "kipfix-no-such-netns" in r.getMessage()]) == 1
    finally:
        resolver.close()


def test_policy_rules_are_honoured_per_address(route_netns):  # noqa: F811
    """With a rule sending 10.88.0.0/16 to table 100, its route there wins over the main table's."""
    subprocess.run(["ip", "-n", route_netns, "route", "add", "10.88.0.0/20", "via", "10.77.1.7", "table", "100"],
                   check=True)
    subprocess.run(["ip", "-n", route_netns, "rule", "add", "to", "10.88.0.0/16", "table", "100"], check=True)
    resolver = RouteResolver()
    try:
        assert resolver(route_netns, ip("10.88.4.5")) == answer(20, "10.77.1.7", 4)
        # addresses the rule does not match still fall through to the main table
        for address, (prefix, hop) in ROUTES.items():
            if len(address) == 4 and not address.startswith(bytes([10, 88])):
                assert resolver(route_netns, address) == answer(prefix, hop, 4)
    finally:
        resolver.close()


def test_host_namespace_by_its_label(caplog):
    """The agent labels host-netns flows "host"; that is the resolver's own namespace, not /var/run/netns/host."""
    resolver = RouteResolver()
    try:
        with caplog.at_level("WARNING", logger="kipfix.agent.export.routes"):
            for address in (ip("127.0.0.1"), ip("192.0.2.1"), ip("::1")):
                assert resolver("host", address) == resolver("", address)
        assert caplog.records == []
    finally:
        resolver.close()
