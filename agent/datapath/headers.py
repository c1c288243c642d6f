"""Find the kernel headers BCC compiles the metering program against.

Order of preference:

1. ``BCC_KERNEL_SOURCE`` when the user set it (BCC reads it itself);
2. host headers at ``/lib/modules/$(uname -r)/build`` (with ``source`` beside
   it when the tree is split, as Debian's packages are): either the running
   kernel's own headers or Debian's ``linux-headers-amd64`` linked there by
   ``scripts/kernel-headers.sh``;
3. the bundled fallback, one merged tree (Debian's ``-common`` with ``-amd64``
   copied over it), default ``/usr/share/kipfix/kernel-headers``, overridden
   by ``KIPFIX_HEADERS_FALLBACK``. BCC only finds it through
   ``BCC_KERNEL_SOURCE``, which :func:`prepare_bcc_environment` sets.
"""

from __future__ import annotations

import logging
import os
import platform
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, MutableMapping

log = logging.getLogger("kipfix.headers")

BCC_ENV = "BCC_KERNEL_SOURCE"
FALLBACK_ENV = "KIPFIX_HEADERS_FALLBACK"
DEFAULT_FALLBACK = "/usr/share/kipfix/kernel-headers"
DEFAULT_MODULES_DIR = "/lib/modules"

# uname machine -> the kernel's arch/ folder name
_ARCH_DIRS = {
    "x86_64": "x86",
    "i386": "x86",
    "i686": "x86",
    "aarch64": "arm64",
    "armv7l": "arm",
    "ppc64le": "powerpc",
    "s390x": "s390",
    "riscv64": "riscv",
}

# BCC_KERNEL_SOURCE values this process set itself (not the user's choice)
_set_by_us: set[str] = set()


class KernelHeadersMissing(RuntimeError):
    """No usable kernel headers for BCC; the message says what to do."""


@dataclass(frozen=True)
class KernelHeaders:
    """The headers tree BCC will use.

    ``path`` is the tree BCC reads (``build`` for host headers), ``origin`` is
    one of ``env``, ``host`` or ``fallback``, ``description`` is the line to
    show a user, ``version`` the release the headers were made for (from
    ``utsrelease.h``, None if the tree does not say).
    """

    path: str
    origin: str
    description: str
    version: str | None = None


def arch_dir(machine: str | None = None) -> str:
    machine = machine or platform.machine()
    return _ARCH_DIRS.get(machine, machine)


def headers_version(tree: Path) -> str | None:
    """The kernel release a headers tree was generated for, if it says."""
    try:
        text = (tree / "include/generated/utsrelease.h").read_text()
    except OSError:
        return None
    m = re.search(r'UTS_RELEASE\s+"([^"]+)"', text)
    return m.group(1) if m else None


def missing_parts(build: Path, source: Path | None = None, arch: str | None = None) -> list[str]:
    """What a headers tree lacks for BCC; empty when usable.

    ``build`` holds the generated files (config, generated arch headers);
    ``source`` (Debian's ``-common``) may hold the generic ones instead.
    """
    arch = arch or arch_dir()
    trees = [build] + ([source] if source is not None else [])
    missing = []
    if not build.is_dir():
        return [f"{build} (no such directory)"]
    if not (build / "include/generated/autoconf.h").is_file():
        missing.append(f"{build}/include/generated/autoconf.h (kernel config)")
    if not any((t / "include/linux/kconfig.h").is_file() for t in trees):
        missing.append(" or ".join(f"{t}/include/linux/kconfig.h" for t in trees) + " (generic headers)")
    if not any((t / "arch" / arch / "include/asm").is_dir() for t in trees):
        missing.append(" or ".join(f"{t}/arch/{arch}/include/asm" for t in trees) + " (arch headers)")
    return missing


def fix_hint(release: str) -> str:
    return (
        f"install the headers for this kernel (apt-get install linux-headers-{release}), "
        "or Debian's generic ones and link them (apt-get install linux-headers-amd64 && "
        "scripts/kernel-headers.sh), or set BCC_KERNEL_SOURCE to a kernel headers tree "
        f"(or {FALLBACK_ENV} to a merged -common + -amd64 copy)"
    )


