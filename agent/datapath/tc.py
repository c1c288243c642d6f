"""Attach and detach kipfix's tc BPF filters (clsact ingress/egress) with pyroute2.

Every kipfix filter is a direct-action ``bpf`` filter, protocol all, at the
fixed priority ``PRIO`` with the fixed handle ``HANDLE`` on the clsact
ingress (``ffff:fff2``) or egress (``ffff:fff3``) hook:

    tc filter show dev eth0 ingress
    filter protocol all pref 19280 bpf chain 0 handle 0x4b50 kipfix_ingress direct-action ...

Why these values: filters run in increasing ``pref`` order, and ``tc filter
add`` without a pref starts at 49152, so kipfix (19280, below it) meters
before filters added at the default priority. The program returns
TC_ACT_UNSPEC, so the packet then continues to the next filter untouched.
0x4b50 is "KP" in ASCII; an explicit handle makes ``replace`` update the one
kipfix filter in place, so re-running attach changes nothing.

Detach removes only filters at (PRIO, HANDLE) whose BPF name starts with
``kipfix``, and removes the clsact qdisc only when kipfix created it and no
other filter is left on it. Whether kipfix created a qdisc is remembered in
a JSON state file (``DEFAULT_STATE_FILE``, overridable with the
``KIPFIX_TC_STATE`` environment variable or the ``state_file`` argument),
because attach and detach may run in different processes.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import struct
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

from pyroute2.netlink.exceptions import NetlinkDumpInterrupted, NetlinkError

from .netns import HOST, NetnsNotFound, NetnsRef, iproute, named_netns, netns_cookie

PRIO = 0x4B50
HANDLE = 0x4B50
NAME_PREFIX = "kipfix"
INGRESS_NAME = "kipfix_ingress"
EGRESS_NAME = "kipfix_egress"
PARENT_INGRESS = 0xFFFFFFF2  # TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS)
PARENT_EGRESS = 0xFFFFFFF3
CLSACT_HANDLE = 0xFFFF0000
PARENTS = {"ingress": PARENT_INGRESS, "egress": PARENT_EGRESS}
DEFAULT_STATE_FILE = "/run/kipfix/tc-state.json"

TCA_OPTIONS = 2
TCA_BPF_NAME = 7
TCA_BPF_ID = 11


class TcError(Exception):
    """An attach/detach failure a user can act on; the message names what failed."""


class InterfaceNotFound(TcError, LookupError):
    def __init__(self, netns: NetnsRef, ifname: str, elsewhere: str | None = None) -> None:
        self.netns = netns
        self.ifname = ifname
        msg = f"interface {ifname!r} not found in netns {netns}"
        if elsewhere is not None:
            msg = f"interface {ifname!r} is not in netns {netns} (it is in netns {elsewhere})"
        super().__init__(msg)


@dataclass(frozen=True)
class Programs:
    """The two metering programs: fds of loaded SCHED_CLS programs, filter names,
    and the filter classid (the kernel hands it to the program in
    skb->tc_classid; kipfix puts its netns id there, see netnsids.py)."""

    ingress_fd: int | None
    egress_fd: int | None
    ingress_name: str = INGRESS_NAME
    egress_name: str = EGRESS_NAME
    classid: int = 1

    def hooks(self) -> list[tuple[str, int, str]]:
        out = []
        if self.ingress_fd is not None:
            out.append(("ingress", self.ingress_fd, self.ingress_name))
        if self.egress_fd is not None:
            out.append(("egress", self.egress_fd, self.egress_name))
        return out


@dataclass(frozen=True)
class TcAttachment:
    """One kipfix filter found in the kernel."""

    netns: str
    ifname: str
    ifindex: int
    direction: str
    prog_id: int
    prog_name: str


# ---- ownership state ---------------------------------------------------------

class OwnershipState:
    """Which clsact qdiscs kipfix created, keyed by netns cookie and ifindex.

    Each change is a locked read-modify-write of the JSON file, so separate
    processes (daemon, `kipfix meter attach/detach`) see each other's facts.
    """

    def __init__(self, path: str | None = None) -> None:
        self.path = path or os.environ.get("KIPFIX_TC_STATE") or DEFAULT_STATE_FILE

    @staticmethod
    def key(cookie: int, ifindex: int) -> str:
        return f"{cookie}:{ifindex}"

    @contextmanager
    def _locked(self) -> Iterator[dict]:
        directory = os.path.dirname(self.path) or "."
        os.makedirs(directory, mode=0o700, exist_ok=True)
        with open(os.open(self.path + ".lock", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                data = self._read()
                before = json.dumps(data, sort_keys=True)
                yield data
                if json.dumps(data, sort_keys=True) != before:
                    self._write(data, directory)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _read(self) -> dict:
        try:
            with open(self.path) as f:
                data = json.load(f)
        except FileNotFoundError:
            return {"clsact_owned": {}}
        except (OSError, ValueError):
            return {"clsact_owned": {}}  # a damaged file must not block attach/detach
        if not isinstance(data.get("clsact_owned"), dict):
            data["clsact_owned"] = {}
        return data

    def _write(self, data: dict, directory: str) -> None:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tc-state.")  # mode 0600
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, self.path)

    def owned(self, cookie: int, ifindex: int) -> bool:
        with self._locked() as data:
            return self.key(cookie, ifindex) in data["clsact_owned"]

    def set_owned(self, cookie: int, ifindex: int, netns: str, ifname: str) -> None:
        """Record a clsact kipfix created."""
        with self._locked() as data:
            data["clsact_owned"][self.key(cookie, ifindex)] = {
                "netns": netns, "ifname": ifname, "ifindex": ifindex}

    def prune(self, cookie: int, live: "set[int]") -> None:
        """Drop entries of the netns whose interface is gone (``live``: its ifindexes),
        so a reused ifindex is never taken for one kipfix owns."""
        with self._locked() as data:
            owned = data["clsact_owned"]
            prefix = f"{cookie}:"
            for key in [k for k in owned if k.startswith(prefix)]:
                if owned[key].get("ifindex") not in live:
                    del owned[key]

    def forget_netns(self, cookie: int) -> None:
        """The netns is gone: so are its qdiscs."""
        with self._locked() as data:
            prefix = f"{cookie}:"
            for key in [k for k in data["clsact_owned"] if k.startswith(prefix)]:
                del data["clsact_owned"][key]

    def forget(self, cookie: int, ifindex: int) -> bool:
        with self._locked() as data:
            return data["clsact_owned"].pop(self.key(cookie, ifindex), None) is not None

    def entries(self) -> dict:
        with self._locked() as data:
            return dict(data["clsact_owned"])


# ---- filter dump parsing -----------------------------------------------------

def _bpf_options(msg: Any) -> dict[int, bytes]:
    """Raw TCA_OPTIONS attributes of a bpf filter message (pyroute2 0.7 does not
    decode TCA_BPF_ID), as {type: payload}."""
    opts = msg.get_attr("TCA_OPTIONS")
    if opts is None:
        return {}
    data, start, length = opts.data, opts.offset, opts.length
    out: dict[int, bytes] = {}
    pos, end = start + 4, start + length
    while pos + 4 <= end:
        alen, atype = struct.unpack_from("HH", data, pos)
        if alen < 4:
            break
        out[atype & 0x3FFF] = bytes(data[pos + 4:pos + alen])
        pos += (alen + 3) & ~3
    return out


def _filter_info(msg: Any) -> tuple[int, int, str] | None:
    """(prio, prog_id, name) of a bpf filter message, None for other kinds or chain headers."""
    if msg.get_attr("TCA_KIND") != "bpf" or msg["handle"] == 0:
        return None
    opts = _bpf_options(msg)
    name = opts.get(TCA_BPF_NAME, b"").split(b"\0", 1)[0].decode(errors="replace")
    raw_id = opts.get(TCA_BPF_ID)
    prog_id = struct.unpack("I", raw_id[:4])[0] if raw_id and len(raw_id) >= 4 else 0
    return (msg["info"] >> 16) & 0xFFFF, prog_id, name


def _is_chain_header(msg: Any) -> bool:
    """The per-priority summary line the kernel sends before a priority's filters."""
    return msg["handle"] == 0 and msg.get_attr("TCA_OPTIONS") is None


