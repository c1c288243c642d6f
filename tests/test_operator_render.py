"""Operator: spec validation messages, per-node rendering, merging and conflicts, status."""

import copy
import datetime as dt
import json
import pathlib

import pytest
import yaml

from kipfix.agent.config import parse_config
from kipfix.agent.contract import config_hash
from kipfix.agent.kube.secrets import resolve_secret_files
from kipfix.operator import status
from kipfix.operator.render import plan
from kipfix.operator.spec import SpecError, parse_exporter, per_node_domain_id, selector_matches

EXAMPLE = pathlib.Path(__file__).parent.parent / "examples" / "flowexporter.yaml"
V4 = ["flowStartMilliseconds", "flowEndMilliseconds", "sourceIPv4Address", "destinationIPv4Address",
      "octetDeltaCount", "packetDeltaCount"]


def body(name="a", created="2026-01-01T00:00:00Z", **spec):
    base = {"collectors": [{"address": "127.0.0.1:4739"}],
            "templates": [{"id": 256, "fields": list(V4)}],
            "interfaces": {"host": {"names": ["eth0"]}}}
    base.update(spec)
    return {"apiVersion": "kipfix.io/v1alpha1", "kind": "FlowExporter",
            "metadata": {"name": name, "uid": f"uid-{name}", "creationTimestamp": created, "generation": 1},
            "spec": base}


def test_the_example_renders_a_config_the_agent_accepts():
    exporter = parse_exporter(yaml.safe_load(EXAMPLE.read_text()))
    result = plan([exporter], {"linux-1": {"kubernetes.io/os": "linux"}, "win-1": {"kubernetes.io/os": "windows"}})
    assert result.targeted == {"uplinks": ["linux-1"]} and list(result.nodes) == ["linux-1"]
    config = parse_config(yaml.safe_load(result.nodes["linux-1"].text))
    assert [c.address for c in config.collectors] == ["192.0.2.10:4739"]
    assert [t.id for t in config.templates] == [256, 257]
    assert config.interfaces[0].names == ("eth*", "ens*", "/^bond[0-9]+$/")
    assert config.interfaces[0].exclude == ("eth9",)
    assert (config.timeouts.idle, config.timeouts.active, config.max_flows) == (15, 60, 65536)
    assert config.observation_domain_id == per_node_domain_id("linux-1")


@pytest.mark.parametrize("change, message", [
    (lambda s: s["templates"][0]["fields"].append("fooBar"),
     "spec.templates[0].fields: unknown information element 'fooBar'"),
    (lambda s: s["templates"][0]["fields"].append("sourceIPv4Address"),
     "spec.templates[0].fields: information element 'sourceIPv4Address' appears twice"),
    (lambda s: s["templates"].append({"id": 256, "fields": ["octetDeltaCount"]}),
     "spec.templates[1].id: 256 is already used by spec.templates[0]"),
    (lambda s: s["templates"][0].update(id=255), "spec.templates[0].id: 255 is out of range; accepted: 256..65535"),
    (lambda s: s["collectors"][0].update(address="127.0.0.1"),
     "spec.collectors[0].address: collector address '127.0.0.1' does not parse (no port)"),
    (lambda s: s["collectors"][0].update(address="fe80::1:4739"),
     "spec.collectors[0].address: collector address 'fe80::1:4739': an IPv6 address needs brackets"),
    (lambda s: s["collectors"][0].update(transport="sctp"),
     "spec.collectors[0].transport: 'sctp' is not accepted; accepted: udp, tcp, tls"),
    (lambda s: s["collectors"][0].update(transport="tls"),
     "spec.collectors[0].tls.secretName: None is not a Secret name"),
    (lambda s: s["collectors"][0].update(maxMessageSize=64),
     "spec.collectors[0].maxMessageSize: 64 octets cannot hold one record of template 256"),
    (lambda s: s["interfaces"]["host"].update(names=["/[/"]),
     "spec.interfaces.host.names: interface pattern '/[/': invalid regular expression"),
    (lambda s: s.update(interfaces={}), "spec.interfaces: give host"),
    (lambda s: s.update(timeouts={"idle": 120, "active": 60}),
     "spec.timeouts.idle: 120 s is longer than spec.timeouts.active (60 s)"),
    (lambda s: s.update(observationDomainId={"fixed": 1, "perNode": True}),
     "spec.observationDomainId: give exactly one of fixed or perNode"),
    (lambda s: s.update(nodeSelector={"matchExpressions": [{"key": "x", "operator": "In"}]}),
     "spec.nodeSelector.matchExpressions[0].values: required and non-empty for In/NotIn"),
    (lambda s: s.update(collectors=[]), "spec.collectors: empty"),
    (lambda s: s["collectors"][0].update(transport="tcp", pacing="spread"),
     "spec.collectors[0].pacing: only for transport udp"),
    (lambda s: s["collectors"][0].update(pacing="burst"), "spec.collectors[0].pacing: 'burst' is not accepted"),
    (lambda s: s["collectors"][0].update(sendBuffer=100), "spec.collectors[0].sendBuffer: 100 is out of range"),
])
def test_invalid_specs_are_named(change, message):
    fe = body()
    change(fe["spec"])
    with pytest.raises(SpecError) as err:
        parse_exporter(fe)
    assert str(err.value).startswith(message), str(err.value)


