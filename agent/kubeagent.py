"""``kipfix agent --kubernetes``: the agent as a DaemonSet pod.

- The node name comes from ``NODE_NAME`` (downward API ``spec.nodeName``) and
  the namespace from ``POD_NAMESPACE`` (or the service account's namespace).
- The node's configuration is the ConfigMap ``kipfix-node-<node>`` in that
  namespace, key ``config.yaml`` (agent YAML, rendered by the operator). The
  agent *watches* it (list, then watch from that resourceVersion; relist on
  410 Gone), so a change applies within a second or two. The first valid
  config starts the metering Agent; later ones are applied with
  ``Agent.apply`` (only the difference, as on SIGHUP). A config that does
  not parse, does not resolve on this node (``config.resolve``: DNS, the
  TLS files from the Secret, jsonLines, netns, bpffs) or fails to apply is
  reported in the Lease (``configError``, naming the ConfigMap or Secret
  key), counted in ``kipfix_agent_reload_failures_total``, and the running
  one stays; ``configHash`` names the config the agent runs, reported once
  it is applied. A deleted ConfigMap means "nothing selects this node":
  everything is detached and export stops.
- TLS files are written as ``secret:NAME/KEY`` in the rendered config; the
  agent reads those keys from the Secret NAME in its namespace and writes
  them under a private directory (``ca.crt`` is required; ``tls.crt`` and
  ``tls.key`` are used when both exist).
- The agent reports its state in the Lease ``kipfix-agent-<node>`` (same
  namespace): ``spec.renewTime`` every RENEW_SECONDS as a heartbeat and the
  annotation ``kipfix.io/report`` (JSON: configHash, configError, interfaces,
  errors, warnings, lastExportTime, exportedFlows). The operator aggregates
  these into each FlowExporter's status.
- The config's ``pods`` selections are metered inside the selected pods of
  this node (podwatch.py, podmetering.py, podnetns.py); every pod of the node
  (and of the cluster, when a template names a pod element) is indexed by IP
  for the Kubernetes metadata elements.
- ``KIPFIX_PIN_PATH`` (optional) overrides the pinned-table path, a property
  of the node rather than of a FlowExporter.

API calls (see kipfix.operator.rbac.AGENT_RULES): configmaps get/list/watch,
secrets get, leases get/create/patch in the agent's namespace; pods and
namespaces list/watch in the cluster.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import tempfile
import threading
import time
from typing import Any, Callable

from .config import AgentConfig, ConfigError, parse_config, parse_document
from .config.resolve import resolve_config
from .contract import (CONFIG_KEY, PIN_PATH_ENV, RENEW_SECONDS, REQUEST_TIMEOUT, config_hash, configmap_name,
                       default_namespace)
from .daemon import Agent
from .kube.client import load_kube_config
from .kube.report import NodeReporter, now_micro
from .kube.secrets import resolve_secret_files, secret_file_labels

log = logging.getLogger("kipfix.agent.kube")

CONFIG_WATCH_SECONDS = 60


def empty_config() -> AgentConfig:
    """What a node runs when no FlowExporter selects it: nothing attached, nothing exported."""
    return parse_config({"pinPath": os.environ[PIN_PATH_ENV]} if os.environ.get(PIN_PATH_ENV) else {})


def uses_pod_elements(config: AgentConfig) -> bool:
    """True if a template names a pod metadata element (then every pod of the cluster is indexed)."""
    from .export.ipfix.fields import POD_NAMES, canonical_name

    return any(canonical_name(name) in POD_NAMES for template in config.templates for name in template.fields)


class KubeAgent(Agent):
    """The daemon's Agent, fed by the ConfigMap watch instead of a file, metering pods too."""

    def __init__(self, config: AgentConfig, keep_attached: bool = False):
        from .flows.dedup import VethDedup
        from .kube.podmeta import PodIndex

        self.pod_metering = None  # PodMetering, from start_pods()
        self.pod_watch = None
        self.dedup = VethDedup()
        self._pairs_generation = -1
        super().__init__(config, None, keep_attached=keep_attached, pod_index=PodIndex())
        self.pending: tuple[AgentConfig, Callable[[str | None], None] | None] | None = None
        self.last_export: str | None = None
        self.applied_at = time.time()

    # -- pods ---------------------------------------------------------------------

    def start_pods(self, api: Any, node: str) -> None:
        """Watch this node's pods (and namespaces) and meter inside the selected ones."""
        from .kube.podmetering import PodMetering
        from .kube.podwatch import PodWatch

        self.pod_metering = PodMetering(node)
        self.pod_metering.configure(self.config.pods)
        self.attachments.on_error = self._attach_error
        self.pod_watch = PodWatch(api, node, self.pod_metering, self.pod_index, self.pods_changed).start()
        self.pod_watch.want_cluster_pods(uses_pod_elements(self.config))

    def pods_changed(self) -> None:
        """Called from the watch threads: the run loop re-decides between drains."""
        self.request_reload()

    def desired_interfaces(self, config: AgentConfig) -> tuple:
        pods = self.pod_metering.attach_selections() if self.pod_metering is not None else []
        return (*config.interfaces, *pods)

    def sync_pods(self) -> None:
        if self.pod_metering is None:
            return
        changed = self.pod_metering.refresh()
        ended = self.pod_metering.take_ended()
        if changed or ended:
            self.attachments.apply(self.desired_interfaces(self.config))
        for pod in ended:  # detached now: their flows end at the next drain
            netns_id = self.netns_ids.find(pod.inode)
            if netns_id is not None:
                self.ended_netns.add(netns_id)

    def deduplicate(self, flows: list, final: bool) -> list:
        if self.pod_metering is None:
            return flows
        if self._pairs_generation != self.attachments.generation:
            self._pairs_generation = self.attachments.generation
            self.dedup.set_pairs(self._veth_pairs())
        return self.dedup.filter(flows, self.cache.__contains__, final)

    def held_flows(self) -> list:
        return list(self.dedup.held())

    def restore_held(self, flows: list) -> None:
        self.dedup.hold(flows)  # judged at the first drain with pods known, as before the restart
        self._restored_held = []

    def _veth_pairs(self) -> dict:
        """host-side end -> pod-side end, for metered pods whose veth is metered outside too."""
        from .datapath.netns import NetnsRef

        outer = {NetnsRef.parse(s.netns) for s in self.config.interfaces}
        pairs = {}
        for selection in self.pod_metering.attach_selections():
            pod_id = self.attachments.netns_id(selection.netns)
            for ifindex in self.attachments.interface_names(selection.netns):
                peer = self.attachments.veth_peer(selection.netns, ifindex, outer)
                if peer is not None and pod_id is not None:
                    pairs[peer] = (pod_id, ifindex)
        return pairs

    def _attach_error(self, err: Any) -> None:
        pod = self.pod_metering.pod_of_netns(err.netns) if self.pod_metering is not None else None
        if pod is not None:
            log.warning("pod %s: %s", pod.label, err.message)

    # -- config -------------------------------------------------------------------

    def offer(self, config: AgentConfig, applied: Callable[[str | None], None] | None = None) -> None:
        """Called from the watch thread: the run loop applies it between drains, then calls
        ``applied(None)``, or ``applied(message)`` when it could not (the running one stays)."""
        self.pending = (config, applied)
        self.request_reload()

    def reload(self) -> bool:
        pending, self.pending = self.pending, None
        ok = True
        if pending is not None:
            ok = self._apply_offered(*pending)
        self.sync_pods()
        return ok

    def _apply_offered(self, config: AgentConfig, applied: Callable[[str | None], None] | None) -> bool:
        running = self.config
        try:
            if self.pod_metering is not None:
                self.pod_metering.configure(config.pods)
            self.apply(config)
        except Exception as err:  # noqa: BLE001 -- a config must never take the agent down
            if self.pod_metering is not None:
                self.pod_metering.configure(running.pods)
            if not isinstance(err, ConfigError):
                log.exception("unexpected error while applying a configuration")
            if applied is not None:
                applied(str(err) if isinstance(err, ConfigError) else f"{type(err).__name__}: {err}")
            return False
        if self.pod_watch is not None:
            self.pod_watch.want_cluster_pods(uses_pod_elements(config))
        self.applied_at = time.time()
        if applied is not None:
            applied(None)
        return True

    def cycle(self, final: bool = False):
        if not final and self.pod_metering is not None and self.pod_metering.unresolved():
            self.sync_pods()  # look again for the netns of pods not found yet
        records = super().cycle(final)
        if records:
            self.last_export = now_micro()
        if self.pod_watch is not None:  # a deleted pod is named in its flushed flows, then forgotten
            self.pod_watch.sweep(max(10.0, 3 * self.config.drain_interval))
        return records

    def shutdown(self) -> None:
        if self.pod_watch is not None:
            self.pod_watch.stop()
        super().shutdown()

    def state(self) -> dict:
        recent = [e for e in list(self.attachments.errors)
                  if e.time >= self.applied_at and e.time >= time.time() - 60]
        errors = set()
        for err in recent:
            pod = self.pod_metering.pod_of_netns(err.netns) if self.pod_metering is not None else None
            errors.add(f"pod {pod.label}: {err.message}" if pod is not None else err.message)
        warnings: list[str] = []
        if self.pod_metering is not None:
            errors.update(self.pod_metering.errors())
            warnings = self.pod_metering.warnings()[:5]
        interfaces = []
        for a in self.attachments.attached():
            pod = self.pod_metering.pod_of_netns(a.netns) if self.pod_metering is not None else None
            if pod is not None:
                interfaces.append(f"pod {pod.label}/{a.ifname}")
            else:
                interfaces.append(a.ifname if a.netns in ("", "host") else f"{a.netns}/{a.ifname}")
        return {"interfaces": interfaces, "errors": sorted(errors)[:5], "warnings": warnings,
                "lastExportTime": self.last_export, "exportedFlows": self.exported_flows}


