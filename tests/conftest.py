"""Shared fixtures: a routed topology and real agent processes."""

from __future__ import annotations

import pytest

from agentproc import AgentProcess
from router import Router


@pytest.fixture
def router():
    with Router() as topo:
        yield topo


@pytest.fixture
def agent_factory(tmp_path):
    """make(config, **kw) -> AgentProcess; every agent made is stopped and its pins removed."""
    agents = []

    def make(config, **kw):
        agent = AgentProcess(tmp_path, config, **kw)
        agents.append(agent)
        return agent

    yield make
    for agent in agents:
        agent.cleanup()
