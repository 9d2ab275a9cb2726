"""The receive queue (`SkbQueue`) and runs of like skbs (`SkbRun`): a run is the same skbs as
`rx` one at a time would give, read one by one or freed in bulk with the same memory left."""

from __future__ import annotations

import pytest

from emu.kernel.sched import softirq
from emu.kernel.policy import Policy
from emu.mm.page_alloc import Zone
from emu.mm.sizes import SKB_HEAD, SKB_SHARED_INFO
from emu.mm.slab import Slabs
from emu.net.skb_queue import SkbQueue
from emu.net.skbuff import SkBuff, SkbRun
from emu.net.stack import NetStack

PAYLOAD = 200
SIZE = PAYLOAD + 28


def stack() -> NetStack:
    zone = Zone(4 << 20, policy=Policy.NONE)
    return NetStack(zone, Slabs(zone))


def frames(n: int, first: int = 0) -> list[tuple[float, bytes, str, int]]:
    return [(0.0, bytes([i % 256]) * PAYLOAD, f"10.0.0.{i % 3 + 1}", 1000 + i) for i in range(first, first + n)]


def state(net: NetStack) -> tuple[object, ...]:
    return (net.zone.nr_free, net.skbs.live, net.skbs.live_truesize,
            {c.name: (c.active_objs, c.nr_slabs) for c in net.slabs.caches.values()})


def fill(net: NetStack, q: SkbQueue) -> list[tuple[float, bytes, str, int]]:
    """A single skb, a run of 40, a single, a run of 7: in that order."""
    fr = frames(49)
    with softirq():
        for part in (fr[0:1], fr[1:41], fr[41:42], fr[42:49]):
            if len(part) == 1:
                skb = net.skbs.rx(SIZE)
                assert skb is not None
                skb.len, skb.data, skb.saddr, skb.sport = PAYLOAD, part[0][1], part[0][2], part[0][3]
                q.append(skb)
            else:
                run = net.skbs.rx_bulk(SIZE, len(part), part, PAYLOAD)
                assert run is not None and len(run) == len(part)
                q.append_run(run)
    return fr


def test_a_run_reads_back_as_the_skbs_it_stands_for() -> None:
    net = stack()
    q = SkbQueue()
    fr = fill(net, q)
    assert len(q) == q.qlen == 49 and q and net.skbs.live == 49
    assert net.skbs.live_truesize == 49 * (SIZE + SKB_HEAD + SKB_SHARED_INFO)
    assert q.memalloc_skbs() == 0
    first = q.peek()
    assert q.peek() is first and len(q) == 49  # peeking takes nothing
    got = []
    while q:
        skb = q.popleft()
        assert type(skb) is SkBuff and skb.head is not None
        assert (skb.len, skb.truesize, skb.memalloc) == (PAYLOAD, SIZE + SKB_HEAD + SKB_SHARED_INFO, 0)
        got.append((skb.data, skb.saddr, skb.sport))
        net.skbs.free(skb)
    assert got == [(f[1], f[2], f[3]) for f in fr]
    assert len(q) == 0 and not q and net.skbs.live == 0
    with pytest.raises(IndexError):
        q.popleft()


def test_iterating_shows_every_skb_and_changes_no_memory() -> None:
    net = stack()
    q = SkbQueue()
    fr = fill(net, q)
    before = state(net)
    assert [s.sport for s in q] == [f[3] for f in fr]
    assert state(net) == before and len(q) == 49


@pytest.mark.parametrize("taken", [0, 3, 41])
def test_bulk_free_of_runs_leaves_what_single_frees_would(taken: int) -> None:
    """free_queue over runs (some skbs already read from the front) and single skbs."""
    results = []
    for bulk in (False, True):
        net = stack()
        q = SkbQueue()
        fill(net, q)
        for _ in range(taken):
            net.skbs.free(q.popleft())
        truesize = (49 - taken) * (SIZE + SKB_HEAD + SKB_SHARED_INFO)
        if bulk:
            items = q.take_all()
            assert not q and len(q) == 0
            assert net.skbs.free_queue(items) == truesize
            runs = [e for e in items if isinstance(e, SkbRun)]
            assert net.skbs.free_queue(runs) == 0  # the runs are spent: nothing is freed twice
            with pytest.raises(RuntimeError, match="double free"):
                net.skbs.free_queue(items)
        else:
            while q:
                net.skbs.free(q.popleft())
        assert net.skbs.live == 0 and net.skbs.live_truesize == 0
        results.append(state(net))
    assert results[0] == results[1]


def test_a_run_is_never_made_from_the_reserve() -> None:
    zone = Zone(4 << 20, policy=Policy.PFMEMALLOC)
    net = NetStack(zone, Slabs(zone))
    net.skbs.memalloc_socks = 1  # a memalloc socket exists: every RX skb takes the policy's rule
    with softirq():
        assert net.skbs.rx_bulk(SIZE, 8, frames(8), PAYLOAD) is None
    assert SkbRun.memalloc == 0