def _is_kipfix(msg: Any) -> bool:
    info = _filter_info(msg)
    return (info is not None and info[0] == PRIO and msg["handle"] == HANDLE
            and info[2].startswith(NAME_PREFIX))


DUMP_RETRIES = 20


def _dump(func: Any, *args: Any, **kwargs: Any) -> list:
    """A netlink dump, repeated when the kernel says it was interrupted by a change."""
    for _ in range(DUMP_RETRIES - 1):
        try:
            return list(func(*args, **kwargs))
        except NetlinkDumpInterrupted:
            continue
    return list(func(*args, **kwargs))


def _dump_filters(ipr: Any, ifindex: int, parent: int) -> list:
    try:
        return _dump(ipr.get_filters, index=ifindex, parent=parent)
    except NetlinkError as err:
        if err.code in (errno.EINVAL, errno.ENOENT, errno.ENODEV):
            return []  # no clsact qdisc (or device gone): no filters
        raise


# ---- operations on an open IPRoute ------------------------------------------------

def attach_link(ipr: Any, netns: NetnsRef, cookie: int, ifindex: int, ifname: str,
                programs: Programs, state: OwnershipState) -> None:
    """Ensure clsact and kipfix's filters on one interface (idempotent)."""
    try:
        ipr.tc("add", "clsact", ifindex)
    except NetlinkError as err:
        if err.code == errno.ENODEV:
            raise InterfaceNotFound(netns, ifname) from None
        if err.code != errno.EEXIST:
            raise TcError(f"interface {ifname!r} in netns {netns}: cannot add clsact qdisc: "
                          f"{os.strerror(err.code)} (does the kernel have "
                          "CONFIG_NET_SCH_INGRESS / clsact?)") from None
    else:
        state.set_owned(cookie, ifindex, str(netns), ifname)
    for direction, fd, name in programs.hooks():
        for msg in _dump_filters(ipr, ifindex, PARENTS[direction]):
            info = _filter_info(msg)
            if (msg["handle"] == HANDLE and (msg["info"] >> 16) == PRIO and not _is_kipfix(msg)):
                other = info[2] if info else msg.get_attr("TCA_KIND")
                raise TcError(f"interface {ifname!r} in netns {netns}: a foreign filter "
                              f"({other or 'unnamed'}) holds kipfix's {direction} slot "
                              f"pref {PRIO} handle {HANDLE:#x}; kipfix leaves it alone")
        try:
            ipr.tc("replace-filter", "bpf", ifindex, HANDLE, fd=fd, name=name,
                   parent=PARENTS[direction], classid=programs.classid, direct_action=True,
                   prio=PRIO)
        except NetlinkError as err:
            if err.code == errno.ENODEV:
                raise InterfaceNotFound(netns, ifname) from None
            raise TcError(f"interface {ifname!r} in netns {netns}: cannot attach {name} on "
                          f"{direction}: {os.strerror(err.code)}") from None


