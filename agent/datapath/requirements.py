"""What the metering program needs from the kernel and the process, checked before anything loads.

Each check is fast and leaves nothing behind: the BPF check creates a
one-entry array map and closes it, the clsact check adds a clsact qdisc to
``lo`` inside a network namespace that lives only as long as one thread.
:func:`require_runtime` is the start-up gate; ``kipfix dependency-check``
reports these checks beside the rest (depcheck.py).
"""

from __future__ import annotations

import ctypes
import errno
import gzip
import os
import platform
import re
import struct
import threading
from dataclasses import dataclass

from . import headers as kheaders

MIN_KERNEL = (5, 10)
BPFFS = "/sys/fs/bpf"

_BPF_SYSCALL = {
    "x86_64": 321,
    "i386": 357,
    "i686": 357,
    "aarch64": 280,
    "riscv64": 280,
    "armv7l": 386,
    "ppc64le": 361,
    "s390x": 351,
}
_BPF_MAP_CREATE = 0
_BPF_MAP_TYPE_ARRAY = 2
_CLONE_NEWNET = 0x40000000

PERMISSION_HINT = "run as root or with CAP_BPF+CAP_NET_ADMIN (CAP_SYS_ADMIN on kernels before 5.8)"


@dataclass(frozen=True)
class CheckResult:
    name: str
    valid: bool
    detail: str
    required: bool = True

    @property
    def status(self) -> str:
        return "VALID" if self.valid else "INVALID"

    def line(self, name_width: int = 16) -> str:
        extra = "" if self.required or self.valid else " (optional)"
        return f"{self.name:<{name_width}}{self.status:<9}{self.detail}{extra}"


class RuntimeRequirementMissing(RuntimeError):
    """The kernel or the process lacks something the agent needs.

    ``results`` holds the failed checks; the message names each one and how to
    fix it.
    """

    def __init__(self, results: list[CheckResult]):
        self.results = results
        super().__init__(
            "cannot run the metering program: "
            + "; ".join(f"{r.name}: {r.detail}" for r in results)
        )


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def parse_kernel_version(release: str) -> tuple[int, int, int] | None:
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", release)
    if not m:
        return None
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


def check_kernel(release: str | None = None) -> CheckResult:
    release = release or platform.release()
    version = parse_kernel_version(release)
    need = ".".join(map(str, MIN_KERNEL))
    if version is None:
        return CheckResult("kernel", False, f"cannot parse kernel release {release!r} (>= {need} required)")
    if version[:2] < MIN_KERNEL:
        return CheckResult("kernel", False, f"{release} is older than {need}: upgrade the kernel to {need} or newer")
    return CheckResult("kernel", True, f"{release} (>= {need} required)")


def check_bpf_syscall() -> CheckResult:
    """Create a one-entry array map through bpf(2) and close it."""
    nr = _BPF_SYSCALL.get(platform.machine())
    if nr is None:
        return CheckResult("bpf syscall", False, f"unknown bpf(2) number for {platform.machine()}")
    # map_type, key_size, value_size, max_entries, map_flags, inner_map_fd,
    # numa_node, map_name[16]; the rest of union bpf_attr stays zero
    attr = ctypes.create_string_buffer(
        struct.pack("=7I16s", _BPF_MAP_TYPE_ARRAY, 4, 4, 1, 0, 0, 0, b"kipfix_check"), 72
    )
    libc = _libc()
    fd = libc.syscall(nr, _BPF_MAP_CREATE, attr, ctypes.sizeof(attr))
    if fd < 0:
        err = ctypes.get_errno()
        if err in (errno.EPERM, errno.EACCES):
            return CheckResult("bpf syscall", False, f"creating a BPF map: {os.strerror(err)}: {PERMISSION_HINT}")
        if err == errno.ENOSYS:
            return CheckResult("bpf syscall", False, "kernel built without CONFIG_BPF_SYSCALL: use a kernel with BPF enabled")
        return CheckResult("bpf syscall", False, f"creating a BPF map failed: {os.strerror(err)}")
    os.close(fd)
    return CheckResult("bpf syscall", True, "created and removed a BPF array map")


def check_btf(path: str = "/sys/kernel/btf/vmlinux") -> CheckResult:
    if os.path.exists(path):
        return CheckResult("btf", True, f"{path} present", required=False)
    return CheckResult(
        "btf", False, f"{path} missing (CONFIG_DEBUG_INFO_BTF); BCC tc programs work without it", required=False
    )


def _kernel_config(path: str = "/proc/config.gz") -> dict[str, str] | None:
    try:
        with gzip.open(path, "rt") as f:
            return dict(
                line.strip().split("=", 1) for line in f if line.startswith("CONFIG_") and "=" in line
            )
    except OSError:
        return None


class _NetnsRefused(OSError):
    """unshare(CLONE_NEWNET) failed: the probe could not even start."""


def _has_capability(bit: int, status: str = "/proc/self/status") -> bool:
    try:
        with open(status) as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> bit & 1)
    except (OSError, ValueError):
        pass
    return False