def test_an_element_kipfix_cannot_fill_is_named():
    fe = body()
    fe["spec"]["templates"][0]["fields"].append("bgpSourceAsNumber")
    with pytest.raises(SpecError) as err:
        parse_exporter(fe)
    assert str(err.value).startswith("spec.templates[0].fields: information element 'bgpSourceAsNumber' is known "
                                     "but kipfix cannot fill it; accepted: ")


def test_udp_pacing_and_send_buffer_reach_the_agent_config():
    fe = body(collectors=[{"address": "192.0.2.9:2055", "pacing": "spread", "maxMessagesPerSecond": 500,
                           "sendBuffer": 1 << 20},
                          {"address": "192.0.2.9:4739", "transport": "tcp", "sendBuffer": 65536}])
    result = plan([parse_exporter(fe)], {"n1": {}})
    udp, tcp = parse_config(yaml.safe_load(result.nodes["n1"].text)).collectors
    assert (udp.pacing, udp.max_messages_per_second, udp.send_buffer) == ("spread", 500, 1 << 20)
    assert (tcp.pacing, tcp.max_messages_per_second, tcp.send_buffer) == ("spread", 0, 65536)


def test_host_names_resolve_on_the_node_not_in_the_operator():
    fe = body(collectors=[{"address": "collector.kipfix.svc.cluster.invalid:4739"}])
    exporter = parse_exporter(fe)
    doc = yaml.safe_load(plan([exporter], {"n": {}}).nodes["n"].text)
    assert doc["collectors"][0]["address"] == "collector.kipfix.svc.cluster.invalid:4739"


def test_tls_renders_secret_references_the_agent_resolves(tmp_path):
    fe = body(collectors=[{"address": "127.0.0.1:4740", "transport": "tls",
                           "tls": {"secretName": "collector-tls", "serverName": "collector"}}])
    doc = yaml.safe_load(plan([parse_exporter(fe)], {"n": {}}).nodes["n"].text)
    assert doc["collectors"][0]["tls"] == {"ca": "secret:collector-tls/ca.crt", "cert": "secret:collector-tls/tls.crt",
                                           "key": "secret:collector-tls/tls.key", "serverName": "collector"}
    resolved = resolve_secret_files(doc, lambda name: {"ca.crt": b"CA"}, str(tmp_path))
    tls = resolved["collectors"][0]["tls"]
    assert tls == {"ca": str(tmp_path / "collector-tls" / "ca.crt"), "serverName": "collector"}
    assert (tmp_path / "collector-tls" / "ca.crt").read_bytes() == b"CA"
    parse_config(resolved)
    with pytest.raises(ValueError, match="Secret 'collector-tls' not found"):
        resolve_secret_files(doc, lambda name: (_ for _ in ()).throw(KeyError(name)), str(tmp_path))


