from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worq_core import RetryPolicy

policies = st.builds(
    RetryPolicy,
    base=st.floats(0, 100),
    factor=st.floats(1, 10),
    max_delay=st.floats(0, 3600),
    jitter=st.booleans(),
)


@given(policy=policies, retry=st.integers(1, 10_000), seed=st.integers())
def test_a_delay_is_never_negative_never_over_the_cap_and_at_least_half_the_backoff(
    policy: RetryPolicy, retry: int, seed: int
) -> None:
    delay = policy.delay(retry, random.Random(seed))
    ceiling = RetryPolicy(policy.base, policy.factor, policy.max_delay, jitter=False).delay(retry)
    assert 0 <= delay <= policy.max_delay
    assert ceiling / 2 <= delay <= ceiling


def test_without_jitter_delays_grow_exponentially_up_to_the_cap() -> None:
    policy = RetryPolicy(base=1.0, factor=2.0, max_delay=10.0, jitter=False)
    assert [policy.delay(n) for n in range(1, 7)] == [1, 2, 4, 8, 10, 10]


def test_jitter_spreads_retries_of_jobs_that_failed_together() -> None:
    policy = RetryPolicy(base=8.0)
    rng = random.Random(7)
    delays = {policy.delay(1, rng) for _ in range(50)}
    assert len(delays) == 50
    assert min(delays) >= 4.0


@pytest.mark.parametrize("kwargs", [{"base": -1.0}, {"max_delay": -1.0}, {"factor": 0.5}], ids=str)
def test_nonsense_policies_are_rejected(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="RetryPolicy"):
        RetryPolicy(**kwargs)
