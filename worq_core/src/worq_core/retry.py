"""Retry backoff: exponential, capped, jittered."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How long a failed job waits before its next attempt.

    The n-th retry (n = 1, 2, ...) waits ``min(max_delay, base * factor ** (n - 1))`` seconds. With
    ``jitter`` the wait is drawn uniformly from the upper half of that, ``[d/2, d]`` ("equal
    jitter"): retries of many jobs that failed together spread out, yet none comes back at once.
    """

    base: float = 1.0
    factor: float = 2.0
    max_delay: float = 300.0
    jitter: bool = True

    def __post_init__(self) -> None:
        if self.base < 0 or self.max_delay < 0:
            raise ValueError("RetryPolicy delays must not be negative")
        if self.factor < 1:
            raise ValueError("RetryPolicy.factor must be at least 1")

    def delay(self, retry: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before retry number ``retry`` (1 for the first retry)."""
        if retry < 1:
            raise ValueError("retry numbers start at 1")
        try:
            ceiling = min(self.max_delay, self.base * self.factor ** (retry - 1))
        except OverflowError:
            ceiling = self.max_delay
        if not self.jitter:
            return ceiling
        return (rng or random).uniform(ceiling / 2, ceiling)
