"""Slab geometry, kmalloc, and the invariant: reserve objects only for entitled callers."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import trio
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from emu.mm.gfp import GFP_ATOMIC, GFP_KERNEL, GFP_NOWAIT, Gfp
from emu.kernel.policy import Policy
from emu.mm.page_alloc import Page, Zone
from emu.kernel.sched import TaskFlags, current, softirq, task
from emu.mm.slab import (
    KmemCache,
    SlabObj,
    Slabs,
    cache_estimate,
    calculate_slab_order,
    hwcache_align,
    kfree,
    kmalloc,
    kmalloc_estimate,
    kmalloc_objs_estimate,
    kmalloc_size_class,
    kmem_estimate,
)


def test_slab_geometry_matches_slab_c() -> None:
    # ip_dst_cache: 320 bytes, HWCACHE_ALIGN, on-slab (< PAGE_SIZE/8): (4096-48)//324 = 12
    assert hwcache_align(320) == 320
    assert cache_estimate(0, 320, 4096, off_slab=False) == (12, 4096 - 12 * 320 - 128)
    assert calculate_slab_order(320, 4096) == (0, 12, False)
    # size-512 is off-slab, 8 per page
    assert calculate_slab_order(512, 4096) == (0, 8, True)
    # size-32: 112 objects and a 512-byte management area fill the page exactly
    assert calculate_slab_order(32, 4096) == (0, 112, False)
    # size-8192 needs an order-1 slab
    assert calculate_slab_order(8192, 4096) == (1, 1, True)
    # small objects align to half cache lines while they fit
    assert hwcache_align(20) == 32 and hwcache_align(33) == 64 and hwcache_align(232) == 256


def test_estimates() -> None:
    assert kmem_estimate(16384, 320) == 1377  # 1366 slabs + 1 + ilog2(1366)
    assert kmem_estimate(0, 320) == 0
    assert kmalloc_estimate(262144) == 128
    assert kmalloc_objs_estimate(128, 424) == 21  # size-512: 16 pages + 1 + 4
    assert kmalloc_size_class(424) == 512 and kmalloc_size_class(32) == 32 and kmalloc_size_class(129) == 192
    with pytest.raises(ValueError):
        kmalloc_size_class(0)
    with pytest.raises(ValueError):
        kmem_estimate(-1, 64)


def _exhaust(zone: Zone, leave: int = 0) -> list[Page]:
    held: list[Page] = []
    with task("hog", TaskFlags.PF_MEMALLOC):
        while zone.nr_free > leave and (p := zone.alloc_pages(GFP_KERNEL)) is not None:
            held.extend(p)
    return held


def test_reserve_slab_objects_never_go_to_unentitled_callers() -> None:
    zone = Zone(1 << 20, policy=Policy.PFMEMALLOC)
    cache = KmemCache("skbuff_head_cache", 232, zone=zone)
    held = _exhaust(zone, leave=4)  # below every watermark, but not empty
    # Only an entitled caller can get an object now; it comes from a pfmemalloc slab.
    with task("kswapd0", TaskFlags.PF_MEMALLOC):
        reserve_obj = cache.alloc(GFP_KERNEL)
    assert reserve_obj is not None and reserve_obj.pfmemalloc
    assert cache.nr_pfmemalloc_slabs == 1
    # The pfmemalloc slab has free objects, but an ordinary caller must not get them.
    assert cache.alloc(GFP_ATOMIC) is None
    with task("nic"), softirq():
        assert cache.alloc(GFP_ATOMIC) is None
    # A __GFP_MEMALLOC caller (pfmemalloc policy) may.
    other = cache.alloc(GFP_ATOMIC | Gfp.MEMALLOC)
    assert other is not None and other.pfmemalloc and other.slab is reserve_obj.slab
    # Once normal memory is back, an ordinary caller gets a *new, normal* slab.
    zone.free_pages(held[:60])  # back above the low watermark
    obj = cache.alloc(GFP_KERNEL)
    assert obj is not None and not obj.pfmemalloc and obj.slab is not reserve_obj.slab
    for o in (reserve_obj, other, obj):
        cache.free(o)
    # The reserve slab went straight back; the normal one is kept for reuse (memory is plentiful).
    assert cache.nr_pfmemalloc_slabs == 0 and cache.nr_slabs == 1 and zone.nr_slab_free == 1
    assert cache.shrink() == 1
    assert cache.nr_slabs == 0 and zone.state["nr_slab"] == 0 and zone.nr_slab_free == 0
    zone.free_pages(held[60:])
    assert zone.nr_free == zone.nr_pages


CTX = {
    "process": (TaskFlags(0), False, GFP_KERNEL),
    "atomic": (TaskFlags(0), False, GFP_ATOMIC),
    "softirq": (TaskFlags(0), True, GFP_ATOMIC),
    "softirq PF_MEMALLOC": (TaskFlags.PF_MEMALLOC, True, GFP_ATOMIC),
    "PF_MEMALLOC": (TaskFlags.PF_MEMALLOC, False, GFP_KERNEL),
    "__GFP_MEMALLOC": (TaskFlags(0), False, GFP_ATOMIC | Gfp.MEMALLOC),
    "__GFP_NOMEMALLOC": (TaskFlags.PF_MEMALLOC, False, GFP_NOWAIT | Gfp.NOMEMALLOC),
}


@contextlib.contextmanager
def ctx(name: str) -> Iterator[Gfp]:
    flags, in_softirq, gfp = CTX[name]
    with task(name, flags):
        if in_softirq:
            with softirq():
                yield gfp
        else:
            yield gfp


op = st.one_of(
    st.tuples(st.just("alloc"), st.tuples(st.sampled_from(sorted(CTX)), st.integers(1, 16)), st.integers(0, 2)),
    st.tuples(st.just("free"), st.integers(0, 10_000), st.integers(0, 2)),
    st.tuples(st.just("squeeze"), st.integers(0, 48), st.just(0)),  # drain free pages down to N
    st.tuples(st.just("relax"), st.integers(1, 40), st.just(0)),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    policy=st.sampled_from(list(Policy)),
    ops=st.lists(op, min_size=1, max_size=120),
)
def test_slab_invariant_under_random_pressure(policy: Policy, ops: list[tuple[str, object, int]]) -> None:
    zone = Zone(512 * 1024, policy=policy)  # 128 pages, min 32
    slabs = Slabs(zone)
    caches = [slabs.cache("skbuff_head_cache", 232), slabs.cache("ip_dst_cache", 320), slabs.kmalloc_cache(2048)]
    live: list[SlabObj] = []
    squeezed: list[Page] = []
    for kind, arg, which in ops:
        if kind == "alloc":
            name, count = arg  # type: ignore[misc]
            with ctx(name) as gfp:
                entitled = zone.entitled(gfp, current())
                for _ in range(count):
                    obj = caches[which].alloc(gfp)
                    if obj is None:
                        break
                    event(f"pfmemalloc={obj.pfmemalloc} entitled={entitled}")
                    # THE invariant
                    assert not obj.pfmemalloc or entitled, f"{name} got a reserve object"
                    assert obj.pfmemalloc == obj.slab.pfmemalloc
                    live.append(obj)
        elif kind == "free" and live:
            obj = live.pop(int(arg) % len(live))
            obj.cache.free(obj)
        elif kind == "squeeze":
            with task("hog", TaskFlags.PF_MEMALLOC):
                while zone.nr_free > int(arg):
                    squeezed.extend(zone.alloc_pages(GFP_KERNEL) or [])
        elif kind == "relax" and squeezed:
            n = min(int(arg), len(squeezed))
            zone.free_pages(squeezed[-n:])
            del squeezed[-n:]
        # page accounting is exact after every step
        slab_pages = sum(c.nr_slabs << c.order for c in slabs.caches.values())
        assert zone.state["nr_slab"] == slab_pages
        assert zone.nr_free + slab_pages + len(squeezed) == zone.nr_pages
        assert sum(c.active_objs for c in caches) == len(live)
        # kept empty slabs: normal, empty, bounded, and counted by the zone
        kept = [s for c in caches for s in c.kept_slabs()]
        assert all(not s.pfmemalloc and s.inuse == 0 for s in kept)
        assert all(len(c.kept_slabs()) == c.nr_empty and c.nr_empty * c.num <= c.free_limit for c in caches)
        assert zone.nr_slab_free == sum(len(s.pages) for s in kept)
    for obj in live:
        kfree(obj)
    slabs.shrink()
    assert zone.nr_slab_free == 0
    zone.free_pages(squeezed)
    assert zone.nr_free == zone.nr_pages
    assert all(c.nr_slabs == 0 for c in slabs.caches.values())


def test_kmalloc_size_classes_and_large_objects() -> None:
    zone = Zone(1 << 20)
    slabs = Slabs(zone)
    small = kmalloc(100, GFP_KERNEL)
    assert small is not None and small.cache is slabs.caches["size-128"] and small.size == 100
    rqst = slabs.kmalloc(424, GFP_KERNEL)
    assert rqst is not None and rqst.cache is not None and rqst.cache.name == "size-512"
    big = kmalloc(20000, GFP_KERNEL)  # > 8192: straight from the page allocator, order 3
    assert big is not None and big.cache is None and len(big.pages or []) == 8
    free_before = zone.nr_free
    kfree(big)
    assert zone.nr_free == free_before + 8
    with pytest.raises(RuntimeError, match="double"):
        kfree(big)
    kfree(small)
    slabs.kfree(rqst)
    with pytest.raises(RuntimeError):
        slabs.kfree(rqst)
    assert zone.nr_free == zone.nr_pages - 2  # size-128 and size-512 keep their empty slab
    assert slabs.shrink() == 2
    assert zone.nr_free == zone.nr_pages
    with pytest.raises(ValueError):
        kmalloc(0, GFP_KERNEL)
    with pytest.raises(ValueError):
        KmemCache("bad", -1, zone=zone)


def test_slabinfo_view() -> None:
    zone = Zone(1 << 20)
    slabs = Slabs(zone)
    c = slabs.cache("ip_dst_cache", 320)
    objs = [c.alloc(GFP_KERNEL) for _ in range(13)]
    text = slabs.slabinfo()
    assert text.startswith("slabinfo - version: 2.1")
    line = next(line for line in text.splitlines() if line.startswith("ip_dst_cache"))
    assert line.split()[:6] == ["ip_dst_cache", "13", "24", "320", "12", "1"]
    for o in objs:
        c.free(o)  # type: ignore[arg-type]


async def test_alloc_wait_reclaims_or_raises() -> None:
    from emu.mm.page_alloc import OutOfMemory

    zone = Zone(1 << 20)
    c = KmemCache("x", 1024, zone=zone)
    _exhaust(zone)
    with task("p"), pytest.raises(OutOfMemory):
        await c.alloc_wait(GFP_KERNEL)


def test_empty_slabs_are_kept_up_to_free_limit_and_reused() -> None:
    zone = Zone(4 << 20)  # 1024 pages, high watermark 96: plenty
    c = KmemCache("skbuff_head_cache", 232, zone=zone)  # 15 objects a page
    assert c.free_limit == 120 + 2 * 60 + 15  # per-cpu array limit + SLAB's free_limit
    objs = [c.alloc(GFP_ATOMIC) for _ in range(15 * 20)]  # 20 full slabs
    pgalloc = zone.vmstat["pgalloc"]
    free_before = zone.nr_free
    for o in objs:
        c.free(o)  # type: ignore[arg-type]
    # 17 empty slabs (255 objects) are kept, the other 3 go back to the page allocator
    assert c.nr_empty == 17 and zone.nr_slab_free == 17 and c.nr_slabs == 17
    assert zone.nr_free == free_before + 3 and zone.state["nr_slab"] == 17
    assert c.active_objs == 0
    assert c.slabinfo_line().split()[13:15] == ["0", "17"]  # slabdata: 0 active of 17 slabs
    # Refilling takes the kept slabs first: no page allocation for 255 objects.
    again = [c.alloc(GFP_ATOMIC) for _ in range(255)]
    assert zone.vmstat["pgalloc"] == pgalloc and zone.nr_slab_free == 0 and not c.kept_slabs()
    for o in again:
        c.free(o)  # type: ignore[arg-type]
    assert c.shrink() == 17 and c.nr_slabs == 0 and zone.nr_free == zone.nr_pages


def test_empty_slabs_are_not_kept_below_the_high_watermark() -> None:
    zone = Zone(4 << 20)
    c = KmemCache("ip_dst_cache", 320, zone=zone)
    obj = c.alloc(GFP_ATOMIC)
    held = _exhaust(zone, leave=zone.watermark_high)  # exactly at high: not "plenty"
    c.free(obj)  # type: ignore[arg-type]
    assert c.nr_slabs == 0 and zone.nr_slab_free == 0 and zone.nr_free == zone.watermark_high + 1
    zone.free_pages(held)


def test_kept_slabs_are_released_before_the_fast_path_would_fail() -> None:
    """Kept empty slabs count as free for every watermark decision: an allocation that would
    miss the fast path releases them first, so kswapd wakes exactly when it would without them."""
    zone = Zone(4 << 20)
    zone.kswapd_wait = trio.Event()  # kswapd asleep: a wakeup would set this
    slabs = Slabs(zone)
    c1, c2 = slabs.cache("skbuff_head_cache", 232), slabs.kmalloc_cache(1024)
    objs = [c1.alloc(GFP_ATOMIC) for _ in range(30)] + [c2.alloc(GFP_ATOMIC) for _ in range(8)]
    for o in objs:
        kfree(o)  # type: ignore[arg-type]
    kept = zone.nr_slab_free
    assert kept == 4 and zone.slab_free_caches == [c1, c2]
    # Take pages down to the low watermark on the fast path; the kept slabs stay kept.
    held: list[Page] = []
    while zone.nr_free > zone.watermark_low:
        held.extend(zone.alloc_pages(GFP_KERNEL) or [])
    assert zone.nr_slab_free == kept and zone.nr_free == zone.watermark_low
    page = zone.alloc_pages(GFP_KERNEL)  # misses the fast path, but not with the kept pages
    assert page is not None and not page[0].pfmemalloc
    assert zone.nr_slab_free == 0 and c1.nr_slabs == c2.nr_slabs == 0 and not zone.slab_free_caches
    assert not zone.kswapd_wait.is_set() and zone.vmstat["kswapd_wakeup"] == 0
    assert zone.vmstat["pgalloc_fail"] == 0
    assert zone.nr_free == zone.watermark_low + kept - 1  # as if the slabs had been freed at once
    zone.free_pages(held + page)
    assert zone.nr_free == zone.nr_pages


def test_alloc_obj_and_free_obj_keep_the_same_accounting_without_handles() -> None:
    zone = Zone(1 << 20)
    c = KmemCache("skbuff_head_cache", 232, zone=zone)
    slabs = [c.alloc_obj(GFP_ATOMIC) for _ in range(16)]  # one full slab and one more
    assert c.active_objs == 16 and c.nr_slabs == 2 and slabs[0] is slabs[14] is not slabs[15]
    assert slabs[0].inuse == 15 and not c._partial[0] is slabs[0]
    obj = c.alloc(GFP_ATOMIC)  # the handle API shares the slabs
    assert obj is not None and obj.slab is slabs[15] and slabs[15].inuse == 2
    c.free(obj)
    for s in slabs:
        c.free_obj(s)  # type: ignore[arg-type]
    assert c.active_objs == 0 and all(s.inuse == 0 for s in slabs)
    with pytest.raises(RuntimeError):
        c.free_obj(slabs[0])  # nothing is allocated in it any more
    other = KmemCache("ip_dst_cache", 320, zone=zone)
    foreign = other.alloc_obj(GFP_ATOMIC)
    with pytest.raises(RuntimeError):
        c.free_obj(foreign)  # type: ignore[arg-type]
    other.free_obj(foreign)  # type: ignore[arg-type]
    c.shrink()
    other.shrink()
    assert zone.nr_free == zone.nr_pages


def test_free_bulk_leaves_what_freeing_one_by_one_leaves() -> None:
    def run(bulk: bool) -> tuple[object, ...]:
        zone = Zone(1 << 20)
        c = KmemCache("size-1024", 1024, zone=zone)  # 4 objects a slab: every path of free_obj
        slabs = [c.alloc_obj(GFP_ATOMIC) for _ in range(37)]
        keep = slabs[5:9] + slabs[20:21]
        gone = [s for i, s in enumerate(slabs) if not (5 <= i < 9 or i == 20)]
        if bulk:
            c.free_bulk(gone)  # type: ignore[arg-type]
        else:
            for s in gone:
                c.free_obj(s)  # type: ignore[arg-type]
        return (c.active_objs, c.nr_slabs, len(c._partial), c.nr_empty, zone.nr_free,
                [s.inuse for s in keep], zone.nr_slab_free)

    assert run(True) == run(False)
    assert run(True)[0] == 5
