"""A real Prometheus scrapes a real agent; its HTTP API returns the exact figures.

Prometheus (Debian's package) runs on loopback with a generated config, a
1 s scrape interval and its own storage in the test's temp dir, and loads
deploy/prometheus/kipfix-alerts.yaml, so the alert rules are evaluated on
real series too. Expected values come from the traffic generator (ping -c,
a fixed number of datagrams) and the kernel's interface counters (ip -s link).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from agentproc import AgentProcess, wait_for
from router import link_stats, sh

from kipfix.agent.datapath import bpfsys

REPO = Path(__file__).resolve().parents[1]
ALERTS = REPO / "deploy" / "prometheus" / "kipfix-alerts.yaml"
DASHBOARD = REPO / "deploy" / "grafana" / "kipfix-dashboard.json"
ETH_HEADER = 14

needs_prometheus = pytest.mark.skipif(shutil.which("prometheus") is None,
                                      reason="prometheus is not installed (Debian package prometheus)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Prometheus:
    """`prometheus` on 127.0.0.1 scraping ``targets`` every second."""

    def __init__(self, tmp_path: Path, targets: list[str], rule_files: list[Path] = (), scrape: dict | None = None):
        """``scrape``: more of the scrape config (scheme, tls_config, basic_auth)."""
        self.dir = tmp_path / f"prometheus-{free_port()}"
        self.dir.mkdir()
        self.port = free_port()
        config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
                  "rule_files": [str(p) for p in rule_files],
                  "scrape_configs": [{"job_name": "kipfix-agent", "static_configs": [{"targets": targets}],
                                      **(scrape or {})}]}
        (self.dir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log_path = self.dir / "prometheus.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Prometheus":
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            ["prometheus", f"--config.file={self.dir / 'prometheus.yml'}",
             f"--storage.tsdb.path={self.dir / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}",
             "--log.level=warn"], stdout=self._log, stderr=subprocess.STDOUT)
        wait_for(self._ready, 60, "prometheus ready")
        return self

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited with {self.proc.returncode}:\n{self.log_path.read_text()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as reply:
                return reply.status == 200
        except OSError:
            return False

    def api(self, path: str, **params) -> dict:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=5) as reply:
            body = json.load(reply)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> dict[tuple, float]:
        """Instant query: {sorted label items (without __name__): value}."""
        result = self.api("query", query=expr)["result"]
        return {tuple(sorted((k, v) for k, v in r["metric"].items() if k != "__name__")): float(r["value"][1])
                for r in result}

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        assert len(result) <= 1, result
        return next(iter(result.values()), None)

    def settle(self, expr: str, expected: float, timeout: float = 30) -> float | None:
        """Poll ``expr`` until it equals ``expected`` or the deadline passes; the last value either way."""
        deadline = time.monotonic() + timeout
        last = self.value(expr)
        while last != expected and time.monotonic() < deadline:
            time.sleep(0.2)
            last = self.value(expr)
        return last

    def firing(self) -> set[str]:
        return {a["labels"]["alertname"] for a in self.api("alerts")["alerts"] if a["state"] == "firing"}

    def active(self) -> set[str]:
        """Alerts whose expression holds: firing, or pending until their ``for`` has passed."""
        return {a["labels"]["alertname"] for a in self.api("alerts")["alerts"]}

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None:
            self._log.close()


@pytest.fixture
def stack(tmp_path):
    """make(agent config) -> (AgentProcess, Prometheus scraping its metrics port)."""
    made = []

    def make(config):
        port = free_port()
        agent = AgentProcess(tmp_path, {**config, "metrics": {"address": "127.0.0.1", "port": port}})
        made.append(agent)
        agent.start()
        prometheus = Prometheus(tmp_path, [f"127.0.0.1:{port}"], [ALERTS])
        made.append(prometheus)
        prometheus.start()
        wait_for(lambda: prometheus.value('up{job="kipfix-agent"}') == 1, 30, "the agent scraped (up == 1)")
        return agent, prometheus

    yield make
    for thing in reversed(made):
        if isinstance(thing, Prometheus):
            thing.stop()
        else:
            thing.cleanup()


class _EnableStatsAttr(ctypes.Structure):
    _fields_ = [("type", ctypes.c_uint32)]


@contextlib.contextmanager
def bpf_stats_on():
    """BPF run-time statistics on while inside (BPF_ENABLE_STATS: off again when the fd closes)."""
    fd = bpfsys._bpf(32, _EnableStatsAttr(0))
    try:
        yield
    finally:
        os.close(fd)


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every panel, with the dashboard's variables filled in."""
    dashboard = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"].replace("$__rate_interval", "5s").replace("$job", ".*").replace("$instance", ".*")
            out.append((panel["title"], expr))
    return out