def detach_link(ipr: Any, netns: NetnsRef, cookie: int, ifindex: int, ifname: str,
                state: OwnershipState) -> int:
    """Remove kipfix's filters (and clsact if kipfix made it and it is now empty).

    Returns the number of filters removed. A vanished interface is not an error.
    """
    removed = 0
    remaining = 0
    for direction, parent in PARENTS.items():
        for msg in _dump_filters(ipr, ifindex, parent):
            if _is_chain_header(msg):
                continue
            if not _is_kipfix(msg):
                remaining += 1
                continue
            try:
                ipr.tc("del-filter", "bpf", ifindex, HANDLE, parent=parent, prio=PRIO)
                removed += 1
            except NetlinkError as err:
                if err.code not in (errno.ENOENT, errno.ENODEV, errno.EINVAL):
                    raise TcError(f"interface {ifname!r} in netns {netns}: cannot remove "
                                  f"kipfix filter on {direction}: {os.strerror(err.code)}") from None
    if remaining == 0 and state.owned(cookie, ifindex):
        try:
            ipr.tc("del", "clsact", ifindex)
        except NetlinkError as err:
            if err.code not in (errno.ENOENT, errno.ENODEV, errno.EINVAL):
                raise TcError(f"interface {ifname!r} in netns {netns}: cannot remove clsact: "
                              f"{os.strerror(err.code)}") from None
        state.forget(cookie, ifindex)
    return removed


