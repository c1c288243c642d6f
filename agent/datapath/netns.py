"""Network namespaces: naming one, and running netlink work inside it.

A ``NetnsRef`` names the host netns (the agent's own), a named netns
(``/var/run/netns/NAME``, as ``ip netns`` makes them) or any nsfs path
(``/proc/PID/ns/net``). Config text parses as: "" or "host" -> host, a bare
name -> named, an absolute path -> path.

Work inside another netns runs in a short-lived thread that ``setns()``\\ s into
it: a netlink or inet socket stays bound to the netns it was created in, so an
``IPRoute`` opened there keeps working from any thread afterwards, and the
calling thread never changes namespace. No forked helper process, and the
namespace file descriptor is closed before the thread returns.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TypeVar

NETNS_RUN_DIR = "/var/run/netns"
CLONE_NEWNET = 0x40000000
SO_NETNS_COOKIE = 71  # include/uapi/asm-generic/socket.h, Linux >= 5.14

T = TypeVar("T")

_libc = ctypes.CDLL(None, use_errno=True)


class NetnsError(ValueError):
    """A netns reference that cannot be valid (bad syntax)."""


class NetnsNotFound(LookupError):
    """The network namespace does not exist (or the path is not one)."""

    def __init__(self, ref: "NetnsRef", reason: str = "does not exist") -> None:
        self.ref = ref
        super().__init__(f"netns {ref.describe()}: {reason}")


@dataclass(frozen=True)
class NetnsRef:
    """Names a network namespace. ``kind`` is "host", "name" or "path"."""

    kind: str = "host"
    value: str = ""

    @classmethod
    def parse(cls, text: "str | NetnsRef | None") -> "NetnsRef":
        if isinstance(text, NetnsRef):
            return text
        text = (text or "").strip()
        if text in ("", "host"):
            return HOST
        if text.startswith("/"):
            return cls("path", os.path.normpath(text))
        if "/" in text or text in (".", "..") or "\0" in text:
            raise NetnsError(f"netns {text!r}: expected \"host\", a name from `ip netns` "
                             "or an absolute path such as /proc/PID/ns/net")
        return cls("name", text)

    @property
    def is_host(self) -> bool:
        return self.kind == "host"

    @property
    def path(self) -> str | None:
        """The nsfs file to open, or None for the host (the agent's own) netns."""
        if self.kind == "name":
            return os.path.join(NETNS_RUN_DIR, self.value)
        if self.kind == "path":
            return self.value
        return None

    def __str__(self) -> str:
        return "host" if self.is_host else self.value

    def describe(self) -> str:
        if self.kind == "name":
            return f"{self.value!r} ({self.path})"
        return repr(str(self))

    def exists(self) -> bool:
        if self.is_host:
            return True
        try:
            fd = self.open()
        except NetnsNotFound:
            return False
        os.close(fd)
        return True

    def inode(self) -> int | None:
        """The netns inode number (stable while it exists), None if it is gone."""
        path = self.path or "/proc/self/ns/net"
        try:
            return os.stat(path).st_ino
        except OSError:
            return None

    def open(self) -> int:
        """Open the nsfs file (O_CLOEXEC); the caller closes the fd."""
        path = self.path
        if path is None:
            path = f"/proc/{os.getpid()}/ns/net"
        try:
            return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NetnsNotFound(self) from None
        except OSError as err:
            raise NetnsNotFound(self, f"cannot open {path}: {err.strerror}") from None


HOST = NetnsRef("host", "")


def _setns(fd: int, ref: NetnsRef) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        if err == errno.EINVAL:
            raise NetnsNotFound(ref, f"{ref.path} is not a network namespace")
        raise OSError(err, f"setns({ref}): {os.strerror(err)}")


def run_in_netns(ref: NetnsRef | str, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call ``func(*args, **kwargs)`` inside the netns and return its result.

    For the host netns it runs in the calling thread; otherwise in a new
    thread that enters the netns and exits afterwards. Exceptions propagate.
    """
    ref = NetnsRef.parse(ref)
    if ref.is_host:
        return func(*args, **kwargs)
    fd = ref.open()  # raises NetnsNotFound in the caller's thread
    box: dict[str, Any] = {}

    def body() -> None:
        try:
            try:
                _setns(fd, ref)
            finally:
                os.close(fd)
            box["result"] = func(*args, **kwargs)
        except BaseException as err:  # handed to the caller
            box["error"] = err

    thread = threading.Thread(target=body, name=f"netns-{ref}", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["result"]


def open_iproute(ref: NetnsRef | str, **kwargs: Any):
    """An ``IPRoute`` whose socket lives in the netns; the caller closes it."""
    from pyroute2 import IPRoute

    return run_in_netns(ref, IPRoute, **kwargs)


@contextmanager
def iproute(ref: NetnsRef | str, **kwargs: Any) -> Iterator[Any]:
    """``with iproute(ref) as ipr:`` -- IPRoute in the netns, closed afterwards."""
    ipr = open_iproute(ref, **kwargs)
    try:
        yield ipr
    finally:
        ipr.close()


def _own_cookie() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8)
    return int.from_bytes(raw, "little")


def netns_cookie(ref: NetnsRef | str) -> int:
    """The netns cookie (what bpf_get_netns_cookie() returns for its packets)."""
    return run_in_netns(ref, _own_cookie)


def named_netns() -> list[str]:
    """Names under /var/run/netns (what `ip netns list` shows)."""
    try:
        return sorted(os.listdir(NETNS_RUN_DIR))
    except FileNotFoundError:
        return []
