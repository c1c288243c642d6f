"""`kipfix dependency-check`: is this host able to run the metering program?

Each check is fast and leaves nothing behind: the BPF check creates a
one-entry array map and closes it, the clsact check adds a clsact qdisc to
``lo`` inside a network namespace that lives only as long as one thread.
The kernel checks live in datapath/requirements.py, whose
:func:`require_runtime` is what the agent calls at startup; this module adds
the Python side and formats the report.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
from dataclasses import asdict
from importlib import metadata

from .datapath import headers as kheaders
from .datapath.requirements import (CheckResult, check_bpf_syscall, check_bpffs, check_btf, check_clsact, check_kernel,
                                    check_kernel_headers)

MIN_PYTHON = (3, 11)


def check_bcc() -> CheckResult:
    try:
        import bcc
    except Exception as e:  # noqa: BLE001 - ImportError or libbcc OSError
        return CheckResult(
            "bcc", False,
            f"cannot import bcc ({e}): apt-get install python3-bpfcc, and make the venv with "
            "--system-site-packages from /usr/bin/python3",
        )
    libbcc = getattr(getattr(bcc, "libbcc", None), "lib", None)
    where = f", {libbcc._name}" if libbcc is not None else ""
    return CheckResult("bcc", True, f"{getattr(bcc, '__version__', 'unknown version')}{where}")


def check_pyroute2() -> CheckResult:
    try:
        version = metadata.version("pyroute2")
    except metadata.PackageNotFoundError:
        return CheckResult("pyroute2", False, "not installed: pip install 'pyroute2>=0.7.9,<0.8'")
    return CheckResult("pyroute2", True, version)


def check_iproute2() -> CheckResult:
    ip = shutil.which("ip")
    if ip is None:
        return CheckResult("iproute2", False, "ip not found: apt-get install iproute2", required=False)
    try:
        out = subprocess.run([ip, "-V"], capture_output=True, text=True, timeout=2).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        return CheckResult("iproute2", False, f"{ip} -V failed: {e}", required=False)
    return CheckResult("iproute2", True, out or f"{ip} (no version output)", required=False)


def check_python() -> CheckResult:
    version = platform.python_version()
    need = ".".join(map(str, MIN_PYTHON))
    if sys.version_info[:2] < MIN_PYTHON:
        return CheckResult("python", False, f"{version} is older than {need}")
    return CheckResult("python", True, f"{version} ({sys.executable})")


def check_ipfix_encoder() -> CheckResult:
    from .export.ipfix import flowpack

    if flowpack.AVAILABLE:
        return CheckResult("ipfix encoder", True, f"C ({flowpack._flowpack.__name__})", required=False)
    return CheckResult("ipfix encoder", False, "the C encoder was not built, the Python one is used (about 4x "
                       "slower for wide templates): reinstall kipfix with gcc and python3-dev", required=False)


def run_checks(*, modules_dir: str = kheaders.DEFAULT_MODULES_DIR) -> list[CheckResult]:
    """All checks, in the order `kipfix dependency-check` prints them."""
    return [
        check_kernel(),
        check_bpf_syscall(),
        check_btf(),
        check_clsact(),
        check_bpffs(),
        check_kernel_headers(modules_dir),
        check_bcc(),
        check_pyroute2(),
        check_iproute2(),
        check_python(),
        check_ipfix_encoder(),
    ]


def all_required_valid(results: list[CheckResult]) -> bool:
    return all(r.valid or not r.required for r in results)


def format_text(results: list[CheckResult]) -> str:
    width = max(len(r.name) for r in results) + 2
    return "\n".join(r.line(width) for r in results)


def format_json(results: list[CheckResult]) -> str:
    return json.dumps(
        {
            "ok": all_required_valid(results),
            "checks": [dict(asdict(r), status=r.status) for r in results],
        },
        indent=2,
    )


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument(
        "--modules-dir",
        default=kheaders.DEFAULT_MODULES_DIR,
        help="where to look for <release>/build kernel headers (default: %(default)s; "
        "e.g. a host mount such as /host/lib/modules)",
    )


def run(args: argparse.Namespace) -> int:
    """Run the checks for parsed arguments; print; return the exit code."""
    results = run_checks(modules_dir=args.modules_dir)
    print(format_json(results) if args.json else format_text(results))
    return 0 if all_required_valid(results) else 1


def register(subparsers) -> argparse.ArgumentParser:
    """Add `dependency-check` to a CLI; the handler is ``args.func(args) -> int``."""
    parser = subparsers.add_parser(
        "dependency-check",
        help="check the kernel, permissions and libraries kipfix needs",
        description="Check the kernel, permissions and libraries kipfix needs. "
        "Exit code 1 if anything required is INVALID.",
    )
    _add_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kipfix dependency-check")
    _add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
