"""`netswap bench swap`'s baseline replays the emulated host's swap requests exactly.

The replay runs against a real local swap file (LocalFileSwap) with a latency, so writes overlap.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from emu.bench.swap import _ops, replay
from emu.mm.swap import LocalFileSwap


class Recording(LocalFileSwap):
    """A local swap file that logs each request as it starts and counts overlap."""

    def __init__(self, path: Path, latency: float) -> None:
        super().__init__(path, latency=latency)
        self.log: list[tuple[str, int, int]] = []
        self.done: list[tuple[str, int, int]] = []
        self.reads_inflight = 0
        self.max_reads_inflight = 0

    async def swap_rw(self, op, slot, bufs):  # type: ignore[no-untyped-def]
        self.log.append((op, slot, len(bufs)))
        if op == "read":
            self.reads_inflight += 1
            self.max_reads_inflight = max(self.max_reads_inflight, self.reads_inflight)
        try:
            await super().swap_rw(op, slot, bufs)
        finally:
            if op == "read":
                self.reads_inflight -= 1
        self.done.append((op, slot, len(bufs)))


async def test_replay_makes_the_same_requests_with_bounded_concurrency(tmp_path: Path) -> None:
    st = Recording(tmp_path / "swap", latency=0.002)
    await st.swap_activate(256, 4096)
    out = [("write", s, 1) for s in range(1, 41)] + [("write", 41, 8), ("write", 49, 3)]
    await replay(st, out, max_writes=16)
    assert sorted(st.log) == sorted(out)
    assert st.max_inflight == 16  # 42 writes, at most the slot table's 16 at once

    # The swap-in phase: reads one at a time, and a read of a slot written in the same phase
    # (slot 60: a page displaced, then faulted back) comes only after its write completed.
    st.log.clear(), st.done.clear()
    st.max_inflight = 0
    inn = [("read", 41, 8), ("write", 60, 2), ("read", 1, 1), ("read", 60, 2), ("read", 49, 3)]
    await replay(st, inn, max_writes=16)
    assert sorted(st.log) == sorted(inn)
    assert st.max_reads_inflight == 1
    assert st.done.index(("write", 60, 2)) < st.log.index(("read", 60, 2))
    assert [r for r in st.log if r[0] == "read"] == [r for r in inn if r[0] == "read"]
    assert _ops(inn) == {"read": 4, "read_pages": 14, "write": 1, "write_pages": 2}
    await st.swap_deactivate()


async def test_replay_checks_what_it_reads_back(tmp_path: Path) -> None:
    st = LocalFileSwap(tmp_path / "swap")
    await st.swap_activate(64, 4096)
    await replay(st, [("write", 1, 4)])
    # Slot 10 was never written by the replay: its stamp is wrong and the replay says so.
    with pytest.RaisesGroup(pytest.RaisesExc(RuntimeError, match="wrong data at slot 10")):
        await replay(st, [("read", 10, 1)])
    await replay(st, [("read", 1, 4)])  # what was written reads back right
    await st.swap_deactivate()
