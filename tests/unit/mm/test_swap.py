"""Swap areas, the local-file storage, and swap-out/swap-in round trips with every page verified."""

from __future__ import annotations

import os

import pytest
import trio
import trio.testing

from emu.mm.page_alloc import Page
from emu.mm.process import Process, SegmentationFault, page_content
from emu.kernel.sched import task
from emu.mm.swap import (
    SWAP_MAGIC,
    LocalFileSwap,
    SwapArea,
    SwapIOError,
    group_contiguous,
    swp_entry,
    swp_offset,
    swp_type,
)


def test_swap_entries_and_slots() -> None:
    e = swp_entry(3, 12345)
    assert (swp_type(e), swp_offset(e)) == (3, 12345)
    area = SwapArea(LocalFileSwap("/nonexistent"), 6)
    slots = [swp_offset(area.get_swap_page() or 0) for _ in range(5)]
    assert slots == [1, 2, 3, 4, 5]  # slot 0 is the header
    assert area.get_swap_page() is None and area.nr_free == 0
    area.swap_free(swp_entry(0, 2))
    assert swp_offset(area.get_swap_page() or 0) == 2  # wraps to the hole
    with pytest.raises(RuntimeError):
        area.swap_free(swp_entry(0, 0))
    area.swap_free(swp_entry(0, 3))
    with pytest.raises(RuntimeError):
        area.swap_free(swp_entry(0, 3))
    assert group_contiguous([(1, "a"), (2, "b"), (3, "c"), (7, "d"), (8, "e")], 2) == [
        (1, ["a", "b"]), (3, ["c"]), (7, ["d", "e"])]


async def test_local_file_swap_io(swapfile: str) -> None:
    s = LocalFileSwap(swapfile)
    await s.swap_activate(8, 4096)
    assert os.path.getsize(swapfile) == 8 * 4096
    data = [bytearray(os.urandom(4096)) for _ in range(3)]
    await s.swap_rw("write", 2, [memoryview(d) for d in data])
    back = [bytearray(4096) for _ in range(3)]
    await s.swap_rw("read", 2, [memoryview(b) for b in back])
    assert back == data
    with pytest.raises(SwapIOError):
        await s.swap_rw("read", 7, [memoryview(bytearray(4096)), memoryview(bytearray(4096))])
    await s.swap_deactivate()
    with pytest.raises(SwapIOError):
        await s.swap_rw("read", 0, [memoryview(bytearray(4096))])
    with pytest.raises(ValueError):
        await LocalFileSwap(swapfile).swap_activate(1, 4096)


async def test_round_trip_every_page_verified(make_host, swapfile: str,
                                              autojump_clock: trio.testing.MockClock) -> None:
    h = await make_host(swapfile, ram=2 << 20, latency=0.002)
    mm = h.mm
    n = 3 * h.zone.nr_pages  # three times RAM
    p = Process(mm, "hog", n)
    with task("hog"):
        for i in range(n):
            await p.touch(i, write=True)
        assert mm.vmstat["pswpout"] > n - h.zone.nr_pages
        assert p.nr_swapents > 0
        for i in range(n):
            await p.touch(i, write=False)
            page = p.pte[i]
            assert page.__class__ is Page
            assert page.data == page_content(p.pid, i, 1, 4096)  # every page, checked here too
    assert mm.nr_verify_errors == 0
    assert mm.vmstat["pswpin"] >= n - h.zone.nr_pages
    # Pages read = major faults + pages read ahead; read-ahead pages were verified when mapped.
    assert mm.vmstat["pswpin"] == mm.vmstat["pgmajfault"] + mm.vmstat["swap_ra"]
    assert mm.vmstat["swap_ra"] > 0 and mm.vmstat["swap_ra_hit"] > 0
    assert h.storage is not None and h.storage.max_inflight > 1  # asynchronous swap-out
    with open(swapfile, "rb") as f:
        assert f.read(4096).endswith(SWAP_MAGIC)  # the header written at swapon
    p.exit()
    while mm.nr_writeback:
        await mm.wait_writeback_progress()
    assert h.zone.nr_free == h.zone.nr_pages
    assert mm.swap_areas[0].inuse_pages == 0 and not mm.swap_cache and not mm.lru


async def test_rewrites_and_custom_content_survive_swap(make_host, swapfile: str,
                                                        autojump_clock: trio.testing.MockClock) -> None:
    h = await make_host(swapfile, ram=1 << 20)
    mm = h.mm
    n = 3 * h.zone.nr_pages
    p = Process(mm, "editor", n)
    blob = bytes(range(256)) * 16
    with task("editor"):
        for rnd in range(3):
            for i in range(n):
                if i == 5:
                    await p.fill(i, blob)
                else:
                    await p.touch(i, write=(i + rnd) % 2 == 0)
        for i in range(n):
            await p.touch(i, write=False)
            assert p.verify(i, p.pte[i].data)  # type: ignore[union-attr]
            if i == 5:
                assert bytes(p.pte[5].data) == blob  # type: ignore[union-attr]
    assert mm.nr_verify_errors == 0 and mm.vmstat["pswpin"] > 0


