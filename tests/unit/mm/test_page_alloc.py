"""Watermarks, the watermark check with its discounts, v12's pages_emerg, waiting for pages."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from emu.mm.gfp import GFP_ATOMIC, GFP_HIGHUSER, GFP_KERNEL, GFP_NOWAIT, Gfp
from emu.kernel.policy import Policy
from emu.mm.page_alloc import AllocFlags, OutOfMemory, Page, Zone, default_min_free_kbytes
from emu.kernel.sched import TaskFlags, task


def drain(zone: Zone, target: int) -> list[Page]:
    held: list[Page] = []
    with task("drain", TaskFlags.PF_MEMALLOC):
        while zone.nr_free > target:
            held.extend(zone.alloc_pages(GFP_KERNEL) or [])
    return held


@pytest.mark.parametrize(
    "ram_kb,expected",
    [(1024, 128), (8192, 362), (16384, 512), (65536, 1024), (1 << 20, 4096), (1 << 30, 65536)],
)
def test_default_min_free_kbytes(ram_kb: int, expected: int) -> None:
    # int_sqrt(lowmem_kbytes * 16), clamped to [128, 65536]
    assert default_min_free_kbytes(ram_kb) == expected


def test_classic_watermarks() -> None:
    z = Zone(16 << 20)
    assert z.min_free_kbytes == 512
    assert (z.watermark_min, z.watermark_low, z.watermark_high) == (128, 160, 192)
    z2 = Zone(16 << 20, min_free_kbytes=1000)
    assert (z2.watermark_min, z2.watermark_low, z2.watermark_high) == (250, 312, 375)


@pytest.mark.parametrize(
    "flags,effective",
    [
        (AllocFlags(0), 128),
        (AllocFlags.HIGH, 64),  # mark - mark/2
        (AllocFlags.HARDER, 96),  # mark - mark/4
        (AllocFlags.HIGH | AllocFlags.HARDER, 48),  # GFP_ATOMIC: both
    ],
)
def test_watermark_check_discounts(flags: AllocFlags, effective: int) -> None:
    z = Zone(16 << 20)
    held = drain(z, effective + 1)
    assert z.zone_watermark_ok(0, z.watermark_min, flags)  # free > mark
    assert not z.zone_watermark_ok(1, z.watermark_min, flags)  # order 1: free - 2 + 1 > mark
    z.free_pages(held[-1:])
    assert z.zone_watermark_ok(1, z.watermark_min, flags)
    held = held[:-1] + drain(z, effective)
    assert not z.zone_watermark_ok(0, z.watermark_min, flags)


@pytest.mark.parametrize(
    "gfp,floor",
    [(GFP_KERNEL, 128), (GFP_HIGHUSER, 128), (GFP_NOWAIT, 96), (GFP_ATOMIC, 48)],
)
def test_ordinary_callers_stop_at_their_floor(gfp: Gfp, floor: int) -> None:
    z = Zone(16 << 20)
    got = 0
    while z.alloc_pages(gfp) is not None:
        got += 1
    assert z.nr_free == floor
    assert got == z.nr_pages - floor
    assert z.vmstat["pgalloc_fail"] == 1
    assert z.vmstat["pgalloc_pfmemalloc"] == 0


def test_v12_emergency_pool_adds_to_every_mark() -> None:
    z = Zone(16 << 20, policy=Policy.V12)
    z.pages_emerg = 100
    while z.alloc_pages(GFP_ATOMIC) is not None:
        pass
    assert z.nr_free == 48 + 100  # the pool is above even the atomic floor
    with task("reclaimer", TaskFlags.PF_MEMALLOC):
        pages = z.alloc_pages(GFP_KERNEL)
    assert pages is not None and pages[0].pfmemalloc
    # Under the other policies pages_emerg is not part of the check.
    z3 = Zone(16 << 20, policy=Policy.PFMEMALLOC)
    z3.pages_emerg = 100
    while z3.alloc_pages(GFP_ATOMIC) is not None:
        pass
    assert z3.nr_free == 48


def test_fast_path_wakes_kswapd_only_below_low() -> None:
    z = Zone(16 << 20)
    ev = trio.Event()
    z.kswapd_wait = ev
    drain(z, z.watermark_low + 1)
    assert z.alloc_pages(GFP_KERNEL) is not None  # free was low+1: fast path, no wake
    assert not ev.is_set()
    assert z.alloc_pages(GFP_KERNEL) is not None  # free == low: slow path wakes kswapd
    assert ev.is_set() and z.kswapd_wait is None
    assert z.vmstat["kswapd_wakeup"] == 1


def test_pfmemalloc_tag_only_for_pages_below_watermarks() -> None:
    z = Zone(4 << 20)
    with task("r", TaskFlags.PF_MEMALLOC):
        first = z.alloc_pages(GFP_KERNEL)
        assert first is not None and not first[0].pfmemalloc
        drain(z, 5)
        reserve = z.alloc_pages(GFP_KERNEL)
        assert reserve is not None and reserve[0].pfmemalloc
        z.free_pages(reserve)
        assert not reserve[0].pfmemalloc  # cleared on free


def test_order_allocations_and_double_free() -> None:
    z = Zone(4 << 20)
    pages = z.alloc_pages(GFP_KERNEL, order=2)
    assert pages is not None and len(pages) == 4
    assert z.nr_free == z.nr_pages - 4
    z.free_pages(pages)
    assert z.nr_free == z.nr_pages
    with pytest.raises(RuntimeError, match="double free"):
        z.free_pages(pages[:1])
    with pytest.raises(ValueError, match="order"):
        z.alloc_pages(GFP_ATOMIC, order=11)


def test_pages_hold_real_bytes() -> None:
    z = Zone(1 << 20, page_size=4096)
    (p,) = z.alloc_pages(GFP_KERNEL) or []
    assert isinstance(p.data, bytearray) and len(p.data) == 4096
    p.data[:5] = b"hello"
    assert bytes(p.data[:5]) == b"hello"


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"ram_bytes": 0}, "RAM must be positive"),
        ({"ram_bytes": -4096}, "RAM must be positive"),
        ({"ram_bytes": 8192}, "fewer than 16 pages"),
        ({"ram_bytes": 1 << 20, "page_size": 1000}, "power of two"),
        ({"ram_bytes": 1 << 20, "min_free_kbytes": -1}, "min_free_kbytes"),
        ({"ram_bytes": 1 << 20, "min_free_kbytes": 1024}, "not smaller than RAM"),
    ],
)
def test_impossible_zones_are_refused(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Zone(**kwargs)


async def test_alloc_pages_wait_refuses_what_cannot_sleep_or_reclaim() -> None:
    z = Zone(4 << 20)
    drain(z, 0)
    with pytest.raises(OutOfMemory, match="cannot sleep"):
        await z.alloc_pages_wait(GFP_ATOMIC)
    with task("p"), pytest.raises(OutOfMemory, match="no swap"):
        await z.alloc_pages_wait(GFP_KERNEL)


async def test_pf_memalloc_waiter_sleeps_until_a_page_is_freed(autojump_clock: trio.testing.MockClock) -> None:
    z = Zone(4 << 20)
    held = drain(z, 0)
    got: list[float] = []

    async def writer() -> None:
        with task("rpciod", TaskFlags.PF_MEMALLOC) as t:
            pages = await z.alloc_pages_wait(GFP_KERNEL)
            got.append(trio.current_time())
            assert pages[0].pfmemalloc
            assert t.state == "R"

    async with trio.open_nursery() as n:
        n.start_soon(writer)
        await trio.sleep(3)
        assert not got
        z.free_pages(held[:1])
    assert got == [3.0]


def test_watermark_floor_is_what_an_allocation_leaves() -> None:
    z = Zone(16 << 20, policy=Policy.V12)
    z.pages_emerg = 10
    floor = z.watermark_floor(z.watermark_min, AllocFlags.HIGH | AllocFlags.HARDER)
    assert floor == 48 + 10
    while z.alloc_pages(GFP_ATOMIC) is not None:
        pass
    assert z.nr_free == floor


def test_text_views() -> None:
    from emu.mm.vmstat import VmStat

    vm = VmStat()
    z = Zone(16 << 20, vmstat=vm)
    pages = z.alloc_pages(GFP_KERNEL, order=1)
    vm.inc("pswpout", 3)
    text = vm.vmstat(z)
    assert "nr_free_pages 4094\n" in text and "pgalloc 2\n" in text and "pswpout 3\n" in text
    assert vm.snapshot()["pswpout"] == 3
    info = vm.meminfo(z, {"SwapTotal": 1024})
    assert "MemTotal:          16384 kB" in info and "MemFree:           16376 kB" in info
    assert "SwapTotal:          1024 kB" in info
    assert "min      128" in z.zoneinfo()
    z.free_pages(pages or [])
