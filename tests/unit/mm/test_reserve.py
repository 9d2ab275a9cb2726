"""The v12 reserve tree as mm knows it (`MemReserve` nodes under a `ReserveRoot`): sizing
arithmetic, /proc/reserve_info, admission, waiting, connect/disconnect, pages_emerg, fitting in
RAM, and the alloc wrappers.  The network's own subtree (`emu.net.reserve.NetReserve`) and the
published sample are tested in tests/unit/net/test_reserve_tree.py."""

from __future__ import annotations

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from emu.kernel.sched import TaskFlags, task
from emu.mm.gfp import GFP_ATOMIC, GFP_KERNEL, GFP_NOIO
from emu.kernel.policy import Policy
from emu.mm.page_alloc import Zone
from emu.mm.reserve import (
    MemReserve,
    ReserveError,
    ReserveRoot,
    alloc_pages_reserve,
    alloc_pages_reserve_wait,
    free_pages_reserve,
    kfree_reserve,
    kmalloc_estimate,
    kmalloc_reserve,
    kmem_estimate,
)
from emu.mm.slab import Slabs
from reserve_sample import PUBLISHED


class Tree:
    """A subtree of the published shape built from mm's primitives alone (in the kernel's init
    order, so newest-first listing is the published one): aggregates of mixed units, a pages
    chain (TX), a bytes chain (SKB data -> fragments) and an objects node (route cache)."""

    def __init__(self, page_size: int = 4096, tx_pages: int = 53, route_objs: int = 16384,
                 frag_bytes: int = 262144) -> None:
        self.top = MemReserve("total network reserve")
        self.rx = MemReserve("network RX reserve", self.top)
        self.skb = MemReserve("SKB data reserve", self.rx, unit="bytes")
        self.tx = MemReserve("network TX reserve", self.top, unit="pages")
        self.txp = MemReserve("protocol TX pages", self.tx, unit="pages")
        self.frag = MemReserve("IPv4 fragment cache", self.skb, unit="bytes")
        self.route = MemReserve("IPv4 route cache", self.rx, unit="objects")
        self.frag.set_kmalloc(frag_bytes, page_size)
        self.route.set_kmem_cache(route_objs, 320, page_size)
        self.txp.add_pages(tx_pages)


def published_root(page_size: int = 4096) -> tuple[ReserveRoot, Tree]:
    root = ReserveRoot(ram_bytes=128 << 20, page_size=page_size)
    t = Tree(page_size)
    root.root.connect(t.top)
    return root, t


def test_mm_arithmetic_alone_gives_the_published_reserve_info() -> None:
    root, t = published_root()
    assert root.reserve_info() == PUBLISHED
    assert root.pages == root.root.pages == t.top.pages == 1558  # 6232K
    assert t.route.pages == kmem_estimate(16384, 320) and t.frag.pages == kmalloc_estimate(262144)
    assert [n.name for _, _, n in root.nodes()][:3] == ["total reserve", "total network reserve",
                                                        "network TX reserve"]
    assert root.find("IPv4 route cache") is t.route and root.find("nothing") is None


def test_set_pages_and_set_size_are_absolute_add_pages_is_relative() -> None:
    root, t = published_root()
    t.txp.set_pages(10)
    assert (t.txp.pages, t.txp.limit, t.tx.pages, t.tx.limit) == (10, 10, 10, 10)
    assert root.pages == 1558 - 43
    t.txp.add_pages(5)
    assert t.txp.limit == 15 and root.pages == 1558 - 38
    t.route.set_kmem_cache(100, 320)
    assert t.route.limit == 100 and t.route.pages == kmem_estimate(100, 320)
    assert t.rx.limit == 100 + 262144
    with pytest.raises(ValueError):
        t.txp.add_pages(-16)  # would go negative
    assert t.txp.pages == 15


def test_reserve_sizes_in_kib_are_exact_with_small_pages() -> None:
    root, t = published_root(page_size=512)
    first = root.reserve_info().splitlines()[0]
    assert first == f'1:0 "total reserve" {root.pages * 512 // 1024}K 0/{root.root.limit}'
    node = MemReserve("odd", unit="pages")
    node.set_pages(3)
    root.root.connect(node)
    assert root.reserve_info().splitlines()[1] == '2:1 "odd" 1K 0/3'  # 1.5 KiB -> 1K, as K() rounds


