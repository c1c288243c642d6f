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
"""

from __future__ import annotations

import ipaddress
import threading
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


def _keys(address: str) -> tuple[bytes, ...]:
    """Packed forms a flow key may carry: 4 octets and IPv4-mapped 16 octets for IPv4, 16 for IPv6."""
    packed = ipaddress.ip_address(address).packed
    return (packed, _MAPPED_PREFIX + packed) if len(packed) == 4 else (packed,)


class PodIndex:
    """Pods by uid and by IP address; thread-safe (writers lock, readers need not).

    ``len()`` is the number of pods known (indexed by IP or not).
    ``encoded_by_address`` maps every indexed packed address (IPv4 as 4
    octets and as IPv4-mapped 16 octets, IPv6 as 16) to the pod's encoded
    element values: the IPFIX packer reads it with ``dict.get`` and no
    lock, which is safe because writers change it in place, one key at a time.
    Calling the index, ``index(packed)``, gives the same or EMPTY_META.
    """

    def __init__(self, pods: Iterable[PodInfo] = ()):
        self._lock = threading.Lock()
        self._pods: dict[str, PodInfo] = {}
        self._owner: dict[str, str] = {}  # IP (canonical text) -> uid
        self._claimed: dict[str, tuple[str, ...]] = {}  # uid -> IPs it owns
        self.encoded_by_address: dict[bytes, tuple[bytes, bytes, bytes, bytes, bytes]] = {}
        for info in pods:
            self.upsert(info)

    def __len__(self) -> int:
        return len(self._pods)

    def __call__(self, packed: bytes) -> tuple[bytes, bytes, bytes, bytes, bytes]:
        return self.encoded_by_address.get(packed, EMPTY_META)

    def get(self, uid: str) -> PodInfo | None:
        return self._pods.get(uid)

    def lookup(self, packed: bytes) -> PodInfo | None:
        """The pod owning ``packed`` (4 or 16 octets, IPv4-mapped accepted), or None."""
        if len(packed) == 16 and packed.startswith(_MAPPED_PREFIX):
            packed = packed[12:]
        try:
            address = str(ipaddress.ip_address(packed))
        except ValueError:
            return None
        with self._lock:
            uid = self._owner.get(address)
            return self._pods.get(uid) if uid is not None else None

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
                owner = self._owner.get(address)
                if owner is not None and owner != info.uid and info.deleting:
                    current = self._pods.get(owner)
                    if current is not None and not current.deleting:
                        continue  # a pod on its way out does not take the IP of a live one
                if owner is not None and owner != info.uid:
                    self._claimed[owner] = tuple(a for a in self._claimed.get(owner, ()) if a != address)
                self._owner[address] = info.uid
                for key in _keys(address):
                    self.encoded_by_address[key] = encoded
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
            return info

    def replace_all(self, pods: Iterable[PodInfo]) -> None:
        """Make the index hold exactly ``pods`` (after a re-list); pods still there keep their IPs."""
        pods = list(pods)
        keep = {p.uid for p in pods}
        for uid in [u for u in list(self._pods) if u not in keep]:
            self.remove(uid)
        for info in pods:
            self.upsert(info)

    def _release(self, address: str, uid: str) -> None:
        if self._owner.get(address) != uid:
            return
        del self._owner[address]
        for key in _keys(address):
            self.encoded_by_address.pop(key, None)


PodLookup = Callable[[bytes], tuple[bytes, bytes, bytes, bytes, bytes]]

__all__ = ["EMPTY_META", "PodIndex", "PodInfo", "PodLookup", "pod_info"]
