"""Property: whatever frames arrive, under any policy and memory state, the stack's memory is
exactly what it holds (queued skbs, fragment queues), every drop is counted once (on the stack
and on the socket the frame was for), and all of the memory comes back."""

from __future__ import annotations

import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from emu.kernel.sched import softirq
from emu.mm.gfp import GFP_ATOMIC
from emu.kernel.policy import Policy
from emu.mm.page_alloc import Zone
from emu.mm.reserve import ReserveRoot
from emu.mm.sizes import IPQ
from emu.mm.slab import Slabs
from emu.net.netstat import VERDICTS
from emu.net.sock import Sock
from emu.net.stack import NetStack

DROPS = [name for name, reason in VERDICTS if reason]  # the verdict counters that are drops
POST_DEMUX = ("pfmemalloc_drop", "rcvbuf_full")  # drops the kernel counts in sk_drops

frame = st.tuples(
    st.sampled_from(["frame", "hog", "unhog", "read", "gc"]),
    st.integers(0, 3),  # destination: socket 0..2, or 3 = a port with no socket
    st.integers(0, 6000),  # UDP payload (above 1472: fragments)
    st.integers(0, 40),  # source address
)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(["none", "v12", "pfmemalloc"]), st.lists(frame, max_size=120))
def test_memory_charged_is_exactly_what_is_held(policy: str, ops: list) -> None:
    run_ops(policy, ops)


SCRIPT = (
    [("frame", d, n, src) for src in range(20) for d, n in ((0, 100), (1, 3000), (2, 1400), (3, 50))]
    + [("hog", 0, 0, 0)]
    + [("frame", d, n, src) for src in range(30) for d, n in ((0, 900), (1, 200), (2, 5000))]
    + [("read", 0, 0, 0), ("unhog", 0, 0, 0), ("gc", 0, 0, 0)]
    + [("frame", 1, 4000, src) for src in range(5)]
)


def test_scripted_run_exercises_every_path() -> None:
    for policy in ("none", "v12", "pfmemalloc"):
        net = run_ops(policy, SCRIPT)
        st_ = net.stat.snapshot()
        assert st_["route_overflow"] > 0 and st_["frag_reassembled"] > 0 and st_["no_socket"] > 0
        assert st_["rcvbuf_full"] > 0
        if policy == "none":
            assert net.skbs.rx_reserve == 0 and st_["rx_nomem"] > 0
        else:
            assert net.skbs.rx_reserve > 0 and st_["pfmemalloc_drop"] > 0
            assert st_["delivered_emergency"] > 0


@pytest.mark.parametrize("policy", ["none", "v12", "pfmemalloc"])
def test_nstat_counts_the_rx_skbs(policy: str) -> None:
    net = run_ops(policy, SCRIPT)
    st_ = net.stat
    assert st_.skbs == net.skbs.rx_allocated > 0
    assert st_.skbs_emergency == net.skbs.rx_reserve
    assert st_.frames == st_.skbs + st_.rx_nomem + st_.rx_missed  # nstat's own arithmetic


async def test_queued_and_read_bytes_are_payload_bytes() -> None:
    zone = Zone(4 << 20)
    net = NetStack(zone, Slabs(zone))
    raws = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM), socket.socket(), socket.socket()]
    try:
        raws[0].bind(("127.0.0.1", 0))
        u = Sock(net, "udp", raws[0])
        net.udp_table[u.lport] = u
        raws[1].bind(("127.0.0.1", 0))
        raws[1].listen(1)
        raws[2].connect(raws[1].getsockname())
        raws.append(raws[1].accept()[0])
        t = Sock(net, "tcp", raws[2])
        net.tcp_table[(t.lport, t.raddr, t.rport)] = t
        net.socks += [u, t]
        stream = bytes(range(256)) * 6 + b"!" * 12  # 1548 bytes: a full segment and a short one
        with softirq():
            net.rx.begin(0.0)
            net.rx.udp(b"a" * 1000, "10.0.0.1", 5, "127.0.0.1", u.lport)  # one frame
            net.rx.udp(b"b" * 3000, "10.0.0.1", 5, "127.0.0.1", u.lport)  # three fragments
            net.rx.tcp(t, stream[:1448])
            net.rx.tcp(t, stream[1448:])
            net.rx.end()
        assert net.stat.delivered == 4
        assert [s.len for s in u.receive_queue] == [1000, 3000]
        assert u.rx_queued_bytes == 4000 and t.rx_queued_bytes == 1548
        assert [r["recv_q"] for r in net.ss_rows()] == [4000, 1548]  # ss's Recv-Q
        assert u.read_all() == 4000 and u.bytes_read == 4000
        a = await t.recv(1460)  # a read across the segment boundary
        b = await t.recv(100)
        assert (a, b) == (stream[:1460], stream[1460:])
        assert t.rx_queued_bytes == 0 and not t.receive_queue
        assert t.bytes_read == 1548 and net.stat.app_read_bytes == 4000 + 1548
    finally:
        for raw in raws:
            raw.close()


