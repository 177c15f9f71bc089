"""Named points in the save code where a test can freeze the process (to kill it there).

Set ``TSUMUGI_TEST_PAUSE_AT=<point>`` (or ``<point>:<n>`` for its n-th occurrence) and the process,
on reaching that point, prints ``TSUMUGI_TEST_PAUSED <point>`` to stderr and sleeps for an hour (or
``TSUMUGI_TEST_PAUSE_SECONDS``).
Unset (always, outside tests), :func:`pause_point` only reads the environment.
"""

from __future__ import annotations

import os
import sys
import time

ENV = "TSUMUGI_TEST_PAUSE_AT"
_seen: dict[str, int] = {}


def pause_point(name: str) -> None:
    wanted = os.environ.get(ENV)
    if not wanted:
        return
    point, _, count = wanted.partition(":")
    if point != name:
        return
    _seen[name] = _seen.get(name, 0) + 1
    if _seen[name] != int(count or 1):
        return
    print(f"TSUMUGI_TEST_PAUSED {name}", file=sys.stderr, flush=True)
    time.sleep(float(os.environ.get("TSUMUGI_TEST_PAUSE_SECONDS", 3600)))