def test_charge_is_strict_and_propagates_within_one_unit() -> None:
    _, t = published_root()
    tx = t.txp  # limit 53 pages
    assert tx.charge(52)
    assert not tx.charge(1)  # 52 + 1 < 53 is false: strict
    assert tx.nr_charge_fail == 1
    assert t.tx.usage == 52  # same unit (pages): the aggregate is charged too
    assert t.top.usage == 0  # mixed units above: not propagated
    tx.uncharge(52)
    assert tx.usage == 0 and t.tx.usage == 0
    # Route cache (objects) does not touch RX (mixed).
    assert t.route.charge(16383) and not t.route.charge(1)
    assert t.rx.usage == 0
    # Fragments (bytes) charge the SKB data aggregate, which has the same unit.
    assert t.frag.kmalloc_charge(1000)  # rounded to 1024
    assert t.frag.usage == 1024 and t.skb.usage == 1024
    assert t.skb.charge(262144 - 2048)  # 1024 + 260096 < 262144
    assert not t.frag.kmalloc_charge(1024)  # the aggregate refuses
    assert t.frag.nr_charge_fail == 1 and t.frag.usage == 1024  # a refused charge changes nothing
    t.frag.kmalloc_uncharge(1000)
    assert t.frag.kmalloc_charge(1024)
    # charge(0) always succeeds; a negative charge is an uncharge
    assert t.frag.charge(0) and t.frag.charge(-1024) and t.frag.usage == 0


async def test_charge_wait_sleeps_until_uncharge(autojump_clock: trio.testing.MockClock) -> None:
    _, t = published_root()
    skb = t.skb
    assert skb.charge(262000)
    done: list[float] = []
    states: list[tuple[str, str]] = []

    async def waiter() -> None:
        with task("nfs_swap_tx") as me:
            await skb.charge_wait(4096)
            done.append(trio.current_time())
            assert me.state == "R"

    async with trio.open_nursery() as n:
        n.start_soon(waiter)
        await trio.sleep(2)
        assert not done
        from emu.kernel.sched import all_tasks

        states = [(x.state, x.wchan) for x in all_tasks() if x.comm == "nfs_swap_tx"]
        assert states == [("D reserve", "mem_reserve:SKB data reserve")]
        skb.uncharge(100)  # not enough: 261900 + 4096 >= 262144
        await trio.sleep(1)
        assert not done
        skb.uncharge(261900)
    assert done == [3.0]
    assert skb.usage == 4096
    with pytest.raises(ReserveError):
        await skb.charge_wait(262144)


def test_connect_disconnect_move_pages_emerg() -> None:
    zone = Zone(64 << 20, policy=Policy.V12)
    root = ReserveRoot(zone)
    t = Tree()
    assert zone.pages_emerg == 0 and root.pages == 0
    root.root.connect(t.top)
    assert zone.pages_emerg == root.pages == t.top.pages == 1558
    with pytest.raises(ValueError, match="already connected"):
        root.root.connect(t.top)
    t.top.disconnect()
    assert zone.pages_emerg == 0 and root.pages == 0 and root.root.limit == 0
    assert root.reserve_info() == '1:0 "total reserve" 0K 0/0\n'
    with pytest.raises(ValueError, match="not connected"):
        t.top.disconnect()
    # Growing a term while connected moves pages_emerg with it; shrinking gives it back.
    root.root.connect(t.top)
    before = zone.pages_emerg
    t.txp.add_pages(32)
    assert zone.pages_emerg == before + 32
    t.txp.add_pages(-32)
    assert zone.pages_emerg == before


def test_emergency_pool_is_only_for_no_watermarks() -> None:
    zone = Zone(64 << 20, policy=Policy.V12)
    root = ReserveRoot(zone)
    root.root.connect(Tree().top)
    emerg = zone.pages_emerg
    assert emerg == 1558
    while zone.alloc_pages(GFP_ATOMIC) is not None:
        pass
    assert zone.watermark_min == 256
    assert zone.nr_free == 96 + emerg  # GFP_ATOMIC's floor (min - min/2 - rest/4) plus the pool
    with task("rpciod", TaskFlags.PF_MEMALLOC):
        got = 0
        while zone.nr_free and zone.alloc_pages(GFP_KERNEL) is not None:
            got += 1
    assert got == 96 + emerg
    assert zone.vmstat["pgalloc_pfmemalloc"] == got


def test_reserve_that_does_not_fit_is_refused() -> None:
    zone = Zone(3 << 20, policy=Policy.V12)  # 768 pages
    root = ReserveRoot(zone)
    big = MemReserve("big", unit="pages")
    big.set_pages(874)
    with pytest.raises(ReserveError, match="does not fit"):
        root.root.connect(big)
    assert zone.pages_emerg == 0 and big.parent is None and root.root.children == []
    # Fits in RAM, but not with the high watermark on top: refused too.
    near = MemReserve("near", unit="pages")
    near.set_pages(zone.nr_pages - zone.watermark_high)
    with pytest.raises(ReserveError, match="high watermark"):
        root.root.connect(near)
    # Growing a connected node past what fits is refused and changes nothing.
    ok = MemReserve("ok", unit="pages")
    ok.set_pages(10)
    root.root.connect(ok)
    with pytest.raises(ReserveError):
        ok.set_pages(874)
    assert ok.pages == 10 and root.pages == 10 and zone.pages_emerg == 10
    # Without a zone, the RAM size alone bounds it.
    lone = ReserveRoot(ram_bytes=1 << 20)
    n = MemReserve("n", unit="pages")
    n.set_pages(256)
    with pytest.raises(ReserveError):
        lone.root.connect(n)


