"""Waiting in tests: on events where there are events; elsewhere polls whose limit is a safety net.

A limit here is never a guess of how long something takes: it only stops a test
that would otherwise hang. On a slow or loaded machine set REFINERY_TEST_PATIENCE
(a factor, default 1) to stretch every limit at once.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def patience(seconds: float) -> float:
    """`seconds` scaled by REFINERY_TEST_PATIENCE."""
    return seconds * float(os.environ.get("REFINERY_TEST_PATIENCE", "1"))


def poll(check: Callable[[], T | None], what: str, limit: float = 300, interval: float = 0.05) -> T:
    """Call `check` until it returns something other than None or False, and return that.

    Raises:
        AssertionError: naming `what`, after `patience(limit)` seconds.
    """
    deadline = time.monotonic() + patience(limit)
    while True:
        value = check()
        if value is not None and value is not False:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what} after {patience(limit):.0f} s")
        time.sleep(interval)
