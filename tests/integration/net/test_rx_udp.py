"""The receive stage over real loopback UDP sockets: queues, memory, policies, fragments, routes."""

from __future__ import annotations

import pytest
import trio

from emu.mm.sizes import SKB_HEAD, SKB_SHARED_INFO
from emu.net.sock import app_reader
from nethelp import hog, send_udp, wait_for


async def test_flood_fills_queue_to_rcvbuf_and_memory_equals_skbs_queued(make_net) -> None:
    net = await make_net("none", ram=16 << 20)
    a = await net.open_app_udp(0, rcvbuf=64 * 1024)
    b = await net.open_app_udp(0, rcvbuf=32 * 1024)
    n = 400
    send_udp(a.lport, [bytes([i % 251]) * 700 for i in range(n)])
    send_udp(b.lport, [b"b" * 300 for _ in range(n)])
    await wait_for(lambda: net.stat.frames == 2 * n)
    truesize_a = 700 + 28 + SKB_HEAD + SKB_SHARED_INFO
    for sk, ts in ((a, truesize_a), (b, 300 + 28 + SKB_HEAD + SKB_SHARED_INFO)):
        # Filled to its receive buffer and no further (2.6.22: drop when rmem + truesize >= rcvbuf).
        assert sk.sk_rmem_alloc < sk.sk_rcvbuf <= sk.sk_rmem_alloc + ts
        assert sk.sk_rmem_alloc == len(sk.receive_queue) * ts
    assert net.stat.delivered + net.stat.rcvbuf_full == 2 * n
    assert net.stat.rcvbuf_full == a.sk_drops + b.sk_drops > 0
    # The memory charged is exactly the skbs queued: both allocations of each, nothing else.
    queued = len(a.receive_queue) + len(b.receive_queue)
    assert net.skbs.live == queued
    assert net.skbs.live_truesize == a.sk_rmem_alloc + b.sk_rmem_alloc
    assert net.skbs.head_cache.active_objs == queued
    data_objs = net.slabs.kmalloc_cache(700 + 28 + SKB_SHARED_INFO).active_objs
    data_objs += net.slabs.kmalloc_cache(300 + 28 + SKB_SHARED_INFO).active_objs
    assert data_objs == queued
    # The bytes are the real ones, in arrival order; reading frees everything.
    first, _ = await a.recvfrom()
    assert first == bytes([0]) * 700
    a.read_all()
    b.read_all()
    assert net.skbs.live == 0 and net.skbs.head_cache.active_objs == 0
    assert "127.0.0.1:%d" % a.lport in net.ss()
    assert net.wire_overruns() == {a.local_str(): 0, b.local_str(): 0}  # the real kernel lost nothing


async def test_reader_drains_while_owner_resident(make_net) -> None:
    net = await make_net("none", ram=16 << 20)
    resident = trio.Event()

    async def residency() -> None:
        await resident.wait()  # the owner is swapped out until this is set

    sk = await net.open_app_udp(0, owner="app", rcvbuf=32 * 1024)
    async with trio.open_nursery() as n:
        n.start_soon(app_reader, sk, residency)
        send_udp(sk.lport, [b"x" * 1000] * 200)
        await wait_for(lambda: net.stat.frames == 200)
        assert net.stat.rcvbuf_full > 0 and sk.bytes_read == 0  # not resident: the queue filled
        resident.set()
        await wait_for(lambda: not sk.receive_queue)
        assert sk.bytes_read == net.stat.delivered * 1000
        n.cancel_scope.cancel()
    assert "app" in net.ss()


@pytest.mark.parametrize("policy", ["v12", "pfmemalloc"])
async def test_reserve_skbs_dropped_for_ordinary_sockets_accepted_for_memalloc(make_net, policy: str) -> None:
    net = await make_net(policy, ram=8 << 20)
    vm = await net.open_app_udp(0)
    vm.sk_set_memalloc()
    other = await net.open_app_udp(0)
    pages = hog(net.zone)
    send_udp(other.lport, [b"o" * 500] * 20)
    send_udp(vm.lport, [b"v" * 500] * 20)
    await wait_for(lambda: net.stat.frames == 40)
    st = net.stat
    assert net.skbs.rx_reserve == 40  # memory is short: every skb came from the reserve
    assert st.pfmemalloc_drop == 20 and len(other.receive_queue) == 0
    assert other.rx_drops == {"pfmemalloc_drop": 20} and other.sk_drops == 20
    assert net.ss_rows()[1]["rx_drops"] == {"pfmemalloc_drop": 20}
    assert len(vm.receive_queue) == 20 and st.delivered_emergency == 20
    assert all(s.memalloc for s in vm.receive_queue)
    if policy == "v12":
        assert all(s.emergency for s in vm.receive_queue)
        charged = net.reserve.skb_data.usage
        assert charged == 20 * 1024  # roundup_pow_of_two(528 + 320) per skb
    else:
        assert all(s.pfmemalloc for s in vm.receive_queue)
    vm.read_all()
    if policy == "v12":
        assert net.reserve.skb_data.usage == 0
    net.zone.free_pages(pages)
    # With memory back, skbs are ordinary again and the ordinary socket receives.
    send_udp(other.lport, [b"o" * 500] * 5)
    await wait_for(lambda: len(other.receive_queue) == 5)
    assert net.skbs.rx_reserve == 40


