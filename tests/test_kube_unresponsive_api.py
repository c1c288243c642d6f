"""An API server that accepts connections and never answers: the agent logs and retries, it never hangs."""
from __future__ import annotations

import logging
import socket
import threading
import time

import pytest
from kubernetes import client

from kipfix.agent import kubeagent
from kipfix.agent.kube import client as kube_client


@pytest.fixture
def silent_server():
    """A TCP listener on loopback that accepts and then says nothing."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                return
            accepted.append(conn)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1], accepted
    stop.set()
    server.close()
    for conn in accepted:
        conn.close()


def _api(port: int) -> client.ApiClient:
    """The agent's own kind of client (load_kube_config makes it the same way)."""
    configuration = client.Configuration()
    configuration.host = f"https://127.0.0.1:{port}"
    configuration.verify_ssl = False
    return kube_client.api_client(configuration)


def _wait_for_records(caplog, text: str, count: int, seconds: float) -> list[str]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        found = [r.getMessage() for r in caplog.records if text in r.getMessage()]
        if len(found) >= count:
            return found
        time.sleep(0.1)
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


def test_config_watch_and_report_retry_when_the_api_server_never_answers(silent_server, caplog, monkeypatch):
    port, accepted = silent_server
    monkeypatch.setattr(kube_client, "REQUEST_TIMEOUT", (1, 1))  # every call
    monkeypatch.setattr(kubeagent, "REQUEST_TIMEOUT", (1, 1))  # the watch's connect timeout
    caplog.set_level(logging.WARNING, logger="kipfix")
    mode = kubeagent.KubernetesMode("node-x", "kipfix", api=_api(port), agent_factory=lambda *a: None,
                               serve_metrics=False)
    monkeypatch.setattr(kubeagent, "RENEW_SECONDS", 0.5)
    threads = [threading.Thread(target=mode.watch_config, daemon=True),
               threading.Thread(target=mode.report_loop, daemon=True)]
    for thread in threads:
        thread.start()
    try:
        watched = _wait_for_records(caplog, "watching ConfigMap kipfix/kipfix-node-node-x", 2, 20)
        reported = _wait_for_records(caplog, "reporting node state to Lease kipfix/kipfix-agent-node-x failed", 2, 20)
    finally:
        mode.request_stop()
        for thread in threads:
            thread.join(timeout=10)
    # each timed-out call was logged and retried on a fresh connection
    assert len(watched) >= 2 and all("retrying" in m for m in watched), watched
    assert len(reported) >= 2, reported
    assert len(accepted) >= 4
    assert not any(thread.is_alive() for thread in threads)