def _clsact_in_throwaway_netns() -> int:
    """Add and delete clsact on lo in a netns private to a short-lived thread.

    The network namespace belongs to the thread only (unshare in a thread does
    not move the process) and disappears with it and its netlink socket.
    Returns the namespace's inode number.
    """
    failure: list[BaseException] = []
    inode: list[int] = []

    def probe():
        try:
            if _libc().unshare(_CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise _NetnsRefused(err, f"unshare(CLONE_NEWNET): {os.strerror(err)}")
            inode.append(os.stat("/proc/thread-self/ns/net").st_ino)
            from pyroute2 import IPRoute

            with IPRoute() as ipr:
                index = ipr.link_lookup(ifname="lo")[0]
                ipr.tc("add", "clsact", index)
                ipr.tc("del", "clsact", index)
        except BaseException as e:  # reported to the caller
            failure.append(e)

    t = threading.Thread(target=probe, name="kipfix-clsact-check")
    t.start()
    t.join(5)
    if t.is_alive():
        raise TimeoutError("clsact probe did not finish in 5 s")
    if failure:
        raise failure[0]
    return inode[0]


_CAP_NET_ADMIN = 12
_CLSACT_KERNEL_HINT = (
    "use a kernel with CONFIG_NET_SCH_INGRESS and CONFIG_NET_CLS_ACT "
    "(modprobe sch_ingress if it is built as a module)"
)


def check_clsact(config_path: str = "/proc/config.gz") -> CheckResult:
    """Probe clsact live; without the right to make a netns, read the kernel config."""
    try:
        _clsact_in_throwaway_netns()
        return CheckResult("clsact", True, "added and removed a clsact qdisc in a throwaway netns")
    except _NetnsRefused as e:
        refused = e
    except Exception as e:  # noqa: BLE001 - netlink or pyroute2 failure becomes the detail
        code = getattr(e, "code", None) or getattr(e, "errno", None)
        if code in (errno.EPERM, errno.EACCES):
            return CheckResult("clsact", False, f"adding a clsact qdisc was refused ({e}): {PERMISSION_HINT}")
        return CheckResult("clsact", False, f"adding a clsact qdisc failed ({e}): {_CLSACT_KERNEL_HINT}")

    if not _has_capability(_CAP_NET_ADMIN):
        return CheckResult("clsact", False, f"no CAP_NET_ADMIN to add a clsact qdisc: {PERMISSION_HINT}")
    config = _kernel_config(config_path)
    if config is None:
        return CheckResult(
            "clsact", True, f"not verified: no throwaway netns ({refused.strerror}) and no {config_path}"
        )
    ingress, act = config.get("CONFIG_NET_SCH_INGRESS"), config.get("CONFIG_NET_CLS_ACT")
    if ingress in ("y", "m") and act == "y":
        return CheckResult(
            "clsact", True,
            f"CONFIG_NET_SCH_INGRESS={ingress} in {config_path} (no live probe: {refused.strerror})",
        )
    return CheckResult(
        "clsact", False,
        f"kernel config {config_path} has CONFIG_NET_SCH_INGRESS={ingress or 'unset'}, "
        f"CONFIG_NET_CLS_ACT={act or 'unset'}: {_CLSACT_KERNEL_HINT}",
    )


def check_bpffs(path: str = BPFFS, mounts: str = "/proc/self/mounts") -> CheckResult:
    try:
        with open(mounts) as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 3 and fields[1] == path and fields[2] == "bpf":
                    return CheckResult("bpffs", True, f"bpf filesystem mounted at {path}")
    except OSError:
        pass
    try:
        with open("/proc/filesystems") as f:
            supported = any(line.split()[-1:] == ["bpf"] for line in f)
    except OSError:
        supported = False
    if supported:
        return CheckResult("bpffs", False, f"not mounted at {path}: mount -t bpf bpf {path}")
    return CheckResult("bpffs", False, f"kernel has no bpf filesystem: cannot pin maps under {path}")


def check_kernel_headers(modules_dir: str = kheaders.DEFAULT_MODULES_DIR) -> CheckResult:
    try:
        found = kheaders.find_kernel_headers(modules_dir=modules_dir)
    except kheaders.KernelHeadersMissing as e:
        return CheckResult("kernel headers", False, str(e))
    return CheckResult("kernel headers", True, found.description)



def require_runtime(*, modules_dir: str = kheaders.DEFAULT_MODULES_DIR) -> kheaders.KernelHeaders:
    """Agent start-up gate: kernel headers, BPF permission, clsact.

    Raises :class:`RuntimeRequirementMissing` naming every missing thing and
    its fix; otherwise prepares BCC's environment (see
    :func:`kipfix.agent.datapath.headers.prepare_bcc_environment`) and returns the
    headers it will use.
    """
    failed = [
        r for r in (check_kernel_headers(modules_dir), check_bpf_syscall(), check_clsact()) if not r.valid
    ]
    if failed:
        raise RuntimeRequirementMissing(failed)
    return kheaders.prepare_bcc_environment(modules_dir=modules_dir)
