"""`struct sk_buff_head`: a socket's receive queue.

Entries are skbs, or runs of like skbs accepted together (`SkbRun`, a flood's datagrams: one
entry, no Python object per skb).  `qlen` counts skbs, as the kernel's does, whatever the
entries.  A reader that takes one skb at a time (`popleft`, `peek`) gets real `SkBuff`s, made
from a run as it reaches them; a reader that frees everything (`take_all`, then
`SkbAllocator.free_queue`) frees runs in bulk.  Iterating (views, tests) first turns the runs
into SkBuffs: it changes no memory, only the representation.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

from emu.net.skbuff import SkBuff, SkbRun


class SkbQueue:
    """A receive queue of skbs and runs of skbs, in arrival order."""

    __slots__ = ("_q", "qlen")

    def __init__(self) -> None:
        self._q: deque[SkBuff | SkbRun] = deque()
        self.qlen = 0

    def __len__(self) -> int:
        return self.qlen

    def __bool__(self) -> bool:
        return self.qlen > 0

    def append(self, skb: SkBuff) -> None:
        self._q.append(skb)
        self.qlen += 1

    def append_run(self, run: SkbRun) -> None:
        self._q.append(run)
        self.qlen += len(run)

    def peek(self) -> SkBuff:
        """The first skb (IndexError if empty), left on the queue."""
        q = self._q
        head = q[0]
        if head.__class__ is SkbRun:
            q.popleft()
            q.extendleft(reversed(head.skbs()))  # type: ignore[union-attr]
        return q[0]  # type: ignore[return-value]

    def popleft(self) -> SkBuff:
        """Unlink the first skb (IndexError if empty)."""
        q = self._q
        head = q[0]
        if head.__class__ is SkbRun:
            run: SkbRun = head  # type: ignore[assignment]
            skb = run.popleft()
            if not len(run):
                q.popleft()
        else:
            skb = q.popleft()  # type: ignore[assignment]
        self.qlen -= 1
        return skb

    def memalloc_skbs(self) -> int:
        """How many queued skbs came from the reserve (a run never does)."""
        return sum(1 for e in self._q if e.memalloc)

    def take_all(self) -> list[SkBuff | SkbRun]:
        """Unlink everything (for `SkbAllocator.free_queue`)."""
        items = list(self._q)
        self._q.clear()
        self.qlen = 0
        return items

    def __iter__(self) -> Iterator[SkBuff]:
        q = self._q
        if any(e.__class__ is SkbRun for e in q):
            flat: list[SkBuff] = []
            for e in q:
                if e.__class__ is SkbRun:
                    flat.extend(e.skbs())  # type: ignore[union-attr]
                else:
                    flat.append(e)  # type: ignore[arg-type]
            q.clear()
            q.extend(flat)
        return iter(q)  # type: ignore[arg-type]
