"""Route cache and fragment queues as data structures, on a real Zone and Slabs."""

from __future__ import annotations

import pytest

from emu.kernel.sched import softirq
from emu.mm.gfp import GFP_ATOMIC
from emu.kernel.policy import Policy
from emu.mm.page_alloc import Zone
from emu.mm.sizes import IPQ
from emu.mm.slab import Slabs
from emu.net.ipfrag import FragQueues
from emu.net.netstat import DUP_FRAG, FRAG_NOMEM
from emu.net.route import RouteCache
from emu.net.stack import NetStack


def stack(**kw) -> NetStack:
    zone = Zone(8 << 20, policy=Policy.NONE)
    return NetStack(zone, Slabs(zone), **kw)


def test_route_cache_hits_misses_gc_and_limit() -> None:
    net = stack(ip_rt_max_size=10, ip_rt_gc_thresh=5, ip_rt_gc_min_interval=1.0, ip_rt_gc_timeout=100.0)
    rc = net.routes
    with softirq():
        for i in range(12):
            e = rc.input(f"10.0.0.{i}", "127.0.0.1", now=0.0)
            assert (e is None) == (i >= 10)
        assert rc.input("10.0.0.3", "127.0.0.1", now=0.5) is not None  # a hit refreshes lastuse
        assert net.stat.route_hits == 1 and net.stat.route_overflow == 2
        assert net.stat.route_lookups == 13 and net.stat.route_entries_created == 10
        assert rc.dst_cache.active_objs == 10
        # At 2.0 everything but 10.0.0.3 is idle past the interval: GC frees the oldest 5.
        assert rc.input("10.0.0.99", "127.0.0.1", now=2.0) is not None
    assert len(rc) == 6 and ("10.0.0.3", "127.0.0.1") in rc.table
    assert net.stat.route_gc_freed == 5
    assert rc.expire(now=101.0) == 6 - 1  # the newest entries were used at 2.0
    rc.flush()
    assert len(rc) == 0 and rc.dst_cache.active_objs == 0
    assert rc.dst_cache is net.slabs.caches["ip_dst_cache"]


def test_route_cache_without_memory_drops() -> None:
    net = stack()
    pages = []
    while (p := net.zone.alloc_pages(GFP_ATOMIC)) is not None:
        pages.extend(p)
    with softirq():
        assert net.routes.input("10.0.0.1", "127.0.0.1", now=0.0) is None
    assert len(net.routes) == 0 and net.stat.route_overflow == 0 and net.stat.route_entries_created == 0
    net.zone.free_pages(pages)
    with softirq():
        assert net.routes.input("10.0.0.1", "127.0.0.1", now=0.0) is not None


def test_route_cache_parameters_validated() -> None:
    net = stack()
    with pytest.raises(ValueError):
        RouteCache(net.slabs, net.stat, 1, 0)
    with pytest.raises(ValueError):
        RouteCache(net.slabs, net.stat, -1, 10)
    with pytest.raises(ValueError):
        FragQueues(net.skbs, net.stat, 100, 200)
    with pytest.raises(ValueError):
        FragQueues(net.skbs, net.stat, 100, -1)


def test_default_route_limits_follow_the_era_sizing() -> None:
    net = stack()
    # 8 MiB: 2048 pages -> max(2048 >> 5, 512) = 512 buckets, max_size 8192
    assert net.routes.gc_thresh == 512 and net.routes.max_size == 8192
    assert net.frags.high_thresh == 256 * 1024 and net.frags.low_thresh == 192 * 1024
    # a small ipfrag_high_thresh brings the low one down with it (3/4)
    assert stack(ipfrag_high_thresh=40_000).frags.low_thresh == 30_000


def test_fragments_out_of_order_duplicates_and_accounting() -> None:
    net = stack()
    fq = net.frags
    key = ("10.1.1.1", "127.0.0.1", 7, 17)
    payload = b"p" * 3000
    pieces = [(1480, 1480, True), (2960, 48, False), (0, 1480, True)]
    with softirq():
        out = None
        for off, n, more in pieces:
            skb = net.skbs.rx(n + 20)
            out = fq.queue_fragment(skb, key, off, n, more, payload if off == 0 else None, 0.0)
            if off == 2960:
                assert out is None and fq.ip_frag_mem == IPQ + sum(
                    s.truesize for _, _, s in fq.queues[key].frags)
                assert net.skbs.live == 2 == fq.queued_skbs()
                dup = net.skbs.rx(1500)
                # an overlap: dropped (and freed), with its verdict
                assert fq.queue_fragment(dup, key, 1480, 1480, True, None, 0.0) == DUP_FRAG
                assert net.skbs.live == 2 and dup.head is None
    assert out is not None and out.data == payload and len(out.frag_list) == 2
    assert out.len == len(payload)
    assert fq.ip_frag_mem == 0 and len(fq) == 0
    assert out.truesize == sum(n + 20 + 552 for _, n, _ in pieces)
    assert out.own_truesize == 1480 + 20 + 552
    assert net.stat.frag_reassembled == 1
    assert net.skbs.live == 3 and net.skbs.live_truesize == out.truesize
    net.skbs.free(out)
    assert net.skbs.live == 0 and net.skbs.live_truesize == 0
    assert net.frags.ipq_cache.active_objs == 0


def test_fragment_queue_without_memory_drops_the_fragment() -> None:
    net = stack()
    fq = net.frags
    with softirq():
        skbs = [net.skbs.rx(1500) for _ in range(2)]
    pages = []
    while (p := net.zone.alloc_pages(GFP_ATOMIC)) is not None:
        pages.extend(p)
    held = []  # and any free objects of struct ipq's kmalloc cache
    while (o := fq.ipq_cache.alloc(GFP_ATOMIC)) is not None:
        held.append(o)
    with softirq():
        v = fq.queue_fragment(skbs[0], ("10.1.1.1", "127.0.0.1", 1, 17), 0, 1480, True, b"x", 0.0)
    assert v == FRAG_NOMEM and len(fq) == 0 and fq.ip_frag_mem == 0
    assert net.skbs.live == 1  # the fragment was freed
    for o in held:
        fq.ipq_cache.free(o)
    net.zone.free_pages(pages)
    with softirq():
        assert fq.queue_fragment(skbs[1], ("10.1.1.1", "127.0.0.1", 1, 17), 0, 1480, True, b"x", 0.0) is None
    assert len(fq) == 1
    fq.flush()
    assert net.skbs.live == 0 and fq.ip_frag_mem == 0


def test_expired_queue_is_replaced_by_a_fresh_one() -> None:
    net = stack(ipfrag_time=1.0)
    fq = net.frags
    key = ("10.1.1.1", "127.0.0.1", 9, 17)
    with softirq():
        assert fq.queue_fragment(net.skbs.rx(1500), key, 0, 1480, True, b"x" * 2000, 0.0) is None
        assert fq.queue_fragment(net.skbs.rx(540), key, 1480, 520, False, None, 5.0) is None
    assert net.stat.frag_timeout == 1 and len(fq) == 1 and net.stat.frag_reassembled == 0
    assert fq.queued_skbs() == 1 and net.skbs.live == 1
    fq.flush()
    assert net.skbs.live == 0 and fq.ip_frag_mem == 0