class KubernetesMode:
    """Watch the node's ConfigMap, run the Agent on it, report to the Lease."""

    def __init__(self, node: str, namespace: str, keep_attached: bool = False, api: Any = None,
                 agent_factory: Callable[[AgentConfig, bool], Any] | None = None, metrics_registry: Any = None,
                 serve_metrics: bool = True):
        from kubernetes import client

        self.node, self.namespace, self.keep_attached = node, namespace, keep_attached
        self.api = api or load_kube_config()
        self.core = client.CoreV1Api(self.api)
        self.reporter = NodeReporter(self.api, node, namespace)
        self.agent_factory = agent_factory or KubeAgent
        self.agent: Any = None
        self.first_config: AgentConfig | None = None
        self.stopping = threading.Event()
        self._have_config = threading.Event()
        self._report_now = threading.Event()
        self._tls_dir = tempfile.mkdtemp(prefix="kipfix-tls-")
        self._last_text: str | None = None  # the text of the config accepted last
        self._error_shown = False  # the report names a config that was refused
        self.first_digest: str | None = None
        self._agent_lock = threading.Lock()
        self.metrics_registry = metrics_registry  # None: prometheus_client's global registry
        self.serve_metrics = serve_metrics  # False: no metrics server (tests running several modes in one process)
        self.metrics_settings = None  # a MetricsConfig from --metrics-config: replaces the ConfigMap's

    # -- config ---------------------------------------------------------------------

    def _read_secret(self, name: str) -> dict[str, bytes]:
        import base64

        from kubernetes.client.rest import ApiException

        try:
            secret = self.core.read_namespaced_secret(name, self.namespace)
        except ApiException as err:
            if err.status == 404:
                raise KeyError(name) from None
            raise
        return {k: base64.b64decode(v) for k, v in (secret.data or {}).items()}

    def on_configmap(self, configmap: Any | None) -> None:
        """A new state of the node's ConfigMap (None: deleted or absent)."""
        text = None
        if configmap is not None:
            text = (configmap.data or {}).get(CONFIG_KEY)
            if text is None:
                self._config_error(f"ConfigMap {configmap_name(self.node)} has no key {CONFIG_KEY!r}")
                return
        if text == self._last_text:
            if self._error_shown:  # back to the config that runs: the refused one is history
                self._error_shown = False
                self.reporter.update(configError=None)
                self._report_now.set()
            return
        if text is None:
            log.info("ConfigMap %s is gone: no FlowExporter selects node %s; detaching", configmap_name(self.node),
                     self.node)
            config, digest = empty_config(), None
        else:
            digest = config_hash(text)
            try:
                config = self.parse(text)
            except ConfigError as err:
                self._config_error(f"config {digest} rejected, keeping the running one: {err}")
                return
            except Exception as err:  # noqa: BLE001 -- e.g. the Secret could not be read: retry on next event
                self._config_error(f"config {digest} not applied: {err}")
                return
        self._last_text = text
        with self._agent_lock:
            if self.agent is None:
                self.first_config = config if text is not None else None
                self.first_digest = digest
                if text is not None:
                    self._have_config.set()
            else:
                self.agent.offer(config, functools.partial(self._applied, digest, text))
        log.info("node %s: config %s received", self.node, digest or "(none)")

    def parse(self, text: str) -> AgentConfig:
        """The ConfigMap's agent config, its Secrets written to files and checked against this node.

        ConfigError names the ConfigMap key (or the Secret key) and what is wrong.
        """
        source = f"ConfigMap {self.namespace}/{configmap_name(self.node)} key {CONFIG_KEY}"
        try:
            doc = parse_document(text.encode(), "to stop kipfix on this node, delete the FlowExporters that "
                                 "select it or change their nodeSelector")
            doc = resolve_secret_files(doc, self._read_secret, self._tls_dir)
            if isinstance(doc, dict) and os.environ.get(PIN_PATH_ENV):  # a node setting, not a spec one
                doc = {**doc, "pinPath": os.environ[PIN_PATH_ENV]}
            config = parse_config(doc)
            resolve_config(config, file_labels=secret_file_labels(config, self._tls_dir))
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None
        return config

    def _applied(self, digest: str | None, text: str | None, error: str | None) -> None:
        """The agent applied the config with hash ``digest`` (error None), or could not."""
        if error is None:
            log.info("node %s: config %s applied", self.node, digest or "(none)")
            self._error_shown = False
            self.reporter.update(configHash=digest, configError=None)
            self._report_now.set()
            return
        with self._agent_lock:
            if self._last_text == text:
                self._last_text = None  # the next list or event offers it again
        self._config_error(f"config {digest} not applied, keeping the running one: {error}")

    def _config_error(self, message: str) -> None:
        log.error("%s", message)
        metrics = getattr(self.agent, "metrics", None)
        if metrics is not None:
            metrics.reload_failed()
        self._error_shown = True
        self.reporter.update(configError=message)
        self._report_now.set()

    def watch_config(self) -> None:
        """List, then watch from that resourceVersion; relist after errors or 410 Gone."""
        from kubernetes import watch
        from kubernetes.client.rest import ApiException

        name = configmap_name(self.node)
        selector = f"metadata.name={name}"
        while not self.stopping.is_set():
            try:
                listed = self.core.list_namespaced_config_map(self.namespace, field_selector=selector)
                self.on_configmap(listed.items[0] if listed.items else None)
                version = listed.metadata.resource_version
                while not self.stopping.is_set():
                    stream = watch.Watch()
                    for event in stream.stream(self.core.list_namespaced_config_map, self.namespace,
                                               field_selector=selector, resource_version=version,
                                               timeout_seconds=CONFIG_WATCH_SECONDS, allow_watch_bookmarks=True,
                                               _request_timeout=(REQUEST_TIMEOUT[0], CONFIG_WATCH_SECONDS + 30)):
                        obj = event["object"]
                        if event["type"] == "ERROR":
                            code = obj.get("code") if isinstance(obj, dict) else getattr(obj, "code", None)
                            raise ApiException(status=code or 500, reason=str(obj))
                        if event["type"] == "BOOKMARK":  # the client leaves these as dicts
                            version = (event["raw_object"].get("metadata") or {}).get("resourceVersion", version)
                            continue
                        version = obj.metadata.resource_version
                        self.on_configmap(None if event["type"] == "DELETED" else obj)
                        if self.stopping.is_set():
                            stream.stop()
            except ApiException as err:
                if err.status != 410:
                    log.warning("watching ConfigMap %s/%s: %s; retrying", self.namespace, name, err.reason)
                    self.stopping.wait(2)
            except Exception as err:  # noqa: BLE001 -- the API server may be away for a while
                log.warning("watching ConfigMap %s/%s: %s; retrying", self.namespace, name, err)
                self.stopping.wait(2)

    # -- report ---------------------------------------------------------------------

    def report_loop(self) -> None:
        while not self.stopping.is_set():
            if self.agent is not None:
                try:
                    self.reporter.update(**self.agent.state())
                except Exception:  # noqa: BLE001
                    log.exception("reading agent state failed")
            try:
                self.reporter.publish()
            except Exception as err:  # noqa: BLE001
                log.warning("reporting node state to Lease %s/%s failed: %s", self.namespace,
                            self.reporter.name, err)
            self._report_now.wait(RENEW_SECONDS)
            self._report_now.clear()

    # -- main -----------------------------------------------------------------------

    def request_stop(self, *_args) -> None:
        self.stopping.set()
        self._have_config.set()
        self._report_now.set()
        if self.agent is not None:
            self.agent.request_stop()

    def _start_agent(self) -> tuple[Any, AgentConfig, str | None] | None:
        """Wait for the first valid config and start the agent on it: (agent, config, hash), None if stopping.

        A config the agent cannot start with (ConfigError: an output that cannot
        be opened) is reported like any refused config, and the next one is awaited.
        """
        while True:
            self._have_config.wait()
            if self.stopping.is_set():
                return None
            with self._agent_lock:
                first, digest = self.first_config, self.first_digest
                if first is None:
                    self._have_config.clear()  # the ConfigMap went away before the agent started
                    continue
            try:
                return self.agent_factory(first, self.keep_attached), first, digest  # compiles and loads BPF
            except ConfigError as err:
                with self._agent_lock:
                    if self.first_config is first:
                        self.first_config, self._last_text = None, None
                        self._have_config.clear()
                self._config_error(f"config {digest} not applied: {err}")

    def run(self) -> int:
        threads = [threading.Thread(target=self.watch_config, name="kube config watch", daemon=True),
                   threading.Thread(target=self.report_loop, name="kube report", daemon=True)]
        for thread in threads:
            thread.start()
        log.info("kipfix agent for node %s: watching ConfigMap %s/%s", self.node, self.namespace,
                 configmap_name(self.node))
        started = self._start_agent()
        if started is None:
            return 0
        agent, first, digest = started
        if hasattr(agent, "start_pods"):
            agent.start_pods(self.api, self.node)
        settings = self.metrics_settings or first.metrics  # as run_agent: the first config's settings hold
        if self.serve_metrics and settings.enabled:
            from .metrics import start_agent_metrics
            start_agent_metrics(agent, settings.address, settings.port, self.metrics_registry, tls=settings.tls,
                                basic_auth=settings.basic_auth)
        self._applied(digest, None, None)
        with self._agent_lock:
            self.agent = agent
            if self.first_config is not first:  # changed meanwhile
                agent.offer(self.first_config or empty_config(),
                            functools.partial(self._applied, self.first_digest, self._last_text))
        self._report_now.set()
        if self.stopping.is_set():
            self.agent.request_stop()
        self.agent.run()
        self.stopping.set()
        self._report_now.set()
        threads[1].join(timeout=5)
        return 0


