"""`kipfix dependency-check` and the agent's start-up gate.

Real checks on this machine; missing headers are simulated by pointing the
host lookup (``--modules-dir``) or the env variables at temp dirs. Lost
privileges are real: the checks run in a child with capabilities dropped.
"""

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys

import pytest

from kipfix.agent import depcheck
from kipfix.agent.datapath import headers, requirements

RELEASE = platform.release()
NAMES = [
    "kernel", "bpf syscall", "btf", "clsact", "bpffs",
    "kernel headers", "bcc", "pyroute2", "iproute2", "python", "ipfix encoder",
]
LINE = re.compile(r"^(?P<name>[a-z0-9 ]+?)\s{2,}(?P<status>VALID|INVALID)\s+(?P<detail>.+)$")

pytestmark = pytest.mark.root


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    monkeypatch.delenv(headers.BCC_ENV, raising=False)
    monkeypatch.delenv(headers.FALLBACK_ENV, raising=False)


def parse(out: str) -> dict[str, tuple[str, str]]:
    rows = {}
    for line in out.splitlines():
        m = LINE.match(line)
        assert m, f"malformed line: {line!r}"
        rows[m["name"]] = (m["status"], m["detail"])
    assert list(rows) == NAMES
    return rows


def test_every_check_is_valid_here():
    results = depcheck.run_checks()
    assert [r.name for r in results] == NAMES
    assert [r.name for r in results if not r.valid] == []
    assert depcheck.all_required_valid(results)
    by = {r.name: r for r in results}
    assert by["kernel"].detail == f"{RELEASE} (>= 5.10 required)"
    assert by["clsact"].detail == "added and removed a clsact qdisc in a throwaway netns"
    assert by["bpf syscall"].detail == "created and removed a BPF array map"
    assert by["kernel headers"].detail == headers.find_kernel_headers().description
    assert not by["btf"].required and not by["iproute2"].required and not by["ipfix encoder"].required
    assert by["ipfix encoder"].detail == "C (kipfix.agent.export.ipfix._flowpack)"


def test_versions_match_independent_sources():
    import bcc
    import pyroute2

    by = {r.name: r for r in depcheck.run_checks()}
    assert by["bcc"].detail.startswith(bcc.__version__)
    assert by["pyroute2"].detail == pyroute2.__version__
    ip_v = subprocess.run(["ip", "-V"], capture_output=True, text=True, check=True).stdout.strip()
    assert by["iproute2"].detail == ip_v
    assert by["python"].detail.startswith(platform.python_version())


def test_cli_main_prints_one_line_per_check(capsys):
    assert depcheck.main([]) == 0
    rows = parse(capsys.readouterr().out)
    assert {status for status, _ in rows.values()} == {"VALID"}
    assert rows["kernel headers"][1].startswith(f"host /lib/modules/{RELEASE}/build")


