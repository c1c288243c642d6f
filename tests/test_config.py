"""Configuration errors name the key, the bad value and what is accepted."""

import pytest

from kipfix.agent.config import ConfigError, load_config, parse_config

MINIMAL_TEMPLATE = ["FlowEndMilliseconds", "FlowStartMilliseconds", "OctetDeltaCount", "PacketDeltaCount",
                    "IpVersion", "FlowDirection", "SourceIPv4Address", "DestinationIPv4Address"]


def full():
    return {
        "collectors": [{"address": "127.0.0.1:4739"}, {"address": "[::1]:4740", "transport": "tcp"}],
        "templates": [{"id": 1024, "template": list(MINIMAL_TEMPLATE)}],
        "interfaces": [{"netns": "", "names": ["eth0", "veth*", "/^en/"], "exclude": ["veth9"]}],
        "timeouts": {"idle": 5, "active": 30},
        "maxFlows": 1024,
    }


def test_a_complete_file_loads_with_defaults(tmp_path):
    path = tmp_path / "kipfix.yaml"
    import yaml
    path.write_text(yaml.safe_dump(full()))
    config = load_config(str(path))
    assert [c.port for c in config.collectors] == [4739, 4740]
    assert config.collectors[1].transport == "tcp"
    assert config.templates[0].fields == tuple(MINIMAL_TEMPLATE)
    assert config.interfaces[0].names == ("eth0", "veth*", "/^en/")
    assert (config.timeouts.idle, config.timeouts.active, config.max_flows) == (5, 30, 1024)
    assert config.drain_interval == 1.0 and config.observation_domain_id == 1


def test_defaults_follow_the_issue():
    config = parse_config({})
    assert (config.timeouts.idle, config.timeouts.active) == (15.0, 60.0)


@pytest.mark.parametrize("change, expected", [
    (lambda c: c.update(colectors=[]), "colectors: unknown key; accepted keys here: collectors"),
    (lambda c: c["timeouts"].update(idle=-1), "timeouts.idle: -1 is out of range; accepted: > 0"),
    (lambda c: c["timeouts"].update(active=0), "timeouts.active: 0 is out of range"),
    (lambda c: c["timeouts"].update(idle=90), "timeouts.idle: 90 s is longer than timeouts.active"),
    (lambda c: c["timeouts"].update(idle="soon"), "timeouts.idle: 'soon' is not a number of seconds"),
    (lambda c: c.update(maxFlows=5), "maxFlows: 5 is out of range; accepted: 16..16777216"),
    (lambda c: c.update(maxFlows=10**9), "maxFlows: 1000000000 is out of range"),
    (lambda c: c.update(maxFlows="many"), "maxFlows: 'many' is not an integer"),
    (lambda c: c["interfaces"][0].update(names=["/[/"]), "interfaces[0].names:"),
    (lambda c: c["interfaces"][0].update(names=[]), "interfaces[0].names: empty"),
    (lambda c: c["interfaces"][0].update(nets="x"), "interfaces[0].nets: unknown key"),
    (lambda c: c["templates"][0].update(id=255), "templates[0].id: 255 is out of range; accepted: 256..65535"),
    (lambda c: c["templates"].append({"id": 1024, "template": ["OctetDeltaCount"]}),
     "templates[1].id: 1024 is already used by templates[0]"),
    (lambda c: c["templates"][0]["template"].append("FooBarCount"), "templates[0].template:"),
    (lambda c: c["templates"][0]["template"].append("bgpSourceAsNumber"), "bgpSourceAsNumber"),
    (lambda c: c["collectors"][0].update(address="no-port"), "collectors[0].address:"),
    (lambda c: c["collectors"][0].update(transport="sctp"),
     "collectors[0].transport: 'sctp' is not accepted; accepted: udp, tcp, tls"),
    (lambda c: c["collectors"][0].update(transport="tls"), "collectors[0].tls.ca: required for transport tls"),
    (lambda c: c["collectors"][0].update(transport="tls", tls={"ca": "/ca.pem", "cert": "/c.pem"}),
     "collectors[0].tls: cert and key go together"),
    (lambda c: c["collectors"][0].update(address="my collector:4739"),
     "collectors[0].address: collector address 'my collector:4739' has characters no host name has; accepted: "
     "host:port, IPv4:port or [IPv6]:port"),
    (lambda c: c["interfaces"][0].update(netns="a/b"),
     "interfaces[0].netns: 'a/b' is not accepted; accepted: \"\" or host (the host's netns), a name from `ip netns` "
     "(no '/'), or an absolute path such as /proc/PID/ns/net"),
    (lambda c: c.update(pinPath="kipfix"), "pinPath: 'kipfix' is not accepted; accepted: an absolute path on a bpf "
     "filesystem such as /sys/fs/bpf/kipfix"),
    (lambda c: c.update(pinPath='/sys/fs/bpf/a"b'), "pinPath: '/sys/fs/bpf/a\"b' is not accepted"),
    (lambda c: c.update(jsonLines=""), "jsonLines: empty; accepted: a file path, or - for stdout"),
    (lambda c: c["collectors"][0].update(maxMessageSize=60),
     "collectors[0].maxMessageSize: 60 is out of range; accepted: 64..65535"),
    # both families named: sent as an IPv4 part (42 octets) and an IPv6 part without the IPv4 addresses:
    # header 16 + set header 4 + record 42 - 8 + 16 = 70 octets
    (lambda c: c["collectors"][0].update(maxMessageSize=64) or
     c["templates"][0]["template"].append("sourceIPv6Address"),
     "collectors[0].maxMessageSize: 64 octets cannot hold one record of template 1024 (70 octets with headers);"
     " accepted: >= 70"),
    (lambda c: c["templates"][0].update(select={"ipVersion": 5}),
     "templates[0].select.ipVersion: 5 is not accepted; accepted: 4, 6 or [4, 6]"),
    (lambda c: c["templates"][0].update(select={"protocols": ["tcp", "smtp"]}),
     "templates[0].select.protocols[1]: 'smtp' is not a protocol; accepted: 0..255 or a name (icmp, igmp"),
    (lambda c: c["templates"][0].update(select={"protocols": [300]}),
     "templates[0].select.protocols[0]: 300 is out of range; accepted: 0..255 or a name"),
    (lambda c: c["templates"][0].update(select={"protocol": ["tcp"]}),
     "templates[0].select.protocol: unknown key; accepted keys here: ipVersion, protocols"),
    (lambda c: c["templates"][0].update(select={"ipVersion": 6}),
     "templates[0] (id 1024): select.ipVersion [6] leaves out IPv4 flows, but the template names IPv4 addresses "
     "(sourceIPv4Address, destinationIPv4Address); accepted: select IPv4 too, or remove those elements"),
    (lambda c: c["templates"][0].update(select={"ipVersion": [4, 6]}),
     "templates[0] (id 1024): select.ipVersion takes IPv6 flows, but the template names only IPv4 addresses"),
    # first match wins: a template every flow of which an earlier one takes is a mistake
    (lambda c: c["templates"].append({"id": 1025, "template": ["octetDeltaCount", "sourceIPv4Address"],
                                      "select": {"protocols": ["udp"]}}),
     "templates[1] (id 1025): takes no flow: every flow it selects (IPv4 flows of protocol udp) goes to an "
     "earlier template (1024); accepted: a flow goes to the first template that selects it, so put narrower "
     "selections (select.protocols) first"),
])
def test_each_mistake_gets_one_clear_message(change, expected):
    config = full()
    change(config)
    with pytest.raises(ConfigError) as err:
        parse_config(config)
    assert expected in str(err.value)


