"""IPFIX message framing (RFC 7011 3.1, 3.3): header, sets, size limit.

Records are never split across messages or sets; every message is at most
``max_size`` octets. No padding is added (RFC 7011 3.3.1 makes it optional),
so set lengths cover exactly their records.
"""

from __future__ import annotations

import struct
from bisect import bisect_right
from dataclasses import dataclass
from itertools import accumulate
from typing import Iterator, Sequence

VERSION = 10
HEADER = struct.Struct("!HHIII")  # version, length, export time, sequence number, observation domain
SET_HEADER = struct.Struct("!HH")  # set id, length
HEADER_LENGTH = HEADER.size
SET_HEADER_LENGTH = SET_HEADER.size
TEMPLATE_SET_ID = 2
OPTIONS_TEMPLATE_SET_ID = 3
MAX_MESSAGE_SIZE = 65535


class RecordTooLarge(ValueError):
    """One record cannot fit in a message of the configured size."""


@dataclass(frozen=True, slots=True)
class Packed:
    """One message and where it ends in the input: (set index, record index) of the next record."""

    message: bytes
    records: int  # data records in this message (for the sequence number)
    end: tuple[int, int]


def pack_sets(sets: Sequence[tuple], *, max_size: int, export_time: int,
              sequence: int, domain: int, data: bool = True,
              skip_too_large: list | None = None, separate: frozenset = frozenset()) -> Iterator[Packed]:
    """Pack ``(set id, [record bytes][, fixed record length])`` groups into messages of at most ``max_size`` octets.

    Groups stay in order; a group spans messages when it must. ``sequence`` is
    the sequence number of the first message; it advances by the records of
    each message when ``data`` is true (data sets), not for template sets.
    A record too large for any message raises RecordTooLarge, or is skipped and
    appended to ``skip_too_large`` when that list is given. Consecutive groups
    of one set id continue one set, except for set ids in ``separate``: each of
    their groups is a set of its own.
    """
    limit = min(max_size, MAX_MESSAGE_SIZE) - HEADER_LENGTH
    # The message being filled, as the parts of one join: parts[0] is its header and
    # parts[open_set] the open set's header, both packed once their lengths are known.
    parts: list[bytes] = [b""]
    used = 0  # octets after the message header
    count = 0
    open_set = set_start = 0
    position = (0, 0)

    def message() -> bytes:
        parts[0] = HEADER.pack(VERSION, HEADER_LENGTH + used, export_time & 0xFFFFFFFF, sequence & 0xFFFFFFFF,
                               domain)
        return b"".join(parts)

    open_id = None  # set id of the open set: a following group of the same id continues it
    for set_index, group in enumerate(sets):
        set_id, records = group[0], group[1]
        if open_set and (set_id != open_id or set_id in separate):
            parts[open_set] = SET_HEADER.pack(open_id, used - set_start)
            open_set = 0
        fixed = group[2] if len(group) > 2 else 0
        index = 0
        n = len(records)
        ends = None
        if fixed and SET_HEADER_LENGTH + fixed > limit:
            fixed = 0  # let the general path report or skip each record
        while index < n:
            # as many records as fit at once: by arithmetic when all have one length, else by
            # bisecting their running total of octets
            room = limit - used - (0 if open_set else SET_HEADER_LENGTH)
            if fixed:
                end = index + min(room // fixed, n - index)
            else:
                if ends is None:
                    ends = [0, *accumulate(map(len, records))]  # ends[i]: octets of records[:i]
                end = bisect_right(ends, ends[index] + room, index) - 1
            if end > index:
                size = (end - index) * fixed if fixed else ends[end] - ends[index]
                if not open_set:
                    open_set, set_start, open_id = len(parts), used, set_id
                    parts.append(b"")
                    used += SET_HEADER_LENGTH
                parts += records[index:end]
                used += size
                count += end - index
                index = end
                continue
            record = records[index]
            if SET_HEADER_LENGTH + len(record) > limit:
                if skip_too_large is None:
                    raise RecordTooLarge(f"a record of {len(record)} octets does not fit in a "
                                         f"{max_size}-octet message")
                skip_too_large.append((set_id, record))
                index += 1
                continue
            # The message is full: close the open set and the message, go on in a new one.
            if open_set:
                parts[open_set] = SET_HEADER.pack(set_id, used - set_start)
                open_set = 0
            yield Packed(message(), count, (set_index, index))
            if data:
                sequence += count
            parts, used, count = [b""], 0, 0
        position = (set_index + 1, 0)
    if open_set:
        parts[open_set] = SET_HEADER.pack(open_id, used - set_start)
    if len(parts) > 1:
        yield Packed(message(), count, position)
