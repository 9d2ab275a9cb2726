"""Calls answered by the reading task itself (svc.try_now, nfsd.call_nowait) give the replies the
task path gives, reply cache included; calls that must wait still get a task; write-behind starts
a file's writeback early and COMMIT still syncs."""

from __future__ import annotations

import ipaddress
import errno
import os
import socket
import threading
import time
from pathlib import Path

import pytest
import trio

from nfs import nfsd
from nfs.budget import ByteBudget
from nfs.client import NfsClient
from nfs.nfs3 import FILE_SYNC, NFS_PROGRAM, UNSTABLE, Proc, Stat
from nfs.nfs3xdr import NFS3_PROCEDURES, FhArgs, ReadArgs, WriteArgs
from nfs.nfsd import NfsProgram
from nfs.rpc import AUTH_NONE, AuthSys, OpaqueAuth, encode_call, reply_header
from nfs.sendfile import FileSlice
from nfs.server import NfsServer, ServerConfig
from nfs.store import Export, load_key
from nfs.svc import STREAM_MAX_REPLY, CallContext, Pending, RpcService
from nfs.writeback import WriteBehind
from nfs.xdr import Packer, Unpacker

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
            in_thread = server.stats.tcp_thread_calls
            assert await c.read(fh, 0, len(data)) == data
            assert (await c.getattr(fh)).size == len(data)
            assert server.stats.calls_now - before == 3  # each answered by the reading task
            if proto == "tcp":  # both by the connection's service thread
                assert server.stats.tcp_thread_calls - in_thread == 2
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


@pytest.mark.parametrize(("every", "proto"), [(1 << 20, "tcp"), (0, "tcp"), (1 << 20, "udp")])
async def test_write_behind_starts_writeback_and_commit_still_syncs(tmp_path: Path, export_dir: Path,
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   every: int, proto: str) -> None:
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
        ctor = NfsClient.tcp if proto == "tcp" else NfsClient.udp  # (over UDP: from a service thread)
        async with ctor(H, ports["nfs"], ports["mount"], hard=False, timeo=3.0) as c:
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


# -- the hot path (svc.try_fast + nfsd.call_fast): READ and UNSTABLE WRITE in one pass ----------


def _core(tmp_path: Path, export_dir: Path) -> tuple[RpcService, NfsProgram]:
    export = Export(export_dir, load_key(tmp_path / "state"))
    prog = NfsProgram(export, [ipaddress.ip_network("127.0.0.0/8")])
    return RpcService([prog]), prog


def _call(xid: int, proc: Proc, args: object, cred: OpaqueAuth) -> bytes:
    p = Packer()
    NFS3_PROCEDURES[proc].encode_args(p, args)
    return bytes(encode_call(xid, NFS_PROGRAM, 3, proc, b"".join(p.iov()), cred))  # type: ignore[arg-type]


async def test_a_duplicate_of_a_write_still_running_is_left_whole_for_the_usual_way(
        tmp_path: Path, export_dir: Path) -> None:
    """A retransmitted UNSTABLE WRITE while its original is still running (say, waiting for a
    walk of the export): `try_now` leaves it to `finish`, its arguments as they came, so the
    reply cache finds the original (UDP: the duplicate is dropped, the client retransmits)
    instead of a GARBAGE_ARGS for arguments already read."""
    (export_dir / "f").write_bytes(b"x" * 10)
    svc, prog = _core(tmp_path, export_dir)
    fh = prog.export.fh_for(str(export_dir / "f"), os.lstat(export_dir / "f"), prog.export.root_ino)
    msg = _call(9, Proc.WRITE, WriteArgs(fh, 0, 4, UNSTABLE, b"abcd"), AuthSys().to_auth())
    ctx = CallContext(H, 700, "udp", max_reply=65507)
    p = svc.begin(msg, ctx)
    assert isinstance(p, Pending)
    pos = p.args.pos
    key = svc.drc.key(9, H, NFS_PROGRAM, 3, Proc.WRITE, p.args.buf[pos:])
    svc._in_progress[key] = trio.Event()  # the original, running in finish()
    svc.drc.lookup(key)
    assert svc.try_now(p, ctx) is None
    assert p.args.pos == pos
    assert await svc.finish(p, ctx) is None  # dropped: the original's reply is still to come
    assert svc.stats.garbage_args == 0 and (export_dir / "f").read_bytes() == b"x" * 10


