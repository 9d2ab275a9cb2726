"""The deadlock watchdog (DESIGN §7), like the kernel's hung-task detector but for reclaim.

A deadlock is declared when, for `stall` seconds without a break, (a) some task is blocked in
reclaim or in a page fault (its state starts with "D") and (b) nothing moved: reclaim freed no
page (`pgsteal`) and no swap I/O completed (the host counts completions at the swap storage;
`pswpout`/`pswpin` count I/O *started*, which goes on for a while into a deadlock). Pages freed by other churn
(a dropped skb, an evicted fragment queue) are not progress: they are eaten again by the next
frame and never get a blocked task going.

`Watchdog` is a pure state machine fed with (time, progress counter, blocked tasks); `run()` is
the thin trio driver that samples the host and sets `deadlock` when it fires.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

PROGRESS_COUNTERS = ("pgsteal", "pswpout", "pswpin")


def is_blocked(state: str) -> bool:
    """'D reclaim', 'D pagefault', 'D pfmemalloc_wait' ... (uninterruptible sleep)."""
    return state.startswith("D")


@dataclass
class Verdict:
    at: float
    stalled_for: float
    blocked: list[tuple[str, str, str]]  # (comm, state, wchan)
    progress: int


@dataclass
class Watchdog:
    stall: float = 4.0
    _last_progress_value: int | None = None
    _last_progress_at: float = 0.0
    _blocked_since: float | None = None
    verdict: Verdict | None = None
    history: list[tuple[float, int, int]] = field(default_factory=list)

    def observe(self, now: float, progress: int, blocked: Sequence[tuple[str, str, str]]) -> Verdict | None:
        """Feed one sample; returns the verdict the first time the stall limit is crossed."""
        if self.verdict is not None:
            return self.verdict
        if self._last_progress_value is None or progress != self._last_progress_value:
            self._last_progress_value = progress
            self._last_progress_at = now
        if blocked:
            if self._blocked_since is None:
                self._blocked_since = now
        else:
            self._blocked_since = None
        if self._blocked_since is not None:
            since = max(self._blocked_since, self._last_progress_at)
            if now - since >= self.stall:
                self.verdict = Verdict(now, now - since, list(blocked), progress)
        return self.verdict

    def stalled_for(self, now: float) -> float:
        if self._blocked_since is None:
            return 0.0
        return max(0.0, now - max(self._blocked_since, self._last_progress_at))


def progress_of(vmstat_snapshot: dict[str, Any]) -> int:
    return sum(int(vmstat_snapshot.get(k, 0)) for k in PROGRESS_COUNTERS)


async def run(dog: Watchdog, sample: Callable[[], tuple[int, list[tuple[str, str, str]]]],
              on_deadlock: Callable[[Verdict], None], interval: float = 0.1) -> None:
    """Sample until the watchdog fires, then call `on_deadlock` once and return."""
    while True:
        progress, blocked = sample()
        v = dog.observe(trio.current_time(), progress, blocked)
        if v is not None:
            on_deadlock(v)
            return
        await trio.sleep(interval)
