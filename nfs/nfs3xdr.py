"""NFSv3 XDR (RFC 1813): the data types and, for each of the 22 procedures, its arguments and
its result with their encoders and decoders, for both directions (Linux's nfs3xdr.c, client
and server in one).

The client encodes arguments and decodes results; the server decodes arguments and encodes
results, with the same codecs. `NFS3_PROCEDURES` is the table both sides dispatch through:
procedure -> (argument type, result type, the four codecs).

A result is one dataclass per procedure: `status` and every field of the RFC's resok/resfail
arms, the fields only resok has left at their defaults on failure. Bulk data is never copied:
a decoded WRITE or READ holds a memoryview of the message, and an encoded READ result or WRITE
call carries its data by reference (`Packer.payload`), so the server can sendfile(2) it.
"""

from __future__ import annotations

import os
import stat as pystat
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from nfs.nfs3 import (
    NFS3_COOKIEVERFSIZE, NFS3_CREATEVERFSIZE, NFS3_FHSIZE, NFS3_WRITEVERFSIZE, PATH_MAX, CreateMode, FType, Proc,
    StableHow, Stat, TimeHow,
)
from nfs.xdr import Packer, Payload, Unpacker, XdrError

# -- basic types ------------------------------------------------------------------------------

_FATTR = struct.Struct(">IIIIIQQIIQQIIIIII")
FATTR3_SIZE = _FATTR.size  # 84
_WCC_ATTR = struct.Struct(">QIIII")  # size, mtime, ctime
_TRUE = b"\0\0\0\1"
_FALSE = b"\0\0\0\0"
_FTYPES = frozenset(FType._value2member_map_)


def ftype(mode: int) -> FType:
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


