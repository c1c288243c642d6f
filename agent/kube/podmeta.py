"""Kubernetes pod metadata for flows: what a Pod is, and which pod owns an IP address.

``pod_info(obj)`` reads a Pod as the API returns it (JSON dict, camelCase
keys) into a ``PodInfo``; ``PodIndex`` maps pod IP addresses to pods, for
the IPFIX packer (source/destination pod name, namespace, node, workload).
The pod watch (podwatch.py) feeds the index; the index itself never talks
to the API server.

Workload (``workload_kind``, ``workload_name``) is the pod's controller
owner reference, with one step resolved without an API call: a ReplicaSet
named ``<deployment>-<hash>`` whose pod carries ``pod-template-hash: <hash>``
is reported as that Deployment. Everything else is reported as the owner
reference says (DaemonSet, StatefulSet, ReplicaSet, Job, Node for static
pods, custom kinds). Jobs stay Jobs: a CronJob's Job is named
``<cronjob>-<digits>``, but so can any Job be, so the name proves nothing.
A pod without a controller (a bare pod) has kind "" and name "".

Indexing rules:
- hostNetwork pods are not indexed by IP: their IP is the node's, shared by
  every host-network pod and the node itself, so it names no single pod.
- Pods in phase Succeeded or Failed release their IPs (the runtime has torn
  down their sandbox; the IP may already belong to a new pod).
- Pods being deleted (deletionTimestamp set) keep their IPs until removed:
  they still send during their grace period. But a deleting pod never takes
  an IP from a pod that is not being deleted.
- Otherwise the latest upsert claiming an IP owns it; removing or updating
  a pod that lost an IP to another never releases the new owner's IP.
- A pod that takes an IP over from another does so from the moment it is
  upserted: flows that ended before then still belong to the previous owner
  (``Succession``), until that pod is removed. A deleted pod's last flows
  are often exported after its IP went to a new pod; without this they
  would carry the new pod's name.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable

EMPTY_META: tuple[bytes, bytes, bytes, bytes, bytes] = (b"", b"", b"", b"", b"")
DONE_PHASES = frozenset(("Succeeded", "Failed"))
_MAPPED_PREFIX = bytes(10) + b"\xff\xff"


@dataclass(frozen=True)
class PodInfo:
    """One pod, as much as flows need. ``labels`` are sorted (key, value) pairs."""

    uid: str
    name: str
    namespace: str
    node: str = ""
    ips: tuple[str, ...] = ()
    workload_kind: str = ""
    workload_name: str = ""
    labels: tuple[tuple[str, str], ...] = ()
    phase: str = ""
    host_network: bool = False
    deleting: bool = False

    @property
    def indexed_ips(self) -> tuple[str, ...]:
        """The IPs a PodIndex maps to this pod (none for hostNetwork or finished pods)."""
        if self.host_network or self.phase in DONE_PHASES:
            return ()
        return self.ips

    def encoded(self) -> tuple[bytes, bytes, bytes, bytes, bytes]:
        """(name, namespace, node, workload name, workload kind) as UTF-8, the IPFIX element values."""
        return (self.name.encode(), self.namespace.encode(), self.node.encode(), self.workload_name.encode(),
                self.workload_kind.encode())


def _workload(metadata: dict) -> tuple[str, str]:
    """(kind, name) of the pod's controller, a Deployment for a Deployment's ReplicaSet."""
    owner = next((o for o in metadata.get("ownerReferences") or () if o.get("controller")), None)
    if owner is None:
        return "", ""
    kind, name = owner.get("kind") or "", owner.get("name") or ""
    if kind == "ReplicaSet":
        template_hash = (metadata.get("labels") or {}).get("pod-template-hash")
        if template_hash and name.endswith("-" + template_hash) and len(name) > len(template_hash) + 1:
            return "Deployment", name[:-len(template_hash) - 1]
    return kind, name


def _addresses(status: dict) -> tuple[str, ...]:
    """status.podIPs (dual stack), else status.podIP; canonical text, invalid ones left out."""
    texts = [entry.get("ip") for entry in status.get("podIPs") or () if isinstance(entry, dict)]
    if not texts and status.get("podIP"):
        texts = [status["podIP"]]
    result: list[str] = []
    for text in texts:
        try:
            address = str(ipaddress.ip_address(text))
        except ValueError:
            continue
        if address not in result:
            result.append(address)
    return tuple(result)


def pod_info(obj: dict) -> PodInfo:
    """PodInfo from a Pod as the API's JSON dict."""
    metadata = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    kind, name = _workload(metadata)
    labels = metadata.get("labels") or {}
    return PodInfo(
        uid=metadata.get("uid") or "", name=metadata.get("name") or "", namespace=metadata.get("namespace") or "",
        node=spec.get("nodeName") or "", ips=_addresses(status), workload_kind=kind, workload_name=name,
        labels=tuple(sorted((str(k), str(v)) for k, v in labels.items())), phase=status.get("phase") or "",
        host_network=bool(spec.get("hostNetwork")), deleting=bool(metadata.get("deletionTimestamp")))


Encoded = tuple[bytes, bytes, bytes, bytes, bytes]
Claim = tuple[int, str, Encoded]  # (since, wall-clock ns; uid; encoded values)
MAX_CLAIMS = 8  # per IP: owners older than the last few are long exported


class Succession:
    """The recent owners of one IP, oldest first; immutable (a change publishes a new one).

    Called with a flow's end time (wall-clock ns) it gives the encoded
    values of the pod that owned the IP then: the latest claim made at or
    before that time, else the oldest known.
    """

    __slots__ = ("claims",)

    def __init__(self, claims: tuple[Claim, ...]):
        self.claims = claims

    def __call__(self, end_ns: int) -> Encoded:
        for since, _, encoded in reversed(self.claims):
            if end_ns >= since:
                return encoded
        return self.claims[0][2]

    def __repr__(self) -> str:
        return f"Succession({[(since, uid) for since, uid, _ in self.claims]})"


