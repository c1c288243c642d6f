"""Kernel-header discovery: host tree, user's BCC_KERNEL_SOURCE, bundled fallback.

Host lookups are redirected with ``modules_dir`` to temp dirs; /lib/modules is
only ever read.
"""

import logging
import os
import platform
import shutil
import subprocess
from pathlib import Path

import pytest

from kipfix.agent.datapath import headers
from kipfix.agent.datapath.headers import KernelHeadersMissing, find_kernel_headers, prepare_bcc_environment

RELEASE = platform.release()
ARCH = headers.arch_dir()


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    monkeypatch.delenv(headers.BCC_ENV, raising=False)
    monkeypatch.delenv(headers.FALLBACK_ENV, raising=False)


def make_tree(root: Path, version: str = "6.1.0-99-amd64") -> Path:
    """A minimal merged headers tree with the files discovery looks for."""
    (root / "include/generated").mkdir(parents=True)
    (root / "include/generated/autoconf.h").write_text("#define CONFIG_NET 1\n")
    (root / "include/generated/utsrelease.h").write_text(f'#define UTS_RELEASE "{version}"\n')
    (root / "include/linux").mkdir(parents=True)
    (root / "include/linux/kconfig.h").write_text("\n")
    (root / "arch" / ARCH / "include/asm").mkdir(parents=True)
    return root


def test_this_machine_uses_host_headers():
    found = find_kernel_headers()
    assert found.origin == "host"
    assert found.path == f"/lib/modules/{RELEASE}/build"
    assert found.description.startswith(f"host /lib/modules/{RELEASE}/build")
    build = Path(found.path)
    if build.is_symlink():
        assert f" -> {build.resolve()}" in found.description
    assert found.version == headers.headers_version(build)
    if found.version != RELEASE:
        assert f"linked package headers for {found.version}, not this kernel's own {RELEASE}" in found.description


def test_split_host_tree_like_debian(tmp_path):
    """build holds generated files, source holds the generic and arch headers."""
    amd64 = tmp_path / "usr/src/linux-headers-6.1.0-99-amd64"
    (amd64 / "include/generated").mkdir(parents=True)
    (amd64 / "include/generated/autoconf.h").write_text("\n")
    (amd64 / "include/generated/utsrelease.h").write_text('#define UTS_RELEASE "6.1.0-99-amd64"\n')
    common = make_tree(tmp_path / "usr/src/linux-headers-6.1.0-99-common")
    (common / "include/generated/autoconf.h").unlink()
    mods = tmp_path / "lib/modules" / RELEASE
    mods.mkdir(parents=True)
    (mods / "build").symlink_to(amd64)
    (mods / "source").symlink_to(common)

    found = find_kernel_headers(modules_dir=tmp_path / "lib/modules")
    assert found.origin == "host"
    assert found.version == "6.1.0-99-amd64"
    assert found.description == (
        f"host {mods}/build -> {amd64} (linked package headers for 6.1.0-99-amd64, "
        f"not this kernel's own {RELEASE}); source -> {common}"
    )


def test_own_host_headers_are_called_so(tmp_path):
    make_tree(tmp_path / RELEASE / "build", version=RELEASE)
    found = find_kernel_headers(modules_dir=tmp_path)
    assert found.description == f"host {tmp_path}/{RELEASE}/build (this kernel's own headers)"


def test_missing_everywhere_says_what_and_how(tmp_path, monkeypatch):
    monkeypatch.setenv(headers.FALLBACK_ENV, str(tmp_path / "fallback"))
    with pytest.raises(KernelHeadersMissing) as e:
        find_kernel_headers(modules_dir=tmp_path)
    msg = str(e.value)
    assert f"kernel {RELEASE}" in msg
    assert f"{tmp_path}/{RELEASE}/build (no such directory)" in msg
    assert f"KIPFIX_HEADERS_FALLBACK={tmp_path}/fallback: missing {tmp_path}/fallback (no such directory)" in msg
    assert f"apt-get install linux-headers-{RELEASE}" in msg
    assert "linux-headers-amd64 && scripts/kernel-headers.sh" in msg
    assert "set BCC_KERNEL_SOURCE" in msg


def test_default_fallback_named_when_env_unset(tmp_path):
    with pytest.raises(KernelHeadersMissing) as e:
        find_kernel_headers(modules_dir=tmp_path)
    if not Path(headers.DEFAULT_FALLBACK).exists():
        assert f"bundled fallback {headers.DEFAULT_FALLBACK}: missing" in str(e.value)


def test_incomplete_host_tree_lists_missing_parts(tmp_path, monkeypatch):
    monkeypatch.setenv(headers.FALLBACK_ENV, str(tmp_path / "none"))
    (tmp_path / RELEASE / "build/include").mkdir(parents=True)
    with pytest.raises(KernelHeadersMissing) as e:
        find_kernel_headers(modules_dir=tmp_path)
    build = tmp_path / RELEASE / "build"
    msg = str(e.value)
    assert f"{build}/include/generated/autoconf.h (kernel config)" in msg
    assert f"{build}/include/linux/kconfig.h (generic headers)" in msg
    assert f"{build}/arch/{ARCH}/include/asm (arch headers)" in msg