@dataclass(frozen=True, slots=True)
class NfsTime:
    """nfstime3."""

    seconds: int
    nseconds: int

    @classmethod
    def from_ns(cls, ns: int) -> NfsTime:
        return cls((ns // 1_000_000_000) & 0xFFFF_FFFF, ns % 1_000_000_000)

    def to_ns(self) -> int:
        return self.seconds * 1_000_000_000 + self.nseconds


def pack_time(p: Packer, t: NfsTime) -> None:
    p.u32(t.seconds)
    p.u32(t.nseconds)


def unpack_time(u: Unpacker) -> NfsTime:
    s = u.u32()
    return NfsTime(s, u.u32())


def _sec(ns: int) -> int:
    return (ns // 1_000_000_000) & 0xFFFF_FFFF


@dataclass(slots=True)
class Fattr3:
    """fattr3. The server makes it from an lstat (`from_stat`); its encoding is 84 bytes."""

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
        return cls(ftype(st.st_mode), pystat.S_IMODE(st.st_mode), st.st_nlink, st.st_uid, st.st_gid, st.st_size,
                   st.st_blocks * 512, (os.major(st.st_rdev), os.minor(st.st_rdev)), fsid, st.st_ino,
                   NfsTime.from_ns(st.st_atime_ns), NfsTime.from_ns(st.st_mtime_ns), NfsTime.from_ns(st.st_ctime_ns))

    def pack(self, p: Packer) -> None:
        p.buf += _FATTR.pack(self.type, self.mode, self.nlink, self.uid & 0xFFFF_FFFF, self.gid & 0xFFFF_FFFF,
                             self.size, self.used, self.rdev[0], self.rdev[1], self.fsid, self.fileid,
                             self.atime.seconds, self.atime.nseconds, self.mtime.seconds, self.mtime.nseconds,
                             self.ctime.seconds, self.ctime.nseconds)

    @classmethod
    def unpack(cls, u: Unpacker) -> Fattr3:
        v = _FATTR.unpack_from(u.buf, u._need(FATTR3_SIZE))
        if v[0] not in _FTYPES:
            raise XdrError(f"bad ftype3 {v[0]}")
        return cls(v[0], v[1], v[2], v[3], v[4], v[5], v[6], (v[7], v[8]), v[9], v[10],
                   NfsTime(v[11], v[12]), NfsTime(v[13], v[14]), NfsTime(v[15], v[16]))


class StatAttr:
    """A post_op_attr the server encodes straight from an lstat, with no Fattr3 made on the
    way (every reply carries one or two). Decoded, it is a Fattr3."""

    __slots__ = ("st", "fsid")

    def __init__(self, st: os.stat_result, fsid: int) -> None:
        self.st, self.fsid = st, fsid

    def pack(self, p: Packer) -> None:
        p.buf += fattr3_bytes(self.st, self.fsid)

    def fattr(self) -> Fattr3:
        return Fattr3.from_stat(self.st, self.fsid)


# S_IFMT bits -> ftype3, for the encoder every reply runs (ftype() gives the same: FIFO otherwise).
_FTYPE_OF = {pystat.S_IFREG: int(FType.NF3REG), pystat.S_IFDIR: int(FType.NF3DIR), pystat.S_IFLNK: int(FType.NF3LNK),
             pystat.S_IFBLK: int(FType.NF3BLK), pystat.S_IFCHR: int(FType.NF3CHR), pystat.S_IFSOCK: int(FType.NF3SOCK)}
_FIFO = int(FType.NF3FIFO)
_NS = 1_000_000_000


def fattr3_bytes(st: os.stat_result, fsid: int) -> bytes:
    """The fattr3 of an lstat (or fstat), encoded (in every reply: written out for speed)."""
    mode = st.st_mode
    a, m, c = st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns
    rdev = st.st_rdev
    return _FATTR.pack(_FTYPE_OF.get(mode & 0o170000, _FIFO), mode & 0o7777, st.st_nlink, st.st_uid, st.st_gid,
                       st.st_size, st.st_blocks * 512, os.major(rdev) if rdev else 0, os.minor(rdev) if rdev else 0,
                       fsid, st.st_ino, (a // _NS) & 0xFFFF_FFFF, a % _NS, (m // _NS) & 0xFFFF_FFFF, m % _NS,
                       (c // _NS) & 0xFFFF_FFFF, c % _NS)


def wcc_attr_bytes(st: os.stat_result) -> bytes:
    """The wcc_attr (size, mtime, ctime) of an lstat, encoded."""
    m, c = st.st_mtime_ns, st.st_ctime_ns
    return _WCC_ATTR.pack(st.st_size, (m // _NS) & 0xFFFF_FFFF, m % _NS, (c // _NS) & 0xFFFF_FFFF, c % _NS)


Attr = Fattr3 | StatAttr


def pack_post_op_attr(p: Packer, a: Attr | None) -> None:
    if a is None:
        p.buf += _FALSE
    else:
        p.buf += _TRUE
        a.pack(p)


def unpack_post_op_attr(u: Unpacker) -> Fattr3 | None:
    return Fattr3.unpack(u) if u.bool() else None


@dataclass(frozen=True, slots=True)
class WccAttr:
    """wcc_attr: what pre_op_attr holds."""

    size: int
    mtime: NfsTime
    ctime: NfsTime

    @classmethod
    def from_stat(cls, st: os.stat_result) -> WccAttr:
        return cls(st.st_size, NfsTime.from_ns(st.st_mtime_ns), NfsTime.from_ns(st.st_ctime_ns))

    def pack(self, p: Packer) -> None:
        p.buf += _WCC_ATTR.pack(self.size, self.mtime.seconds, self.mtime.nseconds, self.ctime.seconds,
                                self.ctime.nseconds)

    @classmethod
    def unpack(cls, u: Unpacker) -> WccAttr:
        v = _WCC_ATTR.unpack_from(u.buf, u._need(_WCC_ATTR.size))
        return cls(v[0], NfsTime(v[1], v[2]), NfsTime(v[3], v[4]))


@dataclass(slots=True)
class WccData:
    """wcc_data: the object's attributes before (pre_op_attr) and after (post_op_attr)."""

    before: WccAttr | None = None
    after: Attr | None = None

    def pack(self, p: Packer) -> None:
        if self.before is None:
            p.buf += _FALSE
        else:
            p.buf += _TRUE
            self.before.pack(p)
        pack_post_op_attr(p, self.after)

    @classmethod
    def unpack(cls, u: Unpacker) -> WccData:
        before = WccAttr.unpack(u) if u.bool() else None
        return cls(before, unpack_post_op_attr(u))


SERVER_TIME = "server"  # sattr3's SET_TO_SERVER_TIME


@dataclass(frozen=True, slots=True)
class Sattr3:
    """sattr3: the attributes to set; None leaves one alone. atime/mtime: None, SERVER_TIME, or
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
                times.append(SERVER_TIME)
            elif how == TimeHow.SET_TO_CLIENT_TIME:
                times.append(unpack_time(u))
            else:
                raise XdrError(f"bad time_how {how}")
        return cls(mode, uid, gid, size, times[0], times[1])


NO_SATTR = Sattr3()

_FH_LEN = struct.Struct(">I")
_PADS = (b"", b"\0\0\0", b"\0\0", b"\0")


def pack_fh(p: Packer, fh: bytes) -> None:
    p.opaque(fh, NFS3_FHSIZE)


def unpack_fh(u: Unpacker) -> bytes:
    return u.opaque(NFS3_FHSIZE)


def pack_post_op_fh(p: Packer, fh: bytes | None) -> None:
    p.optional(fh, lambda f: pack_fh(p, f))


def unpack_post_op_fh(u: Unpacker) -> bytes | None:
    return unpack_fh(u) if u.bool() else None


def pack_name(p: Packer, name: str | bytes) -> None:
    p.string(name)


def unpack_name(u: Unpacker) -> str:
    # filename3 is string<> (unbounded): read up to PATH_MAX so that a long name gets
    # NFS3ERR_NAMETOOLONG from the procedure, not GARBAGE_ARGS. Non-UTF-8 bytes survive as
    # surrogates (os.fsdecode's way), so the name reaches the disk as the client sent it.
    return u.string(PATH_MAX)


def pack_path(p: Packer, path: str | bytes) -> None:
    p.string(path)


def unpack_path(u: Unpacker) -> str:
    return u.string(PATH_MAX)


def _verf(u: Unpacker, size: int = 8) -> bytes:
    return u.fopaque(size)


# -- arguments --------------------------------------------------------------------------------
# Each: the RFC's <PROC>3args; `encode_args(p, a)` / `decode_args(u)` below, in the table.


@dataclass(frozen=True, slots=True)
class Void:
    pass


VOID = Void()


@dataclass(frozen=True, slots=True)
class FhArgs:
    """GETATTR, READLINK, FSSTAT, FSINFO, PATHCONF: just the object."""

    object: bytes


@dataclass(frozen=True, slots=True)
class DirOpArgs:
    """diropargs3: LOOKUP, REMOVE, RMDIR."""

    dir: bytes
    name: str


@dataclass(frozen=True, slots=True)
class SetattrArgs:
    object: bytes
    new_attributes: Sattr3
    guard: NfsTime | None = None  # sattrguard3: the ctime the object must still have


@dataclass(frozen=True, slots=True)
class AccessArgs:
    object: bytes
    access: int


@dataclass(frozen=True, slots=True)
class ReadArgs:
    file: bytes
    offset: int
    count: int


@dataclass(frozen=True, slots=True)
class WriteArgs:
    file: bytes
    offset: int
    count: int
    stable: int
    data: Payload  # a memoryview of the call when decoded


@dataclass(frozen=True, slots=True)
class CreateArgs:
    where: DirOpArgs
    how: int = CreateMode.UNCHECKED
    attributes: Sattr3 = NO_SATTR  # UNCHECKED, GUARDED
    verf: bytes = b""  # EXCLUSIVE: createverf3


@dataclass(frozen=True, slots=True)
class MkdirArgs:
    where: DirOpArgs
    attributes: Sattr3 = NO_SATTR


@dataclass(frozen=True, slots=True)
class SymlinkArgs:
    where: DirOpArgs
    symlink_data: str  # the target: data, never followed by the server
    symlink_attributes: Sattr3 = NO_SATTR


@dataclass(frozen=True, slots=True)
class MknodArgs:
    where: DirOpArgs
    type: int
    attributes: Sattr3 = NO_SATTR  # CHR/BLK: dev_attributes, SOCK/FIFO: pipe_attributes
    spec: tuple[int, int] = (0, 0)  # CHR/BLK: specdata3 (major, minor)


@dataclass(frozen=True, slots=True)
class RenameArgs:
    source: DirOpArgs  # from
    target: DirOpArgs  # to


@dataclass(frozen=True, slots=True)
class LinkArgs:
    file: bytes
    link: DirOpArgs


@dataclass(frozen=True, slots=True)
class ReaddirArgs:
    dir: bytes
    cookie: int = 0
    cookieverf: bytes = bytes(NFS3_COOKIEVERFSIZE)
    count: int = 8192


@dataclass(frozen=True, slots=True)
class ReaddirplusArgs:
    dir: bytes
    cookie: int = 0
    cookieverf: bytes = bytes(NFS3_COOKIEVERFSIZE)
    dircount: int = 8192
    maxcount: int = 32768


@dataclass(frozen=True, slots=True)
class CommitArgs:
    file: bytes
    offset: int = 0
    count: int = 0


def _enc_void(p: Packer, a: Any) -> None:
    pass


def _dec_void(u: Unpacker) -> Void:
    return VOID


def _enc_fh(p: Packer, a: FhArgs) -> None:
    pack_fh(p, a.object)


def _dec_fh(u: Unpacker) -> FhArgs:
    return FhArgs(unpack_fh(u))


def _enc_dirop(p: Packer, a: DirOpArgs) -> None:
    pack_fh(p, a.dir)
    pack_name(p, a.name)


def _dec_dirop(u: Unpacker) -> DirOpArgs:
    fh = unpack_fh(u)
    return DirOpArgs(fh, unpack_name(u))


def _enc_setattr(p: Packer, a: SetattrArgs) -> None:
    pack_fh(p, a.object)
    a.new_attributes.pack(p)
    p.optional(a.guard, lambda t: pack_time(p, t))


def _dec_setattr(u: Unpacker) -> SetattrArgs:
    fh = unpack_fh(u)
    attrs = Sattr3.unpack(u)
    return SetattrArgs(fh, attrs, unpack_time(u) if u.bool() else None)


def _enc_access(p: Packer, a: AccessArgs) -> None:
    pack_fh(p, a.object)
    p.u32(a.access)


def _dec_access(u: Unpacker) -> AccessArgs:
    fh = unpack_fh(u)
    return AccessArgs(fh, u.u32())


_READ_TAIL = struct.Struct(">QI")  # offset, count
_WRITE_TAIL = struct.Struct(">QIII")  # offset, count, stable, data length


def _enc_read(p: Packer, a: ReadArgs) -> None:
    pack_fh(p, a.file)
    p.buf += _READ_TAIL.pack(a.offset, a.count)


def _dec_read(u: Unpacker) -> ReadArgs:
    fh = unpack_fh(u)
    off, count = _READ_TAIL.unpack_from(u.buf, u._need(12))
    return ReadArgs(fh, off, count)


def _enc_write(p: Packer, a: WriteArgs) -> None:
    pack_fh(p, a.file)
    p.buf += _WRITE_TAIL.pack(a.offset, a.count, a.stable, len(a.data))
    p.payload(a.data)


def _dec_write(u: Unpacker) -> WriteArgs:
    fh = unpack_fh(u)
    off, count, stable, dlen = _WRITE_TAIL.unpack_from(u.buf, u._need(20))
    if stable > StableHow.FILE_SYNC:
        raise XdrError(f"bad stable_how {stable}")
    data = u.fopaque_view(dlen)
    if count > dlen:
        raise XdrError(f"WRITE count {count} exceeds its {dlen} data bytes")
    return WriteArgs(fh, off, count, stable, data)


def _enc_create(p: Packer, a: CreateArgs) -> None:
    _enc_dirop(p, a.where)
    p.u32(a.how)
    if a.how == CreateMode.EXCLUSIVE:
        p.fopaque(a.verf, NFS3_CREATEVERFSIZE)
    else:
        a.attributes.pack(p)


def _dec_create(u: Unpacker) -> CreateArgs:
    where = _dec_dirop(u)
    how = u.u32()
    if how == CreateMode.EXCLUSIVE:
        return CreateArgs(where, how, NO_SATTR, u.fopaque(NFS3_CREATEVERFSIZE))
    if how not in (CreateMode.UNCHECKED, CreateMode.GUARDED):
        raise XdrError(f"bad createmode3 {how}")
    return CreateArgs(where, how, Sattr3.unpack(u))


def _enc_mkdir(p: Packer, a: MkdirArgs) -> None:
    _enc_dirop(p, a.where)
    a.attributes.pack(p)


def _dec_mkdir(u: Unpacker) -> MkdirArgs:
    where = _dec_dirop(u)
    return MkdirArgs(where, Sattr3.unpack(u))


def _enc_symlink(p: Packer, a: SymlinkArgs) -> None:
    _enc_dirop(p, a.where)
    a.symlink_attributes.pack(p)
    pack_path(p, a.symlink_data)


def _dec_symlink(u: Unpacker) -> SymlinkArgs:
    where = _dec_dirop(u)
    attrs = Sattr3.unpack(u)
    return SymlinkArgs(where, unpack_path(u), attrs)


def _enc_mknod(p: Packer, a: MknodArgs) -> None:
    _enc_dirop(p, a.where)
    p.u32(a.type)
    if a.type in (FType.NF3CHR, FType.NF3BLK):
        a.attributes.pack(p)
        p.u32(a.spec[0])
        p.u32(a.spec[1])
    elif a.type in (FType.NF3SOCK, FType.NF3FIFO):
        a.attributes.pack(p)


def _dec_mknod(u: Unpacker) -> MknodArgs:
    where = _dec_dirop(u)
    kind = u.u32()
    if kind not in _FTYPES:
        raise XdrError(f"bad ftype3 {kind}")
    if kind in (FType.NF3CHR, FType.NF3BLK):
        attrs = Sattr3.unpack(u)
        return MknodArgs(where, kind, attrs, (u.u32(), u.u32()))
    if kind in (FType.NF3SOCK, FType.NF3FIFO):
        return MknodArgs(where, kind, Sattr3.unpack(u))
    return MknodArgs(where, kind)  # REG, DIR, LNK: void here, BADTYPE from the procedure


def _enc_rename(p: Packer, a: RenameArgs) -> None:
    _enc_dirop(p, a.source)
    _enc_dirop(p, a.target)


def _dec_rename(u: Unpacker) -> RenameArgs:
    src = _dec_dirop(u)
    return RenameArgs(src, _dec_dirop(u))


def _enc_link(p: Packer, a: LinkArgs) -> None:
    pack_fh(p, a.file)
    _enc_dirop(p, a.link)


def _dec_link(u: Unpacker) -> LinkArgs:
    fh = unpack_fh(u)
    return LinkArgs(fh, _dec_dirop(u))


def _enc_readdir(p: Packer, a: ReaddirArgs) -> None:
    pack_fh(p, a.dir)
    p.u64(a.cookie)
    p.fopaque(a.cookieverf, NFS3_COOKIEVERFSIZE)
    p.u32(a.count)


def _dec_readdir(u: Unpacker) -> ReaddirArgs:
    fh = unpack_fh(u)
    cookie = u.u64()
    verf = _verf(u, NFS3_COOKIEVERFSIZE)
    return ReaddirArgs(fh, cookie, verf, u.u32())


def _enc_readdirplus(p: Packer, a: ReaddirplusArgs) -> None:
    pack_fh(p, a.dir)
    p.u64(a.cookie)
    p.fopaque(a.cookieverf, NFS3_COOKIEVERFSIZE)
    p.u32(a.dircount)
    p.u32(a.maxcount)


def _dec_readdirplus(u: Unpacker) -> ReaddirplusArgs:
    fh = unpack_fh(u)
    cookie = u.u64()
    verf = _verf(u, NFS3_COOKIEVERFSIZE)
    dircount = u.u32()
    return ReaddirplusArgs(fh, cookie, verf, dircount, u.u32())


def _enc_commit(p: Packer, a: CommitArgs) -> None:
    pack_fh(p, a.file)
    p.u64(a.offset)
    p.u32(a.count)


def _dec_commit(u: Unpacker) -> CommitArgs:
    fh = unpack_fh(u)
    off = u.u64()
    return CommitArgs(fh, off, u.u32())


# -- results ----------------------------------------------------------------------------------


@dataclass(slots=True)
class NullRes:
    status: int = Stat.NFS3_OK


@dataclass(slots=True)
class GetattrRes:
    status: int
    obj_attributes: Attr | None = None  # resok


@dataclass(slots=True)
class WccRes:
    """SETATTR, REMOVE, RMDIR: the status and the object's (or directory's) wcc_data."""

    status: int
    wcc: WccData = field(default_factory=WccData)


@dataclass(slots=True)
class LookupRes:
    status: int
    object: bytes = b""  # resok
    obj_attributes: Attr | None = None  # resok
    dir_attributes: Attr | None = None


@dataclass(slots=True)
class AccessRes:
    status: int
    obj_attributes: Attr | None = None
    access: int = 0  # resok


@dataclass(slots=True)
class ReadlinkRes:
    status: int
    symlink_attributes: Attr | None = None
    data: str = ""  # resok: nfspath3


@dataclass(slots=True)
class ReadRes:
    status: int
    file_attributes: Attr | None = None
    count: int = 0  # resok
    eof: bool = False  # resok
    data: Payload = b""  # resok: bytes, or a memoryview of the reply


@dataclass(slots=True)
class WriteRes:
    status: int
    file_wcc: WccData = field(default_factory=WccData)
    count: int = 0  # resok
    committed: int = StableHow.UNSTABLE  # resok
    verf: bytes = bytes(NFS3_WRITEVERFSIZE)  # resok


@dataclass(slots=True)
class CreateRes:
    """CREATE, MKDIR, SYMLINK, MKNOD: the new object (resok) and the directory's wcc_data."""

    status: int
    obj: bytes | None = None  # resok: post_op_fh3
    obj_attributes: Attr | None = None  # resok
    dir_wcc: WccData = field(default_factory=WccData)


@dataclass(slots=True)
class RenameRes:
    status: int
    fromdir_wcc: WccData = field(default_factory=WccData)
    todir_wcc: WccData = field(default_factory=WccData)


@dataclass(slots=True)
class LinkRes:
    status: int
    file_attributes: Attr | None = None
    linkdir_wcc: WccData = field(default_factory=WccData)


@dataclass(slots=True)
class Entry3:
    """entry3 (READDIR) and entryplus3 (READDIRPLUS: with name_attributes and name_handle)."""

    fileid: int
    name: str
    cookie: int
    name_attributes: Attr | None = None
    name_handle: bytes | None = None


@dataclass(slots=True)
class ReaddirRes:
    """READDIR and READDIRPLUS."""

    status: int
    dir_attributes: Attr | None = None
    cookieverf: bytes = bytes(NFS3_COOKIEVERFSIZE)  # resok
    entries: list[Entry3] = field(default_factory=list)  # resok
    eof: bool = False  # resok


@dataclass(slots=True)
class FsstatRes:
    status: int
    obj_attributes: Attr | None = None
    tbytes: int = 0
    fbytes: int = 0
    abytes: int = 0
    tfiles: int = 0
    ffiles: int = 0
    afiles: int = 0
    invarsec: int = 0


@dataclass(slots=True)
class FsinfoRes:
    status: int
    obj_attributes: Attr | None = None
    rtmax: int = 0
    rtpref: int = 0
    rtmult: int = 0
    wtmax: int = 0
    wtpref: int = 0
    wtmult: int = 0
    dtpref: int = 0
    maxfilesize: int = 0
    time_delta: NfsTime = NfsTime(0, 1)
    properties: int = 0


@dataclass(slots=True)
class PathconfRes:
    status: int
    obj_attributes: Attr | None = None
    linkmax: int = 0
    name_max: int = 0
    no_trunc: bool = True
    chown_restricted: bool = True
    case_insensitive: bool = False
    case_preserving: bool = True


@dataclass(slots=True)
class CommitRes:
    status: int
    file_wcc: WccData = field(default_factory=WccData)
    verf: bytes = bytes(NFS3_WRITEVERFSIZE)  # resok


_OK = Stat.NFS3_OK


def _enc_null_res(p: Packer, r: NullRes) -> None:
    pass


def _dec_null_res(u: Unpacker) -> NullRes:
    return NullRes()


def _enc_getattr_res(p: Packer, r: GetattrRes) -> None:
    p.u32(r.status)
    if r.status == _OK:
        assert r.obj_attributes is not None
        r.obj_attributes.pack(p)


def _dec_getattr_res(u: Unpacker) -> GetattrRes:
    status = u.u32()
    return GetattrRes(status, Fattr3.unpack(u) if status == _OK else None)


def _enc_wcc_res(p: Packer, r: WccRes) -> None:
    p.u32(r.status)
    r.wcc.pack(p)


def _dec_wcc_res(u: Unpacker) -> WccRes:
    status = u.u32()
    return WccRes(status, WccData.unpack(u))


def _enc_lookup_res(p: Packer, r: LookupRes) -> None:
    p.u32(r.status)
    if r.status == _OK:
        pack_fh(p, r.object)
        pack_post_op_attr(p, r.obj_attributes)
    pack_post_op_attr(p, r.dir_attributes)


def _dec_lookup_res(u: Unpacker) -> LookupRes:
    status = u.u32()
    if status != _OK:
        return LookupRes(status, dir_attributes=unpack_post_op_attr(u))
    fh = unpack_fh(u)
    obj = unpack_post_op_attr(u)
    return LookupRes(status, fh, obj, unpack_post_op_attr(u))


def _enc_access_res(p: Packer, r: AccessRes) -> None:
    p.u32(r.status)
    pack_post_op_attr(p, r.obj_attributes)
    if r.status == _OK:
        p.u32(r.access)


def _dec_access_res(u: Unpacker) -> AccessRes:
    status = u.u32()
    attr = unpack_post_op_attr(u)
    return AccessRes(status, attr, u.u32() if status == _OK else 0)


def _enc_readlink_res(p: Packer, r: ReadlinkRes) -> None:
    p.u32(r.status)
    pack_post_op_attr(p, r.symlink_attributes)
    if r.status == _OK:
        pack_path(p, r.data)


def _dec_readlink_res(u: Unpacker) -> ReadlinkRes:
    status = u.u32()
    attr = unpack_post_op_attr(u)
    return ReadlinkRes(status, attr, unpack_path(u) if status == _OK else "")


_READ_OK = struct.Struct(">III")  # count, eof, data length


def _enc_read_res(p: Packer, r: ReadRes) -> None:
    p.u32(r.status)
    pack_post_op_attr(p, r.file_attributes)
    if r.status == _OK:
        p.buf += _READ_OK.pack(r.count, r.eof, len(r.data))
        p.payload(r.data)


def _dec_read_res(u: Unpacker) -> ReadRes:
    status = u.u32()
    attr = unpack_post_op_attr(u)
    if status != _OK:
        return ReadRes(status, attr)
    count = u.u32()
    eof = u.bool()
    return ReadRes(status, attr, count, eof, u.opaque_view())


_WRITE_OK = struct.Struct(">II")  # count, committed


def _enc_write_res(p: Packer, r: WriteRes) -> None:
    p.u32(r.status)
    r.file_wcc.pack(p)
    if r.status == _OK:
        p.buf += _WRITE_OK.pack(r.count, r.committed)
        p.fopaque(r.verf, NFS3_WRITEVERFSIZE)


def _dec_write_res(u: Unpacker) -> WriteRes:
    status = u.u32()
    wcc = WccData.unpack(u)
    if status != _OK:
        return WriteRes(status, wcc)
    count, committed = _WRITE_OK.unpack_from(u.buf, u._need(8))
    return WriteRes(status, wcc, count, committed, u.fopaque(NFS3_WRITEVERFSIZE))


def _enc_create_res(p: Packer, r: CreateRes) -> None:
    p.u32(r.status)
    if r.status == _OK:
        pack_post_op_fh(p, r.obj)
        pack_post_op_attr(p, r.obj_attributes)
    r.dir_wcc.pack(p)


def _dec_create_res(u: Unpacker) -> CreateRes:
    status = u.u32()
    if status != _OK:
        return CreateRes(status, dir_wcc=WccData.unpack(u))
    fh = unpack_post_op_fh(u)
    attr = unpack_post_op_attr(u)
    return CreateRes(status, fh, attr, WccData.unpack(u))


def _enc_rename_res(p: Packer, r: RenameRes) -> None:
    p.u32(r.status)
    r.fromdir_wcc.pack(p)
    r.todir_wcc.pack(p)


def _dec_rename_res(u: Unpacker) -> RenameRes:
    status = u.u32()
    before = WccData.unpack(u)
    return RenameRes(status, before, WccData.unpack(u))


def _enc_link_res(p: Packer, r: LinkRes) -> None:
    p.u32(r.status)
    pack_post_op_attr(p, r.file_attributes)
    r.linkdir_wcc.pack(p)


def _dec_link_res(u: Unpacker) -> LinkRes:
    status = u.u32()
    attr = unpack_post_op_attr(u)
    return LinkRes(status, attr, WccData.unpack(u))


_ENTRY_HEAD = struct.Struct(">IQ")  # value_follows TRUE, fileid


def entry_size(e: Entry3, plus: bool) -> tuple[int, int]:
    """(bytes of the entry's READDIR part, bytes of the whole entry): what READDIR(PLUS)'s
    count, dircount and maxcount are measured in."""
    n = len(e.name.encode("utf-8", "surrogateescape"))
    base = 4 + 8 + 4 + n + (-n & 3) + 8
    if not plus:
        return base, base
    extra = 4 + (FATTR3_SIZE if e.name_attributes is not None else 0) + 4
    if e.name_handle is not None:
        extra += 4 + len(e.name_handle) + (-len(e.name_handle) & 3)
    return base, base + extra


def _pack_entries(p: Packer, r: ReaddirRes, plus: bool) -> None:
    p.u32(r.status)
    pack_post_op_attr(p, r.dir_attributes)
    if r.status != _OK:
        return
    p.fopaque(r.cookieverf, NFS3_COOKIEVERFSIZE)
    for e in r.entries:
        p.buf += _ENTRY_HEAD.pack(1, e.fileid)
        pack_name(p, e.name)
        p.u64(e.cookie)
        if plus:
            pack_post_op_attr(p, e.name_attributes)
            pack_post_op_fh(p, e.name_handle)
    p.bool(False)
    p.bool(r.eof)


def _unpack_entries(u: Unpacker, plus: bool) -> ReaddirRes:
    status = u.u32()
    attr = unpack_post_op_attr(u)
    if status != _OK:
        return ReaddirRes(status, attr)
    verf = _verf(u, NFS3_COOKIEVERFSIZE)
    entries: list[Entry3] = []
    while u.bool():
        fileid = u.u64()
        name = unpack_name(u)
        cookie = u.u64()
        if plus:
            a = unpack_post_op_attr(u)
            entries.append(Entry3(fileid, name, cookie, a, unpack_post_op_fh(u)))
        else:
            entries.append(Entry3(fileid, name, cookie))
    return ReaddirRes(status, attr, verf, entries, u.bool())


def _enc_readdir_res(p: Packer, r: ReaddirRes) -> None:
    _pack_entries(p, r, plus=False)


def _dec_readdir_res(u: Unpacker) -> ReaddirRes:
    return _unpack_entries(u, plus=False)


def _enc_readdirplus_res(p: Packer, r: ReaddirRes) -> None:
    _pack_entries(p, r, plus=True)


def _dec_readdirplus_res(u: Unpacker) -> ReaddirRes:
    return _unpack_entries(u, plus=True)


def _enc_fsstat_res(p: Packer, r: FsstatRes) -> None:
    p.u32(r.status)
    pack_post_op_attr(p, r.obj_attributes)
    if r.status == _OK:
        for v in (r.tbytes, r.fbytes, r.abytes, r.tfiles, r.ffiles, r.afiles):
            p.u64(v)
        p.u32(r.invarsec)


def _dec_fsstat_res(u: Unpacker) -> FsstatRes:
    status = u.u32()
    attr = unpack_post_op_attr(u)
    if status != _OK:
        return FsstatRes(status, attr)
    t, f, a, tf, ff, af = (u.u64() for _ in range(6))
    return FsstatRes(status, attr, t, f, a, tf, ff, af, u.u32())


def _enc_fsinfo_res(p: Packer, r: FsinfoRes) -> None:
    p.u32(r.status)
    pack_post_op_attr(p, r.obj_attributes)
    if r.status == _OK:
        for v in (r.rtmax, r.rtpref, r.rtmult, r.wtmax, r.wtpref, r.wtmult, r.dtpref):
            p.u32(v)
        p.u64(r.maxfilesize)
        pack_time(p, r.time_delta)
        p.u32(r.properties)


def _dec_fsinfo_res(u: Unpacker) -> FsinfoRes:
    status = u.u32()
    attr = unpack_post_op_attr(u)
    if status != _OK:
        return FsinfoRes(status, attr)
    rtmax, rtpref, rtmult, wtmax, wtpref, wtmult, dtpref = (u.u32() for _ in range(7))
    maxfilesize = u.u64()
    delta = unpack_time(u)
    return FsinfoRes(status, attr, rtmax, rtpref, rtmult, wtmax, wtpref, wtmult, dtpref, maxfilesize, delta, u.u32())


def _enc_pathconf_res(p: Packer, r: PathconfRes) -> None:
    p.u32(r.status)
    pack_post_op_attr(p, r.obj_attributes)
    if r.status == _OK:
        p.u32(r.linkmax)
        p.u32(r.name_max)
        for b in (r.no_trunc, r.chown_restricted, r.case_insensitive, r.case_preserving):
            p.bool(b)


def _dec_pathconf_res(u: Unpacker) -> PathconfRes:
    status = u.u32()
    attr = unpack_post_op_attr(u)
    if status != _OK:
        return PathconfRes(status, attr)
    linkmax, name_max = u.u32(), u.u32()
    a, b, c, d = (u.bool() for _ in range(4))
    return PathconfRes(status, attr, linkmax, name_max, a, b, c, d)


def _enc_commit_res(p: Packer, r: CommitRes) -> None:
    p.u32(r.status)
    r.file_wcc.pack(p)
    if r.status == _OK:
        p.fopaque(r.verf, NFS3_WRITEVERFSIZE)


def _dec_commit_res(u: Unpacker) -> CommitRes:
    status = u.u32()
    wcc = WccData.unpack(u)
    return CommitRes(status, wcc, u.fopaque(NFS3_WRITEVERFSIZE) if status == _OK else bytes(8))


# -- the procedure table ----------------------------------------------------------------------

A = TypeVar("A")
R = TypeVar("R")


@dataclass(frozen=True)
class ProcXdr(Generic[A, R]):
    """One procedure's codecs (Linux's struct rpc_procinfo / svc_procedure): arguments and
    result, each both ways. `res(status)` makes the procedure's failure result."""

    proc: Proc
    encode_args: Callable[[Packer, A], None]
    decode_args: Callable[[Unpacker], A]
    encode_res: Callable[[Packer, R], None]
    decode_res: Callable[[Unpacker], R]
    res: Callable[[int], R]

    @property
    def name(self) -> str:
        return self.proc.name


def _x(proc: Proc, ea: Callable[[Packer, Any], None], da: Callable[[Unpacker], Any],
       er: Callable[[Packer, Any], None], dr: Callable[[Unpacker], Any], res: Callable[[int], Any]) -> ProcXdr[Any, Any]:
    return ProcXdr(proc, ea, da, er, dr, res)


NFS3_PROCEDURES: dict[int, ProcXdr[Any, Any]] = {x.proc: x for x in (
    _x(Proc.NULL, _enc_void, _dec_void, _enc_null_res, _dec_null_res, NullRes),
    _x(Proc.GETATTR, _enc_fh, _dec_fh, _enc_getattr_res, _dec_getattr_res, GetattrRes),
    _x(Proc.SETATTR, _enc_setattr, _dec_setattr, _enc_wcc_res, _dec_wcc_res, WccRes),
    _x(Proc.LOOKUP, _enc_dirop, _dec_dirop, _enc_lookup_res, _dec_lookup_res, LookupRes),
    _x(Proc.ACCESS, _enc_access, _dec_access, _enc_access_res, _dec_access_res, AccessRes),
    _x(Proc.READLINK, _enc_fh, _dec_fh, _enc_readlink_res, _dec_readlink_res, ReadlinkRes),
    _x(Proc.READ, _enc_read, _dec_read, _enc_read_res, _dec_read_res, ReadRes),
    _x(Proc.WRITE, _enc_write, _dec_write, _enc_write_res, _dec_write_res, WriteRes),
    _x(Proc.CREATE, _enc_create, _dec_create, _enc_create_res, _dec_create_res, CreateRes),
    _x(Proc.MKDIR, _enc_mkdir, _dec_mkdir, _enc_create_res, _dec_create_res, CreateRes),
    _x(Proc.SYMLINK, _enc_symlink, _dec_symlink, _enc_create_res, _dec_create_res, CreateRes),
    _x(Proc.MKNOD, _enc_mknod, _dec_mknod, _enc_create_res, _dec_create_res, CreateRes),
    _x(Proc.REMOVE, _enc_dirop, _dec_dirop, _enc_wcc_res, _dec_wcc_res, WccRes),
    _x(Proc.RMDIR, _enc_dirop, _dec_dirop, _enc_wcc_res, _dec_wcc_res, WccRes),
    _x(Proc.RENAME, _enc_rename, _dec_rename, _enc_rename_res, _dec_rename_res, RenameRes),
    _x(Proc.LINK, _enc_link, _dec_link, _enc_link_res, _dec_link_res, LinkRes),
    _x(Proc.READDIR, _enc_readdir, _dec_readdir, _enc_readdir_res, _dec_readdir_res, ReaddirRes),
    _x(Proc.READDIRPLUS, _enc_readdirplus, _dec_readdirplus, _enc_readdirplus_res, _dec_readdirplus_res,
       ReaddirRes),
    _x(Proc.FSSTAT, _enc_fh, _dec_fh, _enc_fsstat_res, _dec_fsstat_res, FsstatRes),
    _x(Proc.FSINFO, _enc_fh, _dec_fh, _enc_fsinfo_res, _dec_fsinfo_res, FsinfoRes),
    _x(Proc.PATHCONF, _enc_fh, _dec_fh, _enc_pathconf_res, _dec_pathconf_res, PathconfRes),
    _x(Proc.COMMIT, _enc_commit, _dec_commit, _enc_commit_res, _dec_commit_res, CommitRes),
)}
assert len(NFS3_PROCEDURES) == 22
