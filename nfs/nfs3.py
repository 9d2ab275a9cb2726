"""NFS version 3 (RFC 1813): constants, data types and the XDR codecs of the procedures.

Both directions live here so the server (nfs/nfsd.py) and the client (nfs/client.py) share one
definition of every structure. READ and WRITE have dedicated fast codecs with `struct`, since
they carry the bulk of the bytes.
"""

from __future__ import annotations

import enum
import os
import stat as pystat
import struct
from dataclasses import dataclass

from nfs.xdr import Packer, Unpacker, XdrError

NFS_PROGRAM = 100003
NFS_V3 = 3
NFS3_FHSIZE = 64
NFS3_COOKIEVERFSIZE = 8
NFS3_CREATEVERFSIZE = 8
NFS3_WRITEVERFSIZE = 8
NAME_MAX = 255
PATH_MAX = 1024


class Proc(enum.IntEnum):
    NULL = 0
    GETATTR = 1
    SETATTR = 2
    LOOKUP = 3
    ACCESS = 4
    READLINK = 5
    READ = 6
    WRITE = 7
    CREATE = 8
    MKDIR = 9
    SYMLINK = 10
    MKNOD = 11
    REMOVE = 12
    RMDIR = 13
    RENAME = 14
    LINK = 15
    READDIR = 16
    READDIRPLUS = 17
    FSSTAT = 18
    FSINFO = 19
    PATHCONF = 20
    COMMIT = 21


class Stat(enum.IntEnum):
    NFS3_OK = 0
    NFS3ERR_PERM = 1
    NFS3ERR_NOENT = 2
    NFS3ERR_IO = 5
    NFS3ERR_NXIO = 6
    NFS3ERR_ACCES = 13
    NFS3ERR_EXIST = 17
    NFS3ERR_XDEV = 18
    NFS3ERR_NODEV = 19
    NFS3ERR_NOTDIR = 20
    NFS3ERR_ISDIR = 21
    NFS3ERR_INVAL = 22
    NFS3ERR_FBIG = 27
    NFS3ERR_NOSPC = 28
    NFS3ERR_ROFS = 30
    NFS3ERR_MLINK = 31
    NFS3ERR_NAMETOOLONG = 63
    NFS3ERR_NOTEMPTY = 66
    NFS3ERR_DQUOT = 69
    NFS3ERR_STALE = 70
    NFS3ERR_REMOTE = 71
    NFS3ERR_BADHANDLE = 10001
    NFS3ERR_NOT_SYNC = 10002
    NFS3ERR_BAD_COOKIE = 10003
    NFS3ERR_NOTSUPP = 10004
    NFS3ERR_TOOSMALL = 10005
    NFS3ERR_SERVERFAULT = 10006
    NFS3ERR_BADTYPE = 10007
    NFS3ERR_JUKEBOX = 10008


class Nfs3Error(Exception):
    """An NFS3ERR_* status from the server (client side) or to return (server side)."""

    def __init__(self, status: int, message: str = "") -> None:
        try:
            name = Stat(status).name
        except ValueError:
            name = f"status {status}"
        super().__init__(f"{name}{': ' + message if message else ''}")
        self.status = status


class FType(enum.IntEnum):
    NF3REG = 1
    NF3DIR = 2
    NF3BLK = 3
    NF3CHR = 4
    NF3LNK = 5
    NF3SOCK = 6
    NF3FIFO = 7


class StableHow(enum.IntEnum):
    UNSTABLE = 0
    DATA_SYNC = 1
    FILE_SYNC = 2


UNSTABLE = StableHow.UNSTABLE
DATA_SYNC = StableHow.DATA_SYNC
FILE_SYNC = StableHow.FILE_SYNC


class CreateMode(enum.IntEnum):
    UNCHECKED = 0
    GUARDED = 1
    EXCLUSIVE = 2


class TimeHow(enum.IntEnum):
    DONT_CHANGE = 0
    SET_TO_SERVER_TIME = 1
    SET_TO_CLIENT_TIME = 2


ACCESS3_READ = 0x0001
ACCESS3_LOOKUP = 0x0002
ACCESS3_MODIFY = 0x0004
ACCESS3_EXTEND = 0x0008
ACCESS3_DELETE = 0x0010
ACCESS3_EXECUTE = 0x0020

