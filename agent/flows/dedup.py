"""One count per packet when both ends of a pod's veth are metered.

A packet a pod sends leaves its ``eth0`` (egress) and enters the host-side
end of the veth (ingress); one it receives does the reverse. When a
FlowExporter selects both the pod's interface and the host's veths, every
such packet would be metered twice. The pod's own interface is the
observation point that wins: it knows the pod, and it is the same on every
CNI. A flow metered on the host-side end of a metered pod's veth is dropped
when its twin (same addresses, ports and protocol, opposite direction, on
the pod's interface) was metered too, in the same drain or still in the
flow cache. A host-side flow without a twin is held for one drain (the two
ends of a veth can fall on either side of a table swap) and then kept:
those are packets the pod's interface never saw.

Flows of veths whose pod side is not metered are untouched: then the host
side is the only observation point.
"""

from __future__ import annotations

from typing import Callable, Iterable

from .record import FlowCounters, FlowKey

Flow = tuple[int, FlowKey, FlowCounters]  # (netns id, key, counters), as drained
Endpoint = tuple[int, int]  # (netns id, ifindex)


class VethDedup:
    def __init__(self) -> None:
        self.pairs: dict[Endpoint, Endpoint] = {}  # host-side end -> pod-side end
        self._held: list[Flow] = []
        self.dropped_packets = 0
        self.dropped_octets = 0

    def set_pairs(self, pairs: dict[Endpoint, Endpoint]) -> None:
        self.pairs = dict(pairs)

    def _twin(self, netns_id: int, key: FlowKey) -> tuple[int, FlowKey] | None:
        pod_side = self.pairs.get((netns_id, key.ifindex))
        if pod_side is None:
            return None
        return pod_side[0], key._replace(ifindex=pod_side[1], direction=1 - key.direction)

    def filter(self, flows: list[Flow], in_cache: Callable[[tuple[int, FlowKey]], bool],
               final: bool = False) -> list[Flow]:
        """``flows`` without the host-side records whose pod-side twin is metered.

        ``in_cache((netns_id, key))`` says whether the flow cache holds a flow;
        ``final``: nothing is held back (the last drain)."""
        if not self.pairs and not self._held:
            return flows
        seen = {(netns_id, key) for netns_id, key, _ in flows}
        out: list[Flow] = []
        held: list[Flow] = []
        for age, batch in ((1, self._held), (0, flows)):
            for flow in batch:
                twin = self._twin(flow[0], flow[1])
                if twin is None:
                    out.append(flow)
                elif twin in seen or in_cache(twin):
                    self.dropped_packets += flow[2].packets
                    self.dropped_octets += flow[2].octets
                elif age or final:
                    out.append(flow)
                else:
                    held.append(flow)
        self._held = held
        return out

    def held(self) -> Iterable[Flow]:
        return list(self._held)

    def hold(self, flows: Iterable[Flow]) -> None:
        """Hold ``flows`` again (they were held when the previous agent was killed)."""
        self._held.extend(flows)
