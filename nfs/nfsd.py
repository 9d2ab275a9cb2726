"""The NFSv3 program (100003 version 3) over an `Export`: knfsd's nfs3proc.c, for one directory.

Each procedure decodes all of its arguments first (an `XdrError` there means GARBAGE_ARGS and
nothing was done), then acts on the export. `Nfs3Error` from the action becomes that procedure's
failure result. WRITE with DATA_SYNC/FILE_SYNC and COMMIT are on disk (fdatasync/fsync, run in a
worker thread so other clients keep being served) before the reply is built.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import stat as pystat
import struct
import time
from collections.abc import Awaitable, Callable, Sequence

import trio

from nfs.auth import (
    MAY_EXEC, MAY_READ, MAY_WRITE, Cred, Squash, check, check_delete, check_setattr, effective_cred, mode_bits,
)
from nfs.nfs3 import (
    ACCESS3_DELETE, ACCESS3_EXECUTE, ACCESS3_EXTEND, ACCESS3_LOOKUP, ACCESS3_MODIFY, ACCESS3_READ,
    FSF3_CANSETTIME, FSF3_HOMOGENEOUS, FSF3_LINK, FSF3_SYMLINK, NFS3_COOKIEVERFSIZE, NFS3_CREATEVERFSIZE,
    NFS_PROGRAM, NFS_V3, NO_ATTR, NO_WCC, CreateMode, FsInfo, FsStat, Nfs3Error, NfsTime,
    Proc, Sattr3, Stat, StableHow, WccAttr, decode_read_args, decode_write_args, fattr_bytes, pack_fh, unpack_fh,
    unpack_name, unpack_time, NON_IDEMPOTENT, NAME_MAX,
)
from nfs.store import Export, errno_to_stat
from nfs.svc import Buffer, CallContext, FileSegment
from nfs.xdr import Packer, Unpacker, XdrError

_U32 = struct.Struct(">I")
_OK = b"\0\0\0\0"
_READ_OK = struct.Struct(">III")  # count, eof, data length
_WRITE_OK = struct.Struct(">II")  # count, committed
_PADS = (b"", b"\0\0\0", b"\0\0", b"\0")

# Where a procedure's failure result puts what follows nfsstat3.
_FAIL_BODY: dict[int, bytes] = {
    Proc.GETATTR: b"", Proc.SETATTR: NO_WCC, Proc.LOOKUP: NO_ATTR, Proc.ACCESS: NO_ATTR, Proc.READ: NO_ATTR,
    Proc.WRITE: NO_WCC, Proc.CREATE: NO_WCC, Proc.REMOVE: NO_WCC, Proc.READDIR: NO_ATTR,
    Proc.READDIRPLUS: NO_ATTR, Proc.FSSTAT: NO_ATTR, Proc.FSINFO: NO_ATTR, Proc.PATHCONF: NO_ATTR,
    Proc.COMMIT: NO_WCC,
}

IMPLEMENTED = frozenset(_FAIL_BODY) | {Proc.NULL}


async def _sync(fd: int, how: Callable[[int], None]) -> None:
    """fsync/fdatasync in a worker thread (other calls go on meanwhile), on our own dup of the fd
    so the export's fd cache may close its copy in the meantime."""
    own = os.dup(fd)
    try:
        await trio.to_thread.run_sync(how, own)
    finally:
        os.close(own)


INLINE_WRITE = 64 * 1024  # WRITEs up to this size (UNSTABLE) are done on the event loop


def _pwrite_all(fd: int, mv: memoryview, offset: int) -> None:
    done = 0
    while done < len(mv):
        done += os.pwrite(fd, mv[done:], offset + done)


def _write_sync(fd: int, mv: memoryview, offset: int, sync: Callable[[int], None] | None) -> None:
    _pwrite_all(fd, mv, offset)
    if sync is not None:
        sync(fd)


MAX_FILE_SIZE = 0x7FFF_FFFF_FFFF_FFFF  # off_t: FSINFO's maxfilesize


def valid_sattr(a: Sattr3) -> None:
    """Values no file can take: a size past off_t (NFS3ERR_FBIG, as knfsd), a time with 10^9
    nanoseconds or more (NFS3ERR_INVAL)."""
    if a.size is not None and a.size > MAX_FILE_SIZE:
        raise Nfs3Error(Stat.NFS3ERR_FBIG, f"size {a.size} is past the largest file")
    for t in (a.atime, a.mtime):
        if isinstance(t, NfsTime) and t.nseconds >= 1_000_000_000:
            raise Nfs3Error(Stat.NFS3ERR_INVAL, f"time with {t.nseconds} nanoseconds")


