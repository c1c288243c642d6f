"""The resolve step: what only the host can tell, checked against real files, names and namespaces.

And the other half of the split: parsing touches nothing of the host (an
audit hook watches it), and the operator cannot even reach the resolve step.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from kipfix.agent.config import ConfigError, parse_config
from kipfix.agent.config.resolve import resolve_config

V4 = ["sourceIPv4Address", "destinationIPv4Address", "octetDeltaCount", "packetDeltaCount"]


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A test CA, a client certificate signed by it, the client key encrypted, and files that are not PEM."""
    d = tmp_path_factory.mktemp("pki")

    def run(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=kipfix test CA")
    run("req", *ec, "-keyout", "client.key", "-out", "client.csr", "-subj", "/CN=kipfix-exporter")
    run("x509", "-req", "-in", "client.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "client.pem", "-days", "2")
    run("ec", "-in", "client.key", "-aes256", "-passout", "pass:secret", "-out", "encrypted.key")
    (d / "not-pem.crt").write_bytes(b"test CA bytes\n")
    run("x509", "-in", "ca.pem", "-outform", "DER", "-out", "ca.der")
    return d


def tls(ca, cert=None, key=None) -> dict:
    tls = {"ca": str(ca)}
    if cert is not None:
        tls.update(cert=str(cert), key=str(key))
    return {"collectors": [{"address": "127.0.0.1:4739", "transport": "tls", "tls": tls}],
            "templates": [{"id": 256, "template": V4}]}


def resolve_error(doc: dict, **kwargs) -> str:
    with pytest.raises(ConfigError) as err:
        resolve_config(parse_config(doc), **kwargs)
    return str(err.value)


# ---- TLS ------------------------------------------------------------------------------------

def test_pem_files_that_load_pass(pki):
    resolve_config(parse_config(tls(pki / "ca.pem", pki / "client.pem", pki / "client.key")))


@pytest.mark.parametrize("name, reason", [
    ("not-pem.crt", "[X509: NO_CERTIFICATE_OR_CRL_FOUND] no certificate or crl found"),
    ("ca.der", "[X509: NO_CERTIFICATE_OR_CRL_FOUND] no certificate or crl found"),  # DER, not PEM
    ("client.key", "[X509: NO_CERTIFICATE_OR_CRL_FOUND] no certificate or crl found"),  # a key, not a certificate
])
def test_a_ca_that_is_not_a_pem_certificate_is_named(pki, name, reason):
    assert resolve_error(tls(pki / name), source="/etc/kipfix.yaml") == (
        f"/etc/kipfix.yaml: collectors[0].tls.ca: file '{pki / name}' is not a PEM CA certificate (ssl: {reason}); "
        "accepted: a PEM file with the CA certificate(s) that signed the collector's certificate")


def test_missing_and_unreadable_tls_files_are_named(pki, tmp_path):
    assert resolve_error(tls(tmp_path / "nope.pem")) == (
        f"collectors[0].tls.ca: file '{tmp_path / 'nope.pem'}' cannot be read (No such file or directory); "
        "accepted: a readable PEM file")
    assert resolve_error(tls(tmp_path)) == (
        f"collectors[0].tls.ca: file '{tmp_path}' is not a regular file; accepted: a readable PEM file")


def test_a_client_certificate_must_load_with_its_key(pki):
    assert resolve_error(tls(pki / "ca.pem", pki / "client.pem", pki / "ca.key")).startswith(
        f"collectors[0].tls.cert: file '{pki / 'client.pem'}' and file '{pki / 'ca.key'}' do not load as a "
        "certificate and its private key (ssl: [X509: KEY_VALUES_MISMATCH] key values mismatch)")
    # an encrypted key is refused, never asked for on a terminal
    assert "unencrypted private key" in resolve_error(tls(pki / "ca.pem", pki / "client.pem", pki / "encrypted.key"))


def test_a_file_from_a_secret_is_named_as_the_secret(pki):
    labels = {str(pki / "not-pem.crt"): "Secret 'collector-tls' key 'ca.crt'"}
    assert resolve_error(tls(pki / "not-pem.crt"), file_labels=labels).startswith(
        "collectors[0].tls.ca: Secret 'collector-tls' key 'ca.crt' is not a PEM CA certificate")


# ---- names, files, namespaces, bpffs ----------------------------------------------------------------

def test_a_collector_name_must_resolve():
    doc = {"collectors": [{"address": "localhost:4739"}, {"address": "kipfix-collector.invalid:4739"}],
           "templates": [{"id": 256, "template": V4}]}
    message = resolve_error(doc)
    assert message.startswith("collectors[1].address: host 'kipfix-collector.invalid' does not resolve (")
    assert message.endswith("); accepted: an IP address, or a name this host resolves")


def test_json_lines_must_be_writable(tmp_path):
    resolve_config(parse_config({"jsonLines": str(tmp_path / "flows.jsonl")}))
    resolve_config(parse_config({"jsonLines": "-"}))
    assert resolve_error({"jsonLines": str(tmp_path / "missing" / "flows.jsonl")}) == (
        f"jsonLines: '{tmp_path / 'missing' / 'flows.jsonl'}': directory '{tmp_path / 'missing'}' does not exist; "
        "accepted: a file in an existing directory this agent can write to, or - for stdout")
    assert resolve_error({"jsonLines": str(tmp_path)}).startswith(f"jsonLines: '{tmp_path}' is a directory; ")
    os.mkfifo(tmp_path / "fifo")
    assert resolve_error({"jsonLines": str(tmp_path / "fifo")}).startswith(
        f"jsonLines: '{tmp_path / 'fifo'}' is neither a regular file nor a character device; ")
    resolve_config(parse_config({"jsonLines": "/dev/null"}))


@pytest.mark.root
def test_json_lines_on_a_read_only_filesystem_is_refused(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)], check=True)
    try:
        assert resolve_error({"jsonLines": str(folder / "flows.jsonl")}) == (
            f"jsonLines: '{folder / 'flows.jsonl'}': its directory is not writable; accepted: a file in an "
            "existing directory this agent can write to, or - for stdout")
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def selection(netns: str) -> dict:
    return {"interfaces": [{"netns": netns, "names": ["eth0"]}]}