def run_ops(policy: str, ops: list) -> NetStack:
    zone = Zone(2 << 20, policy=Policy(policy))
    slabs = Slabs(zone)
    root = ReserveRoot(zone) if policy == "v12" else None
    net = NetStack(zone, slabs, reserve=root, ip_rt_max_size=16, ip_rt_gc_thresh=8, ipfrag_high_thresh=20_000,
                   ipfrag_low_thresh=10_000)
    raws = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(3)]
    try:
        socks = []
        for i, raw in enumerate(raws):
            raw.bind(("127.0.0.1", 0))
            sk = Sock(net, "udp", raw, rcvbuf=8000 * (i + 1))
            net.udp_table[sk.lport] = sk
            net.socks.append(sk)
            socks.append(sk)
        socks[0].sk_set_memalloc()
        ports = [s.lport for s in socks] + [1]
        free0 = zone.nr_free
        hog: list = []
        heads: list = []
        rx = net.rx
        skbs = net.skbs
        t = 0.0
        for op, dst, size, src in ops:
            t += 0.01
            before = net.stat.snapshot()
            drops_before = [dict(sk.rx_drops) for sk in socks]
            sk_drops_before = [sk.sk_drops for sk in socks]
            if op == "frame":
                with softirq():
                    rx.begin(t)
                    rx.udp(bytes(size), f"10.0.0.{src}", 999, "127.0.0.1", ports[dst])
                    rx.end()
            elif op == "hog":  # every free page, and every free skb head left on a slab
                while (p := zone.alloc_pages(GFP_ATOMIC)) is not None:
                    hog.extend(p)
                while (h := skbs.head_cache.alloc(GFP_ATOMIC)) is not None:
                    heads.append(h)
            elif op == "unhog":
                zone.free_pages(hog)
                hog = []
                for h in heads:
                    skbs.head_cache.free(h)
                heads = []
            elif op == "read":
                socks[dst % 3].read_all()
            else:
                with softirq():
                    net.frags.expire(t + 100)
                    net.routes.garbage_collect(t + 100)
            # The invariants, after every step:
            queued = [s for sk in socks for s in sk.receive_queue]
            assert skbs.live == sum(1 + len(s.frag_list or ()) for s in queued) + net.frags.queued_skbs()
            frag_truesize = net.frags.ip_frag_mem - IPQ * len(net.frags)
            assert skbs.live_truesize == sum(sk.sk_rmem_alloc for sk in socks) + frag_truesize
            assert skbs.head_cache.active_objs == skbs.live + len(heads)
            assert net.routes.dst_cache.active_objs == len(net.routes) <= 16
            assert net.frags.ip_frag_mem <= 20_000 + 2 * (1500 + 552) + IPQ
            for sk in socks[1:]:  # ordinary sockets never exceed their receive buffer
                assert sk.sk_rmem_alloc < sk.sk_rcvbuf
                assert not any(s.memalloc for s in sk.receive_queue)  # reserve skbs never reach them
            for sk in socks:
                assert sk.rx_queued_bytes == sum(s.len for s in sk.receive_queue)
            st_ = net.stat
            # every frame got an skb, or was dropped at step 1 (no memory, or the ring left unfilled)
            assert st_.frames == skbs.rx_allocated + st_.rx_nomem + st_.rx_missed
            # every drop is counted once, on the socket the frame was for (pre-demux included)
            after = st_.snapshot()
            for i, sk in enumerate(socks):
                got = {k: v - drops_before[i].get(k, 0) for k, v in sk.rx_drops.items() if v != drops_before[i].get(k, 0)}
                want = {k: after[k] - before[k] for k in DROPS if after[k] != before[k]}
                assert got == (want if op == "frame" and dst == i else {})
                assert sk.sk_drops - sk_drops_before[i] == (
                    sum(want.get(k, 0) for k in POST_DEMUX) if op == "frame" and dst == i else 0)
            if policy == "none":
                assert skbs.rx_reserve == 0 and zone.vmstat["pgalloc_pfmemalloc"] == 0
            if policy == "v12":
                charged = sum(s.charged + sum(f.charged for f in s.frag_list or ()) for s in queued) + sum(
                    s.charged for q in net.frags.queues.values() for _, _, s in q.frags)
                assert net.reserve.skb_data.usage == charged + IPQ * sum(
                    q.reserve_charged for q in net.frags.queues.values())
                assert net.reserve.route_cache.usage == net.routes.reserve_entries()
        # Everything comes back.
        zone.free_pages(hog)
        for h in heads:
            skbs.head_cache.free(h)
        for sk in socks:
            sk.read_all()
        net.frags.flush()
        net.routes.flush()
        assert skbs.live == 0 and skbs.live_truesize == 0
        if policy == "v12":
            assert net.reserve.skb_data.usage == 0 and net.reserve.route_cache.usage == 0
        for sk in socks:
            sk.sk_clear_memalloc()
            net.udp_table.pop(sk.lport, None)
            sk.sk_obj = None
        assert net.sk_memalloc_socks == 0
        net.slabs.shrink()  # the empty slabs the caches keep for reuse
        assert zone.nr_free == free0
        return net
    finally:
        for raw in raws:
            raw.close()
