"""The C data-record encoder gives the Python packer's bytes, for every element.

Both packers are compiled from the same template by fields.compile_flow_packer
(the Python one with KIPFIX_ENCODER=python) and fed the same records, routes
and pods; the Python packer is the reference the round-trip tests check
against tshark and the built-in collector.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import ipaddress
import struct
import sys

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from kipfix.agent.flows.record import FlowRecord
from kipfix.agent.export.ipfix import fields, flowpack
from kipfix.agent.export.ipfix.dummy import dummy_records
from kipfix.agent.export.ipfix.infomodel import reduced_lengths, table
from kipfix.agent.export.ipfix.template import Template
from kipfix.agent.kube.podmeta import PodIndex, PodInfo, Succession

from test_ipfix_properties import flow_records

EVERY = tuple(fields.fillable_names())
# every element at every reduced size it may take (RFC 7011 6.2), from the element table
REDUCED = tuple(f"{row.name}:{n}" for row in table().fillable() if row.type.startswith("unsigned")
                for n in reduced_lengths(row.type))
INIT_MS = 1_700_000_000_000


class Routes:
    """A route resolver's shape: ``route(netns, address)`` and its ``cache`` keyed (netns, address)."""

    def __init__(self, cached=()):
        self.cache = {}
        self.calls = 0
        for netns, address in cached:
            self.cache[(netns, address)] = self.compute(address)

    @staticmethod
    def compute(address: bytes) -> tuple[int, bytes]:
        return address[0] % (33 if len(address) == 4 else 129), bytes(reversed(address))

    def __call__(self, netns: str, address: bytes) -> tuple[int, bytes]:
        self.calls += 1
        return self.compute(address)


class Pods:
    """A pod index's shape: ``encoded_by_address`` and calling it."""

    def __init__(self, owners: dict[bytes, tuple[bytes, ...]]):
        self.encoded_by_address = owners

    def __call__(self, address: bytes):
        return self.encoded_by_address.get(address, fields.NOPOD)


def packers(names, family, routes, pods, monkeypatch):
    """(C packer, Python packer) for ``names`` under template 256."""
    template = Template(256, fields.elements(names, 32473))
    def compile_():
        return fields.compile_flow_packer(template, observation_domain_id=7, exporting_process_id=4242,
                                          system_init_ms=INIT_MS, route=routes, pods=pods, family=family)

    fast = compile_()
    monkeypatch.setenv("KIPFIX_ENCODER", "python")
    slow = compile_()
    monkeypatch.delenv("KIPFIX_ENCODER")
    assert type(fast).__name__ == "Packer" and type(slow).__name__ == "function"
    return fast, slow


def test_the_extension_is_built_and_has_a_step_for_every_fillable_element(monkeypatch):
    assert flowpack.AVAILABLE, "kipfix.agent.export.ipfix._flowpack is not built: pip install -e . needs gcc and python3-dev"
    for name in EVERY:  # one template per element: a packer for all of them could hide one the C encoder lacks
        for family in (None, 4, 6):
            fast, _ = packers([name], family, Routes(), Pods({}), monkeypatch)


pod_values = st.tuples(*[st.binary(max_size=20)] * 5)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(records=st.lists(flow_records(), max_size=30),
       names=st.lists(st.sampled_from(EVERY + REDUCED), min_size=1, unique_by=lambda f: f.partition(":")[0])
       | st.just(list(EVERY)),
       family=st.sampled_from((None, 4, 6)), pod_values=st.lists(pod_values, max_size=5),
       by_call=st.booleans(), data=st.data())
