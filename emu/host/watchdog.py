"""The watchdog: is the host stuck, and how?  Like the kernel's hung-task detector, for reclaim.

Progress is what frees memory for the blocked: pages freed by reclaim (`pgsteal`) plus swap I/O
*completed* (`pswpout`/`pswpin` count I/O started, which goes on for a while into a deadlock).
Pages freed by other churn (a dropped skb, an evicted fragment queue) are not progress: the next
frame eats them again and no blocked task gets going.  Times are emulated seconds.

- **deadlock**: for `stall` seconds without a break, swap I/O is in flight, some task is blocked
  in reclaim or a page fault (state "D"), and there is no progress at all.
- **livelock**: for the last `window` seconds without a break swap I/O was in flight and tasks
  blocked, some progress was made, but below `fraction` of the reference rate (the rate of the
  same scenario under a reserve policy when the caller knows it, else this run's own best rate
  over any earlier window), while swap replies were being dropped: the host creeps on replies
  that now and then win an skb, as Mogul and Ramakrishnan's receive livelock (1997) starves the
  work behind the receive path.  (With no progress at all it is a deadlock.)
- **server down** is neither: while the swap server is unreachable (refused, reset, or silent
  past the clock's grace; `emu.net.link.PeerLink.down_since`) no I/O can complete whatever the
  memory policy, so the stall and livelock clocks are held; and after it answers again, while
  swap I/O the outage caught is still in flight (requests sent while it was down wait for their
  retransmission timers, backed off to seconds, as Linux's do).  A run that ends with its server
  still down says so (`HostRun`: outcome `server_down`).

`Watchdog` is a pure state machine, fed one `Observation` per sample.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

PROGRESS_COUNTERS = ("pgsteal",)


def is_blocked(state: str) -> bool:
    """'D reclaim', 'D pagefault', 'D pfmemalloc_wait' ... (uninterruptible sleep)."""
    return state.startswith("D")


@dataclass
class Verdict:
    kind: str  # "deadlock" | "livelock"
    at: float  # emulated time it was declared
    stalled_for: float  # deadlock: seconds without progress; livelock: the window
    blocked: list[tuple[str, str, str]]  # (comm, state, wchan)
    progress: int
    rate: float = 0.0  # progress per second over the window (livelock) or 0
    reference: float = 0.0  # the rate it was compared with (livelock)


@dataclass
class Watchdog:
    stall: float = 4.0
    window: float = 20.0
    fraction: float = 0.05
    reference: float | None = None  # progress/s of a reserve policy; None: this run's best window
    _last_progress_value: int | None = None
    _last_progress_at: float = 0.0
    _blocked_since: float | None = None
    best_rate: float = 0.0
    verdict: Verdict | None = None
    history: deque[tuple[float, int, int]] = field(default_factory=deque)  # (t, progress, reply drops)

    def observe(self, now: float, progress: int, blocked: Sequence[tuple[str, str, str]], inflight: int = 1,
                reply_drops: int = 0, server_down: bool = False) -> Verdict | None:
        """Feed one sample; returns the verdict the first time one is reached."""
        if self.verdict is not None:
            return self.verdict
        if server_down:  # not the host's fault: hold both clocks (see the module docstring)
            self._last_progress_value = progress
            self._last_progress_at = now
            self._blocked_since = None
            self.history.clear()
            return None
        if self._last_progress_value is None or progress != self._last_progress_value:
            self._last_progress_value = progress
            self._last_progress_at = now
        stuck = bool(blocked) and inflight > 0
        if stuck:
            if self._blocked_since is None:
                self._blocked_since = now
        else:
            self._blocked_since = None
        if self._blocked_since is not None:
            since = max(self._blocked_since, self._last_progress_at)
            if now - since >= self.stall:
                self.verdict = Verdict("deadlock", now, now - since, list(blocked), progress)
                return self.verdict
        return self._livelock(now, progress, blocked, reply_drops)

    def _livelock(self, now: float, progress: int, blocked: Sequence[tuple[str, str, str]],
                  reply_drops: int) -> Verdict | None:
        h = self.history
        h.append((now, progress, reply_drops))
        while len(h) > 2 and h[1][0] <= now - self.window:
            h.popleft()
        t0, p0, d0 = h[0]
        span = now - t0
        if span < self.window * 0.999:
            return None
        rate = (progress - p0) / span
        reference = self.reference if self.reference is not None else self.best_rate
        if self.reference is None and rate > self.best_rate:
            self.best_rate = rate
        stuck_since = self._blocked_since
        if (reference > 0 and 0 < rate < self.fraction * reference and reply_drops > d0
                and stuck_since is not None and stuck_since <= t0):
            self.verdict = Verdict("livelock", now, span, list(blocked), progress, rate, reference)
        return self.verdict

    def stalled_for(self, now: float) -> float:
        if self._blocked_since is None:
            return 0.0
        return max(0.0, now - max(self._blocked_since, self._last_progress_at))
