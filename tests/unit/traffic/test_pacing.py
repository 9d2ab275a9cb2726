from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from emu.traffic.pacing import MAX_BATCH, Pacer


@given(rate=st.floats(1, 1e6), duration=st.floats(0.01, 100), times=st.lists(st.floats(0, 200), min_size=1, max_size=50))
def test_never_ahead_of_the_rate_and_nothing_after_the_duration(rate: float, duration: float, times: list[float]) -> None:
    pacer = Pacer(rate, duration)
    sent = 0
    for t in sorted(times):
        step = pacer.step(t, sent)
        if t >= duration:
            assert step.done and step.n == 0
            continue
        assert not step.done
        sent += step.n
        assert sent <= math.floor(rate * t) + 1
        if step.n == 0:  # waiting: exactly until the next one is due
            assert 0 < step.wait <= duration - t + 1e-6
            assert pacer.step(t + step.wait + 1e-9, sent).n >= 1 or t + step.wait >= duration


@given(count=st.integers(1, 10_000), rate=st.one_of(st.none(), st.floats(1, 1e6)))
def test_count_is_exact(count: int, rate: float | None) -> None:
    pacer = Pacer(rate, 1e9, count)
    sent, t = 0, 0.0
    while not (step := pacer.step(t, sent)).done:
        assert 1 <= step.n <= MAX_BATCH or (step.n == 0 and step.wait > 0)
        sent += step.n
        t += step.wait or 1e-4
    assert sent == count


def test_unpaced_batches_are_bounded() -> None:
    assert Pacer(None, 1.0).step(0.0, 0).n == MAX_BATCH
    assert Pacer(1000.0, 1.0).step(0.0, 0).n == 1  # a paced start sends one, not a burst
    assert Pacer(1000.0, 1.0).step(0.5, 0).n == 2  # a late caller catches up in small batches
