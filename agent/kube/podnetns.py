"""Find a pod's network namespace from its IP addresses, whatever the runtime.

Container runtimes keep pod network namespaces in different places
(containerd and CRI-O bind-mount them under /var/run/netns, Docker under
/var/run/docker/netns, others only through the sandbox's process), but every
one of them is reachable as ``/proc/PID/ns/net`` of some process, and every
pod's addresses are configured inside it. So the finder looks at the netns
files in the runtime folders and at every process's netns, and matches a
pod to the netns that holds one of its IPs.

Reading a netns's addresses costs a netlink dump inside it, so addresses are
cached per netns inode: a netns whose interfaces had no address yet (the CNI
plugin was still at work) is read again on the next look, one that vanished
is dropped. The host's own netns is never a pod's (hostNetwork pods are not
metered in a netns of their own).

A netns file under a runtime folder is preferred to a ``/proc`` path: it
lives exactly as long as the sandbox, while a process may exit first.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import threading
from typing import Iterable

from ..datapath.netns import NetnsRef, iproute

log = logging.getLogger("kipfix.podnetns")

RUNTIME_NETNS_DIRS = ("/var/run/netns", "/var/run/docker/netns")


def _normal(address: str) -> str:
    return str(ipaddress.ip_address(address.split("%", 1)[0]))


def _start_time(proc: str, pid: str) -> int | None:
    """A process's start time (clock ticks after boot), or None if it is gone."""
    try:
        with open(os.path.join(proc, pid, "stat"), "rb") as handle:
            stat = handle.read()
    except OSError:
        return None
    return int(stat[stat.rindex(b")") + 2:].split()[19])  # field 22; the name before ")" may hold spaces


class NetnsFinder:
    def __init__(self, runtime_dirs: Iterable[str] = RUNTIME_NETNS_DIRS, proc: str = "/proc"):
        self.runtime_dirs = tuple(runtime_dirs)
        self.proc = proc
        # (inode, identity of the path) -> the netns's global addresses. Inode numbers of dead
        # namespaces are reused at once, so the inode alone does not name a netns for long: a file
        # in a runtime folder adds its ctime, a process its start time.
        self._addresses: dict[tuple, frozenset[str]] = {}
        self._lock = threading.Lock()

    def candidates(self) -> dict[int, tuple[str, tuple]]:
        """Every network namespace in sight: inode -> (a path that opens it, that path's identity).

        A runtime folder's file is preferred; else the oldest process in the netns (a pod's
        sandbox process outlives the commands run in the pod)."""
        found: dict[int, tuple[str, tuple]] = {}
        for folder in self.runtime_dirs:
            try:
                names = sorted(os.listdir(folder))
            except OSError:
                continue
            for name in names:
                path = os.path.join(folder, name)
                try:
                    st = os.stat(path)
                except OSError:
                    continue
                found.setdefault(st.st_ino, (path, ("file", st.st_ctime_ns)))
        try:
            pids = [p for p in os.listdir(self.proc) if p.isdigit()]
        except OSError:
            pids = []
        for pid in pids:
            path = os.path.join(self.proc, pid, "ns", "net")
            try:
                inode = os.stat(path).st_ino
            except OSError:  # the process exited, or its netns is not ours to see
                continue
            known = found.get(inode)
            if known is not None and known[1][0] == "file":
                continue
            started = _start_time(self.proc, pid)
            if started is not None and (known is None or started < known[1][1]):
                found[inode] = (path, ("process", started, int(pid)))
        found.pop(self._own_inode(), None)
        return found

    def _own_inode(self) -> int:
        return os.stat(os.path.join(self.proc, "self", "ns", "net")).st_ino

    @staticmethod
    def read_addresses(path: str) -> frozenset[str]:
        """The addresses configured in the netns at ``path`` (loopback and link-local left out)."""
        with iproute(NetnsRef.parse(path)) as ipr:
            out = set()
            for msg in ipr.get_addr():
                address = msg.get_attr("IFA_ADDRESS") or msg.get_attr("IFA_LOCAL")
                if not address:
                    continue
                ip = ipaddress.ip_address(address.split("%", 1)[0])
                if not (ip.is_loopback or ip.is_link_local):
                    out.add(str(ip))
            return frozenset(out)

    def find(self, ips: Iterable[str], exclude: Iterable[int] = ()) -> tuple[str, int] | None:
        """(path, inode) of the netns holding one of ``ips``, or None.

        ``exclude``: inodes already known to be other pods' (a deleted pod's
        sandbox may linger a moment with an address a new pod got)."""
        wanted = {_normal(ip) for ip in ips if ip}
        if not wanted:
            return None
        with self._lock:
            candidates = self.candidates()
            current = {(inode, *identity) for inode, (_path, identity) in candidates.items()}
            for key in [k for k in self._addresses if k not in current]:
                del self._addresses[key]
            skip = set(exclude)
            for inode, (path, identity) in candidates.items():
                if inode in skip:
                    continue
                key = (inode, *identity)
                addresses = self._addresses.get(key)
                if not addresses:  # never read, or read before the CNI plugin gave it an address
                    try:
                        addresses = self.read_addresses(path)
                    except Exception as err:  # noqa: BLE001 -- gone meanwhile, or not a netns we may enter
                        log.debug("cannot read addresses in netns %s: %s", path, err)
                        continue
                    self._addresses[key] = addresses
                if addresses & wanted:
                    return path, inode
        return None

    def __len__(self) -> int:
        return len(self._addresses)
