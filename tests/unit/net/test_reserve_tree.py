"""The network's part of the v12 reserve tree (`emu.net.reserve.NetReserve`) under mm's
`ReserveRoot`: the published /proc/reserve_info, the era's route hash sizing, the protocols' TX
terms, the sysctls that resize it, connect/disconnect with memalloc sockets, and the stack that
builds it."""

from __future__ import annotations

import socket

import pytest

from emu.kernel.policy import Policy
from emu.mm.page_alloc import Zone
from emu.mm.reserve import ReserveError, ReserveRoot, kmalloc_estimate, kmem_estimate
from emu.mm.slab import Slabs
from emu.net.ipfrag import IPFRAG_HIGH_THRESH, IPFRAG_LOW_THRESH, IPFRAG_TIME
from emu.net.reserve import NetReserve, tx_reserve_pages
from emu.net.route import route_hash_defaults
from emu.net.sock import Sock
from emu.net.stack import NetStack
from emu.swapdev.nfs import rpc_reserve_pages
from reserve_sample import PUBLISHED


def published_tree(**kw: object) -> tuple[ReserveRoot, NetReserve]:
    root = ReserveRoot(ram_bytes=128 << 20, page_size=4096)
    net = NetReserve(root, **kw)  # type: ignore[arg-type]
    net.add_tx_pages("nfs_swappers", rpc_reserve_pages(4096))
    net.connect()
    return root, net


def test_matches_the_published_reserve_info_to_the_kilobyte() -> None:
    root, net = published_tree()
    assert root.reserve_info() == PUBLISHED
    assert net.connected and net.network.parent is root.root


def test_published_figures_hold_for_the_whole_ram_range_of_1024_buckets() -> None:
    # Any machine of 64 MiB (+1 page) .. 128 MiB gets the same 1024-bucket route hash.
    net = NetReserve(ReserveRoot(ram_bytes=(64 << 20) + 4096))
    assert net.route.buckets == 1024 and net.route_max_size == 16384
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
    root = ReserveRoot(ram_bytes=16 << 20)
    t = NetReserve(root)
    t.add_tx_pages("nfs_swappers", rpc_reserve_pages(4096))
    t.add_tx_pages("iscsi_sessions", tx_reserve_pages(4096))
    assert t.tx_pages.pages == 85 and t.tx.limit == 85 and root.pages == 0  # not connected yet
    assert t.tx_pages.inputs == {"nfs_swappers": 1, "iscsi_sessions": 1}
    t.remove_tx_pages("nfs_swappers", rpc_reserve_pages(4096))
    t.remove_tx_pages("iscsi_sessions", tx_reserve_pages(4096))
    assert t.tx.pages == 0 and t.tx_pages.limit == 0
    with pytest.raises(ValueError):
        t.remove_tx_pages("iscsi_sessions", tx_reserve_pages(4096))
    with pytest.raises(ValueError):
        t.remove_tx_pages("never_added", 1)


def test_field_fix_route_max_size() -> None:
    t = NetReserve(ReserveRoot(ram_bytes=8 << 30))
    assert t.route_cache.pages == kmem_estimate(262144 * 16, 320)  # ~1.3 GiB at the default
    t.set_route_max_size(100000)
    assert t.route_cache.pages == kmem_estimate(100000, 320) == 8334 + 1 + 13
    assert t.route_cache.limit == 100000 and t.rx.limit == 100000 + 262144
    assert t.route_max_size == 100000 and t.route_cache.inputs["route_max_size"] == 100000
    t.set_ipfrag_high_thresh(65536)
    assert t.frag_cache.pages == kmalloc_estimate(65536) and t.skb_data.limit == 65536
    with pytest.raises(ValueError):
        t.set_route_max_size(-1)
    with pytest.raises(ValueError):
        t.set_ipfrag_high_thresh(-1)


def test_charge_is_strict_and_propagates_within_one_unit() -> None:
    _, t = published_tree()
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


