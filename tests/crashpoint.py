"""Run ``kipfix agent`` and SIGKILL it at a chosen point of its cycle: the crash tests' way to stop
the agent inside one window, exactly, instead of hoping a random kill lands there.

    python tests/crashpoint.py POINT N kipfix-args...

kills the process the N-th time it reaches POINT (the kill comes from the process itself, as
SIGKILL: nothing runs after it, as with kill -9 from outside):

- ``before-commit``: the kernel table was swapped and read, the sinks have the records (JSON lines
  written), nothing journaled yet
- ``after-commit``: journaled; nothing released to the senders, nothing deleted from the kernel
- ``after-clear``: the drained flows are deleted from the kernel; the next swap has not happened
- ``sending``: a sender wrote that a message is about to leave, and has not sent it
- ``sent``: a message left and its cursor is written
- ``recovery``: a restarted agent read what the killed one left in the kernel, and journaled nothing
"""

from __future__ import annotations

import functools
import os
import signal
import sys
import threading

from kipfix.agent.cli import main
from kipfix.agent.datapath.meter import Meter
from kipfix.agent.flows.journal import Journal, SendCursors

_lock = threading.Lock()
_count = 0


def _reached(point: str, target: str, nth: int) -> None:
    global _count
    if point != target:
        return
    with _lock:
        _count += 1
        if _count == nth:
            sys.stderr.write(f"crashpoint: SIGKILL at {point} #{nth}\n")
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)


def _patch(cls, name: str, point_of) -> None:
    original = getattr(cls, name)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        before, after = point_of(*args, **kwargs)
        if before:
            _reached(before, TARGET, NTH)
        result = original(*args, **kwargs)
        if after:
            _reached(after, TARGET, NTH)
        return result

    setattr(cls, name, wrapper)


def _cursor_point(_self, _slot, serial, done, sending=None):
    if serial == 0:  # a slot being reset
        return None, None
    return None, ("sending" if sending is not None and sending != done else "sent")


if __name__ == "__main__":
    TARGET, NTH = sys.argv[1], int(sys.argv[2])
    for commit in ("checkpoint", "append"):  # a commit is one or the other
        _patch(Journal, commit, lambda *a, **k: ("before-commit", "after-commit"))
    _patch(Meter, "clear", lambda *a, **k: (None, "after-clear"))
    _patch(Meter, "take_inactive", lambda *a, **k: (None, "recovery"))
    _patch(SendCursors, "write", _cursor_point)
    sys.exit(main(sys.argv[3:]))
