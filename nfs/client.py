"""The NFS client: a thin trio driver (`RpcClient`) around the sans-IO core (nfs/xprt.py), and
`NfsClient`, the NFSv3 + MOUNT calls the emulated host swaps with.

Usage over plain sockets::

    async with NfsClient.tcp("127.0.0.1", nfs_port, mount_port) as nfs:
        root = await nfs.mount("/srv/export")
        fh, _ = await nfs.create(root, "swapfile", how=CreateMode.UNCHECKED)
        await nfs.write(fh, 0, page, stable=FILE_SYNC)

Over any other transport, pass connect factories: `NfsClient(connect, mount_connect=...)`, where
each factory returns a new `trio.abc.Stream` (TCP, record marking) or `DatagramTransport` (UDP);
neither is assumed to be a real socket.

The NFS procedures go through one call table (nfs/nfs3xdr.py's NFS3_PROCEDURES: the argument
encoder and result decoder of each), as Linux's nfs3_procedures[]. Concurrency: any number of
tasks may call at once; the slot table bounds the requests in flight, one reader task per
connection hands each reply to its caller by xid, and one timer task sleeps until the core's
next deadline (`get_timer`) and hands it the time (`handle_timer`). All of it runs on trio's
clock, so an emulated clock drives it too. Connections and their reader tasks are made by a
worker running in the context of the task that entered the client (Linux's xprtiod).

Hard (the default, as swap needs) retries until the server answers, logging through the
`nfs.client` logger "server H not responding, still trying" once at the first major timeout
and "server H OK" when it answers again; soft gives a call up with `RpcTimeout` after `retrans`
retransmissions. MOUNT is always soft and bounded (`mount_timeout`): it fails with an
`NfsMountError` naming the server and what went wrong.
"""

from __future__ import annotations

import functools
import logging
import math
import socket as pysocket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

import trio

from nfs.mount import MOUNT_PROGRAM, MOUNT_V3, MountProc, decode_exports, decode_mnt_res, encode_mnt_args
from nfs.nfs3 import NFS_PROGRAM, NFS_V3, CreateMode, FType, Nfs3Error, Proc, Stat, StableHow
from nfs.nfs3xdr import (
    NFS3_PROCEDURES, AccessArgs, AccessRes, Attr, CommitArgs, CreateArgs, CreateRes, DirOpArgs, Entry3, Fattr3, FhArgs, FsinfoRes,
    FsstatRes, GetattrRes, LinkArgs, LinkRes, LookupRes, MkdirArgs, MknodArgs, NfsTime, PathconfRes, ReadArgs, ReaddirArgs, ReaddirplusArgs,
    ReadlinkRes, ReadRes, RenameArgs, Sattr3, SetattrArgs, SymlinkArgs, WccRes, WriteArgs, WriteRes,
)
from nfs.record import DEFAULT_MAX_RECORD, RecordDecoder, RecordTooLarge, record_mark
from nfs.rpc import AcceptStat, AuthSys, OpaqueAuth, RpcError
from nfs.transport import ConnectFactory, NullBuffers, RequestBuffers, is_stream, tcp_connect, udp_connect
from nfs.write import DEFAULT_MAX_UNCOMMITTED, CommitList
from nfs.xdr import Packer, Unpacker
from nfs.xprt import (
    Completed, NotResponding, Reconnect, Retransmit, RetransmitPolicy, RpcTimeout, Rqst, ServerOk, SlotTable,
    XprtCore,
)

log = logging.getLogger("nfs.client")

T = TypeVar("T")

UDP_MAX_IO = 32 * 1024
UDP_MAX_CALL = 65507  # the largest UDP payload over IPv4
TCP_MAX_IO = 1024 * 1024
_LOST = (OSError, trio.BrokenResourceError, trio.ClosedResourceError)
REEST_MIN, REEST_MAX = 0.1, 3.0  # reconnect backoff while the server refuses (seconds)