def sysctl_bpf_stats() -> str:
    return Path("/proc/sys/kernel/bpf_stats_enabled").read_text().strip()


@pytest.mark.root
@needs_prometheus
def test_packet_and_byte_counters_equal_the_packets_sent(router, stack):
    agent, prometheus = stack({"interfaces": [{"netns": router.r, "names": ["r1"]}],
                               "timeouts": {"idle": 2, "active": 60}})
    agent.wait_log("attached kipfix to r1")
    count = 25
    stats_were_on = sysctl_bpf_stats() != "0"
    before = link_stats(router.r, "r1")
    with bpf_stats_on():
        out = sh(f"ip netns exec {router.h1} ping -c {count} -i 0.02 -q 10.2.0.1").stdout
    after = link_stats(router.r, "r1")
    assert f"{count} packets transmitted, {count} received" in out
    # h1's echo requests enter r1; h2's replies come back through r2b and leave by r1.
    assert after["rx_packets"] - before["rx_packets"] == count
    assert after["tx_packets"] - before["tx_packets"] == count

    where = f'netns="{router.r}",interface="r1"'
    for direction, prefix in (("ingress", "rx"), ("egress", "tx")):
        packets = prometheus.settle(f'kipfix_agent_observed_packets_total{{{where},direction="{direction}"}}',
                                    count)
        assert (direction, packets) == (direction, count)
        link_bytes = after[f"{prefix}_bytes"] - before[f"{prefix}_bytes"]
        octets = prometheus.settle(f'kipfix_agent_observed_bytes_total{{{where},direction="{direction}"}}',
                                   link_bytes - ETH_HEADER * count)
        assert (direction, octets + ETH_HEADER * count) == (direction, link_bytes)
        assert octets == count * 84  # 20 IPv4 + 8 ICMP + 56 data
    if not stats_were_on:  # then only the ping's packets ran the programs with statistics on
        for direction, prefix in (("ingress", "rx"), ("egress", "tx")):
            runs = prometheus.settle(f'kipfix_agent_bpf_runs_total{{direction="{direction}"}}', count)
            assert (direction, runs) == (direction, after[f"{prefix}_packets"] - before[f"{prefix}_packets"])

    # Both ping flows end by idle timeout and are exported with that reason.
    exported = prometheus.settle('kipfix_agent_exported_flows_total{end_reason="idle_timeout"}', 2)
    assert exported == 2
    assert prometheus.value(f"kipfix_agent_interface_attached{{{where}}}") == 1
    assert prometheus.value("kipfix_agent_config_generation") == 1
    assert prometheus.value("kipfix_agent_not_metered_packets_total") == 0
    assert prometheus.value("kipfix_agent_drain_duration_seconds_count") > 0
    assert "KipfixFlowTableFull" not in prometheus.firing()

    # Every alert rule evaluates without error on these series ...
    rules = [r for g in prometheus.api("rules")["groups"] for r in g["rules"]]
    assert len(rules) == len([r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]])
    assert [(r["name"], r["health"], r.get("lastError", "")) for r in rules if r["health"] != "ok"] == []
    # ... and every dashboard query is valid PromQL; the traffic panels have data.
    with_data = set()
    for title, expr in dashboard_queries():
        if prometheus.query(expr):
            with_data.add(title)
    assert {"Flows exported / s per node", "Bytes / s per node and direction", "Packets / s, top 10 interfaces",
            "Interfaces (1 attached, 0 named in the config but not attached)"} <= with_data


    # A rejected reload is counted (and alerted on); an applied one raises the generation.
    agent.write_config(dict(agent.config, timeouts={"idle": -1}))
    agent.signal(signal.SIGHUP)
    assert prometheus.settle("kipfix_agent_reload_failures_total", 1) == 1
    assert prometheus.value("kipfix_agent_config_generation") == 1
    wait_for(lambda: "KipfixReloadFailed" in prometheus.firing(), 30, "alert KipfixReloadFailed firing")
    agent.write_config(dict(agent.config, timeouts={"idle": 3, "active": 60}))
    agent.signal(signal.SIGHUP)
    assert prometheus.settle("kipfix_agent_config_generation", 2) == 2


