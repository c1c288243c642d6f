"""Which pods on this node kipfix meters, and in which network namespace.

``PodMetering`` is fed by the pod and namespace watches (``podwatch.py``)
and by the config's ``pods`` selections. ``refresh()`` decides:

- a pod is metered when it runs on this node, is Running with an IP, does
  not use the host's network, and some selection's namespaceSelector (on its
  namespace's labels) and podSelector (on its labels) both match it; the
  interfaces metered are the union of the matching selections' names;
- its netns is found from its IPs (``NetnsFinder``), retried on every
  refresh until found; meanwhile it is an error naming the pod;
- a pod that stops being metered (deleted, finished, relabelled) is
  "ended": the agent drains and flushes its flows (forced end) and forgets
  its attachment.

The attach set is ``attach_selections()``: one InterfaceSelection per metered
pod, by netns path. Errors and warnings (a selection matching no pod) are
per-node report entries, each naming the pod or the selection.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from typing import Any

from ..config import InterfaceSelection, PodSelection
from ..labelselector import selector_matches
from .podnetns import NetnsFinder

log = logging.getLogger("kipfix.pods")


@dataclass
class MeteredPod:
    info: Any  # podmeta.PodInfo
    names: tuple[str, ...]
    netns: str | None = None
    inode: int | None = None

    @property
    def label(self) -> str:
        return f"{self.info.namespace}/{self.info.name}"


def _inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


class PodMetering:
    def __init__(self, node: str, finder: NetnsFinder | None = None):
        self.node = node
        self.finder = finder if finder is not None else NetnsFinder()
        self.selections: tuple[PodSelection, ...] = ()
        self.namespace_labels: dict[str, dict] = {}
        self.pods: dict[str, Any] = {}  # uid -> PodInfo of this node's pods
        self.metered: dict[str, MeteredPod] = {}
        self._ended: list[MeteredPod] = []
        self._lock = threading.RLock()

    # ---- inputs (watch threads) ---------------------------------------------------

    def configure(self, selections: tuple[PodSelection, ...]) -> None:
        with self._lock:
            self.selections = tuple(selections)

    def pod_changed(self, info: Any) -> None:
        with self._lock:
            if info.node == self.node:
                self.pods[info.uid] = info
            else:
                self.pods.pop(info.uid, None)

    def pod_deleted(self, uid: str) -> None:
        with self._lock:
            self.pods.pop(uid, None)

    def namespace_changed(self, name: str, labels: dict | None) -> None:
        """labels None: the namespace was deleted."""
        with self._lock:
            if labels is None:
                self.namespace_labels.pop(name, None)
            else:
                self.namespace_labels[name] = dict(labels)

    def replace_pods(self, infos: list[Any]) -> None:
        """A relist: these are all of the node's pods now."""
        with self._lock:
            self.pods = {i.uid: i for i in infos if i.node == self.node}

    # ---- decisions (agent loop) ---------------------------------------------------

    def _selected_names(self, info: Any) -> tuple[str, ...]:
        if info.host_network or info.phase != "Running" or not info.ips or info.node != self.node:
            return ()
        names: list[str] = []
        ns_labels = self.namespace_labels.get(info.namespace, {})
        for selection in self.selections:
            if (selector_matches(selection.namespace_selector, ns_labels)
                    and selector_matches(selection.pod_selector, dict(info.labels))):
                names += [n for n in selection.names if n not in names]
        return tuple(names)

    def refresh(self) -> bool:
        """Recompute the metered pods and find missing netns; True if the attach set changed."""
        with self._lock:
            before = self.attach_selections()
            wanted = {}
            for uid, info in self.pods.items():
                names = self._selected_names(info)
                if names:
                    wanted[uid] = (info, names)
            for uid in [u for u in self.metered if u not in wanted]:
                pod = self.metered.pop(uid)
                log.info("pod %s is no longer metered: its flows end (forced end)", pod.label)
                if pod.netns is not None:
                    self._ended.append(pod)
            for uid, (info, names) in wanted.items():
                pod = self.metered.get(uid)
                if pod is None:
                    pod = self.metered[uid] = MeteredPod(info, names)
                pod.info, pod.names = info, names
            for pod in self.metered.values():
                if pod.netns is not None and _inode(pod.netns) != pod.inode:
                    log.warning("pod %s: network namespace %s is gone; looking for its new one", pod.label,
                                pod.netns)
                    self._ended.append(MeteredPod(pod.info, pod.names, pod.netns, pod.inode))
                    pod.netns = pod.inode = None
            taken = {p.inode for p in self.metered.values() if p.inode is not None}
            for pod in self.metered.values():
                if pod.netns is None:
                    found = self.finder.find(pod.info.ips, exclude=taken)
                    if found is None:
                        continue
                    pod.netns, pod.inode = found
                    taken.add(pod.inode)
                    log.info("pod %s: network namespace %s (IPs %s); metering %s", pod.label, pod.netns,
                             ", ".join(pod.info.ips), ", ".join(pod.names))
            return self.attach_selections() != before

    def attach_selections(self) -> list[InterfaceSelection]:
        with self._lock:
            return sorted((InterfaceSelection(p.netns, p.names) for p in self.metered.values() if p.netns),
                          key=lambda s: s.netns)

    def take_ended(self) -> list[MeteredPod]:
        """Pods that stopped being metered since the last call (their flows are to be flushed)."""
        with self._lock:
            ended, self._ended = self._ended, []
            return ended

    def unresolved(self) -> list[MeteredPod]:
        with self._lock:
            return [p for p in self.metered.values() if p.netns is None]

    def pod_of_netns(self, netns: str) -> MeteredPod | None:
        with self._lock:
            return next((p for p in self.metered.values() if p.netns == netns), None)

    # ---- report -------------------------------------------------------------------

    def errors(self) -> list[str]:
        return [f"pod {p.label}: network namespace not found (no netns under "
                f"{' or '.join(self.finder.runtime_dirs)} or /proc/*/ns/net holds its IPs "
                f"{', '.join(p.info.ips)}); retrying" for p in self.unresolved()]

    def warnings(self) -> list[str]:
        with self._lock:
            out = []
            for i, selection in enumerate(self.selections):
                if not any(self._matches(selection, info) for info in self.pods.values()):
                    out.append(f"pods[{i}]: {selection.describe()} matches no running pod on node {self.node}")
            return out

    def _matches(self, selection: PodSelection, info: Any) -> bool:
        return (not info.host_network and info.phase == "Running"
                and selector_matches(selection.namespace_selector, self.namespace_labels.get(info.namespace, {}))
                and selector_matches(selection.pod_selector, dict(info.labels)))
