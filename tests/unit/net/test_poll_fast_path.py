"""The wire's poll (`Nic.udp_poll`, with its fast path) leaves exactly the state that running every
datagram through the general `udp_input` leaves: the same counters, drops per socket, queues,
skbs, slab objects and free pages, on every path (accept, rcvbuf full, no memory with the rest of
the poll missed, fragments, route misses, no socket), under every policy, with and without a
memalloc socket (which turns the fast path off)."""

from __future__ import annotations

import socket
from typing import Any

import pytest

from emu.mm.gfp import GFP_ATOMIC, Policy
from emu.mm.page_alloc import Page, Zone
from emu.mm.reserve import ReserveTree
from emu.kernel.sched import softirq
from emu.mm.slab import Slabs
from emu.net.stack import NetStack

BATCH = 16

# (phase, payload sizes): to socket 0 unless the phase says otherwise
PHASES: list[tuple[str, list[int]]] = [
    ("accept+rcvbuf", [200] * 60),  # socket 0 holds ~20 of them
    ("read", []),
    ("mixed", [1472, 0, 3000, 200, 9000, 1, 700] * 4),  # fragments take the general path
    ("other socket", [300] * 30),
    ("no socket", [100] * 10),
    ("read", []),
    ("nomem", [500] * 40),  # memory for a few: then rx_nomem, and rx_missed for the poll's rest
    ("unhog", [200] * 20),
]


async def build(policy: str, memalloc: bool) -> tuple[NetStack, list[Any], int]:
    zone = Zone(4 << 20, policy=Policy(policy))
    slabs = Slabs(zone)
    reserve = ReserveTree(zone) if policy == "v12" else None
    net = NetStack.from_parts(zone, slabs, reserve, batch=BATCH)  # not run: we drive it
    socks = [await net.open_app_udp(0, rcvbuf=rcvbuf) for rcvbuf in (16_000, 64_000)]
    if memalloc:
        socks[1].sk_set_memalloc()
    closed = net.open_closed_port()
    return net, socks, closed


def send(port: int, sizes: list[int]) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for i, n in enumerate(sizes):
            s.sendto(bytes([i % 251]) * n, ("127.0.0.1", port))
    finally:
        s.close()


def drain_by_poll(net: NetStack, wire: Any, count: int) -> None:
    with softirq():
        while net.stat.frames < count:
            assert net.nic.udp_poll(wire, 1.0)


def drain_by_input(net: NetStack, wire: Any, count: int) -> None:
    """The reference: the general path for every datagram, a poll every BATCH datagrams."""
    raw, nic = wire.raw, net.nic
    with softirq():
        while net.stat.frames < count:
            nic.new_poll()
            for _ in range(BATCH):
                try:
                    data, addr = raw.recvfrom(65536)
                except BlockingIOError:
                    break
                nic.udp_input(addr[0], addr[1], wire.laddr, wire.lport, data, 1.0)


def state(net: NetStack, socks: list[Any]) -> dict[str, Any]:
    return {
        "stat": net.stat.snapshot(),
        "socks": [(s.sk_rmem_alloc, s.rx_queued_bytes, s.sk_drops, dict(s.rx_drops),
                   [(bytes(k.data), k.len, k.truesize, k.memalloc) for k in s.receive_queue]) for s in socks],
        "skbs": (net.mem.skbs_live, net.mem.skb_truesize_live),
        "slabs": {c.name: (c.active_objs, c.nr_slabs) for c in net.slabs.caches.values()},
        "free": net.zone.nr_free,
        "routes": len(net.routes),
        "frags": (len(net.frags), net.frags.ip_frag_mem),
    }


def hog(zone: Zone, leave: int) -> list[Page]:
    pages: list[Page] = []
    while zone.nr_free > leave and (got := zone.alloc_pages(GFP_ATOMIC)) is not None:
        pages.extend(got)
    return pages


async def run(policy: str, memalloc: bool, drain: Any) -> list[dict[str, Any]]:
    net, socks, closed = await build(policy, memalloc)
    wires = {s.lport: s.wire for s in socks}
    wires[closed] = net.closed_ports[closed]
    held: list[Page] = []
    states = []
    try:
        for phase, sizes in PHASES:
            port = {"other socket": socks[1].lport, "no socket": closed}.get(phase, socks[0].lport)
            if phase == "read":
                for s in socks:
                    s.read_all_nowait()
            if phase == "nomem":
                held = hog(net.zone, leave=3)  # a few objects' worth of slab pages left
            if phase == "unhog":
                net.zone.free_pages(held)
                held = []
            if sizes:
                frames = net.stat.frames + sum(max(1, -(-(n + 8) // 1480)) for n in sizes)
                send(port, sizes)
                drain(net, wires[port], frames)
            states.append(state(net, socks))
        return states
    finally:
        net.close_all()


@pytest.mark.parametrize("policy", ["none", "v12", "pfmemalloc"])
@pytest.mark.parametrize("memalloc", [False, True])
async def test_poll_equals_the_general_path(policy: str, memalloc: bool) -> None:
    fast = await run(policy, memalloc, drain_by_poll)
    ref = await run(policy, memalloc, drain_by_input)
    for (phase, _), got, want in zip(PHASES, fast, ref):
        assert got == want, phase
    last = fast[-1]["stat"]
    # every path was taken
    assert last["delivered"] and last["rcvbuf_full"]
    assert last["frag_reassembled"] and last["no_socket"] and last["route_entries_created"]
    if memalloc and policy != "none":  # short of memory, frames get reserve skbs instead
        assert last["skbs_emergency"] and last["pfmemalloc_drop"] and not last["rx_nomem"]
    else:
        assert last["rx_nomem"] and last["rx_missed"] and not last["skbs_emergency"]
