"""The server's byte budget: one cap on the bytes of RPC calls it holds, over all connections.

Every TCP connection and UDP socket draws from the one `ByteBudget` through its own `Share`: a
TCP connection charges a record when its marks announce it (before its payload is read) and
gives the bytes back when the call's reply has gone; a UDP socket charges each datagram until its
reply has gone. Past the cap the reader waits, so TCP flow control holds the client back (and a
UDP socket's queue overflows: the client retransmits).

Each share has a small guaranteed part (`reserve`, e.g. one small call): its first `reserve`
bytes come from a pool set aside for that (`reserve * max_shares`), the rest from the shared
pool. So however much of the shared pool big records hold, every connection can still get a
small call through: a NULL, a GETATTR, a 4 KiB WRITE. The total (both pools) never exceeds
`limit` — Linux's tcp_mem with its per-socket minimum tcp_rmem[0], in spirit.

A share also caps what one connection holds (`cap`, and its fair share: the limit divided among
the shares holding bytes, so however many bytes one client's partial records hold, the others get
their part) and the calls it runs at once (`max_calls`).
"""

from __future__ import annotations

import trio


class ByteBudget:
    def __init__(self, limit: int, reserve: int, max_shares: int) -> None:
        self.limit = limit
        self.reserve = reserve
        self.reserve_limit = reserve * max_shares
        self.shared_limit = limit - self.reserve_limit
        if self.shared_limit < 0:
            raise ValueError(f"a byte budget of {limit} cannot reserve {reserve} bytes for {max_shares} connections")
        self.reserve_used = 0
        self.shared_used = 0
        self.high_water = 0
        self.waits = 0  # times a reader had to wait for bytes
        self.holders = 0  # shares holding bytes now
        self._changed = trio.Event()
        self._waiting = 0  # tasks waiting for _changed (no one waiting: nothing to wake)

    def fair_share(self, holding: bool) -> int:
        """What one share may hold when `holders` (itself included) divide the limit."""
        return max(self.reserve, self.limit // max(1, self.holders + (0 if holding else 1)))

    @property
    def used(self) -> int:
        return self.reserve_used + self.shared_used

    def share(self, cap: int, max_calls: int) -> Share:
        return Share(self, cap, max_calls)

    def _wake(self) -> None:
        if self._waiting:
            self._changed.set()
            self._changed = trio.Event()

    async def _wait(self) -> None:
        self._waiting += 1
        try:
            await self._changed.wait()
        finally:
            self._waiting -= 1


class Share:
    """One connection's (or UDP socket's) part of the budget."""

    def __init__(self, budget: ByteBudget, cap: int, max_calls: int) -> None:
        self.budget = budget
        self.cap = cap
        self.max_calls = max_calls
        self.held = 0
        self.calls = 0
        self.closed = False

    def try_acquire(self, n: int) -> bool:
        """Charge n bytes if the budget (and this share's cap) has room now. A share's first
        `reserve` bytes come from the reserve pool, the rest from the shared pool."""
        if n <= 0:
            return True
        b = self.budget
        held = self.held
        new = held + n
        # (an idle share always gets its first bytes, within the pools' limits)
        if held and new > min(self.cap, b.fair_share(True)):
            return False
        reserve = b.reserve
        d_res = (new if new < reserve else reserve) - (held if held < reserve else reserve)
        d_shared = n - d_res
        if (b.reserve_used + d_res > b.reserve_limit or b.shared_used + d_shared > b.shared_limit
                or b.reserve_used + b.shared_used + n > b.limit):
            return False
        if not held:
            b.holders += 1
        self.held = new
        b.reserve_used += d_res
        b.shared_used += d_shared
        used = b.reserve_used + b.shared_used
        if used > b.high_water:
            b.high_water = used
        return True

    async def acquire(self, n: int) -> None:
        """Charge n bytes, waiting until the budget (and this share's cap) has room."""
        waited = False
        while not self.try_acquire(n):
            if self.closed:
                raise trio.ClosedResourceError("share closed")
            if not waited:
                self.budget.waits += 1
                waited = True
            await self.budget._wait()
        await trio.lowlevel.checkpoint_if_cancelled()

    def release(self, n: int) -> None:
        if n <= 0:
            return
        b = self.budget
        held = self.held
        if n > held:
            n = held
            if not n:
                return
        new = held - n
        reserve = b.reserve
        d_res = (held if held < reserve else reserve) - (new if new < reserve else reserve)
        self.held = new
        if not new:
            b.holders -= 1
        b.reserve_used -= d_res
        b.shared_used -= n - d_res
        if b._waiting:
            b._wake()

    def try_start_call(self, n: int) -> bool:
        """`acquire(n)` and `start_call()` if both can be had now, without waiting."""
        if self.calls >= self.max_calls or not self.try_acquire(n):
            return False
        self.calls += 1
        return True

    async def start_call(self) -> None:
        while self.calls >= self.max_calls:
            await self.budget._wait()
        self.calls += 1

    def end_call(self, nbytes: int) -> None:
        self.calls -= 1
        self.release(nbytes)
        if nbytes <= 0:
            self.budget._wake()

    def close(self) -> None:
        """The connection is gone: whatever it still held goes back."""
        self.closed = True
        self.release(self.held)
        self.budget._wake()


__all__ = ["ByteBudget", "Share"]
