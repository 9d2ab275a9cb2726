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
    """Splits each batch between senders in fixed shares. Never offers more than the batch (the
    pacer's grant); after T messages each sender has been offered its share of T to within the
    number of senders, whatever the batch sizes: shares the batch could not fit are owed and paid
    first in the next batch (the first sender takes what is left)."""

    def __init__(self, parts: Sequence[tuple[Sender, float]]) -> None:
        total = sum(share for _, share in parts)
        self.parts = [(s, share / total) for s, share in parts]
        self.given = [0] * len(self.parts)
        self.offered = 0

    def split(self, n: int) -> list[int]:
        self.offered += n
        counts = [0] * len(self.parts)
        left = n
        for k in range(1, len(self.parts)):
            owed = max(0, math.floor(self.offered * self.parts[k][1]) - self.given[k])
            counts[k] = min(owed, left)
            left -= counts[k]
        counts[0] = left
        for k, c in enumerate(counts):
            self.given[k] += c
        return counts

    def send(self, n: int, stats: InjectStats) -> int:
        progressed = 0
        for (sender, _), k in zip(self.parts, self.split(n)):
            if k > 0:
                progressed += sender.send(k, stats)
        return n if progressed else 0  # a stalled TCP share alone never holds back the datagrams

    def wait(self, timeout: float) -> None:
        for sender, _ in self.parts:  # only a TCP share ever blocks here
            sender.wait(timeout)

    def close(self) -> None:
        for sender, _ in self.parts:
            sender.close()
