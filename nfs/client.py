"""The NFS client: a thin trio driver (`RpcClient`) around the sans-IO core (nfs/xprt.py), and
the NFSv3 + MOUNT calls the emulated host swaps with (`NfsClient`).

Usage over plain sockets::

    async with NfsClient.tcp("127.0.0.1", nfs_port, mount_port) as nfs:
        root = await nfs.mount("/srv/export")
        fh, _ = await nfs.create(root, "swapfile", how=CreateMode.UNCHECKED)
        await nfs.write(fh, 0, page, stable=FILE_SYNC)

Over any other transport, pass connect factories: `NfsClient(connect, mount_connect=...)`, where
each factory returns a new `trio.abc.Stream` (TCP, record marking) or `DatagramTransport` (UDP).

Concurrency: any number of tasks may call at once; the slot table bounds the requests in flight
and one reader task per connection hands each reply to its caller by xid. The reader task of a
(re)connection is started from the task whose call needed it, so it inherits that task's
context (the host's PF_MEMALLOC task for swap I/O).
"""

from __future__ import annotations

import functools
import logging
import socket as pysocket
from collections.abc import Callable, Iterator
from types import TracebackType
from dataclasses import dataclass
from typing import TypeVar

import trio

from nfs.mount import MOUNT_PROGRAM, MOUNT_V3, MountProc, decode_exports, decode_mnt_res, encode_mnt_args
from nfs.nfs3 import (
    NFS_PROGRAM, NFS_V3, CreateMode, Fattr3, FsInfo, FsStat, Nfs3Error, Proc, ReadRes, Sattr3, Stat, StableHow,
    WccData, decode_read_res, decode_write_res, encode_read_args, encode_write_args_head, pack_diropargs, pack_fh,
    unpack_fh, unpack_post_op_attr,
)
from nfs.record import DEFAULT_MAX_RECORD, RecordDecoder, RecordTooLarge, record_mark
from nfs.rpc import AuthSys, OpaqueAuth
from nfs.transport import ConnectFactory, NullBuffers, RequestBuffers, is_stream, tcp_connect, udp_connect
from nfs.write import DEFAULT_MAX_UNCOMMITTED, CommitList
from nfs.xprt import RetransmitPolicy, RpcTimeout, Rqst, SlotTable, XprtCore
from nfs.xdr import Packer, Unpacker

log = logging.getLogger("netswap.nfs.client")

T = TypeVar("T")

UDP_MAX_IO = 32 * 1024
UDP_MAX_CALL = 65507  # the largest UDP payload over IPv4
TCP_MAX_IO = 1024 * 1024


class _Conn:
    def __init__(self, transport: object, stream: bool, gen: int) -> None:
        self.transport = transport
        self.stream = stream
        self.gen = gen
        self.dead = False
        self.send_lock = trio.StrictFIFOLock()

    async def send(self, msg: bytes | bytearray) -> None:
        if self.stream:
            async with self.send_lock:
                await self.transport.send_all(record_mark(len(msg)) + msg)  # type: ignore[attr-defined]
        else:
            await self.transport.send(msg)  # type: ignore[attr-defined]


