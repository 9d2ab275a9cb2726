"""Property: whatever frames arrive, under any policy and memory state, the stack's memory is
exactly what it holds (queued skbs, fragment queues), and all of it comes back."""

from __future__ import annotations

import socket

from hypothesis import given, settings
from hypothesis import strategies as st

from emu.mm.gfp import GFP_ATOMIC, Policy
from emu.mm.page_alloc import Zone
from emu.mm.reserve import ReserveTree
from emu.kernel.sched import softirq
from emu.mm.sizes import IPQ
from emu.mm.slab import Slabs
from emu.net.sock import Sock
from emu.net.stack import NetStack

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
        st_ = run_ops(policy, SCRIPT).snapshot()
        assert st_["route_overflow"] > 0 and st_["frag_reassembled"] > 0 and st_["no_socket"] > 0
        assert st_["rcvbuf_full"] > 0
        if policy == "none":
            assert st_["skbs_emergency"] == 0 and st_["rx_nomem"] > 0
        else:
            assert st_["skbs_emergency"] > 0 and st_["pfmemalloc_drop"] > 0
            assert st_["delivered_emergency"] > 0


def run_ops(policy: str, ops: list):
    zone = Zone(2 << 20, policy=Policy(policy))
    slabs = Slabs(zone)
    reserve = ReserveTree(zone, route_max_size=16, ipfrag_high_thresh=20_000) if policy == "v12" else None
    net = NetStack.from_parts(zone, slabs, reserve,
                              ip_rt_max_size=16, ip_rt_gc_thresh=8, ipfrag_high_thresh=20_000,
                              ipfrag_low_thresh=10_000)
    raws = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(3)]
    try:
        socks = []
        for i, raw in enumerate(raws):
            raw.bind(("127.0.0.1", 0))
            sk = Sock(net, "udp", raw, rcvbuf=8000 * (i + 1))
            net.nic.udp_table[sk.lport] = sk
            net.socks.append(sk)
            socks.append(sk)
        socks[0].sk_set_memalloc()
        ports = [s.lport for s in socks] + [1]
        free0 = zone.nr_free
        hog: list = []
        heads: list = []
        nic = net.nic
        t = 0.0
        for op, dst, size, src in ops:
            t += 0.01
            if op == "frame":
                with softirq():
                    nic.new_poll()
                    nic.udp_input(f"10.0.0.{src}", 999, "127.0.0.1", ports[dst], bytes(size), t)
            elif op == "hog":  # every free page, and every free skb head left on a slab
                while (p := zone.alloc_pages(GFP_ATOMIC)) is not None:
                    hog.extend(p)
                while (h := net.mem.head_cache.alloc(GFP_ATOMIC)) is not None:
                    heads.append(h)
            elif op == "unhog":
                zone.free_pages(hog)
                hog = []
                for h in heads:
                    net.mem.head_cache.free(h)
                heads = []
            elif op == "read":
                socks[dst % 3].read_all_nowait()
            else:
                with softirq():
                    net.frags.expire(t + 100)
                    net.routes.garbage_collect(t + 100)
            # The invariants, after every step:
            queued = [s for sk in socks for s in sk.receive_queue]
            assert net.mem.skbs_live == sum(1 + len(s.frag_list or ()) for s in queued) + net.frags.queued_skbs()
            frag_truesize = net.frags.ip_frag_mem - IPQ * len(net.frags)
            assert net.mem.skb_truesize_live == sum(sk.sk_rmem_alloc for sk in socks) + frag_truesize
            assert net.mem.head_cache.active_objs == net.mem.skbs_live + len(heads)
            assert net.dst_cache_objs() == len(net.routes) <= 16
            assert net.frags.ip_frag_mem <= 20_000 + 2 * (1500 + 552) + IPQ
            for sk in socks[1:]:  # ordinary sockets never exceed their receive buffer
                assert sk.sk_rmem_alloc < sk.sk_rcvbuf
                assert not any(s.memalloc for s in sk.receive_queue)  # reserve skbs never reach them
            st_ = net.stat
            assert st_.frames == st_.skbs + st_.rx_nomem
            if policy == "none":
                assert st_.skbs_emergency == 0 and zone.vmstat["pgalloc_pfmemalloc"] == 0
            if policy == "v12":
                charged = sum(s.charged + sum(f.charged for f in s.frag_list or ()) for s in queued) + sum(
                    s.charged for q in net.frags.queues.values() for _, _, s in q.frags)
                assert net.reserve.skb_data.usage == charged + IPQ * sum(
                    q.reserve_charged for q in net.frags.queues.values())
        # Everything comes back.
        zone.free_pages(hog)
        for h in heads:
            net.mem.head_cache.free(h)
        for sk in socks:
            sk.read_all_nowait()
        net.frags.flush()
        net.routes.flush()
        assert net.mem.skbs_live == 0 and net.mem.skb_truesize_live == 0
        if policy == "v12":
            assert net.reserve.skb_data.usage == 0 and net.reserve.route_cache.usage == 0
        for sk in socks:
            sk.sk_clear_memalloc()
            net.nic.udp_table.pop(sk.lport, None)
            sk.sk_obj = None
        net.slabs.shrink()  # the empty slabs the caches keep for reuse
        assert zone.nr_free == free0
        return net.stat
    finally:
        for raw in raws:
            raw.close()
