"""Keep kipfix attached to the interfaces the configuration selects.

``AttachmentManager`` holds the desired set -- per network namespace, the
selectors of the config's ``interfaces`` entries -- and makes the kernel
match it:

- ``apply(interfaces)`` attaches every matching interface and detaches the
  ones no longer selected; only the difference changes (SIGHUP reload).
- One background thread follows netlink link events of every watched netns:
  a matching interface that appears (or is re-created, or renamed into a
  match) is attached as soon as its RTM_NEWLINK arrives; one that disappears
  is forgotten without error; one renamed out of the selection is detached.
- A named/path netns that does not exist yet is retried every second; one
  that disappears is forgotten (and watched for again).
- ``detach_all()`` removes everything at shutdown; ``close()`` only stops
  the thread and closes sockets (for --keep-attached).

A failure on one interface (or netns) is logged, counted in ``errors`` and
passed to ``on_error``; it never raises out of the manager and never
disturbs the other attachments.

Each netns gets a small numeric id from ``NetnsIds``; it is put in the tc
filter's classid so the program can key flows by netns, and
``ifname(netns_id, ifindex)`` turns a flow's (netns id, ifindex) back into
an interface name for the records.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import select
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, NamedTuple

from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import RTMGRP_LINK

from ..flows.record import observation_point_id
from . import tc
from .ifselect import Selector, matches_any
from .netns import NetnsNotFound, NetnsRef, netns_cookie, open_iproute
from .netnsids import NetnsIds, classid

log = logging.getLogger("kipfix.attach")

RECHECK_INTERVAL = 1.0  # seconds between netns existence checks
RECENT_NAMES = 4096  # names of departed interfaces kept for flows drained later
# A netns id is given back this long after its netns left (gone or unconfigured),
# so flows of it still in the kernel table or the flow cache keep their label.
ID_RELEASE_DELAY = 900.0


class Attached(NamedTuple):
    netns: str
    ifname: str
    ifindex: int


@dataclass(frozen=True)
class AttachError:
    netns: str
    ifname: str
    message: str
    time: float = field(default_factory=time.time)

    def __str__(self) -> str:
        return self.message


def group_selections(interfaces: Iterable[Any]) -> dict[NetnsRef, tuple[Selector, ...]]:
    """Config ``interfaces`` (objects with .netns/.names/.exclude, or
    (netns, Selector) pairs) grouped by netns."""
    out: dict[NetnsRef, list[Selector]] = {}
    for item in interfaces:
        if isinstance(item, tuple):
            netns, selector = item
        else:
            netns, selector = item.netns, Selector(tuple(item.names), tuple(item.exclude))
        out.setdefault(NetnsRef.parse(netns), []).append(selector)
    return {ref: tuple(sels) for ref, sels in out.items()}


class _Watch:
    """One watched netns: its sockets and what kipfix attached in it."""

    def __init__(self, ref: NetnsRef, selectors: tuple[Selector, ...], inode: int, netns_id: int,
                 cookie: int, programs: tc.Programs, monitor: Any, command: Any) -> None:
        self.ref = ref
        self.selectors = selectors
        self.inode = inode
        self.netns_id = netns_id
        self.cookie = cookie
        self.programs = programs
        self.monitor = monitor
        self.command = command
        self.attached: dict[int, str] = {}
        self.failed: dict[int, str] = {}  # retried every recheck, reported once

    def close(self) -> None:
        for sock in (self.monitor, self.command):
            try:
                sock.close()
            except Exception:  # closing must not fail shutdown
                pass


class AttachmentManager:
    def __init__(self, meter: Any, netns_ids: NetnsIds, *, state_file: str | None = None,
                 on_error: Callable[[AttachError], None] | None = None,
                 recheck_interval: float = RECHECK_INTERVAL,
                 id_release_delay: float = ID_RELEASE_DELAY,
                 ingress_name: str = tc.INGRESS_NAME, egress_name: str = tc.EGRESS_NAME) -> None:
        self.meter = meter
        self.netns_ids = netns_ids
        self.state = tc.OwnershipState(state_file)
        self.on_error = on_error
        self.recheck_interval = recheck_interval
        self.id_release_delay = id_release_delay
        self._release_at: dict[int, float] = {}
        self.ingress_name = ingress_name
        self.egress_name = egress_name
        self.errors: collections.deque[AttachError] = collections.deque(maxlen=1000)
        self.error_count = 0
        self.generation = 0  # bumped whenever an interface is attached or let go
        self._lock = threading.RLock()
        self._desired: dict[NetnsRef, tuple[Selector, ...]] = {}
        self._watches: dict[NetnsRef, _Watch] = {}
        self._missing: set[NetnsRef] = set()
        self._recent: collections.OrderedDict[tuple[int, int], str] = collections.OrderedDict()
        self._stop = threading.Event()
        self._closed = False
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._run, name="kipfix-links", daemon=True)
        self._thread.start()

    # ---- public API ----------------------------------------------------------------

    def apply(self, interfaces: Iterable[Any]) -> None:
        """Make the desired set ``interfaces``; changes only what differs."""
        new = group_selections(interfaces)
        with self._lock:
            if self._closed:
                raise RuntimeError("AttachmentManager.apply() after close()")
            for ref in list(self._desired):
                if ref not in new:
                    self._drop(ref, detach=True)
            for ref, selectors in new.items():
                watch = self._watches.get(ref)
                if watch is None:
                    self._missing.discard(ref)
                    self._desired[ref] = selectors
                    self._start(ref, report=True)
                elif watch.selectors != selectors:
                    self._desired[ref] = selectors
                    watch.selectors = selectors
                    self._reconcile(watch, report_missing=True)
        self._wake()

    def attached(self) -> list[Attached]:
        with self._lock:
            return sorted(Attached(str(w.ref), name, idx)
                          for w in self._watches.values() for idx, name in w.attached.items())

    def interface_names(self, netns: NetnsRef | str = "") -> dict[int, str]:
        """ifindex -> name of the interfaces attached in one netns."""
        ref = NetnsRef.parse(netns)
        with self._lock:
            watch = self._watches.get(ref)
            return dict(watch.attached) if watch else {}

    def ifname(self, netns_id: int, ifindex: int) -> str:
        """Name of an interface a flow was metered on ("" if never seen)."""
        with self._lock:
            for watch in self._watches.values():
                if watch.netns_id == netns_id and ifindex in watch.attached:
                    return watch.attached[ifindex]
            return self._recent.get((netns_id, ifindex), "")

    def known_names(self) -> dict[tuple[int, int], str]:
        """(netns id, ifindex) -> name of every interface attached now or lately (for the journal:
        flows of an interface that goes while the agent is down keep their name)."""
        with self._lock:
            names = dict(self._recent)
            for watch in self._watches.values():
                for ifindex, name in watch.attached.items():
                    names[(watch.netns_id, ifindex)] = name
            return names

    def remember_names(self, names: dict[tuple[int, int], str]) -> None:
        """Names a previous agent knew (from the journal), for flows drained or cached from then."""
        with self._lock:
            for (netns_id, ifindex), name in names.items():
                if (netns_id, ifindex) not in self._recent:
                    self._remember(netns_id, ifindex, name)

    def observation_points(self) -> list[tuple[int, int, str, str]]:
        """(observationPointId, ifindex, name, netns label) of every attached interface."""
        with self._lock:
            return sorted((observation_point_id(w.netns_id, idx), idx, name, self.netns_ids.label(w.netns_id))
                          for w in self._watches.values() for idx, name in w.attached.items())

    def netns_id(self, netns: NetnsRef | str) -> int | None:
        with self._lock:
            watch = self._watches.get(NetnsRef.parse(netns))
            return watch.netns_id if watch else None

    def veth_peer(self, netns: NetnsRef | str, ifindex: int,
                  among: Iterable[NetnsRef | str]) -> tuple[int, int] | None:
        """(netns id, ifindex) of the other end of the veth ``ifindex`` in ``netns``,
        if that end is attached in one of the netns ``among``."""
        with self._lock:
            watch = self._watches.get(NetnsRef.parse(netns))
            if watch is None:
                return None
            try:
                link = watch.command.get_links(ifindex)[0]
            except Exception:  # noqa: BLE001 -- gone meanwhile: no pair
                return None
            peer_index, peer_nsid = link.get_attr("IFLA_LINK"), link.get_attr("IFLA_LINK_NETNSID")
            if peer_index is None or peer_index == ifindex:
                return None
            for ref in map(NetnsRef.parse, among):
                other = self._watches.get(ref)
                if other is None or other is watch or peer_index not in other.attached or peer_nsid is None:
                    continue
                try:
                    fd = ref.open()
                except NetnsNotFound:
                    continue
                try:
                    # the nsid by which ``netns`` knows ``ref``: is it the peer's?
                    found = watch.command.get_netnsid(fd=fd) or {}
                except Exception:  # noqa: BLE001
                    found = {}
                finally:
                    os.close(fd)
                if found.get("nsid") == peer_nsid:
                    return other.netns_id, peer_index
            return None

    def release_soon(self, netns_id: int) -> None:
        """Give the id back at the next recheck (if no watched netns uses it): its flows are all out."""
        with self._lock:
            self._release_at[netns_id] = time.monotonic()

    def detach_all(self) -> None:
        """Detach every kipfix filter this manager attached and forget the desired set."""
        with self._lock:
            for ref in list(self._watches):
                self._drop(ref, detach=True)
            self._desired.clear()
            self._missing.clear()
        self._wake()

    def close(self) -> None:
        """Stop following events and close sockets; attachments stay in the kernel.

        Safe to call more than once."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._stop.set()
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        with self._lock:
            for watch in self._watches.values():
                watch.close()
            self._watches.clear()
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

    def __enter__(self) -> "AttachmentManager":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- watches ---------------------------------------------------------------------

    def _start(self, ref: NetnsRef, report: bool) -> bool:
        """Open sockets in the netns, then attach what matches. False if it is missing."""
        monitor = command = None
        try:
            inode = ref.inode()
            if inode is None:
                raise NetnsNotFound(ref)
            cookie = netns_cookie(ref)
            monitor = open_iproute(ref)
            monitor.bind(groups=RTMGRP_LINK)  # before the dump: no link event slips between
            command = open_iproute(ref)
            netns_id = self.netns_ids.assign(inode, str(ref))
        except NetnsNotFound as err:
            for sock in (monitor, command):
                if sock is not None:
                    sock.close()
            self._missing.add(ref)
            if report:
                self._error(str(ref), "", f"{err}; kipfix attaches when it appears")
            return False
        except Exception as err:  # noqa: BLE001 -- one bad netns must not stop the others
            for sock in (monitor, command):
                if sock is not None:
                    sock.close()
            self._missing.add(ref)
            if report:
                self._error(str(ref), "", f"netns {ref}: cannot watch interfaces: {err}")
            return False
        programs = tc.Programs(self.meter.ingress_fd, self.meter.egress_fd, self.ingress_name,
                               self.egress_name, classid=classid(netns_id))
        watch = _Watch(ref, self._desired[ref], inode, netns_id, cookie, programs, monitor, command)
        self._watches[ref] = watch
        self._missing.discard(ref)
        self._reconcile(watch, report_missing=True)
        return True

    def _drop(self, ref: NetnsRef, detach: bool) -> None:
        watch = self._watches.pop(ref, None)
        self._desired.pop(ref, None)
        self._missing.discard(ref)
        if watch is None:
            return
        self.generation += 1
        if detach and not ref.is_host and ref.inode() != watch.inode:
            detach = False  # the netns is gone (a deleted pod's), and its filters with it
            try:
                self.state.forget_netns(watch.cookie)
            except OSError:
                pass
        if detach:
            for ifindex in list(watch.attached):
                self._detach(watch, ifindex)
        for ifindex, name in watch.attached.items():
            self._remember(watch.netns_id, ifindex, name)
        watch.close()
        self._release_at[watch.netns_id] = time.monotonic() + self.id_release_delay

    def _forget_netns(self, watch: _Watch) -> None:
        """The netns went away: forget it without error and look for it again."""
        self.generation += 1
        log.info("netns %s disappeared: forgetting its %d attached interfaces", watch.ref,
                 len(watch.attached))
        for ifindex, name in watch.attached.items():
            self._remember(watch.netns_id, ifindex, name)
        self._watches.pop(watch.ref, None)
        watch.close()
        self._release_at[watch.netns_id] = time.monotonic() + self.id_release_delay
        try:
            self.state.forget_netns(watch.cookie)
        except OSError:
            pass
        self._missing.add(watch.ref)

    def _remember(self, netns_id: int, ifindex: int, name: str) -> None:
        self._recent[(netns_id, ifindex)] = name
        self._recent.move_to_end((netns_id, ifindex))
        while len(self._recent) > RECENT_NAMES:
            self._recent.popitem(last=False)

    # ---- per interface ---------------------------------------------------------------

    def _reconcile(self, watch: _Watch, report_missing: bool = False) -> None:
        try:
            current = tc.links(watch.command)
        except Exception as err:  # noqa: BLE001
            self._error(str(watch.ref), "", f"netns {watch.ref}: cannot list interfaces: {err}")
            return
        try:
            self.state.prune(watch.cookie, set(current))
        except OSError as err:
            log.warning("cannot update %s: %s", self.state.path, err)
        for ifindex in list(watch.attached):
            if ifindex not in current:
                self._gone(watch, ifindex)
        for ifindex, name in sorted(current.items()):
            self._link_seen(watch, ifindex, name)
        if report_missing:
            present = set(current.values())
            for selector in watch.selectors:
                for name in selector.exact_names:
                    if name not in present:
                        where = tc._locate(name, watch.ref)
                        msg = str(tc.InterfaceNotFound(watch.ref, name, where))
                        self._error(str(watch.ref), name, f"{msg}; kipfix attaches it when it appears")

    def _link_seen(self, watch: _Watch, ifindex: int, name: str) -> None:
        wanted = matches_any(watch.selectors, name)
        known = watch.attached.get(ifindex)
        if wanted and known is None:
            self._attach(watch, ifindex, name)
        elif wanted and known != name:
            log.info("interface %s (ifindex %d) in netns %s renamed to %s", known, ifindex,
                     watch.ref, name)
            watch.attached[ifindex] = name
        elif not wanted and known is not None:
            self._detach(watch, ifindex)
        if not wanted:
            watch.failed.pop(ifindex, None)

    def _attach(self, watch: _Watch, ifindex: int, name: str) -> None:
        try:
            tc.attach_link(watch.command, watch.ref, watch.cookie, ifindex, name, watch.programs,
                           self.state)
        except tc.InterfaceNotFound:
            watch.failed.pop(ifindex, None)
            return  # vanished between the event and the attach: its DELLINK follows
        except Exception as err:  # noqa: BLE001 -- counted and reported, never raised
            if watch.failed.get(ifindex) != name:
                self._error(str(watch.ref), name, f"{err} (retrying)")
            watch.failed[ifindex] = name
            return
        if watch.failed.pop(ifindex, None) is not None:
            log.info("attached kipfix to %s in netns %s after earlier failures", name, watch.ref)
        watch.attached[ifindex] = name
        self.generation += 1
        log.info("attached kipfix to %s (ifindex %d) in netns %s", name, ifindex, watch.ref)

    def _detach(self, watch: _Watch, ifindex: int) -> None:
        name = watch.attached.pop(ifindex, "")
        self.generation += 1
        self._remember(watch.netns_id, ifindex, name)
        try:
            tc.detach_link(watch.command, watch.ref, watch.cookie, ifindex, name, self.state)
        except Exception as err:  # noqa: BLE001
            self._error(str(watch.ref), name, str(err))
            return
        log.info("detached kipfix from %s (ifindex %d) in netns %s", name, ifindex, watch.ref)

    def _gone(self, watch: _Watch, ifindex: int) -> None:
        watch.failed.pop(ifindex, None)
        name = watch.attached.pop(ifindex, None)
        if name is None:
            return
        self.generation += 1
        self._remember(watch.netns_id, ifindex, name)
        try:
            self.state.forget(watch.cookie, ifindex)  # its clsact died with it
        except OSError:
            pass
        log.info("interface %s (ifindex %d) in netns %s disappeared", name, ifindex, watch.ref)

    def _error(self, netns: str, ifname: str, message: str) -> None:
        err = AttachError(netns, ifname, message)
        self.errors.append(err)
        self.error_count += 1
        log.warning("%s", message)
        if self.on_error is not None:
            try:
                self.on_error(err)
            except Exception:  # noqa: BLE001 -- a broken callback must not break attaching
                log.exception("attachment error callback failed")

    # ---- the event thread ------------------------------------------------------------

    def _wake(self) -> None:
        if self._closed:
            return
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._loop()
            except Exception:  # noqa: BLE001 -- the thread must outlive any one bug
                log.exception("interface event loop failed; restarting it")
                self._stop.wait(1.0)

    def _loop(self) -> None:
        next_check = time.monotonic() + self.recheck_interval
        while not self._stop.is_set():
            with self._lock:
                by_fd = {w.monitor.fileno(): w for w in self._watches.values()}
            timeout = max(0.0, next_check - time.monotonic())
            poller = select.poll()  # not select(): fds above 1024 with many netns
            for fd in (self._wake_r, *by_fd):
                poller.register(fd, select.POLLIN)
            try:
                ready = [fd for fd, mask in poller.poll(timeout * 1000)
                         if mask & (select.POLLIN | select.POLLERR)]
            except OSError:
                ready = []
            if self._stop.is_set():
                return
            for fd in ready:
                if fd == self._wake_r:
                    try:
                        os.read(self._wake_r, 4096)
                    except OSError:
                        pass
                    continue
                with self._lock:
                    watch = by_fd[fd]
                    if self._watches.get(watch.ref) is watch:
                        self._events(watch)
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + self.recheck_interval
                with self._lock:
                    self._recheck()

    def _events(self, watch: _Watch) -> None:
        try:
            messages = watch.monitor.get()
        except (OSError, NetlinkError) as err:
            code = getattr(err, "errno", None) or getattr(err, "code", None)
            if code == errno.ENOBUFS:
                log.warning("netns %s: netlink events overflowed; re-reading interfaces", watch.ref)
                self._reconcile(watch)
            return
        for msg in messages:
            event = msg.get("event")
            ifindex = msg.get("index")
            if event == "RTM_NEWLINK":
                name = msg.get_attr("IFLA_IFNAME")
                if name:
                    self._link_seen(watch, ifindex, name)
            elif event == "RTM_DELLINK":
                self._gone(watch, ifindex)

    def _recheck(self) -> None:
        """Notice netns that vanished or were replaced, and ones that appeared."""
        for watch in list(self._watches.values()):
            if not watch.ref.is_host and watch.ref.inode() != watch.inode:
                self._forget_netns(watch)
                continue
            for ifindex, name in list(watch.failed.items()):
                self._attach(watch, ifindex, name)
        for ref in list(self._missing):
            if ref in self._desired and ref not in self._watches and ref.inode() is not None:
                if self._start(ref, report=False):
                    log.info("netns %s appeared: watching it", ref)
        now = time.monotonic()
        in_use = {w.netns_id for w in self._watches.values()}
        for netns_id, deadline in list(self._release_at.items()):
            if netns_id in in_use:
                del self._release_at[netns_id]
            elif now >= deadline:
                del self._release_at[netns_id]
                try:
                    self.netns_ids.release(netns_id)
                except Exception:  # noqa: BLE001 -- bookkeeping only
                    log.exception("cannot release netns id %d", netns_id)
