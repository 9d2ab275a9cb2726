"""ONC RPC version 2 messages (RFC 5531): calls, replies and the AUTH_NONE / AUTH_SYS flavors.

Sans-IO: functions here take and give bytes. `decode_call` splits a call into its header and the
undecoded procedure arguments; `encode_reply_*` build complete reply messages around an already
encoded result body.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field

from nfs.xdr import Packer, Unpacker, XdrError

RPC_VERSION = 2
CALL = 0
REPLY = 1

MAX_AUTH_BYTES = 400


class AuthFlavor(enum.IntEnum):
    AUTH_NONE = 0
    AUTH_SYS = 1
    AUTH_SHORT = 2
    AUTH_DH = 3
    RPCSEC_GSS = 6


class ReplyStat(enum.IntEnum):
    MSG_ACCEPTED = 0
    MSG_DENIED = 1


class AcceptStat(enum.IntEnum):
    SUCCESS = 0
    PROG_UNAVAIL = 1
    PROG_MISMATCH = 2
    PROC_UNAVAIL = 3
    GARBAGE_ARGS = 4
    SYSTEM_ERR = 5


class RejectStat(enum.IntEnum):
    RPC_MISMATCH = 0
    AUTH_ERROR = 1


class AuthStat(enum.IntEnum):
    AUTH_OK = 0
    AUTH_BADCRED = 1
    AUTH_REJECTEDCRED = 2
    AUTH_BADVERF = 3
    AUTH_REJECTEDVERF = 4
    AUTH_TOOWEAK = 5
    AUTH_INVALIDRESP = 6
    AUTH_FAILED = 7


class RpcError(Exception):
    """A reply that is not MSG_ACCEPTED/SUCCESS, or a reply we could not decode."""

    def __init__(self, message: str, accept_stat: AcceptStat | None = None,
                 reject_stat: RejectStat | None = None, auth_stat: AuthStat | None = None) -> None:
        super().__init__(message)
        self.accept_stat = accept_stat
        self.reject_stat = reject_stat
        self.auth_stat = auth_stat


@dataclass(frozen=True)
class OpaqueAuth:
    flavor: int = AuthFlavor.AUTH_NONE
    body: bytes = b""

    def pack(self, p: Packer) -> None:
        p.u32(self.flavor)
        p.opaque(self.body, MAX_AUTH_BYTES)

    @classmethod
    def unpack(cls, u: Unpacker) -> OpaqueAuth:
        flavor = u.u32()
        return cls(flavor, u.opaque(MAX_AUTH_BYTES))


AUTH_NONE = OpaqueAuth()


@dataclass(frozen=True)
class AuthSys:
    """authsys_parms: the Unix credentials a client asserts."""

    stamp: int = 0
    machinename: str = "netswap"
    uid: int = 0
    gid: int = 0
    gids: tuple[int, ...] = field(default_factory=tuple)

    def to_auth(self) -> OpaqueAuth:
        p = Packer()
        p.u32(self.stamp)
        p.string(self.machinename, 255)
        p.u32(self.uid)
        p.u32(self.gid)
        p.array(list(self.gids), p.u32, 16)
        return OpaqueAuth(AuthFlavor.AUTH_SYS, p.bytes())

    @classmethod
    def from_auth(cls, auth: OpaqueAuth) -> AuthSys:
        u = Unpacker(auth.body)
        stamp = u.u32()
        name = u.string(255)
        uid = u.u32()
        gid = u.u32()
        gids = tuple(u.array(u.u32, 16))
        return cls(stamp, name, uid, gid, gids)


@dataclass
class CallHeader:
    xid: int
    prog: int
    vers: int
    proc: int
    cred: OpaqueAuth
    verf: OpaqueAuth


_CALL_HEAD = struct.Struct(">IIIIII")  # xid, CALL, rpcvers, prog, vers, proc


def encode_call(xid: int, prog: int, vers: int, proc: int, args: bytes | bytearray | memoryview = b"",
                cred: OpaqueAuth = AUTH_NONE, verf: OpaqueAuth = AUTH_NONE) -> bytearray:
    p = Packer(bytearray(_CALL_HEAD.pack(xid, CALL, RPC_VERSION, prog, vers, proc)))
    cred.pack(p)
    verf.pack(p)
    p.raw(args)
    return p.buf


class RpcVersionMismatch(Exception):
    def __init__(self, xid: int) -> None:
        super().__init__("rpcvers is not 2")
        self.xid = xid


def peek_xid(msg: bytes | bytearray | memoryview) -> int | None:
    return struct.unpack_from(">I", msg, 0)[0] if len(msg) >= 4 else None


def decode_call(msg: bytes | bytearray | memoryview) -> tuple[CallHeader, Unpacker]:
    """Decode a call header. Raises XdrError if the header itself is unreadable (drop the
    message), RpcVersionMismatch if rpcvers != 2 (answer RPC_MISMATCH)."""
    u = Unpacker(msg)
    if u.end < 24:
        raise XdrError("truncated call header")
    xid, mtype, rpcvers, prog, vers, proc = _CALL_HEAD.unpack_from(u.buf, 0)
    u.pos = 24
    if mtype != CALL:
        raise XdrError(f"not a call (msg_type {mtype})")
    if rpcvers != RPC_VERSION:
        raise RpcVersionMismatch(xid)
    cred = OpaqueAuth.unpack(u)
    verf = OpaqueAuth.unpack(u)
    return CallHeader(xid, prog, vers, proc, cred, verf), u


_ACCEPTED_HEAD = struct.Struct(">IIIIII")  # xid, REPLY, MSG_ACCEPTED, verf flavor, verf len(0), stat


def reply_header(xid: int, stat: AcceptStat = AcceptStat.SUCCESS) -> bytes:
    """An accepted reply header with a null verifier; the result body follows it."""
    return _ACCEPTED_HEAD.pack(xid, REPLY, ReplyStat.MSG_ACCEPTED, AuthFlavor.AUTH_NONE, 0, stat)


REPLY_HEADER_LEN = _ACCEPTED_HEAD.size


def encode_reply_accepted(xid: int, stat: AcceptStat = AcceptStat.SUCCESS,
                          body: bytes | bytearray | memoryview = b"", low: int = 0, high: int = 0) -> bytes:
    head = reply_header(xid, stat)
    if stat == AcceptStat.PROG_MISMATCH:
        return head + struct.pack(">II", low, high)
    if stat == AcceptStat.SUCCESS:
        return head + bytes(body)
    return head


def encode_reply_denied(xid: int, reject: RejectStat, auth_stat: AuthStat = AuthStat.AUTH_OK) -> bytes:
    if reject == RejectStat.RPC_MISMATCH:
        return struct.pack(">IIIIII", xid, REPLY, ReplyStat.MSG_DENIED, reject, RPC_VERSION, RPC_VERSION)
    return struct.pack(">IIIII", xid, REPLY, ReplyStat.MSG_DENIED, reject, auth_stat)


def decode_reply(msg: bytes | bytearray | memoryview) -> tuple[int, Unpacker]:
    """Decode a reply. Returns (xid, unpacker at the result body) for MSG_ACCEPTED/SUCCESS,
    raises RpcError otherwise (XdrError if the message is not a well-formed reply)."""
    u = Unpacker(msg)
    xid = u.u32()
    if u.u32() != REPLY:
        raise XdrError("not a reply")
    rstat = u.u32()
    if rstat == ReplyStat.MSG_ACCEPTED:
        OpaqueAuth.unpack(u)  # verifier: AUTH_NONE/AUTH_SYS servers send null verifiers
        astat = u.u32()
        if astat == AcceptStat.SUCCESS:
            return xid, u
        try:
            stat = AcceptStat(astat)
        except ValueError:
            raise XdrError(f"bad accept_stat {astat}") from None
        if stat == AcceptStat.PROG_MISMATCH:
            lo, hi = u.u32(), u.u32()
            raise RpcError(f"xid {xid:#x}: PROG_MISMATCH (supported {lo}..{hi})", accept_stat=stat)
        raise RpcError(f"xid {xid:#x}: {stat.name}", accept_stat=stat)
    if rstat == ReplyStat.MSG_DENIED:
        rej = u.u32()
        if rej == RejectStat.RPC_MISMATCH:
            raise RpcError(f"xid {xid:#x}: RPC_MISMATCH", reject_stat=RejectStat.RPC_MISMATCH)
        if rej == RejectStat.AUTH_ERROR:
            a = u.u32()
            try:
                ast = AuthStat(a)
            except ValueError:
                ast = AuthStat.AUTH_FAILED
            raise RpcError(f"xid {xid:#x}: AUTH_ERROR {ast.name}", reject_stat=RejectStat.AUTH_ERROR, auth_stat=ast)
        raise XdrError(f"bad reject_stat {rej}")
    raise XdrError(f"bad reply_stat {rstat}")


def reply_xid(msg: bytes | bytearray | memoryview) -> int | None:
    """The xid of a well-formed-looking reply, or None (cheap filter for stray datagrams)."""
    if len(msg) < 12:
        return None
    xid, mtype = struct.unpack_from(">II", msg, 0)
    return xid if mtype == REPLY else None
