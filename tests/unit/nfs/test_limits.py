"""Server resource limits: one byte budget over all connections, idle and silent connections
closed, the connection limit making room for new clients."""

from __future__ import annotations

import contextlib
import os
import socket
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from nfs.budget import ByteBudget
from nfs.client import NfsClient
from nfs.nfs3 import FILE_SYNC, NFS_PROGRAM, Proc
from nfs.record import LAST_FRAG, RecordDecoder
from nfs.rpc import encode_call
from nfs.server import NfsServer, ServerConfig

H = "127.0.0.1"


@contextlib.asynccontextmanager
async def serving(export: Path, state: Path, **kw: object) -> AsyncIterator[tuple[NfsServer, dict[str, int]]]:
    async with trio.open_nursery() as n:
        server = NfsServer(ServerConfig(export=export, port=0, mount_port=0, state_dir=state, **kw))  # type: ignore[arg-type]
        ports = await n.start(server.serve)
        yield server, ports
        n.cancel_scope.cancel()


async def _eof_within(s: trio.SocketStream, seconds: float) -> bool:
    with trio.move_on_after(seconds):
        try:
            while await s.receive_some(65536):
                pass
        except trio.BrokenResourceError:
            pass
        return True
    return False


def test_a_mark_alone_allocates_nothing() -> None:
    dec = RecordDecoder(max_record=4 << 20)
    dec.feed(struct.pack(">I", LAST_FRAG | (4 << 20) - 8) + b"0123456789")
    assert dec.reserved == (4 << 20) - 8  # announced: what the driver charges
    assert dec.buffered == 10 and dec.allocated <= 64 * 1024  # held: what really arrived
    buf = dec.get_buffer(hint=100_000)
    assert buf is not None and len(buf) < 256 * 1024  # grown for the next read, not the mark
    buf.release()


async def test_budget_keeps_a_share_of_reserve_for_small_calls() -> None:
    b = ByteBudget(limit=1000, reserve=100, max_shares=4)  # 400 reserved, 600 shared
    big, small = b.share(cap=10_000, max_calls=4), b.share(cap=10_000, max_calls=4)
    await big.acquire(700)  # 100 from its reserve, 600 shared: the shared pool is empty
    assert not big.try_acquire(1)
    assert small.try_acquire(100)  # a small call still fits in its own reserve
    assert not small.try_acquire(1)
    assert b.used == 800 and b.high_water <= b.limit
    big.close()
    assert small.try_acquire(500) and b.used == 600


async def test_many_huge_marks_stay_within_the_server_budget(tmp_path: Path, export_dir: Path) -> None:
    limit = 2 << 20
    max_record = 256 * 1024
    async with serving(export_dir, tmp_path / "s", max_buffered=limit, max_record=max_record,
                       conn_reserve=16 * 1024, max_connections=64) as (server, ports):
        attackers = []
        for _ in range(24):  # 24 x 256 KiB announced = 3x the budget
            s = await trio.open_tcp_stream(H, ports["nfs"])
            await s.send_all(struct.pack(">I", LAST_FRAG | max_record - 4) + b"w" * 20_000)
            attackers.append(s)
        await trio.sleep(0.3)
        st = server.buffer_stats()
        assert st["connections"] >= 24
        assert st["high_water"] <= limit and st["buffered"] <= limit
        assert st["decoder_bytes"] <= limit  # memory held: what arrived, not what was announced
        assert st["buffered"] <= 24 * 64 * 1024  # marks announce, they cost nothing: what came is charged
        # The next client is served (its small calls come out of its connection's reserve).
        async with NfsClient.tcp(H, ports["nfs"], ports["mount"], hard=False, timeo=3.0) as c:
            with trio.fail_after(10):
                root = await c.mount(str(export_dir))
                fh, _ = await c.create(root, "page")
                page = os.urandom(4096)
                assert (await c.write(fh, 0, page, FILE_SYNC)).count == 4096
                assert await c.read(fh, 0, 4096) == page
        assert server.buffer_stats()["high_water"] <= limit
        for s in attackers:
            await s.aclose()
        with trio.fail_after(5):
            while server.buffer_stats()["buffered"]:
                await trio.sleep(0.02)  # every byte of the closed connections went back


async def test_idle_connections_at_the_limit_make_room(tmp_path: Path, export_dir: Path) -> None:
    (export_dir / "f").write_bytes(b"hello")
    async with serving(export_dir, tmp_path / "s", max_connections=3) as (server, ports):
        idle = []
        for _ in range(4):  # max_connections + 1, all silent (the 4th already evicts the 1st)
            s = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            await s.connect((H, ports["nfs"]))
            idle.append(s)
        await trio.sleep(0.1)
        async with NfsClient.tcp(H, ports["nfs"], ports["mount"], hard=False, timeo=3.0) as c:
            with trio.fail_after(10):
                root = await c.mount(str(export_dir))
                fh, _ = await c.lookup(root, "f")
                assert await c.read(fh, 0, 5) == b"hello"
        assert server.stats.tcp_evicted >= 2 and server.stats.tcp_refused == 0
        for s in idle:
            s.close()