class NfsMountError(Exception):
    """MOUNT could not be done: the server is unreachable, refused, or does not serve MOUNT.
    (A MOUNT the server answered with an error is `nfs.mount.MountError`.)"""


def _peer_host(transport: object) -> str | None:
    """The server's address, if the transport is a real socket (emulated ones need not be)."""
    for attr in ("socket", "sock"):
        sock = getattr(transport, attr, None)
        getpeername = getattr(sock, "getpeername", None)
        if callable(getpeername) and isinstance(sock, (pysocket.socket, trio.socket.SocketType)):
            try:
                return str(getpeername()[0])
            except OSError:
                return None
    return None


def _refused(e: BaseException | None) -> bool:
    """Was this connect failure (or what caused it: trio wraps them) a refused connection?"""
    seen = 0
    while e is not None and seen < 8:
        if isinstance(e, ConnectionRefusedError):
            return True
        if isinstance(e, BaseExceptionGroup):
            return any(_refused(x) for x in e.exceptions)
        e = e.__cause__ or e.__context__
        seen += 1
    return False


class _Conn:
    def __init__(self, transport: Any, stream: bool, gen: int, on_refused: Callable[[], None] | None = None) -> None:
        self.transport = transport
        self.stream = stream
        self.gen = gen
        self.dead = False
        self.send_lock = trio.StrictFIFOLock()
        self.on_refused = on_refused

    async def send(self, msg: bytes | bytearray) -> None:
        if self.stream:
            async with self.send_lock:
                await self.transport.send_all(record_mark(len(msg)) + msg)
            return
        try:
            await self.transport.send(msg)
        except ConnectionRefusedError:
            # An earlier datagram's ICMP port unreachable, reported on this send: the server is
            # down (restarting). The socket is fine; the datagram is lost like any other, and the
            # request's retransmit timer sends it again (Linux's call_status delays and retries;
            # closing and reopening the socket at each refusal would spin).
            if self.on_refused is not None:
                self.on_refused()