def test_connect_disconnect_follow_memalloc_sockets_and_set_pages_emerg() -> None:
    zone = Zone(64 << 20, policy=Policy.V12)
    root = ReserveRoot(zone)
    tree = NetReserve(root)
    tree.add_tx_pages("nfs_swappers", rpc_reserve_pages(4096))
    assert zone.pages_emerg == 0 and root.pages == 0 and not tree.connected
    tree.connect()
    assert tree.connected and zone.pages_emerg == root.pages == tree.network.pages > 0
    tree.connect()  # second memalloc socket: no change
    assert tree.sk_memalloc_socks == 2 and zone.pages_emerg == root.pages
    tree.disconnect()
    assert tree.connected
    tree.disconnect()
    assert not tree.connected and zone.pages_emerg == 0 and root.pages == 0
    assert root.reserve_info() == '1:0 "total reserve" 0K 0/0\n'
    with pytest.raises(ValueError):
        tree.disconnect()
    # Growing a term while connected moves pages_emerg with it.
    tree.connect()
    before = zone.pages_emerg
    tree.add_tx_pages("iscsi_sessions", tx_reserve_pages(4096))
    assert zone.pages_emerg == before + 32


def test_reserve_that_does_not_fit_is_refused() -> None:
    zone = Zone(3 << 20, policy=Policy.V12)  # 768 pages; the reserve would be 874
    root = ReserveRoot(zone)
    tree = NetReserve(root)
    tree.add_tx_pages("nfs_swappers", rpc_reserve_pages(4096))
    assert tree.network.pages == 874
    with pytest.raises(ReserveError, match="does not fit"):
        tree.connect()
    assert zone.pages_emerg == 0 and not tree.connected and tree.sk_memalloc_socks == 0


def test_bad_inputs() -> None:
    root = ReserveRoot(ram_bytes=1 << 20)
    with pytest.raises(ValueError):
        NetReserve(root, route_max_size=-1)
    with pytest.raises(ValueError):
        NetReserve(root, ipfrag_high_thresh=-5)
    with pytest.raises(ValueError):
        NetReserve(root, dst_entry_size=0)
    with pytest.raises(ValueError):
        NetReserve(root).disconnect()  # without connect()


def test_stack_builds_its_reserve_sized_by_its_sysctls_and_hangs_it_with_memalloc_sockets() -> None:
    zone = Zone(8 << 20, policy=Policy.V12)
    root = ReserveRoot(zone)
    with pytest.raises(ValueError, match="reserve root"):
        NetStack(zone, Slabs(zone))  # v12 needs the host's reserve
    net = NetStack(zone, Slabs(zone), reserve=root, ip_rt_max_size=16, ipfrag_high_thresh=20_000)
    assert isinstance(net.reserve, NetReserve) and net.reserve.top is root
    assert net.reserve.route_cache.limit == 16 and net.reserve.frag_cache.limit == 20_000
    assert net.routes.reserve is net.reserve.route_cache and net.frags.reserve is net.reserve.frag_cache
    assert net.skbs.skb_data is net.reserve.skb_data
    assert not net.reserve.connected and zone.pages_emerg == 0
    raws = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2)]
    try:
        socks = []
        for raw in raws:
            raw.bind(("127.0.0.1", 0))
            socks.append(Sock(net, "udp", raw))
        socks[0].sk_set_memalloc()
        assert net.reserve.connected and zone.pages_emerg == root.pages == net.reserve.network.pages > 0
        socks[1].sk_set_memalloc()
        socks[0].sk_clear_memalloc()
        assert net.reserve.connected and net.sk_memalloc_socks == 1
        socks[1].sk_clear_memalloc()
        assert not net.reserve.connected and zone.pages_emerg == 0 and net.sk_memalloc_socks == 0
    finally:
        for raw in raws:
            raw.close()
    # The other policies have no reserve tree at all.
    for policy in (Policy.NONE, Policy.PFMEMALLOC):
        z = Zone(8 << 20, policy=policy)
        other = NetStack(z, Slabs(z), reserve=ReserveRoot(z))
        assert other.reserve is None and other.skbs.skb_data is None
        assert other.routes.reserve is None and other.frags.reserve is None


def test_stack_defaults_follow_the_era_sizing() -> None:
    zone = Zone(128 << 20, policy=Policy.V12)
    net = NetStack(zone, Slabs(zone), reserve=ReserveRoot(zone))
    assert net.routes.max_size == net.reserve.route_max_size == 16384
    assert net.frags.high_thresh == IPFRAG_HIGH_THRESH == net.reserve.ipfrag_high_thresh
    assert net.frags.low_thresh == IPFRAG_LOW_THRESH and net.frags.timeout == IPFRAG_TIME
