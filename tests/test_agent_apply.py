"""Applying a configuration is all or nothing: a failure half-way leaves the running one whole.

The resolve step refuses what it can foresee, so on SIGHUP an apply that
fails is a race (a directory removed between the check and the open). Here
``Agent.apply`` and ``KubeAgent``'s offer are driven directly, in this
process, with a real BPF program on the router's interfaces: the new
configuration adds an interface, changes the timeouts and names a jsonLines
file that cannot be opened. Nothing of it may take effect, and the old
exporter keeps exporting exactly what ping sent.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid

import pytest

from agentproc import remove_state_files, wait_for
from kipfix.agent.config import ConfigError, parse_config
from kipfix.agent.datapath.netnsids import default_path
from router import sh

pytestmark = pytest.mark.root


def configs(router, tmp_path):
    pin_path = f"/sys/fs/bpf/kipfix-test-{uuid.uuid4().hex[:8]}"
    running = parse_config({"interfaces": [{"netns": router.r, "names": ["r1"]}], "pinPath": pin_path,
                            "jsonLines": str(tmp_path / "flows.jsonl"), "timeouts": {"idle": 1, "active": 2}})
    broken = parse_config({"interfaces": [{"netns": router.r, "names": ["r1", "r2a"]}], "pinPath": pin_path,
                           "jsonLines": str(tmp_path / "gone" / "flows.jsonl"), "timeouts": {"idle": 5, "active": 9}})
    return running, broken


def kipfix_filters(router, ifname: str) -> str:
    return "".join(sh(f"tc -n {router.r} filter show dev {ifname} {hook}").stdout for hook in ("ingress", "egress"))


def echo_requests(path) -> int:
    if not path.exists():
        return 0
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return sum(r["packets"] for r in records if r.get("icmpType") == 8 and r["direction"] == "ingress")


def assert_still_running(agent, router, running, tmp_path) -> None:
    assert agent.config is running and agent.generation == 1
    assert "kipfix" in kipfix_filters(router, "r1") and "kipfix" not in kipfix_filters(router, "r2a")
    assert agent.cache.idle_ns == 1_000_000_000
    out = sh(f"ip netns exec {router.h1} ping -c 6 -i 0.05 -q 10.2.0.1").stdout
    assert "6 packets transmitted, 6 received" in out

    def drained():
        agent.cycle()
        return echo_requests(tmp_path / "flows.jsonl") >= 6
    wait_for(drained, 30, "the pings' record in the running jsonLines file", interval=0.2)
    assert echo_requests(tmp_path / "flows.jsonl") == 6
    assert not (tmp_path / "gone").exists()


def stop(agent, pin_path: str) -> None:
    agent.shutdown()
    shutil.rmtree(pin_path, ignore_errors=True)
    remove_state_files(pin_path)  # the crash journal the agent kept in /run/kipfix


def test_an_apply_that_cannot_open_its_output_changes_nothing(router, tmp_path):
    from kipfix.agent.daemon import Agent

    running, broken = configs(router, tmp_path)
    agent = Agent(running)
    try:
        wait_for(lambda: "kipfix" in kipfix_filters(router, "r1"), 10, "r1 attached")
        with pytest.raises(ConfigError, match=r"^jsonLines: cannot open '.*/gone/flows.jsonl': No such file"):
            agent.apply(broken)
        time.sleep(1.5)  # the attach manager would have attached r2a by now
        assert_still_running(agent, router, running, tmp_path)
    finally:
        stop(agent, running.pin_path)
    assert not (tmp_path / "gone").exists() and not os.path.exists(default_path(running.pin_path))


def test_a_kubernetes_config_that_fails_to_apply_is_reported_back(router, tmp_path):
    from kipfix.agent.kubeagent import KubeAgent

    running, broken = configs(router, tmp_path)
    agent = KubeAgent(running)
    results = []
    try:
        wait_for(lambda: "kipfix" in kipfix_filters(router, "r1"), 10, "r1 attached")
        agent.offer(broken, results.append)
        assert agent.reload() is False  # what the run loop does when woken
        assert len(results) == 1 and results[0].startswith("jsonLines: cannot open '")
        time.sleep(1.5)
        assert_still_running(agent, router, running, tmp_path)
        agent.offer(running, results.append)  # the same config again is applied and says so
        assert agent.reload() is True and results[1:] == [None]
    finally:
        stop(agent, running.pin_path)
