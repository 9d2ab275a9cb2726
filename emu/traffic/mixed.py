"""mixed: several senders blended in fixed shares of the messages (see profiles.MIXED_SHARES)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

from emu.traffic.spec import InjectStats


class Sender(Protocol):
    def send(self, n: int, stats: InjectStats) -> int: ...
    def wait(self, timeout: float) -> None: ...
    def close(self) -> None: ...


class Blend:
    """Splits each batch between senders so that after T messages sender k has been offered
    floor(T * share_k) of them (the first sender takes the rounding), exactly, at any batch size."""

    def __init__(self, parts: Sequence[tuple[Sender, float]]) -> None:
        total = sum(share for _, share in parts)
        self.parts = [(s, share / total) for s, share in parts]
        self.offered = 0

    def send(self, n: int, stats: InjectStats) -> int:
        before, after = self.offered, self.offered + n
        self.offered = after
        shares = [math.floor(after * w) - math.floor(before * w) for _, w in self.parts[1:]]
        counts = [n - sum(shares), *shares]
        progressed = 0
        for (sender, _), k in zip(self.parts, counts):
            if k > 0:
                progressed += sender.send(k, stats)
        return n if progressed else 0  # a stalled TCP share alone never holds back the datagrams

    def wait(self, timeout: float) -> None:
        for sender, _ in self.parts:  # only a TCP share ever blocks here
            sender.wait(timeout)

    def close(self) -> None:
        for sender, _ in self.parts:
            sender.close()
