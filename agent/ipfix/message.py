"""IPFIX message framing (RFC 7011 3.1, 3.3): header, sets, size limit.

Records are never split across messages or sets; every message is at most
``max_size`` octets. No padding is added (RFC 7011 3.3.1 makes it optional),
so set lengths cover exactly their records.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
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


def pack_message(export_time: int, sequence: int, domain: int, sets: Sequence[bytes]) -> bytes:
    body = b"".join(sets)
    return HEADER.pack(VERSION, HEADER_LENGTH + len(body), export_time & 0xFFFFFFFF,
                       sequence & 0xFFFFFFFF, domain) + body


def pack_sets(sets: Sequence[tuple], *, max_size: int, export_time: int,
              sequence: int, domain: int, data: bool = True,
              skip_too_large: list | None = None) -> Iterator[Packed]:
    """Pack ``(set id, [record bytes][, fixed record length])`` groups into messages of at most ``max_size`` octets.

    Groups stay in order; a group spans messages when it must. ``sequence`` is
    the sequence number of the first message; it advances by the records of
    each message when ``data`` is true (data sets), not for template sets.
    A record too large for any message raises RecordTooLarge, or is skipped and
    appended to ``skip_too_large`` when that list is given.
    """
    limit = min(max_size, MAX_MESSAGE_SIZE) - HEADER_LENGTH
    body: list[bytes] = []  # finished sets of the current message
    used = 0
    count = 0
    position = (0, 0)
    for set_index, group in enumerate(sets):
        set_id, records = group[0], group[1]
        fixed = group[2] if len(group) > 2 else 0
        current: list[bytes] = []
        current_len = 0
        index = 0
        n = len(records)
        if fixed and SET_HEADER_LENGTH + fixed > limit:
            fixed = 0  # let the general path report or skip each record
        while index < n:
            if fixed:  # all records have this length: take as many as fit at once
                room = (limit - used - (0 if current else SET_HEADER_LENGTH)) // fixed
                take = min(room, n - index)
                if take > 0:
                    if not current:
                        used += SET_HEADER_LENGTH
                    current.extend(records[index:index + take])
                    current_len += take * fixed
                    used += take * fixed
                    count += take
                    index += take
                    continue
            else:
                record = records[index]
                size = len(record)
                if SET_HEADER_LENGTH + size > limit:
                    if skip_too_large is None:
                        raise RecordTooLarge(f"a record of {size} octets does not fit in a {max_size}-octet message")
                    skip_too_large.append((set_id, record))
                    index += 1
                    continue
                need = size if current else SET_HEADER_LENGTH + size
                if used + need <= limit:
                    if not current:
                        used += SET_HEADER_LENGTH
                    current.append(record)
                    current_len += size
                    used += size
                    count += 1
                    index += 1
                    continue
            # The message is full: close the open set and the message, go on in a new one.
            if current:
                body.append(SET_HEADER.pack(set_id, SET_HEADER_LENGTH + current_len) + b"".join(current))
                current, current_len = [], 0
            yield Packed(pack_message(export_time, sequence, domain, body), count, (set_index, index))
            if data:
                sequence += count
            body, used, count = [], 0, 0
        if current:
            body.append(SET_HEADER.pack(set_id, SET_HEADER_LENGTH + current_len) + b"".join(current))
        position = (set_index + 1, 0)
    if body:
        yield Packed(pack_message(export_time, sequence, domain, body), count, position)