def _usual(svc: RpcService, msg: bytes, transport: str = "udp") -> bytes:
    ctx = CallContext(H, 700, transport, max_reply=65507 if transport == "udp" else STREAM_MAX_REPLY)
    p = svc.begin(msg, ctx)
    assert isinstance(p, Pending)
    reply = svc.try_now(p, ctx)
    assert reply is not None
    return b"".join(reply)


def _fast(svc: RpcService, msg: bytes | bytearray, transport: str = "udp") -> bytes | None:
    reply = svc.try_fast(msg, H, transport, 65507 if transport == "udp" else STREAM_MAX_REPLY)
    if reply is None:
        return None
    # (A big READ's data over TCP is a slice of the file, for sendfile: the bytes it names.)
    return b"".join(os.pread(b.fd, b.count, b.offset) if isinstance(b, FileSlice) else b for b in reply)


def _timeless(reply: bytes) -> tuple[object, ...]:
    """A WRITE reply with its times (which the next WRITE changes) left out, after its header."""
    u = Unpacker(reply[24:])  # (after the accepted reply header)
    r = NFS3_PROCEDURES[Proc.WRITE].decode_res(u)
    after = r.file_wcc.after
    return (reply[:24], len(reply), r.status, r.file_wcc.before and r.file_wcc.before.size,
            after and (after.type, after.mode, after.nlink, after.uid, after.gid, after.size, after.fileid,
                       after.fsid), r.count, r.committed, r.verf)