def test_user_bcc_kernel_source_wins(tmp_path, monkeypatch):
    tree = make_tree(tmp_path / "mine")
    monkeypatch.setenv(headers.BCC_ENV, str(tree))
    found = find_kernel_headers()  # host headers exist, the user's choice still wins
    assert found.origin == "env"
    assert found.path == str(tree)
    assert found.description == f"BCC_KERNEL_SOURCE={tree} (headers for 6.1.0-99-amd64)"


def test_user_bcc_kernel_source_empty_dir_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv(headers.BCC_ENV, str(tmp_path))
    with pytest.raises(KernelHeadersMissing) as e:
        find_kernel_headers()
    msg = str(e.value)
    assert msg.startswith(f"BCC_KERNEL_SOURCE={tmp_path} is not a usable kernel headers tree: missing ")
    assert f"{tmp_path}/include/generated/autoconf.h" in msg
    assert "Fix or unset BCC_KERNEL_SOURCE" in msg


def test_fallback_used_and_exported_for_bcc(tmp_path, monkeypatch, caplog):
    tree = make_tree(tmp_path / "fallback")
    monkeypatch.setenv(headers.FALLBACK_ENV, str(tree))
    env = dict(os.environ)
    with caplog.at_level(logging.INFO, logger="kipfix.headers"):
        found = prepare_bcc_environment(environ=env, modules_dir=tmp_path / "nomodules")
    assert found.origin == "fallback"
    assert found.description == f"bundled fallback {tree} (headers for 6.1.0-99-amd64, running {RELEASE})"
    assert env[headers.BCC_ENV] == str(tree)
    assert [r.getMessage() for r in caplog.records] == [f"kernel headers for BCC: {found.description}"]
    # the variable we set is not mistaken for the user's choice later on
    again = find_kernel_headers(environ=env, modules_dir=tmp_path / "nomodules")
    assert again.origin == "fallback"


def test_host_headers_leave_environment_alone():
    env = {}
    found = prepare_bcc_environment(environ=env)
    assert found.origin == "host"
    assert env == {}


def test_empty_fallback_dir_is_reported(tmp_path, monkeypatch):
    monkeypatch.setenv(headers.FALLBACK_ENV, str(tmp_path))
    with pytest.raises(KernelHeadersMissing) as e:
        find_kernel_headers(modules_dir=tmp_path / "nomodules")
    assert f"KIPFIX_HEADERS_FALLBACK={tmp_path}: missing {tmp_path}/include/generated/autoconf.h" in str(e.value)


TC_PROGRAM = rb"""
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/pkt_cls.h>
BPF_ARRAY(seen, u64, 1);
int probe(struct __sk_buff *skb) {
    int zero = 0;
    u64 *v = seen.lookup(&zero);
    if (v && skb->protocol == htons(ETH_P_IP))
        __sync_fetch_and_add(v, 1);
    return TC_ACT_UNSPEC;
}
"""


@pytest.mark.root
def test_bcc_compiles_against_merged_fallback(tmp_path, monkeypatch):
    """The bundled-fallback layout (-common, then -amd64 over it) really works with BCC."""
    found = find_kernel_headers()
    build = Path(found.path).resolve()
    source = Path(f"/lib/modules/{RELEASE}/source").resolve()
    if found.origin != "host" or source == build or not source.is_dir():
        pytest.skip("needs split Debian headers linked under /lib/modules")
    tree = tmp_path / "kernel-headers"
    # a symlink copy keeps the test fast; the image copies real files the same way
    subprocess.run(["cp", "-rs", f"{source}/.", str(tree)], check=True)
    subprocess.run(["cp", "-rs", "--remove-destination", f"{build}/.", str(tree)], check=True)
    monkeypatch.setenv(headers.FALLBACK_ENV, str(tree))
    # prepare_bcc_environment() writes os.environ itself: register the variable with
    # monkeypatch (set, then delete) so teardown removes it and later tests get a clean env.
    monkeypatch.setenv(headers.BCC_ENV, "")
    monkeypatch.delenv(headers.BCC_ENV)
    bcc = pytest.importorskip("bcc")

    used = prepare_bcc_environment(modules_dir=tmp_path / "nomodules")
    assert used.origin == "fallback"
    assert os.environ[headers.BCC_ENV] == str(tree)
    b = bcc.BPF(text=TC_PROGRAM)
    try:
        fn = b.load_func(b"probe", bcc.BPF.SCHED_CLS)
        assert fn.fd >= 0
    finally:
        b.cleanup()
    shutil.rmtree(tree)
