"""skbs in emulated memory (`SkbAllocator`) and the policies' RX rules, on a real Zone and Slabs."""

from __future__ import annotations

import socket

import pytest

from emu.kernel.sched import TaskFlags, softirq, task
from emu.mm.gfp import GFP_ATOMIC, GFP_KERNEL
from emu.kernel.policy import Policy
from emu.mm.page_alloc import Zone
from emu.mm.reserve import ReserveRoot
from emu.mm.sizes import IPQ, SKB_HEAD, SKB_SHARED_INFO
from emu.mm.slab import Slabs
from emu.net.netstat import FRAG_NOMEM
from emu.net.skb_queue import SkbQueue
from emu.net.skbuff import SkBuff, SkbAllocator, SkBuffX
from emu.net.sock import Sock
from emu.net.stack import NetStack


def stack(policy: str, ram: int = 4 << 20) -> NetStack:
    zone = Zone(ram, policy=Policy(policy))
    slabs = Slabs(zone)
    return NetStack(zone, slabs, reserve=ReserveRoot(zone) if policy == "v12" else None)


def hog(zone: Zone) -> list:
    pages = []
    while (p := zone.alloc_pages(GFP_ATOMIC)) is not None:
        pages.extend(p)
    return pages


def test_truesize_and_both_allocations_are_charged() -> None:
    net = stack("none")
    free0 = net.zone.nr_free
    with softirq():
        skb = net.skbs.rx(1500)
    assert skb is not None
    assert skb.truesize == 1500 + SKB_HEAD + SKB_SHARED_INFO
    assert skb.memalloc == 0 and not skb.emergency and not skb.pfmemalloc
    assert net.skbs.head_cache.active_objs == 1
    assert net.skbs.data_cache(1500) is net.slabs.kmalloc_cache(1500 + SKB_SHARED_INFO)
    assert net.slabs.kmalloc_cache(1500 + SKB_SHARED_INFO).active_objs == 1  # size-2048
    assert (net.skbs.live, net.skbs.live_truesize, net.skbs.rx_allocated) == (1, skb.truesize, 1)
    assert net.zone.nr_free < free0
    net.skbs.free(skb)
    assert net.skbs.live == 0 and net.skbs.live_truesize == 0
    assert net.skbs.head_cache.active_objs == 0
    assert net.slabs.shrink() == 2  # both slabs were kept for reuse, empty
    assert net.zone.nr_free == free0
    with pytest.raises(RuntimeError):
        net.skbs.free(skb)


def test_jumbo_frames_take_data_from_pages() -> None:
    net = stack("none")
    assert net.skbs.data_cache(9000) is None  # 9000 + 320 is above the largest kmalloc cache
    with softirq():
        skb = net.skbs.rx(9000)
    assert skb is not None and skb.buf.pages is not None and len(skb.buf.pages) == 4
    assert net.slabs.large_pages == 4
    net.skbs.free(skb)
    assert net.slabs.large_pages == 0 and net.skbs.live == 0


def test_skb_flags_and_the_fields_only_the_extended_skb_carries() -> None:
    net = stack("none")
    with softirq():
        skb = net.skbs.rx(100)
    assert type(skb) is SkBuff and skb.charged == 0 and skb.frag_list is None
    with pytest.raises(AttributeError):
        skb.charged = 5  # type: ignore[misc]
    with pytest.raises(AttributeError):
        skb.frag_list = []  # type: ignore[misc]
    assert (SkBuff.EMERGENCY, SkBuff.PFMEMALLOC) == (1, 2)
    skb.memalloc = SkBuff.EMERGENCY
    assert skb.emergency and not skb.pfmemalloc and "emergency" in repr(skb)
    skb.memalloc = SkBuff.PFMEMALLOC
    assert skb.pfmemalloc and not skb.emergency and "pfmemalloc" in repr(skb)
    skb.memalloc = 0
    x = SkBuffX(100, skb.head, skb.buf)
    x.charged = 7
    x.frag_list = []
    assert (x.charged, x.frag_list) == (7, [])
    x.charged = 0
    net.skbs.free(x)  # (it owns the objects of `skb` now)
    assert net.skbs.head_cache.active_objs == 0


@pytest.mark.parametrize("policy", ["none", "v12", "pfmemalloc"])
def test_without_memalloc_sockets_rx_never_reaches_the_reserve(policy: str) -> None:
    net = stack(policy)
    hog(net.zone)
    with softirq():
        assert net.skbs.rx(100) is None
    assert net.zone.vmstat["pgalloc_pfmemalloc"] == 0
    assert net.skbs.rx_allocated == 0 and net.skbs.rx_reserve == 0 and net.skbs.live == 0