@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_the_hot_path_answers_read_and_write_as_the_usual_way(tmp_path: Path, export_dir: Path,
                                                                   transport: str) -> None:
    svc, prog = _core(tmp_path, export_dir)
    data = os.urandom(100_003)  # (not a multiple of 4: READ replies carry padding)
    (export_dir / "f").write_bytes(data)
    if os.geteuid() == 0:
        os.chown(export_dir / "f", 1000, 1000)
    fh = prog.export.fh_for(str(export_dir / "f"), os.lstat(export_dir / "f"), prog.export.root_ino)
    creds = [AuthSys(uid=1000, gid=1000).to_auth(), AuthSys(uid=0, gid=0, gids=(1, 2, 3)).to_auth(), AUTH_NONE]
    os.chmod(export_dir / "f", 0o666)
    reads = [(0, 4096), (1, 33), (99_000, 32768), (100_003, 10), (200_000, 5), (0, 0), (0, 1 << 20)]
    xid = 1
    for cred in creds:
        if cred.flavor or cred is creds[0]:  # a credential not seen yet, or the handle's first call
            assert _fast(svc, _call(xid, Proc.READ, ReadArgs(fh, 0, 8), cred), transport) is None
        _usual(svc, _call(xid, Proc.READ, ReadArgs(fh, 0, 8), cred), transport)  # (resolves it, opens its fd)
        for off, count in reads:
            xid += 1
            msg = _call(xid, Proc.READ, ReadArgs(fh, off, count), cred)
            fast = _fast(svc, msg, transport)
            assert fast is not None and fast == _usual(svc, msg, transport)
        # Over TCP a READ of 32 KiB or more names its data for sendfile; else it is read here.
        xid += 1
        raw = svc.try_fast(_call(xid, Proc.READ, ReadArgs(fh, 0, 1 << 20), cred), H, transport,
                           65507 if transport == "udp" else STREAM_MAX_REPLY)
        assert raw is not None and any(isinstance(b, FileSlice) for b in raw) == (transport == "tcp")
        for off, n in ((0, 4096), (5, 1), (100_000, 32768 if transport == "udp" else 1 << 20), (7, 0)):
            xid += 1
            write = WriteArgs(fh, off, n, UNSTABLE, os.urandom(n))
            xid += 1
            _usual(svc, _call(xid, Proc.WRITE, write, cred), transport)  # (the same size before the next two)
            xid += 1
            fast = _fast(svc, _call(xid, Proc.WRITE, write, cred), transport)
            assert fast is not None and fast[:24] == reply_header(xid)
            xid += 1
            usual = _usual(svc, _call(xid, Proc.WRITE, write, cred), transport)
            assert _timeless(fast)[1:] == _timeless(usual)[1:]
    assert svc.stats.by_proc["NFS3.6"] == 3 * (2 + 2 * len(reads)) and svc.stats.by_proc["NFS3.7"] == 3 * 12
    # A retransmitted WRITE gets the first reply from the reply cache, not a second execution;
    # a driver's `send` gets a reply that ran before it is cached, and is not given a cached one.
    msg = _call(9999, Proc.WRITE, WriteArgs(fh, 0, 4, UNSTABLE, b"once"), creds[0])
    sent: list[bytes] = []
    first = svc.try_fast(msg, H, transport, 65507, lambda r: sent.append(b"".join(r)))
    assert first is not None and sent == [b"".join(first)]
    (export_dir / "f").write_bytes(b"changed")
    assert _fast(svc, msg, transport) == sent[0] and (export_dir / "f").read_bytes() == b"changed"
    assert svc.try_fast(msg, H, transport, 65507, lambda r: sent.append(b"")) is not None and len(sent) == 1


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_a_read_the_disk_fails_gets_the_usual_ways_error(tmp_path: Path, export_dir: Path, transport: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A READ whose pread fails (EIO from the disk) is answered NFS3ERR_IO on the hot path, as
    the usual way answers it, not SYSTEM_ERR."""
    svc, prog = _core(tmp_path, export_dir)
    (export_dir / "f").write_bytes(os.urandom(10_000))
    fh = prog.export.fh_for(str(export_dir / "f"), os.lstat(export_dir / "f"), prog.export.root_ino)
    cred = AuthSys(uid=0, gid=0).to_auth()
    _usual(svc, _call(1, Proc.READ, ReadArgs(fh, 0, 8), cred), transport)  # (resolves it, opens its fd)

    def failing(fd: int, n: int, offset: int) -> bytes:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "pread", failing)
    msg = _call(2, Proc.READ, ReadArgs(fh, 0, 4096), cred)
    fast = _fast(svc, msg, transport)
    assert fast is not None and fast == _usual(svc, msg, transport)
    assert NFS3_PROCEDURES[Proc.READ].decode_res(Unpacker(fast[24:])).status == Stat.NFS3ERR_IO
    assert svc.stats.system_err == 0


async def test_the_hot_path_leaves_everything_else_to_the_usual_way(tmp_path: Path, export_dir: Path) -> None:
    svc, prog = _core(tmp_path, export_dir)
    (export_dir / "f").write_bytes(b"x" * 8192)
    fh = prog.export.fh_for(str(export_dir / "f"), os.lstat(export_dir / "f"), prog.export.root_ino)
    cred = AuthSys(uid=1000, gid=1000).to_auth()
    _usual(svc, _call(1, Proc.READ, ReadArgs(fh, 0, 8), cred))
    read = _call(2, Proc.READ, ReadArgs(fh, 0, 8), cred)
    assert _fast(svc, read) is not None
    calls = svc.stats.calls
    declined = [
        _call(3, Proc.WRITE, WriteArgs(fh, 0, 4, FILE_SYNC, b"sync"), cred),  # must sync: a task
        _call(4, Proc.GETATTR, FhArgs(fh), cred),  # not a hot call
        _call(5, Proc.READ, ReadArgs(fh[:-1] + bytes([fh[-1] ^ 1]), 0, 8), cred),  # forged
        _call(6, Proc.READ, ReadArgs(prog.export.make_fh(os.lstat(export_dir).st_ino + 99, 2), 0, 8), cred),
        _call(7, Proc.READ, ReadArgs(fh, 0, 8), AuthSys(uid=1000, gid=1000, machinename="new").to_auth()),
        read[:-4], read[:30], b"", bytes(read[:4]) + b"\0\0\0\1" + read[8:],  # truncated; a reply
        bytes(encode_call(8, NFS_PROGRAM, 2, Proc.READ, read[-56:], cred)),  # NFSv2
        read[:24] + b"\0\0\0\3" + read[28:],  # another credential flavor
        (w := _call(9, Proc.WRITE, WriteArgs(fh, 0, 8, UNSTABLE, b"12345678"), cred))[:-4],  # data cut short
        w[:-16] + b"\0\0\0\x09" + w[-12:],  # count above the data's length
    ]
    for msg in declined:
        assert _fast(svc, msg) is None, msg[:12]
    assert svc.stats.calls == calls  # nothing was counted, run or cached
    assert len(svc.drc) == 0 and (export_dir / "f").read_bytes() == b"x" * 8192
    # A caller the mode bits refuse: the usual way answers ACCES.
    os.chmod(export_dir / "f", 0o600)
    if os.geteuid() == 0:
        other = AuthSys(uid=1001, gid=1001).to_auth()
        assert _fast(svc, _call(10, Proc.READ, ReadArgs(fh, 0, 8), other)) is None
        assert _fast(svc, _call(11, Proc.WRITE, WriteArgs(fh, 0, 1, UNSTABLE, b"!"), other)) is None
    # A removed file: its fd is still open, but it has no link left: STALE the usual way.
    os.unlink(export_dir / "f")
    assert _fast(svc, read) is None
    ctx = CallContext(H, 700, "udp", max_reply=65507)
    p = svc.begin(read, ctx)
    assert isinstance(p, Pending)
    reply = await svc.finish(p, ctx)
    assert reply is not None
    res = NFS3_PROCEDURES[Proc.READ].decode_res(Unpacker(b"".join(reply)[24:]))
    assert res.status == Stat.NFS3ERR_STALE


def test_a_share_starts_a_call_without_waiting_only_within_its_limits() -> None:
    budget = ByteBudget(limit=10_000, reserve=100, max_shares=4)
    share = budget.share(cap=5000, max_calls=2)
    assert share.try_start_call(4000) and share.calls == 1 and share.held == 4000
    assert not share.try_start_call(2000)  # past its cap: nothing charged
    assert share.calls == 1 and share.held == 4000
    assert share.try_start_call(100)
    assert not share.try_start_call(1)  # two calls running already
    share.end_call(4000)
    share.end_call(100)
    assert (share.calls, share.held, budget.used) == (0, 0, 0)


async def test_udp_service_threads_and_the_event_loop_share_the_core(tmp_path: Path, export_dir: Path) -> None:
    """UDP clients (answered by the socket's service thread, or by the loop when it is busy)
    and TCP clients (the loop) at once, on the same files: every byte lands, every read is
    right, and the threads are gone once the server is."""
    async with trio.open_nursery() as n:
        server = NfsServer(ServerConfig(export=export_dir, port=0, mount_port=0, state_dir=tmp_path / "s"))
        ports = await n.start(server.serve)
        assert sum(t.name.startswith("nfsd-udp-") for t in threading.enumerate()) == 2  # NFS, MOUNT

        async def worker(proto: str, i: int) -> None:
            ctor = NfsClient.tcp if proto == "tcp" else NfsClient.udp
            async with ctor(H, ports["nfs"], ports["mount"], hard=False, timeo=5.0) as c:
                root = await c.mount(str(export_dir))
                fh, _ = await c.create(root, f"{proto}{i}")
                data = os.urandom(300_000)
                for off in range(0, len(data), 20_000):
                    await c.write(fh, off, data[off : off + 20_000], UNSTABLE)
                    assert (await c.getattr(fh)).size >= off  # (not a hot call: the usual decoding)
                await c.commit(fh)
                assert await c.read(fh, 0, len(data)) == data
                assert (export_dir / f"{proto}{i}").read_bytes() == data

        with trio.fail_after(30):
            async with trio.open_nursery() as w:
                for i in range(3):
                    w.start_soon(worker, "udp", i)
                    w.start_soon(worker, "tcp", i)
        assert server.svc.stats.system_err == 0
        n.cancel_scope.cancel()
    assert not [t for t in threading.enumerate() if t.name.startswith("nfsd-udp-")]


async def test_hot_calls_over_udp_are_answered_by_the_service_thread(tmp_path: Path, export_dir: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """With the event loop idle (the client is another thread), READs and UNSTABLE WRITEs are
    answered by the socket's service thread, the right bytes; the writeback a WRITE there
    starts is started by the loop, in a worker thread."""
    started: list[int] = []
    real_start = nfsd.start_writeback

    def start(fd: int) -> None:
        real_start(fd)
        started.append(threading.get_ident())

    monkeypatch.setattr(nfsd, "start_writeback", start)
    (export_dir / "f").write_bytes(b"")
    async with trio.open_nursery() as n:
        server = NfsServer(ServerConfig(export=export_dir, port=0, mount_port=0, state_dir=tmp_path / "s",
                                        write_behind=4 + 4 * 32768))  # (started by the 4th WRITE below)
        ports = await n.start(server.serve)
        async with NfsClient.udp(H, ports["nfs"], ports["mount"], hard=False, timeo=3.0) as c:
            fh, _ = await c.lookup(await c.mount(str(export_dir)), "f")
            await c.write(fh, 0, b"warm", UNSTABLE)  # (the first: its handle is resolved, its fd opened)
        cred = AuthSys().to_auth()
        data = os.urandom(32768)

        counted: list[int] = []

        def client() -> list[bytes]:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.settimeout(5)
            s.connect((H, ports["nfs"]))
            s.send(_call(99, Proc.READ, ReadArgs(fh, 0, 4), cred))  # (its credential is new: the loop's)
            s.recv(65536)
            for _ in range(500):  # until the loop waits for I/O (then it has let go of the core lock)
                if not server._core.locked():
                    break
                time.sleep(0.01)
            counted.append(server.stats.udp_thread_calls)
            out = []
            for i in range(4):
                s.send(_call(100 + i, Proc.WRITE, WriteArgs(fh, i * 32768, 32768, UNSTABLE, data), cred))
                out.append(s.recv(65536))
            s.send(_call(200, Proc.READ, ReadArgs(fh, 32768, 32768), cred))
            out.append(s.recv(65536))
            s.close()
            return out

        replies = await trio.to_thread.run_sync(client)
        # (the loop sleeps until the 4th WRITE hands it the writeback to start: the READ may
        # then find it awake, and be handed to it)
        assert server.stats.udp_thread_calls - counted[0] >= 4
        assert [NFS3_PROCEDURES[Proc.WRITE].decode_res(Unpacker(r[24:])).count for r in replies[:4]] == [32768] * 4
        assert bytes(NFS3_PROCEDURES[Proc.READ].decode_res(Unpacker(replies[4][24:])).data) == data
        with trio.fail_after(5):
            while not started:
                await trio.sleep(0.01)
        n.cancel_scope.cancel()
    assert (export_dir / "f").read_bytes() == data * 4
    assert threading.get_ident() not in started  # (in a worker thread, not the loop's)
