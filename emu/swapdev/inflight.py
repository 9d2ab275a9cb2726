"""Book-keeping of swap I/O in flight, shared by the NFS and iSCSI swap storages."""

from __future__ import annotations

import itertools
import zlib
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
    # The storage's own audit: crc32 of what was last written to each slot, checked when the
    # slot is read back. A mismatch here is the transport or the server returning other bytes
    # than were written (the mm's verification then fails too); none here but a mismatch in the
    # mm would point at the mm.
    written: dict[int, int] = field(default_factory=dict)
    audit_mismatches: list[dict[str, object]] = field(default_factory=list)
    audit_checked: int = 0
    # When a list: every I/O as it starts, (op, slot, nr_pages) — `netswap bench swap` replays it
    # over plain sockets so that its baseline makes exactly the emulated host's requests.
    trace: list[tuple[str, int, int]] | None = None

    def wrote(self, slot: int, data: bytes | bytearray | memoryview, page_size: int) -> None:
        mv = memoryview(data).cast("B")
        for i in range(len(mv) // page_size):
            self.written[slot + i] = zlib.crc32(mv[i * page_size:(i + 1) * page_size])

    def read_back(self, slot: int, data: bytes | bytearray | memoryview, page_size: int) -> None:
        mv = memoryview(data).cast("B")
        for i in range(len(mv) // page_size):
            exp = self.written.get(slot + i)
            if exp is None:
                continue
            self.audit_checked += 1
            page = mv[i * page_size:(i + 1) * page_size]
            if zlib.crc32(page) != exp and len(self.audit_mismatches) < 20:
                self.audit_mismatches.append({"slot": slot + i, "head": bytes(page[:16]).hex()})

    @contextmanager
    def track(self, op: str, slot: int, nr_pages: int, what: str = "") -> Iterator[SwapIO]:
        io = SwapIO(next(self._ids), op, slot, nr_pages, trio.current_time(), what=what)
        if self.trace is not None:
            self.trace.append((op, slot, nr_pages))
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