def test_none_ignores_memalloc_sockets() -> None:
    net = stack("none")
    net.skbs.memalloc_socks = 1
    hog(net.zone)
    with softirq(), task("ksoftirqd/0", TaskFlags.PF_KTHREAD):
        assert net.skbs.rx(100) is None
    assert net.zone.vmstat["pgalloc_pfmemalloc"] == 0


def test_pfmemalloc_rx_rule_prefers_normal_memory_and_marks_reserve_skbs() -> None:
    net = stack("pfmemalloc")
    net.skbs.memalloc_socks = 1
    with softirq():
        ok = net.skbs.rx(100)
    assert ok is not None and not ok.pfmemalloc  # plenty of memory: __GFP_NOMEMALLOC succeeded
    net.skbs.free(ok)  # (else the next skb comes from the free objects of ok's normal slabs)
    hog(net.zone)
    with softirq():
        skb = net.skbs.rx(100)
    assert skb is not None and skb.pfmemalloc and skb.memalloc == SkBuff.PFMEMALLOC and not skb.emergency
    assert skb.charged == 0  # 3.6 has no reserve tree to charge
    assert net.skbs.rx_reserve == 1 and net.skbs.rx_allocated == 2
    net.skbs.free(skb)
    assert net.skbs.live == 0


def test_v12_emergency_skbs_are_charged_and_uncharged() -> None:
    net = stack("v12")
    net.reserve.connect()
    net.skbs.memalloc_socks = 1
    hog(net.zone)
    with softirq():
        skb = net.skbs.rx(1000)
    assert skb is not None and skb.emergency and skb.memalloc == SkBuff.EMERGENCY
    assert isinstance(skb, SkBuffX) and skb.charged == 2048  # roundup_pow_of_two(1000 + 320)
    assert net.reserve.skb_data.usage == 2048
    assert net.skbs.rx_reserve == 1
    net.skbs.free(skb)
    assert net.reserve.skb_data.usage == 0 and net.skbs.live == 0


def test_v12_emergency_skbs_are_refused_when_the_skb_data_reserve_is_full() -> None:
    net = stack("v12")
    net.reserve.connect()
    net.skbs.memalloc_socks = 1
    node = net.reserve.skb_data
    assert node.charge(node.limit - 2048)  # room for exactly nothing of 2048: strict admission
    hog(net.zone)
    with softirq():
        assert net.skbs.rx(1000) is None
    assert node.usage == node.limit - 2048 and net.skbs.rx_reserve == 0 and net.skbs.live == 0
    node.uncharge(1)
    with softirq():
        skb = net.skbs.rx(1000)
    assert skb is not None and skb.emergency and node.usage == node.limit - 1
    net.skbs.free(skb)
    assert node.usage == node.limit - 2049


def test_route_and_fragment_allocations_reach_the_reserve_only_under_pf_memalloc() -> None:
    net = stack("v12")
    net.reserve.connect()
    with softirq():
        frag_skbs = [net.skbs.rx(1500) for _ in range(2)]  # before memory runs out
    assert all(s is not None for s in frag_skbs)
    hog(net.zone)
    key = ("10.1.1.1", "127.0.0.1", 1, 17)
    with softirq():
        assert net.routes.input("10.0.0.1", "127.0.0.1", 0.0) is None  # an ordinary frame: no reserve
        # an ordinary frame: no reserve for its reassembly queue either (the skb is freed)
        assert net.frags.queue_fragment(frag_skbs[0], key, 0, 1480, True, b"x", 0.0) == FRAG_NOMEM
        assert net.skbs.live == 1 and len(net.frags) == 0
        with task("ksoftirqd/0", TaskFlags.PF_MEMALLOC):
            with softirq():  # processing an emergency skb: PF_MEMALLOC in softirq
                rt = net.routes.input("10.0.0.1", "127.0.0.1", 0.0)
                q = net.frags.queue_fragment(frag_skbs[1], key, 0, 1480, True, b"x", 0.0)
    assert rt is not None and rt.reserve_charged and rt.obj.pfmemalloc
    assert net.reserve.route_cache.usage == 1 and net.routes.reserve_entries() == 1
    assert q is None and len(net.frags) == 1 and net.frags.queues[key].reserve_charged
    assert net.reserve.frag_cache.usage == IPQ and net.reserve.skb_data.usage == IPQ
    net.routes.flush()
    net.frags.flush()
    assert net.reserve.route_cache.usage == 0 and net.reserve.frag_cache.usage == 0
    assert net.reserve.skb_data.usage == 0 and net.skbs.live == 0


