"""rpc_malloc's semantics for the NFS client's request buffers: never sleep in reclaim, fall back
on the mempool, else retry after HZ >> 4 (net/sunrpc/sched.c, call_allocate)."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from emu.kernel.sched import TaskFlags, task
from emu.mm.gfp import GFP_KERNEL, GFP_NOFS, GFP_NOWAIT, Gfp
from emu.mm.page_alloc import Page, Zone
from emu.mm.sizes import RPC_RQST
from emu.mm.slab import Slabs
from emu.swapdev.buffers import RPC_ALLOC_RETRY, RPC_BUFFER_POOLSIZE, RpcBuffers


def _exhaust(zone: Zone) -> list[Page]:
    """Take every page a non-PF_MEMALLOC GFP_NOWAIT allocation could get (and more)."""
    held: list[Page] = []
    with task("hog", TaskFlags.PF_MEMALLOC):
        while (pages := zone.alloc_pages(GFP_KERNEL)) is not None:
            held.extend(pages)
    return held


def test_rpc_malloc_refuses_a_sleeping_gfp() -> None:
    zone = Zone(2 << 20, policy="none")
    with pytest.raises(ValueError, match="never sleeps"):
        RpcBuffers(Slabs(zone), GFP_NOFS, RPC_RQST, 16)


async def test_pool_then_delay_never_reclaim(autojump_clock: trio.testing.MockClock) -> None:
    zone = Zone(2 << 20, policy="none")
    slabs = Slabs(zone)
    bufs = RpcBuffers(slabs, GFP_NOWAIT, RPC_RQST, 16)
    await bufs.fill_pool()
    assert len(bufs.pool) == RPC_BUFFER_POOLSIZE and len(bufs.rqsts) == 16
    # Control objects for the requests below come from partial slabs made now; then memory is gone.
    warm = [await bufs.alloc(200) for _ in range(RPC_BUFFER_POOLSIZE + 2)]
    for t in warm:
        bufs.free(t)
    held = _exhaust(zone)
    slabs.shrink()  # no free object left anywhere but the pool
    assert zone.nr_free == 0 or zone.alloc_pages(GFP_NOWAIT) is None

    with task("rpciod"):
        tokens = []
        t0 = trio.current_time()
        for _ in range(RPC_BUFFER_POOLSIZE):
            tokens.append(await bufs.alloc(200))
        assert trio.current_time() == t0  # the pool served them at once
        assert bufs.pool_taken == RPC_BUFFER_POOLSIZE and not bufs.pool
        got: list[object] = []

        async def one_more() -> None:
            with task("rpciod"):
                got.append(await bufs.alloc(200))

        async with trio.open_nursery() as n:
            n.start_soon(one_more)
            await trio.sleep(3 * RPC_ALLOC_RETRY + RPC_ALLOC_RETRY / 2)
            assert not got and bufs.delays == 4  # tried at 0, 1/16, 2/16, 3/16 s: no reclaim
            assert zone.vmstat.counters.get("allocstall", 0) == 0  # nobody entered direct reclaim
            bufs.free(tokens.pop())  # mempool_free: back to the pool, the next retry takes it
        assert got and trio.current_time() - t0 == pytest.approx(4 * RPC_ALLOC_RETRY)
    for t in tokens + got:
        bufs.free(t)
    assert bufs.live == 0 and len(bufs.pool) == RPC_BUFFER_POOLSIZE and len(bufs.rqsts) == 16
    for p in held:
        zone.free_pages([p])


async def test_memalloc_swapper_gets_the_reserve(autojump_clock: trio.testing.MockClock) -> None:
    """3.6: RPC_TASK_SWAPPER adds __GFP_MEMALLOC; a plain GFP_NOWAIT caller below min gets nothing."""
    zone = Zone(2 << 20, policy="pfmemalloc")
    slabs = Slabs(zone)
    plain = RpcBuffers(slabs, GFP_NOWAIT, RPC_RQST, 16)
    swapper = RpcBuffers(slabs, GFP_NOWAIT | Gfp.MEMALLOC, RPC_RQST, 16)
    await plain.fill_pool()
    await swapper.fill_pool()
    held: list[Page] = []
    with task("hog"):
        while zone.nr_free > zone.watermark_min // 2:
            held.extend(zone.alloc_pages(GFP_NOWAIT | Gfp.MEMALLOC) or [])
    with task("rpciod"):
        tok = plain._try(200)
        assert tok is not None and tok[1] is None  # no page for it: one of the pool's buffers
        tok = swapper._try(200)
        assert tok is not None and tok[1] is not None  # kmalloc'ed from the reserve, not the pool
