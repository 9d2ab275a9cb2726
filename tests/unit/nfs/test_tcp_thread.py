"""A TCP connection's service thread (nfs/server.py `_tcp_thread`): it answers READ and UNSTABLE
WRITE, and every other call that needs no waiting, itself with the replies the usual way gives,
hands the rest to the event loop,
reassembles records however the bytes are split, keeps to the byte budget, survives garbage and
a peer gone mid-record, and no thread outlives its connection or the server. Real loopback
sockets; the clients are blocking sockets in another thread, so the event loop is idle while
they wait (as with a client in another process)."""

from __future__ import annotations

import errno
import os
import socket
import struct
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from nfs.nfs3 import FILE_SYNC, NFS_PROGRAM, UNSTABLE, CreateMode, Proc, Stat
from nfs.nfs3xdr import NFS3_PROCEDURES, CommitArgs, CreateArgs, DirOpArgs, FhArgs, ReadArgs, RenameArgs, Sattr3, SetattrArgs, WriteArgs
from nfs.record import LAST_FRAG
from nfs.rpc import AuthSys, OpaqueAuth, encode_call
import nfs.nfsd
import nfs.server
import nfs.store
from nfs.server import NfsServer, ServerConfig
from nfs.xdr import Packer, Unpacker
from unit.nfs.helpers import fds_on

H = "127.0.0.1"


def _call(xid: int, proc: Proc, args: object, cred: OpaqueAuth) -> bytes:
    p = Packer()
    NFS3_PROCEDURES[proc].encode_args(p, args)
    return bytes(encode_call(xid, NFS_PROGRAM, 3, proc, b"".join(p.iov()), cred))  # type: ignore[arg-type]


def _rec(msg: bytes) -> bytes:
    return struct.pack(">I", LAST_FRAG | len(msg)) + msg


def _recv_exact(s: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            raise EOFError(f"connection closed after {len(out)} of {n} bytes")
        out += chunk
    return bytes(out)


def _recv_record(s: socket.socket) -> bytes:
    out = b""
    while True:
        (mark,) = struct.unpack(">I", _recv_exact(s, 4))
        out += _recv_exact(s, mark & 0x7FFF_FFFF)
        if mark & LAST_FRAG:
            return out


def _res(proc: Proc, reply: bytes) -> Any:
    return NFS3_PROCEDURES[proc].decode_res(Unpacker(reply[24:]))


def _tcp_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("nfsd-tcp-")]


async def _all_closed(server: NfsServer) -> None:
    """Until every connection's thread has ended and its task has let go of it."""
    while _tcp_threads() or server.buffer_stats()["connections"]:
        await trio.sleep(0.01)


@asynccontextmanager
async def serving(tmp_path: Path, export_dir: Path, **kw: Any) -> AsyncIterator[tuple[NfsServer, int, bytes]]:
    """A server, and the handle of an empty file `f` in its export."""
    (export_dir / "f").write_bytes(b"")
    async with trio.open_nursery() as n:
        server = NfsServer(ServerConfig(export=export_dir, port=0, mount_port=0, state_dir=tmp_path / "s", **kw))
        ports = await n.start(server.serve)
        fh = server.export.fh_for(str(export_dir / "f"), os.lstat(export_dir / "f"), server.export.root_ino)
        yield server, ports["nfs"], fh
        n.cancel_scope.cancel()