def _keys(address: str) -> tuple[bytes, ...]:
    """Packed forms a flow key may carry: 4 octets and IPv4-mapped 16 octets for IPv4, 16 for IPv6."""
    packed = ipaddress.ip_address(address).packed
    return (packed, _MAPPED_PREFIX + packed) if len(packed) == 4 else (packed,)


class PodIndex:
    """Pods by uid and by IP address; thread-safe (writers lock, readers need not).

    ``len()`` is the number of pods known (indexed by IP or not).
    ``encoded_by_address`` maps every indexed packed address (IPv4 as 4
    octets and as IPv4-mapped 16 octets, IPv6 as 16) to the owning pod's
    encoded element values, or to a ``Succession`` when the IP changed
    owner lately. The IPFIX packer reads it with ``dict.get`` and no lock,
    which is safe because writers change it in place, one key at a time,
    and never change a published value.
    """

    def __init__(self, pods: Iterable[PodInfo] = (), clock: Callable[[], int] = time.time_ns):
        self._lock = threading.Lock()
        self._clock = clock
        self._pods: dict[str, PodInfo] = {}
        self._claims: dict[str, tuple[Claim, ...]] = {}  # IP (canonical text) -> its owners, current last
        self._claimed: dict[str, tuple[str, ...]] = {}  # uid -> IPs it owns
        self._former: dict[str, set[str]] = {}  # uid -> IPs it owned before another pod took them
        self.encoded_by_address: dict[bytes, Encoded | Succession] = {}
        for info in pods:
            self.upsert(info)

    def __len__(self) -> int:
        return len(self._pods)

    def __call__(self, packed: bytes, end_ns: int | None = None) -> Encoded:
        """Encoded values of the pod owning ``packed`` at ``end_ns`` (None: now), or EMPTY_META."""
        value = self.encoded_by_address.get(packed, EMPTY_META)
        if type(value) is tuple:
            return value
        return value(end_ns) if end_ns is not None else value.claims[-1][2]

    def get(self, uid: str) -> PodInfo | None:
        return self._pods.get(uid)

    def lookup(self, packed: bytes) -> PodInfo | None:
        """The pod owning ``packed`` now (4 or 16 octets, IPv4-mapped accepted), or None."""
        if len(packed) == 16 and packed.startswith(_MAPPED_PREFIX):
            packed = packed[12:]
        try:
            address = str(ipaddress.ip_address(packed))
        except ValueError:
            return None
        with self._lock:
            claims = self._claims.get(address)
            return self._pods.get(claims[-1][1]) if claims else None

    def pods(self) -> list[PodInfo]:
        with self._lock:
            return list(self._pods.values())

    def upsert(self, info: PodInfo) -> None:
        """Add or update a pod (by uid); its IPs follow the indexing rules of this module."""
        with self._lock:
            self._pods[info.uid] = info
            encoded = info.encoded()
            wanted = info.indexed_ips
            for address in self._claimed.get(info.uid, ()):
                if address not in wanted:
                    self._release(address, info.uid)
            claimed = []
            for address in wanted:
                claims = self._claims.get(address, ())
                owner = claims[-1][1] if claims else None
                if owner == info.uid:
                    if claims[-1][2] != encoded:
                        self._publish(address, claims[:-1] + ((claims[-1][0], info.uid, encoded),))
                else:
                    if owner is not None:
                        current = self._pods.get(owner)
                        if info.deleting and current is not None and not current.deleting:
                            continue  # a pod on its way out does not take the IP of a live one
                        self._claimed[owner] = tuple(a for a in self._claimed.get(owner, ()) if a != address)
                        self._former.setdefault(owner, set()).add(address)
                    self._publish(address, (*claims, (self._clock(), info.uid, encoded))[-MAX_CLAIMS:])
                claimed.append(address)
            if claimed:
                self._claimed[info.uid] = tuple(claimed)
            else:
                self._claimed.pop(info.uid, None)

    def remove(self, uid: str) -> PodInfo | None:
        """Forget a pod; IPs it no longer owns (reused by another pod) stay with their owner."""
        with self._lock:
            info = self._pods.pop(uid, None)
            for address in self._claimed.pop(uid, ()):
                self._release(address, uid)
            for address in self._former.pop(uid, ()):
                claims = self._claims.get(address, ())
                kept = tuple(c for c in claims if c[1] != uid)
                if kept and kept != claims:
                    self._publish(address, kept)
            return info

    def replace_all(self, pods: Iterable[PodInfo]) -> None:
        """Make the index hold exactly ``pods`` (after a re-list); pods still there keep their IPs."""
        pods = list(pods)
        keep = {p.uid for p in pods}
        for uid in [u for u in list(self._pods) if u not in keep]:
            self.remove(uid)
        for info in pods:
            self.upsert(info)

    def _publish(self, address: str, claims: tuple[Claim, ...]) -> None:
        self._claims[address] = claims
        value = claims[0][2] if len(claims) == 1 else Succession(claims)
        for key in _keys(address):
            self.encoded_by_address[key] = value

    def _release(self, address: str, uid: str) -> None:
        """The owner gives the IP up: nobody owns it, and its history goes too."""
        claims = self._claims.get(address)
        if not claims or claims[-1][1] != uid:
            return
        del self._claims[address]
        for key in _keys(address):
            self.encoded_by_address.pop(key, None)


PodLookup = Callable[[bytes], tuple[bytes, bytes, bytes, bytes, bytes]]

__all__ = ["EMPTY_META", "PodIndex", "PodInfo", "PodLookup", "Succession", "pod_info"]
