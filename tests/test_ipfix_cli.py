"""`collect` and `ipfix send-dummy` through an argparse parser built like kipfix's."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from kipfix.agent.cli import ipfix as cli
from kipfix.agent.collector.server import Collector

PARSER_SCRIPT = """
import argparse, sys
from kipfix.agent.cli import ipfix as cli
parser = argparse.ArgumentParser(prog="kipfix")
cli.register(parser.add_subparsers(dest="command", required=True))
args = parser.parse_args(sys.argv[1:])
sys.exit(args.func(args))
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kipfix")
    cli.register(p.add_subparsers(dest="command", required=True))
    return p


def run(*argv: str) -> int:
    args = parser().parse_args(list(argv))
    return args.func(args)


def start_collect(*extra: str) -> tuple[subprocess.Popen, int]:
    process = subprocess.Popen([sys.executable, "-c", PARSER_SCRIPT, "collect", "--listen", "127.0.0.1:0", *extra],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = process.stderr.readline()
    assert line.startswith("listening for IPFIX on 127.0.0.1:"), line
    return process, int(line.split(":")[1].split()[0])


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_send_dummy_to_collect_json(transport):
    process, port = start_collect("--json", "--count", "12", "--timeout", "60")
    try:
        assert run("ipfix", "send-dummy", "--collector", f"127.0.0.1:{port}", "--count", "12",
                   "--transport", transport) == 0
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    flows = [line for line in lines if "scope" not in line]
    assert len(flows) == 12
    assert {f["template"] for f in flows} == {256, 257}  # IPv4 and the derived IPv6 template
    assert all(f["domain"] == 1 and "octetDeltaCount" in f["fields"] for f in flows)
    assert {o["scope"][0] for o in lines if "scope" in o} >= {"observationDomainId", "exportingProcessId",
                                                              "observationPointId"}


def test_collect_prints_a_table():
    process, port = start_collect("--count", "4", "--timeout", "60")
    try:
        assert run("ipfix", "send-dummy", "--collector", f"127.0.0.1:{port}", "--count", "4") == 0
        out, _ = process.communicate(timeout=60)
    finally:
        process.kill()
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("start"))
    assert len([line for line in lines[header + 1:] if not line.startswith("options")]) == 4
    assert "packets" in lines[header] and "octets" in lines[header]


def test_send_dummy_with_config_templates(tmp_path):
    config = tmp_path / "kipfix.yaml"
    config.write_text("observationDomainId: 77\n"
                      "templates:\n"
                      "  - id: 400\n"
                      "    template: [flowStartMilliseconds, sourceIPv6Address, interfaceName, packetDeltaCount]\n")
    collector = Collector(out=None, err=None).start()
    try:
        assert run("ipfix", "send-dummy", "--collector", f"127.0.0.1:{collector.port}", "--count", "8",
                   "--config", str(config)) == 0
        assert collector.wait_for(lambda c: c.data_records >= 8, 10)
    finally:
        collector.stop()
    records = collector.records()
    assert {r.template_id for r in records} == {400, 401}  # IPv6 template and its derived IPv4 one
    assert all(m.domain_id == 77 for m in collector.messages())


def test_bad_addresses_are_reported(capsys):
    assert run("ipfix", "send-dummy", "--collector", "nowhere") == 2
    assert "'nowhere' does not parse" in capsys.readouterr().err
    assert run("collect", "--listen", "no-such-host.invalid:4739") == 2
    assert "does not resolve" in capsys.readouterr().err
