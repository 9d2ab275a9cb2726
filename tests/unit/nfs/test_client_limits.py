"""The client's limits: the slot table bounds the calls in flight, and unstable writes held for
COMMIT are bounded and committed by range."""

from __future__ import annotations

import functools
import struct

import pytest
import trio

from nfs.client import RpcClient
from nfs.record import LAST_FRAG, RecordDecoder
from nfs.rpc import reply_header
from nfs.transport import tcp_connect
from nfs.xprt import SlotTable

H = "127.0.0.1"


class SlowServer:
    """A TCP RPC server that answers every call (empty SUCCESS) after `delay`, counting the
    calls it holds at once: what the client really has in flight."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.inflight = 0
        self.max_inflight = 0
        self.calls = 0

    async def handle(self, stream: trio.SocketStream) -> None:
        dec = RecordDecoder()
        lock = trio.Lock()

        async def answer(xid: int) -> None:
            await trio.sleep(self.delay)
            self.inflight -= 1
            async with lock:
                body = reply_header(xid)
                await stream.send_all(struct.pack(">I", LAST_FRAG | len(body)) + body)

        async with trio.open_nursery() as n:
            async for data in stream:
                dec.feed(data)
                while (rec := dec.next_record()) is not None:
                    self.calls += 1
                    self.inflight += 1
                    self.max_inflight = max(self.max_inflight, self.inflight)
                    n.start_soon(answer, struct.unpack_from(">I", rec)[0])


async def test_no_more_than_slots_calls_are_in_flight() -> None:
    srv = SlowServer(delay=0.05)
    async with trio.open_nursery() as n:
        listeners = await n.start(functools.partial(trio.serve_tcp, srv.handle, 0, host=H))
        port = listeners[0].socket.getsockname()[1]
        async with RpcClient(functools.partial(tcp_connect, H, port), proto="tcp", slots=3) as rpc:

            async def one() -> None:
                await rpc.call(100003, 3, 0)

            async with trio.open_nursery() as calls:
                for _ in range(12):
                    calls.start_soon(one)
                await trio.sleep(0.02)
                assert rpc.slots.in_use == 3 and rpc.slots.waiting == 9  # the table holds the rest back
            assert srv.calls == 12
            assert srv.max_inflight == 3 == rpc.slots.high_water
            assert rpc.slots.in_use == 0 and rpc.slots.waiting == 0
        n.cancel_scope.cancel()


def test_slot_table_hands_a_freed_slot_to_the_oldest_waiter() -> None:
    t = SlotTable(1)
    assert t.reserve("a")
    assert not t.reserve("b") and not t.reserve("c")
    assert not t.try_get()  # nobody overtakes the backlog
    assert t.cancel("c") is False  # gave up while queued: held nothing
    assert t.put() == "b" and t.in_use == 1  # the slot went straight to b
    assert t.cancel("b") is True  # b was cancelled after being handed the slot: it must put() it
    assert t.put() is None and t.in_use == 0
    with pytest.raises(ValueError):
        SlotTable(0)


async def test_unstable_data_kept_is_capped(nfs_server) -> None:  # type: ignore[no-untyped-def]
    import os

    from nfs.client import NfsClient
    from nfs.nfs3 import FILE_SYNC, UNSTABLE

    cap = 64 * 1024
    async with NfsClient.tcp(H, nfs_server.nfs_port, nfs_server.mount_port, hard=False, timeo=3.0,
                             max_uncommitted=cap) as c:
        root = await c.mount(str(nfs_server.export))
        fh, _ = await c.create(root, "f")
        data = os.urandom(10 * 16 * 1024)
        for i in range(10):
            res = await c.write(fh, i * 16384, data[i * 16384:(i + 1) * 16384], UNSTABLE)
            assert res.committed == UNSTABLE
            assert c.commits.held <= cap  # never more than the cap kept for resending
        assert c.stats["forced_commits"] >= 2 and c.stats["uncommitted_bytes"] == c.commits.held
        big = os.urandom(cap + 1)  # could never fit: written FILE_SYNC, nothing kept
        held = c.commits.held
        assert (await c.write(fh, len(data), big, UNSTABLE)).committed == FILE_SYNC
        assert c.commits.held == held and c.stats["forced_sync_writes"] == 1
        await c.commit(fh)
        assert c.commits.held == 0
        assert (nfs_server.export / "f").read_bytes() == data + big


async def test_commit_settles_only_the_writes_in_its_range(nfs_server) -> None:  # type: ignore[no-untyped-def]
    from nfs.client import NfsClient
    from nfs.nfs3 import UNSTABLE

    async with NfsClient.tcp(H, nfs_server.nfs_port, nfs_server.mount_port, hard=False, timeo=3.0) as c:
        root = await c.mount(str(nfs_server.export))
        fh, _ = await c.create(root, "f")
        for off in (0, 8192, 16384):
            await c.write(fh, off, b"a" * 4096, UNSTABLE)
        await c.commit(fh, 8192, 4096)
        assert sorted(w.offset for w in c.commits.writes[fh]) == [0, 16384]
        await c.commit(fh, 2048, 16384)  # [2048, 18432): holds none of the others wholly
        assert sorted(w.offset for w in c.commits.writes[fh]) == [0, 16384]
        await c.commit(fh, 16384, 0)  # to the end of the file
        assert [w.offset for w in c.commits.writes[fh]] == [0]
        await c.commit(fh)
        assert c.commits.held == 0 and fh not in c.commits.writes
