"""Pinned tables: re-used when compatible, carried over on resize, replaced otherwise."""

from __future__ import annotations

import logging
import shutil
import uuid

import pytest

from kipfix.agent.datapath import tc
from kipfix.agent.datapath.meter import Meter
from router import Router, sh

pytestmark = pytest.mark.root


@pytest.fixture
def pin():
    path = f"/sys/fs/bpf/kipfix-test-{uuid.uuid4().hex[:8]}"
    yield path
    shutil.rmtree(path, ignore_errors=True)


def icmp_requests(flows) -> int:
    return sum(c.packets for _n, k, c in flows if k.protocol == 1 and k.dport == 8 << 8)


def test_resized_tables_carry_their_flows_over(pin, caplog):
    with Router() as router:
        first = Meter(64, pin)
        tc.attach(router.r, "r1", tc.Programs(first.ingress_fd, first.egress_fd, classid=0x4B00_0001))
        sh(f"ip netns exec {router.h1} ping -c 7 -i 0.02 -q 10.2.0.1")
        first.close()  # counted, never drained
        caplog.set_level(logging.WARNING, logger="kipfix.meter")
        second = Meter(128, pin)
        try:
            assert "made for maxFlows 64, the config asks for 128" in caplog.text
            assert second.tables.capacity == 128
            # the old program still writes the retired table until the filter is replaced
            tc.attach(router.r, "r1", tc.Programs(second.ingress_fd, second.egress_fd, classid=0x4B00_0001))
            sh(f"ip netns exec {router.h1} ping -c 3 -i 0.02 -q 10.2.0.1")
            assert icmp_requests(second.drain()) == 10
        finally:
            second.close()


def test_same_layout_is_reused_without_a_word(pin, caplog):
    first = Meter(64, pin)
    ids = [t.id for t in first.tables.tables]
    first.close()
    caplog.set_level(logging.WARNING, logger="kipfix.meter")
    second = Meter(64, pin)
    try:
        assert [t.id for t in second.tables.tables] == ids
        assert caplog.text == ""
    finally:
        second.close()


def test_incompatible_layout_is_replaced_with_a_clear_log_line(pin, caplog):
    from bcc import BPF

    sh(f"mkdir -p {pin}")
    source = f'BPF_TABLE_PINNED("hash", u32, u64, flows_a, 16, "{pin}/flows_a");'
    foreign = BPF(text=(source + 'int f(void *ctx) { return 0; }').encode())
    foreign.cleanup()
    caplog.set_level(logging.WARNING, logger="kipfix.meter")
    meter = Meter(64, pin)
    try:
        assert f"pinned map {pin}/flows_a has an incompatible layout (type 1, key 4, value 8" in caplog.text
        assert "replacing it" in caplog.text
        assert meter.tables.tables[0].max_entries == 64
    finally:
        meter.close()