@pytest.mark.root
@needs_prometheus
def test_table_full_counter_rises_and_the_alert_fires(router, stack):
    agent, prometheus = stack({"interfaces": [{"netns": router.r, "names": ["r1"]}], "maxFlows": 16,
                               "drainInterval": 3})
    agent.wait_log("attached kipfix to r1")
    assert prometheus.value("kipfix_agent_kernel_table_capacity") == 16
    assert prometheus.value("kipfix_agent_not_metered_packets_total") == 0
    # 40 distinct UDP flows in one drain interval: 16 fit, 24 datagrams (28 octets each) do not.
    # The router blackholes them, so no reply competes for the table.
    sh(f"ip -n {router.r} route add blackhole 10.9.0.0/24")
    script = ("import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
              "for port in range(40): s.sendto(b'', ('10.9.0.1', 20000 + port))")
    sh(f"ip netns exec {router.h1} {sys.executable} -c \"{script}\"")
    assert prometheus.settle("kipfix_agent_not_metered_packets_total", 24) == 24
    assert prometheus.settle("kipfix_agent_not_metered_bytes_total", 672) == 672
    # The drain after the burst found the table full: 16 flows, until the next drain empties it.
    assert prometheus.settle("max_over_time(kipfix_agent_kernel_flows[1m])", 16) == 16
    wait_for(lambda: "KipfixFlowTableFull" in prometheus.firing(), 30, "alert KipfixFlowTableFull firing")
    agent.wait_log("flow table full", timeout=10)
    assert "24 packets / 672 octets not metered" in agent.log()


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed (Debian package prometheus)")
def test_alert_rules_pass_promtool():
    result = subprocess.run(["promtool", "check", "rules", str(ALERTS)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
    names = {rule["alert"] for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]}
    assert {"KipfixAgentNotExporting", "KipfixFlowTableFull", "KipfixCollectorUnreachable",
            "KipfixNodeNotReady"} <= names


# ---- least exposure: HTTPS, client certificates, basic authentication ---------------------

@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A test CA; the agent's certificate for 127.0.0.1; a client certificate for Prometheus."""
    d = tmp_path_factory.mktemp("metrics-pki")

    def run(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=kipfix test CA")
    for name, cn, ext in (("agent", "kipfix-agent", "subjectAltName=IP:127.0.0.1"),
                          ("prometheus", "prometheus", "extendedKeyUsage=clientAuth")):
        run("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}")
        (d / f"{name}.ext").write_text(ext + "\n")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext")
    (d / "password").write_text("s3cret-scrape\n")
    os.chmod(d / "password", 0o600)
    return d


def fetch(url: str, context=None, auth: tuple[str, str] | None = None) -> tuple[int, str]:
    """(HTTP status, body), or (0, the error) when no HTTP exchange happened."""
    request = urllib.request.Request(url)
    if auth is not None:
        import base64
        request.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=5, context=context) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, ""
    except (urllib.error.URLError, OSError) as err:
        return 0, str(err)


@pytest.mark.root
@needs_prometheus
def test_prometheus_scrapes_over_https_with_client_certificate_and_basic_auth(tmp_path, pki):
    import ssl

    port = free_port()
    agent = AgentProcess(tmp_path, {"metrics": {
        "address": "127.0.0.1", "port": port,
        "tls": {"cert": str(pki / "agent.pem"), "key": str(pki / "agent.key"), "clientCA": str(pki / "ca.pem")},
        "basicAuth": {"username": "prometheus", "passwordFile": str(pki / "password")}}})
    prometheus = Prometheus(tmp_path, [f"127.0.0.1:{port}"], [ALERTS], scrape={
        "scheme": "https",
        "tls_config": {"ca_file": str(pki / "ca.pem"), "cert_file": str(pki / "prometheus.pem"),
                       "key_file": str(pki / "prometheus.key")},
        "basic_auth": {"username": "prometheus", "password_file": str(pki / "password")}})
    try:
        agent.start()
        agent.wait_log(f"serving metrics on https://127.0.0.1:{port}/metrics (client certificates required) "
                       "(basic authentication)")
        prometheus.start()
        wait_for(lambda: prometheus.value('up{job="kipfix-agent"}') == 1, 30, "the agent scraped over https")
        assert prometheus.value("kipfix_agent_config_generation") == 1

        url = f"https://127.0.0.1:{port}/metrics"
        trusting = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        with_cert = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        with_cert.load_cert_chain(pki / "prometheus.pem", pki / "prometheus.key")
        assert fetch(f"http://127.0.0.1:{port}/metrics")[0] == 0  # plain HTTP gets no answer
        assert fetch(url, trusting, ("prometheus", "s3cret-scrape"))[0] == 0  # no client certificate
        assert fetch(url, with_cert) == (401, "")
        assert fetch(url, with_cert, ("prometheus", "wrong"))[0] == 401
        assert fetch(url, with_cert, ("someone", "s3cret-scrape"))[0] == 401
        status, body = fetch(url, with_cert, ("prometheus", "s3cret-scrape"))
        assert status == 200 and "kipfix_agent_config_generation 1.0" in body
    finally:
        prometheus.stop()
        agent.cleanup()


def test_unloadable_metrics_files_stop_the_agent_before_it_loads_anything(tmp_path, pki):
    (tmp_path / "not-pem.crt").write_text("hello\n")
    (tmp_path / "empty").write_text("")
    for metrics, expected in (
            ({"tls": {"cert": str(tmp_path / "not-pem.crt"), "key": str(pki / "agent.key")}},
             "do not load as a certificate and its private key"),
            ({"tls": {"cert": str(pki / "agent.pem"), "key": str(pki / "agent.key"),
                      "clientCA": str(tmp_path / "not-pem.crt")}}, "metrics.tls.clientCA"),
            ({"basicAuth": {"username": "p", "passwordFile": str(tmp_path / "empty")}}, "is empty"),
            ({"basicAuth": {"passwordFile": str(pki / "password")}}, "exactly one of username or usernameFile"),
            ({"tls": {"cert": str(pki / "agent.pem")}}, "metrics.tls.key: required")):
        path = tmp_path / "kipfix.yaml"
        path.write_text(yaml.safe_dump({"pinPath": "/sys/fs/bpf/kipfix-test-never", "metrics": metrics}))
        result = subprocess.run([sys.executable, "-m", "kipfix.agent.cli", "agent", "--config", str(path)],
                                capture_output=True, text=True, timeout=60)
        assert (result.returncode, expected in result.stderr) == (2, True), result.stderr
        assert "metering program loaded" not in result.stderr
    assert not os.path.exists("/sys/fs/bpf/kipfix-test-never")


@pytest.mark.root
@needs_prometheus
def test_udp_collector_refusing_makes_the_export_alerts_fire(router, stack):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]  # nothing listens here once the socket is closed
    agent, prometheus = stack({"interfaces": [{"netns": router.r, "names": ["r1"]}],
                               "timeouts": {"idle": 1, "active": 60},
                               "collectors": [{"address": f"127.0.0.1:{closed}"}],
                               "templates": [{"id": 256, "template": ["packetDeltaCount", "octetDeltaCount"]}]})
    agent.wait_log("attached kipfix to r1")
    sh(f"ip netns exec {router.h1} ping -c 5 -i 0.02 -q 10.2.0.1")
    name = f'collector="udp://127.0.0.1:{closed}"'
    wait_for(lambda: (prometheus.value(f'kipfix_agent_ipfix_send_errors_total{{{name},operation="send",'
                                       f'reason="econnrefused"}}') or 0) >= 1, 30, "refused sends counted")
    # the flows wait for the collector; nothing was delivered, ever
    assert prometheus.settle(f"kipfix_agent_ipfix_queued_flows{{{name}}}", 2) == 2
    assert prometheus.value(f"kipfix_agent_ipfix_last_export_timestamp_seconds{{{name}}}") == 0
    wait_for(lambda: {"KipfixAgentNotExporting", "KipfixCollectorSendErrors"} <= prometheus.active(), 30,
             "the export alerts pending (they fire after their 'for')")
    agent.wait_log("holding flows and probing with templates until the collector accepts them")