FSF3_LINK = 0x0001
FSF3_SYMLINK = 0x0002
FSF3_HOMOGENEOUS = 0x0008
FSF3_CANSETTIME = 0x0010

# The procedures whose replies the duplicate request cache keeps (knfsd: RC_REPLBUFF/REPLSTAT).
NON_IDEMPOTENT = frozenset({Proc.SETATTR, Proc.WRITE, Proc.CREATE, Proc.MKDIR, Proc.SYMLINK,
                            Proc.MKNOD, Proc.REMOVE, Proc.RMDIR, Proc.RENAME, Proc.LINK})

_FATTR = struct.Struct(">IIIIIQQIIQQIIIIII")
FATTR3_SIZE = _FATTR.size  # 84
assert FATTR3_SIZE == 84


def _ftype(mode: int) -> FType:
    if pystat.S_ISREG(mode):
        return FType.NF3REG
    if pystat.S_ISDIR(mode):
        return FType.NF3DIR
    if pystat.S_ISLNK(mode):
        return FType.NF3LNK
    if pystat.S_ISBLK(mode):
        return FType.NF3BLK
    if pystat.S_ISCHR(mode):
        return FType.NF3CHR
    if pystat.S_ISSOCK(mode):
        return FType.NF3SOCK
    return FType.NF3FIFO