def test_same_bytes_as_the_python_packer(records, names, family, pod_values, by_call, data, monkeypatch):
    if family is not None:
        records = [r for r in records if r.key.ip_version == family]
    addresses = [a for r in records for a in (r.key.src, r.key.dst)]
    cached = data.draw(st.lists(st.sampled_from(addresses), unique=True) if addresses else st.just([]))
    routes = Routes((r.netns, a) for r in records for a in (r.key.src, r.key.dst) if a in cached)
    owners = {a: v for a, v in zip(data.draw(st.permutations(addresses)), pod_values)}
    for address in list(owners):  # some IPs changed owner around the time a flow ended
        ended = [r.end_ns for r in records]
        taken_at = data.draw(st.none() | st.sampled_from(ended).flatmap(lambda t: st.sampled_from((t, t + 1))))
        if taken_at is not None:
            previous = tuple(v[::-1] + b"-before" for v in owners[address])
            owners[address] = Succession(((0, "u-before", previous), (taken_at, "u-now", owners[address])))
    pods = Pods(owners)
    pods_arg = (lambda a: pods(a)) if by_call else pods  # a plain lookup function, or an index to read
    fast, slow = packers(names, family, routes, pods_arg, monkeypatch)
    assert fast(records) == slow(records)
    assert list(fast.saturated) == slow.saturated  # values too large for a reduced size, per element


