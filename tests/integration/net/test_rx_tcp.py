"""TCP over the receive stage: MSS chunks, hold and re-offer after RTO, the receive window."""

from __future__ import annotations

import functools
import hashlib

import trio

from emu.kernel.sched import TaskFlags, task
from nethelp import hog, wait_for


def pattern(n: int) -> bytes:
    out = bytearray()
    i = 0
    while len(out) < n:
        out += hashlib.sha256(i.to_bytes(8, "big")).digest()
        i += 1
    return bytes(out[:n])


async def serve_bytes(nursery: trio.Nursery, data: bytes) -> int:
    """A real TCP server on loopback that sends `data` to each client and closes."""

    async def handler(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.send_all(data)

    listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    return listeners[0].socket.getsockname()[1]


async def read_all(stream, chunk: int = 65536) -> bytes:
    out = bytearray()
    while data := await stream.receive_some(chunk):
        out += data
    return bytes(out)


async def test_held_chunks_are_reoffered_and_the_stream_arrives_complete_in_order(make_net) -> None:
    net = await make_net("none", ram=8 << 20, tcp_rto_max=0.4)
    data = pattern(300_000)
    async with trio.open_nursery() as n:
        port = await serve_bytes(n, data)
        stream = await net.connect_tcp("127.0.0.1", port)
        pages = hog(net.zone)  # no memory: every chunk is dropped (rx_nomem) and held
        await wait_for(lambda: net.stat.tcp_reoffer >= 2)
        assert net.stat.delivered == 0 and net.stat.rx_nomem >= 3
        assert "held " in net.ss() and "rto 0.4s" in net.ss()  # ss shows the held wire
        held = net.stat.rx_nomem
        await trio.sleep(0.3)
        assert net.stat.rx_nomem <= held + 2  # nothing more is read meanwhile: one try per RTO
        net.zone.free_pages(pages)
        got = await read_all(stream)
        assert got == data
        assert net.stat.tcp_held >= 2
        st = net.stat
        # every drop was this connection's, counted under its reason (pre-demux included)
        assert stream.sock.rx_drops == {k: getattr(st, k) for k in ("rx_nomem", "rx_missed") if getattr(st, k)}
        assert stream.sock.sk_drops == 0  # no drop after demux
        assert net.skbs.live == 0
        await stream.aclose()
        n.cancel_scope.cancel()


async def test_receive_window_limits_what_is_read_from_the_wire(make_net) -> None:
    net = await make_net("none", ram=16 << 20)
    data = pattern(400_000)
    async with trio.open_nursery() as n:
        port = await serve_bytes(n, data)
        stream = await net.connect_tcp("127.0.0.1", port, rcvbuf=32 * 1024)
        sk = stream.sock
        await wait_for(lambda: net.stat.tcp_window_closed >= 1)
        await trio.sleep(0.05)
        assert sk.sk_rmem_alloc < sk.sk_rcvbuf  # the window kept the queue inside the buffer
        window_max = max(1, (sk.sk_rcvbuf - 1) // net.tcp_chunk_truesize) * net.mss  # the initial window
        assert sk.rx_queued_bytes <= window_max
        got = bytearray()
        while data_ := await stream.receive_some(3000):  # a slow reader in small reads
            got += data_
            assert sk.sk_rmem_alloc < sk.sk_rcvbuf
        assert bytes(got) == data and sk.bytes_read == len(data)
        assert net.stat.rcvbuf_full == 0 and net.stat.tcp_held == 0
        n.cancel_scope.cancel()


async def test_reserve_chunks_for_ordinary_tcp_socket_are_dropped_then_retransmitted(make_net) -> None:
    net = await make_net("pfmemalloc", ram=8 << 20, tcp_rto_max=0.4)
    data = pattern(100_000)
    async with trio.open_nursery() as n:
        port = await serve_bytes(n, data)
        vm_port = await serve_bytes(n, data)
        vm = await net.connect_tcp("127.0.0.1", vm_port, memalloc=True)
        plain = await net.connect_tcp("127.0.0.1", port)
        pages = hog(net.zone)
        with task("nfsiod", TaskFlags.PF_MEMALLOC):
            got_vm = await read_all(vm)  # a memalloc socket receives from the reserve
        assert got_vm == data
        assert net.stat.delivered_emergency > 0
        await wait_for(lambda: net.stat.pfmemalloc_drop >= 2)
        assert plain.sock.rx_queued_bytes == 0
        net.zone.free_pages(pages)
        assert await read_all(plain) == data  # re-offered once memory is back: complete, in order
        n.cancel_scope.cancel()


async def test_stream_survives_intermittent_memory_pressure(make_net) -> None:
    net = await make_net("none", ram=8 << 20, tcp_rto_max=0.2)
    data = pattern(1_500_000)
    async with trio.open_nursery() as n:
        port = await serve_bytes(n, data)
        stream = await net.connect_tcp("127.0.0.1", port, rcvbuf=128 * 1024)

        async def pressure() -> None:
            while True:  # memory comes and goes while the stream flows
                pages = hog(net.zone)
                await trio.sleep(0.05)
                net.zone.free_pages(pages)
                await trio.sleep(0.05)

        n.start_soon(pressure)
        got = bytearray()
        with trio.fail_after(30):
            while chunk := await stream.receive_some(7000):  # odd-sized reads: partial skbs
                got += chunk
        assert bytes(got) == data  # complete and in order, however often chunks were held
        assert net.stat.tcp_held >= 1 and net.stat.rx_nomem >= 1
        n.cancel_scope.cancel()
