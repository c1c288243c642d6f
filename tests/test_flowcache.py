"""Flow cache timeouts and end reasons, on synthetic kernel flows."""

import ipaddress

from kipfix.agent.flows.record import EndReason, FlowCounters, FlowKey, TCP_FIN
from kipfix.agent.flows.cache import FlowCache, monotonic_ns, wall_offset_ns

S = 1_000_000_000


def key(sport=1000, proto=6):
    return FlowKey(3, 0, 4, proto, ipaddress.ip_address("10.0.0.1").packed,
                   ipaddress.ip_address("10.0.0.2").packed, sport, 80)


def counters(packets, first, last, flags=0x10):
    return FlowCounters(packets, packets * 100, first, last, flags, 64, 64, 0)


def test_idle_timeout_ends_a_quiet_flow():
    cache = FlowCache(idle_timeout=2, active_timeout=10, capacity=100)
    cache.ingest([(1, key(), counters(5, 1 * S, 2 * S))])
    assert cache.expire(now_ns=3 * S) == []
    [record] = cache.expire(now_ns=4 * S)
    assert record.end_reason == EndReason.IDLE_TIMEOUT
    assert (record.packets, record.octets) == (5, 500)
    assert len(cache) == 0


def test_active_timeout_cuts_deltas_that_sum_to_the_total():
    cache = FlowCache(idle_timeout=5, active_timeout=3, capacity=100)
    total = 0
    records = []
    for second in range(0, 10):
        cache.ingest([(1, key(), counters(7, second * S, second * S + S // 2))])
        total += 7
        records += cache.expire(now_ns=second * S + S // 2)
    records += cache.flush()
    assert [r.end_reason for r in records[:-1]] == [EndReason.ACTIVE_TIMEOUT] * (len(records) - 1)
    assert records[-1].end_reason == EndReason.FORCED_END
    assert sum(r.packets for r in records) == total == 70
    assert len(records) >= 3
    # deltas do not overlap in time
    for earlier, later in zip(records, records[1:]):
        assert earlier.end_ns < later.start_ns


def test_fin_or_rst_ends_the_flow_at_once():
    cache = FlowCache(idle_timeout=60, active_timeout=120, capacity=100)
    cache.ingest([(1, key(1), counters(3, S, S, flags=0x18 | TCP_FIN)),
                  (1, key(2), counters(3, S, S, flags=0x04)),
                  (1, key(3), counters(3, S, S, flags=0x18))])
    ended = cache.expire(now_ns=S + 1)
    assert sorted(r.key.sport for r in ended) == [1, 2]
    assert {r.end_reason for r in ended} == {EndReason.END_OF_FLOW}
    assert len(cache) == 1


def test_full_cache_evicts_least_recent_for_lack_of_resources():
    cache = FlowCache(idle_timeout=60, active_timeout=120, capacity=3)
    evicted = cache.ingest([(1, key(port), counters(1, port * S, port * S)) for port in range(1, 6)])
    assert [r.key.sport for r in evicted] == [1, 2]
    assert {r.end_reason for r in evicted} == {EndReason.LACK_OF_RESOURCES}
    assert len(cache) == 3


def test_same_key_in_two_netns_stays_apart():
    cache = FlowCache(idle_timeout=60, active_timeout=120, capacity=10,
                      describe=lambda netns_id, ifindex: (f"ns{netns_id}", f"if{ifindex}"))
    cache.ingest([(1, key(), counters(1, S, S)), (2, key(), counters(2, S, S))])
    records = sorted(cache.flush(), key=lambda r: r.netns)
    assert [(r.netns, r.interface_name, r.packets) for r in records] == [("ns1", "if3", 1), ("ns2", "if3", 2)]


def test_wall_clock_times_are_ordered_and_not_in_the_future():
    import time
    cache = FlowCache(idle_timeout=60, active_timeout=120, capacity=10)
    now = monotonic_ns()
    cache.ingest([(1, key(), counters(2, now - S, now))])
    [record] = cache.flush()
    assert record.start_ns <= record.end_ns <= time.time_ns()
    assert abs(record.end_ns - (now + wall_offset_ns())) < 50_000_000