@pytest.mark.parametrize("size", [0, 1, 254, 255, 256, 300, 65535, 70000])
@pytest.mark.parametrize("where", ["interface_name", "netns", "pod"])
def test_variable_length_fields_at_their_boundaries(size, where, monkeypatch):
    record = dummy_records(1)[0]
    text = "\u00e9" * (size // 2) + "x" * (size % 2)  # two octets each in UTF-8: size octets in all
    pods = Pods({})
    if where == "pod":
        pods.encoded_by_address[record.key.src] = (text.encode(), b"ns", b"", b"w" * 255, b"Deployment")
    else:
        record = dataclasses.replace(record, **{where: text})
    fast, slow = packers(EVERY, None, Routes(), pods, monkeypatch)
    (packed,) = fast([record])
    assert packed == slow([record])[0]
    assert len(text.encode()) == size and (size < 255 or b"\xff" + min(size, 65535).to_bytes(2, "big") in packed)


def test_records_of_another_type_are_read_through_their_attributes(monkeypatch):
    # FlowRecord's fields without __slots__: the packer cannot read them at FlowRecord's slot offsets
    Other = dataclasses.make_dataclass("Other", [(f.name, f.type, dataclasses.field(default=f.default))
                                                 for f in dataclasses.fields(FlowRecord)])
    records = dummy_records(50)
    others = [Other(**{f.name: getattr(r, f.name) for f in dataclasses.fields(FlowRecord)}) for r in records]
    fast, slow = packers(EVERY, None, Routes(), Pods({}), monkeypatch)
    assert fast(others) == slow(records) == fast(records)

    class Computed(Other):  # values made anew at every read: the packer must hold them while it uses them
        @property
        def interface_name(self):
            return "".join(["veth", "-computed-", str(len(self.netns))])

        @interface_name.setter
        def interface_name(self, value):
            pass

        @property
        def octets(self):
            return self._octets + 2**63  # a fresh multi-digit int

        @octets.setter
        def octets(self, value):
            self._octets = value

    computed = [Computed(**{f.name: getattr(r, f.name) for f in dataclasses.fields(FlowRecord)}) for r in records]
    expected = [dataclasses.replace(r, interface_name=c.interface_name, octets=c.octets)
                for r, c in zip(records, computed)]
    assert fast(computed) == slow(expected)


@pytest.mark.parametrize("change, element", [
    ({"vlan_id": 65536}, "vlanId"),
    ({"min_ttl": 256}, "minimumTTL"),
    ({"packets": -1}, "packetDeltaCount"),
    ({"octets": 2**64}, "octetDeltaCount"),
    ({"tos": "4"}, "ipClassOfService"),
])
def test_values_out_of_range_raise_struct_error_like_struct_pack(change, element, monkeypatch):
    record = dataclasses.replace(dummy_records(1)[0], **change)
    fast, slow = packers([element, "interfaceName"], None, Routes(), Pods({}), monkeypatch)
    for pack in (fast, slow):
        with pytest.raises(struct.error):
            pack([record])


@contextlib.contextmanager
def references_unchanged(held):
    """The block must leave every object in ``held`` with the reference count it had (gc off meanwhile)."""
    gc.collect()  # packers of earlier tests, in reference cycles, also hold NOPOD until collected
    gc.disable()
    try:
        before = [sys.getrefcount(v) for v in held]
        yield
        assert [sys.getrefcount(v) for v in held] == before
    finally:
        gc.enable()


def test_a_failing_lookup_propagates_and_leaks_nothing(monkeypatch):
    records = dummy_records(40)
    routes = Routes((r.netns, a) for r in records[:20] for a in (r.key.src, r.key.dst))
    owners = {r.key.src: (b"pod", b"ns", b"node", b"w", b"Deployment") for r in records[::3]}
    bad = records[30].key.dst  # its source route and pod are looked up before its destination route fails

    def broken_route(netns, address):
        if address == bad:
            raise RuntimeError(f"no route for {address.hex()}")
        return routes(netns, address)

    def broken_pods(address):
        if address == bad:
            raise RuntimeError(f"no pod index for {address.hex()}")
        return owners.get(address, fields.NOPOD)

    fast, _ = packers(EVERY, None, routes, Pods(owners), monkeypatch)
    no_route, _ = packers(EVERY, None, broken_route, Pods(owners), monkeypatch)
    no_pod, _ = packers(EVERY, None, routes, broken_pods, monkeypatch)
    held = list(routes.cache.values()) + list(owners.values()) + [fields.NOPOD]
    with references_unchanged(held):  # every looked-up tuple released
        for _ in range(200):
            fast(records)
    with references_unchanged(held):
        for _ in range(50):
            with pytest.raises(RuntimeError, match="no route"):
                no_route(records)
            with pytest.raises(RuntimeError, match="no pod index"):
                no_pod(records)


def test_pods_are_named_as_they_were_when_the_flow_ended(monkeypatch):
    records = [r for r in dummy_records(20) if r.key.ip_version == 4][:4]
    records = [dataclasses.replace(r, end_ns=t) for r, t in zip(records, (10, 20, 29, 30))]
    clock = iter((5, 30)).__next__
    index = PodIndex(clock=clock)
    for name in ("old", "new"):  # one IP, the sources of all four records, passed on at 30
        index.upsert(PodInfo(f"u-{name}", name, "ns", "node", (str(ipaddress.ip_address(records[0].key.src)),),
                             phase="Running"))
    records = [dataclasses.replace(r, key=r.key._replace(src=records[0].key.src)) for r in records]
    for pods in (index, lambda a: index.encoded_by_address.get(a, fields.NOPOD)):  # read, or called
        fast, slow = packers(["sourcePodName"], 4, Routes(), pods, monkeypatch)
        assert fast(records) == slow(records) == [b"\x03old", b"\x03old", b"\x03old", b"\x03new"]


def test_a_failing_succession_propagates_and_leaks_nothing(monkeypatch):
    records = dummy_records(30)
    owners = {r.key.src: (b"pod", b"ns", b"node", b"w", b"Deployment") for r in records}

    def broken(end_ns):
        raise RuntimeError("no owner")

    owners[records[20].key.src] = broken
    fast, _ = packers(EVERY, None, Routes(), Pods(owners), monkeypatch)
    with references_unchanged([owners[records[0].key.src], broken, records[0].end_ns]):
        for _ in range(100):
            with pytest.raises(RuntimeError, match="no owner"):
                fast(records)


def test_cached_routes_are_not_looked_up_again(monkeypatch):
    records = [r for r in dummy_records(40) if r.key.ip_version == 4]
    routes = Routes((r.netns, a) for r in records for a in (r.key.src, r.key.dst))
    fast, _ = packers(["sourceIPv4PrefixLength", "ipNextHopIPv4Address"], 4, routes, None, monkeypatch)
    fast(records)
    assert routes.calls == 0
    routes.cache.clear()  # the resolver clears in place on a route change
    fast(records)
    assert routes.calls == 2 * len(records)