def test_a_netns_file_must_be_a_network_namespace():
    resolve_config(parse_config(selection("/proc/self/ns/net")))
    resolve_config(parse_config(selection("kipfix-test-not-there-yet")))  # waited for: attached when it appears
    assert resolve_error(selection("/proc/self/ns/mnt")) == (
        "interfaces[0].netns: '/proc/self/ns/mnt': '/proc/self/ns/mnt' is another kind of namespace, not a network "
        "namespace; accepted: a name from `ip netns` or a path such as /proc/PID/ns/net")
    assert resolve_error(selection("/etc/hostname")).startswith(
        "interfaces[0].netns: '/etc/hostname': '/etc/hostname' is not a namespace file, not a network namespace")


@pytest.mark.root
def test_a_named_netns_resolves_under_var_run_netns():
    name = f"kftest-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        resolve_config(parse_config(selection(name)))
    finally:
        subprocess.run(["ip", "netns", "del", name], check=True)


def test_the_pin_path_must_be_on_bpffs(tmp_path):
    message = resolve_error({"pinPath": str(tmp_path / "pins")})
    assert message.startswith(f"pinPath: '{tmp_path / 'pins'}' is on a ")
    assert message.endswith(", not bpf; accepted: a directory on a bpf filesystem, such as /sys/fs/bpf/kipfix "
                            "(mount one with `mount -t bpf bpf /sys/fs/bpf`)")
    (tmp_path / "file").write_text("")
    assert resolve_error({"pinPath": str(tmp_path / "file")}).startswith(
        f"pinPath: '{tmp_path / 'file'}' exists and is not a directory")


@pytest.mark.root
def test_a_pin_path_on_bpffs_passes():
    resolve_config(parse_config({"pinPath": f"/sys/fs/bpf/kipfix-test-{uuid.uuid4().hex[:8]}/not/yet/made"}))


# ---- purity ------------------------------------------------------------------------------------------

HOST_EVENTS = ("open", "socket.", "os.listdir", "os.scandir", "os.chdir", "subprocess.", "os.system", "fcntl.")


@contextlib.contextmanager
def no_host_access(monkeypatch):
    """Fail on any file, socket, DNS or process access while the body runs (audit hooks and os.stat)."""
    seen: list[str] = []
    watching = [True]

    def hook(event, args):
        if watching[0] and event.startswith(HOST_EVENTS):
            seen.append(f"{event} {args!r:.120}")

    sys.addaudithook(hook)  # cannot be removed: switched off below
    for name in ("stat", "lstat", "access"):
        real = getattr(os, name)
        monkeypatch.setattr(os, name, lambda *a, _name=name, _real=real, **k: seen.append(f"os.{_name} {a}")
                            or _real(*a, **k))
    try:
        yield seen
    finally:
        watching[0] = False
        monkeypatch.undo()


def test_parsing_touches_nothing_of_the_host(pki, monkeypatch):
    doc = {"collectors": [{"address": "kipfix-collector.invalid:4739", "transport": "tls",
                           "tls": {"ca": str(pki / "not-pem.crt"), "cert": "/nonexistent/c.pem",
                                   "key": "/nonexistent/c.key"}}],
           "templates": [{"id": 256, "template": V4}],
           "interfaces": [{"netns": "/proc/1/ns/net", "names": ["eth0"]}, {"netns": "kfnone", "names": ["eth0"]}],
           "pods": [{"podSelector": {"matchLabels": {"app": "web"}}}],
           "jsonLines": "/nonexistent/flows.jsonl", "pinPath": "/tmp/not-bpffs", "metrics": {"address": "::1"}}
    parse_config(doc)  # imports and the element table are loaded once, outside the watch
    with no_host_access(monkeypatch) as seen:
        config = parse_config(doc)
    assert seen == []
    assert config.collectors[0].host == "kipfix-collector.invalid"


def test_the_operator_cannot_reach_the_resolve_step():
    from test_layers import GRAPH

    reached, todo = set(), [m for m in GRAPH if m.startswith("kipfix.operator")]
    while todo:
        module = todo.pop()
        if module not in reached:
            reached.add(module)
            todo += [target for target in GRAPH.get(module, ()) if target in GRAPH]
    assert "kipfix.agent.config.parse" in reached
    assert "kipfix.agent.config.resolve" not in reached
    assert not [m for m in reached if m.startswith(("kipfix.agent.daemon", "kipfix.agent.kubeagent"))]


def test_the_operator_validates_without_stand_ins():
    source = (Path(__file__).resolve().parent.parent / "operator" / "spec.py").read_text()
    assert "tempfile" not in source and "STAND_IN" not in source and "getaddrinfo" not in source
