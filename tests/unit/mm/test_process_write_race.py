"""A write that sleeps on writeback must re-check its pte (do_swap_page's pte_same) and retry.

The race: a write faults a page back from the swap cache while its swap-out is still in flight
and sleeps in wait_on_page_writeback.  When the write completes, reclaim can find the page clean
in the swap cache, unmap it again and free it before the writer runs.  A writer that does not
look at its pte again writes into the freed frame: the new version is lost and the next swap-in
brings back the previous one (a verify error).
"""

from __future__ import annotations

import trio

from emu.mm.gfp import GFP_KERNEL
from emu.mm.page_alloc import Page
from emu.mm.process import Process

TRIALS = 16  # each trial catches a writer that skips the recheck with probability >= 1/2


async def _reclaim_all(mm) -> None:  # type: ignore[no-untyped-def]
    # Two passes: the first clears the referenced bits (second chance), the second reclaims.
    for _ in range(2):
        mm.vmscan.shrink_list(len(mm.lru), GFP_KERNEL, kswapd=True)


async def test_write_sleeping_on_writeback_survives_reclaim(make_host, swapfile) -> None:  # type: ignore[no-untyped-def]
    h = await make_host(swapfile, ram=4 << 20, latency=0.005, kswapd=False)
    mm = h.mm
    proc = Process(mm, "racer", nr_pages=TRIALS)
    raced = 0
    for page_no in range(TRIALS):
        await proc.touch(page_no, write=True)
        await _reclaim_all(mm)
        entry = proc.pte[page_no]
        assert isinstance(entry, int), "reclaim must have unmapped the page"
        page = mm.swap_cache[entry]
        assert page.PG_writeback

        async def reclaimer(page: Page = page) -> None:
            # Reclaim as soon as the writeback ends, racing the writer's wake-up.
            while page.PG_writeback:
                await trio.sleep(0)
            await _reclaim_all(mm)

        majflt = mm.vmstat.counters["pgmajfault"]
        async with trio.open_nursery() as n:
            n.start_soon(reclaimer)
            # Faults the page back from the swap cache and sleeps on its writeback.
            await proc.touch(page_no, write=True)
        if mm.vmstat.counters["pgmajfault"] > majflt:
            raced += 1  # reclaim freed the page while the writer slept: it was read back
        # Whatever happened, the page must hold the latest version when it comes back.
        await _reclaim_all(mm)
        while mm.nr_writeback:
            await mm.wait_writeback_progress()
        await proc.touch(page_no, write=False)
        assert proc.pte[page_no].__class__ is Page
        assert proc.verify(page_no, proc.pte[page_no].data), f"page {page_no}: stale version after swap-in"
    assert proc.version == [2] * TRIALS
    assert mm.nr_verify_errors == 0, mm.verify_errors
    assert raced > 0, "the reclaimer never won the race: the test did not exercise it"