async def test_memalloc_socket_bypasses_full_rcvbuf_with_reserve_skbs(make_net) -> None:
    net = await make_net("pfmemalloc", ram=8 << 20)
    vm = await net.open_app_udp(0, rcvbuf=0)  # clamped to the minimum: two skbs
    vm.sk_set_memalloc()
    send_udp(vm.lport, [b"a" * 1400] * 3)  # truesize 1980 each; the minimum rcvbuf holds two
    await wait_for(lambda: net.stat.frames == 3)
    assert net.stat.rcvbuf_full == 1 and len(vm.receive_queue) == 2  # ordinary skbs obey it
    pages = hog(net.zone)
    send_udp(vm.lport, [b"b" * 1400] * 3)
    await wait_for(lambda: net.stat.frames == 6)
    assert net.stat.rcvbuf_bypass == 3 and len(vm.receive_queue) == 5
    assert net.skbs.rx_reserve == 3 and vm.sk_rmem_alloc > vm.sk_rcvbuf
    vm.read_all()
    net.zone.free_pages(pages)


async def test_policy_none_never_reaches_the_reserve(make_net) -> None:
    net = await make_net("none", ram=8 << 20)
    vm = await net.open_app_udp(0)
    vm.sk_set_memalloc()  # a vanilla kernel has nothing to give it
    pages = hog(net.zone)
    free_before = net.zone.nr_free
    send_udp(vm.lport, [b"v" * 500] * 50)
    await wait_for(lambda: net.stat.frames == 50)
    st = net.stat
    # Step 1 for all 50: the first frame of each poll finds no memory (rx_nomem), the rest of that
    # poll is missed (rx_missed), as a NIC whose RX ring could not be refilled.
    assert st.rx_nomem + st.rx_missed == 50 and st.rx_nomem >= 1 and net.skbs.rx_reserve == 0
    assert st.delivered == 0 and net.skbs.rx_allocated == 0
    # attributed to the socket, though pre-demux; not counted in its sk_drops
    assert vm.rx_drops == {k: v for k, v in (("rx_nomem", st.rx_nomem), ("rx_missed", st.rx_missed)) if v}
    assert vm.sk_drops == 0
    assert net.zone.vmstat["pgalloc_pfmemalloc"] == 0
    assert net.zone.nr_free == free_before > 0  # the reserve is untouched
    net.zone.free_pages(pages)


async def test_v12_rx_reserve_admission_is_bounded(make_net) -> None:
    net = await make_net("v12", ram=8 << 20)
    vm = await net.open_app_udp(0, rcvbuf=1 << 30)
    vm.sk_set_memalloc()
    limit = net.reserve.skb_data.limit
    pages = hog(net.zone)
    n = limit // 2048 + 20  # 1400-byte datagrams charge 2048 bytes each
    send_udp(vm.lport, [b"z" * 1400] * n)
    await wait_for(lambda: net.stat.frames == n)
    assert net.reserve.skb_data.usage < limit
    assert net.skbs.rx_reserve == limit // 2048 - (1 if limit % 2048 == 0 else 0)
    assert net.stat.delivered == net.stat.delivered_emergency == net.skbs.rx_reserve
    assert net.stat.rx_nomem + net.stat.rx_missed == n - net.skbs.rx_reserve and net.stat.rx_nomem >= 1
    vm.read_all()
    assert net.reserve.skb_data.usage == 0
    net.zone.free_pages(pages)


