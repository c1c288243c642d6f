"""A real Kubernetes node for the e2e tests: containerd + runc + CNI + kubelet.

`RealNode` (a context manager) joins one real node to the test control
plane (controlplane.py). Everything it starts lives in a network namespace
it creates (``kxrn-<id>``), so the CNI bridge, the pods' veths and the
kubelet's ports never reach the host's network:

    root netns                          node netns kxrn-<id>
    kube-apiserver 127.0.0.1:P  <----   forwarder 10.96.0.1:443 (on lo; the
                                          thread's socket is made in the netns)
    10.253.x.y+1/30 kxrn<id>h ---- eth0 10.253.x.y+2/30  kubelet :10250
    (collectors listen here)             containerd, CNI bridge kxcni0 10.254.z.1/24
                                                |-- pod veths (10.254.z.0/24)

- Pods (and hostNetwork pods, and the kubelet itself) reach the API server
  at 10.96.0.1:443, the `kubernetes` Service's ClusterIP, which every pod
  gets as KUBERNETES_SERVICE_HOST/PORT. There is no kube-proxy: the node
  netns holds 10.96.0.1 as a local address, and a TCP forwarder listening
  there relays to the API server on 127.0.0.1. The serving certificate
  already names 10.96.0.1, so TLS verifies as in any cluster.
- The API server reaches the kubelet (exec, logs) at the node's InternalIP
  (the node end of the veth; a /30 of 10.253.0.0/16 chosen by the run id, so
  two test sessions on one machine do not collide).
- containerd runs with its own root, state, socket and config in the
  node's temporary directory; pod netns files are mounted under its state
  dir (netns_mounts_under_state_dir), the sandbox image is a locally built
  pause image, and images come from archives (`ctr images import`).
- The kubelet uses the cgroupfs driver under its own cgroup root
  (/kipfix-e2e-<id> in every v1 hierarchy), so every pod cgroup is in one
  tree that is removed at the end.

On exit (also after a failed start) everything is undone: pods' tasks
killed and deleted, kubelet and containerd stopped, leftover shims and
container processes killed by pid, every mount under the temporary
directory unmounted, the netns and veth deleted, the cgroup tree removed,
the kernel sysctls the kubelet sets (vm.overcommit_memory, kernel.panic,
...) restored, the Node object deleted.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from kubernetes import client
from kubernetes.client.rest import ApiException

from controlplane import ControlPlane, ControlPlaneError, _die_with_parent, _openssl, write_kubeconfig
from forwarder import TcpForwarder

REPO = Path(__file__).resolve().parents[2]
BUILD_IMAGES = Path(__file__).resolve().parent / "build-node-images.sh"
API_SERVICE_IP = "10.96.0.1"     # the `kubernetes` Service ClusterIP (first of SERVICE_CIDR)
UPLINK_NET = "10.253.0.0/16"     # one /30 of it per node (run id): root netns end .1, node end .2
POD_NET = "10.254.0.0/16"        # one /24 of it per node (run id) for its pods
CNI_BIN_DIR = "/usr/lib/cni"     # Debian containernetworking-plugins
CNI_PLUGINS = ("bridge", "host-local", "loopback")

# What the kubelet writes on start when protectKernelDefaults is false
# (setupKernelTunables); RealNode puts the host's values back on exit.
KUBELET_SYSCTLS = ("vm/overcommit_memory", "vm/panic_on_oom", "kernel/panic", "kernel/panic_on_oops",
                   "kernel/keys/root_maxkeys", "kernel/keys/root_maxbytes")


def missing_prerequisites(bin_dir: Path) -> list[str]:
    """What this machine lacks for a real node (empty: all there)."""
    missing = []
    if not os.access(bin_dir / "kubelet", os.X_OK):
        missing.append(f"kubelet in {bin_dir} (bash tests/e2e/build-tools.sh)")
    for tool, deb in (("containerd", "containerd"), ("ctr", "containerd"),
                      ("containerd-shim-runc-v2", "containerd"), ("runc", "runc"),
                      ("buildah", "buildah"), ("debootstrap", "debootstrap"), ("gcc", "gcc"),
                      ("nsenter", "util-linux")):
        if not shutil.which(tool):
            missing.append(f"{tool} (Debian package {deb})")
    for plugin in CNI_PLUGINS:
        if not os.access(f"{CNI_BIN_DIR}/{plugin}", os.X_OK):
            missing.append(f"{CNI_BIN_DIR}/{plugin} (Debian package containernetworking-plugins)")
    return missing


def build_images() -> dict[str, tuple[str, Path]]:
    """Build (cached) the kipfix, pause and traffic images: name -> (image, archive)."""
    p = subprocess.run(["bash", str(BUILD_IMAGES)], capture_output=True, text=True, timeout=3600)
    if p.returncode:
        raise ControlPlaneError(f"build-node-images.sh failed ({p.returncode}):\n{p.stdout[-3000:]}{p.stderr[-3000:]}")
    images = {}
    for line in p.stdout.splitlines():
        key, sep, rest = line.partition("=")
        if sep and key in ("kipfix", "pause", "traffic"):
            image, archive = rest.split(" ", 1)
            images[key] = (image, Path(archive))
    return images


def run(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    p = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout)
    if check and p.returncode:
        raise ControlPlaneError(f"{' '.join(map(str, args))} failed ({p.returncode}): {p.stdout}{p.stderr}")
    return p


def _v1_cgroup_mounts() -> dict[str, Path]:
    """Mounted cgroup hierarchies: name -> mount point (v1 controllers and the v2 'unified')."""
    mounts = {}
    for line in Path("/proc/self/mounts").read_text().splitlines():
        _, target, fstype, *_ = line.split()
        if fstype in ("cgroup", "cgroup2"):
            mounts[Path(target).name] = Path(target)
    return mounts


@dataclass
class RealNode:
    """One kubelet + containerd node joined to `controlplane` (see the module doc)."""

    controlplane: ControlPlane
    name: str = ""
    images: dict[str, tuple[str, Path]] = field(default_factory=dict)  # name -> (image, archive)
    labels: dict[str, str] = field(default_factory=dict)
    ready_timeout: float = 180.0
    run_id: str = ""  # random unless given (reclaim_stale)

    def __post_init__(self) -> None:
        self.run_id = self.run_id or uuid.uuid4().hex[:6]
        self.name = self.name or f"kxrn-{self.run_id}"
        self.netns = f"kxrn-{self.run_id}"
        self.netns_path = f"/run/netns/{self.netns}"
        self.host_if = f"kxrn{self.run_id}h"
        self.cgroup_root = f"/kipfix-e2e-{self.run_id}"
        self.cni_network = f"kipfix-e2e-{self.run_id}"
        uplink = list(ipaddress.ip_network(UPLINK_NET).subnets(new_prefix=30))[int(self.run_id, 16) % 16384]
        self.host_side_ip, self.node_ip = str(uplink[1]), str(uplink[2])  # root netns end, InternalIP
        self.pod_subnet = str(list(ipaddress.ip_network(POD_NET).subnets(new_prefix=24))[int(self.run_id, 16) % 256])
        self.dir: Path | None = None
        self.procs: dict[str, subprocess.Popen] = {}
        self.forwarder: TcpForwarder | None = None
        self.sysctls: dict[str, str] = {}
        self.timings: dict[str, float] = {}
        self._undo: list = []  # cleanups, run in reverse
        self._new_run_dirs: list[Path] = []
        self._shim_sockets: set[Path] = set()

    # -- paths -------------------------------------------------------------

    @property
    def containerd_socket(self) -> Path:
        return self.dir / "containerd.sock"

    @property
    def netns_dir(self) -> Path:
        """Where containerd mounts pod netns files (the agent's hostPaths.netns)."""
        return self.dir / "containerd" / "state" / "io.containerd.grpc.v1.cri" / "netns"

    @property
    def bpffs(self) -> Path:
        """A bpffs of the node's own (the agent's hostPaths.bpffs)."""
        return self.dir / "bpffs"

    @property
    def agent_state(self) -> Path:
        return self.dir / "kipfix-state"

    def log_tail(self, name: str, lines: int = 40) -> str:
        path = self.dir / f"{name}.log" if self.dir else None
        if path and path.exists():
            return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    # -- context manager -----------------------------------------------------

    def __enter__(self) -> "RealNode":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        t0 = time.monotonic()
        # The node's directory is a shared mount of its own: the agent's hostPath
        # volumes with HostToContainer propagation need a shared (or slave) source,
        # and the host's / is private here.
        self._new_run_dirs = [Path(p) for p in ("/run/containerd/s", "/run/containerd/fifo",
                                                 "/run/containerd/runc/k8s.io", "/run/containerd/runc",
                                                 "/run/containerd", "/var/lib/cni/results", "/var/lib/cni")
                               if not os.path.exists(p)]
        self.dir = Path(tempfile.mkdtemp(prefix=f"kipfix-rn-{self.run_id}-"))
        self._undo.append(self._remove_dir)
        run("mount", "--bind", self.dir, self.dir)
        run("mount", "--make-rshared", self.dir)
        for sub in ("containerd", "cni/net.d", "cni/ipam", "kubelet", "pki", "pod-logs", "bpffs",
                    "kipfix-state"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        run("mount", "-t", "bpf", "bpffs", self.bpffs)
        self._save_sysctls()
        self._undo.append(self._delete_node_object)
        self._network()
        self._cgroups()
        self._containerd()
        self.timings["containerd"] = time.monotonic() - t0
        self._import_images()
        self.timings["images imported"] = time.monotonic() - t0
        self._kubelet()
        self._wait_ready()
        self.timings["node ready"] = time.monotonic() - t0

    # -- network ----------------------------------------------------------------

    def _network(self) -> None:
        run("ip", "netns", "add", self.netns)
        self._undo.append(lambda: run("ip", "netns", "del", self.netns, check=False))
        self._undo.append(lambda: run("ip", "link", "del", self.host_if, check=False))
        run("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", "eth0", "netns", self.netns)
        run("ip", "addr", "add", f"{self.host_side_ip}/30", "dev", self.host_if)
        run("ip", "link", "set", self.host_if, "up")
        run("ip", "-n", self.netns, "addr", "add", f"{self.node_ip}/30", "dev", "eth0")
        run("ip", "-n", self.netns, "link", "set", "eth0", "up")
        run("ip", "-n", self.netns, "link", "set", "lo", "up")
        run("ip", "-n", self.netns, "addr", "add", f"{API_SERVICE_IP}/32", "dev", "lo")
        # the kubelet and cadvisor expect a default route; nothing is sent along it
        run("ip", "-n", self.netns, "route", "add", "default", "via", self.host_side_ip)
        api_port = int(self.controlplane.server.rsplit(":", 1)[1])
        self.forwarder = TcpForwarder(API_SERVICE_IP, ("127.0.0.1", api_port), port=443, netns_path=self.netns_path)
        self._undo.append(self.forwarder.close)

    def nsenter(self, *args: str) -> list[str]:
        # nsenter --net only: `ip netns exec` would also remount /sys, hiding the cgroup mounts
        return ["nsenter", f"--net={self.netns_path}", "--", *args]

    # -- cgroups ------------------------------------------------------------------

    def _cgroups(self) -> None:
        self._undo.append(self._remove_cgroups)
        for name, mount in _v1_cgroup_mounts().items():
            path = mount / self.cgroup_root.lstrip("/")
            path.mkdir(exist_ok=True)
            if name == "cpuset":  # a new cpuset has no cpus/mems until given its parent's
                for f in ("cpuset.cpus", "cpuset.mems"):
                    (path / f).write_text((mount / f).read_text())

    def _cgroup_dirs(self) -> list[Path]:
        dirs = []
        for mount in _v1_cgroup_mounts().values():
            root = mount / self.cgroup_root.lstrip("/")
            if root.is_dir():
                dirs += sorted((Path(d) for d, _, _ in os.walk(root)), key=lambda p: -len(p.parts))
        return dirs

    def _cgroup_pids(self) -> set[int]:
        pids = set()
        for d in self._cgroup_dirs():
            with contextlib.suppress(OSError):
                pids |= {int(x) for x in (d / "cgroup.procs").read_text().split()}
        return pids

    def _remove_cgroups(self) -> None:
        for pid in self._cgroup_pids():  # container processes our node started
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while self._cgroup_pids() and time.monotonic() < deadline:
            time.sleep(0.1)
        for _ in range(20):
            left = []
            for d in self._cgroup_dirs():
                try:
                    d.rmdir()
                except OSError:
                    left.append(d)
            if not left:
                return
            time.sleep(0.2)

    # -- containerd -------------------------------------------------------------------

    def _containerd(self) -> None:
        d = self.dir
        cni = {
            "cniVersion": "1.0.0", "name": self.cni_network,
            "plugins": [{
                "type": "bridge", "bridge": "kxcni0", "isGateway": True, "ipMasq": False,
                "hairpinMode": True,
                "ipam": {"type": "host-local", "dataDir": str(d / "cni" / "ipam"),
                         "ranges": [[{"subnet": self.pod_subnet}]], "routes": [{"dst": "0.0.0.0/0"}]},
            }],
        }
        (d / "cni" / "net.d" / "10-kipfix-e2e.conflist").write_text(json.dumps(cni, indent=2))
        # KIPFIX_E2E_RUNC: another runc (or a wrapper that logs), for debugging
        runc = os.environ.get("KIPFIX_E2E_RUNC")
        runc_binary = f'\n        BinaryName = "{runc}"' if runc else ""
        sandbox = self.images.get("pause", ("localhost/kipfix-e2e-pause:1", None))[0]
        config = f"""\
version = 2
root = "{d}/containerd/root"
state = "{d}/containerd/state"
# /opt/containerd (the opt plugin) and snapshotters we do not use
disabled_plugins = ["io.containerd.internal.v1.opt", "io.containerd.snapshotter.v1.btrfs",
                    "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.aufs",
                    "io.containerd.snapshotter.v1.devmapper", "io.containerd.tracing.processor.v1.otlp"]

[grpc]
  address = "{self.containerd_socket}"

[ttrpc]
  address = "{d}/containerd-ttrpc.sock"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{sandbox}"
  netns_mounts_under_state_dir = true
  enable_selinux = false
  # no CAP_SYS_RESOURCE here: runc cannot lower oom_score_adj (sandboxes ask for
  # -998), so clamp every request to containerd's own value
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{d}/runc"{runc_binary}
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN_DIR}"
    conf_dir = "{d}/cni/net.d"
    max_conf_num = 1
"""
        (d / "containerd.toml").write_text(config)
        self._undo.append(self._stop_containers)
        self._spawn("containerd", self.nsenter("containerd", "--config", str(d / "containerd.toml")))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            self._check_alive()
            if self.ctr("version", check=False).returncode == 0:
                return
            time.sleep(0.2)
        raise ControlPlaneError("containerd did not answer in 60 s:\n" + self.log_tail("containerd"))

    def ctr(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        return run("ctr", "-n", "k8s.io", "-a", self.containerd_socket, *args, check=check, timeout=timeout)

    def _import_images(self) -> None:
        for key, (image, archive) in self.images.items():
            self.ctr("images", "import", archive)
            if image not in self.ctr("images", "ls", "-q").stdout.split():
                raise ControlPlaneError(f"image {image} not in containerd after importing {archive}")

    # -- kubelet -------------------------------------------------------------------------

    def _kubelet(self) -> None:
        d, cp = self.dir, self.controlplane
        pki = d / "pki"
        ext = pki / "client.ext"
        ext.write_text("extendedKeyUsage=clientAuth\n")
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(pki / "node.key"),
                 "-out", str(pki / "node.csr"), "-subj", f"/O=system:nodes/CN=system:node:{self.name}", cwd=pki)
        _openssl("x509", "-req", "-in", str(pki / "node.csr"), "-CA", str(cp.workdir / "ca.crt"),
                 "-CAkey", str(cp.workdir / "ca.key"), "-CAcreateserial", "-days", "2",
                 "-out", str(pki / "node.crt"), "-extfile", str(ext), cwd=pki)
        kubeconfig = write_kubeconfig(d / "kubelet.kubeconfig", f"https://{API_SERVICE_IP}:443",
                                      cp.workdir / "ca.crt", user=f"system:node:{self.name}",
                                      cert=pki / "node.crt", key=pki / "node.key")
        kubelet_config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
            "address": self.node_ip, "port": 10250, "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1", "healthzPort": 10248,
            # the API server's client certificate (CA-signed) is the only caller
            "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": False},
                               "x509": {"clientCAFile": str(cp.workdir / "ca.crt")}},
            "authorization": {"mode": "AlwaysAllow"},
            "containerRuntimeEndpoint": f"unix://{self.containerd_socket}",
            # cgroup v1 (hybrid) with the cgroupfs driver, everything under our own root
            "cgroupDriver": "cgroupfs", "cgroupRoot": self.cgroup_root,
            "cgroupsPerQOS": True, "enforceNodeAllocatable": ["pods"],
            # no swap here; kept explicit so a node with swap does not refuse to start
            "failSwapOn": False,
            "podLogsDir": str(d / "pod-logs"),
            "resolvConf": "/etc/resolv.conf",
            "clusterDomain": "cluster.local",
            "registerNode": True, "rotateCertificates": False, "serverTLSBootstrap": False,
            # never evict or garbage-collect our imported images on a busy disk
            "evictionHard": {"memory.available": "50Mi", "nodefs.available": "1%",
                             "imagefs.available": "1%", "nodefs.inodesFree": "1%"},
            "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
            "serializeImagePulls": False,
            "nodeStatusReportFrequency": "10s", "syncFrequency": "10s",
            "staticPodPath": "",
        }
        (d / "kubelet.yaml").write_text(yaml.safe_dump(kubelet_config))
        labels = ["--node-labels", ",".join(f"{k}={v}" for k, v in self.labels.items())] if self.labels else []
        self._spawn("kubelet", self.nsenter(
            str(cp.binary("kubelet")),
            "--config", str(d / "kubelet.yaml"), "--kubeconfig", str(kubeconfig),
            "--root-dir", str(d / "kubelet"), "--cert-dir", str(pki),
            "--hostname-override", self.name, "--node-ip", self.node_ip, *labels, "--v", "2"))

    def _save_sysctls(self) -> None:
        for key in KUBELET_SYSCTLS:
            with contextlib.suppress(OSError):
                self.sysctls[key] = Path("/proc/sys", key).read_text().strip()
        self._undo.append(self._restore_sysctls)

    def _restore_sysctls(self) -> None:
        for key, value in self.sysctls.items():
            with contextlib.suppress(OSError):
                if Path("/proc/sys", key).read_text().strip() != value:
                    Path("/proc/sys", key).write_text(value)

    def api(self) -> client.ApiClient:
        return self.controlplane.api_client()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        last = "not registered"
        with self.api() as api:
            core = client.CoreV1Api(api)
            while time.monotonic() < deadline:
                self._check_alive()
                try:
                    node = core.read_node(self.name)
                    ready = [c for c in node.status.conditions or [] if c.type == "Ready"]
                    taints = [t.key for t in node.spec.taints or []]
                    if ready and ready[0].status == "True" and "node.kubernetes.io/not-ready" not in taints:
                        return
                    last = f"Ready={ready[0].status if ready else None} ({ready[0].message if ready else ''}), taints {taints}"
                except ApiException as e:
                    if e.status != 404:
                        raise
                time.sleep(0.5)
        raise ControlPlaneError(f"node {self.name} not Ready after {self.ready_timeout:.0f} s: {last}\n"
                                f"kubelet log:\n{self.log_tail('kubelet')}")

    def _delete_node_object(self) -> None:
        with contextlib.suppress(Exception), self.api() as api:
            client.CoreV1Api(api).delete_node(self.name)
        with contextlib.suppress(Exception), self.api() as api:
            client.CoordinationV1Api(api).delete_namespaced_lease(self.name, "kube-node-lease")

    # -- processes ---------------------------------------------------------------------

    def _spawn(self, name: str, args: list[str]) -> None:
        with open(self.dir / f"{name}.log", "wb") as f:
            self.procs[name] = subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)

    def _check_alive(self) -> None:
        for name, p in self.procs.items():
            if p.poll() is not None:
                raise ControlPlaneError(f"{name} exited with status {p.returncode}; last log lines:\n"
                                        + self.log_tail(name))

    def _stop_proc(self, name: str, timeout: float = 15) -> None:
        p = self.procs.pop(name, None)
        if p and p.poll() is None:
            p.terminate()
            try:
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def _shim_pids(self) -> list[int]:
        """containerd-shim processes of this node's containerd (found by its socket path)."""
        pids = []
        needle = str(self.containerd_socket).encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                cmd = (entry / "cmdline").read_bytes()
                if b"containerd-shim" in cmd and needle in cmd:
                    pids.append(int(entry.name))
        return pids

    def _shim_socket_paths(self) -> set[Path]:
        """The shims' sockets (containerd 1.6 puts them in /run/containerd/s whatever its state dir):
        sha256 of <containerd socket>/<namespace>/<task id>, for the tasks in the state dir."""
        tasks = self.dir / "containerd" / "state" / "io.containerd.runtime.v2.task"
        paths = set()
        for task in tasks.glob("*/*"):
            digest = hashlib.sha256(f"{self.containerd_socket}/{task.parent.name}/{task.name}".encode()).hexdigest()
            paths.add(Path("/run/containerd/s") / digest)
        return paths

    def _stop_containers(self) -> None:
        """Kubelet first (so it restarts nothing), then every task, then containerd and its shims."""
        self._shim_sockets |= self._shim_socket_paths()
        self._stop_proc("kubelet")
        if "containerd" in self.procs and self.procs["containerd"].poll() is None:
            tasks = self.ctr("tasks", "ls", "-q", check=False).stdout.split()
            for task in tasks:
                self.ctr("tasks", "kill", "-a", "-s", "SIGKILL", task, check=False, timeout=30)
            for task in tasks:
                for _ in range(20):
                    if self.ctr("tasks", "delete", task, check=False, timeout=30).returncode == 0:
                        break
                    time.sleep(0.2)
            for container in self.ctr("containers", "ls", "-q", check=False).stdout.split():
                self.ctr("containers", "delete", container, check=False, timeout=30)
        self._stop_proc("containerd")
        deadline = time.monotonic() + 10
        while self._shim_pids() and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in self._shim_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid in self._cgroup_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for path in self._shim_sockets:  # a shim killed (not exited) leaves its socket
            path.unlink(missing_ok=True)

    # -- teardown -------------------------------------------------------------------------

    def _mounts_under_dir(self) -> list[str]:
        mounts = []
        prefix = str(self.dir)
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            target = line.split()[4].replace("\\040", " ")
            if target == prefix or target.startswith(prefix + "/"):
                mounts.append(target)
        return mounts

    def _cni_results(self) -> list[Path]:
        """libcni's result cache (/var/lib/cni/results) for this node's sandboxes, bridge and loopback."""
        folder = Path("/var/lib/cni/results")
        ours = list(folder.glob(f"{self.cni_network}-*"))
        sandboxes = {p.name[len(self.cni_network) + 1:].rsplit("-", 1)[0] for p in ours}
        return ours + [folder / f"cni-loopback-{s}-lo" for s in sandboxes
                       if (folder / f"cni-loopback-{s}-lo").exists()]

    def _remove_cni_results(self) -> None:
        for path in self._cni_results():
            path.unlink(missing_ok=True)
        # containerd's shims and ctr make these even with our own root/state; remove
        # them only if they were not there before and are empty now
        for folder in self._new_run_dirs:
            with contextlib.suppress(OSError):
                folder.rmdir()

    def _remove_dir(self) -> None:
        if not self.dir:
            return
        for _ in range(5):  # deepest first; a mount point may be stacked more than once
            mounts = self._mounts_under_dir()
            if not mounts:
                break
            for target in sorted(mounts, key=lambda t: -len(t)):
                run("umount", target, check=False)
        for target in self._mounts_under_dir():
            run("umount", "-l", target, check=False)
        self._remove_cni_results()
        if not os.environ.get("KIPFIX_E2E_KEEP"):
            shutil.rmtree(self.dir, ignore_errors=True)

    def stop(self) -> None:
        errors = []
        while self._undo:
            step = self._undo.pop()
            try:
                step()
            except Exception as e:  # noqa: BLE001 -- keep cleaning up
                errors.append(f"{getattr(step, '__name__', step)}: {e}")
        for name in list(self.procs):
            self._stop_proc(name)
        if errors:
            raise ControlPlaneError("real node clean-up: " + "; ".join(errors))

    # -- what tests use ----------------------------------------------------------------------

    def leftovers(self) -> list[str]:
        """Anything of this node still on the host (empty after stop())."""
        left = []
        if Path(self.netns_path).exists():
            left.append(f"netns {self.netns}")
        if run("ip", "link", "show", self.host_if, check=False).returncode == 0:
            left.append(f"link {self.host_if}")
        if self.dir and self._mounts_under_dir():
            left.append(f"mounts {self._mounts_under_dir()}")
        if self._shim_pids():
            left.append(f"shims {self._shim_pids()}")
        if any(p.exists() for p in self._shim_sockets):
            left.append(f"shim sockets {[str(p) for p in self._shim_sockets if p.exists()]}")
        if self._cgroup_dirs():
            left.append(f"cgroups {self._cgroup_dirs()[:3]}")
        if self.dir and self.dir.exists() and not os.environ.get("KIPFIX_E2E_KEEP"):
            left.append(f"dir {self.dir}")
        if self._cni_results():
            left.append(f"cni results {self._cni_results()}")
        return left


