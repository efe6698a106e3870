"""Retries for transient faults only, with a deadline and jitter (one place, tenacity)."""

from __future__ import annotations

from typing import Callable, TypeVar

from tenacity import Retrying, retry_if_exception, stop_after_delay, wait_random_exponential

T = TypeVar("T")


def call(fn: Callable[[], T], *, deadline: float, is_transient: Callable[[BaseException], bool]) -> T:
    """Call fn, retrying transient failures until deadline seconds have passed; re-raise the last."""
    for attempt in Retrying(
        stop=stop_after_delay(deadline),
        wait=wait_random_exponential(multiplier=0.2, max=5),
        retry=retry_if_exception(is_transient),
        reraise=True,
    ):
        with attempt:
            return fn()
    raise AssertionError("unreachable")  # pragma: no cover