def test_missing_headers_make_exit_code_1(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(headers.FALLBACK_ENV, str(tmp_path / "fallback"))
    assert depcheck.main(["--modules-dir", str(tmp_path)]) == 1
    rows = parse(capsys.readouterr().out)
    status, detail = rows["kernel headers"]
    assert status == "INVALID"
    assert detail.startswith(f"no kernel headers for BCC (kernel {RELEASE}): host headers: missing "
                             f"{tmp_path}/{RELEASE}/build (no such directory)")
    assert f"KIPFIX_HEADERS_FALLBACK={tmp_path}/fallback: missing" in detail
    assert f"apt-get install linux-headers-{RELEASE}" in detail
    # nothing else is affected
    assert [n for n, (s, _) in rows.items() if s == "INVALID"] == ["kernel headers"]


def test_empty_bcc_kernel_source_is_named(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(headers.BCC_ENV, str(tmp_path))
    assert depcheck.main([]) == 1
    status, detail = parse(capsys.readouterr().out)["kernel headers"]
    assert status == "INVALID"
    assert detail.startswith(f"BCC_KERNEL_SOURCE={tmp_path} is not a usable kernel headers tree")


def test_fallback_headers_are_reported_as_such(tmp_path, capsys, monkeypatch):
    # a merged tree (one dir) with the files discovery needs; no host headers
    tree = tmp_path / "kernel-headers"
    for rel in ("include/generated/autoconf.h", "include/linux/kconfig.h"):
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_text("\n")
    (tree / "arch" / headers.arch_dir() / "include/asm").mkdir(parents=True)
    monkeypatch.setenv(headers.FALLBACK_ENV, str(tree))
    assert depcheck.main(["--modules-dir", str(tmp_path / "none")]) == 0
    status, detail = parse(capsys.readouterr().out)["kernel headers"]
    assert (status, detail) == ("VALID", f"bundled fallback {tree}")


def test_json_output(tmp_path, capsys):
    assert depcheck.main(["--json", "--modules-dir", str(tmp_path)]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is False
    assert [c["name"] for c in doc["checks"]] == NAMES
    bad = [c for c in doc["checks"] if c["status"] == "INVALID"]
    assert [(c["name"], c["valid"], c["required"]) for c in bad] == [("kernel headers", False, True)]


def test_register_adds_subcommand(capsys):
    parser = argparse.ArgumentParser(prog="kipfix")
    depcheck.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["dependency-check", "--json"])
    assert args.func(args) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True


@pytest.mark.parametrize(
    "release, valid, detail",
    [
        ("6.18.44-fc-v445", True, "6.18.44-fc-v445 (>= 5.10 required)"),
        ("5.10.0-30-amd64", True, "5.10.0-30-amd64 (>= 5.10 required)"),
        ("5.4.0-150-generic", False, "5.4.0-150-generic is older than 5.10: upgrade the kernel to 5.10 or newer"),
        ("weird", False, "cannot parse kernel release 'weird' (>= 5.10 required)"),
    ],
)
def test_kernel_version(release, valid, detail):
    r = requirements.check_kernel(release)
    assert (r.valid, r.detail) == (valid, detail)


def test_bpffs_not_mounted(tmp_path):
    mounts = tmp_path / "mounts"
    mounts.write_text("proc /proc proc rw 0 0\n")
    r = requirements.check_bpffs(mounts=str(mounts))
    assert (r.valid, r.detail) == (False, "not mounted at /sys/fs/bpf: mount -t bpf bpf /sys/fs/bpf")


def ns_inode(path="/proc/self/ns/net") -> int:
    return os.stat(path).st_ino


def test_checks_leave_nothing_behind():
    before_ns = ns_inode()
    before_fds = sorted(os.listdir("/proc/self/fd"))
    probe_ns = requirements._clsact_in_throwaway_netns()
    depcheck.run_checks()
    assert probe_ns != before_ns
    assert ns_inode() == before_ns  # the process did not move
    assert sorted(os.listdir("/proc/self/fd")) == before_fds  # no map or netlink fd kept
    # no process holds the probe's namespace any more
    live = subprocess.run(["lsns", "-t", "net", "-n", "-o", "NS"], capture_output=True, text=True, check=True)
    assert str(probe_ns) not in live.stdout.split()


def test_require_runtime_returns_headers_and_keeps_env():
    found = requirements.require_runtime()
    assert found == headers.find_kernel_headers()
    assert headers.BCC_ENV not in os.environ


def test_require_runtime_names_missing_headers(tmp_path, monkeypatch):
    monkeypatch.setenv(headers.FALLBACK_ENV, str(tmp_path / "fallback"))
    with pytest.raises(requirements.RuntimeRequirementMissing) as e:
        requirements.require_runtime(modules_dir=str(tmp_path))
    assert [r.name for r in e.value.results] == ["kernel headers"]
    assert str(e.value).startswith("cannot run the metering program: kernel headers: no kernel headers for BCC")
    assert "scripts/kernel-headers.sh" in str(e.value)


def run_deprived(prefix: list[str], code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        prefix + [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )


CHECK_LINES = "from kipfix.agent import depcheck; import sys; sys.exit(depcheck.main([]))"
GATE = (
    "from kipfix.agent.datapath import requirements\n"
    "try:\n    requirements.require_runtime()\n"
    "except requirements.RuntimeRequirementMissing as e:\n    print(e)\n"
)


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)")
def test_unprivileged_user_is_told_to_run_as_root():
    prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"]
    p = run_deprived(prefix, CHECK_LINES)
    assert p.returncode == 1, p.stderr
    rows = parse(p.stdout)
    hint = "run as root or with CAP_BPF+CAP_NET_ADMIN"
    assert rows["bpf syscall"][0] == "INVALID"
    assert rows["bpf syscall"][1].startswith("creating a BPF map: Operation not permitted: " + hint)
    assert rows["clsact"] == ("INVALID", "no CAP_NET_ADMIN to add a clsact qdisc: " + requirements.PERMISSION_HINT)
    assert rows["kernel headers"][0] == "VALID"

    gate = run_deprived(prefix, GATE)
    assert gate.stdout.startswith("cannot run the metering program: bpf syscall: creating a BPF map: ")
    assert "; clsact: no CAP_NET_ADMIN" in gate.stdout


@pytest.mark.skipif(shutil.which("capsh") is None, reason="needs capsh (libcap2-bin)")
def test_without_sys_admin_clsact_comes_from_kernel_config():
    """CAP_NET_ADMIN+CAP_BPF suffice to run; the netns probe is replaced by the config."""
    p = subprocess.run(
        ["capsh", "--drop=cap_sys_admin", "--", "-c", f"exec {sys.executable} -c '{CHECK_LINES}'"],
        capture_output=True, text=True, timeout=60,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    status, detail = parse(p.stdout)["clsact"]
    assert status == "VALID"
    assert detail.endswith("in /proc/config.gz (no live probe: unshare(CLONE_NEWNET): Operation not permitted)")