def _describe_host(build: Path, source: Path | None, release: str, version: str | None) -> str:
    text = f"host {build}"
    if build.is_symlink():
        text += f" -> {build.resolve()}"
    if version is None:
        text += " (headers version unknown)"
    elif version == release:
        text += " (this kernel's own headers)"
    else:
        text += f" (linked package headers for {version}, not this kernel's own {release})"
    if source is not None:
        text += f"; source -> {source.resolve()}"
    return text


def find_kernel_headers(
    *,
    release: str | None = None,
    modules_dir: str | os.PathLike = DEFAULT_MODULES_DIR,
    environ: Mapping[str, str] | None = None,
) -> KernelHeaders:
    """The headers BCC will use, or :class:`KernelHeadersMissing`.

    ``modules_dir`` replaces ``/lib/modules`` (a host mount in a container, or
    a temp dir in tests); ``environ`` replaces ``os.environ``.
    """
    environ = os.environ if environ is None else environ
    release = release or platform.release()
    hint = fix_hint(release)

    user = environ.get(BCC_ENV)
    if user and user not in _set_by_us:
        tree = Path(user)
        missing = missing_parts(tree)
        if missing:
            raise KernelHeadersMissing(
                f"{BCC_ENV}={user} is not a usable kernel headers tree: missing "
                + "; ".join(missing)
                + f". Fix or unset {BCC_ENV}, or {hint}"
            )
        version = headers_version(tree)
        desc = f"{BCC_ENV}={user}" + (f" -> {tree.resolve()}" if tree.is_symlink() else "")
        desc += f" (headers for {version})" if version else ""
        return KernelHeaders(str(tree), "env", desc, version)

    tried = []
    kdir = Path(modules_dir) / release
    build = kdir / "build"
    source = kdir / "source"
    source_or_none = source if source.is_dir() else None
    missing = missing_parts(build, source_or_none)
    if not missing:
        version = headers_version(build)
        return KernelHeaders(
            str(build), "host", _describe_host(build, source_or_none, release, version), version
        )
    tried.append(f"host headers: missing {'; '.join(missing)}")
    log.debug("host headers at %s not usable: %s", build, missing)

    fallback = Path(environ.get(FALLBACK_ENV) or DEFAULT_FALLBACK)
    missing = missing_parts(fallback)
    if not missing:
        version = headers_version(fallback)
        desc = f"bundled fallback {fallback}"
        if fallback.is_symlink():
            desc += f" -> {fallback.resolve()}"
        if version:
            desc += f" (headers for {version}, running {release})"
        return KernelHeaders(str(fallback), "fallback", desc, version)
    where = f"{FALLBACK_ENV}={fallback}" if environ.get(FALLBACK_ENV) else f"bundled fallback {fallback}"
    tried.append(f"{where}: missing {'; '.join(missing)}")

    raise KernelHeadersMissing(
        "no kernel headers for BCC (kernel " + release + "): " + " | ".join(tried) + f". To fix: {hint}"
    )


def prepare_bcc_environment(
    headers: KernelHeaders | None = None,
    *,
    environ: MutableMapping[str, str] | None = None,
    **find_kwargs,
) -> KernelHeaders:
    """Make BCC use the headers found; call before constructing ``BPF(...)``.

    Sets ``BCC_KERNEL_SOURCE`` for the bundled fallback (BCC would not find it
    otherwise); leaves the environment alone for host or user-chosen headers.
    Logs which headers are used. Raises :class:`KernelHeadersMissing`.
    """
    environ = os.environ if environ is None else environ
    if headers is None:
        headers = find_kernel_headers(environ=environ, **find_kwargs)
    if headers.origin == "fallback":
        environ[BCC_ENV] = headers.path
        _set_by_us.add(headers.path)
    elif headers.origin == "host" and environ.get(BCC_ENV) in _set_by_us:
        # an earlier call in this process pointed BCC at the fallback
        del environ[BCC_ENV]
    log.info("kernel headers for BCC: %s", headers.description)
    return headers