class RpcClient:
    """ONC RPC over a reconnectable transport, many calls in flight."""

    def __init__(self, connect: ConnectFactory, *,
                 policy: RetransmitPolicy | Callable[[str], RetransmitPolicy] | None = None, proto: str | None = None,
                 slots: int = 16, buffers: RequestBuffers | None = None, cred: OpaqueAuth | None = None,
                 max_record: int = DEFAULT_MAX_RECORD, server: str | None = None,
                 connect_errors_fatal: bool = False) -> None:
        self._connect = connect
        self.proto = proto  # "tcp" / "udp"; learned at the first connect when None
        # A policy, or a function of the protocol ("tcp"/"udp") learned at the first connect.
        self._policy_for = policy if callable(policy) else None
        fixed = policy if isinstance(policy, RetransmitPolicy) else None
        if fixed is None and proto is not None:
            fixed = self._policy_for(proto) if self._policy_for else self._default_policy(proto)
        self._policy_fixed = fixed is not None
        self.core = XprtCore(fixed or RetransmitPolicy.tcp(), cred or AuthSys().to_auth(), stream=proto == "tcp")
        self.slots = SlotTable(slots)
        self.buffers = buffers or NullBuffers()
        self.max_record = max_record
        self.server = server  # for the log; learned from the first real socket when None
        self.connect_errors_fatal = connect_errors_fatal  # (MOUNT: a refused connect is final)
        self._wake: dict[int, trio.Event] = {}
        self._conn: _Conn | None = None
        self._gen = 0
        self._connect_wanted = trio.Event()
        self._connect_done = trio.Event()
        self._connect_error: Exception | None = None
        self._timer_kick = trio.Event()
        self._timer_armed = math.inf  # when the timer task will wake by itself
        self._nursery: trio.Nursery | None = None
        self._nursery_cm: Any = None
        self.closed = False

    @staticmethod
    def _default_policy(proto: str) -> RetransmitPolicy:
        return RetransmitPolicy.udp() if proto == "udp" else RetransmitPolicy.tcp()

    @property
    def server_name(self) -> str:
        return self.server or "server"

    # -- lifetime --------------------------------------------------------------------------

    async def __aenter__(self) -> RpcClient:
        cm = trio.open_nursery()
        self._nursery = await cm.__aenter__()
        self._nursery_cm = cm
        # Connections are made, and their reader tasks started, by this worker: it (and so they)
        # run in the context of the task that entered the client, like Linux's xprtiod/rpciod,
        # whatever task's call happened to need a new connection.
        self._nursery.start_soon(self._connector)
        self._nursery.start_soon(self._timer)
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> bool | None:
        await self.aclose()
        cm, self._nursery_cm = self._nursery_cm, None
        assert self._nursery is not None
        self._nursery.cancel_scope.cancel()
        # The body's own exception propagates as itself (not wrapped in an ExceptionGroup): the
        # worker tasks catch their errors, so the nursery has nothing of its own to raise.
        await cm.__aexit__(None, None, None)
        return None

    async def aclose(self) -> None:
        self.closed = True
        self._connect_done.set()  # callers waiting for a connection find the client closed
        if self._conn is not None:
            await self._kill(self._conn)

    # -- the core's timer and events -------------------------------------------------------

    async def _timer(self) -> None:
        """Sleep until the core's next deadline (or until a nearer one is armed), then let it
        handle the time and act on what it says."""
        while True:
            deadline = self.core.get_timer()
            self._timer_armed = math.inf if deadline is None else deadline
            with trio.move_on_at(self._timer_armed):
                await self._timer_kick.wait()
            self._timer_kick = trio.Event()
            self.core.handle_timer(trio.current_time())
            self._events()

    def _kick(self, deadline: float) -> None:
        """A request's timer now runs to `deadline`: wake the timer task only if that is
        sooner than it will wake anyway. With one call after another, each call's deadline is
        later than the one armed, so a call costs no trip through the timer task; the task
        wakes at the armed time, finds that call done, and sleeps until the next one's."""
        if deadline < self._timer_armed:
            self._timer_kick.set()

    def _events(self) -> None:
        while (ev := self.core.next_event()) is not None:
            if isinstance(ev, (Retransmit, Completed)):
                w = self._wake.get(ev.rqst.xid)
                if w is not None:
                    w.set()
            elif isinstance(ev, Reconnect):
                c = self._conn
                if c is not None and not c.dead and self._nursery is not None:
                    self._nursery.start_soon(self._kill, c)  # TCP delivers or breaks: go again
            elif isinstance(ev, NotResponding):
                log.warning("server %s not responding, %s", self.server_name,
                            "still trying" if ev.hard else "timed out")
            elif isinstance(ev, ServerOk):
                log.warning("server %s OK", self.server_name)

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
                await self._reconnect()
            done, self._connect_done = self._connect_done, trio.Event()
            done.set()

    async def _reconnect(self) -> None:
        """Connect, and while the server refuses or resets (a restart) try again,
        backing off from REEST_MIN to REEST_MAX, for up to `timeo` seconds; then the callers get
        the error (a hard client's calls come back for another round, a soft one's time out).
        Linux's xs_connect backs off the same way (reestablish_timeout, from 3 s doubling to
        5 min); we start lower and cap at 3 s so that a restarted server is found within
        seconds. MOUNT (connect_errors_fatal) makes one attempt."""
        timeo = max(self.core.policy.timeo, 1.0)
        deadline = trio.current_time() + timeo
        delay = REEST_MIN
        while True:
            try:
                with trio.fail_after(timeo):
                    transport = await self._connect()
            except trio.TooSlowError:
                self._connect_error = TimeoutError("connect timed out")
                return
            except Exception as e:  # handed to the callers waiting for this attempt
                self._connect_error = e
                # refused (nothing listens yet), reset (a server dying or starting): try again
                if (self.connect_errors_fatal or self.closed or not isinstance(e, OSError)
                        or trio.current_time() + delay > deadline):
                    return
                log.debug("connect failed (%s), again in %.2f s", "refused" if _refused(e) else e, delay)
                await trio.sleep(delay)
                delay = min(delay * 2, REEST_MAX)
                continue
            self._connect_error = None
            self._attach(transport)
            return

    def _attach(self, transport: Any) -> None:
        assert self._nursery is not None
        stream = is_stream(transport)
        if self.proto is None:
            self.proto = "tcp" if stream else "udp"
            if not self._policy_fixed:
                self.core.policy = (self._policy_for or self._default_policy)(self.proto)
                self._policy_fixed = True
        self.core.stream = stream
        if self.server is None:
            self.server = _peer_host(transport)
        self._gen += 1
        if self._gen > 1:
            self.core.stats.reconnects += 1
        c = _Conn(transport, stream, self._gen, self.core.refused)
        self._conn = c
        self._nursery.start_soon(self._reader, c)

    async def _kill(self, c: _Conn) -> None:
        if c.dead:
            return
        c.dead = True
        # Wake every caller: those whose reply has not come will resend on a new connection.
        for ev in list(self._wake.values()):
            ev.set()
        with trio.CancelScope(shield=True):
            try:
                await c.transport.aclose()
            except _LOST:
                pass

    def _deliver(self, msg: bytes | bytearray | memoryview) -> None:
        self.core.receive(msg)
        self._events()

    async def _reader(self, c: _Conn) -> None:
        try:
            if c.stream:
                dec = RecordDecoder(self.max_record)
                while True:
                    data = await c.transport.receive_some(256 * 1024)
                    if not data:
                        break
                    dec.feed(data)
                    while (rec := dec.next_record()) is not None:
                        self._deliver(rec)
            else:
                while True:
                    try:
                        msg = await c.transport.recv()
                    except ConnectionRefusedError:  # ICMP port unreachable: nobody on that port
                        self.core.refused()
                        continue
                    self._deliver(msg)
        except (*_LOST, RecordTooLarge) as e:
            log.debug("connection %d lost: %r", c.gen, e)
        finally:
            await self._kill(c)

    # -- calls -----------------------------------------------------------------------------

    async def call(self, prog: int, vers: int, proc: int, args: bytes | bytearray | memoryview = b"",
                   decode: Callable[[Unpacker], T] | None = None) -> T:
        """Send a call and wait for its reply; `decode` turns the result body into the return
        value while the request's buffers are still held. Raises RpcError (the server refused),
        RpcTimeout (soft, no reply), OSError (a connect failure, with connect_errors_fatal)."""
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
        core = self.core
        rq: Rqst = core.start(prog, vers, proc, args)
        token = await self.buffers.alloc(len(rq.message) + 4)
        losses = 0
        try:
            while not rq.done:
                wake = self._wake[rq.xid] = trio.Event()
                try:
                    c = await self._get_conn()
                except OSError as e:
                    if self.connect_errors_fatal:
                        raise
                    log.debug("connect failed: %s", e)
                    core.not_sent(rq, trio.current_time(), f"cannot connect: {e.strerror or e}", rq.timeout)
                    self._kick(rq.deadline)
                    await wake.wait()
                    continue
                if not c.stream and len(rq.message) > UDP_MAX_CALL:
                    raise ValueError(f"a {len(rq.message)}-byte call does not fit in a UDP datagram")
                try:
                    await c.send(rq.message)
                except _LOST as e:
                    log.debug("send failed: %r", e)
                    await self._kill(c)
                    losses += 1
                    core.not_sent(rq, trio.current_time(), "send failed", min(0.01 * 2**losses, 2.0))
                    self._kick(rq.deadline)
                    await wake.wait()
                    continue
                core.transmitted(rq, trio.current_time())
                self._kick(rq.deadline)
                await wake.wait()  # the reply, the timer (retransmit or give up), or a lost connection
                if not rq.done and c.dead and rq.deadline != math.inf:
                    losses += 1  # the connection went away: resend on a new one (backing off)
                    if losses > 1:
                        wake = self._wake[rq.xid] = trio.Event()
                        core.not_sent(rq, trio.current_time(), "connection lost", min(0.01 * 2**losses, 2.0))
                        self._kick(rq.deadline)
                        await wake.wait()
            if rq.error is not None:
                raise rq.error
            assert rq.reply is not None
            return decode(rq.reply) if decode is not None else rq.reply  # type: ignore[return-value]
        finally:
            self._wake.pop(rq.xid, None)
            core.finish(rq)
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


