"""The ``kipfix`` command line."""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import select
import signal
import sys

from .. import __version__
from ..config import DEFAULT_PIN_PATH, MAX_FLOWS_RANGE
from ..flows.record import DIRECTION_NAMES, PROTO_NAMES, FlowKey

log = logging.getLogger("kipfix")


def _protocol_number(text: str) -> int:
    names = {v: k for k, v in PROTO_NAMES.items()}
    if text.lower() in names:
        return names[text.lower()]
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"protocol {text!r}: give a number 0..255 or one of {', '.join(sorted(names))}") from None
    if not 0 <= value <= 255:
        raise argparse.ArgumentTypeError(f"protocol {value}: accepted 0..255")
    return value


def _address(text: str):
    try:
        return ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IPv4 or IPv6 address") from None


def _max_flows(text: str) -> int:
    lo, hi = MAX_FLOWS_RANGE
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not lo <= value <= hi:
        raise argparse.ArgumentTypeError(f"--max-flows {text!r}: accepted {lo}..{hi}")
    return value


def format_endpoint(address: bytes, port: int | None) -> str:
    ip = ipaddress.ip_address(address)
    text = f"[{ip}]" if ip.version == 6 else str(ip)
    return text if port is None else f"{text}:{port}"


def _flow_columns(key: FlowKey) -> tuple[str, str, str]:
    proto = PROTO_NAMES.get(key.protocol, str(key.protocol))
    if key.is_icmp:
        return f"{proto}({key.dport >> 8}/{key.dport & 0xFF})", format_endpoint(key.src, None), \
            format_endpoint(key.dst, None)
    return proto, format_endpoint(key.src, key.sport), format_endpoint(key.dst, key.dport)


# ---- dump / flush -------------------------------------------------------------

def _open_tables(args):
    from ..datapath.tables import FlowTables, TablesNotFound

    try:
        return FlowTables(args.pin_path)
    except TablesNotFound as err:
        print(f"kipfix: {err}", file=sys.stderr)
        raise SystemExit(1) from None