class RpcClient:
    """ONC RPC over a reconnectable transport, many calls in flight."""

    def __init__(self, connect: ConnectFactory, *,
                 policy: RetransmitPolicy | Callable[[str], RetransmitPolicy] | None = None, proto: str | None = None,
                 slots: int = 16, buffers: RequestBuffers | None = None, cred: OpaqueAuth | None = None,
                 max_record: int = DEFAULT_MAX_RECORD) -> None:
        self._connect = connect
        self.proto = proto  # "tcp" / "udp"; learned at the first connect when None
        # A policy, or a function of the protocol ("tcp"/"udp") learned at the first connect.
        self._policy_for = policy if callable(policy) else None
        fixed = policy if isinstance(policy, RetransmitPolicy) else None
        if fixed is None and proto is not None:
            fixed = self._policy_for(proto) if self._policy_for else self._default_policy(proto)
        self._policy_fixed = fixed is not None
        self.core = XprtCore(fixed or RetransmitPolicy.tcp(), cred or AuthSys().to_auth())
        self.slots = SlotTable(slots)
        self.buffers = buffers or NullBuffers()
        self.max_record = max_record
        self._events: dict[int, trio.Event] = {}
        self._conn: _Conn | None = None
        self._gen = 0
        self._connect_wanted = trio.Event()
        self._connect_done = trio.Event()
        self._connect_error: Exception | None = None
        self._nursery: trio.Nursery | None = None
        self._nursery_cm: object = None
        self.closed = False

    @staticmethod
    def _default_policy(proto: str) -> RetransmitPolicy:
        return RetransmitPolicy.udp() if proto == "udp" else RetransmitPolicy.tcp()

    # -- lifetime --------------------------------------------------------------------------

    async def __aenter__(self) -> RpcClient:
        cm = trio.open_nursery()
        self._nursery = await cm.__aenter__()
        self._nursery_cm = cm
        # Connections are made, and their reader tasks started, by this worker: it (and so they)
        # run in the context of the task that entered the client, like Linux's xprtiod/rpciod,
        # whatever task's call happened to need a new connection.
        self._nursery.start_soon(self._connector)
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> bool | None:
        await self.aclose()
        cm, self._nursery_cm = self._nursery_cm, None
        assert self._nursery is not None
        self._nursery.cancel_scope.cancel()
        # The body's own exception propagates as itself (not wrapped in an ExceptionGroup): the
        # reader tasks catch their errors, so the nursery has nothing of its own to raise.
        await cm.__aexit__(None, None, None)  # type: ignore[attr-defined]
        return None

    async def aclose(self) -> None:
        self.closed = True
        self._connect_done.set()  # callers waiting for a connection find the client closed
        if self._conn is not None:
            await self._kill(self._conn)

    # -- connections -----------------------------------------------------------------------

    async def _get_conn(self) -> _Conn:
        c = self._conn
        if c is not None and not c.dead:
            return c
        if self.closed:
            raise trio.ClosedResourceError("RPC client closed")
        if self._nursery is None:
            raise RuntimeError("use `async with` on the client before calling")
        done = self._connect_done
        self._connect_wanted.set()
        await done.wait()  # one attempt serves every caller waiting for it
        c = self._conn
        if c is not None and not c.dead:
            return c
        if self.closed:
            raise trio.ClosedResourceError("RPC client closed")
        raise self._connect_error or OSError("connect failed")

    async def _connector(self) -> None:
        while True:
            await self._connect_wanted.wait()
            self._connect_wanted = trio.Event()
            c = self._conn
            if c is None or c.dead:
                try:
                    with trio.fail_after(max(self.core.policy.timeo, 1.0)):
                        transport = await self._connect()
                except trio.TooSlowError:
                    self._connect_error = TimeoutError("connect timed out")
                except Exception as e:  # handed to the callers waiting for this attempt
                    self._connect_error = e
                else:
                    self._connect_error = None
                    self._attach(transport)
            done, self._connect_done = self._connect_done, trio.Event()
            done.set()

    def _attach(self, transport: object) -> None:
        assert self._nursery is not None
        stream = is_stream(transport)
        if self.proto is None:
            self.proto = "tcp" if stream else "udp"
            if not self._policy_fixed:
                self.core.policy = (self._policy_for or self._default_policy)(self.proto)
                self._policy_fixed = True
        self._gen += 1
        if self._gen > 1:
            self.core.stats.reconnects += 1
        c = _Conn(transport, stream, self._gen)
        self._conn = c
        self._nursery.start_soon(self._reader, c)

    async def _kill(self, c: _Conn) -> None:
        if c.dead:
            return
        c.dead = True
        # Wake every caller: those whose reply has not come will resend on a new connection.
        for ev in list(self._events.values()):
            ev.set()
        with trio.CancelScope(shield=True):
            try:
                await c.transport.aclose()  # type: ignore[attr-defined]
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    def _deliver(self, msg: bytes | bytearray | memoryview) -> None:
        rq = self.core.receive(msg)
        if rq is not None:
            ev = self._events.get(rq.xid)
            if ev is not None:
                ev.set()

    async def _reader(self, c: _Conn) -> None:
        try:
            if c.stream:
                dec = RecordDecoder(self.max_record)
                stream = c.transport
                while True:
                    data = await stream.receive_some(256 * 1024)  # type: ignore[attr-defined]
                    if not data:
                        break
                    dec.feed(data)
                    while (rec := dec.next_record()) is not None:
                        self._deliver(rec)
            else:
                while True:
                    self._deliver(await c.transport.recv())  # type: ignore[attr-defined]
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, RecordTooLarge) as e:
            log.debug("connection %d lost: %r", c.gen, e)
        finally:
            await self._kill(c)

    # -- calls -----------------------------------------------------------------------------

    async def call(self, prog: int, vers: int, proc: int, args: bytes | bytearray | memoryview = b"",
                   decode: Callable[[Unpacker], T] | None = None) -> T:
        """Send a call and wait for its reply; `decode` turns the result body into the return
        value while the request's buffers are still held. Raises RpcError (the server refused),
        RpcTimeout (soft, no reply), Nfs3Error/MountError (from `decode`), OSError (soft, cannot
        connect)."""
        await self._get_slot()
        try:
            return await self._call(prog, vers, proc, args, decode)
        finally:
            self._put_slot()

    async def _get_slot(self) -> None:
        """A slot of the table, waiting in its backlog (FIFO) when all are in use."""
        ev = trio.Event()
        if self.slots.reserve(ev):
            return
        try:
            await ev.wait()
        except BaseException:
            if self.slots.cancel(ev):  # handed a slot while being cancelled: pass it on
                self._put_slot()
            raise

    def _put_slot(self) -> None:
        nxt = self.slots.put()
        if nxt is not None:
            nxt.set()  # type: ignore[attr-defined]

    async def _call(self, prog: int, vers: int, proc: int, args: bytes | bytearray | memoryview,
                    decode: Callable[[Unpacker], T] | None) -> T:
        rq: Rqst = self.core.start(prog, vers, proc, args)
        token = await self.buffers.alloc(len(rq.message) + 4)
        losses = 0
        try:
            while True:
                try:
                    c = await self._get_conn()
                except OSError as e:
                    log.debug("connect failed: %s", e)
                    await trio.sleep(min(rq.timeout, 5.0))
                    if not self.core.timed_out(rq):
                        raise OSError(f"cannot connect: {e}") from e
                    continue
                if not c.stream and len(rq.message) > UDP_MAX_CALL:
                    raise ValueError(f"a {len(rq.message)}-byte call does not fit in a UDP datagram")
                ev = trio.Event()
                self._events[rq.xid] = ev
                try:
                    await c.send(rq.message)
                except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as e:
                    log.debug("send failed: %r", e)
                    await self._kill(c)
                    losses += 1
                    await trio.sleep(min(0.01 * 2**losses, 2.0))
                    continue
                self.core.transmitted(rq)
                with trio.move_on_after(rq.timeout):
                    await ev.wait()
                if rq.done:
                    break
                if ev.is_set():  # the connection went away: resend on a new one
                    losses += 1
                    if losses > 1:
                        await trio.sleep(min(0.01 * 2**losses, 2.0))
                    continue
                if not self.core.timed_out(rq):
                    break
                log.info("xid %#x: no reply in time, retransmitting (timeout now %.1fs)", rq.xid, rq.timeout)
                if c.stream:  # TCP delivers or breaks: a silent server means a new connection
                    await self._kill(c)
            if rq.error is not None:
                raise rq.error
            assert rq.reply is not None
            return decode(rq.reply) if decode is not None else rq.reply  # type: ignore[return-value]
        finally:
            self._events.pop(rq.xid, None)
            self.core.finish(rq)
            self.buffers.free(token)