async def test_no_socket_drops_at_demux(make_net) -> None:
    net = await make_net("none")
    port = net.open_closed_port()
    send_udp(port, [b"q" * 100] * 10)
    await wait_for(lambda: net.stat.frames == 10)
    assert net.stat.no_socket == 10 and net.skbs.rx_allocated == 10 and net.skbs.live == 0


async def test_fragmented_datagrams_are_reassembled(make_net) -> None:
    net = await make_net("none", ram=16 << 20)
    sk = await net.open_app_udp(0, rcvbuf=1 << 20)
    sizes = [1472, 1473, 2952, 2953, 8000, 30000]
    payloads = [bytes([i]) * n for i, n in enumerate(sizes)]
    send_udp(sk.lport, payloads)
    frames = sum(-(-(n + 8) // 1480) if n + 28 > 1500 else 1 for n in sizes)
    await wait_for(lambda: net.stat.frames == frames)
    assert net.stat.frag_reassembled == 5  # all but the one that fits
    got = [(await sk.recvfrom())[0] for _ in sizes]
    assert got == payloads
    assert len(net.frags) == 0 and net.frags.ip_frag_mem == 0 and net.skbs.live == 0


async def test_fragment_queues_evicted_at_thresholds_and_expire(make_net) -> None:
    net = await make_net("none", ram=16 << 20, ipfrag_high_thresh=60_000, ipfrag_low_thresh=40_000,
                         ipfrag_time=0.3)
    sk = await net.open_app_udp(0, rcvbuf=1 << 20)
    # Datagrams whose later fragments were lost: queue first fragments through the stage's
    # fragment path (in softirq context, as the wire does).
    frags = net.frags
    per_queue = 1500 + SKB_HEAD + SKB_SHARED_INFO + 200  # the fragment's truesize + struct ipq
    from emu.kernel.sched import softirq
    with softirq():
        for i in range(40):
            skb = net.skbs.rx(1500)
            assert skb is not None
            frags.queue_fragment(skb, ("127.0.0.9", "127.0.0.1", i, 17), 0, 1480, True, b"", trio.current_time())
            assert frags.ip_frag_mem == len(frags) * per_queue
            assert frags.ip_frag_mem <= 60_000 + per_queue  # evicted down to low once above high
    assert net.stat.frag_evicted == 40 - len(frags) > 0
    live = len(frags)
    assert net.skbs.live == live == frags.queued_skbs()
    await wait_for(lambda: len(frags) == 0, timeout=3)
    assert net.stat.frag_timeout == live
    assert frags.ip_frag_mem == 0 and net.skbs.live == 0
    # Whole datagrams still get through afterwards.
    send_udp(sk.lport, [b"k" * 4000])
    assert (await sk.recvfrom())[0] == b"k" * 4000


async def test_spoofed_sources_grow_route_cache_to_its_limit_and_no_further(make_net) -> None:
    net = await make_net("none", ram=16 << 20, ip_rt_max_size=40, ip_rt_gc_thresh=20)
    sk = await net.open_app_udp(0, rcvbuf=1 << 20)
    for i in range(60):  # sources anywhere in 127/8 are local: no raw socket needed
        send_udp(sk.lport, [b"s" * 64], src=f"127.0.{i // 200}.{i % 200 + 2}")
    await wait_for(lambda: net.stat.frames == 60)
    assert len(net.routes) == 40
    assert net.routes.dst_cache.active_objs == 40  # every entry is charged
    assert net.stat.route_nomem == 20 and net.stat.route_overflow == 20
    assert net.stat.delivered == 40
    # Entries idle past ip_rt_gc_min_interval are collected down to gc_thresh on the next miss.
    await trio.sleep(0.6)
    send_udp(sk.lport, [b"s" * 64], src="127.0.1.1")
    await wait_for(lambda: net.stat.frames == 61)
    assert len(net.routes) == 21 and net.stat.route_gc_freed == 20
    assert net.routes.dst_cache.active_objs == 21


async def test_real_kernel_drops_are_visible_as_wire_overruns(make_net) -> None:
    net = await make_net("none", ram=16 << 20, real_rcvbuf=4096)
    sk = await net.open_app_udp(0, rcvbuf=1 << 20)
    send_udp(sk.lport, [b"w" * 500] * 200)  # in one go: the tiny real buffer overflows first
    # Every datagram is either seen by the stage or counted (once the stage has read them all).
    await wait_for(lambda: net.stat.frames + net.wire_overruns().get(sk.local_str(), 0) == 200)
    assert net.wire_overruns()[sk.local_str()] > 0