async def test_corruption_on_storage_is_detected(make_host, swapfile: str,
                                                 autojump_clock: trio.testing.MockClock) -> None:
    h = await make_host(swapfile, ram=1 << 20)
    mm = h.mm
    p = Process(mm, "victim", 3 * h.zone.nr_pages)
    with task("victim"):
        for i in range(p.nr_pages):
            await p.touch(i)
        while mm.nr_writeback:
            await mm.wait_writeback_progress()
        e0, e1 = p.pte[0], p.pte[1]
        assert isinstance(e0, int) and isinstance(e1, int) and swp_offset(e1) == swp_offset(e0) + 1
        fd = os.open(swapfile, os.O_WRONLY)
        os.pwrite(fd, b"\xff" * 4096, swp_offset(e0) * 4096)
        os.pwrite(fd, b"\xee" * 4096, swp_offset(e1) * 4096)
        os.close(fd)
        await p.touch(0, write=False)  # major fault; page 1 comes in by readahead
        assert mm.vmstat["swap_ra"] > 0
        await p.touch(1, write=False)  # swap-cache hit: verified now
        await p.touch(2, write=False)
    assert mm.nr_verify_errors == 2
    assert [e[1:] for e in mm.verify_errors] == [(p.pid, 0, 1), (p.pid, 1, 1)]


async def test_write_errors_keep_the_data(make_host, swapfile: str,
                                          autojump_clock: trio.testing.MockClock) -> None:
    h = await make_host(swapfile, ram=1 << 20)
    assert h.storage is not None
    h.storage.fail_after = h.storage.nr_reads + h.storage.nr_writes  # every I/O from now on fails
    mm = h.mm
    p = Process(mm, "p", 2 * h.zone.nr_pages)
    with task("p"):
        async with trio.open_nursery() as n:
            async def toucher() -> None:
                for i in range(p.nr_pages):
                    await p.touch(i)
            n.start_soon(toucher)
            while mm.nr_swap_io_errors < 10:  # reclaim keeps retrying the failed pages
                await trio.lowlevel.checkpoint()
            h.storage.fail_after = None  # the device recovers: reclaim retries the dirty pages
        for i in range(p.nr_pages):
            await p.touch(i, write=False)
    assert mm.nr_verify_errors == 0 and mm.swap_areas[0].nr_write_errors > 0


async def test_swapoff_brings_everything_back(make_host, swapfile: str,
                                              autojump_clock: trio.testing.MockClock) -> None:
    h = await make_host(swapfile, ram=2 << 20)
    mm = h.mm
    keep = Process(mm, "keep", 100)
    hog = Process(mm, "hog", 2 * h.zone.nr_pages)
    with task("t"):
        for i in range(100):
            await keep.touch(i)
        for i in range(hog.nr_pages):
            await hog.touch(i)
        assert keep.nr_swapents > 0
        hog.exit()
        await mm.swapoff(mm.swap_areas[0])
    assert keep.nr_swapents == 0 and keep.rss == 100
    assert all(keep.verify(i, keep.pte[i].data) for i in range(100))  # type: ignore[union-attr]
    assert mm.nr_verify_errors == 0 and mm.get_swap_page() is None


async def test_process_bounds() -> None:
    from emu.mm.vm import Vm
    from emu.mm.page_alloc import Zone

    p = Process(Vm(Zone(1 << 20)), "small", 4)
    with pytest.raises(SegmentationFault):
        await p.touch(4)
    with pytest.raises(SegmentationFault):
        await p.touch(-1)
    with pytest.raises(ValueError):
        await p.fill(0, b"short")
    await p.touch(0, write=False)
    assert p.pte[0].data == bytes(4096)  # type: ignore[union-attr]
    assert p.status()["VmRSS"] == 4


async def test_exit_during_swap_io_frees_everything(make_host, swapfile: str,
                                                    autojump_clock: trio.testing.MockClock) -> None:
    h = await make_host(swapfile, ram=1 << 20, latency=1.0, kswapd=False)
    mm, zone = h.mm, h.zone
    p = Process(mm, "shortlived", 2 * zone.nr_pages)
    q = Process(mm, "other", 8)
    with task("t"):
        async with trio.open_nursery() as n:
            async def fill() -> None:
                for i in range(p.nr_pages):
                    await p.touch(i)
            n.start_soon(fill)
            while mm.nr_writeback == 0:
                await trio.sleep(0.1)
            n.cancel_scope.cancel()
        assert mm.nr_writeback > 0
        p.exit()  # pages under writeback: freed by the completions
        await trio.sleep(5)
        assert mm.nr_writeback == 0
        assert mm.swap_areas[0].inuse_pages == 0 and not mm.swap_cache
        # Now a swapped-out process exits while its page (and read-ahead) is being read.
        r = Process(mm, "reader", 2 * zone.nr_pages)
        for i in range(r.nr_pages):
            await r.touch(i)
        await trio.sleep(5)
        assert isinstance(r.pte[0], int)
        async def doomed() -> None:
            with pytest.raises(SegmentationFault, match="exited"):
                await r.touch(0, False)

        async with trio.open_nursery() as n:
            n.start_soon(doomed)
            await trio.sleep(0.5)  # the read (with read-ahead) is in flight
            assert any(pg.PG_locked for pg in mm.swap_cache.values())
            r.exit()
        await trio.sleep(5)
    assert mm.swap_areas[0].inuse_pages == 0 and not mm.swap_cache and not mm._orphans
    assert zone.nr_free == zone.nr_pages - q.rss