# -- NFSv3 ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WriteResult:
    """What a WRITE did: `count` bytes, `committed` (StableHow), the server's `verifier`. Also
    unpacks as the tuple (count, committed, verifier). (Not a NamedTuple: its field `count`
    would shadow tuple.count.)"""

    count: int
    committed: int  # StableHow
    verifier: bytes

    def __iter__(self) -> Iterator[int | bytes]:
        return iter((self.count, self.committed, self.verifier))

    def __len__(self) -> int:
        return 3

    def __getitem__(self, i: int) -> int | bytes:
        return (self.count, self.committed, self.verifier)[i]


def _status(u: Unpacker, what: str) -> None:
    status = u.u32()
    if status != Stat.NFS3_OK:
        raise Nfs3Error(status, what)


class NfsClient:
    """NFSv3 client. `connect` makes the NFS transport; `mount_connect` the MOUNT one (defaults to
    `connect`, which works with servers that answer MOUNT on the NFS port, like netswap's)."""

    def __init__(self, connect: ConnectFactory, *, mount_connect: ConnectFactory | None = None,
                 proto: str | None = None, timeo: float | None = None, retrans: int | None = None,
                 timeo_max: float = 60.0, hard: bool = True, slots: int = 16,
                 buffers: RequestBuffers | None = None, cred: AuthSys | None = None,
                 rsize: int | None = None, wsize: int | None = None,
                 max_uncommitted: int = DEFAULT_MAX_UNCOMMITTED) -> None:
        self._connect = connect
        self._mount_connect = mount_connect or connect
        self.proto = proto
        self.cred = cred or AuthSys(machinename=pysocket.gethostname()[:255])
        self._timeo, self._retrans, self._timeo_max, self._hard = timeo, retrans, timeo_max, hard
        self.rpc = RpcClient(connect, policy=self._policy, proto=proto, slots=slots, buffers=buffers,
                             cred=self.cred.to_auth())
        self.commits = CommitList(max_bytes=max_uncommitted)
        self._unstable_inflight = 0  # bytes of UNSTABLE writes sent, not yet answered
        self.forced_commits = 0  # COMMITs sent to make room under max_uncommitted
        self.forced_sync_writes = 0  # UNSTABLE writes sent FILE_SYNC because they would not fit
        self.root: bytes | None = None
        self.export: str | None = None
        self.fsinfo_res: FsInfo | None = None
        self._rsize_opt, self._wsize_opt = rsize, wsize
        self.rsize = rsize or UDP_MAX_IO
        self.wsize = wsize or UDP_MAX_IO

    def _policy(self, proto: str) -> RetransmitPolicy:
        base = RetransmitPolicy.udp() if proto == "udp" else RetransmitPolicy.tcp()
        return RetransmitPolicy(self._timeo if self._timeo is not None else base.timeo,
                                self._retrans if self._retrans is not None else base.retrans,
                                max(self._timeo_max, self._timeo or 0), self._hard)

    @classmethod
    def tcp(cls, host: str, port: int, mount_port: int | None = None, **kw: object) -> NfsClient:
        mc = functools.partial(tcp_connect, host, mount_port) if mount_port else None
        return cls(functools.partial(tcp_connect, host, port), mount_connect=mc, proto="tcp", **kw)  # type: ignore[arg-type]

    @classmethod
    def udp(cls, host: str, port: int, mount_port: int | None = None, **kw: object) -> NfsClient:
        mc = functools.partial(udp_connect, host, mount_port) if mount_port else None
        return cls(functools.partial(udp_connect, host, port), mount_connect=mc, proto="udp", **kw)  # type: ignore[arg-type]

    async def __aenter__(self) -> NfsClient:
        await self.rpc.__aenter__()
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> bool | None:
        return await self.rpc.__aexit__(et, e, tb)

    @property
    def stats(self) -> dict[str, int]:
        s = self.rpc.core.stats
        return {"calls": s.calls, "transmissions": s.transmissions, "retransmissions": s.retransmissions,
                "major_timeouts": s.major_timeouts, "bad_xids": s.bad_xids, "reconnects": s.reconnects,
                "slots_high_water": self.rpc.slots.high_water, "commit_resends": self.commits.resends,
                "uncommitted_bytes": self.commits.held, "forced_commits": self.forced_commits,
                "forced_sync_writes": self.forced_sync_writes}

    async def _nfs(self, proc: int, args: bytes | bytearray | memoryview, decode: Callable[[Unpacker], T]) -> T:
        return await self.rpc.call(NFS_PROGRAM, NFS_V3, proc, args, decode)

    # -- MOUNT -----------------------------------------------------------------------------

    async def _mount_call(self, proc: int, args: bytes, decode: Callable[[Unpacker], T]) -> T:
        proto = self.rpc.proto or self.proto
        async with RpcClient(self._mount_connect, policy=self._policy, proto=proto, slots=1,
                             cred=self.cred.to_auth()) as m:
            return await m.call(MOUNT_PROGRAM, MOUNT_V3, proc, args, decode)

    async def mount(self, export: str) -> bytes:
        """MNT the export, then FSINFO on its root (sets rsize/wsize). Returns the root handle."""
        fh, _ = await self._mount_call(MountProc.MNT, encode_mnt_args(export), lambda u: decode_mnt_res(u, export))
        self.root, self.export = fh, export
        info = await self.fsinfo(fh)
        self.fsinfo_res = info
        cap = UDP_MAX_IO if self.rpc.proto == "udp" else TCP_MAX_IO
        self.rsize = min(self._rsize_opt or cap, info.rtmax or cap, cap)
        self.wsize = min(self._wsize_opt or cap, info.wtmax or cap, cap)
        return fh

    async def umount(self) -> None:
        if self.export is not None:
            await self._mount_call(MountProc.UMNT, encode_mnt_args(self.export), lambda u: None)
            self.export = None

    async def exports(self) -> list[tuple[str, list[str]]]:
        return await self._mount_call(MountProc.EXPORT, b"", decode_exports)

    # -- NFSv3 procedures ------------------------------------------------------------------

    async def null(self) -> None:
        await self._nfs(Proc.NULL, b"", lambda u: None)

    async def getattr(self, fh: bytes) -> Fattr3:
        p = Packer()
        pack_fh(p, fh)

        def dec(u: Unpacker) -> Fattr3:
            _status(u, "GETATTR")
            return Fattr3.unpack(u)

        return await self._nfs(Proc.GETATTR, p.buf, dec)

    async def setattr(self, fh: bytes, size: int | None = None, mode: int | None = None, uid: int | None = None,
                      gid: int | None = None, atime: object = None, mtime: object = None) -> Fattr3 | None:
        p = Packer()
        pack_fh(p, fh)
        Sattr3(mode, uid, gid, size, atime, mtime).pack(p)  # type: ignore[arg-type]
        p.bool(False)  # no guard

        def dec(u: Unpacker) -> Fattr3 | None:
            status = u.u32()
            wcc = WccData.unpack(u)
            if status != Stat.NFS3_OK:
                raise Nfs3Error(status, "SETATTR")
            return wcc.after

        return await self._nfs(Proc.SETATTR, p.buf, dec)

    async def lookup(self, dir_fh: bytes, name: str) -> tuple[bytes, Fattr3 | None]:
        p = Packer()
        pack_diropargs(p, dir_fh, name)

        def dec(u: Unpacker) -> tuple[bytes, Fattr3 | None]:
            status = u.u32()
            if status != Stat.NFS3_OK:
                raise Nfs3Error(status, f"LOOKUP {name}")
            fh = unpack_fh(u)
            return fh, unpack_post_op_attr(u)

        return await self._nfs(Proc.LOOKUP, p.buf, dec)

    async def access(self, fh: bytes, want: int) -> int:
        p = Packer()
        pack_fh(p, fh)
        p.u32(want)

        def dec(u: Unpacker) -> int:
            status = u.u32()
            unpack_post_op_attr(u)
            if status != Stat.NFS3_OK:
                raise Nfs3Error(status, "ACCESS")
            return u.u32()

        return await self._nfs(Proc.ACCESS, p.buf, dec)

    async def create(self, dir_fh: bytes, name: str, mode: int = 0o600, how: CreateMode = CreateMode.UNCHECKED,
                     size: int | None = None, verf: bytes | None = None) -> tuple[bytes, Fattr3 | None]:
        """CREATE a regular file; returns its handle (looked up if the server sent none)."""
        p = Packer()
        pack_diropargs(p, dir_fh, name)
        p.u32(how)
        if how == CreateMode.EXCLUSIVE:
            p.fopaque(verf or b"netswap!", 8)
        else:
            Sattr3(mode=mode, size=size).pack(p)

        def dec(u: Unpacker) -> tuple[bytes | None, Fattr3 | None]:
            status = u.u32()
            if status != Stat.NFS3_OK:
                WccData.unpack(u)
                raise Nfs3Error(status, f"CREATE {name}")
            fh = u.optional(lambda: unpack_fh(u))
            return fh, unpack_post_op_attr(u)

        fh, attr = await self._nfs(Proc.CREATE, p.buf, dec)
        if fh is None:
            return await self.lookup(dir_fh, name)
        if how == CreateMode.EXCLUSIVE:  # RFC 1813: set the real attributes after an exclusive create
            attr = await self.setattr(fh, mode=mode, size=size)
        return fh, attr

    async def remove(self, dir_fh: bytes, name: str) -> None:
        p = Packer()
        pack_diropargs(p, dir_fh, name)

        def dec(u: Unpacker) -> None:
            status = u.u32()
            WccData.unpack(u)
            if status != Stat.NFS3_OK:
                raise Nfs3Error(status, f"REMOVE {name}")

        await self._nfs(Proc.REMOVE, p.buf, dec)

    async def read_once(self, fh: bytes, offset: int, count: int) -> ReadRes:
        """One READ RPC (count is not split)."""
        return await self._nfs(Proc.READ, encode_read_args(fh, offset, count), decode_read_res)

    async def read(self, fh: bytes, offset: int, count: int) -> bytes:
        """Read `count` bytes (in rsize pieces); shorter only at end of file."""
        if count <= self.rsize:
            res = await self.read_once(fh, offset, count)
            if len(res.data) == count or res.eof:
                return res.data
            parts, got = [res.data], len(res.data)
        else:
            parts, got = [], 0
        while got < count:
            res = await self.read_once(fh, offset + got, min(self.rsize, count - got))
            parts.append(res.data)
            got += len(res.data)
            if res.eof or not res.data:
                break
        return b"".join(parts)

    async def write_once(self, fh: bytes, offset: int, data: bytes | bytearray | memoryview,
                         stable: int = StableHow.FILE_SYNC) -> WriteResult:
        """One WRITE RPC; records unstable data for COMMIT. The unstable data kept is bounded
        (max_uncommitted, like Linux's dirty limits): past it, what is kept is committed first,
        and data that would not fit even then is written FILE_SYNC."""
        n = len(data)
        if stable == StableHow.UNSTABLE:
            stable = await self._make_room(n)
        if stable == StableHow.UNSTABLE:
            self._unstable_inflight += n
        try:
            args = bytearray(encode_write_args_head(fh, offset, n, stable))
            args += data
            args += b"\0" * ((4 - n % 4) % 4)
            res = await self._nfs(Proc.WRITE, args, decode_write_res)
        finally:
            if stable == StableHow.UNSTABLE:
                self._unstable_inflight -= n
        if res.count > n:
            raise Nfs3Error(Stat.NFS3ERR_IO, f"WRITE reply claims {res.count} of {n} bytes")
        if res.committed < stable:
            raise Nfs3Error(Stat.NFS3ERR_IO, f"WRITE asked {StableHow(stable).name}, got committed={res.committed}")
        self.commits.record(fh, offset, memoryview(data)[: res.count], res.committed, res.verf)
        return WriteResult(res.count, res.committed, res.verf)

    async def _make_room(self, n: int) -> int:
        """The stable_how an UNSTABLE write of n bytes goes out with: UNSTABLE if the kept data
        (with the writes still in flight) stays under the cap, after COMMITting kept data if
        need be; FILE_SYNC if it cannot fit."""
        if n > self.commits.max_bytes:
            self.forced_sync_writes += 1
            return StableHow.FILE_SYNC
        for fh in self.commits.files():
            if self.commits.room(n + self._unstable_inflight):
                break
            self.forced_commits += 1
            await self.commit(fh)
        if not self.commits.room(n + self._unstable_inflight):
            self.forced_sync_writes += 1  # (other tasks' unstable writes still in flight)
            return StableHow.FILE_SYNC
        return StableHow.UNSTABLE

    async def write(self, fh: bytes, offset: int, data: bytes | bytearray | memoryview,
                    stable: int = StableHow.FILE_SYNC) -> WriteResult:
        """Write all of `data` (in wsize pieces, resending the rest of a short write).
        Returns (count, committed, verifier); committed is the weakest level any piece got."""
        mv = memoryview(data).cast("B")
        if len(mv) <= self.wsize:
            res = await self.write_once(fh, offset, mv, stable)
            if res.count == len(mv):
                return res
            done, committed, verf = res.count, res.committed, res.verifier
        else:
            done, committed, verf = 0, StableHow.FILE_SYNC, b""
        while done < len(mv):
            res = await self.write_once(fh, offset + done, mv[done : done + self.wsize], stable)
            if res.count == 0:
                raise Nfs3Error(Stat.NFS3ERR_IO, "WRITE made no progress")
            done += res.count
            committed = min(committed, res.committed)
            verf = res.verifier
        return WriteResult(done, committed, verf)

    async def commit(self, fh: bytes, offset: int = 0, count: int = 0) -> bytes:
        """COMMIT [offset, offset+count) (count 0: to the end of the file); the unstable writes
        wholly inside that range are settled by it. If the server's verifier changed since one of
        them (it restarted), that data is written again (FILE_SYNC). Returns the verifier."""
        for _ in range(8):
            covered = self.commits.take(fh, offset, count)
            p = Packer()
            pack_fh(p, fh)
            p.u64(offset)
            p.u32(count)

            def dec(u: Unpacker) -> bytes:
                status = u.u32()
                WccData.unpack(u)
                if status != Stat.NFS3_OK:
                    raise Nfs3Error(status, "COMMIT")
                return u.fopaque(8)

            try:
                verf = await self._nfs(Proc.COMMIT, p.buf, dec)
            except BaseException:
                self.commits.restore(fh, covered)
                raise
            lost = self.commits.lost(covered, verf)
            if not lost:
                return verf
            log.warning("write verifier changed (server restart): resending %d writes", len(lost))
            for w in lost:
                await self.write(fh, w.offset, w.data, StableHow.FILE_SYNC)
        raise Nfs3Error(Stat.NFS3ERR_IO, "COMMIT: the verifier keeps changing")

    async def fsinfo(self, fh: bytes) -> FsInfo:
        p = Packer()
        pack_fh(p, fh)

        def dec(u: Unpacker) -> FsInfo:
            status = u.u32()
            if status != Stat.NFS3_OK:
                unpack_post_op_attr(u)
                raise Nfs3Error(status, "FSINFO")
            return FsInfo.unpack(u)

        return await self._nfs(Proc.FSINFO, p.buf, dec)

    async def fsstat(self, fh: bytes) -> FsStat:
        p = Packer()
        pack_fh(p, fh)

        def dec(u: Unpacker) -> FsStat:
            status = u.u32()
            if status != Stat.NFS3_OK:
                unpack_post_op_attr(u)
                raise Nfs3Error(status, "FSSTAT")
            return FsStat.unpack(u)

        return await self._nfs(Proc.FSSTAT, p.buf, dec)

    async def readdir(self, dir_fh: bytes) -> list[tuple[str, int]]:
        """All (name, fileid) entries of a directory (READDIR, following cookies)."""
        out: list[tuple[str, int]] = []
        cookie, verf = 0, b"\0" * 8
        while True:
            p = Packer()
            pack_fh(p, dir_fh)
            p.u64(cookie)
            p.fopaque(verf, 8)
            p.u32(8192)

            def dec(u: Unpacker) -> tuple[bytes, list[tuple[str, int, int]], bool]:
                status = u.u32()
                unpack_post_op_attr(u)
                if status != Stat.NFS3_OK:
                    raise Nfs3Error(status, "READDIR")
                v = u.fopaque(8)
                ents = []
                while u.bool():
                    fileid = u.u64()
                    name = u.string(255)
                    ents.append((name, fileid, u.u64()))
                return v, ents, u.bool()

            verf, ents, eof = await self._nfs(Proc.READDIR, p.buf, dec)
            out += [(n, i) for n, i, _ in ents]
            if eof or not ents:
                return out
            cookie = ents[-1][2]


__all__ = ["NfsClient", "RpcClient", "WriteResult", "RpcTimeout"]
