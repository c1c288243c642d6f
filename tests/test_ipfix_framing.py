"""Message framing (message.pack_sets): size limit, whole records, greedy filling, sequence numbers."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings, strategies as st

from kipfix.agent.export.ipfix.message import HEADER, SET_HEADER, RecordTooLarge, pack_sets


@st.composite
def groups(draw):
    """(set id, [records], fixed length or 0): records of one length per group, or of any lengths."""
    result = []
    for set_id in draw(st.lists(st.integers(256, 300), min_size=1, max_size=4)):
        if draw(st.booleans()):
            length = draw(st.integers(1, 700))
            records = [bytes([i % 251]) * length for i in range(draw(st.integers(0, 60)))]
            result.append((set_id, records, length))
        else:
            sizes = draw(st.lists(st.integers(1, 700), max_size=60))
            result.append((set_id, [bytes([i % 251]) * size for i, size in enumerate(sizes)]))
    return result


def parse(message: bytes) -> tuple[int, list[tuple[int, bytes]]]:
    version, length, _, sequence, domain = HEADER.unpack_from(message)
    assert (version, length, domain) == (10, len(message), 9)
    sets, offset = [], HEADER.size
    while offset < len(message):
        set_id, set_length = SET_HEADER.unpack_from(message, offset)
        assert set_length > SET_HEADER.size
        sets.append((set_id, message[offset + SET_HEADER.size:offset + set_length]))
        offset += set_length
    assert offset == len(message)
    return sequence, sets


@settings(max_examples=300, deadline=None)
@given(sets=groups(), max_size=st.integers(40, 2000), first_sequence=st.integers(0, 2**32 - 1))
def test_messages_hold_whole_records_greedily_within_the_size_limit(sets, max_size, first_sequence):
    too_large: list = []
    packed = list(pack_sets(sets, max_size=max_size, export_time=5, sequence=first_sequence, domain=9,
                            skip_too_large=too_large))
    limit = max_size - HEADER.size - SET_HEADER.size  # the largest record that fits
    expected = [(set_id, r) for set_id, records, *_ in sets for r in records if len(r) <= limit]
    assert too_large == [(set_id, r) for set_id, records, *_ in sets for r in records if len(r) > limit]
    sequence, position = first_sequence, 0
    for number, p in enumerate(packed):
        assert len(p.message) <= max_size
        message_sequence, message_sets = parse(p.message)
        assert message_sequence == sequence
        count = 0
        for set_id, body in message_sets:
            taken = 0
            while taken < len(body):  # the set body is exactly the next records of that set, whole
                record_set, record = expected[position]
                assert record_set == set_id and body[taken:taken + len(record)] == record
                taken += len(record)
                position += 1
                count += 1
        assert count == p.records
        sequence = (sequence + count) & 0xFFFFFFFF
        if number < len(packed) - 1:  # closed only because the next record did not fit
            next_set, next_record = expected[position]
            header = 0 if message_sets[-1][0] == next_set else SET_HEADER.size
            assert len(p.message) + header + len(next_record) > max_size
    assert position == len(expected)


def test_end_positions_say_where_the_next_message_starts():
    sets = [(256, [b"a" * 100] * 5, 100), (257, [b"b" * 30, b"c" * 200])]
    packed = list(pack_sets(sets, max_size=16 + 4 + 250, export_time=0, sequence=0, domain=9))
    assert [(p.records, p.end) for p in packed] == [(2, (0, 2)), (2, (0, 4)), (2, (1, 1)), (1, (2, 0))]


def test_a_record_too_large_raises_without_a_list_to_skip_into():
    with pytest.raises(RecordTooLarge, match="a record of 500 octets does not fit in a 400-octet message"):
        list(pack_sets([(256, [b"x" * 10, b"y" * 500])], max_size=400, export_time=0, sequence=0, domain=9))


def test_template_sets_do_not_advance_the_sequence_number():
    records = [struct.pack("!HH", 256 + i, 0) for i in range(400)]
    packed = list(pack_sets([(2, records)], max_size=512, export_time=0, sequence=77, domain=9, data=False))
    assert len(packed) > 1 and {parse(p.message)[0] for p in packed} == {77}
