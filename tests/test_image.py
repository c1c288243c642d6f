"""The container image: build it (tests/image/build-image.sh, buildah on a
debootstrapped base, no Docker engine), then run it with runc the way the
chart's DaemonSet runs the agent: host network, read-only root filesystem,
ALL capabilities dropped and only the chart's own list added back, /sys/fs/bpf
and /var/run/netns bound in. /lib/modules and /usr/src are NOT bound in, so
BCC must compile against the kernel headers bundled in the image.

The first build takes minutes (debootstrap, apt and pip inside the build);
later runs reuse the cached base, layers and exported root filesystem.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from agentproc import totals, wait_for
from netns_fixtures import netns_factory, veth_pair  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.timeout(1800)]

REPO = Path(__file__).resolve().parents[1]
BUILD_SCRIPT = REPO / "tests/image/build-image.sh"
CHART_VALUES = REPO / "deploy/helm/kipfix/values.yaml"
FALLBACK = "/usr/share/kipfix/kernel-headers"


@dataclass(frozen=True)
class BuiltImage:
    rootfs: Path
    config: dict  # OCI image config: Entrypoint, Cmd, Env
    build_seconds: float


@pytest.fixture(scope="module")
def image() -> BuiltImage:
    missing = [tool for tool in ("debootstrap", "buildah", "runc") if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"missing {', '.join(missing)}: apt-get install debootstrap buildah runc "
                    "(scripts/install.sh installs them)")
    start = time.monotonic()
    result = subprocess.run(["bash", str(BUILD_SCRIPT)], capture_output=True, text=True)
    seconds = time.monotonic() - start
    # the script's step timings, visible with -s and in the report of a failure
    print(result.stdout + result.stderr)
    assert result.returncode == 0, f"build-image.sh failed:\n{result.stdout}\n{result.stderr}"
    out = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line and " " not in line)
    return BuiltImage(Path(out["rootfs"]), json.loads(Path(out["config"]).read_text()), seconds)


def chart_capabilities() -> list[str]:
    """The capabilities the Helm chart gives the agent (values.yaml)."""
    return yaml.safe_load(CHART_VALUES.read_text())["agent"]["capabilities"]


class Container:
    """One runc container on the image's root filesystem, in the host network
    namespace, like the chart's agent pod (hostNetwork) minus Kubernetes."""

    def __init__(self, image: BuiltImage, workdir: Path, args: list[str], entrypoint: list[str] | None = None):
        self.id = f"kipfix-test-{uuid.uuid4().hex[:10]}"
        self.bundle = workdir / "bundle"
        self.state_root = workdir / "runc-state"   # private runc state: never the host's
        self.out = workdir / "out"                 # bound at /out: config in, JSON lines out
        self.kipfix_state = workdir / "run-kipfix"  # the chart's /run/kipfix hostPath
        for d in (self.bundle, self.state_root, self.out, self.kipfix_state):
            d.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / f"{self.id}.log"
        self.proc: subprocess.Popen | None = None
        subprocess.run(["runc", "spec", "--bundle", str(self.bundle)], check=True)
        spec = json.loads((self.bundle / "config.json").read_text())
        config = image.config
        caps = [f"CAP_{c}" for c in chart_capabilities()]
        spec["root"] = {"path": str(image.rootfs), "readonly": True}   # readOnlyRootFilesystem
        spec["hostname"] = "kipfix-test"
        spec["process"].update(
            terminal=False,
            args=list(config.get("Entrypoint") or [] if entrypoint is None else entrypoint) + args,
            env=list(config.get("Env") or []),
            cwd="/",
            noNewPrivileges=True,                       # allowPrivilegeEscalation: false
            capabilities={k: caps for k in ("bounding", "effective", "permitted")},
        )
        spec["process"].pop("rlimits", None)            # never above the current limits
        # hostNetwork: keep every namespace but the network one
        spec["linux"]["namespaces"] = [ns for ns in spec["linux"]["namespaces"] if ns["type"] != "network"]
        spec["mounts"] += [
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev"]},
            {"destination": "/run", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev"]},
            {"destination": "/sys/fs/bpf", "type": "bind", "source": "/sys/fs/bpf",
             "options": ["rbind", "rw", "rslave"]},
            {"destination": "/var/run/netns", "type": "bind", "source": "/var/run/netns",
             "options": ["rbind", "ro", "rslave"]},     # mountPropagation: HostToContainer
            {"destination": "/run/kipfix", "type": "bind", "source": str(self.kipfix_state),
             "options": ["rbind", "rw"]},
            {"destination": "/out", "type": "bind", "source": str(self.out), "options": ["rbind", "rw"]},
        ]
        (self.bundle / "config.json").write_text(json.dumps(spec, indent=2))

    def _runc(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(["runc", "--root", str(self.state_root), *args], capture_output=True,
                              text=True, **kw)

    def start(self) -> "Container":
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(["runc", "--root", str(self.state_root), "run", "--bundle",
                                      str(self.bundle), self.id], stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        return self

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def wait_log(self, text: str, timeout: float) -> None:
        def seen():
            if text in self.log():
                return True
            if self.proc.poll() is not None:
                raise AssertionError(f"container exited with {self.proc.returncode} before {text!r}:\n{self.log()}")
            return False
        wait_for(seen, timeout, f"{text!r} in the container's output")

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM to the container's process (as the kubelet does), then wait."""
        if self.proc.poll() is None:
            self._runc("kill", self.id, "TERM")
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._runc("kill", self.id, "KILL")
                self.proc.wait(10)
        return self.proc.returncode

    def cleanup(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self._runc("kill", self.id, "KILL")
                self.proc.wait(10)
            self._log.close()
        self._runc("delete", "--force", self.id)


@pytest.fixture
def containers(tmp_path):
    made: list[Container] = []

    def make(image: BuiltImage, args: list[str], entrypoint: list[str] | None = None) -> Container:
        container = Container(image, tmp_path / f"c{len(made)}", args, entrypoint)
        made.append(container)
        return container

    yield make
    for container in made:
        container.cleanup()


def test_image_builds_and_bundles_the_kernel_headers(image):
    print(f"image build (tests/image/build-image.sh) took {image.build_seconds:.1f} s")
    headers = image.rootfs / FALLBACK.lstrip("/")
    assert (headers / "include/generated/autoconf.h").is_file()
    assert (headers / "include/linux/kconfig.h").is_file()
    assert (headers / "arch/x86/include/asm").is_dir()
    # the originals were removed: the headers are in the image once
    assert not list((image.rootfs / "usr/src").glob("linux-headers-*"))
    assert f"KIPFIX_HEADERS_FALLBACK={FALLBACK}" in image.config["Env"]
    assert image.config["Entrypoint"] == ["kipfix"]
    # nothing of the build context but the package reached the image
    assert not (image.rootfs / "src").exists()


def test_dependency_check_in_the_container_uses_the_bundled_headers(image, containers):
    container = containers(image, ["dependency-check", "--json"]).start()
    rc = container.wait(120)
    output = container.log()
    assert rc == 0, output
    report = json.loads(output[output.index("{"):])
    checks = {c["name"]: c for c in report["checks"]}
    assert report["ok"], output
    headers = next(c for name, c in checks.items() if "header" in name)
    assert headers["valid"] and f"bundled fallback {FALLBACK}" in headers["detail"], headers
    assert checks["bpf syscall"]["valid"], checks["bpf syscall"]
    assert checks["ipfix encoder"]["valid"], checks["ipfix encoder"]  # built in the Dockerfile's wheel stage
    # and only there: no compiler reached the image
    assert not (image.rootfs / "usr/bin/gcc").exists() and not list((image.rootfs / "usr/include").glob("python3*"))


def test_operator_entrypoint_and_modules_in_the_container(image, containers):
    """The chart's operator command line, and everything its handlers import."""
    container = containers(image, ["operator", "--help"]).start()
    assert container.wait(60) == 0, container.log()
    assert "--peering" in container.log() and "--liveness" in container.log()
    container = containers(image, ["-c", "import kopf, kubernetes, kipfix.operator.handlers; print('imported')"],
                           entrypoint=["python"]).start()
    assert container.wait(60) == 0, container.log()
    assert "imported" in container.log()


def test_agent_in_the_container_meters_exactly_the_pings(image, containers, veth_pair):
    pin_path = f"/sys/fs/bpf/kipfix-imgtest-{uuid.uuid4().hex[:8]}"
    container = containers(image, ["--log-level", "debug", "agent", "--config", "/out/kipfix.yaml"])
    (container.out / "kipfix.yaml").write_text(yaml.safe_dump({
        "interfaces": [{"netns": veth_pair.ns_a, "names": [veth_pair.if_a]}],
        "drainInterval": 0.2,
        "jsonLines": "/out/flows.jsonl",
        "pinPath": pin_path,
    }))
    try:
        container.start()
        container.wait_log("kipfix agent running", timeout=120)
        container.wait_log(f"attached kipfix to {veth_pair.if_a}", timeout=30)
        ping = subprocess.run(["ip", "netns", "exec", veth_pair.ns_a, "ping", "-q", "-n", "-c", "7",
                               "-i", "0.05", "-W", "1", veth_pair.ip_b], capture_output=True, text=True)
        assert "7 packets transmitted, 7 received" in ping.stdout, ping.stdout + ping.stderr
        rc = container.stop()
        log = container.log()
        assert rc == 0, log
        assert f"kernel headers for BCC: bundled fallback {FALLBACK}" in log, log
        records = [json.loads(line) for line in (container.out / "flows.jsonl").read_text().splitlines()]
        # 7 echo requests out of if_a and 7 replies into it, 84 octets each (IPv4 + ICMP + 56)
        assert totals(records, interface=veth_pair.if_a, direction="egress", icmpType=8) == (7, 7 * 84)
        assert totals(records, interface=veth_pair.if_a, direction="ingress", icmpType=0) == (7, 7 * 84)
        # SIGTERM detached everything the agent attached
        for hook in ("ingress", "egress"):
            filters = subprocess.run(["tc", "-n", veth_pair.ns_a, "filter", "show", "dev", veth_pair.if_a, hook],
                                     capture_output=True, text=True).stdout
            assert "kipfix" not in filters, filters
    finally:
        shutil.rmtree(pin_path, ignore_errors=True)
        assert not os.path.exists(pin_path)