def cmd_dump(args) -> int:
    from ..datapath.netnsids import NetnsIds, default_path

    ids = NetnsIds(default_path(args.pin_path))
    with _open_tables(args) as tables:
        flows = sorted(tables.peek(), key=lambda f: (f[0], f[1].ifindex, f[1].direction, -f[2].octets))
        full_packets, full_octets = tables.unmetered()
    if args.json:
        for netns_id, key, c in flows:
            print(json.dumps({"netns": ids.label(netns_id), "ifindex": key.ifindex,
                              "direction": DIRECTION_NAMES[key.direction], "protocol": key.protocol,
                              "src": str(key.src_ip), "dst": str(key.dst_ip), "sport": key.sport,
                              "dport": key.dport, "packets": c.packets, "bytes": c.octets,
                              "tcpFlags": c.tcp_flags}))
        return 0
    rows = [("IFINDEX", "DIR", "PROTO", "SRC", "DST", "PKTS", "BYTES", "NETNS")]
    for netns_id, key, c in flows:
        proto, src, dst = _flow_columns(key)
        rows.append((str(key.ifindex), DIRECTION_NAMES[key.direction][:3], proto, src, dst,
                     str(c.packets), str(c.octets), ids.label(netns_id) or "host"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    if full_packets:
        print(f"table full: {full_packets} packets, {full_octets} octets not metered", file=sys.stderr)
    return 0


def cmd_flush(args) -> int:
    one_flow = [args.ifindex, args.protocol, args.src, args.sport, args.dst, args.dport]
    if args.all == any(v is not None for v in one_flow):
        print("kipfix flush: give --all, or a flow as -i IFINDEX -p PROTO -s SRC -S SPORT -d DST -D DPORT",
              file=sys.stderr)
        return 2
    if not args.all and any(v is None for v in one_flow):
        print("kipfix flush: a single flow needs all of -i, -p, -s, -S, -d, -D", file=sys.stderr)
        return 2
    removed = packets = 0
    with _open_tables(args) as tables:
        for netns_id, key, counters in tables.peek():
            if not args.all and (key.ifindex, key.protocol, key.src, key.sport, key.dst, key.dport) != (
                    args.ifindex, args.protocol, args.src.packed, args.sport, args.dst.packed, args.dport):
                continue
            if tables.delete(netns_id, key):
                removed += 1
                packets += counters.packets
    print(f"flushed {removed} flow entries ({packets} packets)")
    return 0 if removed or args.all else 1


# ---- meter attach / detach / status ---------------------------------------------

def cmd_meter(args) -> int:
    from ..datapath import tc
    from ..datapath.netns import NetnsRef

    netns = NetnsRef.parse(args.netns)
    if args.action == "status":
        try:
            rows = tc.status(netns, tuple(args.interface or ()))
        except (tc.TcError, LookupError) as err:
            print(f"kipfix: {err}", file=sys.stderr)
            return 1
        print(f"{'NETNS':<20} {'IFNAME':<16} {'IFINDEX':>7}  {'DIR':<8} {'PROG':>6}  NAME")
        for a in rows:
            print(f"{a.netns:<20} {a.ifname:<16} {a.ifindex:>7}  {a.direction:<8} {a.prog_id:>6}  {a.prog_name}")
        return 0
    if not args.interface:
        print(f"kipfix meter {args.action}: give at least one interface with -i", file=sys.stderr)
        return 2
    failures = 0
    if args.action == "detach":
        for ifname in args.interface:
            try:
                removed = tc.detach(netns, ifname)
                print(f"detached {removed} kipfix filters from {ifname} ({netns.describe()})")
            except (tc.TcError, LookupError) as err:
                print(f"kipfix: {err}", file=sys.stderr)
                failures += 1
        return 1 if failures else 0
    from ..datapath.meter import Meter
    from ..datapath.netnsids import NetnsIds, default_path, programs_for

    meter = Meter(args.max_flows, args.pin_path)
    ids = NetnsIds(default_path(args.pin_path))
    try:
        for ifname in args.interface:
            try:
                tc.attach(netns, ifname, programs_for(meter, ids, netns))
                print(f"attached kipfix to {ifname} ({netns.describe()}) ingress and egress")
            except (tc.TcError, LookupError) as err:
                print(f"kipfix: {err}", file=sys.stderr)
                failures += 1
    finally:
        meter.close()
    return 1 if failures else 0


# ---- agent ----------------------------------------------------------------------

def cmd_agent(args) -> int:
    if args.kubernetes:
        from ..kubeagent import run_kubernetes_agent

        return run_kubernetes_agent(keep_attached=args.keep_attached, metrics_config=args.metrics_config)
    if not args.config:
        print("kipfix agent: give --config FILE, or --kubernetes to take the config from the API", file=sys.stderr)
        return 2
    from ..daemon import run_agent

    return run_agent(args.config, keep_attached=args.keep_attached, metrics_config=args.metrics_config)


def cmd_operator(args) -> int:
    """``kipfix operator ARGS`` is ``python -m kipfix.operator ARGS``: the operator's own entry point."""
    from kipfix.operator.__main__ import main as operator_main

    return operator_main([f"--log-level={args.log_level}", *args.operator_args], prog="kipfix operator")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kipfix", description="eBPF IPFIX flow exporter")
    parser.add_argument("--version", action="version", version=f"kipfix {__version__}")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    agent = sub.add_parser("agent", help="run the metering and export daemon")
    agent.add_argument("--config", help="YAML file: collectors, templates, interfaces, ...")
    agent.add_argument("--kubernetes", action="store_true",
                       help="take the config from this node's ConfigMap (node name in NODE_NAME) and "
                            "report node state to the API")
    agent.add_argument("--keep-attached", action="store_true",
                       help="on SIGTERM export the cache but leave filters and pinned tables in place, "
                            "so a restarted agent continues without a gap")
    agent.add_argument("--metrics-config", metavar="FILE",
                       help="YAML file with a metrics: section (address, port, tls, basicAuth) used instead of "
                            "the configuration's (Kubernetes: the ConfigMap has none)")
    agent.set_defaults(func=cmd_agent)

    # Everything after "operator" is the operator's (its --help too): no prefix character is ours here.
    operator = sub.add_parser("operator", add_help=False, prefix_chars="\0",
                              help="run the Kubernetes operator (FlowExporter -> node ConfigMaps); "
                                   "kipfix operator --help lists its options")
    operator.add_argument("operator_args", nargs=argparse.REMAINDER)
    operator.set_defaults(func=cmd_operator)

    meter = sub.add_parser("meter", help="attach, detach or show kipfix's tc filters")
    meter.add_argument("action", choices=["attach", "detach", "status"])
    meter.add_argument("--netns", default="", help="named netns or /proc/PID/ns/net (default: host)")
    meter.add_argument("-i", "--interface", action="append", help="interface name (repeatable)")
    meter.add_argument("--max-flows", type=_max_flows, default=65536)
    meter.add_argument("--pin-path", default=DEFAULT_PIN_PATH)
    meter.set_defaults(func=cmd_meter)

    dump = sub.add_parser("dump", help="print the in-kernel flow table")
    dump.add_argument("--json", action="store_true")
    dump.add_argument("--pin-path", default=DEFAULT_PIN_PATH)
    dump.set_defaults(func=cmd_dump)

    flush = sub.add_parser("flush", help="remove flows from the in-kernel flow table")
    flush.add_argument("--all", action="store_true")
    flush.add_argument("-i", dest="ifindex", type=int)
    flush.add_argument("-p", dest="protocol", type=_protocol_number)
    flush.add_argument("-s", dest="src", type=_address)
    flush.add_argument("-S", dest="sport", type=int)
    flush.add_argument("-d", dest="dst", type=_address)
    flush.add_argument("-D", dest="dport", type=int)
    flush.add_argument("--pin-path", default=DEFAULT_PIN_PATH)
    flush.set_defaults(func=cmd_flush)

    from .. import depcheck
    depcheck.register(sub)
    from . import ipfix as ipfix_cli
    ipfix_cli.register(sub)
    return parser


def exit_on_closed_output() -> None:
    """The reader of our output went away (``kipfix dump | head``): end as a Unix filter does,
    killed by SIGPIPE, without a traceback or a "Broken pipe" line.

    Python ignores SIGPIPE so that sockets report EPIPE (the agent and the collector need
    that), which turns a closed pipe on stdout into BrokenPipeError instead; this restores
    the default action and takes it.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())  # the interpreter's last flush at exit must not fail again
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGPIPE)
    os._exit(128 + signal.SIGPIPE)  # not reached: the signal ends the process


def stdout_closed() -> bool:
    """True when nobody reads our stdout any more (a pipe whose reader exited)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _fd, events in poller.poll(0))
    except (OSError, ValueError):
        return False


def main(argv: list[str] | None = None) -> int:
    try:
        status = _run(argv)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's flush at exit
        return status
    except BrokenPipeError:
        exit_on_closed_output()
        raise  # not reached


def _run(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError as err:
        if stdout_closed():
            raise
        print(f"kipfix: {err}", file=sys.stderr)  # a socket's EPIPE, not our output
        return 1
    except (OSError, RuntimeError, ValueError) as err:
        print(f"kipfix: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