@dataclass(frozen=True)
class NfsTime:
    seconds: int
    nseconds: int

    @classmethod
    def from_ns(cls, ns: int) -> NfsTime:
        return cls((ns // 1_000_000_000) & 0xFFFF_FFFF, ns % 1_000_000_000)

    def to_ns(self) -> int:
        return self.seconds * 1_000_000_000 + self.nseconds


@dataclass(frozen=True)
class Fattr3:
    type: int
    mode: int
    nlink: int
    uid: int
    gid: int
    size: int
    used: int
    rdev: tuple[int, int]
    fsid: int
    fileid: int
    atime: NfsTime
    mtime: NfsTime
    ctime: NfsTime

    @classmethod
    def from_stat(cls, st: os.stat_result, fsid: int) -> Fattr3:
        return cls(_ftype(st.st_mode), pystat.S_IMODE(st.st_mode), st.st_nlink, st.st_uid, st.st_gid,
                   st.st_size, st.st_blocks * 512, (os.major(st.st_rdev), os.minor(st.st_rdev)), fsid,
                   st.st_ino, NfsTime.from_ns(st.st_atime_ns), NfsTime.from_ns(st.st_mtime_ns),
                   NfsTime.from_ns(st.st_ctime_ns))

    def pack(self, p: Packer) -> None:
        p.raw(_FATTR.pack(self.type, self.mode, self.nlink, self.uid & 0xFFFF_FFFF, self.gid & 0xFFFF_FFFF,
                          self.size, self.used, self.rdev[0], self.rdev[1], self.fsid, self.fileid,
                          self.atime.seconds, self.atime.nseconds, self.mtime.seconds, self.mtime.nseconds,
                          self.ctime.seconds, self.ctime.nseconds))

    @classmethod
    def unpack(cls, u: Unpacker) -> Fattr3:
        v = _FATTR.unpack_from(u.buf, u._need(FATTR3_SIZE))
        if v[0] not in FType._value2member_map_:
            raise XdrError(f"bad ftype3 {v[0]}")
        return cls(v[0], v[1], v[2], v[3], v[4], v[5], v[6], (v[7], v[8]), v[9], v[10],
                   NfsTime(v[11], v[12]), NfsTime(v[13], v[14]), NfsTime(v[15], v[16]))


def fattr_bytes(st: os.stat_result, fsid: int) -> bytes:
    """post_op_attr (attributes_follow = TRUE + fattr3) straight from a stat result (hot path)."""
    mode = st.st_mode
    return b"\0\0\0\1" + _FATTR.pack(
        _ftype(mode), mode & 0o7777, st.st_nlink, st.st_uid, st.st_gid, st.st_size, st.st_blocks * 512,
        os.major(st.st_rdev), os.minor(st.st_rdev), fsid, st.st_ino,
        (st.st_atime_ns // 1_000_000_000) & 0xFFFF_FFFF, st.st_atime_ns % 1_000_000_000,
        (st.st_mtime_ns // 1_000_000_000) & 0xFFFF_FFFF, st.st_mtime_ns % 1_000_000_000,
        (st.st_ctime_ns // 1_000_000_000) & 0xFFFF_FFFF, st.st_ctime_ns % 1_000_000_000)


NO_ATTR = b"\0\0\0\0"  # post_op_attr / pre_op_attr with attributes_follow = FALSE
NO_WCC = NO_ATTR + NO_ATTR


def pack_post_op_attr(p: Packer, a: Fattr3 | None) -> None:
    p.optional(a, lambda x: x.pack(p))


def unpack_post_op_attr(u: Unpacker) -> Fattr3 | None:
    return u.optional(lambda: Fattr3.unpack(u))


@dataclass(frozen=True)
class WccAttr:
    size: int
    mtime: NfsTime
    ctime: NfsTime

    @classmethod
    def from_stat(cls, st: os.stat_result) -> WccAttr:
        return cls(st.st_size, NfsTime.from_ns(st.st_mtime_ns), NfsTime.from_ns(st.st_ctime_ns))

    def pack(self, p: Packer) -> None:
        p.u64(self.size)
        p.u32(self.mtime.seconds)
        p.u32(self.mtime.nseconds)
        p.u32(self.ctime.seconds)
        p.u32(self.ctime.nseconds)

    @classmethod
    def unpack(cls, u: Unpacker) -> WccAttr:
        size = u.u64()
        return cls(size, NfsTime(u.u32(), u.u32()), NfsTime(u.u32(), u.u32()))


@dataclass(frozen=True)
class WccData:
    before: WccAttr | None = None
    after: Fattr3 | None = None

    def pack(self, p: Packer) -> None:
        p.optional(self.before, lambda x: x.pack(p))
        pack_post_op_attr(p, self.after)

    @classmethod
    def unpack(cls, u: Unpacker) -> WccData:
        before = u.optional(lambda: WccAttr.unpack(u))
        return cls(before, unpack_post_op_attr(u))


def pack_time(p: Packer, t: NfsTime) -> None:
    p.u32(t.seconds)
    p.u32(t.nseconds)


def unpack_time(u: Unpacker) -> NfsTime:
    s = u.u32()
    ns = u.u32()
    return NfsTime(s, ns)


@dataclass(frozen=True)
class Sattr3:
    """The attributes to set; None leaves one alone. atime/mtime: None, SERVER (a string), or
    an NfsTime given by the client."""

    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    size: int | None = None
    atime: NfsTime | str | None = None
    mtime: NfsTime | str | None = None

    def pack(self, p: Packer) -> None:
        for v in (self.mode, self.uid, self.gid):
            p.optional(v, p.u32)
        p.optional(self.size, p.u64)
        for t in (self.atime, self.mtime):
            if t is None:
                p.u32(TimeHow.DONT_CHANGE)
            elif isinstance(t, str):
                p.u32(TimeHow.SET_TO_SERVER_TIME)
            else:
                p.u32(TimeHow.SET_TO_CLIENT_TIME)
                pack_time(p, t)

    @classmethod
    def unpack(cls, u: Unpacker) -> Sattr3:
        mode = u.optional(u.u32)
        uid = u.optional(u.u32)
        gid = u.optional(u.u32)
        size = u.optional(u.u64)
        times: list[NfsTime | str | None] = []
        for _ in range(2):
            how = u.u32()
            if how == TimeHow.DONT_CHANGE:
                times.append(None)
            elif how == TimeHow.SET_TO_SERVER_TIME:
                times.append("server")
            elif how == TimeHow.SET_TO_CLIENT_TIME:
                times.append(unpack_time(u))
            else:
                raise XdrError(f"bad time_how {how}")
        return cls(mode, uid, gid, size, times[0], times[1])


def pack_fh(p: Packer, fh: bytes) -> None:
    p.opaque(fh, NFS3_FHSIZE)


def unpack_fh(u: Unpacker) -> bytes:
    return u.opaque(NFS3_FHSIZE)


def unpack_name(u: Unpacker) -> str:
    # filename3 is string<> (unbounded): read up to PATH_MAX so that a long name gets
    # NFS3ERR_NAMETOOLONG from the procedure, not GARBAGE_ARGS.
    return u.string(PATH_MAX)


def pack_diropargs(p: Packer, dir_fh: bytes, name: str) -> None:
    pack_fh(p, dir_fh)
    p.string(name, NAME_MAX)


# -- READ / WRITE fast codecs -------------------------------------------------------------------

_FH_LEN = struct.Struct(">I")
_READ_TAIL = struct.Struct(">QI")  # offset, count
_WRITE_TAIL = struct.Struct(">QIII")  # offset, count, stable, data length


def encode_read_args(fh: bytes, offset: int, count: int) -> bytes:
    n = len(fh)
    return _FH_LEN.pack(n) + fh + b"\0" * ((4 - n % 4) % 4) + _READ_TAIL.pack(offset, count)


def decode_read_args(u: Unpacker) -> tuple[bytes, int, int]:
    fh = unpack_fh(u)
    off, count = _READ_TAIL.unpack_from(u.buf, u._need(12))
    return fh, off, count


def encode_write_args_head(fh: bytes, offset: int, count: int, stable: int) -> bytes:
    """WRITE3args up to (and including) the data length; the data and its padding follow."""
    n = len(fh)
    return _FH_LEN.pack(n) + fh + b"\0" * ((4 - n % 4) % 4) + _WRITE_TAIL.pack(offset, count, stable, count)


def decode_write_args(u: Unpacker) -> tuple[bytes, int, int, int, memoryview]:
    fh = unpack_fh(u)
    off, count, stable, dlen = _WRITE_TAIL.unpack_from(u.buf, u._need(20))
    if stable > 2:
        raise XdrError(f"bad stable_how {stable}")
    data = u.fopaque_view(dlen)
    return fh, off, count, stable, data


@dataclass(frozen=True)
class ReadRes:
    attr: Fattr3 | None
    count: int
    eof: bool
    data: bytes


def decode_read_res(u: Unpacker) -> ReadRes:
    status = u.u32()
    attr = unpack_post_op_attr(u)
    if status != Stat.NFS3_OK:
        raise Nfs3Error(status, "READ")
    count = u.u32()
    eof = u.bool()
    data = u.opaque()
    return ReadRes(attr, count, eof, data)


@dataclass(frozen=True)
class WriteRes:
    wcc: WccData
    count: int
    committed: int
    verf: bytes


def decode_write_res(u: Unpacker) -> WriteRes:
    status = u.u32()
    wcc = WccData.unpack(u)
    if status != Stat.NFS3_OK:
        raise Nfs3Error(status, "WRITE")
    count = u.u32()
    committed = u.u32()
    verf = u.fopaque(NFS3_WRITEVERFSIZE)
    return WriteRes(wcc, count, committed, verf)


@dataclass(frozen=True)
class FsInfo:
    attr: Fattr3 | None
    rtmax: int
    rtpref: int
    rtmult: int
    wtmax: int
    wtpref: int
    wtmult: int
    dtpref: int
    maxfilesize: int
    time_delta: NfsTime
    properties: int

    def pack(self, p: Packer) -> None:
        pack_post_op_attr(p, self.attr)
        for v in (self.rtmax, self.rtpref, self.rtmult, self.wtmax, self.wtpref, self.wtmult, self.dtpref):
            p.u32(v)
        p.u64(self.maxfilesize)
        pack_time(p, self.time_delta)
        p.u32(self.properties)

    @classmethod
    def unpack(cls, u: Unpacker) -> FsInfo:
        attr = unpack_post_op_attr(u)
        rtmax, rtpref, rtmult, wtmax, wtpref, wtmult, dtpref = (u.u32() for _ in range(7))
        return cls(attr, rtmax, rtpref, rtmult, wtmax, wtpref, wtmult, dtpref, u.u64(), unpack_time(u), u.u32())


@dataclass(frozen=True)
class FsStat:
    attr: Fattr3 | None
    tbytes: int
    fbytes: int
    abytes: int
    tfiles: int
    ffiles: int
    afiles: int
    invarsec: int

    def pack(self, p: Packer) -> None:
        pack_post_op_attr(p, self.attr)
        for v in (self.tbytes, self.fbytes, self.abytes, self.tfiles, self.ffiles, self.afiles):
            p.u64(v)
        p.u32(self.invarsec)

    @classmethod
    def unpack(cls, u: Unpacker) -> FsStat:
        attr = unpack_post_op_attr(u)
        tbytes, fbytes, abytes, tfiles, ffiles, afiles = (u.u64() for _ in range(6))
        return cls(attr, tbytes, fbytes, abytes, tfiles, ffiles, afiles, u.u32())
