"""Pacing: how many messages may be sent now, so that rate, duration and count all hold.

Pure arithmetic over (elapsed, sent); the send loops ask it before every batch. The bounds are
hard: at most floor(rate * elapsed) + 1 messages have gone by any instant, nothing is sent at or
after `duration`, and never more than `count`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MAX_BATCH = 256  # messages per batch when unpaced: ~0.5 ms of sendto() calls, then bounds are re-checked
BATCH_SECONDS = 0.002  # when paced, a batch holds at most this much time's worth of the rate


@dataclass(frozen=True)
class Step:
    n: int  # messages that may be sent now (0: wait, or done)
    wait: float  # seconds until the next one is due (when n == 0 and not done)
    done: bool


@dataclass(frozen=True)
class Pacer:
    rate: float | None  # messages per second; None = as fast as the socket takes them
    duration: float  # seconds; always finite: every flood stops by itself
    count: int | None = None  # messages; None = until the duration ends

    @property
    def batch(self) -> int:
        if self.rate is None:
            return MAX_BATCH
        return max(1, min(MAX_BATCH, int(self.rate * BATCH_SECONDS)))

    def step(self, elapsed: float, sent: int) -> Step:
        if elapsed >= self.duration or (self.count is not None and sent >= self.count):
            return Step(0, 0.0, True)
        n = self.batch
        if self.count is not None:
            n = min(n, self.count - sent)
        if self.rate is not None:
            due = math.floor(self.rate * elapsed) + 1 - sent
            if due <= 0:
                # message number sent+1 is due once floor(rate * t) + 1 > sent, i.e. at t = sent / rate
                next_at = min(sent / self.rate, self.duration)
                return Step(0, max(next_at - elapsed, 1e-6), False)  # > 0: float rounding never spins
            n = min(n, due)
        return Step(n, 0.0, False)