def run_kubernetes_agent(keep_attached: bool = False, node: str | None = None,
                         namespace: str | None = None, metrics_config: str | None = None) -> int:
    """Entry for ``kipfix agent --kubernetes``; ``metrics_config``: a file with the ``metrics:``
    section to use (the ConfigMap's has none)."""
    from .config import load_metrics_config
    from .config.resolve import resolve_metrics

    node = node or os.environ.get("NODE_NAME", "")
    if not node:
        log.error("--kubernetes needs the node name in NODE_NAME (downward API: fieldRef spec.nodeName)")
        return 2
    try:  # the node's own setting, before anything is watched or loaded
        resolve_config(empty_config())
    except ConfigError as err:
        log.error("%s%s", f"{PIN_PATH_ENV}: " if os.environ.get(PIN_PATH_ENV) else "", err)
        return 2
    settings = None
    if metrics_config:
        try:
            settings = load_metrics_config(metrics_config)
            if settings.enabled:
                resolve_metrics(settings, metrics_config)
        except ConfigError as err:
            log.error("%s", err)
            return 2
    mode = KubernetesMode(node, namespace or default_namespace(), keep_attached=keep_attached)
    mode.metrics_settings = settings
    signal.signal(signal.SIGTERM, mode.request_stop)
    signal.signal(signal.SIGINT, mode.request_stop)
    return mode.run()
