"""The RPC server side (Linux's sunrpc `svc`): from one call message to one reply message.

`RpcService.dispatch(msg, ctx)` decodes the call header, checks the RPC version, the credential
flavor, the program, version and procedure, consults the duplicate request cache for
non-idempotent procedures, runs the program's handler, and returns the reply as a list of
buffers (an iovec, so READ data is sent without being copied into one big message). It returns
None when the message must be dropped: its header is unreadable, or it duplicates a call still in
progress (over TCP it first waits for the original's reply, which the client, having
reconnected, can only get this way). Handlers signal undecodable arguments by raising
`XdrError` -> GARBAGE_ARGS; any other exception becomes SYSTEM_ERR and is counted, never
crashing the server.

A driver may split `dispatch` in two: `begin` checks the header; `try_now` runs the call at once
when its program can do it without waiting (`call_nowait`: a READ or an UNSTABLE WRITE whose
handle is known), so the common call costs no task and no trip through the event loop; the rest
go to `finish`, in a task. Both give the same replies, reply cache included. `try_here` is the
two in one for a service thread: the reply, or nothing done and nothing counted.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from nfs.drc import DrcKey, DrcState, DuplicateRequestCache
from nfs.rpc import (
    AcceptStat, AuthFlavor, AuthStat, AuthSys, CallHeader, RejectStat, RpcVersionMismatch, decode_call,
    encode_reply_accepted, encode_reply_denied, reply_header,
)
from nfs.sendfile import FileSlice
from nfs.xdr import Unpacker, XdrError

log = logging.getLogger("netswap.nfs.svc")

STREAM_MAX_REPLY = 4 * 1024 * 1024  # the largest reply over TCP (a record)
_FAST_HEAD = struct.Struct(">8I")  # xid, CALL, rpcvers, prog, vers, proc, credential flavor and length
_TWO = struct.Struct(">II")
_MAX_AUTH = 400  # MAX_AUTH_BYTES
_AUTH_NONE = 0
_AUTH_SYS = 1



Buffer = bytes | bytearray | memoryview | FileSlice  # one element of a reply (a slice: a big READ over TCP, nfs/sendfile.py)


def peer_address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """A caller's address as an IP address (an IPv4-mapped IPv6 one as IPv4), None if it is
    not one: what --allow and portmap's loopback rule compare."""
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


@dataclass
class CallContext:
    """Who is calling and over what: handlers use it for --allow checks and transfer limits."""

    host: str
    port: int
    transport: str  # "tcp" or "udp"
    header: CallHeader | None = None
    cred: AuthSys | None = None
    max_reply: int = STREAM_MAX_REPLY  # UDP: what fits in one datagram


class RpcProgram(Protocol):
    @property
    def prog(self) -> int: ...

    @property
    def versions(self) -> Sequence[int]: ...

    @property
    def name(self) -> str: ...

    def has_proc(self, vers: int, proc: int) -> bool: ...

    def non_idempotent(self, vers: int, proc: int) -> bool: ...

    async def call(self, vers: int, proc: int, args: Unpacker, ctx: CallContext) -> list[Buffer]: ...

    # Optional: `call_nowait(vers, proc, args, ctx) -> Callable[[], list[Buffer]] | None`, the
    # call ready to run without waiting, or None (nothing done, `args` as they were).


@dataclass
class SvcStats:
    calls: int = 0
    dropped: int = 0
    garbage_args: int = 0
    system_err: int = 0
    prog_unavail: int = 0
    prog_mismatch: int = 0
    proc_unavail: int = 0
    auth_errors: int = 0
    by_proc: dict[str, int] = field(default_factory=dict)


class RateLimit:
    """Linux's ___ratelimit: at most `burst` events per `interval` seconds."""

    def __init__(self, burst: int, interval: float) -> None:
        self.burst, self.interval = burst, interval
        self._begin = -math.inf
        self._printed = 0
        self.missed = 0

    def allow(self, now: float | None = None) -> int | None:
        """None: suppress this one. Otherwise go ahead; the value is how many were suppressed
        since the last one allowed."""
        now = time.monotonic() if now is None else now
        if now - self._begin >= self.interval:
            self._begin, self._printed = now, 0
        if self._printed >= self.burst:
            self.missed += 1
            return None
        self._printed += 1
        missed, self.missed = self.missed, 0
        return missed


