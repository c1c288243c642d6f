"""Collector addresses: ``host:port`` or ``[ipv6]:port``."""

from __future__ import annotations

import ipaddress
import socket

ACCEPTED = "host:port, IPv4:port or [IPv6]:port, with port 1..65535"


def split_address(text: str) -> tuple[str, int]:
    """Split ``text`` into host and port without resolving; ValueError if malformed."""
    if not isinstance(text, str) or not text:
        raise ValueError(f"collector address {text!r} is empty or not text; accepted: {ACCEPTED}")
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(f"collector address {text!r} does not parse; accepted: {ACCEPTED}")
        port_text = rest[1:]
        try:
            ipaddress.IPv6Address(host.split("%", 1)[0])
        except ValueError:
            raise ValueError(f"collector address {text!r}: {host!r} in brackets is not an IPv6 address; "
                             f"accepted: {ACCEPTED}") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f"collector address {text!r} does not parse (no port); accepted: {ACCEPTED}")
        if ":" in host:
            raise ValueError(f"collector address {text!r}: an IPv6 address needs brackets; accepted: {ACCEPTED}")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"collector address {text!r}: port {port_text!r} is not 1..65535; accepted: {ACCEPTED}")
    return host, int(port_text)


def parse_collector_address(text: str) -> tuple[str, int]:
    """Parse and resolve a collector address; ValueError naming the value otherwise."""
    host, port = split_address(text)
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except socket.gaierror as err:
        raise ValueError(f"collector address {text!r}: host {host!r} does not resolve ({err.strerror}); "
                         f"accepted: {ACCEPTED} with a resolvable host") from None
    return host, port


def parse_listen_address(text: str) -> tuple[str, int]:
    """Like parse_collector_address, but port 0 (any free port) is allowed."""
    if isinstance(text, str) and text.endswith(":0"):
        host, _ = split_address(text[:-2] + ":1")
        return host, 0
    return parse_collector_address(text)