def _connect(port: int) -> socket.socket:
    s = socket.create_connection((H, port), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


async def test_hot_calls_over_tcp_are_answered_by_the_connection_thread(tmp_path: Path, export_dir: Path) -> None:
    """READ and UNSTABLE WRITE from the connection's service thread, the right bytes; a
    FILE_SYNC WRITE from the loop; the thread is gone with the connection."""
    cred = AuthSys().to_auth()
    data = os.urandom(200_000)
    async with serving(tmp_path, export_dir) as (server, port, fh):
        counted: list[int] = []

        def client() -> list[bytes]:
            with _connect(port) as s:
                out = []
                s.sendall(_rec(_call(1, Proc.GETATTR, FhArgs(fh), cred)))
                out.append(_recv_record(s))
                assert len(_tcp_threads()) == 1
                s.sendall(_rec(_call(2, Proc.WRITE, WriteArgs(fh, 0, 4, UNSTABLE, b"warm"), cred)))
                _recv_record(s)  # (the first: its handle is resolved, its fd opened, maybe by the loop)
                # A reply leaves before its call is counted (under the core lock): count under it.
                with server._core:
                    counted.append(server.stats.tcp_thread_calls)
                for i in range(4):
                    piece = data[i * 50_000 : (i + 1) * 50_000]
                    s.sendall(_rec(_call(10 + i, Proc.WRITE, WriteArgs(fh, i * 50_000, len(piece), UNSTABLE, piece),
                                         cred)))
                    out.append(_recv_record(s))
                s.sendall(_rec(_call(20, Proc.READ, ReadArgs(fh, 0, len(data)), cred)))
                out.append(_recv_record(s))
                s.sendall(_rec(_call(21, Proc.WRITE, WriteArgs(fh, 0, 5, FILE_SYNC, b"hello"), cred)))
                out.append(_recv_record(s))
                return out

        with trio.fail_after(20):
            replies = await trio.to_thread.run_sync(client)
            await _all_closed(server)
        assert _res(Proc.GETATTR, replies[0]).status == Stat.NFS3_OK
        assert [_res(Proc.WRITE, r).count for r in replies[1:5]] == [50_000] * 4
        assert bytes(_res(Proc.READ, replies[5]).data) == data
        assert _res(Proc.WRITE, replies[6]).committed == FILE_SYNC
        assert server.stats.tcp_thread_calls - counted[0] == 5  # the four UNSTABLE WRITEs and the READ
        assert server.budget.used == 0 and server.svc.stats.system_err == 0
    assert (export_dir / "f").read_bytes() == b"hello" + data[5:]


async def test_calls_that_need_no_waiting_are_answered_by_the_thread_and_counted_once(
        tmp_path: Path, export_dir: Path) -> None:
    """GETATTR, NULL and a call to a program the server lacks (its PROG_UNAVAIL) are answered by
    the connection's service thread; a COMMIT (an fsync) and a call whose header cannot be read
    (dropped) go the usual way, on the loop. Each call is counted once, wherever it ran."""
    cred = AuthSys().to_auth()
    async with serving(tmp_path, export_dir) as (server, port, fh):
        counted: list[int] = []

        def client() -> list[bytes]:
            with _connect(port) as s:
                out = []
                s.sendall(_rec(_call(1, Proc.GETATTR, FhArgs(fh), cred)))  # (the handle: resolved, cached)
                out.append(_recv_record(s))
                with server._core:
                    counted.append(server.stats.tcp_thread_calls)
                s.sendall(_rec(_call(2, Proc.GETATTR, FhArgs(fh), cred)))
                out.append(_recv_record(s))
                s.sendall(_rec(_call(3, Proc.NULL, None, cred)))
                out.append(_recv_record(s))
                s.sendall(_rec(bytes(encode_call(4, 100999, 1, 0, b"", cred))))
                out.append(_recv_record(s))
                s.sendall(_rec(_call(5, Proc.COMMIT, CommitArgs(fh, 0, 0), cred)))
                out.append(_recv_record(s))
                s.sendall(_rec(b"\0" * 8))  # (no reply: dropped)
                s.sendall(_rec(_call(6, Proc.GETATTR, FhArgs(fh), cred)))
                out.append(_recv_record(s))
                with server._core:
                    counted.append(server.stats.tcp_thread_calls)
                return out

        svc = server.svc.stats
        with trio.fail_after(20):
            replies = await trio.to_thread.run_sync(client)
            while not svc.dropped:  # (the garbage went to a task on the loop: maybe not run yet)
                await trio.sleep(0.01)
        assert [struct.unpack_from(">I", r)[0] for r in replies] == [1, 2, 3, 4, 5, 6]
        assert _res(Proc.GETATTR, replies[1]).status == Stat.NFS3_OK
        assert struct.unpack_from(">I", replies[3], 20)[0] == 1  # PROG_UNAVAIL
        assert _res(Proc.COMMIT, replies[4]).status == Stat.NFS3_OK
        assert counted[1] - counted[0] == 4  # GETATTR, NULL, PROG_UNAVAIL, GETATTR
        assert (svc.calls, svc.dropped, svc.prog_unavail) == (6, 1, 1)
        assert (svc.by_proc["NFS3.1"], svc.by_proc["NFS3.0"], svc.by_proc["NFS3.21"]) == (3, 1, 1)


async def test_a_record_split_across_reads_is_served(tmp_path: Path, export_dir: Path) -> None:
    """The thread reassembles records however the stream is cut: a mark in two pieces, a body
    in pieces small and big, two fragments, and two records in one send."""
    cred = AuthSys().to_auth()
    data = os.urandom(100_000)
    async with serving(tmp_path, export_dir) as (server, port, fh):
        def client() -> list[bytes]:
            with _connect(port) as s:
                out = []
                warm = _rec(_call(1, Proc.GETATTR, FhArgs(fh), cred))
                s.sendall(warm)
                out.append(_recv_record(s))
                rec = _rec(_call(2, Proc.WRITE, WriteArgs(fh, 0, len(data), UNSTABLE, data), cred))
                prev = 0
                for cut in (2, 4, 11, 3000, 20_000, 60_000, len(rec)):  # (2: inside the mark)
                    s.sendall(rec[prev:cut])
                    time.sleep(0.02)  # (each piece in a read of its own, most likely; any split is right)
                    prev = cut
                out.append(_recv_record(s))
                call = _call(3, Proc.READ, ReadArgs(fh, 0, len(data)), cred)
                s.sendall(struct.pack(">I", 50) + call[:50])  # two fragments: the first not the last
                time.sleep(0.02)
                s.sendall(_rec(call[50:]) + _rec(_call(4, Proc.READ, ReadArgs(fh, 7, 9), cred)))
                out.append(_recv_record(s))
                out.append(_recv_record(s))
                return out

        with trio.fail_after(20):
            replies = await trio.to_thread.run_sync(client)
        assert _res(Proc.WRITE, replies[1]).count == len(data)
        assert bytes(_res(Proc.READ, replies[2]).data) == data
        assert bytes(_res(Proc.READ, replies[3]).data) == data[7:16]
        assert server.budget.used == 0


@pytest.mark.parametrize("max_inflight", [1, 4])  # (1: they wait for a call slot; 4: for bytes)
async def test_records_over_the_budget_wait_and_oversized_ones_close(tmp_path: Path, export_dir: Path,
                                                                     max_inflight: int) -> None:
    """Records pipelined past a connection's share (bytes or calls) wait for it (the thread
    hands the wait to the loop) and are all served, the share never exceeded; a record bigger than max_record
    closes its connection (and its thread) before its body is read, and no other."""
    cred = AuthSys().to_auth()
    pieces = [os.urandom(60_000) for _ in range(6)]
    async with serving(tmp_path, export_dir, inflight_bytes=150_000, max_inflight=max_inflight,
                       max_record=256 * 1024) as (server, port, fh):
        def client() -> list[bytes]:
            with _connect(port) as s:
                s.sendall(_rec(_call(1, Proc.GETATTR, FhArgs(fh), cred)))
                _recv_record(s)
                # FILE_SYNC WRITEs (each waits for its fsync, in a task) all sent at once: 360 KB
                # against a share of 150 KB.
                s.sendall(b"".join(_rec(_call(10 + i, Proc.WRITE,
                                              WriteArgs(fh, i * 60_000, 60_000, FILE_SYNC, p), cred))
                                   for i, p in enumerate(pieces)))
                return [_recv_record(s) for _ in pieces]

        def oversized() -> bytes:
            with _connect(port) as s:
                s.sendall(struct.pack(">I", LAST_FRAG | (1 << 20)) + b"x" * 1000)
                return s.recv(100)  # b"": closed

        with trio.fail_after(20):
            replies = await trio.to_thread.run_sync(client)
            assert await trio.to_thread.run_sync(oversized) == b""
            await _all_closed(server)
        assert sorted(_res(Proc.WRITE, r).count for r in replies) == [60_000] * 6
        assert server.budget.high_water <= 150_000 + 4  # (a share's cap; the marks cost nothing)
        assert server.stats.oversized_records == 1
        assert server.budget.used == 0
    assert (export_dir / "f").read_bytes() == b"".join(pieces)


async def test_garbage_and_a_peer_gone_mid_record_cost_nothing(tmp_path: Path, export_dir: Path) -> None:
    """A record of garbage is answered (or dropped) and the connection goes on; a peer that
    closes in the middle of a record (in its mark, or its body) leaves no bytes charged and no
    thread behind; the server serves on."""
    cred = AuthSys().to_auth()
    async with serving(tmp_path, export_dir) as (server, port, fh):
        def client() -> bytes:
            for cut in (2, 4 + 30_000):  # in the mark; in a body
                with _connect(port) as s:
                    s.sendall((struct.pack(">I", LAST_FRAG | 70_000) + os.urandom(70_000))[:cut])
                    time.sleep(0.05)
            with _connect(port) as s:
                s.sendall(_rec(os.urandom(300)) + _rec(b"\0" * 3))  # garbage: no crash, no reply needed
                s.sendall(_rec(_call(5, Proc.READ, ReadArgs(fh, 0, 10), cred)))
                while True:
                    r = _recv_record(s)
                    if r[:4] == struct.pack(">I", 5):
                        return r

        with trio.fail_after(20):
            reply = await trio.to_thread.run_sync(client)
            await _all_closed(server)
        assert _res(Proc.READ, reply).status == Stat.NFS3_OK
        assert server.budget.used == 0 and server.buffer_stats()["connections"] == 0
        assert server.svc.stats.system_err == 0


async def test_no_thread_outlives_the_server(tmp_path: Path, export_dir: Path) -> None:
    """Stopping the server with connections open (idle, mid-record, waiting for a reply it
    is reading slowly) ends every connection's service thread."""
    cred = AuthSys().to_auth()
    before = set(threading.enumerate())
    (export_dir / "big").write_bytes(os.urandom(1 << 20))
    socks: list[socket.socket] = []
    async with serving(tmp_path, export_dir) as (server, port, fh):
        big = server.export.fh_for(str(export_dir / "big"), os.lstat(export_dir / "big"), server.export.root_ino)

        def open_them() -> None:
            for _ in range(2):
                socks.append(_connect(port))
            slow = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # (before connecting: a small window)
            slow.connect((H, port))
            socks.append(slow)
            socks[0].sendall(_rec(_call(1, Proc.GETATTR, FhArgs(fh), cred)))
            _recv_record(socks[0])  # idle after a call
            socks[1].sendall(struct.pack(">I", LAST_FRAG | 50_000) + b"y" * 20_000)  # mid-record
            socks[2].sendall(_rec(_call(2, Proc.READ, ReadArgs(big, 0, 1), cred)))
            _recv_record(socks[2])  # (its fd opened: the READs below are the thread's)
            for i in range(8):  # 8 MiB of READ replies it does not read: the server's sends fill up
                socks[2].sendall(_rec(_call(10 + i, Proc.READ, ReadArgs(big, 0, 1 << 20), cred)))

        with trio.fail_after(10):
            await trio.to_thread.run_sync(open_them)
            while len(_tcp_threads()) < 3:
                await trio.sleep(0.01)
            while not server.stats.tcp_thread_calls:  # (its reply only partly sent: the thread sends the rest)
                await trio.sleep(0.01)
            await trio.sleep(0.1)
    try:
        assert not _tcp_threads()
        assert not [t for t in set(threading.enumerate()) - before if t.name.startswith("nfsd-")]
        socks[1].settimeout(5)
        assert socks[1].recv(100) == b""  # closed by the server
    finally:
        for s in socks:
            s.close()


def _slow_reader(port: int) -> socket.socket:
    """A connection whose client reads slowly: a small receive window (set before connecting)."""
    slow = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.settimeout(10)
    slow.connect((H, port))
    return slow


def _wait_for(server: NfsServer, done: Callable[[], bool], what: str) -> None:
    """From a client thread: until `done()` holds, checked with the core lock held (10 s is a
    bound for a broken server, not a timing)."""
    deadline = time.monotonic() + 10
    while True:
        with server._core:
            if done():
                return
        assert time.monotonic() < deadline, what
        time.sleep(0.005)


async def test_big_reads_go_from_the_page_cache_and_see_the_file_as_it_is(
        tmp_path: Path, export_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """READs of 32 KiB and more are sent with sendfile from the page cache (nfs/sendfile.py):
    the right bytes, a write seen by the next READ, a file cut short seen as shorter (eof)."""
    sendfiles = []
    real_sendfile = os.sendfile

    def sendfile(out_fd: int, in_fd: int, offset: int, count: int) -> int:
        sendfiles.append(count)
        return real_sendfile(out_fd, in_fd, offset, count)

    monkeypatch.setattr(os, "sendfile", sendfile)
    cred = AuthSys().to_auth()
    data = bytearray(os.urandom(3 << 20))
    (export_dir / "big").write_bytes(data)
    async with serving(tmp_path, export_dir) as (server, port, _):
        big = server.export.fh_for(str(export_dir / "big"), os.lstat(export_dir / "big"), server.export.root_ino)

        def read(s: socket.socket, xid: int, offset: int, count: int) -> Any:
            s.sendall(_rec(_call(xid, Proc.READ, ReadArgs(big, offset, count), cred)))
            return _res(Proc.READ, _recv_record(s))

        def client() -> list[Any]:
            with _connect(port) as s:
                out = [read(s, 1, 0, 4096)]  # (the first: its handle resolved, its fd opened)
                out += [read(s, 2, 0, 1 << 20), read(s, 3, (1 << 20) + 5, 1 << 20)]
                wfd = os.open(export_dir / "big", os.O_WRONLY)
                try:
                    os.pwrite(wfd, b"new bytes", 100)
                finally:
                    os.close(wfd)
                out.append(read(s, 4, 0, 1 << 20))
                os.truncate(export_dir / "big", (1 << 20) + 300_000)
                out += [read(s, 5, 1 << 20, 1 << 20), read(s, 6, 2 << 20, 1 << 20)]
                return out

        with trio.fail_after(20):
            r = await trio.to_thread.run_sync(client)
            await _all_closed(server)
        assert all(x.status == Stat.NFS3_OK for x in r)
        assert bytes(r[1].data) == data[: 1 << 20] and not r[1].eof
        assert bytes(r[2].data) == data[(1 << 20) + 5 : (2 << 20) + 5]
        data[100:109] = b"new bytes"
        assert bytes(r[3].data) == data[: 1 << 20]
        assert bytes(r[4].data) == data[1 << 20 : (1 << 20) + 300_000] and r[4].eof
        assert r[5].count == 0 and r[5].eof
        assert sendfiles and max(sendfiles) == 1 << 20  # (the 4 KiB READ's went with its header)
        assert server.svc.stats.system_err == 0


async def test_a_file_cut_short_while_its_read_is_being_sent_ends_the_connection(
        tmp_path: Path, export_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A READ's reply waits half sent (the client reads slowly) while the file is truncated:
    the rest of its data is gone (sendfile finds the file's end), so the connection is closed
    mid-record (the client reconnects and asks again); the server serves on."""
    monkeypatch.setattr("nfs.server._SOCK_BUF", 64 * 1024)  # (a send buffer far smaller than the reply)
    cred = AuthSys().to_auth()
    (export_dir / "big").write_bytes(os.urandom(2 << 20))
    async with serving(tmp_path, export_dir) as (server, port, _):
        big = server.export.fh_for(str(export_dir / "big"), os.lstat(export_dir / "big"), server.export.root_ino)
        read = lambda xid, off: _rec(_call(xid, Proc.READ, ReadArgs(big, off, 1 << 20), cred))  # noqa: E731

        def client() -> tuple[str, Any]:
            with _connect(port) as s:
                s.sendall(read(1, 0))
                _recv_record(s)  # (the first: its handle resolved, its fd opened)
            with server._core:
                before = server.stats.tcp_thread_calls
            with _slow_reader(port) as slow:
                slow.sendall(read(2, 0))
                # (until the thread has answered it: the reply is half sent)
                _wait_for(server, lambda: server.stats.tcp_thread_calls > before, "the READ was not answered by the thread")
                os.truncate(export_dir / "big", 0)
                try:
                    _recv_record(slow)
                    outcome = "whole"
                except EOFError as e:
                    outcome = str(e)
            with _connect(port) as s:
                s.sendall(read(3, 0))
                return outcome, _res(Proc.READ, _recv_record(s))

        with trio.fail_after(30):
            outcome, after = await trio.to_thread.run_sync(client)
            await _all_closed(server)
        assert outcome.startswith("connection closed after"), outcome
        assert after.status == Stat.NFS3_OK and after.count == 0 and after.eof
        assert server.svc.stats.system_err == 0


async def test_a_read_half_sent_keeps_its_own_fd_while_the_cache_closes_its(
        tmp_path: Path, export_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A big READ's reply waits half sent (the client reads slowly) while other READs push its
    file out of the open-file cache (at most one fd): the rest still comes, the file's bytes,
    from the fd the reply holds of its own; once it has gone that fd is closed too (none is
    left open on the file), and the connection serves on."""
    monkeypatch.setattr("nfs.server._SOCK_BUF", 64 * 1024)  # (a send buffer far smaller than the reply)
    cred = AuthSys().to_auth()
    data = os.urandom(2 << 20)
    (export_dir / "big").write_bytes(data)
    (export_dir / "other").write_bytes(os.urandom(8192))
    async with serving(tmp_path, export_dir) as (server, port, _):
        server.export.max_open = 1
        fhs = {name: server.export.fh_for(str(export_dir / name), os.lstat(export_dir / name), server.export.root_ino)
               for name in ("big", "other")}

        def read(xid: int, name: str, count: int) -> bytes:
            return _rec(_call(xid, Proc.READ, ReadArgs(fhs[name], 0, count), cred))

        def client() -> tuple[Any, int, int]:
            with _connect(port) as s:
                s.sendall(read(1, "big", 4096))
                _recv_record(s)  # (the first: its handle resolved, its fd opened)
            with server._core:
                before = server.stats.tcp_thread_calls
            with _slow_reader(port) as slow:
                slow.sendall(read(2, "big", 1 << 20))
                # (until the thread has answered it: the reply is half sent)
                _wait_for(server, lambda: server.stats.tcp_thread_calls > before, "the READ was not answered by the thread")
                with _connect(port) as s:  # "other" takes the cache's one fd: big's is closed
                    s.sendall(read(3, "other", 8192))
                    _recv_record(s)
                with server._core:
                    cached = server.export.open_file(fhs["big"]) is not None
                held = fds_on(export_dir / "big")  # the half-sent reply's own
                res = _res(Proc.READ, _recv_record(slow))
                deadline = time.monotonic() + 10
                while fds_on(export_dir / "big") and time.monotonic() < deadline:
                    time.sleep(0.005)  # (the thread closes it once the rest has gone)
                slow.sendall(read(4, "other", 100))
                assert _res(Proc.READ, _recv_record(slow)).status == Stat.NFS3_OK
                return res, held + 10 * cached, fds_on(export_dir / "big")

        with trio.fail_after(30):
            res, held, left = await trio.to_thread.run_sync(client)
            await _all_closed(server)
        assert res.status == Stat.NFS3_OK and bytes(res.data) == data[: 1 << 20]
        assert held == 1  # not cached any more; the reply's own fd
        assert left == 0
        assert server.svc.stats.system_err == 0


async def test_a_file_the_disk_cannot_read_gets_an_error_not_endless_cuts(
        tmp_path: Path, export_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A big READ's file cannot be read (EIO, by sendfile and by pread) after its reply's header
    went: that connection is cut (the record cannot be finished), and the client's retry on a
    new one is answered NFS3ERR_IO, not cut again; once the disk reads again, so does READ."""
    cred = AuthSys().to_auth()
    data = os.urandom(2 << 20)
    (export_dir / "big").write_bytes(data)
    real_pread = os.pread

    def eio(*args: Any) -> Any:
        raise OSError(errno.EIO, "Input/output error")

    async with serving(tmp_path, export_dir) as (server, port, _):
        big = server.export.fh_for(str(export_dir / "big"), os.lstat(export_dir / "big"), server.export.root_ino)

        def read(s: socket.socket, xid: int) -> Any:
            s.sendall(_rec(_call(xid, Proc.READ, ReadArgs(big, 0, 1 << 20), cred)))
            return _res(Proc.READ, _recv_record(s))

        def client() -> tuple[str, Any, Any]:
            with _connect(port) as s:
                assert read(s, 1).status == Stat.NFS3_OK  # (its handle resolved, its fd opened)
            monkeypatch.setattr(os, "sendfile", eio)
            monkeypatch.setattr(os, "pread", eio)
            with _connect(port) as s:
                try:
                    first = f"whole: {read(s, 2).status}"
                except EOFError as e:
                    first = str(e)
            with _connect(port) as s:
                retry = read(s, 3)
            monkeypatch.setattr(os, "pread", real_pread)
            with _connect(port) as s:
                return first, retry, read(s, 4)

        with trio.fail_after(30):
            first, retry, healed = await trio.to_thread.run_sync(client)
            await _all_closed(server)
        assert first.startswith("connection closed after"), first
        assert retry.status == Stat.NFS3ERR_IO
        assert healed.status == Stat.NFS3_OK and bytes(healed.data) == data[: 1 << 20]
        assert server.svc.stats.system_err == 0


async def test_no_reply_is_sent_into_a_read_cut_short_by_a_truncation(
        tmp_path: Path, export_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A call handed to the loop waits while the thread sends a big READ (sendfile); the file
    is cut short under that READ (its record cut): the loop's reply must not go onto the
    connection after the cut record's bytes (the client would read it as the rest of the READ's
    data), the connection ends with the record cut."""
    monkeypatch.setattr("nfs.server._SOCK_BUF", 64 * 1024)  # (a send buffer far smaller than the reply)
    cred = AuthSys().to_auth()
    data = os.urandom(2 << 20)
    (export_dir / "big").write_bytes(data)
    (export_dir / "small").write_bytes(os.urandom(16384))
    async with serving(tmp_path, export_dir) as (server, port, _):
        big = server.export.fh_for(str(export_dir / "big"), os.lstat(export_dir / "big"), server.export.root_ino)
        small = server.export.fh_for(str(export_dir / "small"), os.lstat(export_dir / "small"),
                                     server.export.root_ino)

        def read(xid: int, fh: bytes, count: int) -> bytes:
            return _rec(_call(xid, Proc.READ, ReadArgs(fh, 0, count), cred))

        def client() -> bytes:
            with _connect(port) as s:
                s.sendall(read(1, big, 1 << 20))
                _recv_record(s)  # (the first: its handle resolved, its fd opened)
            with server._core:
                before = server.stats.tcp_thread_calls
            with _slow_reader(port) as slow:
                # One segment, so the thread takes both records at once: the first (a COMMIT,
                # which syncs: not the thread's) goes to the loop, whose reply must wait while the
                # thread sends the second's (a big READ, half sent).
                slow.sendall(_rec(_call(2, Proc.COMMIT, CommitArgs(small), cred)) + read(3, big, 1 << 20))
                # (the thread's READ answered, and the loop's COMMIT: its reply waits)
                _wait_for(server, lambda: server.stats.tcp_thread_calls > before
                          and bool(server.svc.stats.by_proc.get("NFS3.21")), "the calls were not answered")
                # The READ's last page is gone: its record is cut 4 KiB (or more) short of its end.
                os.truncate(export_dir / "big", (1 << 20) - 4096)
                got = bytearray()
                try:
                    while True:
                        chunk = slow.recv(1 << 16)
                        if not chunk:
                            break
                        got += chunk
                except ConnectionResetError:
                    pass
                return bytes(got)

        with trio.fail_after(30):
            got = await trio.to_thread.run_sync(client)
            await _all_closed(server)
        (mark,) = struct.unpack(">I", got[:4])
        size = mark & 0x7FFF_FFFF
        assert mark & LAST_FRAG and size > (1 << 20)
        assert struct.unpack(">I", got[4:8])[0] == 3  # (the big READ's reply went first)
        # Nothing after the cut: the bytes end short of the READ's record, and every data byte
        # that came is the file's (with the bug, the COMMIT's reply came in its last 4 KiB).
        assert len(got) < 4 + size, (len(got), size)
        head = 4 + size - (1 << 20)
        assert got[head:] == data[: len(got) - head]
        assert server.svc.stats.system_err == 0


def _held_up(monkeypatch: pytest.MonkeyPatch, target: str, real: Any) -> tuple[threading.Event, threading.Event]:
    """`target` (a worker thread's job: "module.function") held up until the test says so:
    (it is waiting, go on)."""
    waiting, go_on = threading.Event(), threading.Event()

    def held(*args: Any) -> None:
        waiting.set()
        go_on.wait(10)
        real(*args)

    monkeypatch.setattr(target, held)
    return waiting, go_on


def _read(sock: socket.socket, fh: bytes, count: int) -> None:
    sock.sendall(_rec(_call(1, Proc.READ, ReadArgs(fh, 0, count), AuthSys().to_auth())))
    assert _res(Proc.READ, _recv_record(sock)).status == Stat.NFS3_OK


async def test_a_file_removed_behind_the_servers_back_is_closed_by_the_laundrette(
        tmp_path: Path, export_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file the server has open (its fd cache), removed locally, not by an
    NFS REMOVE: the laundrette closes it within two of its rounds (knfsd's every 2 s; 0.1 s
    here), so its space comes back; a file still in use stays open. It closes in a worker
    thread, without the core lock: the last close of a big removed file frees its page cache
    and blocks (about 50 ms for 256 MiB on ext4), and calls are answered meanwhile (here while
    that close is held up; held on the loop with the lock, never)."""
    monkeypatch.setattr("nfs.server.LAUNDRETTE_DELAY", 0.1)
    closing, go_on = _held_up(monkeypatch, "nfs.server.close_fds", nfs.store.close_fds)
    gone, kept = export_dir / "gone", export_dir / "kept"
    gone.write_bytes(os.urandom(200_000))
    kept.write_bytes(os.urandom(1000))
    async with serving(tmp_path, export_dir) as (server, port, _):
        fhs = [server.export.fh_for(str(p), os.lstat(p), server.export.root_ino) for p in (gone, kept)]
        with _connect(port) as s:
            for fh, count in zip(fhs, (100_000, 1000)):
                await trio.to_thread.run_sync(_read, s, fh, count)
                await trio.to_thread.run_sync(_read, s, fh, count)  # (the second from the hot path)
            gone.unlink()
            assert fds_on(gone, removed_only=True) >= 1  # the cached fd
            with trio.fail_after(10):  # (bounds for a broken server, not timings)
                while not closing.is_set():
                    await trio.to_thread.run_sync(_read, s, fhs[1], 1000)  # kept in use meanwhile
                    await trio.sleep(0.02)
                await trio.to_thread.run_sync(_read, s, fhs[1], 1000)  # while the close is held
            go_on.set()
            with trio.fail_after(10):
                while fds_on(gone, removed_only=True):
                    await trio.to_thread.run_sync(_read, s, fhs[1], 1000)
                    await trio.sleep(0.02)
            # (On the event loop, which holds the core lock while it runs.)
            assert server.export.open_file(fhs[1]) is not None  # still cached: it was in use


@pytest.mark.parametrize("how", ["remove-cached", "remove", "rename-onto"])
async def test_freeing_a_big_file_does_not_hold_up_other_calls(
        tmp_path: Path, export_dir: Path, monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    """REMOVE of a big file, or a RENAME onto it: its last close (page cache and blocks freed,
    about 50 ms for 256 MiB on ext4) runs in a worker thread, so other calls are answered
    meanwhile (here, while that close is held up); the call answers once it is done, with the
    space free. Whether or not the server had the file open in its cache (else it holds the
    file over the unlink or rename)."""
    closing, go_on = _held_up(monkeypatch, "nfs.nfsd.close_fds", nfs.store.close_fds)
    cred = AuthSys().to_auth()
    big, kept = export_dir / "big", export_dir / "kept"
    big.write_bytes(os.urandom(nfs.store.SLOW_FREE))
    kept.write_bytes(os.urandom(1000))
    (export_dir / "new").write_bytes(b"the new big")
    async with serving(tmp_path, export_dir) as (server, port, _):
        ex = server.export
        root = ex.fh_for(str(export_dir), os.lstat(export_dir), ex.root_ino)
        fhs = [ex.fh_for(str(p), os.lstat(p), ex.root_ino) for p in (big, kept)]
        with _connect(port) as s, _connect(port) as s2:
            if how == "remove-cached":
                await trio.to_thread.run_sync(_read, s, fhs[0], 1000)
            await trio.to_thread.run_sync(_read, s2, fhs[1], 1000)
            assert (ex.open_file(fhs[0]) is not None) is (how == "remove-cached")
            args: object = DirOpArgs(root, "big")
            proc = Proc.REMOVE
            if how == "rename-onto":
                proc, args = Proc.RENAME, RenameArgs(DirOpArgs(root, "new"), DirOpArgs(root, "big"))
            s.sendall(_rec(_call(2, proc, args, cred)))
            with trio.fail_after(10):  # (bounds for a broken server, not timings)
                await trio.to_thread.run_sync(closing.wait, 10)
                await trio.to_thread.run_sync(_read, s2, fhs[1], 1000)  # while the close is held
            assert fds_on(big, removed_only=True) >= 1  # its last name gone, not freed yet
            go_on.set()
            with trio.fail_after(10):
                res = await trio.to_thread.run_sync(_recv_record, s)
            assert _res(proc, res).status == Stat.NFS3_OK
            assert fds_on(big, removed_only=True) == 0  # freed before the call answered
            if how == "rename-onto":
                assert big.read_bytes() == b"the new big" and not (export_dir / "new").exists()
            else:
                assert not big.exists()


@pytest.mark.parametrize("how", ["setattr", "create-unchecked"])
async def test_cutting_a_big_file_does_not_hold_up_other_calls(
        tmp_path: Path, export_dir: Path, monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    """SETATTR, or a CREATE UNCHECKED of an existing file, that cuts a big file frees its page
    cache and blocks, as a last close does: the truncate runs in a worker thread, so other calls
    are answered meanwhile (here while it is held up); the call answers once it is done, with
    the new size and mode both set."""
    cutting, go_on = _held_up(monkeypatch, "nfs.nfsd._truncate", os.ftruncate)
    big, kept = export_dir / "big", export_dir / "kept"
    big.write_bytes(os.urandom(nfs.store.SLOW_FREE + 5))
    kept.write_bytes(os.urandom(1000))
    async with serving(tmp_path, export_dir) as (server, port, _):
        ex = server.export
        root = ex.fh_for(str(export_dir), os.lstat(export_dir), ex.root_ino)
        fhs = [ex.fh_for(str(p), os.lstat(p), ex.root_ino) for p in (big, kept)]
        with _connect(port) as s, _connect(port) as s2:
            await trio.to_thread.run_sync(_read, s2, fhs[1], 1000)
            attrs = Sattr3(size=5, mode=0o600)
            args: object = SetattrArgs(fhs[0], attrs)
            proc = Proc.SETATTR
            if how == "create-unchecked":
                proc, args = Proc.CREATE, CreateArgs(DirOpArgs(root, "big"), CreateMode.UNCHECKED, attrs)
            s.sendall(_rec(_call(2, proc, args, AuthSys().to_auth())))
            with trio.fail_after(10):  # (bounds for a broken server, not timings)
                await trio.to_thread.run_sync(cutting.wait, 10)
                await trio.to_thread.run_sync(_read, s2, fhs[1], 1000)  # while the cut is held
            go_on.set()
            with trio.fail_after(10):
                res = await trio.to_thread.run_sync(_recv_record, s)
            assert _res(proc, res).status == Stat.NFS3_OK
            st = big.stat()
            assert st.st_size == 5 and st.st_mode & 0o7777 == 0o600
