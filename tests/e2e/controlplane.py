"""A real Kubernetes control plane on loopback, for the e2e tests.

`ControlPlane` starts etcd, kube-apiserver, kube-controller-manager and
kube-scheduler (binaries built by tests/e2e/build-tools.sh) with generated
certificates, every listener on 127.0.0.1, and writes an admin kubeconfig.
There is no kubelet: `SimulatedNodes` registers Node objects with the labels
a test asks for, keeps them Ready (a Lease renewed like a kubelet's) and
plays the kubelet's part for pods bound to them (marks them Running and
Ready, and finishes their deletion), so the DaemonSet, Deployment and
garbage-collection machinery behaves as on a real cluster.
`SimulatedNodes` only uses the API, so it works on any cluster.

`serviceaccount_kubeconfig()` writes a kubeconfig holding a token from the
TokenRequest API, which is what a pod running as that ServiceAccount has.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import datetime
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from kubernetes import client, config
from kubernetes.client.rest import ApiException

CONTROL_PLANE = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")
BINARIES = (*CONTROL_PLANE, "kubectl", "kubelet", "helm")  # what build-tools.sh builds
SERVICE_CIDR = "10.96.0.0/16"
ISSUER = "https://kubernetes.default.svc.cluster.local"


def default_bin_dir() -> Path:
    """Where build-tools.sh puts the binaries (KIPFIX_E2E_CACHE/bin)."""
    cache = os.environ.get("KIPFIX_E2E_CACHE") or os.path.expanduser("~/.cache/kipfix-e2e")
    return Path(cache) / "bin"


class ControlPlaneError(RuntimeError):
    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    # If the test process is killed outright, take the component with it.
    # (The signal follows the thread that started the process: start the
    # control plane from a thread that lives as long as it should.)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_pki(d: Path) -> None:
    """CA, apiserver serving cert, client certs and the service-account key."""
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
             "-keyout", "ca.key", "-out", "ca.crt", "-subj", "/CN=kipfix-e2e-ca", cwd=d)
    _openssl("genrsa", "-out", "sa.key", "2048", cwd=d)
    _openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=d)
    serving, clientauth = d / "serving.ext", d / "client.ext"
    clientauth.write_text("extendedKeyUsage=clientAuth\n")
    serving.write_text(
        "subjectAltName=IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,"
        "DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local\n"
        "extendedKeyUsage=serverAuth\n")
    certs = {
        "apiserver": ("/CN=kube-apiserver", serving),
        "admin": ("/O=system:masters/CN=kipfix-e2e-admin", clientauth),
        "controller-manager": ("/CN=system:kube-controller-manager", clientauth),
        "scheduler": ("/CN=system:kube-scheduler", clientauth),
        # the apiserver's client certificate towards kubelets (exec, logs)
        "apiserver-kubelet-client": ("/O=system:masters/CN=kube-apiserver-kubelet-client", clientauth),
    }
    for name, (subj, extfile) in certs.items():
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
                 "-out", f"{name}.csr", "-subj", subj, cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                 "-CAcreateserial", "-days", "2", "-out", f"{name}.crt", "-extfile", str(extfile), cwd=d)


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def write_kubeconfig(path: Path, server: str, ca: Path, *, user: str,
                     cert: Path | None = None, key: Path | None = None,
                     token: str | None = None, namespace: str = "default") -> Path:
    creds: dict = {}
    if cert and key:
        creds = {"client-certificate-data": _b64(cert), "client-key-data": _b64(key)}
    if token:
        creds = {"token": token}
    doc = {
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "kipfix-e2e", "cluster": {
            "server": server, "certificate-authority-data": _b64(ca)}}],
        "users": [{"name": user, "user": creds}],
        "contexts": [{"name": user, "context": {
            "cluster": "kipfix-e2e", "user": user, "namespace": namespace}}],
        "current-context": user,
    }
    path.write_text(yaml.safe_dump(doc))
    path.chmod(0o600)
    return path


def serviceaccount_kubeconfig(api: client.ApiClient, namespace: str, name: str, path: Path,
                              *, expiration_seconds: int = 3600) -> Path:
    """Write a kubeconfig that authenticates as ServiceAccount namespace/name.

    The token comes from the TokenRequest API (as the projected token in a
    pod does); server and CA are taken from `api`'s configuration.
    """
    tr = client.CoreV1Api(api).create_namespaced_service_account_token(
        name, namespace, client.AuthenticationV1TokenRequest(
            spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=expiration_seconds)))
    cfg = api.configuration
    if cfg.ssl_ca_cert:
        trust = {"certificate-authority-data": _b64(Path(cfg.ssl_ca_cert))}
    else:  # the admin kubeconfig itself skips verification
        trust = {"insecure-skip-tls-verify": True}
    user = f"{namespace}-{name}"
    doc = {
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "cluster", "cluster": {"server": cfg.host, **trust}}],
        "users": [{"name": user, "user": {"token": tr.status.token}}],
        "contexts": [{"name": user, "context": {
            "cluster": "cluster", "user": user, "namespace": namespace}}],
        "current-context": user,
    }
    path.write_text(yaml.safe_dump(doc))
    path.chmod(0o600)
    return path


def api_client(kubeconfig: str | os.PathLike) -> client.ApiClient:
    """A fresh ApiClient for a kubeconfig (never touches the global default)."""
    return config.new_client_from_config(config_file=str(kubeconfig))


@dataclass
class _Proc:
    name: str
    popen: subprocess.Popen
    log: Path


@dataclass
class ControlPlane:
    """etcd + kube-apiserver + kube-controller-manager + kube-scheduler.

    Use as a context manager; everything is stopped and the temporary
    directory removed on exit, also when start-up fails. Set
    KIPFIX_E2E_KEEP=1 to keep the directory (logs, certs) for debugging.
    """

    bin_dir: Path = field(default_factory=default_bin_dir)
    workdir: Path | None = None
    procs: list[_Proc] = field(default_factory=list)
    kubeconfig: Path | None = None
    server: str = ""
    start_timeout: float = 120.0

    def binary(self, name: str) -> Path:
        return self.bin_dir / name

    def __enter__(self) -> "ControlPlane":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- start-up ---------------------------------------------------------

    def start(self) -> None:
        missing = [b for b in CONTROL_PLANE if not os.access(self.binary(b), os.X_OK)]
        if missing:
            raise ControlPlaneError(
                f"e2e binaries missing in {self.bin_dir}: {', '.join(missing)}; "
                "run `bash tests/e2e/build-tools.sh` (or set KIPFIX_E2E_CACHE)")
        if not shutil.which("openssl"):
            raise ControlPlaneError("openssl not found on PATH (apt-get install openssl)")
        self.workdir = Path(tempfile.mkdtemp(prefix="kipfix-e2e-"))
        d = self.workdir
        make_pki(d)
        t0 = time.monotonic()

        etcd_port, peer_port = _free_port(), _free_port()
        etcd_url = f"http://127.0.0.1:{etcd_port}"
        self._spawn("etcd", [
            "--name", "e2e", "--data-dir", str(d / "etcd"),
            "--listen-client-urls", etcd_url, "--advertise-client-urls", etcd_url,
            "--listen-peer-urls", f"http://127.0.0.1:{peer_port}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer_port}",
            "--initial-cluster", f"e2e=http://127.0.0.1:{peer_port}",
            "--listen-metrics-urls", f"http://127.0.0.1:{_free_port()}",
            "--unsafe-no-fsync", "--log-level", "warn",
        ])
        self._wait_http("etcd", f"{etcd_url}/health", insecure=False)

        api_port = _free_port()
        self.server = f"https://127.0.0.1:{api_port}"
        self._spawn("kube-apiserver", [
            "--etcd-servers", etcd_url,
            "--bind-address", "127.0.0.1", "--advertise-address", "127.0.0.1",
            "--secure-port", str(api_port),
            "--tls-cert-file", str(d / "apiserver.crt"),
            "--tls-private-key-file", str(d / "apiserver.key"),
            "--client-ca-file", str(d / "ca.crt"),
            "--service-account-key-file", str(d / "sa.pub"),
            "--service-account-signing-key-file", str(d / "sa.key"),
            "--service-account-issuer", ISSUER,
            "--service-cluster-ip-range", SERVICE_CIDR,
            "--authorization-mode", "Node,RBAC",
            "--enable-admission-plugins", "NodeRestriction",
            "--allow-privileged=true",
            "--endpoint-reconciler-type", "none",  # loopback is no valid endpoint IP
            # a real kubelet (realnode.py) serves exec/logs on its node's InternalIP
            "--kubelet-client-certificate", str(d / "apiserver-kubelet-client.crt"),
            "--kubelet-client-key", str(d / "apiserver-kubelet-client.key"),
            "--kubelet-preferred-address-types", "InternalIP,Hostname",
            "--cert-dir", str(d / "apiserver-certs"),
            "--profiling=false", "--v=1",
        ])
        self.kubeconfig = write_kubeconfig(
            d / "admin.kubeconfig", self.server, d / "ca.crt", user="admin",
            cert=d / "admin.crt", key=d / "admin.key")
        self._wait_http("kube-apiserver", f"{self.server}/readyz", client_cert="admin")

        kcm_kubeconfig = write_kubeconfig(
            d / "controller-manager.kubeconfig", self.server, d / "ca.crt",
            user="system:kube-controller-manager",
            cert=d / "controller-manager.crt", key=d / "controller-manager.key")
        kcm_port = _free_port()
        self._spawn("kube-controller-manager", [
            "--kubeconfig", str(kcm_kubeconfig),
            "--authentication-kubeconfig", str(kcm_kubeconfig),
            "--authorization-kubeconfig", str(kcm_kubeconfig),
            "--bind-address", "127.0.0.1", "--secure-port", str(kcm_port),
            "--cert-dir", str(d / "kcm-certs"),
            "--service-account-private-key-file", str(d / "sa.key"),
            "--root-ca-file", str(d / "ca.crt"),
            "--cluster-signing-cert-file", str(d / "ca.crt"),
            "--cluster-signing-key-file", str(d / "ca.key"),
            "--use-service-account-credentials=true",
            "--service-cluster-ip-range", SERVICE_CIDR,
            "--controllers", "*",
            "--leader-elect=false", "--profiling=false", "--v=1",
        ])
        sched_kubeconfig = write_kubeconfig(
            d / "scheduler.kubeconfig", self.server, d / "ca.crt", user="system:kube-scheduler",
            cert=d / "scheduler.crt", key=d / "scheduler.key")
        sched_port = _free_port()
        self._spawn("kube-scheduler", [
            "--kubeconfig", str(sched_kubeconfig),
            "--authentication-kubeconfig", str(sched_kubeconfig),
            "--authorization-kubeconfig", str(sched_kubeconfig),
            "--bind-address", "127.0.0.1", "--secure-port", str(sched_port),
            "--cert-dir", str(d / "scheduler-certs"),
            "--leader-elect=false", "--profiling=false", "--v=1",
        ])
        self._wait_http("kube-controller-manager", f"https://127.0.0.1:{kcm_port}/healthz", insecure=True)
        self._wait_http("kube-scheduler", f"https://127.0.0.1:{sched_port}/healthz", insecure=True)
        self._wait_default_serviceaccount()
        self.startup_seconds = time.monotonic() - t0

    def _spawn(self, name: str, args: list[str]) -> None:
        log = self.workdir / f"{name}.log"
        with open(log, "wb") as f:
            p = subprocess.Popen([str(self.binary(name)), *args], stdout=f, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        self.procs.append(_Proc(name, p, log))

    def _check_alive(self) -> None:
        for p in self.procs:
            if p.popen.poll() is not None:
                raise ControlPlaneError(
                    f"{p.name} exited with status {p.popen.returncode}; last log lines:\n"
                    + self.log_tail(p.name))

    def log_tail(self, name: str, lines: int = 30) -> str:
        for p in self.procs:
            if p.name == name and p.log.exists():
                return "\n".join(p.log.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def _wait_http(self, name: str, url: str, *, insecure: bool = False,
                   client_cert: str | None = None) -> None:
        ctx = None
        if url.startswith("https"):
            if client_cert:
                ctx = ssl.create_default_context(cafile=str(self.workdir / "ca.crt"))
                ctx.load_cert_chain(self.workdir / f"{client_cert}.crt", self.workdir / f"{client_cert}.key")
            else:
                ctx = ssl._create_unverified_context()  # component's own self-signed cert
        deadline = time.monotonic() + self.start_timeout
        last = ""
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                with urllib.request.urlopen(url, context=ctx, timeout=5) as r:
                    if r.status == 200:
                        return
            except Exception as e:  # not up yet
                last = str(e)
            time.sleep(0.3)
        raise ControlPlaneError(f"{name} not healthy at {url} after {self.start_timeout:.0f} s "
                                f"({last}); last log lines:\n{self.log_tail(name)}")

    def _wait_default_serviceaccount(self) -> None:
        # The serviceaccount controller creating default/default shows the
        # controller manager is running its controllers against this API.
        core = client.CoreV1Api(self.api_client())
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            self._check_alive()
            with contextlib.suppress(ApiException):
                core.read_namespaced_service_account("default", "default")
                return
            time.sleep(0.3)
        raise ControlPlaneError("ServiceAccount default/default never appeared; "
                                "kube-controller-manager log:\n" + self.log_tail("kube-controller-manager"))

    # -- use ---------------------------------------------------------------

    def api_client(self) -> client.ApiClient:
        return api_client(self.kubeconfig)

    # -- shutdown ----------------------------------------------------------

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.popen.poll() is None:
                p.popen.terminate()
        for p in reversed(self.procs):
            try:
                p.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.popen.kill()
                p.popen.wait()
        self.procs.clear()
        if self.workdir and not os.environ.get("KIPFIX_E2E_KEEP"):
            shutil.rmtree(self.workdir, ignore_errors=True)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _now_micro() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class SimulatedNodes:
    """Node objects without a kubelet, kept Ready by a background thread.

    add(name, labels) registers a Node (Ready, schedulable, with capacity)
    and a Lease in kube-node-lease; the thread renews the Leases (so the
    node lifecycle controller never marks the nodes unreachable), marks
    pods bound to these nodes Running and Ready, and completes the deletion
    of their pods (what the kubelet does after a graceful delete). close()
    stops the thread and deletes every node it added.
    """

    LEASE_SECONDS = 40

    def __init__(self, api: client.ApiClient, *, interval: float = 1.0, run_pods: bool = True):
        self.api = api
        self.core = client.CoreV1Api(api)
        self.coord = client.CoordinationV1Api(api)
        self.interval = interval
        self.run_pods = run_pods
        self.nodes: dict[str, tuple[int, str]] = {}  # name -> (index for fake pod IPs, node IP)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="simulated-nodes", daemon=True)
        self._thread.start()
        self.errors: list[str] = []

    def add(self, name: str, labels: dict[str, str] | None = None, *,
            internal_ip: str = "127.0.0.1", timeout: float = 60.0) -> None:
        """Register a Ready node; return once it carries no not-ready taint.

        (Admission taints a new node not-ready; the node lifecycle
        controller lifts the taint when it sees the Ready condition.)
        """
        labels = {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
                  "kubernetes.io/arch": "amd64", "kipfix.io/simulated": "true", **(labels or {})}
        now = _now()
        ready = {"type": "Ready", "status": "True", "reason": "KubeletReady",
                 "message": "simulated by the kipfix e2e harness",
                 "lastHeartbeatTime": now, "lastTransitionTime": now}
        resources = {"cpu": "8", "memory": "16Gi", "pods": "110", "ephemeral-storage": "100Gi"}
        status = {
            "conditions": [ready] + [
                {"type": t, "status": "False", "reason": "KubeletHas" + r,
                 "lastHeartbeatTime": now, "lastTransitionTime": now}
                for t, r in (("MemoryPressure", "SufficientMemory"), ("DiskPressure", "NoDiskPressure"),
                             ("PIDPressure", "SufficientPID"))],
            "capacity": resources, "allocatable": resources,
            "addresses": [{"type": "InternalIP", "address": internal_ip},
                          {"type": "Hostname", "address": name}],
            "nodeInfo": {"architecture": "amd64", "operatingSystem": "linux",
                         "kubeletVersion": "v1.33.0-simulated", "kubeProxyVersion": "",
                         "containerRuntimeVersion": "simulated://1", "kernelVersion": os.uname().release,
                         "osImage": "kipfix e2e", "bootID": "", "machineID": "", "systemUUID": ""},
        }
        node = {"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": name, "labels": labels}, "spec": {}, "status": status}
        self.core.create_node(node)
        # Status on create is kept for Nodes, but write it again through the
        # status subresource so it holds whatever the version does.
        self.core.patch_node_status(name, {"status": status})
        self._renew_lease(name)
        with self._lock:
            self.nodes[name] = (len(self.nodes) + 1, internal_ip)
        deadline = time.monotonic() + timeout
        while True:
            taints = self.core.read_node(name).spec.taints or []
            if not any(t.key == "node.kubernetes.io/not-ready" for t in taints):
                return
            if time.monotonic() > deadline:
                raise ControlPlaneError(f"node {name} still tainted after {timeout:.0f} s: {taints}")
            time.sleep(0.2)

    def label(self, name: str, labels: dict[str, str | None]) -> None:
        """Set (or with None, remove) labels on a node."""
        self.core.patch_node(name, {"metadata": {"labels": labels}})

    def remove(self, name: str) -> None:
        with self._lock:
            self.nodes.pop(name, None)
        with contextlib.suppress(ApiException):
            self.core.delete_node(name)
        with contextlib.suppress(ApiException):
            self.coord.delete_namespaced_lease(name, "kube-node-lease")

    def close(self) -> None:
        for name in list(self.nodes):
            self.remove(name)
        self._stop.set()
        self._thread.join(timeout=10)

    # -- the kubelet's part -------------------------------------------------

    def _renew_lease(self, name: str) -> None:
        body = {"metadata": {"name": name, "namespace": "kube-node-lease"},
                "spec": {"holderIdentity": name, "leaseDurationSeconds": self.LEASE_SECONDS,
                         "renewTime": _now_micro()}}
        try:
            self.coord.patch_namespaced_lease(name, "kube-node-lease", body)
        except ApiException as e:
            if e.status != 404:
                raise
            self.coord.create_namespaced_lease("kube-node-lease", body)

    def _loop(self) -> None:
        last_renew = 0.0
        while not self._stop.wait(self.interval):
            try:
                with self._lock:
                    nodes = dict(self.nodes)
                if not nodes:
                    continue
                if time.monotonic() - last_renew > 10:
                    for name in nodes:
                        self._renew_lease(name)
                    last_renew = time.monotonic()
                if self.run_pods:
                    self._tend_pods(nodes)
            except Exception as e:  # keep simulating; tests see .errors
                self.errors.append(repr(e))
                del self.errors[:-20]

    def _tend_pods(self, nodes: dict[str, tuple[int, str]]) -> None:
        for pod in self.core.list_pod_for_all_namespaces(field_selector="spec.nodeName!=").items:
            node = pod.spec.node_name
            if node not in nodes:
                continue
            ns, name = pod.metadata.namespace, pod.metadata.name
            if pod.metadata.deletion_timestamp:
                with contextlib.suppress(ApiException):
                    self.core.delete_namespaced_pod(name, ns, grace_period_seconds=0)
                continue
            if pod.status.phase != "Pending":
                continue
            now = _now()
            index, host_ip = nodes[node]
            pod_ip = host_ip if pod.spec.host_network else f"10.244.{index}.{sum(name.encode()) % 250 + 2}"
            conds = [{"type": t, "status": "True", "lastTransitionTime": now}
                     for t in ("PodScheduled", "Initialized", "ContainersReady", "Ready")]
            containers = [{"name": c.name, "image": c.image, "imageID": "", "ready": True,
                           "restartCount": 0, "started": True,
                           "state": {"running": {"startedAt": now}}}
                          for c in pod.spec.containers]
            status = {"phase": "Running", "conditions": conds, "hostIP": host_ip,
                      "hostIPs": [{"ip": host_ip}], "podIP": pod_ip, "podIPs": [{"ip": pod_ip}],
                      "startTime": now, "containerStatuses": containers}
            with contextlib.suppress(ApiException):
                self.core.patch_namespaced_pod_status(name, ns, {"status": status})