def test_bad_inputs() -> None:
    with pytest.raises(ValueError):
        ReserveRoot(ram_bytes=0)
    with pytest.raises(ValueError):
        ReserveRoot(ram_bytes=1 << 20, page_size=0)
    with pytest.raises(ValueError):
        ReserveRoot()
    node = MemReserve("x")
    with pytest.raises(ValueError):
        node.set_pages(-1)
    parent = MemReserve("p")
    parent.connect(node)
    with pytest.raises(ValueError, match="already connected"):
        MemReserve("q").connect(node)


async def test_alloc_from_reserve_charges_and_waits(autojump_clock: trio.testing.MockClock) -> None:
    zone = Zone(64 << 20, policy=Policy.V12)
    root = ReserveRoot(zone)
    t = Tree()
    root.root.connect(t.top)
    node = t.txp  # limit 53 pages
    # Plenty of memory: a normal allocation, nothing charged.
    pages, emerg = alloc_pages_reserve(zone, GFP_ATOMIC, 0, node)
    assert pages is not None and not emerg and node.usage == 0
    zone.free_pages(pages)
    # Memory below the watermarks: only entitled contexts, and only within the node's limit.
    held = []
    with task("hog", TaskFlags.PF_MEMALLOC):
        while zone.nr_free > zone.pages_emerg:
            held.extend(zone.alloc_pages(GFP_KERNEL) or [])
    assert alloc_pages_reserve(zone, GFP_ATOMIC, 0, node) == (None, False)  # not entitled
    got = []
    before = zone.nr_pfmemalloc
    with task("rpciod", TaskFlags.PF_MEMALLOC):
        while True:
            pages, emerg = alloc_pages_reserve(zone, GFP_ATOMIC, 0, node)
            if pages is None:
                break
            assert emerg and pages[0].pfmemalloc
            got.append(pages)
    assert len(got) == 52 and node.usage == 52  # strict: 52 + 1 < 53 fails
    assert zone.nr_pfmemalloc - before == 52
    done: list[float] = []

    async def waiter() -> None:
        with task("rpciod2", TaskFlags.PF_MEMALLOC):
            pages, emerg = await alloc_pages_reserve_wait(zone, GFP_NOIO, 0, node)
            done.append(trio.current_time())
            assert emerg

    async with trio.open_nursery() as n:
        n.start_soon(waiter)
        await trio.sleep(1)
        assert not done
        free_pages_reserve(zone, got.pop(), node, True)  # freed, then uncharged: wakes the waiter
    assert done == [1.0] and node.usage == 52
    # kmalloc flavour, charged in (power-of-two) bytes to a bytes node
    slabs = Slabs(zone)
    with task("softirq-memalloc", TaskFlags.PF_MEMALLOC):
        obj, emerg = kmalloc_reserve(slabs, 1500, GFP_ATOMIC, t.skb)
    assert obj is not None and emerg and obj.pfmemalloc and t.skb.usage == 2048
    kfree_reserve(slabs, obj, t.skb, emerg)
    assert t.skb.usage == 0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["frag", "skb", "tx", "txp", "route"]), st.integers(-70000, 70000)),
                max_size=60))
def test_admission_invariants(ops: list[tuple[str, int]]) -> None:
    _, t = published_root()
    nodes = {"frag": t.frag, "skb": t.skb, "tx": t.tx, "txp": t.txp, "route": t.route}
    own = {name: 0 for name in nodes}  # what each node itself holds (charged minus uncharged)
    for name, amount in ops:
        node = nodes[name]
        if amount >= 0:
            before = {n: n.usage for n in nodes.values()}
            ok = node.charge(amount)
            # admitted iff strictly below the limit on the node and every same-unit ancestor
            chain = [node] + ([t.skb] if name == "frag" else []) + ([t.tx] if name == "txp" else [])
            assert ok == all(before[n] + amount < n.limit for n in chain)
            if ok:
                own[name] += amount
            else:
                assert {n: n.usage for n in nodes.values()} == before  # a refusal changes nothing
        else:
            give = min(-amount, own[name])
            node.uncharge(give)
            own[name] -= give
        # usage never reaches the limit; aggregates carry their same-unit children
        for n in nodes.values():
            assert 0 <= n.usage and (n.usage < n.limit or n.usage == 0)
        assert t.skb.usage == own["skb"] + own["frag"]
        assert t.tx.usage == own["tx"] + own["txp"]
        assert t.route.usage == own["route"] and t.rx.usage == 0 and t.top.usage == 0
