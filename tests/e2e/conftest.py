"""The `cluster` fixture: a real Kubernetes API for the e2e tests.

By default the session starts its own control plane on loopback (see
controlplane.py; binaries from tests/e2e/build-tools.sh). Point the tests at
an existing cluster instead with

    KIPFIX_E2E_KUBECONFIG=/path/to/kubeconfig pytest tests/e2e
    # or: KIPFIX_E2E_EXISTING=1 KUBECONFIG=... pytest tests/e2e

and the same tests run unchanged (kubectl and helm then come from the
cache, or from PATH).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
from kubernetes import client

from controlplane import (BINARIES, ControlPlane, ControlPlaneError, SimulatedNodes, api_client,
                          default_bin_dir, serviceaccount_kubeconfig)

BUILD_HINT = "run `bash tests/e2e/build-tools.sh` first (builds them into ~/.cache/kipfix-e2e/bin)"


def pytest_configure(config):
    config.addinivalue_line("markers", "e2e: runs against a real Kubernetes API (tests/e2e)")


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.e2e)


@dataclass
class Cluster:
    """What an e2e test gets from the `cluster` fixture.

    kubeconfig   path of an admin kubeconfig
    api()        a new kubernetes.client.ApiClient for it (call per use)
    bin          {"kubectl": Path, "helm": Path, ...}
    own          True when the session started the control plane itself
    nodes        SimulatedNodes: nodes.add(name, labels), nodes.label(...),
                 nodes.remove(name); all removed at session end
    workdir      a session temporary directory for kubeconfigs and files
    env          environment kubectl()/helm() add (their caches in workdir)
    """

    kubeconfig: Path
    api: Callable[[], client.ApiClient]
    bin: dict[str, Path]
    own: bool
    nodes: SimulatedNodes
    workdir: Path
    controlplane: ControlPlane | None = None
    env: dict[str, str] = field(default_factory=dict)

    def kubectl(self, *args: str, kubeconfig: Path | None = None, check: bool = True,
                input: str | None = None) -> subprocess.CompletedProcess:
        """Run kubectl against the cluster; output captured as text."""
        return self._run("kubectl", args, kubeconfig, check, input)

    def helm(self, *args: str, kubeconfig: Path | None = None, check: bool = True,
             input: str | None = None) -> subprocess.CompletedProcess:
        """Run helm against the cluster; output captured as text."""
        return self._run("helm", args, kubeconfig, check, input)

    def _run(self, tool, args, kubeconfig, check, input):
        env = {**os.environ, **self.env, "KUBECONFIG": str(kubeconfig or self.kubeconfig)}
        p = subprocess.run([str(self.bin[tool]), *args], env=env, text=True, capture_output=True,
                           input=input, timeout=300)
        if check and p.returncode:
            raise AssertionError(f"{tool} {' '.join(args)} failed ({p.returncode}):\n{p.stdout}{p.stderr}")
        return p

    def serviceaccount_kubeconfig(self, namespace: str, name: str, path: Path | None = None) -> Path:
        """A kubeconfig authenticating as ServiceAccount namespace/name, as in its pod."""
        path = path or self.workdir / f"sa-{namespace}-{name}.kubeconfig"
        with self.api() as api:
            return serviceaccount_kubeconfig(api, namespace, name, path)


def _find_binaries(own: bool) -> dict[str, Path]:
    bin_dir = Path(os.environ.get("KIPFIX_E2E_BIN") or default_bin_dir())
    found, missing = {}, []
    wanted = BINARIES if own else ("kubectl", "helm")
    for name in wanted:
        p = bin_dir / name
        if not os.access(p, os.X_OK) and not own and shutil.which(name):
            p = Path(shutil.which(name))
        if os.access(p, os.X_OK):
            found[name] = p
        else:
            missing.append(name)
    if missing:
        pytest.fail(f"e2e binaries missing in {bin_dir}: {', '.join(missing)}; {BUILD_HINT}",
                    pytrace=False)
    return found


def _existing_kubeconfig() -> Path | None:
    path = os.environ.get("KIPFIX_E2E_KUBECONFIG")
    if not path and os.environ.get("KIPFIX_E2E_EXISTING") == "1":
        path = os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")
    return Path(path) if path else None


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("e2e")
    existing = _existing_kubeconfig()
    cp = None
    if existing:
        if not existing.is_file():
            pytest.fail(f"kubeconfig {existing} does not exist", pytrace=False)
        binaries = _find_binaries(own=False)
        kubeconfig = existing
    else:
        binaries = _find_binaries(own=True)
        cp = ControlPlane(bin_dir=binaries["kube-apiserver"].parent)
        try:
            cp.__enter__()
        except ControlPlaneError as e:
            pytest.fail(f"could not start the e2e control plane: {e}", pytrace=False)
        kubeconfig = cp.kubeconfig
    nodes = SimulatedNodes(api_client(kubeconfig))
    try:
        # kubectl's discovery cache and helm's state stay in the session dir.
        env = {"KUBECACHEDIR": str(workdir / "kube-cache"),
               "HELM_CACHE_HOME": str(workdir / "helm" / "cache"),
               "HELM_CONFIG_HOME": str(workdir / "helm" / "config"),
               "HELM_DATA_HOME": str(workdir / "helm" / "data")}
        yield Cluster(kubeconfig=Path(kubeconfig), api=lambda: api_client(kubeconfig),
                      bin=binaries, own=cp is not None, nodes=nodes, workdir=workdir,
                      controlplane=cp, env=env)
    finally:
        try:
            nodes.close()
        finally:
            if cp:
                cp.__exit__(None, None, None)