def test_node_selection_follows_labels():
    selector = {"matchLabels": {"role": "router"},
                "matchExpressions": [{"key": "zone", "operator": "In", "values": ["a", "b"]},
                                     {"key": "drain", "operator": "DoesNotExist"}]}
    assert selector_matches(selector, {"role": "router", "zone": "a"})
    assert not selector_matches(selector, {"role": "router", "zone": "c"})
    assert not selector_matches(selector, {"role": "router", "zone": "a", "drain": ""})
    assert not selector_matches(selector, {"zone": "a"})
    assert selector_matches({}, {})
    fe = parse_exporter(body(nodeSelector=selector))
    result = plan([fe], {"r1": {"role": "router", "zone": "b"}, "w1": {"role": "worker", "zone": "b"}})
    assert result.targeted["a"] == ["r1"] and list(result.nodes) == ["r1"]


def test_compatible_exporters_merge_on_shared_nodes():
    a = parse_exporter(body("a", nodeSelector={"matchLabels": {"edge": "yes"}}, maxFlows=1024))
    b = parse_exporter(body("b", "2026-01-02T00:00:00Z",
                            collectors=[{"address": "127.0.0.1:4739"}, {"address": "127.0.0.2:4739"}],
                            templates=[{"id": 256, "fields": list(V4)}, {"id": 300, "fields": ["octetDeltaCount"]}],
                            interfaces={"host": {"names": ["veth*"], "exclude": ["veth0"]}}, maxFlows=4096))
    result = plan([b, a], {"edge": {"edge": "yes"}, "core": {}})
    assert result.conflicts == {}
    assert [o.name for o in result.nodes["edge"].owners] == ["a", "b"]
    assert [o.name for o in result.nodes["core"].owners] == ["b"]
    config = parse_config(yaml.safe_load(result.nodes["edge"].text))
    assert [c.address for c in config.collectors] == ["127.0.0.1:4739", "127.0.0.2:4739"]
    assert [t.id for t in config.templates] == [256, 300]
    assert [(s.names, s.exclude) for s in config.interfaces] == [(("eth0",), ()), (("veth*",), ("veth0",))]
    assert config.max_flows == 4096
    assert result.configured == {"a": ["edge"], "b": ["core", "edge"]}


@pytest.mark.parametrize("spec_b, words", [
    ({"templates": [{"id": 256, "fields": ["octetDeltaCount"]}]},
     ["template id 256", "'b'", "'a'", "['octetDeltaCount']"]),
    ({"timeouts": {"idle": 5, "active": 60}}, ["timeouts", "'b'", "'a'"]),
    ({"observationDomainId": {"fixed": 9}}, ["observation domain id 9", "'b'", "'a'"]),
    ({"collectors": [{"address": "127.0.0.1:4739", "transport": "tcp"}]},
     ["collector 127.0.0.1:4739", "'b'", "'a'"]),
])
def test_conflicts_keep_the_older_exporter_and_name_both(spec_b, words):
    a = parse_exporter(body("a"))
    b = parse_exporter(body("b", "2026-01-02T00:00:00Z", **spec_b))
    result = plan([b, a], {"n1": {}, "n2": {}})
    assert set(result.conflicts["b"]) == {"n1", "n2"}
    message = result.conflicts["b"]["n1"]
    for word in words:
        assert word in message, message
    assert [o.name for o in result.nodes["n1"].owners] == ["a"]
    assert result.configured == {"a": ["n1", "n2"], "b": []}


def test_a_merge_the_agent_rejects_is_a_conflict():
    # b's template does not fit a's collector's message size: found by the agent's own rules
    a = parse_exporter(body("a", collectors=[{"address": "127.0.0.1:4739", "maxMessageSize": 64}],
                            templates=[{"id": 256, "fields": ["octetDeltaCount", "sourceIPv4Address"]}]))
    b = parse_exporter(body("b", "2026-01-02T00:00:00Z", collectors=[{"address": "127.0.0.2:4739"}],
                            templates=[{"id": 257, "fields": V4 + ["sourceIPv6Address", "destinationIPv6Address"]}]))
    result = plan([a, b], {"n": {}})
    assert "merged with FlowExporter 'a'" in result.conflicts["b"]["n"]
    assert "maxMessageSize" in result.conflicts["b"]["n"]