def _node_running(directory: Path) -> bool:
    """Is a containerd or kubelet of the node in ``directory`` still running?"""
    needles = (f"{directory}/containerd.toml".encode(), f"{directory}/kubelet.yaml".encode())
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                cmd = (entry / "cmdline").read_bytes()
                if any(n in cmd for n in needles):
                    return True
    return False


def reclaim_stale(tmp: Path | None = None) -> list[str]:
    """Undo real nodes whose test process was killed outright (SIGKILL, power loss).

    The kubelet and containerd die with the test process (PR_SET_PDEATHSIG),
    but shims, container processes, mounts, the netns, the veth and the
    cgroup tree stay. A node directory (``kipfix-rn-<id>-*`` in the temp
    dir) with neither its containerd nor its kubelet running is reclaimed:
    the same steps as RealNode.stop(), minus the Node object (its control
    plane is gone) and the sysctls (their old values are unknown).
    Returns what was reclaimed.
    """
    reclaimed = []
    for directory in sorted((tmp or Path(tempfile.gettempdir())).glob("kipfix-rn-*-*")):
        run_id = directory.name.split("-")[2]
        if not directory.is_dir() or len(run_id) != 6 or _node_running(directory):
            continue
        node = RealNode(controlplane=None, run_id=run_id)  # type: ignore[arg-type]
        node.dir = directory
        for step in (node._stop_containers, node._remove_cgroups,
                     lambda: run("ip", "link", "del", node.host_if, check=False),
                     lambda: run("ip", "netns", "del", node.netns, check=False), node._remove_dir):
            with contextlib.suppress(Exception):
                step()
        reclaimed.append(f"{directory}: left {node.leftovers() or 'nothing'}")
    return reclaimed


if __name__ == "__main__":
    import sys
    if sys.argv[1:] != ["--reclaim"]:
        sys.exit("usage: python tests/e2e/realnode.py --reclaim   (undo real nodes of killed test runs)")
    for line in reclaim_stale():
        print(line)