def _fattr(a: Attr | None) -> Fattr3 | None:
    """A decoded post_op_attr (always a Fattr3 on this side)."""
    assert a is None or isinstance(a, Fattr3)
    return a


def _name(name: str | bytes) -> str:
    """A name as the codecs take it: bytes that are not UTF-8 become surrogates (os.fsdecode)."""
    return name.decode("utf-8", "surrogateescape") if isinstance(name, bytes) else name


class NfsClient:
    """NFSv3 client. `connect` makes the NFS transport; `mount_connect` the MOUNT one (defaults to
    `connect`, which works with servers that answer MOUNT on the NFS port, like netswap's).
    `server` names the server in log messages and errors (learned from a real socket if None)."""

    def __init__(self, connect: ConnectFactory, *, mount_connect: ConnectFactory | None = None,
                 proto: str | None = None, timeo: float | None = None, retrans: int | None = None,
                 timeo_max: float = 60.0, hard: bool = True, slots: int = 16,
                 buffers: RequestBuffers | None = None, cred: AuthSys | None = None,
                 rsize: int | None = None, wsize: int | None = None,
                 max_uncommitted: int = DEFAULT_MAX_UNCOMMITTED, server: str | None = None,
                 mount_timeout: float = 10.0) -> None:
        self._connect = connect
        self._mount_connect = mount_connect or connect
        self.proto = proto
        self.cred = cred or AuthSys(machinename=pysocket.gethostname()[:255])
        self._timeo, self._retrans, self._timeo_max, self._hard = timeo, retrans, timeo_max, hard
        self.mount_timeout = mount_timeout
        self.rpc = RpcClient(connect, policy=self._policy, proto=proto, slots=slots, buffers=buffers,
                             cred=self.cred.to_auth(), server=server)
        self.commits = CommitList(max_bytes=max_uncommitted)
        self._unstable_inflight = 0  # bytes of UNSTABLE writes sent, not yet answered
        self.forced_commits = 0  # COMMITs sent to make room under max_uncommitted
        self.forced_sync_writes = 0  # UNSTABLE writes sent FILE_SYNC because they would not fit
        self.root: bytes | None = None
        self.export: str | None = None
        self.fsinfo_res: FsinfoRes | None = None
        self._rsize_opt, self._wsize_opt = rsize, wsize
        self.rsize = rsize or UDP_MAX_IO
        self.wsize = wsize or UDP_MAX_IO

    def _policy(self, proto: str) -> RetransmitPolicy:
        base = RetransmitPolicy.udp() if proto == "udp" else RetransmitPolicy.tcp()
        return RetransmitPolicy(self._timeo if self._timeo is not None else base.timeo,
                                self._retrans if self._retrans is not None else base.retrans,
                                max(self._timeo_max, self._timeo or 0), self._hard)

    @classmethod
    def tcp(cls, host: str, port: int, mount_port: int | None = None, **kw: Any) -> NfsClient:
        mc = functools.partial(tcp_connect, host, mount_port) if mount_port else None
        kw.setdefault("server", host)
        return cls(functools.partial(tcp_connect, host, port), mount_connect=mc, proto="tcp", **kw)

    @classmethod
    def udp(cls, host: str, port: int, mount_port: int | None = None, **kw: Any) -> NfsClient:
        mc = functools.partial(udp_connect, host, mount_port) if mount_port else None
        kw.setdefault("server", host)
        return cls(functools.partial(udp_connect, host, port), mount_connect=mc, proto="udp", **kw)

    async def __aenter__(self) -> NfsClient:
        await self.rpc.__aenter__()
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> bool | None:
        return await self.rpc.__aexit__(et, e, tb)

    @property
    def server_not_responding(self) -> bool:
        """Hard: a call had a major timeout and the server has not answered since."""
        return self.rpc.core.not_responding

    @property
    def stats(self) -> dict[str, int]:
        s = self.rpc.core.stats
        return {"calls": s.calls, "transmissions": s.transmissions, "retransmissions": s.retransmissions,
                "major_timeouts": s.major_timeouts, "bad_xids": s.bad_xids, "reconnects": s.reconnects,
                "not_responding": s.not_responding,
                "slots_high_water": self.rpc.slots.high_water, "commit_resends": self.commits.resends,
                "uncommitted_bytes": self.commits.held, "forced_commits": self.forced_commits,
                "forced_sync_writes": self.forced_sync_writes}

    async def _proc(self, proc: Proc, args: object, what: str = "") -> Any:
        """One NFSv3 call through the call table; a status other than NFS3_OK is Nfs3Error."""
        xdr = NFS3_PROCEDURES[proc]
        p = Packer()
        xdr.encode_args(p, args)
        iov = p.iov()
        body = iov[0] if len(iov) == 1 else b"".join(iov)  # type: ignore[arg-type]
        res = await self.rpc.call(NFS_PROGRAM, NFS_V3, proc, body, xdr.decode_res)  # type: ignore[arg-type]
        if res.status != Stat.NFS3_OK:
            raise Nfs3Error(res.status, f"{xdr.name} {what}".rstrip())
        return res

    # -- MOUNT -----------------------------------------------------------------------------

    async def _mount_call(self, proc: int, args: bytes, decode: Callable[[Unpacker], T]) -> T:
        """MOUNT is soft and bounded, whatever the NFS calls are: `mount_timeout` seconds in
        all (three transmissions), and a refused connection is final at once."""
        proto = self.rpc.proto or self.proto
        policy = RetransmitPolicy(self.mount_timeout / 7, 2, self.mount_timeout, hard=False)
        server = self.rpc.server_name
        try:
            async with RpcClient(self._mount_connect, policy=policy, proto=proto, slots=1,
                                 cred=self.cred.to_auth(), server=self.rpc.server,
                                 connect_errors_fatal=True) as m:
                return await m.call(MOUNT_PROGRAM, MOUNT_V3, proc, args, decode)
        except RpcTimeout as e:
            why = "connection refused" if "connection refused" in str(e) else "no reply"
            raise NfsMountError(f"server {server} did not answer MOUNT within {self.mount_timeout:g} s "
                                f"({why})") from None
        except RpcError as e:
            if e.accept_stat == AcceptStat.PROG_UNAVAIL:
                raise NfsMountError(f"server {server}: MOUNT failed: program not registered "
                                    f"(no MOUNT v3 on that port)") from None
            raise NfsMountError(f"server {server}: MOUNT failed: {e}") from None
        except OSError as e:
            reason = "connection refused" if _refused(e) else (e.strerror or str(e)).lower()
            raise NfsMountError(f"server {server}: MOUNT failed: {reason}") from None

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
        await self.rpc.call(NFS_PROGRAM, NFS_V3, Proc.NULL)

    async def getattr(self, fh: bytes) -> Fattr3:
        res: GetattrRes = await self._proc(Proc.GETATTR, FhArgs(fh))
        attr = _fattr(res.obj_attributes)
        assert attr is not None
        return attr

    async def setattr(self, fh: bytes, size: int | None = None, mode: int | None = None, uid: int | None = None,
                      gid: int | None = None, atime: NfsTime | str | None = None, mtime: NfsTime | str | None = None,
                      guard: NfsTime | None = None) -> Fattr3 | None:
        """SETATTR; `guard`: only if the object's ctime is still that (NFS3ERR_NOT_SYNC)."""
        res: WccRes = await self._proc(Proc.SETATTR, SetattrArgs(fh, Sattr3(mode, uid, gid, size, atime, mtime), guard))
        return _fattr(res.wcc.after)

    async def lookup(self, dir_fh: bytes, name: str | bytes) -> tuple[bytes, Fattr3 | None]:
        res: LookupRes = await self._proc(Proc.LOOKUP, DirOpArgs(dir_fh, _name(name)), repr(_name(name)))
        return res.object, _fattr(res.obj_attributes)

    async def access(self, fh: bytes, want: int) -> int:
        res: AccessRes = await self._proc(Proc.ACCESS, AccessArgs(fh, want))
        return res.access

    async def readlink(self, fh: bytes) -> str:
        """The symlink's target, as stored (undecodable bytes as surrogates)."""
        res: ReadlinkRes = await self._proc(Proc.READLINK, FhArgs(fh))
        return res.data

    async def _made(self, res: CreateRes, dir_fh: bytes, name: str) -> tuple[bytes, Fattr3 | None]:
        if res.obj is None:  # the server may leave the handle out: look it up
            return await self.lookup(dir_fh, name)
        return res.obj, _fattr(res.obj_attributes)

    async def create(self, dir_fh: bytes, name: str | bytes, mode: int = 0o600,
                     how: CreateMode = CreateMode.UNCHECKED, size: int | None = None,
                     verf: bytes | None = None) -> tuple[bytes, Fattr3 | None]:
        """CREATE a regular file; returns its handle (looked up if the server sent none)."""
        n = _name(name)
        if how == CreateMode.EXCLUSIVE:
            args = CreateArgs(DirOpArgs(dir_fh, n), how, verf=verf or b"netswap!")
        else:
            args = CreateArgs(DirOpArgs(dir_fh, n), how, Sattr3(mode=mode, size=size))
        fh, attr = await self._made(await self._proc(Proc.CREATE, args, repr(n)), dir_fh, n)
        if how == CreateMode.EXCLUSIVE:  # RFC 1813: set the real attributes after an exclusive create
            attr = await self.setattr(fh, mode=mode, size=size)
        return fh, attr

    async def mkdir(self, dir_fh: bytes, name: str | bytes, mode: int = 0o755) -> tuple[bytes, Fattr3 | None]:
        n = _name(name)
        res = await self._proc(Proc.MKDIR, MkdirArgs(DirOpArgs(dir_fh, n), Sattr3(mode=mode)), repr(n))
        return await self._made(res, dir_fh, n)

    async def symlink(self, dir_fh: bytes, name: str | bytes, target: str | bytes,
                      mode: int | None = None) -> tuple[bytes, Fattr3 | None]:
        n = _name(name)
        args = SymlinkArgs(DirOpArgs(dir_fh, n), _name(target), Sattr3(mode=mode))
        return await self._made(await self._proc(Proc.SYMLINK, args, repr(n)), dir_fh, n)

    async def mknod(self, dir_fh: bytes, name: str | bytes, type: FType, mode: int = 0o644,
                    spec: tuple[int, int] = (0, 0)) -> tuple[bytes, Fattr3 | None]:
        """MKNOD a FIFO, socket, or character or block device (`spec`: major, minor)."""
        n = _name(name)
        args = MknodArgs(DirOpArgs(dir_fh, n), type, Sattr3(mode=mode), spec)
        return await self._made(await self._proc(Proc.MKNOD, args, repr(n)), dir_fh, n)

    async def remove(self, dir_fh: bytes, name: str | bytes) -> None:
        await self._proc(Proc.REMOVE, DirOpArgs(dir_fh, _name(name)), repr(_name(name)))

    async def rmdir(self, dir_fh: bytes, name: str | bytes) -> None:
        await self._proc(Proc.RMDIR, DirOpArgs(dir_fh, _name(name)), repr(_name(name)))

    async def rename(self, from_dir: bytes, from_name: str | bytes, to_dir: bytes, to_name: str | bytes) -> None:
        a, b = _name(from_name), _name(to_name)
        await self._proc(Proc.RENAME, RenameArgs(DirOpArgs(from_dir, a), DirOpArgs(to_dir, b)), f"{a!r} -> {b!r}")

    async def link(self, fh: bytes, dir_fh: bytes, name: str | bytes) -> Fattr3 | None:
        """LINK: a new name `name` in `dir_fh` for the file `fh`; returns its attributes."""
        n = _name(name)
        res: LinkRes = await self._proc(Proc.LINK, LinkArgs(fh, DirOpArgs(dir_fh, n)), repr(n))
        return _fattr(res.file_attributes)

    async def read_once(self, fh: bytes, offset: int, count: int) -> ReadRes:
        """One READ RPC (count is not split); its data is bytes."""
        res: ReadRes = await self._proc(Proc.READ, ReadArgs(fh, offset, count))
        res.data = bytes(res.data)  # type: ignore[call-overload]  # (a view of the reply until now)
        return res

    async def read(self, fh: bytes, offset: int, count: int) -> bytes:
        """Read `count` bytes (in rsize pieces); shorter only at end of file."""
        if count <= self.rsize:
            res = await self.read_once(fh, offset, count)
            if len(res.data) == count or res.eof:
                return res.data  # type: ignore[return-value]
            parts, got = [res.data], len(res.data)
        else:
            parts, got = [], 0
        while got < count:
            res = await self.read_once(fh, offset + got, min(self.rsize, count - got))
            parts.append(res.data)
            got += len(res.data)
            if res.eof or not res.data:
                break
        return b"".join(parts)  # type: ignore[arg-type]

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
            res: WriteRes = await self._proc(Proc.WRITE, WriteArgs(fh, offset, n, stable, data))
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
        if not self.commits.room(n + self._unstable_inflight):
            # (files() sums every kept write: only when a COMMIT is needed, not at every write)
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
            try:
                verf: bytes = (await self._proc(Proc.COMMIT, CommitArgs(fh, offset, count))).verf
            except BaseException:
                self.commits.restore(fh, covered)
                raise
            lost = self.commits.lost(covered, verf)
            if not lost:
                return verf
            log.warning("server %s: write verifier changed (server restart): resending %d writes",
                        self.rpc.server_name, len(lost))
            for w in lost:
                await self.write(fh, w.offset, w.data, StableHow.FILE_SYNC)
        raise Nfs3Error(Stat.NFS3ERR_IO, "COMMIT: the verifier keeps changing")

    async def fsinfo(self, fh: bytes) -> FsinfoRes:
        return await self._proc(Proc.FSINFO, FhArgs(fh))  # type: ignore[no-any-return]

    async def fsstat(self, fh: bytes) -> FsstatRes:
        return await self._proc(Proc.FSSTAT, FhArgs(fh))  # type: ignore[no-any-return]

    async def pathconf(self, fh: bytes) -> PathconfRes:
        return await self._proc(Proc.PATHCONF, FhArgs(fh))  # type: ignore[no-any-return]

    async def readdir(self, dir_fh: bytes) -> list[tuple[str, int]]:
        """All (name, fileid) entries of a directory (READDIR, following cookies)."""
        out: list[tuple[str, int]] = []
        cookie, verf = 0, bytes(8)
        while True:
            res = await self._proc(Proc.READDIR, ReaddirArgs(dir_fh, cookie, verf, 8192))
            out += [(e.name, e.fileid) for e in res.entries]
            if res.eof or not res.entries:
                return out
            cookie, verf = res.entries[-1].cookie, res.cookieverf

    async def readdirplus(self, dir_fh: bytes) -> list[Entry3]:
        """All entries of a directory with their attributes and handles (READDIRPLUS)."""
        out: list[Entry3] = []
        cookie, verf = 0, bytes(8)
        while True:
            res = await self._proc(Proc.READDIRPLUS, ReaddirplusArgs(dir_fh, cookie, verf, 8192, 32768))
            out += res.entries
            if res.eof or not res.entries:
                return out
            cookie, verf = res.entries[-1].cookie, res.cookieverf


__all__ = ["NfsClient", "NfsMountError", "RpcClient", "RpcTimeout", "WriteResult"]
