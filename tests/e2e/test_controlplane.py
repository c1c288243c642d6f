"""The e2e harness itself: a real API with real controllers behind it.

These run against whatever `cluster` is (the session's own control plane,
or an existing cluster), so nothing here assumes which one.
"""

from __future__ import annotations

import time
import uuid

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from controlplane import api_client

TIMEOUT = 60.0


def wait_for(what: str, probe, timeout: float = TIMEOUT, interval: float = 0.3):
    """Poll probe() until it returns something truthy; fail naming `what`."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


@pytest.fixture
def namespace(cluster):
    name = f"e2e-{uuid.uuid4().hex[:8]}"
    with cluster.api() as api:
        client.CoreV1Api(api).create_namespace({"metadata": {"name": name}})
    yield name
    with cluster.api() as api:
        client.CoreV1Api(api).delete_namespace(name)


def test_api_serves_and_reports_version(cluster):
    with cluster.api() as api:
        version = client.VersionApi(api).get_code()
        assert version.major == "1"
        names = {ns.metadata.name for ns in client.CoreV1Api(api).list_namespace().items}
    assert {"default", "kube-system"} <= names
    out = cluster.kubectl("get", "--raw", "/readyz").stdout
    assert out.strip() == "ok"


WIDGET_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "widgets.e2e.kipfix.io"},
    "spec": {
        "group": "e2e.kipfix.io",
        "scope": "Namespaced",
        "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
        "versions": [{
            "name": "v1", "served": True, "storage": True,
            "schema": {"openAPIV3Schema": {
                "type": "object",
                "properties": {"spec": {
                    "type": "object", "required": ["size"],
                    "properties": {"size": {"type": "integer", "minimum": 1, "maximum": 10}},
                }},
            }},
        }],
    },
}


def test_crd_is_established_served_and_validated(cluster, namespace):
    with cluster.api() as api:
        ext = client.ApiextensionsV1Api(api)
        try:
            ext.create_custom_resource_definition(WIDGET_CRD)
        except ApiException as e:
            if e.status != 409:
                raise

        def established():
            crd = ext.read_custom_resource_definition("widgets.e2e.kipfix.io")
            return any(c.type == "Established" and c.status == "True"
                       for c in crd.status.conditions or [])
        wait_for("the Widget CRD to be Established", established)

        objs = client.CustomObjectsApi(api)
        body = {"apiVersion": "e2e.kipfix.io/v1", "kind": "Widget",
                "metadata": {"name": "w1"}, "spec": {"size": 3}}

        def create():  # discovery of a new group can lag Established a moment
            try:
                return objs.create_namespaced_custom_object("e2e.kipfix.io", "v1", namespace, "widgets", body)
            except ApiException as e:
                if e.status == 404:
                    return None
                raise
        wait_for("the widgets resource to be served", create)
        got = objs.get_namespaced_custom_object("e2e.kipfix.io", "v1", namespace, "widgets", "w1")
        assert got["spec"] == {"size": 3}

        bad = {**body, "metadata": {"name": "w2"}, "spec": {"size": 11}}
        with pytest.raises(ApiException) as err:
            objs.create_namespaced_custom_object("e2e.kipfix.io", "v1", namespace, "widgets", bad)
        assert err.value.status == 422
        assert "spec.size" in err.value.body

        ext.delete_custom_resource_definition("widgets.e2e.kipfix.io")
    # kubectl sees the same API (and the CRD going away)
    wait_for("the widgets resource to disappear",
             lambda: cluster.kubectl("get", "widgets", "-n", namespace, check=False).returncode != 0)


def _pods(core, namespace, selector):
    return core.list_namespaced_pod(namespace, label_selector=selector).items


def test_daemonset_runs_one_pod_per_selected_node(cluster, namespace):
    tag = uuid.uuid4().hex[:6]
    picked = {f"e2e-{tag}-a", f"e2e-{tag}-b"}
    for n in sorted(picked):
        cluster.nodes.add(n, {"e2e.kipfix.io/role": f"collector-{tag}"})
    cluster.nodes.add(f"e2e-{tag}-c", {"e2e.kipfix.io/role": f"other-{tag}"})
    ds = {
        "apiVersion": "apps/v1", "kind": "DaemonSet",
        "metadata": {"name": "agent"},
        "spec": {
            "selector": {"matchLabels": {"app": "agent"}},
            "template": {
                "metadata": {"labels": {"app": "agent"}},
                "spec": {
                    "nodeSelector": {"e2e.kipfix.io/role": f"collector-{tag}"},
                    "hostNetwork": True,
                    "containers": [{"name": "agent", "image": "example.invalid/agent:1"}],
                },
            },
        },
    }
    with cluster.api() as api:
        core, apps = client.CoreV1Api(api), client.AppsV1Api(api)
        apps.create_namespaced_daemon_set(namespace, ds)

        def placed():
            pods = _pods(core, namespace, "app=agent")
            nodes = sorted(p.spec.node_name or "" for p in pods)
            return nodes if nodes == sorted(picked) else None
        wait_for(f"one agent pod on each of {sorted(picked)}", placed)

        def ready():
            st = apps.read_namespaced_daemon_set_status("agent", namespace).status
            return (st.desired_number_scheduled, st.number_ready) == (2, 2)
        wait_for("DaemonSet status 2 desired, 2 ready", ready)

        # Relabel: c joins, a leaves.
        cluster.nodes.label(f"e2e-{tag}-c", {"e2e.kipfix.io/role": f"collector-{tag}"})
        cluster.nodes.label(f"e2e-{tag}-a", {"e2e.kipfix.io/role": None})
        want = sorted({f"e2e-{tag}-b", f"e2e-{tag}-c"})

        def moved():
            nodes = sorted(p.spec.node_name or "" for p in _pods(core, namespace, "app=agent")
                           if not p.metadata.deletion_timestamp)
            return nodes if nodes == want else None
        wait_for(f"agent pods to follow the labels to {want}", moved)

        # Deleting the DaemonSet garbage-collects its pods (owner references).
        apps.delete_namespaced_daemon_set("agent", namespace, propagation_policy="Background")
        wait_for("the DaemonSet's pods to be garbage-collected",
                 lambda: not _pods(core, namespace, "app=agent"))
    for n in (*picked, f"e2e-{tag}-c"):
        cluster.nodes.remove(n)


def test_garbage_collector_follows_owner_references(cluster, namespace):
    with cluster.api() as api:
        core = client.CoreV1Api(api)
        owner = core.create_namespaced_config_map(namespace, {"metadata": {"name": "owner"}})
        ref = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner",
               "uid": owner.metadata.uid, "blockOwnerDeletion": True}
        for i in range(3):
            core.create_namespaced_config_map(
                namespace, {"metadata": {"name": f"child-{i}", "ownerReferences": [ref]}})
        core.create_namespaced_config_map(namespace, {"metadata": {"name": "unowned"}})
        core.delete_namespaced_config_map("owner", namespace, propagation_policy="Foreground")

        def collected():
            names = {c.metadata.name for c in core.list_namespaced_config_map(namespace).items}
            return names if not names & {"owner", "child-0", "child-1", "child-2"} else None
        names = wait_for("owned ConfigMaps to be garbage-collected", collected)
        assert "unowned" in names


def test_serviceaccount_kubeconfig_has_only_its_rbac(cluster, namespace):
    with cluster.api() as api:
        core, rbac = client.CoreV1Api(api), client.RbacAuthorizationV1Api(api)
        core.create_namespaced_service_account(namespace, {"metadata": {"name": "reader"}})
        rbac.create_namespaced_role(namespace, {
            "metadata": {"name": "configmap-reader"},
            "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list", "watch"]}],
        })
        rbac.create_namespaced_role_binding(namespace, {
            "metadata": {"name": "reader"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "configmap-reader"},
            "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": namespace}],
        })
        core.create_namespaced_config_map(namespace, {"metadata": {"name": "visible"}})

    kubeconfig = cluster.serviceaccount_kubeconfig(namespace, "reader")
    with api_client(kubeconfig) as sa_api:
        sa_core = client.CoreV1Api(sa_api)
        # RBAC is cached briefly by the authorizer's informers: wait for the grant.
        def can_list():
            try:
                return [c.metadata.name for c in sa_core.list_namespaced_config_map(namespace).items]
            except ApiException as e:
                if e.status == 403:
                    return None
                raise
        assert "visible" in wait_for("the RoleBinding to take effect", can_list)

        for forbidden in (
            lambda: sa_core.create_namespaced_config_map(namespace, {"metadata": {"name": "nope"}}),
            lambda: sa_core.list_namespaced_secret(namespace),
            lambda: sa_core.list_namespaced_config_map("default"),
            lambda: sa_core.list_node(),
        ):
            with pytest.raises(ApiException) as err:
                forbidden()
            assert err.value.status == 403
            assert f"system:serviceaccount:{namespace}:reader" in err.value.body

    who = cluster.kubectl("auth", "whoami", "-o", "jsonpath={.status.userInfo.username}",
                          kubeconfig=kubeconfig).stdout
    assert who == f"system:serviceaccount:{namespace}:reader"
    assert cluster.kubectl("auth", "can-i", "list", "configmaps", kubeconfig=kubeconfig,
                           check=False).stdout.strip() == "yes"
    assert cluster.kubectl("auth", "can-i", "delete", "configmaps", kubeconfig=kubeconfig,
                           check=False).stdout.strip() == "no"


def test_helm_reaches_the_cluster(cluster):
    out = cluster.helm("list", "--all-namespaces", "-o", "json").stdout
    assert out.strip().startswith("[")