def test_rendering_is_deterministic():
    a, b = parse_exporter(body("a")), parse_exporter(body("b", "2026-01-02T00:00:00Z"))
    first = plan([a, b], {"n": {}}).nodes["n"]
    second = plan([b, a], {"n": {}}).nodes["n"]
    assert first.text == second.text and first.hash == config_hash(first.text)


def _lease(node, renewed, **report):
    return {"metadata": {"name": f"kipfix-agent-{node}", "annotations": {"kipfix.io/report": json.dumps(report)}},
            "spec": {"holderIdentity": node, "renewTime": renewed, "leaseDurationSeconds": 30}}


def test_status_counts_ready_nodes_and_names_problems():
    now = dt.datetime(2026, 1, 1, 12, 0, 0, tzinfo=dt.timezone.utc)
    fresh, old = "2026-01-01T11:59:55.000000Z", "2026-01-01T11:00:00.000000Z"
    reports = {r.node: r for r in map(status.parse_lease, [
        _lease("n1", fresh, configHash="h1"),
        _lease("n2", fresh, configHash="old"),
        _lease("n3", old, configHash="h3"),
        _lease("n4", fresh, configHash="h4", errors=["eth0: no such interface"]),
    ])}
    outcome = status.ExporterOutcome(name="a", generation=3, collectors="udp/127.0.0.1:4739",
                                     targeted=["n1", "n2", "n3", "n4", "n5", "n6"],
                                     configured=["n1", "n2", "n3", "n4", "n5"],
                                     conflicts={"n6": "template id 256 ..."}, in_force=True)
    hashes = {"n1": "h1", "n2": "h2", "n3": "h3", "n4": "h4", "n5": "h5"}
    result = status.exporter_status(outcome, hashes, reports, None, now)
    assert (result["nodesTargeted"], result["nodesConfigured"], result["nodesReady"]) == (6, 5, 1)
    assert result["nodesSummary"] == "1/6"
    assert {e["node"]: e["reason"] for e in result["nodeErrors"]} == {
        "n6": "Conflict", "n2": "ConfigPending", "n3": "AgentStale", "n4": "AgentError", "n5": "AgentMissing"}
    ready, degraded = result["conditions"]
    assert (ready["type"], ready["status"], ready["reason"], ready["observedGeneration"]) == (
        "Ready", "False", "NodesNotReady", 3)
    assert (degraded["status"], degraded["reason"]) == ("True", "Conflict")
    # lastTransitionTime stays while the status does not change
    later = status.exporter_status(outcome, hashes, reports, result["conditions"], now + dt.timedelta(seconds=9))
    assert later["conditions"] == result["conditions"]


def test_invalid_spec_status_says_previous_spec_stays():
    outcome = status.ExporterOutcome(name="a", generation=2, invalid="spec.templates[0].fields: unknown 'x'",
                                     in_force=True)
    result = status.exporter_status(outcome, {}, {}, None, dt.datetime.now(dt.timezone.utc))
    ready = result["conditions"][0]
    assert (ready["status"], ready["reason"]) == ("False", "InvalidSpec")
    assert ready["message"] == "spec.templates[0].fields: unknown 'x'; the previously applied spec stays in force"


def test_previous_valid_spec_is_rendered_while_the_current_is_invalid():
    from kipfix.operator.reconcile import LAST_VALID_ANNOTATION, exporter_or_previous

    good = body("a")
    bad = copy.deepcopy(good)
    bad["spec"]["templates"][0]["fields"] = ["noSuchElement"]
    bad["metadata"]["annotations"] = {LAST_VALID_ANNOTATION: json.dumps(good["spec"])}
    exporter, error, previous = exporter_or_previous(bad)
    assert previous and exporter.templates == ((256, tuple(V4), None),)
    assert error.startswith("spec.templates[0].fields: unknown information element 'noSuchElement'")
    del bad["metadata"]["annotations"]
    assert exporter_or_previous(bad)[0] is None


