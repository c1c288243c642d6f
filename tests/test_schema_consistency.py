"""The copies of the configuration's rules equal the rules.

The agent's schema (kipfix.agent.config: rules.py, applied by parse.py)
owns every value rule. The FlowExporter CRD repeats some as OpenAPI ranges,
enums, patterns, lengths and defaults, and as CEL rules, so the API server
refuses a bad spec before the operator sees it; the Helm chart's
values.schema.json repeats ports and log levels. Each copy is compared with
the rule here; each CEL rule must have a spec it refuses that the operator
(the agent's parse underneath) refuses too.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import yaml

from kipfix.agent import contract, labelselector
from kipfix.agent.cli import build_parser
from kipfix.agent.config import rules
from kipfix.agent.datapath.meter import BPFFS
from kipfix.agent.export.address import split_address
from kipfix.agent.export.ipfix.fields import fillable_names
from kipfix.operator.spec import SpecError, parse_exporter

REPO = Path(__file__).resolve().parent.parent
CRD = REPO / "crds" / "flowexporter.yaml"
CHART = REPO / "deploy" / "helm" / "kipfix"


def crd_spec() -> dict:
    schema = yaml.safe_load(CRD.read_text())["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema["properties"]["spec"]


SPEC = crd_spec()
COLLECTOR = SPEC["properties"]["collectors"]["items"]["properties"]
TEMPLATE = SPEC["properties"]["templates"]["items"]
INTERFACES = SPEC["properties"]["interfaces"]["properties"]


def bounds(schema: dict) -> tuple:
    return schema["minimum"], schema["maximum"]


def test_collector_fields_equal_the_agent_rules():
    assert COLLECTOR["address"]["pattern"] == rules.COLLECTOR_ADDRESS_PATTERN
    assert COLLECTOR["address"]["maxLength"] == rules.COLLECTOR_ADDRESS_MAX_LENGTH
    assert tuple(COLLECTOR["transport"]["enum"]) == rules.TRANSPORTS
    assert COLLECTOR["transport"]["default"] == "udp"
    assert bounds(COLLECTOR["maxMessageSize"]) == rules.MESSAGE_SIZE_RANGE
    assert COLLECTOR["maxMessageSize"]["default"] == rules.DEFAULT_MESSAGE_SIZE
    assert COLLECTOR["description"]["maxLength"] == rules.DESCRIPTION_MAX_LENGTH
    assert tuple(COLLECTOR["pacing"]["enum"]) == rules.PACING
    assert bounds(COLLECTOR["maxMessagesPerSecond"]) == rules.MESSAGE_RATE_RANGE
    assert bounds(COLLECTOR["sendBuffer"]) == rules.SEND_BUFFER_RANGE
    tls = COLLECTOR["tls"]["properties"]
    assert tls["secretName"]["pattern"] == rules.SECRET_NAME_PATTERN
    assert tls["secretName"]["maxLength"] == rules.SECRET_NAME_MAX_LENGTH
    assert tls["serverName"]["maxLength"] == rules.SERVER_NAME_MAX_LENGTH


@pytest.mark.parametrize("address", ["192.0.2.10:4739", "collector.kipfix.svc:4739", "[2001:db8::1]:4739",
                                     "[fe80::1%eth0]:4739", "my_host-1.example:1"])
def test_an_address_the_crd_pattern_takes_splits_as_the_agent_splits_it(address):
    assert re.fullmatch(rules.COLLECTOR_ADDRESS_PATTERN, address)
    split_address(address)


def test_template_fields_equal_the_agent_rules():
    assert TEMPLATE["properties"]["id"]["maximum"] == rules.TEMPLATE_ID_RANGE[1]
    assert [v["rule"] for v in TEMPLATE["x-kubernetes-validations"]] == [f"self.id >= {rules.TEMPLATE_ID_RANGE[0]}"]
    assert f"accepted: {rules.TEMPLATE_ID_RANGE[0]}..{rules.TEMPLATE_ID_RANGE[1]}" in \
        TEMPLATE["x-kubernetes-validations"][0]["message"]
    names = TEMPLATE["properties"]["fields"]["items"]
    assert names["maxLength"] == rules.ELEMENT_NAME_MAX_LENGTH
    # every element the agent can fill, in either spelling it accepts, passes the CRD
    for name in set(fillable_names()) | {n[0].upper() + n[1:] for n in fillable_names()}:
        assert re.fullmatch(names["pattern"], name) and len(name) <= names["maxLength"], name


def test_interface_and_pod_fields_equal_the_agent_rules():
    host = INTERFACES["host"]["properties"]
    pods = INTERFACES["pods"]["properties"]
    for patterns in (host["names"], host["exclude"], pods["interfaces"]):
        assert patterns["items"]["maxLength"] == rules.INTERFACE_PATTERN_MAX_LENGTH
    assert tuple(pods["interfaces"]["default"]) == rules.DEFAULT_POD_INTERFACES
    for selector in (SPEC["properties"]["nodeSelector"], pods["podSelector"], pods["namespaceSelector"]):
        operator = selector["properties"]["matchExpressions"]["items"]["properties"]["operator"]
        assert tuple(operator["enum"]) == labelselector.OPERATORS


def test_agent_settings_equal_the_agent_rules():
    timeouts = SPEC["properties"]["timeouts"]["properties"]
    for key, default in (("idle", contract.DEFAULT_IDLE_TIMEOUT), ("active", contract.DEFAULT_ACTIVE_TIMEOUT)):
        assert timeouts[key]["maximum"] == rules.TIMEOUT_MAX
        assert timeouts[key]["minimum"] > 0  # the agent takes any number of seconds > 0; the CRD whole ones
        assert timeouts[key]["default"] == default
    assert bounds(SPEC["properties"]["maxFlows"]) == rules.MAX_FLOWS_RANGE
    assert SPEC["properties"]["maxFlows"]["default"] == contract.DEFAULT_MAX_FLOWS
    fixed = SPEC["properties"]["observationDomainId"]["properties"]["fixed"]
    assert bounds(fixed) == rules.OBSERVATION_DOMAIN_ID_RANGE


def test_the_chart_copy_of_the_crd_is_the_crd():
    assert (CHART / "crds" / "flowexporter.yaml").read_text() == CRD.read_text()


# ---- CEL: every rule the API server applies, the operator applies too ---------------------------------

def body(**spec) -> dict:
    base = {"collectors": [{"address": "192.0.2.10:4739"}],
            "templates": [{"id": 256, "fields": ["sourceIPv4Address", "octetDeltaCount"]}],
            "interfaces": {"host": {"names": ["eth0"]}}}
    base.update(copy.deepcopy(spec))
    return {"metadata": {"name": "fe", "uid": "u"}, "spec": base}


# CEL rule (as written in the CRD) -> specs it refuses -> what the operator says about each
CEL_MIRRORS = {
    "self.templates.all(t, self.templates.exists_one(u, u.id == t.id))": [
        (body(templates=[{"id": 300, "fields": ["octetDeltaCount"]}] * 2),
         "spec.templates[1].id: 300 is already used by spec.templates[0]")],
    "!has(self.timeouts) || !has(self.timeouts.idle) || !has(self.timeouts.active) || "
    "self.timeouts.idle <= self.timeouts.active": [
        (body(timeouts={"idle": 61, "active": 60}), "spec.timeouts.idle: 61 s is longer than spec.timeouts.active")],
    "(self.operator in ['In', 'NotIn']) == (has(self.values) && size(self.values) > 0)": [
        (body(nodeSelector={"matchExpressions": [{"key": "a", "operator": "In"}]}),
         "spec.nodeSelector.matchExpressions[0].values: required and non-empty for In/NotIn"),
        (body(nodeSelector={"matchExpressions": [{"key": "a", "operator": "Exists", "values": ["x"]}]}),
         "spec.nodeSelector.matchExpressions[0].values: required and non-empty for In/NotIn, forbidden for Exists")],
    "has(self.tls) == (has(self.transport) && self.transport == 'tls')": [
        (body(collectors=[{"address": "192.0.2.10:4739", "transport": "tls"}]),
         "spec.collectors[0].tls.secretName: None is not a Secret name"),
        (body(collectors=[{"address": "192.0.2.10:4739", "tls": {"secretName": "s"}}]),
         "spec.collectors[0].tls: only valid with transport tls")],
    "!(has(self.pacing) || has(self.maxMessagesPerSecond)) || !has(self.transport) || self.transport == 'udp'": [
        (body(collectors=[{"address": "192.0.2.10:4739", "transport": "tcp", "pacing": "none"}]),
         "spec.collectors[0].pacing: only for transport udp"),
        (body(collectors=[{"address": "192.0.2.10:4739", "transport": "tcp", "maxMessagesPerSecond": 10}]),
         "spec.collectors[0].maxMessagesPerSecond: only for transport udp")],
    f"self.id >= {rules.TEMPLATE_ID_RANGE[0]}": [
        (body(templates=[{"id": 255, "fields": ["octetDeltaCount"]}]),
         "spec.templates[0].id: 255 is out of range; accepted: 256..65535")],
    "has(self.host) || has(self.pods)": [
        (body(interfaces={}), "spec.interfaces: give host (names in the node's network namespace), pods, or both")],
    "has(self.fixed) != (has(self.perNode) && self.perNode)": [
        (body(observationDomainId={"fixed": 1, "perNode": True}),
         "spec.observationDomainId: give exactly one of fixed or perNode: true (both given)"),
        (body(observationDomainId={}), "spec.observationDomainId: give exactly one of fixed or perNode: true "
                                       "(neither given)")],
}


def cel_rules(schema, found=None) -> list[str]:
    found = [] if found is None else found
    if isinstance(schema, dict):
        found += [v["rule"] for v in schema.get("x-kubernetes-validations", ())]
        for value in schema.values():
            cel_rules(value, found)
    elif isinstance(schema, list):
        for value in schema:
            cel_rules(value, found)
    return found


def test_every_cel_rule_has_a_mirror_in_the_schema():
    assert set(cel_rules(SPEC)) == set(CEL_MIRRORS)


@pytest.mark.parametrize("rule, spec, message", [(rule, spec, message) for rule, cases in CEL_MIRRORS.items()
                                                 for spec, message in cases])
def test_what_a_cel_rule_refuses_the_operator_refuses(rule, spec, message):
    with pytest.raises(SpecError) as err:
        parse_exporter(spec)
    assert str(err.value).startswith(message), str(err.value)


def test_the_specs_the_cel_rules_allow_pass():
    parse_exporter(body(observationDomainId={"perNode": True}))
    parse_exporter(body(observationDomainId={"fixed": 7}))
    parse_exporter(body(timeouts={"idle": 60, "active": 60}))
    parse_exporter(body(collectors=[{"address": "[fe80::1%eth0]:4739", "transport": "tls",
                                     "tls": {"secretName": "collector-tls"}}]))


# ---- the chart -------------------------------------------------------------------------------------------

def chart_schema() -> dict:
    return json.loads((CHART / "values.schema.json").read_text())["properties"]


def chart_values() -> dict:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def test_the_chart_ports_equal_the_agent_and_operator_rules():
    schema, values = chart_schema(), chart_values()
    assert bounds(schema["agent"]["properties"]["metricsPort"]) == rules.PORT_RANGE
    # the rendered node config has no metrics section: the agent listens on its default port
    assert values["agent"]["metricsPort"] == contract.DEFAULT_METRICS_PORT
    port = schema["operator"]["properties"]["metrics"]["properties"]["port"]
    assert bounds(port) == rules.PORT_RANGE
    assert values["operator"]["metrics"]["port"] == contract.DEFAULT_OPERATOR_METRICS_PORT


def test_the_chart_log_levels_are_the_command_lines(capsys):
    from kipfix.operator.__main__ import main as operator_main

    schema = chart_schema()
    agent_choices = next(a.choices for a in build_parser()._actions if a.dest == "log_level")
    with pytest.raises(SystemExit):
        operator_main(["--log-level", "loud"])  # argparse lists the choices it takes
    operator_choices = re.findall(r"'(\w+)'", capsys.readouterr().err.split("choose from", 1)[1])
    assert schema["agent"]["properties"]["logLevel"]["enum"] == list(agent_choices)
    assert schema["operator"]["properties"]["logLevel"]["enum"] == operator_choices


def test_the_chart_mounts_bpffs_where_the_default_pin_path_is():
    daemonset = (CHART / "templates" / "agent-daemonset.yaml").read_text()
    mount = re.search(r"- name: bpffs\n\s+mountPath: (\S+)", daemonset).group(1)
    assert mount == BPFFS and contract.DEFAULT_PIN_PATH.startswith(mount + "/")
    assert re.fullmatch(rules.PIN_PATH_PATTERN, contract.DEFAULT_PIN_PATH)
    assert chart_schema()["agent"]["properties"]["hostPaths"]["properties"]["bpffs"]["pattern"] == "^/"


def test_template_selection_equals_the_agent_rules():
    select = TEMPLATE["properties"]["select"]["properties"]
    assert tuple(select["ipVersion"]["items"]["enum"]) == rules.SELECT_IP_VERSIONS
    assert select["protocols"]["maxItems"] == rules.PROTOCOL_RANGE[1] - rules.PROTOCOL_RANGE[0] + 1
    assert select["protocols"]["items"]["x-kubernetes-int-or-string"] is True
