"""Applications read their sockets only while their own pages are resident (a real Vm, real swap)."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from emu.kernel.policy import Policy
from emu.mm.vm import Vm
from emu.mm.page_alloc import Zone
from emu.mm.process import Process
from emu.kernel.sched import task
from emu.mm.slab import Slabs
from emu.mm.swap import LocalFileSwap
from emu.net.sock import app_reader
from emu.net.stack import NetStack
from nethelp import send_udp, wait_for


async def test_swapped_out_owner_lets_its_queue_fill_then_drains_it(tmp_path: Path) -> None:
    zone = Zone(2 << 20, policy=Policy.NONE)
    slabs = Slabs(zone)
    mm = Vm(zone, slabs)
    net = NetStack(zone, slabs)
    async with trio.open_nursery() as n:
        await n.start(mm.run)
        await n.start(net.run)
        storage = LocalFileSwap(tmp_path / "swap")
        await mm.swapon(storage, 2048)
        app = Process(mm, "app", 8)
        hogp = Process(mm, "hog", 1024)
        with task("app"):
            for p in range(8):
                await app.touch(p)
        sk = await net.open_app_udp(0, owner=app, rcvbuf=64 * 1024)
        with task("hog"):  # push the app's pages out to swap
            for p in range(700):
                await hogp.touch(p)
        assert all(isinstance(pte, int) for pte in app.pte), app.pte  # swapped out
        storage.latency = 0.6  # from now on a slow swap device (the 200 datagrams arrive well within it)

        async def resident() -> None:  # the app's working set, faulted back in before each read
            for p in range(2):
                await app.touch(p, write=False)

        with task("app"):
            n.start_soon(app_reader, sk, resident)
            send_udp(sk.lport, [b"a" * 1000] * 200)
            await wait_for(lambda: net.stat.frames == 200)
            # While its working set comes back from the slow device, nothing is read: the queue
            # filled to its receive buffer and the rest was dropped.
            assert sk.bytes_read == 0 and net.stat.rcvbuf_full > 0
            assert sk.sk_rmem_alloc == net.skbs.live_truesize > 0
            await wait_for(lambda: sk.bytes_read > 0, timeout=10)
            await wait_for(lambda: not sk.receive_queue)
        assert app.maj_flt >= 1
        assert "app" in net.ss()
        n.cancel_scope.cancel()


async def test_app_tcp_listener_receives_streams_and_refuses_without_memory(make_net) -> None:
    from emu.net.stack import serve_app_tcp
    from nethelp import hog

    net = await make_net("none", ram=16 << 20)
    lst = await net.open_app_tcp_listener(0, owner="tcpapp", rcvbuf=64 * 1024)
    payload = b"t" * 100_000

    async def client() -> None:
        s = await trio.open_tcp_stream("127.0.0.1", lst.port)
        async with s:
            await s.send_all(payload)

    async with trio.open_nursery() as n:
        n.start_soon(serve_app_tcp, lst)
        async with trio.open_nursery() as clients:
            for _ in range(3):
                clients.start_soon(client)
        await wait_for(lambda: net.stat.app_read_bytes == 3 * len(payload))
        assert net.stat.tcp_accepted == 3
        await wait_for(lambda: net.socks == [])  # closed at end of stream
        pages = hog(net.zone)
        held = []  # and any free struct tcp_sock objects still on a slab
        while (o := net.tcp_sk_cache.alloc(0)) is not None:
            held.append(o)
        with trio.fail_after(5):
            try:
                await client()
            except (OSError, trio.BrokenResourceError):
                pass  # reset by the emulated host: no memory for the socket
            await wait_for(lambda: net.stat.listen_drops == 1)
        assert net.stat.tcp_accepted == 3
        for o in held:
            net.tcp_sk_cache.free(o)
        net.zone.free_pages(pages)
        assert net.stat.listen_drops >= 1
        n.cancel_scope.cancel()
    lst.close()


async def test_memalloc_refused_when_the_v12_reserve_cannot_fit(make_net) -> None:
    from emu.mm.reserve import ReserveError

    net = await make_net("v12", ram=2 << 20)  # the default route cache term alone exceeds 2 MiB
    server = await net.open_app_udp(0)
    with pytest.raises(ReserveError):
        await net.open_udp("127.0.0.1", server.lport, memalloc=True)
    assert net.sk_memalloc_socks == 0 and not net.reserve.connected
    assert net.socks == [server]  # the refused socket was closed and forgotten