async def test_tx_skbs_use_sk_allocation_and_are_freed() -> None:
    net = stack("pfmemalloc")
    raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    raw.bind(("127.0.0.1", 0))
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind(("127.0.0.1", 0))
    try:
        raw.connect(peer.getsockname())
        sk = Sock(net, "udp", raw)
        assert sk.sk_allocation == GFP_KERNEL
        sk.sk_set_memalloc()
        assert "MEMALLOC" in str(sk.sk_allocation) and net.sk_memalloc_socks == 1
        hog(net.zone)
        await sk.sendmsg(b"x" * 3000)  # three fragments' worth of TX skbs, from the reserve
        assert net.stat.tx_skbs == 3 and net.stat.tx_skbs_reserve >= 1
        assert net.skbs.tx_allocated == 3 and net.skbs.tx_reserve == net.stat.tx_skbs_reserve
        assert net.stat.tx_bytes == 3000
        assert net.skbs.live == 0
        assert peer.recv(65536) == b"x" * 3000
        sk.sk_clear_memalloc()
        assert net.sk_memalloc_socks == 0 and sk.sk_allocation == GFP_KERNEL
    finally:
        raw.close()
        peer.close()


def test_policy_is_validated() -> None:
    zone = Zone(4 << 20, policy=Policy.NONE)
    with pytest.raises(ValueError):
        SkbAllocator(Slabs(zone), "bogus")  # type: ignore[arg-type]
    v12 = Zone(4 << 20, policy=Policy.V12)
    with pytest.raises(ValueError):
        NetStack(v12, Slabs(v12))  # the policy is the zone's, and v12 needs the reserve root
    # Under the other policies the allocator has no SKB data reserve, whatever it is given.
    assert SkbAllocator(Slabs(zone), Policy.PFMEMALLOC, object()).skb_data is None  # type: ignore[arg-type]


@pytest.mark.parametrize("policy", ["v12", "pfmemalloc"])
def test_failed_ordinary_attempt_memo_is_exact(policy: str) -> None:
    net = stack(policy)
    if net.reserve is not None:
        net.reserve.connect()
    net.skbs.memalloc_socks = 1
    pages = hog(net.zone)
    vm = net.zone.vmstat
    with softirq():
        f0 = vm["pgalloc_fail"]
        a = net.skbs.rx(500)
        f1 = vm["pgalloc_fail"]
        b = net.skbs.rx(500)  # nothing changed: the ordinary attempt is skipped, not repeated
        f2 = vm["pgalloc_fail"]
    assert a is not None and a.memalloc and b is not None and b.memalloc
    assert 500 in net.skbs.rx_failed
    assert f2 - f1 < f1 - f0  # b failed fewer attempts: only the reserve path's own
    net.zone.free_pages(pages[:200])  # memory came back within the same poll
    with softirq():
        c = net.skbs.rx(500)
    assert c is not None and not c.memalloc  # so the ordinary attempt was made, and succeeded
    # Freeing a reserve skb keeps the memo; freeing an ordinary one forgets it (its objects
    # refill ordinary slabs, so the ordinary attempt may succeed again).
    assert 500 in net.skbs.rx_failed
    net.skbs.free(a)
    assert 500 in net.skbs.rx_failed
    net.skbs.free(c)
    assert not net.skbs.rx_failed
    net.skbs.free(b)
    assert net.skbs.live == 0


@pytest.mark.parametrize("policy", ["none", "v12", "pfmemalloc"])
def test_free_queue_frees_what_single_frees_would(policy: str) -> None:
    """A reader's bulk free (`free_queue`) leaves the same memory as freeing each skb."""
    results = []
    for bulk in (False, True):
        net = stack(policy)
        if net.reserve is not None:
            net.reserve.connect()
        net.skbs.memalloc_socks = 1
        q = SkbQueue()
        pages = hog(net.zone)
        with softirq():  # short of memory: reserve skbs (none: no skb at all)
            late = [net.skbs.rx(size) for size in (100, 1400, 600)]
        if policy == "none":
            assert late == [None, None, None]
        else:
            assert all(s is not None and s.memalloc for s in late)
            for s in late:
                q.append(s)  # type: ignore[arg-type]
        net.zone.free_pages(pages)
        with softirq():  # memory back: ordinary skbs, from other slabs
            for size in (100, 1400, 100, 9000, 600, 1400):
                skb = net.skbs.rx(size)
                assert skb is not None and not skb.memalloc
                q.append(skb)
        truesize = sum(s.truesize for s in q)
        if bulk:
            assert net.skbs.free_queue(q.take_all()) == truesize and not q
        else:
            while q:
                net.skbs.free(q.popleft())
        assert net.skbs.live == 0 and net.skbs.live_truesize == 0
        if net.reserve is not None:
            assert net.reserve.skb_data.usage == 0
        results.append((net.zone.nr_free, {c.name: (c.active_objs, c.nr_slabs) for c in net.slabs.caches.values()},
                        net.slabs.large_pages))
    assert results[0] == results[1]
