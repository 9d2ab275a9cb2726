"""Calls answered by the reading task itself (svc.try_now, nfsd.call_nowait) give the replies the
task path gives, reply cache included; calls that must wait still get a task; write-behind starts
a file's writeback early and COMMIT still syncs."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import pytest
import trio

from nfs import nfsd
from nfs.client import NfsClient
from nfs.nfs3 import FILE_SYNC, NFS_PROGRAM, UNSTABLE, Proc
from nfs.nfs3xdr import NFS3_PROCEDURES, WriteArgs
from nfs.rpc import AuthSys, encode_call
from nfs.server import NfsServer, ServerConfig
from nfs.writeback import WriteBehind
from nfs.xdr import Packer

H = "127.0.0.1"


@pytest.mark.parametrize("proto", ["tcp", "udp"])
async def test_calls_that_need_no_waiting_are_answered_without_a_task(tmp_path: Path, export_dir: Path,
                                                                      proto: str) -> None:
    async with trio.open_nursery() as n:
        server = NfsServer(ServerConfig(export=export_dir, port=0, mount_port=0, state_dir=tmp_path / "s"))
        ports = await n.start(server.serve)
        ctor = NfsClient.tcp if proto == "tcp" else NfsClient.udp
        async with ctor(H, ports["nfs"], ports["mount"], hard=False, timeo=3.0) as c:
            root = await c.mount(str(export_dir))
            fh, _ = await c.create(root, "f")  # (a CREATE waits for its syncs: a task)
            data = os.urandom(20_000)
            before = server.stats.calls_now
            assert (await c.write(fh, 0, data, UNSTABLE)).count == len(data)
            assert await c.read(fh, 0, len(data)) == data
            assert (await c.getattr(fh)).size == len(data)
            assert server.stats.calls_now - before == 3  # each answered by the reading task
            before = server.stats.calls_now
            await c.write(fh, 0, data[::-1], FILE_SYNC)  # waits for its fsync: in a task
            await c.commit(fh)
            assert server.stats.calls_now == before
            assert (export_dir / "f").read_bytes() == data[::-1]
        n.cancel_scope.cancel()


async def test_a_retransmitted_unstable_write_gets_the_cached_reply(tmp_path: Path, export_dir: Path) -> None:
    (export_dir / "w").write_bytes(b"")
    async with trio.open_nursery() as n:
        server = NfsServer(ServerConfig(export=export_dir, port=0, mount_port=0, state_dir=tmp_path / "s"))
        ports = await n.start(server.serve)
        st = os.lstat(export_dir / "w")
        fh = server.export.fh_for(str(export_dir / "w"), st, server.export.root_ino)
        p = Packer()
        NFS3_PROCEDURES[Proc.WRITE].encode_args(p, WriteArgs(fh, 0, 4096, UNSTABLE, b"a" * 4096))
        call = encode_call(777, NFS_PROGRAM, 3, Proc.WRITE, b"".join(p.iov()), AuthSys().to_auth())  # type: ignore[arg-type]
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        await sock.connect((H, ports["nfs"]))
        replies = []
        with trio.fail_after(5):
            for _ in range(2):  # the client "retransmits": same xid, same arguments
                await sock.send(call)
                replies.append(await sock.recv(65536))
            (export_dir / "w").write_bytes(b"changed")  # a re-executed WRITE would see other attributes
            await sock.send(call)
            replies.append(await sock.recv(65536))
        sock.close()
        assert replies[0] == replies[1] == replies[2]
        assert (export_dir / "w").read_bytes() == b"changed"  # executed once: not written again
        assert server.svc.drc.stats.hits == 2
        assert server.stats.calls_now == 3
        n.cancel_scope.cancel()


def test_write_behind_bookkeeping() -> None:
    wb = WriteBehind(every=1000)
    assert not wb.wrote(1, 600)
    assert wb.wrote(1, 600)  # past 1000 bytes: start it
    assert not wb.wrote(1, 5000)  # one start in flight per file at most
    wb.done(1)
    assert wb.wrote(1, 1)  # (the bytes written meanwhile count)
    wb.done(1)
    assert not wb.wrote(2, 999)
    wb.synced(2)  # a COMMIT synced it: counting starts again
    assert not wb.wrote(2, 999)
    assert not WriteBehind(every=0).wrote(3, 1 << 30)  # 0: never
    small = WriteBehind(every=10, max_files=2)
    for ino in (1, 2, 3):
        small.wrote(ino, 5)
    assert not small.wrote(1, 5)  # forgotten (the oldest of three): counts from 0 again
    assert small.wrote(3, 5)
    assert small.started == 1


@pytest.mark.parametrize("every", [1 << 20, 0])
async def test_write_behind_starts_writeback_and_commit_still_syncs(tmp_path: Path, export_dir: Path,
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   every: int) -> None:
    loop_thread = threading.get_ident()
    started: list[tuple[int, bool]] = []
    synced: list[int] = []
    real_start, real_fsync = nfsd.start_writeback, os.fsync

    def start(fd: int) -> None:
        real_start(fd)
        started.append((os.fstat(fd).st_ino, threading.get_ident() == loop_thread))

    def fsync(fd: int) -> None:
        real_fsync(fd)
        synced.append(os.fstat(fd).st_ino)

    monkeypatch.setattr(nfsd, "start_writeback", start)
    monkeypatch.setattr(os, "fsync", fsync)
    async with trio.open_nursery() as n:
        server = NfsServer(ServerConfig(export=export_dir, port=0, mount_port=0, state_dir=tmp_path / "s",
                                        write_behind=every))
        ports = await n.start(server.serve)
        async with NfsClient.tcp(H, ports["nfs"], ports["mount"], hard=False, timeo=3.0) as c:
            root = await c.mount(str(export_dir))
            fh, attr = await c.create(root, "big")
            assert attr is not None
            data = os.urandom(3 << 20)
            for off in range(0, len(data), 1 << 20):
                await c.write(fh, off, data[off : off + (1 << 20)], UNSTABLE)
            with trio.fail_after(5):
                while every and len(started) < 1:
                    await trio.sleep(0.01)
            synced.clear()
            await c.commit(fh)
            assert synced == [attr.fileid]  # the COMMIT still waits for its fsync
        n.cancel_scope.cancel()
    assert (export_dir / "big").read_bytes() == data
    if every:
        assert started and all(ino == attr.fileid and not on_loop for ino, on_loop in started)
        assert server.nfs.write_behind.started == len(started)
    else:
        assert started == []


async def test_two_writes_with_the_same_xid_are_both_executed(tmp_path: Path, export_dir: Path) -> None:
    """The reply cache tells calls apart by their arguments too (clients on one host may pick the
    same xid): a WRITE answered at once must not take another's cached reply."""
    (export_dir / "w").write_bytes(b"")
    async with trio.open_nursery() as n:
        server = NfsServer(ServerConfig(export=export_dir, port=0, mount_port=0, state_dir=tmp_path / "s"))
        ports = await n.start(server.serve)
        fh = server.export.fh_for(str(export_dir / "w"), os.lstat(export_dir / "w"), server.export.root_ino)
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        await sock.connect((H, ports["nfs"]))
        with trio.fail_after(5):
            for off, fill in ((0, b"a"), (4096, b"b")):
                p = Packer()
                NFS3_PROCEDURES[Proc.WRITE].encode_args(p, WriteArgs(fh, off, 4096, UNSTABLE, fill * 4096))
                await sock.send(encode_call(5, NFS_PROGRAM, 3, Proc.WRITE, b"".join(p.iov()),  # type: ignore[arg-type]
                                            AuthSys().to_auth()))
                await sock.recv(65536)
        sock.close()
        assert (export_dir / "w").read_bytes() == b"a" * 4096 + b"b" * 4096
        assert server.svc.drc.stats.hits == 0 and server.stats.calls_now == 2
        n.cancel_scope.cancel()
