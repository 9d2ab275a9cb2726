"""skbs in emulated memory and the policies' RX rules (DESIGN §2), on a real Zone and Slabs."""

from __future__ import annotations

import pytest

from emu.mm.gfp import GFP_ATOMIC, GFP_KERNEL, Policy
from emu.mm.page_alloc import Zone
from emu.mm.reserve import ReserveTree
from emu.kernel.sched import TaskFlags, softirq, task
from emu.mm.sizes import SKB_HEAD, SKB_SHARED_INFO
from emu.mm.slab import Slabs
from emu.net.netmem import NetMem
from emu.net.netstat import NetStat
from emu.net.skbuff import alloc_skb, kfree_skb
from emu.net.stack import NetStack


def stack(policy: str, ram: int = 4 << 20) -> NetStack:
    zone = Zone(ram, policy=Policy(policy))
    slabs = Slabs(zone)
    return NetStack.from_parts(zone, slabs, ReserveTree(zone) if policy == "v12" else None)


def hog(zone: Zone) -> list:
    pages = []
    while (p := zone.alloc_pages(GFP_ATOMIC)) is not None:
        pages.extend(p)
    return pages


def test_truesize_and_both_allocations_are_charged() -> None:
    net = stack("none")
    free0 = net.zone.nr_free
    with softirq():
        skb = alloc_skb(net, 1500, GFP_ATOMIC)
    assert skb is not None
    assert skb.truesize == 1500 + SKB_HEAD + SKB_SHARED_INFO
    assert net.mem.head_cache.active_objs == 1
    assert net.slabs.kmalloc_cache(1500 + SKB_SHARED_INFO).active_objs == 1  # size-2048
    assert net.zone.nr_free < free0
    kfree_skb(skb)
    assert net.mem.skbs_live == 0
    assert net.slabs.shrink() == 2  # both slabs were kept for reuse, empty
    assert net.zone.nr_free == free0
    with pytest.raises(RuntimeError):
        kfree_skb(skb)


def test_jumbo_frames_take_data_from_pages() -> None:
    net = stack("none")
    with softirq():
        skb = alloc_skb(net, 9000, GFP_ATOMIC)
    assert skb is not None and skb.buf.pages is not None and len(skb.buf.pages) == 4
    skb.free()
    assert net.slabs.large_pages == 0


@pytest.mark.parametrize("policy", ["none", "v12", "pfmemalloc"])
def test_without_memalloc_sockets_rx_never_reaches_the_reserve(policy: str) -> None:
    net = stack(policy)
    hog(net.zone)
    with softirq():
        assert net.mem.rx_skb(100) is None
    assert net.zone.vmstat["pgalloc_pfmemalloc"] == 0


def test_none_ignores_memalloc_sockets() -> None:
    net = stack("none")
    net.mem.memalloc_socks = 1
    hog(net.zone)
    with softirq(), task("ksoftirqd/0", TaskFlags.PF_KTHREAD):
        assert net.mem.rx_skb(100) is None
    assert net.zone.vmstat["pgalloc_pfmemalloc"] == 0


def test_pfmemalloc_rx_rule_prefers_normal_memory_and_marks_reserve_skbs() -> None:
    net = stack("pfmemalloc")
    net.mem.memalloc_socks = 1
    with softirq():
        ok = net.mem.rx_skb(100)
    assert ok is not None and not ok.pfmemalloc  # plenty of memory: __GFP_NOMEMALLOC succeeded
    ok.free()  # (else the next skb comes from the free objects of ok's normal slabs)
    hog(net.zone)
    with softirq():
        skb = net.mem.rx_skb(100)
    assert skb is not None and skb.pfmemalloc and skb.memalloc and not skb.emergency
    assert net.stat.skbs_emergency == 1


def test_v12_emergency_skbs_are_charged_and_uncharged() -> None:
    net = stack("v12")
    net.reserve.connect_network()
    net.mem.memalloc_socks = 1
    hog(net.zone)
    with softirq():
        skb = net.mem.rx_skb(1000)
    assert skb is not None and skb.emergency and skb.memalloc
    assert net.reserve.skb_data.usage == 2048  # roundup_pow_of_two(1000 + 320)
    skb.free()
    assert net.reserve.skb_data.usage == 0


def test_route_and_fragment_allocations_reach_the_reserve_only_under_pf_memalloc() -> None:
    net = stack("v12")
    net.reserve.connect_network()
    hog(net.zone)
    with softirq():
        assert net.mem.dst_alloc() is None  # an ordinary frame: no reserve
        with task("ksoftirqd/0", TaskFlags.PF_MEMALLOC):
            with softirq():
                got = net.mem.dst_alloc()  # processing an emergency skb: PF_MEMALLOC in softirq
                q = net.mem.ipq_alloc()
    assert got is not None and got[1] is True and net.reserve.route_cache.usage == 1
    assert q is not None and q[1] is True and net.reserve.frag_cache.usage == 200
    net.mem.dst_free(*got)
    net.mem.ipq_free(*q)
    assert net.reserve.route_cache.usage == 0 and net.reserve.frag_cache.usage == 0


async def test_tx_skbs_use_sk_allocation_and_are_freed() -> None:
    net = stack("pfmemalloc")
    import socket

    raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    raw.bind(("127.0.0.1", 0))
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind(("127.0.0.1", 0))
    try:
        raw.connect(peer.getsockname())
        from emu.net.sock import Sock

        sk = Sock(net, "udp", raw)
        assert sk.sk_allocation == GFP_KERNEL
        sk.sk_set_memalloc()
        assert "MEMALLOC" in str(sk.sk_allocation) and net.sk_memalloc_socks == 1
        hog(net.zone)
        await sk.sendmsg(b"x" * 3000)  # three fragments' worth of TX skbs, from the reserve
        assert net.stat.tx_skbs == 3 and net.stat.tx_skbs_reserve >= 1
        assert net.mem.skbs_live == 0
        assert peer.recv(65536) == b"x" * 3000
        sk.sk_clear_memalloc()
        assert net.sk_memalloc_socks == 0
    finally:
        raw.close()
        peer.close()


def test_netmem_policy_is_validated() -> None:
    zone = Zone(4 << 20, policy=Policy.NONE)
    with pytest.raises(ValueError):
        NetMem(Slabs(zone), "bogus", NetStat())  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        NetStack.from_parts(zone, Slabs(zone), policy="v12")


@pytest.mark.parametrize("policy", ["v12", "pfmemalloc"])
def test_failed_ordinary_attempt_memo_is_exact(policy: str) -> None:
    net = stack(policy)
    if net.reserve is not None:
        net.reserve.connect_network()
    net.mem.memalloc_socks = 1
    pages = hog(net.zone)
    vm = net.zone.vmstat
    with softirq():
        f0 = vm["pgalloc_fail"]
        a = net.mem.rx_skb(500)
        f1 = vm["pgalloc_fail"]
        b = net.mem.rx_skb(500)  # nothing changed: the ordinary attempt is skipped, not repeated
        f2 = vm["pgalloc_fail"]
    assert a is not None and a.memalloc and b is not None and b.memalloc
    assert 500 in net.mem.rx_failed
    assert f2 - f1 < f1 - f0  # b failed fewer attempts: only the reserve path's own
    net.zone.free_pages(pages[:200])  # memory came back within the same poll
    with softirq():
        c = net.mem.rx_skb(500)
    assert c is not None and not c.memalloc  # so the ordinary attempt was made, and succeeded
    for s in (a, b, c):
        s.free()
    assert net.mem.skbs_live == 0
