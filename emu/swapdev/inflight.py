"""Book-keeping of swap I/O in flight, shared by the NFS and iSCSI swap storages."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import trio


@dataclass
class SwapIO:
    id: int
    op: str
    slot: int
    nr_pages: int
    started: float
    attempts: int = 1
    what: str = ""


@dataclass
class Inflight:
    ios: dict[int, SwapIO] = field(default_factory=dict)
    completed: int = 0          # I/Os completed (any op)
    pages_written: int = 0
    pages_read: int = 0
    reissued: int = 0           # writes resent after a verifier change / session recovery
    errors: int = 0
    _ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    @contextmanager
    def track(self, op: str, slot: int, nr_pages: int, what: str = "") -> Iterator[SwapIO]:
        io = SwapIO(next(self._ids), op, slot, nr_pages, trio.current_time(), what=what)
        self.ios[io.id] = io
        ok = False
        try:
            yield io
            ok = True
        finally:
            del self.ios[io.id]
            if ok:
                self.completed += 1
                if op == "write":
                    self.pages_written += nr_pages
                else:
                    self.pages_read += nr_pages
            else:
                self.errors += 1

    def snapshot(self, now: float) -> list[tuple[str, int, int, float, int, str]]:
        return [(io.op, io.slot, io.nr_pages, now - io.started, io.attempts, io.what) for io in self.ios.values()]