async def test_silent_and_idle_connections_are_closed(tmp_path: Path, export_dir: Path) -> None:
    async with serving(export_dir, tmp_path / "s", idle_timeout=0.4, first_call_timeout=0.4) as (server, ports):
        # No RPC call at all: a record mark and a trickle of bytes do not keep it open.
        silent = await trio.open_tcp_stream(H, ports["nfs"])
        await silent.send_all(struct.pack(">I", LAST_FRAG | 1000))

        async def trickle() -> None:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                for _ in range(40):
                    await silent.send_all(b"x")
                    await trio.sleep(0.05)

        # One NULL call, then nothing: closed once idle.
        idle = await trio.open_tcp_stream(H, ports["nfs"])
        call = encode_call(1, NFS_PROGRAM, 3, Proc.NULL)
        await idle.send_all(struct.pack(">I", LAST_FRAG | len(call)) + call)
        async with trio.open_nursery() as n:
            n.start_soon(trickle)
            assert await _eof_within(silent, 1.5)
            n.cancel_scope.cancel()
        assert await _eof_within(idle, 1.5)
        assert server.stats.tcp_no_call_closed == 1 and server.stats.tcp_idle_closed == 1
        await silent.aclose()
        await idle.aclose()


def test_budget_smaller_than_a_record_is_refused(tmp_path: Path, export_dir: Path) -> None:
    with pytest.raises(ValueError, match="max_buffered"):
        NfsServer(ServerConfig(export=export_dir, state_dir=tmp_path / "s", max_buffered=1 << 20))


async def test_partial_records_cannot_starve_other_clients(tmp_path: Path, export_dir: Path) -> None:
    """The attack: 17 TCP connections each announce a 4 MiB record (17 x 4 MiB > the 64 MiB
    budget), send a little of it, and hold. Another client's 1 MiB WRITEs go on at once, and the
    stalled records close their connections after record_timeout, not idle_timeout."""
    async with serving(export_dir, tmp_path / "s", record_timeout=1.0) as (server, ports):
        attackers = []
        null = encode_call(1, NFS_PROGRAM, 3, Proc.NULL)
        for _ in range(17):
            s = await trio.open_tcp_stream(H, ports["nfs"])
            # A valid call first (so only the stall can close it), then 4 MiB announced.
            await s.send_all(struct.pack(">I", LAST_FRAG | len(null)) + null)
            await s.send_all(struct.pack(">I", LAST_FRAG | (4 << 20)) + b"w" * 100_000)
            attackers.append(s)
        await trio.sleep(0.2)
        assert server.buffer_stats()["connections"] >= 17
        async with NfsClient.tcp(H, ports["nfs"], ports["mount"], hard=False, timeo=3.0) as c:
            with trio.fail_after(5):  # (before any stalled record times out, too)
                root = await c.mount(str(export_dir))
                fh, _ = await c.create(root, "victim")
                for i in range(8):
                    assert (await c.write(fh, i << 20, os.urandom(1 << 20), FILE_SYNC)).count == 1 << 20
        # The attackers hold what they sent, and at most one read chunk each: not 4 MiB each.
        assert server.buffer_stats()["buffered"] <= 17 * (100_000 + 256 * 1024 + 64 * 1024)
        with trio.fail_after(5):
            while server.stats.stalled_records < 17:
                await trio.sleep(0.05)
        for s in attackers:
            assert await _eof_within(s, 1.0)
            await s.aclose()


async def test_fair_share_bounds_one_connection(tmp_path: Path, export_dir: Path) -> None:
    b = ByteBudget(limit=1000, reserve=10, max_shares=10)
    one, two, three = (b.share(cap=10_000, max_calls=4) for _ in range(3))
    assert one.try_acquire(600)  # alone: all it can use
    assert two.try_acquire(50)  # an idle share always gets its first bytes
    assert not one.try_acquire(50)  # now it holds more than half the limit: no more
    assert two.try_acquire(40) and three.try_acquire(5)
    assert not two.try_acquire(300)  # a third of the limit each
    one.close()
    assert two.try_acquire(200)


async def test_a_slow_record_is_not_a_stalled_one(tmp_path: Path, export_dir: Path) -> None:
    """A record whose bytes keep coming, slowly, is served; only one that stops is closed."""
    (export_dir / "f").write_bytes(b"")
    # the record takes 2 s, longer than record_timeout; each piece comes well within it
    async with serving(export_dir, tmp_path / "s", record_timeout=1.5) as (server, ports):
        fh = server.export.fh_for(str(export_dir / "f"), os.lstat(export_dir / "f"), server.export.root_ino)
        from nfs.nfs3xdr import NFS3_PROCEDURES, WriteArgs
        from nfs.rpc import AuthSys
        from nfs.xdr import Packer

        p = Packer()
        NFS3_PROCEDURES[Proc.WRITE].encode_args(p, WriteArgs(fh, 0, 300_000, FILE_SYNC, bytes(300_000)))
        call = encode_call(7, NFS_PROGRAM, 3, Proc.WRITE, b"".join(p.iov()), AuthSys().to_auth())  # type: ignore[arg-type]
        rec = struct.pack(">I", LAST_FRAG | len(call)) + call
        s = await trio.open_tcp_stream(H, ports["nfs"])
        for i in range(0, len(rec), 30_000):  # 2 s in all, 0.2 s between pieces
            await s.send_all(rec[i:i + 30_000])
            await trio.sleep(0.2)
        with trio.fail_after(5):
            reply = await s.receive_some(100)
        assert struct.unpack(">I", reply[28:32])[0] == 0  # NFS3_OK: written
        assert server.stats.stalled_records == 0
        await s.aclose()
    assert (export_dir / "f").stat().st_size == 300_000