def test_pod_selections_render_into_the_agent_config_and_merge():
    web = body(interfaces={"host": {"names": ["eth0"]},
                           "pods": {"podSelector": {"matchLabels": {"app": "web"}}}})
    exporter = parse_exporter(web)
    assert exporter.pods["interfaces"] == ["eth0"]  # the default
    doc = yaml.safe_load(plan([exporter], {"n": {}}).nodes["n"].text)
    assert [s["names"] for s in doc["interfaces"]] == [["eth0"]]
    assert doc["pods"] == [{"podSelector": {"matchLabels": {"app": "web"}}, "interfaces": ["eth0"]}]
    db = body(name="b", created="2026-01-02T00:00:00Z", interfaces={"pods": {"namespaceSelector": {"matchLabels": {"team": "db"}},
                                             "interfaces": ["eth0", "net1"]}})
    merged = yaml.safe_load(plan([exporter, parse_exporter(db)], {"n": {}}).nodes["n"].text)
    assert merged["pods"] == [{"podSelector": {"matchLabels": {"app": "web"}}, "interfaces": ["eth0"]},
                              {"namespaceSelector": {"matchLabels": {"team": "db"}}, "interfaces": ["eth0", "net1"]}]
    assert merged["interfaces"] == doc["interfaces"]  # the pod-only exporter adds no host selection
    bad = body(interfaces={"pods": {"podSelector": {"matchExpressions": [{"key": "app", "operator": "Has"}]}}})
    with pytest.raises(SpecError, match=r"spec.interfaces.pods.podSelector.matchExpressions\[0\].operator: 'Has'"):
        parse_exporter(bad)


def test_agent_warnings_are_listed_but_leave_the_node_ready():
    now = dt.datetime(2026, 1, 1, 12, 0, 0, tzinfo=dt.timezone.utc)
    warning = "pods[0]: pods (podSelector {'matchLabels': {'app': 'web'}}) interfaces eth0 matches no running pod"
    report = status.parse_lease(_lease("n1", "2026-01-01T11:59:55.000000Z", configHash="h1", warnings=[warning]))
    outcome = status.ExporterOutcome(name="a", generation=1, targeted=["n1"], configured=["n1"])
    result = status.exporter_status(outcome, {"n1": "h1"}, {"n1": report}, None, now)
    assert result["nodesReady"] == 1
    assert result["nodeErrors"] == [{"node": "n1", "reason": "AgentWarning", "message": f"node n1: {warning}"}]
    ready, degraded = result["conditions"]
    assert (ready["status"], degraded["status"], degraded["reason"]) == ("True", "True", "AgentWarning")


def test_template_selections_render_and_follow_the_agents_rules():
    tcp = {"id": 256, "fields": V4 + ["tcpControlBits"], "select": {"protocols": ["tcp"]}}
    rest = {"id": 257, "fields": list(V4), "select": {"ipVersion": [4]}}
    exporter = parse_exporter(body("a", templates=[tcp, rest]))
    doc = yaml.safe_load(plan([exporter], {"n": {}}).nodes["n"].text)
    assert [(t["id"], t.get("select")) for t in doc["templates"]] == [(256, {"protocols": ["tcp"]}),
                                                                      (257, {"ipVersion": [4]})]
    # first match wins: a template that an earlier one leaves nothing to is a mistake, named by its spec path
    with pytest.raises(SpecError, match=r"^spec.templates\[1\] \(id 257\): takes no flow"):
        parse_exporter(body("b", templates=[dict(rest, id=256), dict(tcp, id=257)]))
    # the same template id selecting other flows in two FlowExporters conflicts
    other = parse_exporter(body("c", "2026-01-02T00:00:00Z", templates=[dict(tcp, select={"protocols": ["udp"]})]))
    result = plan([exporter, other], {"n": {}})
    assert "template id 256 selects {'protocols': ['udp']}" in result.conflicts["c"]["n"]