def test_invalid_yaml_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("collectors: [\n")
    with pytest.raises(ConfigError, match=f"{path}: invalid YAML"):
        load_config(str(path))


def test_missing_file():
    with pytest.raises(ConfigError, match="cannot read config file '/nonexistent.yaml'"):
        load_config("/nonexistent.yaml")


def test_link_local_collectors_keep_their_zone():
    config = parse_config({"collectors": [{"address": "[fe80::1%eth0]:4739"}],
                           "templates": [{"id": 256, "template": ["octetDeltaCount"]}]})
    assert (config.collectors[0].host, config.collectors[0].port) == ("fe80::1%eth0", 4739)


def test_parsing_never_resolves_or_reads_files():
    # names that do not resolve and files that do not exist are the resolve step's business (test_config_resolve)
    config = parse_config({"collectors": [{"address": "collector.invalid:4739", "transport": "tls",
                                           "tls": {"ca": "/nonexistent/ca.pem"}}],
                           "templates": [{"id": 256, "template": ["octetDeltaCount"]}],
                           "interfaces": [{"netns": "/nonexistent/ns", "names": ["eth0"]}],
                           "jsonLines": "/nonexistent/flows.jsonl", "pinPath": "/nonexistent/pins"})
    assert config.collectors[0].tls.ca_file == "/nonexistent/ca.pem"


HUGE = "x" * 1_000_000


@pytest.mark.parametrize("config", [
    {HUGE: 1},
    {"maxFlows": HUGE},
    {"maxFlows": [HUGE] * 1000},
    {"timeouts": [[[[HUGE]]]]},
    {"collectors": [{"address": HUGE}]},
    {"templates": [{"id": 256, "template": [HUGE]}]},
    {"interfaces": [{"names": [HUGE]}]},
    {"interfaces": [{"netns": HUGE, "names": ["eth0"]}]},
    {"pods": [{"podSelector": {"matchLabels": {"app": [HUGE]}}}]},
    {"pinPath": HUGE},
    {"metrics": {"address": HUGE}},
])
def test_a_message_never_prints_a_huge_value(config):
    with pytest.raises(ConfigError) as err:
        parse_config(config)
    assert len(str(err.value)) < 500, str(err.value)[:1000]
    assert "xxxxxxxxxx" in str(err.value) or "[[[[...]]]]" in str(err.value)
