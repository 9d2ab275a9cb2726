"""The v12 reserve tree: the published figures, admission, waiting, connect/disconnect."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from emu.mm.gfp import GFP_ATOMIC, GFP_KERNEL, GFP_NOIO, Policy
from emu.mm.page_alloc import Zone
from emu.mm.reserve import (
    MemReserve,
    ReserveError,
    ReserveTree,
    kmem_estimate,
    route_hash_defaults,
    rpc_reserve_pages,
    tx_reserve_pages,
)
from emu.kernel.sched import TaskFlags, task

# Published by Peter Zijlstra in the comment of mm/reserve.c ("Simple output of the reserve tree
# in: /proc/reserve_info"), swap-over-NFS series, 2008.  Reproduced with: 4 KiB pages, a machine
# of 128 MiB (route hash 1024 buckets -> ip_rt_max_size 16384), 320-byte dst entries,
# ipfrag_high_thresh 262144, one NFS swapper with RPC_MAX_SLOT_TABLE 128 rpc_rqst in size-512.
PUBLISHED = """\
1:0 "total reserve" 6232K 0/278581
2:1 "total network reserve" 6232K 0/278581
3:2 "network TX reserve" 212K 0/53
4:3 "protocol TX pages" 212K 0/53
5:2 "network RX reserve" 6020K 0/278528
6:5 "IPv4 route cache" 5508K 0/16384
7:5 "SKB data reserve" 512K 0/262144
8:7 "IPv4 fragment cache" 512K 0/262144
"""


def published_tree(**kw: object) -> ReserveTree:
    t = ReserveTree(ram_bytes=128 << 20, page_size=4096, **kw)  # type: ignore[arg-type]
    t.add_nfs_swapper()
    t.connect_network()
    return t


def test_matches_the_published_reserve_info_to_the_kilobyte() -> None:
    assert published_tree().reserve_info() == PUBLISHED


def test_published_figures_hold_for_the_whole_ram_range_of_1024_buckets() -> None:
    # Any machine of 64 MiB (+1 page) .. 128 MiB gets the same 1024-bucket route hash.
    assert ReserveTree(ram_bytes=(64 << 20) + 4096).route.buckets == 1024
    assert route_hash_defaults(64 << 20).buckets == 512
    assert route_hash_defaults(129 << 20).buckets == 2048


@pytest.mark.parametrize(
    "ram,buckets,scale",
    [
        (8 << 20, 512, 17),  # PAGE_SIZE/8 minimum
        (16 << 20, 512, 17),
        (128 << 20, 1024, 17),
        (256 << 20, 2048, 17),
        (512 << 20, 16384, 15),  # 128Ki pages: scale 15
        (8 << 30, 262144, 15),
    ],
)
def test_route_hash_defaults(ram: int, buckets: int, scale: int) -> None:
    rh = route_hash_defaults(ram, 4096)
    assert (rh.buckets, rh.scale) == (buckets, scale)
    assert rh.gc_thresh == buckets and rh.max_size == buckets * 16


def test_protocol_terms() -> None:
    assert tx_reserve_pages(4096) == 32 and tx_reserve_pages(65536) == 2
    assert rpc_reserve_pages(4096) == 21 + 32
    t = ReserveTree(ram_bytes=16 << 20)
    assert t.add_nfs_swapper() == 53 and t.add_iscsi_session() == 32
    assert t.tx_pages.pages == 85 and t.tx.limit == 85 and t.root.pages == 0  # not connected yet
    t.remove_nfs_swapper()
    t.remove_iscsi_session()
    assert t.tx.pages == 0
    with pytest.raises(ValueError):
        t.remove_iscsi_session()


def test_field_fix_route_max_size() -> None:
    t = ReserveTree(ram_bytes=8 << 30)
    assert t.route_cache.pages == kmem_estimate(262144 * 16, 320)  # ~1.3 GiB at the default
    t.set_route_max_size(100000)
    assert t.route_cache.pages == kmem_estimate(100000, 320) == 8334 + 1 + 13
    assert t.route_cache.limit == 100000 and t.rx.limit == 100000 + 262144


def test_charge_is_strict_and_propagates_within_one_unit() -> None:
    t = published_tree()
    tx = t.tx_pages  # limit 53 pages
    assert tx.charge(52)
    assert not tx.charge(1)  # 52 + 1 < 53 is false: strict
    assert tx.nr_charge_fail == 1
    assert t.tx.usage == 52  # same unit (pages): the aggregate is charged too
    assert t.network.usage == 0  # mixed units above: not propagated
    tx.uncharge(52)
    assert tx.usage == 0 and t.tx.usage == 0
    # Route cache (objects) does not touch RX (mixed).
    assert t.route_cache.charge(16383) and not t.route_cache.charge(1)
    assert t.rx.usage == 0
    # Fragments (bytes) charge the SKB data aggregate, which has the same unit.
    assert t.frag_cache.kmalloc_charge(1000)  # rounded to 1024
    assert t.frag_cache.usage == 1024 and t.skb_data.usage == 1024
    assert t.skb_data.charge(262144 - 2048)  # 1024 + 260096 < 262144
    assert not t.frag_cache.kmalloc_charge(1024)  # the aggregate refuses
    t.frag_cache.kmalloc_uncharge(1000)
    assert t.frag_cache.kmalloc_charge(1024)


async def test_charge_wait_sleeps_until_uncharge(autojump_clock: trio.testing.MockClock) -> None:
    t = published_tree()
    skb = t.skb_data
    assert skb.charge(262000)
    done: list[float] = []

    async def waiter() -> None:
        with task("nfs_swap_tx") as me:
            await skb.charge_wait(4096)
            done.append(trio.current_time())
            assert me.state == "R"

    async with trio.open_nursery() as n:
        n.start_soon(waiter)
        await trio.sleep(2)
        assert not done
        skb.uncharge(100)  # not enough: 261900 + 4096 >= 262144
        await trio.sleep(1)
        assert not done
        skb.uncharge(261900)
    assert done == [3.0]
    assert skb.usage == 4096
    with pytest.raises(ReserveError):
        await skb.charge_wait(262144)


def test_connect_disconnect_follow_memalloc_sockets_and_set_pages_emerg() -> None:
    zone = Zone(64 << 20, policy=Policy.V12)
    tree = ReserveTree(zone)
    tree.add_nfs_swapper()
    assert zone.pages_emerg == 0 and tree.root.pages == 0 and not tree.connected
    tree.connect_network()
    assert tree.connected and zone.pages_emerg == tree.root.pages == tree.network.pages > 0
    tree.connect_network()  # second memalloc socket: no change
    assert tree.sk_memalloc_socks == 2 and zone.pages_emerg == tree.root.pages
    tree.disconnect_network()
    assert tree.connected
    tree.disconnect_network()
    assert not tree.connected and zone.pages_emerg == 0 and tree.root.pages == 0
    assert tree.reserve_info() == '1:0 "total reserve" 0K 0/0\n'
    with pytest.raises(ValueError):
        tree.disconnect_network()
    # Growing a term while connected moves pages_emerg with it.
    tree.connect_network()
    before = zone.pages_emerg
    tree.add_iscsi_session()
    assert zone.pages_emerg == before + 32


def test_emergency_pool_is_only_for_no_watermarks() -> None:
    zone = Zone(64 << 20, policy=Policy.V12)
    tree = ReserveTree(zone)
    tree.add_nfs_swapper()
    tree.connect_network()
    emerg = zone.pages_emerg
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
    zone = Zone(3 << 20, policy=Policy.V12)  # 768 pages; the reserve would be 874
    tree = ReserveTree(zone)
    tree.add_nfs_swapper()
    with pytest.raises(ReserveError, match="does not fit"):
        tree.connect_network()
    assert zone.pages_emerg == 0 and not tree.connected


def test_bad_inputs() -> None:
    with pytest.raises(ValueError):
        ReserveTree(ram_bytes=0)
    with pytest.raises(ValueError):
        ReserveTree(ram_bytes=1 << 20, route_max_size=-1)
    with pytest.raises(ValueError):
        ReserveTree(ram_bytes=1 << 20, ipfrag_high_thresh=-5)
    with pytest.raises(ValueError):
        ReserveTree()
    node = MemReserve("x")
    with pytest.raises(ValueError):
        node.set_pages(-1)
    parent = MemReserve("p")
    parent.connect(node)
    with pytest.raises(ValueError, match="already connected"):
        MemReserve("q").connect(node)


async def test_alloc_from_reserve_charges_and_waits(autojump_clock: trio.testing.MockClock) -> None:
    from emu.mm.reserve import alloc_pages_reserve, alloc_pages_reserve_wait, free_pages_reserve, kfree_reserve, kmalloc_reserve
    from emu.mm.slab import Slabs

    zone = Zone(64 << 20, policy=Policy.V12)
    tree = ReserveTree(zone)
    tree.add_nfs_swapper()
    tree.connect_network()
    node = tree.tx_pages  # limit 53 pages
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
    # kmalloc flavour, charged in (power-of-two) bytes to the SKB data reserve
    slabs = Slabs(zone)
    with task("softirq-memalloc", TaskFlags.PF_MEMALLOC):
        obj, emerg = kmalloc_reserve(slabs, 1500, GFP_ATOMIC, tree.skb_data)
    assert obj is not None and emerg and obj.pfmemalloc and tree.skb_data.usage == 2048
    kfree_reserve(slabs, obj, tree.skb_data, emerg)
    assert tree.skb_data.usage == 0


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["frag", "skb", "tx", "txp", "route"]), st.integers(-70000, 70000)),
                max_size=60))
def test_admission_invariants(ops: list[tuple[str, int]]) -> None:
    t = published_tree()
    nodes = {"frag": t.frag_cache, "skb": t.skb_data, "tx": t.tx, "txp": t.tx_pages, "route": t.route_cache}
    own = {name: 0 for name in nodes}  # what each node itself holds (charged minus uncharged)
    for name, amount in ops:
        node = nodes[name]
        if amount >= 0:
            before = {k: n.usage for k, n in nodes.items()}
            ok = node.charge(amount)
            # admitted iff strictly below the limit on the node and every same-unit ancestor
            chain = [node] + ([t.skb_data] if name == "frag" else []) + ([t.tx] if name == "txp" else [])
            assert ok == all(before_n + amount < n.limit for n, before_n in
                             ((n, before[[k for k, v in nodes.items() if v is n][0]]) for n in chain))
            if ok:
                own[name] += amount
        else:
            give = min(-amount, own[name])
            node.uncharge(give)
            own[name] -= give
        # usage never reaches the limit; aggregates carry their same-unit children
        for n in nodes.values():
            assert 0 <= n.usage and (n.usage < n.limit or n.usage == 0)
        assert t.skb_data.usage == own["skb"] + own["frag"]
        assert t.tx.usage == own["tx"] + own["txp"]
        assert t.route_cache.usage == own["route"] and t.rx.usage == 0 and t.network.usage == 0
