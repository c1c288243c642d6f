"""Command-line tools: ``kipfix collect`` and ``kipfix ipfix send-dummy``.

``register(subparsers)`` adds them to the ``kipfix`` argparse parser; each
sets ``func`` (taking the parsed args, returning an exit status).
"""

from __future__ import annotations

import argparse
import sys

from ..contract import DEFAULT_PEN


def register(subparsers: argparse._SubParsersAction) -> None:
    collect = subparsers.add_parser(
        "collect", help="built-in IPFIX collector (UDP and TCP) printing decoded records",
        description="Listen for IPFIX over UDP and TCP on one address and print each record "
                    "as a table row or a JSON line. Malformed messages are reported and skipped.")
    collect.add_argument("--listen", required=True, metavar="ADDR:PORT",
                         help="address to listen on, for example 127.0.0.1:4739 or [::1]:4739")
    collect.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    collect.add_argument("--count", type=int, metavar="N", help="stop after N data records")
    collect.add_argument("--timeout", type=float, metavar="S", help="stop after S seconds")
    collect.add_argument("--enterprise-number", type=int, default=DEFAULT_PEN, metavar="PEN",
                         help="Private Enterprise Number of kipfix's own elements (the exporter's "
                              f"enterpriseNumber; default {DEFAULT_PEN})")
    collect.add_argument("--receive-buffer", type=int, default=4 << 20, metavar="OCTETS",
                         help="UDP socket receive buffer (SO_RCVBUF; default 4 MiB)")
    collect.add_argument("--max-connections", type=int, default=64, metavar="N",
                         help="TCP connections served at once; more are refused (default 64)")
    collect.add_argument("--idle-timeout", type=float, default=600.0, metavar="S",
                         help="close a TCP connection that sent nothing for S seconds (default 600)")
    collect.set_defaults(func=run_collect)

    ipfix = subparsers.add_parser("ipfix", help="IPFIX tools")
    tools = ipfix.add_subparsers(dest="ipfix_command", metavar="COMMAND", required=True)
    dummy = tools.add_parser(
        "send-dummy", help="send well-formed dummy flows to a collector",
        description="Send dummy IPv4/IPv6 TCP/UDP/ICMP flows with the configured templates "
                    "(or the classic minimal template) to check a collector without traffic.")
    dummy.add_argument("--collector", required=True, metavar="ADDR:PORT", help="collector address")
    dummy.add_argument("--count", type=int, default=10, metavar="N", help="number of flows (default 10)")
    dummy.add_argument("--transport", choices=("udp", "tcp"), default="udp", help="transport (default udp)")
    dummy.add_argument("--config", metavar="FILE", help="agent config file whose templates to use")
    dummy.set_defaults(func=run_send_dummy)


def run_collect(args: argparse.Namespace) -> int:
    from ..export.address import parse_listen_address
    from ..collector.server import Collector

    for flag, value, ok, accepted in (
            ("--enterprise-number", args.enterprise_number, 1 <= args.enterprise_number <= 2**32 - 1,
             "1..4294967295"),
            ("--receive-buffer", args.receive_buffer, 4096 <= args.receive_buffer <= 1 << 30,
             "4096..1073741824 octets"),
            ("--max-connections", args.max_connections, 1 <= args.max_connections <= 100_000, "1..100000"),
            ("--idle-timeout", args.idle_timeout, 0 < args.idle_timeout <= 86_400, "> 0 and <= 86400 seconds")):
        if not ok:
            print(f"kipfix collect: {flag} {value}: accepted: {accepted}", file=sys.stderr)
            return 2
    try:
        host, port = parse_listen_address(args.listen)
        # keep=False: records are printed and dropped, so memory does not grow with the traffic
        collector = Collector(host, port, json_lines=args.json, enterprise_number=args.enterprise_number,
                              keep=False, receive_buffer=args.receive_buffer, max_connections=args.max_connections,
                              idle_timeout=args.idle_timeout)
    except (ValueError, OSError) as err:
        print(f"kipfix collect: --listen {args.listen}: {err}", file=sys.stderr)
        return 2
    print(f"listening for IPFIX on {host}:{collector.port} (UDP and TCP)", file=sys.stderr, flush=True)
    collector.serve(count=args.count, timeout=args.timeout)
    if collector.output_closed:
        raise BrokenPipeError(32, "stdout closed")  # kipfix's main ends as a Unix filter does
    print(f"received {collector.messages_received} messages, {collector.data_records} data records; "
          f"rejected {collector.malformed} malformed messages", file=sys.stderr)
    return 0


def run_send_dummy(args: argparse.Namespace) -> int:
    from ..config import CollectorConfig, TemplateConfig, load_config
    from ..export.address import parse_collector_address
    from ..export.ipfix.dummy import MINIMAL_TEMPLATE, send_dummy

    try:
        host, port = parse_collector_address(args.collector)
        if args.count < 0:
            raise ValueError(f"--count {args.count}: accepted: 0 or more")
        if args.config:
            config = load_config(args.config)
            templates, domain, pen = config.templates, config.observation_domain_id, config.enterprise_number
        else:
            templates, domain, pen = (TemplateConfig(256, MINIMAL_TEMPLATE),), 1, DEFAULT_PEN
        if not templates:
            raise ValueError(f"{args.config}: no templates configured")
        collector = CollectorConfig(args.collector, host, port, args.transport)
        counters = send_dummy([collector], templates, args.count, domain, pen)
    except ValueError as err:
        print(f"kipfix ipfix send-dummy: {err}", file=sys.stderr)
        return 2
    for name, c in counters.items():
        print(f"{name}: {c.messages} messages, {c.records} records, {c.octets} octets sent; "
              f"{c.not_sent_flows} flows not sent")
        if c.not_sent_flows:
            return 1
    return 0
