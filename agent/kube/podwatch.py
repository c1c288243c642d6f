"""Watches of pods and namespaces for ``kipfix agent --kubernetes``.

Three list+watch loops, each relisting after 410 Gone or an error:

- this node's pods (fieldSelector ``spec.nodeName=NODE``): what the agent
  meters inside (``PodMetering``) and, for every pod, the IP -> pod index;
- namespaces: their labels, for ``pods[].namespaceSelector``;
- every pod of the cluster, only while a template uses a pod metadata
  element: so the other end of a flow is named even when it runs on
  another node (and flows in the host netns are enriched too).

Handlers run in the watch threads; ``on_change`` tells the agent to apply
what changed between two drains. A deleted pod stays in the index a while
(``sweep``): its last flows are flushed at the next drain and must still
carry its name. A new pod with the same IP takes the IP over at once, for
flows that end from then on (podmeta.Succession).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

from ..contract import REQUEST_TIMEOUT
from .podmeta import PodIndex, pod_info
from .podmetering import PodMetering

log = logging.getLogger("kipfix.podwatch")

RETRY_SECONDS = 2.0
WATCH_SECONDS = 300


class ListWatch:
    """List, then watch from that resourceVersion; ``on_list(items)`` and ``on_event(type, obj)`` get dicts."""

    def __init__(self, api: Any, list_call: Callable, what: str, on_list: Callable[[list[dict]], None],
                 on_event: Callable[[str, dict], None], stopping: threading.Event, **kwargs: Any):
        self.api, self.list_call, self.what, self.kwargs = api, list_call, what, kwargs
        self.on_list, self.on_event, self.stopping = on_list, on_event, stopping
        self.synced = threading.Event()
        self._stream: Any = None
        self.thread = threading.Thread(target=self._run, name=f"watch {what}", daemon=True)

    def start(self) -> "ListWatch":
        self.thread.start()
        return self

    def stop(self) -> None:
        stream = self._stream
        if stream is not None:
            stream.stop()

    def _dict(self, obj: Any) -> dict:
        return obj if isinstance(obj, dict) else self.api.sanitize_for_serialization(obj)

    def _run(self) -> None:
        from kubernetes import watch
        from kubernetes.client.rest import ApiException

        while not self.stopping.is_set():
            try:
                listed = self.list_call(**self.kwargs)
                self.on_list([self._dict(item) for item in listed.items])
                self.synced.set()
                version = listed.metadata.resource_version
                while not self.stopping.is_set():
                    self._stream = watch.Watch()
                    for event in self._stream.stream(self.list_call, resource_version=version,
                                                     timeout_seconds=WATCH_SECONDS, allow_watch_bookmarks=True,
                                                     _request_timeout=(REQUEST_TIMEOUT[0], WATCH_SECONDS + 30),
                                                     **self.kwargs):
                        if self.stopping.is_set():
                            self._stream.stop()
                            break
                        kind, obj = event["type"], event["object"]
                        if kind == "ERROR":
                            code = obj.get("code") if isinstance(obj, dict) else getattr(obj, "code", None)
                            raise ApiException(status=code or 500, reason=str(obj))
                        if kind == "BOOKMARK":
                            version = (event["raw_object"].get("metadata") or {}).get("resourceVersion", version)
                            continue
                        obj = self._dict(obj)
                        version = obj["metadata"]["resourceVersion"]
                        self.on_event(kind, obj)
            except ApiException as err:
                if err.status != 410:
                    log.warning("watching %s: %s %s; retrying", self.what, err.status, err.reason)
                    self.stopping.wait(RETRY_SECONDS)
            except Exception as err:  # noqa: BLE001 -- the API server may be away for a while
                log.warning("watching %s: %s; retrying", self.what, err)
                self.stopping.wait(RETRY_SECONDS)


class PodWatch:
    """Feeds ``metering`` and ``index`` from the API; calls ``on_change()`` after each change."""

    def __init__(self, api: Any, node: str, metering: PodMetering, index: PodIndex,
                 on_change: Callable[[], None]):
        from kubernetes import client

        self.api, self.node, self.metering, self.index, self.on_change = api, node, metering, index, on_change
        self.core = client.CoreV1Api(api)
        self.stopping = threading.Event()
        self.local = ListWatch(api, self.core.list_pod_for_all_namespaces, f"pods on node {node}",
                               self._local_list, self._local_event, self.stopping,
                               field_selector=f"spec.nodeName={node}")
        self.namespaces = ListWatch(api, self.core.list_namespace, "namespaces", self._namespace_list,
                                    self._namespace_event, self.stopping)
        self.cluster: ListWatch | None = None
        self._cluster_stop = threading.Event()
        self._cluster_uids: set[str] = set()
        self._deleted: dict[str, float] = {}  # uid -> when it was deleted (still indexed)
        self._deleted_lock = threading.Lock()

    def _remove_later(self, uid: str) -> None:
        with self._deleted_lock:
            self._deleted.setdefault(uid, time.monotonic())

    def sweep(self, keep_seconds: float) -> None:
        """Drop from the index the pods deleted more than ``keep_seconds`` ago."""
        now = time.monotonic()
        with self._deleted_lock:
            expired = [uid for uid, at in self._deleted.items() if now - at > keep_seconds]
            for uid in expired:
                del self._deleted[uid]
        for uid in expired:
            if uid not in self.metering.pods and uid not in self._cluster_uids:
                self.index.remove(uid)

    def start(self) -> "PodWatch":
        self.namespaces.start()
        self.namespaces.synced.wait(10)  # namespaceSelector needs the labels before pods are judged
        self.local.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        self._cluster_stop.set()
        for watch in (self.local, self.namespaces, self.cluster):
            if watch is not None:
                watch.stop()

    def want_cluster_pods(self, wanted: bool) -> None:
        """Index every pod of the cluster (wanted) or only this node's."""
        if wanted and self.cluster is None:
            self._cluster_stop = threading.Event()
            self.cluster = ListWatch(self.api, self.core.list_pod_for_all_namespaces, "pods of the cluster",
                                     self._cluster_list, self._cluster_event, self._cluster_stop).start()
            log.info("a template uses pod metadata: indexing the IPs of every pod in the cluster")
        elif not wanted and self.cluster is not None:
            self._cluster_stop.set()
            self.cluster.stop()
            self.cluster = None
            local = set(self.metering.pods)
            for uid in self._cluster_uids - local:
                self.index.remove(uid)
            self._cluster_uids = set()

    # ---- handlers -------------------------------------------------------------------

    def _local_list(self, items: list[dict]) -> None:
        infos = [pod_info(item) for item in items]
        gone = set(self.metering.pods) - {i.uid for i in infos}
        self.metering.replace_pods(infos)
        for uid in gone:
            self._remove_later(uid)
        for info in infos:
            self.index.upsert(info)
        self.on_change()

    def _local_event(self, kind: str, obj: dict) -> None:
        info = pod_info(obj)
        if kind == "DELETED":
            self.metering.pod_deleted(info.uid)
            self._remove_later(info.uid)
        else:
            self.metering.pod_changed(info)
            self.index.upsert(info)
        self.on_change()

    def _namespace_list(self, items: list[dict]) -> None:
        names = set()
        for item in items:
            meta = item.get("metadata") or {}
            names.add(meta.get("name"))
            self.metering.namespace_changed(meta.get("name"), meta.get("labels") or {})
        for name in set(self.metering.namespace_labels) - names:
            self.metering.namespace_changed(name, None)
        self.on_change()

    def _namespace_event(self, kind: str, obj: dict) -> None:
        meta = obj.get("metadata") or {}
        self.metering.namespace_changed(meta.get("name"), None if kind == "DELETED" else meta.get("labels") or {})
        self.on_change()

    def _cluster_list(self, items: list[dict]) -> None:
        infos = [pod_info(item) for item in items]
        uids = {i.uid for i in infos}
        gone = self._cluster_uids - uids
        self._cluster_uids = uids
        for uid in gone:
            self._remove_later(uid)
        for info in infos:
            self.index.upsert(info)

    def _cluster_event(self, kind: str, obj: dict) -> None:
        info = pod_info(obj)
        if kind == "DELETED":
            self._cluster_uids.discard(info.uid)
            self._remove_later(info.uid)
        else:
            self._cluster_uids.add(info.uid)
            self.index.upsert(info)