def link_status(ipr: Any, netns: NetnsRef, ifindex: int, ifname: str) -> list[TcAttachment]:
    out = []
    for direction, parent in PARENTS.items():
        for msg in _dump_filters(ipr, ifindex, parent):
            if _is_kipfix(msg):
                _, prog_id, name = _filter_info(msg)
                out.append(TcAttachment(str(netns), ifname, ifindex, direction, prog_id, name))
    return out


def links(ipr: Any) -> dict[int, str]:
    """ifindex -> name of every interface in the IPRoute's netns."""
    return {m["index"]: m.get_attr("IFLA_IFNAME") for m in _dump(ipr.get_links)}


# ---- one-shot API (CLI) -------------------------------------------------------------

def _locate(ifname: str, skip: NetnsRef) -> str | None:
    """Name a netns (host or named) that holds ``ifname``, for error messages."""
    candidates = [HOST] + [NetnsRef("name", n) for n in named_netns()]
    for ref in candidates:
        if ref == skip:
            continue
        try:
            with iproute(ref) as ipr:
                if ipr.link_lookup(ifname=ifname):
                    return str(ref)
        except (NetnsNotFound, OSError, NetlinkError):
            continue
    return None


def resolve(ipr: Any, netns: NetnsRef, ifname: str) -> int:
    """ifindex of ``ifname`` in the netns, or InterfaceNotFound naming where it is."""
    found = ipr.link_lookup(ifname=ifname)
    if found:
        return found[0]
    raise InterfaceNotFound(netns, ifname, _locate(ifname, netns))


def attach(netns: NetnsRef | str, ifname: str, programs: Programs,
           state_file: str | None = None) -> int:
    """Attach kipfix's programs on ``ifname`` in ``netns``; returns its ifindex.

    Raises NetnsNotFound, InterfaceNotFound or TcError with a one-line message.
    """
    ref = NetnsRef.parse(netns)
    state = OwnershipState(state_file)
    cookie = netns_cookie(ref)
    with iproute(ref) as ipr:
        ifindex = resolve(ipr, ref, ifname)
        state.prune(cookie, set(links(ipr)))
        attach_link(ipr, ref, cookie, ifindex, ifname, programs, state)
    return ifindex


def detach(netns: NetnsRef | str, ifname: str, state_file: str | None = None) -> int:
    """Remove kipfix's filters from ``ifname``; returns how many were removed."""
    ref = NetnsRef.parse(netns)
    state = OwnershipState(state_file)
    cookie = netns_cookie(ref)
    with iproute(ref) as ipr:
        ifindex = resolve(ipr, ref, ifname)
        return detach_link(ipr, ref, cookie, ifindex, ifname, state)


def status(netns: NetnsRef | str = HOST, ifnames: list[str] | tuple[str, ...] = ()) -> list[TcAttachment]:
    """Every kipfix filter in the netns (or on the given interfaces of it)."""
    ref = NetnsRef.parse(netns)
    out: list[TcAttachment] = []
    with iproute(ref) as ipr:
        if ifnames:
            targets = [(resolve(ipr, ref, n), n) for n in ifnames]
        else:
            targets = sorted(links(ipr).items())
        for ifindex, ifname in targets:
            out.extend(link_status(ipr, ref, ifindex, ifname))
    return out
