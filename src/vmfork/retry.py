"""The one retry loop: attempts until a deadline, with a doubling, capped sleep between them."""

from __future__ import annotations

import time
from collections.abc import Iterator


def attempts(timeout: float, *, first: float = 0.002, cap: float = 0.05) -> Iterator[int]:
    """Yield 1, 2, 3, ... until ``timeout`` seconds have passed.

    The first attempt comes at once; before each later one the loop sleeps ``first``,
    then twice that, ..., at most ``cap``, and never past the deadline. The last attempt
    is made at or after the deadline, so a caller that breaks out on success always gets
    one try after the time is up. Use it as::

        for _ in retry.attempts(5.0):
            try:
                return connect()
            except Refused as e:
                last = e
        raise Timeout(last)
    """
    deadline = time.monotonic() + timeout
    delay = first
    n = 0
    while True:
        n += 1
        yield n
        now = time.monotonic()
        if now >= deadline:
            return
        time.sleep(min(delay, deadline - now))
        delay = min(delay * 2, cap)