def _fsync_path(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        if e.errno != errno.ELOOP:
            raise
        fd = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)  # a symlink:
    try:  # its inode cannot be opened, its directory entry is what holds it
        os.fsync(fd)
    finally:
        os.close(fd)


async def _commit_metadata(*paths: str) -> None:
    """knfsd's commit_metadata: a CREATE, REMOVE or SETATTR is on disk before its reply (the
    object's inode and/or its directory fsync'ed), in a worker thread."""
    def run() -> None:
        for p in paths:
            _fsync_path(p)

    await trio.to_thread.run_sync(run)


def allowed(host: str, nets: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return any(addr in n for n in nets if n.version == addr.version)


class NfsProgram:
    prog = NFS_PROGRAM
    versions = (NFS_V3,)
    name = "NFS3"

    def __init__(self, export: Export, allow: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network],
                 max_io: int = 1024 * 1024, udp_max_io: int = 32 * 1024, squash: Squash | None = None) -> None:
        self.export = export
        self.squash = squash or Squash()
        self._walkers = trio.CapacityLimiter(2)
        self._as_root = os.geteuid() == 0  # new files are given to their creator (needs root)
        self.allow = list(allow)
        self._allowed: dict[str, bool] = {}  # host -> in --allow (parsing addresses per call is slow)
        self.max_io = max_io
        self.udp_max_io = udp_max_io
        # The write verifier: new at every start, so clients know to resend uncommitted data.
        self.verifier = os.urandom(8)
        self.fsid = export.fsid
        self._handlers: dict[int, Callable[[Unpacker, CallContext], Awaitable[list[Buffer]]]] = {
            Proc.GETATTR: self.getattr, Proc.SETATTR: self.setattr, Proc.LOOKUP: self.lookup,
            Proc.ACCESS: self.access, Proc.READ: self.read, Proc.WRITE: self.write, Proc.CREATE: self.create,
            Proc.REMOVE: self.remove, Proc.READDIR: self.readdir, Proc.READDIRPLUS: self.readdirplus,
            Proc.FSSTAT: self.fsstat, Proc.FSINFO: self.fsinfo, Proc.PATHCONF: self.pathconf,
            Proc.COMMIT: self.commit,
        }

    def has_proc(self, vers: int, proc: int) -> bool:
        return proc in IMPLEMENTED

    def non_idempotent(self, vers: int, proc: int) -> bool:
        return proc in NON_IDEMPOTENT

    async def call(self, vers: int, proc: int, args: Unpacker, ctx: CallContext) -> list[Buffer]:
        if proc == Proc.NULL:
            return []
        handler = self._handlers[proc]
        try:
            ok = self._allowed.get(ctx.host)
            if ok is None:
                ok = self._allowed[ctx.host] = allowed(ctx.host, self.allow)
                if len(self._allowed) > 4096:
                    self._allowed.clear()
            if not ok:
                raise Nfs3Error(Stat.NFS3ERR_ACCES, f"{ctx.host} is not allowed")
            return await handler(args, ctx)
        except Nfs3Error as e:
            return [_U32.pack(e.status), _FAIL_BODY[proc]]
        except OSError as e:
            return [_U32.pack(errno_to_stat(e)), _FAIL_BODY[proc]]

    # -- helpers ---------------------------------------------------------------------------

    def _attr(self, st: os.stat_result) -> bytes:
        return fattr_bytes(st, self.fsid)

    def _post_op(self, path: str) -> bytes:
        try:
            return fattr_bytes(os.lstat(path), self.fsid)
        except OSError:
            return NO_ATTR

    @staticmethod
    def _pre_op(st: os.stat_result) -> bytes:
        p = Packer()
        p.bool(True)
        WccAttr.from_stat(st).pack(p)
        return bytes(p.buf)

    async def _resolve(self, fh: bytes) -> tuple[str, os.stat_result]:
        """Export.resolve, with the walk of the export a cache miss needs done in a worker
        thread (at most two at once), so other clients are served meanwhile."""
        ino, parent, hit = self.export.resolve_cached(fh)
        if hit is not None:
            return hit
        path = await trio.to_thread.run_sync(self.export.find, ino, parent, limiter=self._walkers)
        return self.export.resolved(ino, path)

    def _who(self, ctx: CallContext) -> Cred:
        return effective_cred(ctx.cred, self.squash)

    def _give(self, path: str, dst: os.stat_result, who: Cred) -> None:
        """A file just created belongs to its creator (the group of a setgid directory)."""
        if self._as_root and (who.uid, who.gid) != (0, 0):
            gid = dst.st_gid if dst.st_mode & pystat.S_ISGID else who.gid
            os.lchown(path, who.uid, gid)

    def _handle_of(self, path: str, st: os.stat_result) -> bytes:
        return self.export.fh_for(path, st, self.export.parent_ino(path))

    # -- procedures ------------------------------------------------------------------------

    async def getattr(self, u: Unpacker, ctx: CallContext) -> list[Buffer]:
        fh = unpack_fh(u)
        _, st = await self._resolve(fh)
        return [_OK, self._attr(st)[4:]]

    async def setattr(self, u: Unpacker, ctx: CallContext) -> list[Buffer]:
        fh = unpack_fh(u)
        attrs = Sattr3.unpack(u)
        guard = unpack_time(u) if u.bool() else None
        path, st = await self._resolve(fh)
        pre = self._pre_op(st)
        if guard is not None and NfsTime.from_ns(st.st_ctime_ns) != guard:
            return [_U32.pack(Stat.NFS3ERR_NOT_SYNC), pre, self._attr(st)]
        try:
            self._check_setattr(st, attrs, self._who(ctx))
        except Nfs3Error as e:
            return [_U32.pack(e.status), pre, self._attr(st)]
        try:
            self._apply(path, st, attrs)
            await _commit_metadata(path)  # the new attributes are on disk before the reply
        except OSError as e:
            return [_U32.pack(errno_to_stat(e)), pre, self._post_op(path)]
        return [_OK, pre, self._post_op(path)]

    @staticmethod
    def _check_setattr(st: os.stat_result, a: Sattr3, who: Cred) -> None:
        valid_sattr(a)
        check_setattr(st, who, size=a.size is not None and a.size != st.st_size, mode=a.mode is not None,
                      uid=a.uid, gid=a.gid, times=a.atime is not None or a.mtime is not None,
                      client_times=isinstance(a.atime, NfsTime) or isinstance(a.mtime, NfsTime))

    def _apply(self, path: str, st: os.stat_result, a: Sattr3) -> None:
        valid_sattr(a)
        islnk = pystat.S_ISLNK(st.st_mode)
        if a.size is not None:
            if pystat.S_ISDIR(st.st_mode):
                raise Nfs3Error(Stat.NFS3ERR_ISDIR)
            if not pystat.S_ISREG(st.st_mode):
                raise Nfs3Error(Stat.NFS3ERR_INVAL)
            if a.size != st.st_size:
                os.truncate(self.export.fd(path, st), a.size)
        if a.mode is not None and not islnk:
            os.chmod(path, a.mode & 0o7777)
        if a.uid is not None or a.gid is not None:
            os.lchown(path, -1 if a.uid is None else a.uid, -1 if a.gid is None else a.gid)
        if a.atime is not None or a.mtime is not None:
            now = time.time_ns()
            cur = os.lstat(path)

            def pick(t: NfsTime | str | None, old: int) -> int:
                if t is None:
                    return old
                return now if isinstance(t, str) else t.to_ns()

            os.utime(path, ns=(pick(a.atime, cur.st_atime_ns), pick(a.mtime, cur.st_mtime_ns)),
                     follow_symlinks=False)

    async def lookup(self, u: Unpacker, ctx: CallContext) -> list[Buffer]:
        dir_fh = unpack_fh(u)
        name = unpack_name(u)
        dpath, dst = await self._resolve(dir_fh)
        path = self.export.child_path(dpath, dst, name)
        try:
            check(dst, self._who(ctx), MAY_EXEC)
        except Nfs3Error as e:
            return [_U32.pack(e.status), self._attr(dst)]
        try:
            st = os.lstat(path)
        except OSError as e:
            return [_U32.pack(errno_to_stat(e)), self._attr(dst)]
        if not self.export.same_fs(st):
            return [_U32.pack(Stat.NFS3ERR_ACCES), self._attr(dst)]  # no crossing into other mounts
        fh = self._handle_of(path, st)
        p = Packer()
        pack_fh(p, fh)
        return [_OK, p.buf, self._attr(st), self._attr(dst)]

    async def access(self, u: Unpacker, ctx: CallContext) -> list[Buffer]:
        fh = unpack_fh(u)
        want = u.u32()
        _, st = await self._resolve(fh)
        return [_OK, self._attr(st), _U32.pack(want & self._access_bits(st, ctx))]

    def _access_bits(self, st: os.stat_result, ctx: CallContext) -> int:
        mode = st.st_mode
        bits = mode_bits(st, self._who(ctx))
        r, w, x = bool(bits & MAY_READ), bool(bits & MAY_WRITE), bool(bits & MAY_EXEC)
        out = 0
        if r:
            out |= ACCESS3_READ
        if w:
            out |= ACCESS3_MODIFY | ACCESS3_EXTEND
            if pystat.S_ISDIR(mode):
                out |= ACCESS3_DELETE
        if x:
            out |= ACCESS3_LOOKUP if pystat.S_ISDIR(mode) else ACCESS3_EXECUTE
        return out

    async def read(self, u: Unpacker, ctx: CallContext) -> list[Buffer]:
        fh, offset, count = decode_read_args(u)
        path, st = await self._resolve(fh)
        if not pystat.S_ISREG(st.st_mode):
            raise Nfs3Error(Stat.NFS3ERR_ISDIR if pystat.S_ISDIR(st.st_mode) else Stat.NFS3ERR_INVAL)
        check(st, self._who(ctx), MAY_READ, owner_override=True)
        limit = self.udp_max_io if ctx.transport == "udp" else self.max_io
        count = min(count, limit, max(0, ctx.max_reply - 256))
        fd = self.export.fd(path, st)
        st = os.fstat(fd)
        n = max(0, min(count, st.st_size - offset))
        eof = offset + n >= st.st_size
        if ctx.transport == "udp" or n < 65536:
            data: Buffer = os.pread(fd, n, offset) if n else b""
            if len(data) < n:  # the file shrank since the fstat
                n = len(data)
                eof = True
        else:
            data = FileSegment(fd, offset, n)  # sent with sendfile(2)
        return [_OK, self._attr(st), _READ_OK.pack(n, eof, n), data, _PADS[n & 3]]

    async def write(self, u: Unpacker, ctx: CallContext) -> list[Buffer]:
        fh, offset, count, stable, data = decode_write_args(u)
        if count > len(data):
            raise XdrError(f"WRITE count {count} exceeds its {len(data)} data bytes")
        path, st = await self._resolve(fh)
        pre = self._pre_op(st)
        if pystat.S_ISREG(st.st_mode):
            check(st, self._who(ctx), MAY_WRITE, owner_override=True)
        fd = self.export.fd(path, st)
        if offset + count > MAX_FILE_SIZE:
            raise Nfs3Error(Stat.NFS3ERR_FBIG)
        mv = data[:count] if count != len(data) else data
        sync = None if stable == StableHow.UNSTABLE else os.fsync if stable == StableHow.FILE_SYNC else os.fdatasync
        if count <= INLINE_WRITE and sync is None:
            _pwrite_all(fd, mv, offset)  # a page or so: cheaper here than a thread hop
            st = os.fstat(fd)
        else:
            # Big writes (and any sync) in a worker thread, on our own dup of the fd (the
            # export's fd cache may close its copy meanwhile): the event loop keeps serving.
            own = os.dup(fd)
            try:
                await trio.to_thread.run_sync(_write_sync, own, mv, offset, sync)
                st = os.fstat(own)
            finally:
                os.close(own)
        return [_OK, pre, self._attr(st), _WRITE_OK.pack(count, stable), self.verifier]

    async def create(self, u: Unpacker, ctx: CallContext) -> list[Buffer]:
        dir_fh = unpack_fh(u)
        name = unpack_name(u)
        mode = u.u32()
        if mode not in (0, 1, 2):
            raise XdrError(f"bad createmode3 {mode}")
        attrs = Sattr3()
        verf = b""
        if mode == CreateMode.EXCLUSIVE:
            verf = u.fopaque(NFS3_CREATEVERFSIZE)
        else:
            attrs = Sattr3.unpack(u)
        dpath, dst = await self._resolve(dir_fh)
        pre = self._pre_op(dst)
        path = self.export.child_path(dpath, dst, name)
        if name in (".", ".."):
            return [_U32.pack(Stat.NFS3ERR_EXIST), pre, self._attr(dst)]
        who = self._who(ctx)
        try:
            check(dst, who, MAY_WRITE | MAY_EXEC)
            valid_sattr(attrs)  # (before anything is created)
        except Nfs3Error as e:
            return [_U32.pack(e.status), pre, self._attr(dst)]
        perm = 0o644 if attrs.mode is None else attrs.mode & 0o7777
        try:
            if mode == CreateMode.EXCLUSIVE:
                atime_s, mtime_s = struct.unpack(">II", verf)
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
                    os.close(fd)
                    self._give(path, dst, who)
                    os.utime(path, ns=(atime_s * 1_000_000_000, mtime_s * 1_000_000_000))
                except FileExistsError:
                    st = os.lstat(path)
                    # A retransmitted EXCLUSIVE create finds its own verifier in atime/mtime.
                    if not (int(st.st_atime) == atime_s and int(st.st_mtime) == mtime_s and pystat.S_ISREG(st.st_mode)):
                        raise
            else:
                flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
                if mode == CreateMode.GUARDED:
                    flags |= os.O_EXCL
                try:
                    fd = os.open(path, flags | os.O_EXCL, perm)
                    created = True
                except FileExistsError:
                    if mode == CreateMode.GUARDED:
                        raise
                    fd = os.open(path, flags, perm)  # UNCHECKED: an existing file is fine
                    created = False
                os.close(fd)
                if created:
                    self._give(path, dst, who)
                st = os.lstat(path)
                if not pystat.S_ISREG(st.st_mode):
                    raise Nfs3Error(Stat.NFS3ERR_EXIST)
                if not created:  # setting attributes of someone's existing file: SETATTR's rules
                    self._check_setattr(st, attrs, who)
                # The requested mode exactly (not filtered by our umask, as knfsd), and the rest.
                self._apply(path, st, attrs)
        except OSError as e:
            return [_U32.pack(errno_to_stat(e)), pre, self._post_op(dpath)]
        except Nfs3Error as e:
            return [_U32.pack(e.status), pre, self._post_op(dpath)]
        try:
            await _commit_metadata(path, dpath)  # the new file and its name are on disk
        except OSError as e:
            return [_U32.pack(errno_to_stat(e)), pre, self._post_op(dpath)]
        st = os.lstat(path)
        fh = self.export.fh_for(path, st, dst.st_ino)
        p = Packer()
        p.bool(True)
        pack_fh(p, fh)
        return [_OK, p.buf, self._attr(st), pre, self._post_op(dpath)]

    async def remove(self, u: Unpacker, ctx: CallContext) -> list[Buffer]:
        dir_fh = unpack_fh(u)
        name = unpack_name(u)
        dpath, dst = await self._resolve(dir_fh)
        pre = self._pre_op(dst)
        path = self.export.child_path(dpath, dst, name)
        if name in (".", ".."):
            return [_U32.pack(Stat.NFS3ERR_INVAL), pre, self._attr(dst)]
        try:
            st = os.lstat(path)
            if pystat.S_ISDIR(st.st_mode):
                raise Nfs3Error(Stat.NFS3ERR_ISDIR)
            check_delete(dst, st, self._who(ctx))
            os.unlink(path)
        except OSError as e:
            return [_U32.pack(errno_to_stat(e)), pre, self._post_op(dpath)]
        except Nfs3Error as e:
            return [_U32.pack(e.status), pre, self._post_op(dpath)]
        if st.st_nlink <= 1:
            self.export.close_ino(st.st_ino)
        try:
            await _commit_metadata(dpath)  # the name is gone on disk too
        except OSError as e:
            return [_U32.pack(errno_to_stat(e)), pre, self._post_op(dpath)]
        return [_OK, pre, self._post_op(dpath)]

    def _listing(self, dpath: str, dst: os.stat_result) -> list[tuple[str, int]]:
        parent = os.path.dirname(dpath) if dst.st_ino != self.export.root_ino else dpath
        entries = [(".", dst.st_ino), ("..", os.lstat(parent).st_ino)]
        with os.scandir(dpath) as it:
            # fileids must match GETATTR's, so st_ino (overlayfs's d_ino may differ from it).
            for e in it:
                try:
                    entries.append((e.name, e.stat(follow_symlinks=False).st_ino))
                except OSError:
                    continue  # removed meanwhile
        entries[2:] = sorted(entries[2:])
        return entries

    async def readdir(self, u: Unpacker, ctx: CallContext) -> list[Buffer]:
        return await self._readdir(u, ctx, plus=False)

    async def readdirplus(self, u: Unpacker, ctx: CallContext) -> list[Buffer]:
        return await self._readdir(u, ctx, plus=True)

    async def _readdir(self, u: Unpacker, ctx: CallContext, plus: bool) -> list[Buffer]:
        fh = unpack_fh(u)
        cookie = u.u64()
        u.fopaque(NFS3_COOKIEVERFSIZE)
        dircount = u.u32() if plus else 0
        maxcount = u.u32()
        dpath, dst = await self._resolve(fh)
        if not pystat.S_ISDIR(dst.st_mode):
            raise Nfs3Error(Stat.NFS3ERR_NOTDIR)
        check(dst, self._who(ctx), MAY_READ)
        entries = self._listing(dpath, dst)
        if cookie > len(entries):
            raise Nfs3Error(Stat.NFS3ERR_BAD_COOKIE)
        maxcount = min(maxcount, self.max_io, max(0, ctx.max_reply - 256))
        p = Packer()
        p.raw(_OK)
        p.raw(self._attr(dst))
        p.raw(b"\0" * NFS3_COOKIEVERFSIZE)
        used_dir = 0
        n = 0
        eof = True
        for i in range(cookie, len(entries)):
            name, ino = entries[i]
            e = Packer()
            e.bool(True)
            e.u64(ino)
            e.string(name, NAME_MAX)
            e.u64(i + 1)
            dbytes = len(e.buf)
            if plus:
                cpath = self.export.child_path(dpath, dst, name)
                try:
                    cst = os.lstat(cpath)
                    e.raw(self._attr(cst))
                    e.bool(True)
                    pack_fh(e, self._handle_of(cpath, cst))
                except (OSError, Nfs3Error):
                    e.raw(NO_ATTR)
                    e.bool(False)
            if len(p.buf) + len(e.buf) + 8 > maxcount or (plus and dircount and used_dir + dbytes > dircount):
                eof = False
                break
            p.raw(e.buf)
            used_dir += dbytes
            n += 1
        if n == 0 and not eof:
            raise Nfs3Error(Stat.NFS3ERR_TOOSMALL)
        p.bool(False)
        p.bool(eof)
        return [p.buf]

    async def fsstat(self, u: Unpacker, ctx: CallContext) -> list[Buffer]:
        fh = unpack_fh(u)
        path, st = await self._resolve(fh)
        v = os.statvfs(path)
        res = FsStat(None, v.f_blocks * v.f_frsize, v.f_bfree * v.f_frsize, v.f_bavail * v.f_frsize,
                     v.f_files, v.f_ffree, v.f_favail, 0)
        p = Packer()
        res.pack(p)
        return [_OK, self._attr(st), p.buf[4:]]

    async def fsinfo(self, u: Unpacker, ctx: CallContext) -> list[Buffer]:
        fh = unpack_fh(u)
        _, st = await self._resolve(fh)
        io = self.udp_max_io if ctx.transport == "udp" else self.max_io
        res = FsInfo(None, io, io, 4096, io, io, 4096, min(io, 64 * 1024), MAX_FILE_SIZE,
                     NfsTime(0, 1), FSF3_LINK | FSF3_SYMLINK | FSF3_HOMOGENEOUS | FSF3_CANSETTIME)
        p = Packer()
        res.pack(p)
        return [_OK, self._attr(st), p.buf[4:]]

    async def pathconf(self, u: Unpacker, ctx: CallContext) -> list[Buffer]:
        fh = unpack_fh(u)
        _, st = await self._resolve(fh)
        p = Packer()
        p.u32(32000)  # linkmax
        p.u32(NAME_MAX)
        p.bool(True)  # no_trunc
        p.bool(True)  # chown_restricted
        p.bool(False)  # case_insensitive
        p.bool(True)  # case_preserving
        return [_OK, self._attr(st), p.buf]

    async def commit(self, u: Unpacker, ctx: CallContext) -> list[Buffer]:
        fh = unpack_fh(u)
        u.u64()  # offset
        u.u32()  # count: we always commit the whole file
        path, st = await self._resolve(fh)
        if not pystat.S_ISREG(st.st_mode):
            raise Nfs3Error(Stat.NFS3ERR_ISDIR if pystat.S_ISDIR(st.st_mode) else Stat.NFS3ERR_INVAL)
        pre = self._pre_op(st)
        fd = self.export.fd(path, st)
        await _sync(fd, os.fsync)
        return [_OK, pre, self._attr(os.fstat(fd)), self.verifier]