@dataclass(slots=True)
class Pending:
    """A call whose header passed (`RpcService.begin`), to run: its header, its arguments
    (an unpacker at their start) and its program."""

    hdr: CallHeader
    args: Unpacker
    prog: RpcProgram


class RpcService:
    def __init__(self, programs: Sequence[RpcProgram], drc: DuplicateRequestCache | None = None) -> None:
        self.programs = {p.prog: p for p in programs}
        self.drc = drc if drc is not None else DuplicateRequestCache()
        self._in_progress: dict[DrcKey, trio.Event] = {}
        self.drc_wait = 30.0  # how long a TCP duplicate waits for its original
        self.stats = SvcStats()
        self.log_limit = RateLimit(burst=10, interval=5.0)
        self._names: dict[tuple[int, int], str] = {}  # (prog, proc) -> its stats name
        self._creds: dict[bytes, AuthSys] = {}  # AUTH_SYS credential body -> decoded
        # The programs with a hot path (`call_fast(proc, msg, pos, host, transport, max_reply,
        # cred)`: the call ready to run, or None).
        self._fast: dict[int, Any] = {p.prog: p for p in programs if callable(getattr(p, "call_fast", None))}

    def _wake(self, key: DrcKey) -> None:
        ev = self._in_progress.pop(key, None)
        if ev is not None:
            ev.set()

    async def dispatch(self, msg: bytes | bytearray | memoryview, ctx: CallContext) -> list[Buffer] | None:
        p = self.begin(msg, ctx)
        if not isinstance(p, Pending):
            return p
        return await self.finish(p, ctx)

    def begin(self, msg: bytes | bytearray | memoryview, ctx: CallContext) -> list[Buffer] | Pending | None:
        """Check a call's header: its final reply (a denial, PROG_UNAVAIL, ...), None to drop
        it, or the call to run: `try_now(p)` runs it at once if it needs no waiting, otherwise
        `await finish(p)` (a driver may do the latter in a task of its own)."""
        try:
            hdr, args = decode_call(msg)
        except RpcVersionMismatch as e:
            return [encode_reply_denied(e.xid, RejectStat.RPC_MISMATCH)]
        except XdrError:
            self.stats.dropped += 1
            return None
        self.stats.calls += 1
        xid = hdr.xid
        ctx.header = hdr
        if hdr.cred.flavor == AuthFlavor.AUTH_SYS:
            # A client sends the same credential call after call: decoded once (it is a pure
            # function of its bytes, and AuthSys is immutable), kept in a small bounded table.
            cred = self._creds.get(hdr.cred.body)
            if cred is None:
                try:
                    cred = AuthSys.from_auth(hdr.cred)
                except XdrError:
                    self.stats.auth_errors += 1
                    return [encode_reply_denied(xid, RejectStat.AUTH_ERROR, AuthStat.AUTH_BADCRED)]
                if len(self._creds) >= 256:
                    self._creds.clear()
                self._creds[hdr.cred.body] = cred
            ctx.cred = cred
        elif hdr.cred.flavor != AuthFlavor.AUTH_NONE:
            self.stats.auth_errors += 1
            return [encode_reply_denied(xid, RejectStat.AUTH_ERROR, AuthStat.AUTH_BADCRED)]
        if hdr.verf.flavor not in (AuthFlavor.AUTH_NONE, AuthFlavor.AUTH_SYS):
            self.stats.auth_errors += 1
            return [encode_reply_denied(xid, RejectStat.AUTH_ERROR, AuthStat.AUTH_BADVERF)]
        prog = self.programs.get(hdr.prog)
        if prog is None:
            self.stats.prog_unavail += 1
            return [encode_reply_accepted(xid, AcceptStat.PROG_UNAVAIL)]
        if hdr.vers not in prog.versions:
            self.stats.prog_mismatch += 1
            return [encode_reply_accepted(xid, AcceptStat.PROG_MISMATCH, low=min(prog.versions),
                                          high=max(prog.versions))]
        if not prog.has_proc(hdr.vers, hdr.proc):
            self.stats.proc_unavail += 1
            return [encode_reply_accepted(xid, AcceptStat.PROC_UNAVAIL)]
        return Pending(hdr, args, prog)

    def try_here(self, msg: bytes | bytearray | memoryview, ctx: CallContext,
                 send: Callable[[list[Buffer]], object] | None = None) -> list[Buffer] | None:
        """`begin` and `try_now` in one, for a service thread (after `try_fast`): the reply of
        a call that needs no waiting, or of one refused at its header; None, with nothing done
        and nothing counted, for any other (the usual way then counts and answers it, or drops
        it). `send` as in `try_fast`."""
        stats = self.stats
        calls, dropped = stats.calls, stats.dropped
        p = self.begin(msg, ctx)
        if isinstance(p, Pending):
            reply = self.try_now(p, ctx, send)
            if reply is None:
                stats.calls = calls
            return reply
        if p is None:
            stats.dropped = dropped
        return p

    def try_now(self, p: Pending, ctx: CallContext,
                send: Callable[[list[Buffer]], object] | None = None) -> list[Buffer] | None:
        """Run the call now if the program can do it without waiting (knfsd's nfsd thread runs
        a call to its end; here that saves the event loop a task and its wake-ups per call);
        None, with nothing done, when it must be awaited with `finish`."""
        nowait = getattr(p.prog, "call_nowait", None)
        if nowait is None:
            return None
        hdr, args = p.hdr, p.args
        pos = args.pos
        body = args.buf[pos:]  # (the reply cache's checksum covers the arguments: before they are decoded)
        run = nowait(hdr.vers, hdr.proc, args, ctx)
        if run is None:
            return None
        key = None
        if p.prog.non_idempotent(hdr.vers, hdr.proc):
            key = self.drc.key(hdr.xid, ctx.host, hdr.prog, hdr.vers, hdr.proc, body)
            if key in self._in_progress:
                # The original is running: finish() drops or waits, as the rules say, and
                # needs the arguments as they came (its key covers them; it decodes them).
                args.pos = pos
                return None
            state, cached = self.drc.lookup(key)
            if state is DrcState.DONE:
                assert cached is not None
                return [cached]
            # NEW: run() ends before anything else runs, so no duplicate can see it in progress.
        return self._complete(p.hdr.xid, p.prog, p.hdr.proc, run, key, send=send)

    async def finish(self, p: Pending, ctx: CallContext) -> list[Buffer] | None:
        """Run a call that `begin` accepted, waiting as it needs (the reply cache, a sync)."""
        hdr, args, prog = p.hdr, p.args, p.prog
        xid = hdr.xid
        key = None
        if prog.non_idempotent(hdr.vers, hdr.proc):
            key = self.drc.key(xid, ctx.host, hdr.prog, hdr.vers, hdr.proc, args.buf[args.pos :])
            state, cached = self.drc.lookup(key)
            if state is DrcState.IN_PROGRESS:
                # UDP: drop it, the client retransmits. TCP: the client only resends after a
                # reconnect, so the original's reply went to a dead connection: wait for it.
                ev = self._in_progress.get(key)
                if ctx.transport != "tcp" or ev is None:
                    return None
                with trio.move_on_after(self.drc_wait):
                    await ev.wait()
                state, cached = self.drc.lookup(key)
            if state is DrcState.DONE:
                assert cached is not None
                return [cached]
            if state is DrcState.IN_PROGRESS:
                return None
            self._in_progress[key] = trio.Event()
        try:
            body = await prog.call(hdr.vers, hdr.proc, args, ctx)
        except BaseException as e:
            if not isinstance(e, Exception):
                if key is not None:
                    self.drc.done(key, None)
                    self._wake(key)
                raise
            return self._complete(xid, prog, hdr.proc, None, key, e)
        return self._complete(xid, prog, hdr.proc, lambda: body, key)

    def _complete(self, xid: int, prog: RpcProgram, proc: int, run: Callable[[], list[Buffer]] | None,
                  key: DrcKey | None, failed: Exception | None = None,
                  send: Callable[[list[Buffer]], object] | None = None) -> list[Buffer]:
        """The reply of a call that ran (`run` gives its body) or failed: GARBAGE_ARGS for
        undecodable arguments, SYSTEM_ERR (counted, rate-limited traceback) for a bug; kept in
        the reply cache if the procedure is non-idempotent. `send`, if given, gets the reply
        first (the cache and the statistics are kept after it has gone, off the caller's wait;
        nothing else can run in between)."""
        reply: list[Buffer]
        try:
            if failed is not None:
                raise failed
            assert run is not None
            reply = [reply_header(xid), *run()]
        except XdrError as e:
            self.stats.garbage_args += 1
            log.debug("xid %#x: GARBAGE_ARGS (%s)", xid, e)
            reply = [encode_reply_accepted(xid, AcceptStat.GARBAGE_ARGS)]
        except Exception:
            self.stats.system_err += 1
            # A bug a client can trigger at will must not flood the log: tracebacks are rate
            # limited (printk_ratelimit), the rest counted and summarised.
            if (missed := self.log_limit.allow()) is not None:
                log.exception("xid %#x: %s proc %d failed%s", xid, prog.name, proc,
                              f" ({missed} more such failures not logged)" if missed else "")
            reply = [encode_reply_accepted(xid, AcceptStat.SYSTEM_ERR)]
        except BaseException:
            if key is not None:
                self.drc.done(key, None)
                self._wake(key)
            raise
        try:
            if send is not None:
                send(reply)
        finally:  # (the reply cache never keeps a call in progress, whatever the sender did)
            if key is not None:
                self.drc.done(key, b"".join(reply))  # type: ignore[arg-type]  # (no FileSlice: READ is never cached)
                self._wake(key)
        by_proc = self.stats.by_proc
        name = self._names.get((prog.prog, proc))
        if name is None:
            name = self._names[(prog.prog, proc)] = f"{prog.name}.{proc}"
        by_proc[name] = by_proc.get(name, 0) + 1
        return reply

    def try_fast(self, msg: bytes | bytearray | memoryview, host: str, transport: str, max_reply: int,
                 send: Callable[[list[Buffer]], object] | None = None) -> list[Buffer] | None:
        """`begin` and `try_now` in one pass for the hot calls (a program's `call_fast`: READ
        and UNSTABLE WRITE), read with fixed layouts: a CALL of RPC version 2, an AUTH_SYS
        credential already seen (or AUTH_NONE), a verifier of a known flavor. The same reply,
        reply cache and statistics as the usual way; None, with nothing done, for any other
        call or anything unusual (the usual way then answers it). With `send`, a reply that ran
        is handed to it before the reply cache and statistics are kept (a reply from the cache
        is only returned)."""
        mv = msg if isinstance(msg, memoryview) else memoryview(msg)
        n = len(mv)
        if n < 40:
            return None
        xid, mtype, rpcvers, prog_no, vers, proc, flavor, clen = _FAST_HEAD.unpack_from(mv, 0)
        prog = self._fast.get(prog_no)
        if mtype != 0 or rpcvers != 2 or prog is None or vers not in prog.versions or clen > _MAX_AUTH:
            return None
        pos = 32 + clen + (-clen & 3)
        if flavor == _AUTH_SYS:
            cred = self._creds.get(bytes(mv[32 : 32 + clen]))
            if cred is None:
                return None
        elif flavor == _AUTH_NONE:
            cred = None
        else:
            return None
        if n < pos + 8:
            return None
        vflavor, vlen = _TWO.unpack_from(mv, pos)
        if (vflavor != _AUTH_NONE and vflavor != _AUTH_SYS) or vlen > _MAX_AUTH:
            return None
        pos += 8 + vlen + (-vlen & 3)
        if n < pos:
            return None
        run = prog.call_fast(proc, mv, pos, host, transport, max_reply, cred)
        if run is None:
            return None
        key = None
        if prog.non_idempotent(vers, proc):
            key = self.drc.key(xid, host, prog_no, vers, proc, mv[pos:])
            if key in self._in_progress:
                return None  # (begin/finish drop or wait, as the rules say)
            self.stats.calls += 1
            state, cached = self.drc.lookup(key)
            if state is DrcState.DONE:
                assert cached is not None
                return [cached]
        else:
            self.stats.calls += 1
        return self._complete(xid, prog, proc, run, key, send=send)
