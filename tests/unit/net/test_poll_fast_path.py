"""The receive path's per-poll caches do not change the outcome.

`RxPath` keeps state for the length of one NAPI poll (`begin` .. `end`): the route of the last
source, the socket of the last port, the skb allocator's memo of failed ordinary attempts, the
slab array caches (`Zone.begin_poll`: an skb dropped in a poll is handed to the next allocation of
the same poll, and goes back to its slab at `end`), counters summed per poll, readers woken once.
None of that may change what happens to a frame: a poll over many frames must leave exactly the
state (counters, drops per socket, queues, skbs, slab objects and slabs, free pages, route cache,
fragment queues, reserve usage) that the same frames leave fed one per poll, on every path
(accept, rcvbuf full, no memory, reserve skbs dropped at a socket that is not memalloc, fragments,
route misses and overflow, no socket, TCP), under every policy.

The one difference by design: once the RX ring cannot be refilled, the rest of *that* poll is
missed (`rx_missed`) instead of trying again (`rx_nomem`); fed one per poll, every such frame
is an `rx_nomem`.  States are compared with the two counted together, and that split is checked
on its own.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest

from emu.kernel.sched import softirq
from emu.mm.gfp import GFP_ATOMIC
from emu.kernel.policy import Policy
from emu.mm.page_alloc import Page, Zone
from emu.mm.reserve import ReserveRoot
from emu.mm.slab import Slabs
from emu.net.capture import PacketTap
from emu.net.netstat import MISSED, NOMEM, QUEUED, VERDICTS
from emu.net.sock import Sock
from emu.net.stack import NetStack

BATCH = 64  # frames per poll (the NIC's default weight)
CLOSED = 9  # a port with no socket


class Host:
    """A stack driven directly (sans-IO): two UDP sockets, one TCP socket, a closed port."""

    def __init__(self, policy: str, memalloc: bool) -> None:
        self.zone = zone = Zone(4 << 20, policy=Policy(policy))
        self.net = net = NetStack(zone, Slabs(zone), reserve=ReserveRoot(zone) if policy == "v12" else None,
                                  ip_rt_max_size=24, ip_rt_gc_thresh=12)
        self.raws: list[socket.socket] = []
        self.udp = []
        for rcvbuf in (16_000, 64_000):
            raw = self._raw(socket.SOCK_DGRAM)
            raw.bind(("127.0.0.1", 0))
            sk = Sock(net, "udp", raw, rcvbuf=rcvbuf)
            net.udp_table[sk.lport] = sk
            net.socks.append(sk)
            self.udp.append(sk)
        lst = self._raw(socket.SOCK_STREAM)
        lst.bind(("127.0.0.1", 0))
        lst.listen(1)
        cli = self._raw(socket.SOCK_STREAM)
        cli.connect(lst.getsockname())
        self.raws.append(lst.accept()[0])
        self.tcp = Sock(net, "tcp", cli, rcvbuf=24_000)
        net.tcp_table[(self.tcp.lport, self.tcp.raddr, self.tcp.rport)] = self.tcp
        net.socks.append(self.tcp)
        self.socks = [*self.udp, self.tcp]
        if memalloc:
            self.udp[1].sk_set_memalloc()
        self.held: list[Page] = []

    def _raw(self, kind: int) -> socket.socket:
        raw = socket.socket(socket.AF_INET, kind)
        self.raws.append(raw)
        return raw

    def close(self) -> None:
        for raw in self.raws:
            raw.close()

    def feed(self, frames: list[tuple[Any, ...]], per_poll: int, now: float) -> list[int]:
        """The frames through the receive path, `per_poll` to a poll, as the NIC hands them up:
        consecutive datagrams for one port as one list (`RxPath.udp_list`, where runs of like
        frames are taken together), TCP segments one by one; returns the verdicts."""
        rx = self.net.rx
        out: list[int] = []
        with softirq():
            for i in range(0, len(frames), per_poll):
                rx.begin(now)
                try:
                    run: list[tuple[float, bytes, str, int]] = []
                    port = None
                    for f in frames[i:i + per_poll]:
                        if f[0] == "tcp" or f[1] != port:
                            if run:
                                rx.udp_list(run, "127.0.0.1", port, out)  # type: ignore[arg-type]
                                run = []
                            port = None
                        if f[0] == "tcp":
                            out.append(rx.tcp(self.tcp, f[1]))
                        else:
                            _, port, data, src = f
                            run.append((now, data, src, 5000))
                    if run:
                        rx.udp_list(run, "127.0.0.1", port, out)  # type: ignore[arg-type]
                finally:
                    rx.end()
        return out

    def hog(self, leave: int) -> None:
        zone = self.zone
        while zone.nr_free > leave and (got := zone.alloc_pages(GFP_ATOMIC)) is not None:
            self.held.extend(got)

    def unhog(self) -> None:
        self.zone.free_pages(self.held)
        self.held = []

    def state(self) -> dict[str, Any]:
        net = self.net
        stat = net.stat.snapshot()
        stat["rx_nomem"] += stat.pop("rx_missed")  # see the module docstring
        reserve = net.reserve
        return {
            "stat": stat,
            "socks": [(s.sk_rmem_alloc, s.rx_queued_bytes, s.sk_drops, merged_drops(s.rx_drops),
                       [(bytes(k.data), k.len, k.truesize, k.memalloc, k.charged) for k in s.receive_queue])
                      for s in self.socks],
            "skbs": (net.skbs.live, net.skbs.live_truesize, net.skbs.rx_allocated, net.skbs.rx_reserve),
            "slabs": {c.name: (c.active_objs, c.nr_slabs, c.nr_pfmemalloc_slabs)
                      for c in net.slabs.caches.values()},
            "large_pages": net.slabs.large_pages,
            "free": self.zone.nr_free,
            "pfmemalloc_pages": self.zone.nr_pfmemalloc,
            "routes": sorted((k, e.lastuse, e.reserve_charged) for k, e in net.routes.table.items()),
            "frags": (len(net.frags), net.frags.ip_frag_mem, net.frags.queued_skbs()),
            "reserve": None if reserve is None else (reserve.skb_data.usage, reserve.route_cache.usage,
                                                     reserve.frag_cache.usage),
        }


def merged_drops(d: dict[str, int]) -> dict[str, int]:
    out = dict(d)
    if "rx_missed" in out:
        out["rx_nomem"] = out.get("rx_nomem", 0) + out.pop("rx_missed")
    return out


def udp(port: int, sizes: list[int], sources: int = 1) -> list[tuple[Any, ...]]:
    return [("udp", port, bytes([i % 251]) * n, f"10.0.{i % sources // 200}.{i % sources % 200 + 1}")
            for i, n in enumerate(sizes)]


def tcp(n: int) -> list[tuple[Any, ...]]:
    return [("tcp", bytes([i % 251]) * 1448) for i in range(n)]


# The phases of each case: (name, frames); "read", "hog" and "unhog" act before their frames.
def phases(h: Host, case: str) -> Iterator[tuple[str, list[tuple[Any, ...]]]]:
    s0, s1 = h.udp[0].lport, h.udp[1].lport
    if case == "accept":
        yield "accept", udp(s0, [200] * 15) + udp(s1, [700] * 40) + tcp(10)
        yield "read", []
        yield "accept again", udp(s1, [200] * 30, sources=5) + tcp(5) + udp(s0, [1] * 10)
    elif case == "rcvbuf-drop":
        yield "rcvbuf", udp(s0, [200] * 100)  # socket 0 holds ~20 of them
        yield "tcp rcvbuf", tcp(30)  # the TCP socket holds ~11
        yield "read", []
        yield "interleaved", udp(s0, [300] * 10) + udp(s1, [100] * 10) + udp(s0, [300] * 60) + tcp(20)
    elif case == "nomem":
        yield "hog", []
        yield "nomem", udp(s1, [500] * 40) + tcp(10) + udp(s0, [100] * 20)
        yield "unhog", udp(s1, [200] * 20)
    elif case == "reserve-drop":
        yield "hog", []
        # reserve skbs (v12, pfmemalloc) dropped at the ordinary socket, accepted by the memalloc one
        yield "reserve", udp(s0, [400] * 50) + udp(s1, [400] * 30) + udp(s0, [900] * 30) + tcp(10)
        yield "read", []
        yield "reserve again", udp(s0, [100] * 40) + udp(s1, [1400] * 40)
        yield "unhog", udp(s0, [200] * 30) + udp(s1, [200] * 10)
    elif case == "mixed":
        yield "mixed", udp(s0, [1472, 0, 3000, 200, 9000, 1, 700] * 4, sources=7)  # fragments
        yield "routes", udp(s1, [64] * 60, sources=60)  # misses, then "dst cache overflow"
        yield "no socket", udp(CLOSED, [100] * 10 + [4000] * 3)
        yield "read", []
        yield "mixed again", udp(s1, [5000, 100] * 10, sources=3) + udp(s0, [2000] * 10)


def run(policy: str, case: str, per_poll: int, tap: PacketTap | None = None) -> list[tuple[str, dict[str, Any], list[int]]]:
    h = Host(policy, memalloc=case in ("reserve-drop", "mixed"))
    if tap is not None:
        h.net.set_tap(tap)
    out = []
    try:
        for i, (name, frames) in enumerate(phases(h, case)):
            if name == "read":
                for s in h.socks:
                    s.read_all()
            if name == "hog":
                h.hog(leave=8 if case == "nomem" else 0)
            if name == "unhog":
                h.unhog()
            verdicts = h.feed(frames, per_poll, now=float(i))
            out.append((name, h.state(), verdicts))
        return out
    finally:
        h.close()


CASES = ["accept", "rcvbuf-drop", "nomem", "reserve-drop", "mixed"]
POLICIES = ["none", "v12", "pfmemalloc"]

PARAMS = [pytest.param(policy, case, id=f"{policy}-{case}") for policy in POLICIES for case in CASES]


@pytest.mark.parametrize("policy,case", PARAMS)
def test_a_poll_leaves_the_state_of_one_frame_per_poll(policy: str, case: str) -> None:
    polled = run(policy, case, BATCH)
    single = run(policy, case, 1)
    for (phase, got, got_v), (_, want, want_v) in zip(polled, single):
        assert got == want, phase
        # per frame, not only in sum: the same verdict, MISSED standing for NOMEM
        assert [NOMEM if v == MISSED else v for v in got_v] == want_v, phase
        assert MISSED not in want_v  # one frame per poll: nothing left in the poll to miss
    last = polled[-1][1]["stat"]
    # the case took the path it is named after
    if case == "accept":
        assert last["delivered"] == last["frames"] and not any(last.get(n) for n, reason in VERDICTS if reason)
    elif case == "rcvbuf-drop":
        assert last["rcvbuf_full"] > 40 and last["delivered"] > 0
    elif case == "nomem":
        assert last["rx_nomem"] > 0 and last["delivered"] > 0
        assert polled[1][2].count(MISSED) > 0  # (the split itself: test_a_poll_that_cannot_refill...)
    elif case == "reserve-drop":
        if policy == "none":
            assert last["rx_nomem"] > 0 and polled[-1][1]["skbs"][3] == 0
        else:
            assert last["pfmemalloc_drop"] > 0 and last["delivered_emergency"] > 0
            assert last["rcvbuf_bypass"] > 0 and polled[-1][1]["skbs"][3] > 0
    else:
        assert last["frag_reassembled"] and last["no_socket"] and last["route_nomem"]
        assert last["route_overflow"] and last["route_entries_created"]


@pytest.mark.parametrize("policy", POLICIES)
def test_a_poll_that_cannot_refill_its_ring_misses_the_rest(policy: str) -> None:
    h = Host(policy, memalloc=False)
    try:
        h.hog(leave=0)
        s1 = h.udp[1].lport
        v = h.feed(udp(s1, [500] * 10), BATCH, now=0.0)
        assert v == [NOMEM] + [MISSED] * 9
        st = h.net.stat
        assert (st.rx_nomem, st.rx_missed, st.frames) == (1, 9, 10)
        assert h.udp[1].rx_drops == {"rx_nomem": 1, "rx_missed": 9} and h.udp[1].sk_drops == 0
        # the next poll tries again
        v = h.feed(udp(s1, [500] * 3), BATCH, now=1.0)
        assert v == [NOMEM, MISSED, MISSED] and st.rx_nomem == 2
        # TCP too
        assert h.feed(tcp(3), BATCH, now=2.0) == [NOMEM, MISSED, MISSED]
        assert h.tcp.rx_drops == {"rx_nomem": 1, "rx_missed": 2}
    finally:
        h.close()


def test_readers_are_woken_and_the_cpu_charged_once_per_poll() -> None:
    h = Host("none", memalloc=False)
    try:
        woken = []
        for sk in h.socks:
            sk.data_ready = (lambda s=sk: woken.append(s))  # type: ignore[method-assign]
        cpu = h.net.cpu
        v = h.feed(udp(h.udp[0].lport, [100] * 10) + tcp(3) + udp(h.udp[1].lport, [100] * 5), BATCH, now=0.0)
        assert v == [QUEUED] * 18
        assert woken == [h.udp[0], h.tcp, h.udp[1]]  # once each, at the end of the poll
        assert cpu.busy == pytest.approx(18 * cpu.costs.rx_frame)
        assert h.net.stat.frames == 18 and h.net.stat.delivered == 18
        h.feed([], BATCH, now=1.0)  # an empty poll wakes nobody
        assert len(woken) == 3
    finally:
        h.close()


@pytest.mark.parametrize("policy,case", PARAMS)
def test_a_capture_sees_every_counted_verdict_and_changes_nothing(policy: str, case: str) -> None:
    """--pcap's tap on the same polls: the same state, and one frame per counted verdict."""
    tap = PacketTap()
    seen = run(policy, case, BATCH, tap)
    assert [(p, st, v) for p, st, v in seen] == [(p, st, v) for p, st, v in run(policy, case, BATCH)]
    last = seen[-1][1]["stat"]  # (state() counts rx_missed in rx_nomem)
    counts = list(tap.counts)
    counts[NOMEM] += counts[MISSED]
    counts[MISSED] = 0
    for v, (name, _) in enumerate(VERDICTS):
        assert counts[v] == last.get(name, 0), name
    assert tap.reserve_frames == last.get("skbs_emergency", 0)
    assert tap.rx_frames == last["frames"] == len(tap.ring)
