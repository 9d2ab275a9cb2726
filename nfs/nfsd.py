"""The NFSv3 program (100003 version 3) over an `Export`: knfsd's nfs3proc.c, for one directory.

Every procedure of RFC 1813 is here. `call` decodes the arguments with the procedure's codec
(nfs/nfs3xdr.py; an `XdrError` there means GARBAGE_ARGS and nothing was done), runs the
procedure, which returns its result object, and encodes that. An `Nfs3Error` or `OSError` that
escapes a procedure becomes its failure result; procedures that change a directory catch their
own so the failure still carries the directory's wcc_data, before and after.

Confinement: handles resolve only to objects of the export (nfs/store.py); a procedure acts on
one validated name relative to an O_PATH fd of its directory (mkdirat, renameat, linkat,
symlinkat, mknodat, unlinkat), checked to be the directory its handle named, and never follows a
symlink: a symlink's target is data. WRITE with DATA_SYNC/FILE_SYNC, COMMIT, and the metadata
of every change (knfsd's commit_metadata) are on disk before the reply, synced in worker threads
so other clients keep being served.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import ipaddress
import os
import stat as pystat
import struct
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import trio

from nfs.auth import (
    MAY_EXEC, MAY_READ, MAY_WRITE, Cred, Squash, check, check_delete, check_setattr, effective_cred, mode_bits,
)
from nfs.nfs3 import (
    ACCESS3_DELETE, ACCESS3_EXECUTE, ACCESS3_EXTEND, ACCESS3_LOOKUP, ACCESS3_MODIFY, ACCESS3_READ,
    FSF3_CANSETTIME, FSF3_HOMOGENEOUS, FSF3_LINK, FSF3_SYMLINK, MAX_FILE_SIZE, NAME_MAX, NFS_PROGRAM, NFS_V3,
    NON_IDEMPOTENT, CreateMode, FType, Nfs3Error, Proc, Stat, StableHow,
)
from nfs.nfs3xdr import (
    NFS3_PROCEDURES, AccessArgs, AccessRes, Attr, CommitArgs, CommitRes, CreateArgs, CreateRes, DirOpArgs, Entry3,
    FhArgs, FsinfoRes, FsstatRes, GetattrRes, LinkArgs, LinkRes, LookupRes, MkdirArgs, MknodArgs, NfsTime,
    NullRes, PathconfRes, ProcXdr, ReadArgs, ReaddirArgs, ReaddirplusArgs, ReaddirRes, ReadlinkRes, ReadRes, RenameArgs,
    RenameRes, Sattr3, SetattrArgs, StatAttr, SymlinkArgs, WccAttr, WccData, WccRes, WriteArgs, WriteRes, entry_size,
    fattr3_bytes, wcc_attr_bytes,
)
from nfs.store import FH_SIZE, SLOW_FREE, Export, check_name, close_fds, errno_to_stat, frees_slowly, proc_path
from nfs.rpc import AuthSys
from nfs.sendfile import SENDFILE_MIN_READ, FileSlice
from nfs.svc import Buffer, CallContext, peer_address
from nfs.writeback import DEFAULT_WRITE_BEHIND, WriteBehind, start_writeback
from nfs.xdr import Packer, Unpacker, XdrError

# UNSTABLE WRITEs up to this size (the largest wtmax) are copied into the page cache on the event
# loop, as knfsd copies them in the nfsd thread that took the call: a thread hop per call cost
# more CPU (GIL and wake-ups) than the copy. Syncs (FILE_SYNC, DATA_SYNC, COMMIT) go to threads.
INLINE_WRITE = 1024 * 1024
_OK = Stat.NFS3_OK
# The hot path's fixed layouts (nfs3xdr's codecs give the same bytes: tests/unit/nfs/test_fast_path.py).
_U32 = struct.Struct(">I")
_FH_HEAD = 4 + FH_SIZE  # a handle of ours: its length, then its bytes (44, no padding)
_READ_TAIL = struct.Struct(">QI")  # offset, count
_WRITE_TAIL = struct.Struct(">QIII")  # offset, count, stable, data length
_READ_OK = struct.Struct(">III")  # count, eof, data length
_WRITE_OK = struct.Struct(">II")  # count, committed
_TRUE = b"\0\0\0\1"
_OK_TRUE = b"\0\0\0\0" + _TRUE  # NFS3_OK, then an attribute follows
_PAD = (b"", b"\0\0\0", b"\0\0", b"\0")


def _pwrite_all(fd: int, mv: memoryview, offset: int) -> None:
    done = 0
    while done < len(mv):
        done += os.pwrite(fd, mv[done:], offset + done)


def _write_sync(fd: int, mv: memoryview, offset: int, sync: Callable[[int], None] | None) -> None:
    _pwrite_all(fd, mv, offset)
    if sync is not None:
        sync(fd)


class _Later(Exception):
    """call_nowait: this call must wait (a walk of the export, a sync): leave it to `call`."""


def _may(st: os.stat_result, who: Cred, want: int) -> bool:
    """`check` with owner override (READ and WRITE), as a truth value."""
    try:
        check(st, who, want, owner_override=True)
    except Nfs3Error:
        return False
    return True


def _write_now(a: WriteArgs) -> bool:
    return a.stable == StableHow.UNSTABLE and a.count <= INLINE_WRITE


def _object(a: Any) -> bytes:
    return a.object  # type: ignore[no-any-return]


def _file(a: Any) -> bytes:
    return a.file  # type: ignore[no-any-return]


def _dir(a: Any) -> bytes:
    return a.dir  # type: ignore[no-any-return]


def _truncate(fd: int, size: int) -> None:
    """ftruncate(2), for a worker thread (`NfsProgram._set`)."""
    os.ftruncate(fd, size)


async def _release(held: list[int]) -> None:
    """Close the fds `_hold` kept, in a worker thread: the last close frees the file's page
    cache and blocks (50 ms for 256 MiB on ext4), and meanwhile the loop lets go of the core
    lock, so the service threads go on. The reply still waits for it: the space is free when
    the call answers, as after a local unlink or rename."""
    if held:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(close_fds, held)


def _encode(xdr: ProcXdr[Any, Any], res: object) -> list[Buffer]:
    p = Packer()
    xdr.encode_res(p, res)
    return p.iov()  # type: ignore[return-value]


def _null() -> list[Buffer]:
    return _encode(NFS3_PROCEDURES[Proc.NULL], NullRes())


def valid_sattr(a: Sattr3) -> None:
    """Values no file can take: a size past off_t (NFS3ERR_FBIG, as knfsd), a time with 10^9
    nanoseconds or more (NFS3ERR_INVAL)."""
    if a.size is not None and a.size > MAX_FILE_SIZE:
        raise Nfs3Error(Stat.NFS3ERR_FBIG, f"size {a.size} is past the largest file")
    for t in (a.atime, a.mtime):
        if isinstance(t, NfsTime) and t.nseconds >= 1_000_000_000:
            raise Nfs3Error(Stat.NFS3ERR_INVAL, f"time with {t.nseconds} nanoseconds")


def _fsync_at(dir_fd: int, name: str | None) -> None:
    """fsync a directory (name None) or an entry of it; a symlink cannot be opened: its
    directory entry, fsync'ed with the directory, is what holds it."""
    if name is None:
        fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dir_fd)
    else:
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dir_fd)
        except OSError as e:
            if e.errno not in (errno.ELOOP, errno.ENXIO, errno.EACCES):  # symlink, socket, no read
                raise
            return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno != errno.EINVAL:  # a FIFO or socket: its directory entry is what holds it
            raise
    finally:
        os.close(fd)


async def _commit_metadata(dir_fd: int, *names: str | None) -> None:
    """knfsd's commit_metadata: a change is on disk before its reply (the new object and/or
    its directory fsync'ed), in a worker thread."""
    def run() -> None:
        for n in names:
            _fsync_at(dir_fd, n)

    await trio.to_thread.run_sync(run)


def allowed(host: str, nets: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    addr = peer_address(host)
    return addr is not None and any(addr in n for n in nets if n.version == addr.version)


async def _status(action: Callable[[], Awaitable[None]]) -> int:
    """Run a change; its failure as an nfsstat3."""
    try:
        await action()
    except Nfs3Error as e:
        return e.status
    except OSError as e:
        return errno_to_stat(e)
    return _OK


class _Dir:
    """A directory of the export a procedure changes: its path, its lstat before the change
    (wcc_data's pre_op_attr) and a verified O_PATH fd to act relative to."""

    __slots__ = ("path", "st", "fd")

    def __init__(self, path: str, st: os.stat_result, fd: int) -> None:
        self.path, self.st, self.fd = path, st, fd

    def child_st(self, name: str) -> os.stat_result:
        return os.stat(name, dir_fd=self.fd, follow_symlinks=False)


_MKNOD_TYPES = {FType.NF3CHR: pystat.S_IFCHR, FType.NF3BLK: pystat.S_IFBLK, FType.NF3SOCK: pystat.S_IFSOCK,
                FType.NF3FIFO: pystat.S_IFIFO}


class NfsProgram:
    prog = NFS_PROGRAM
    versions = (NFS_V3,)
    name = "NFS3"

    def __init__(self, export: Export, allow: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network],
                 max_io: int = 1024 * 1024, udp_max_io: int = 32 * 1024, squash: Squash | None = None,
                 write_behind: int = DEFAULT_WRITE_BEHIND) -> None:
        self.export = export
        self.squash = squash or Squash()
        self._walkers = trio.CapacityLimiter(2)
        self._as_root = os.geteuid() == 0  # new files are given to their creator (needs root)
        self.allow = list(allow)
        self._allowed: dict[str, bool] = {}  # host -> in --allow (parsing addresses per call is slow)
        self._unreadable: set[int] = set()  # files a big READ failed to read after its header went
        self._whos: dict[int, tuple[AuthSys | None, Cred]] = {}  # id(credential) -> (it, its effective cred)
        self.max_io = max_io
        self.udp_max_io = udp_max_io
        # The write verifier: new at every start, so clients know to resend uncommitted data.
        self.verifier = os.urandom(8)
        self.fsid = export.fsid
        self.write_behind = WriteBehind(write_behind)
        self.loop_token: trio.lowlevel.TrioToken | None = None  # the event loop's (set by the server)
        self._procs: dict[int, Callable[[Any, CallContext], Awaitable[Any]]] = {
            Proc.NULL: self.null, Proc.GETATTR: self.getattr, Proc.SETATTR: self.setattr,
            Proc.LOOKUP: self.lookup, Proc.ACCESS: self.access, Proc.READLINK: self.readlink, Proc.READ: self.read,
            Proc.WRITE: self.write, Proc.CREATE: self.create, Proc.MKDIR: self.mkdir, Proc.SYMLINK: self.symlink,
            Proc.MKNOD: self.mknod, Proc.REMOVE: self.remove, Proc.RMDIR: self.rmdir, Proc.RENAME: self.rename,
            Proc.LINK: self.link, Proc.READDIR: self.readdir, Proc.READDIRPLUS: self.readdirplus,
            Proc.FSSTAT: self.fsstat, Proc.FSINFO: self.fsinfo, Proc.PATHCONF: self.pathconf,
            Proc.COMMIT: self.commit,
        }
        # What call_nowait may run: (the handle of the arguments, the procedure once it is resolved).
        self._now: dict[int, tuple[Callable[[Any], bytes], Callable[[Any, CallContext, str, os.stat_result], Any]]] = {
            Proc.GETATTR: (_object, self._getattr), Proc.LOOKUP: (_dir, self._lookup),
            Proc.ACCESS: (_object, self._access), Proc.READ: (_file, self._read), Proc.WRITE: (_file, self._write),
            Proc.FSSTAT: (_object, self._fsstat), Proc.FSINFO: (_object, self._fsinfo),
            Proc.PATHCONF: (_object, self._pathconf),
        }

    def has_proc(self, vers: int, proc: int) -> bool:
        return proc in self._procs

    def non_idempotent(self, vers: int, proc: int) -> bool:
        return proc in NON_IDEMPOTENT

    async def call(self, vers: int, proc: int, args: Unpacker, ctx: CallContext) -> list[Buffer]:
        xdr = NFS3_PROCEDURES[proc]
        a = xdr.decode_args(args)  # XdrError: GARBAGE_ARGS, nothing done
        try:
            if proc != Proc.NULL:
                self._check_allowed(ctx.host)
            res = await self._procs[proc](a, ctx)
        except Nfs3Error as e:
            res = xdr.res(e.status)
        except OSError as e:
            res = xdr.res(errno_to_stat(e))
        return _encode(xdr, res)

    def call_nowait(self, vers: int, proc: int, args: Unpacker,
                    ctx: CallContext) -> Callable[[], list[Buffer]] | None:
        """The call, ready to run without waiting: a procedure whose only wait is a handle
        lookup that needs no walk of the export (and a WRITE that needs no sync), checked and
        decoded, nothing done yet; None otherwise (or on any failure: `call` then answers it
        the same way), with `args` left as they were."""
        now = self._now.get(proc)
        if now is None:
            return _null if proc == Proc.NULL else None  # (NULL: a client's ping, nothing to wait for)
        fh_of, impl = now
        pos = args.pos
        xdr = NFS3_PROCEDURES[proc]
        try:
            a = xdr.decode_args(args)
            self._check_allowed(ctx.host)
            if proc == Proc.WRITE and not _write_now(a):
                raise _Later
            _, _, hit = self.export.resolve_cached(fh_of(a))
            if hit is None:
                raise _Later
        except (_Later, XdrError, Nfs3Error, OSError):
            args.pos = pos
            return None
        path, st = hit

        def run() -> list[Buffer]:
            try:
                res = impl(a, ctx, path, st)
            except Nfs3Error as e:
                res = xdr.res(e.status)
            except OSError as e:
                res = xdr.res(errno_to_stat(e))
            return _encode(xdr, res)

        return run

    def call_fast(self, proc: int, msg: memoryview, pos: int, host: str, transport: str, max_reply: int,
                  cred: AuthSys | None) -> Callable[[], list[Buffer]] | None:
        """`call_nowait` for the hot calls, from the raw message: a READ, or an UNSTABLE WRITE
        of at most INLINE_WRITE bytes, whose arguments start at `msg[pos]`, of an allowed host,
        on a file whose handle and fd are known (`Export.open_file`) and that the caller may
        read or write. Decoded with fixed layouts (no Unpacker, no argument objects), answered
        with the same bytes as `call`. None, with nothing done, for anything else (a failure
        included): the caller then goes the usual way, which answers it."""
        if proc != Proc.READ and proc != Proc.WRITE:
            return None
        end = pos + _FH_HEAD
        if len(msg) < end + 12 or _U32.unpack_from(msg, pos)[0] != FH_SIZE or not self._allowed.get(host):
            return None
        hit = self.export.open_file(bytes(msg[pos + 4 : end]))
        if hit is None:
            return None
        fd, st = hit
        if not pystat.S_ISREG(st.st_mode):
            return None
        who = self._who_fast(cred)
        fsid = self.fsid
        if proc == Proc.READ:
            offset, count = _READ_TAIL.unpack_from(msg, end)
            if not _may(st, who, MAY_READ):
                return None
            limit = self.udp_max_io if transport == "udp" else self.max_io
            count = min(count, limit, max(0, max_reply - 256))
            stream = transport == "tcp"
            unreadable = self._unreadable

            def read() -> list[Buffer]:
                n = max(0, min(count, st.st_size - offset))
                eof = offset + n >= st.st_size
                data: Buffer | FileSlice
                if stream and n >= SENDFILE_MIN_READ and st.st_ino not in unreadable:
                    # A big READ's data goes to the socket straight from the page cache, with
                    # sendfile (no copy here): nfs/sendfile.py. (The cached fd serves, as the
                    # reply is sent at once, with the core lock still held.)
                    data = FileSlice(fd, offset, n)
                else:
                    try:
                        data = os.pread(fd, n, offset) if n else b""
                    except OSError as e:  # (as the usual way answers it: NFS3ERR_IO, say)
                        return _encode(NFS3_PROCEDURES[Proc.READ], NFS3_PROCEDURES[Proc.READ].res(errno_to_stat(e)))
                    if len(data) < n:  # the file shrank since the fstat
                        n = len(data)
                        eof = True
                head = _OK_TRUE + fattr3_bytes(st, fsid) + _READ_OK.pack(n, eof, n)
                return [head, data, _PAD[n & 3]] if n & 3 else [head, data]

            return read
        if len(msg) < end + 20:
            return None
        offset, count, stable, dlen = _WRITE_TAIL.unpack_from(msg, end)
        start = end + 20
        if (stable != StableHow.UNSTABLE or count > dlen or count > INLINE_WRITE or len(msg) < start + dlen + (-dlen & 3)
                or offset + count > MAX_FILE_SIZE or not _may(st, who, MAY_WRITE)):
            return None
        data = msg[start : start + count]

        def write() -> list[Buffer]:
            pre = wcc_attr_bytes(st)
            try:
                _pwrite_all(fd, data, offset)
                if self.write_behind.wrote(st.st_ino, count):
                    self._start_writeback(fd, st.st_ino)
                post = os.fstat(fd)
            except OSError as e:
                return _encode(NFS3_PROCEDURES[Proc.WRITE], WriteRes(errno_to_stat(e)))
            return [_OK_TRUE + pre + _TRUE + fattr3_bytes(post, fsid) + _WRITE_OK.pack(count, stable) + self.verifier]

        return write

    def note_unreadable(self, ino: int) -> None:
        """A big READ's file could not be read after its reply's header had gone (the
        connection was cut, nfs/sendfile.py): its next READs read their data before the
        header, so a failure is answered (NFS3ERR_IO) instead of cut again. (Bounded: a file
        forgotten reads by sendfile again.)"""
        if len(self._unreadable) >= 1024:
            self._unreadable.clear()
        self._unreadable.add(ino)

    def _who_fast(self, cred: AuthSys | None) -> Cred:
        """effective_cred, kept for the credential objects the RPC layer hands out again."""
        key = id(cred)
        hit = self._whos.get(key)
        if hit is not None and hit[0] is cred:
            return hit[1]
        who = effective_cred(cred, self.squash)
        if len(self._whos) >= 256:
            self._whos.clear()
        self._whos[key] = (cred, who)
        return who

    def _check_allowed(self, host: str) -> None:
        ok = self._allowed.get(host)
        if ok is None:
            ok = self._allowed[host] = allowed(host, self.allow)
            if len(self._allowed) > 4096:
                self._allowed.clear()
        if not ok:
            raise Nfs3Error(Stat.NFS3ERR_ACCES, f"{host} is not allowed")

    # -- helpers ---------------------------------------------------------------------------

    def _attr(self, st: os.stat_result) -> StatAttr:
        return StatAttr(st, self.fsid)

    def _post_op(self, path: str) -> Attr | None:
        try:
            return StatAttr(os.lstat(path), self.fsid)
        except OSError:
            return None

    def _wcc(self, d: _Dir) -> WccData:
        return WccData(WccAttr.from_stat(d.st), self._post_op(d.path))

    async def _resolve(self, fh: bytes) -> tuple[str, os.stat_result]:
        """Export.resolve, with the walk of the export a cache miss needs done in a worker
        thread (at most two at once), so other clients are served meanwhile."""
        ino, parent, hit = self.export.resolve_cached(fh)
        if hit is not None:
            return hit
        path = await trio.to_thread.run_sync(self.export.find, ino, parent, limiter=self._walkers)
        return self.export.resolved(ino, path)

    @contextlib.asynccontextmanager
    async def _dir(self, fh: bytes) -> Any:
        """The directory a handle names, opened for a change (NOTDIR if it is none)."""
        path, st = await self._resolve(fh)
        fd = self.export.open_dir(path, st)
        try:
            yield _Dir(path, st, fd)
        finally:
            os.close(fd)

    def _who(self, ctx: CallContext) -> Cred:
        return effective_cred(ctx.cred, self.squash)

    def _give(self, d: _Dir, name: str, who: Cred) -> None:
        """A new object belongs to its creator (the group of a setgid directory)."""
        if self._as_root and (who.uid, who.gid) != (0, 0):
            gid = d.st.st_gid if d.st.st_mode & pystat.S_ISGID else who.gid
            os.chown(name, who.uid, gid, dir_fd=d.fd, follow_symlinks=False)

    def _handle_of(self, path: str, st: os.stat_result) -> bytes:
        return self.export.fh_for(path, st, self.export.parent_ino(path))

    @staticmethod
    def _new_name(name: str) -> None:
        """A name a new object may take: not empty, '.' or '..', no '/', at most NAME_MAX."""
        if name in (".", ".."):
            raise Nfs3Error(Stat.NFS3ERR_EXIST)
        check_name(name)

    @staticmethod
    def _old_name(name: str) -> None:
        """A name REMOVE, RMDIR and RENAME may take away: not '.' or '..' (INVAL)."""
        if name in (".", ".."):
            raise Nfs3Error(Stat.NFS3ERR_INVAL, "cannot remove . or ..")
        check_name(name)

    # -- procedures ------------------------------------------------------------------------

    async def null(self, a: object, ctx: CallContext) -> NullRes:
        return NullRes()

    async def getattr(self, a: FhArgs, ctx: CallContext) -> GetattrRes:
        return self._getattr(a, ctx, *await self._resolve(a.object))

    def _getattr(self, a: FhArgs, ctx: CallContext, path: str, st: os.stat_result) -> GetattrRes:
        return GetattrRes(_OK, self._attr(st))

    async def setattr(self, a: SetattrArgs, ctx: CallContext) -> WccRes:
        path, st = await self._resolve(a.object)
        pre = WccAttr.from_stat(st)
        if a.guard is not None and NfsTime.from_ns(st.st_ctime_ns) != a.guard:
            return WccRes(Stat.NFS3ERR_NOT_SYNC, WccData(pre, self._attr(st)))

        async def change() -> None:
            self._check_setattr(st, a.new_attributes, self._who(ctx))
            await self._set(path, st, a.new_attributes)
            await _commit_metadata_path(path, st)  # the new attributes are on disk before the reply

        status = await _status(change)
        return WccRes(status, WccData(pre, self._post_op(path)))

    @staticmethod
    def _check_setattr(st: os.stat_result, a: Sattr3, who: Cred) -> None:
        valid_sattr(a)
        check_setattr(st, who, size=a.size is not None and a.size != st.st_size, mode=a.mode is not None,
                      uid=a.uid, gid=a.gid, times=a.atime is not None or a.mtime is not None,
                      client_times=isinstance(a.atime, NfsTime) or isinstance(a.mtime, NfsTime))

    async def _set(self, path: str, st: os.stat_result, a: Sattr3) -> None:
        """`_apply`, but a cut of SLOW_FREE or more off a regular file, which frees its page
        cache and blocks as a last close does, runs in a worker thread on a dup of its fd,
        while the service threads go on."""
        if a.size is not None and pystat.S_ISREG(st.st_mode) and st.st_size - a.size >= SLOW_FREE:
            valid_sattr(a)
            fd = os.dup(self.export.fd(path, st))
            try:
                await trio.to_thread.run_sync(_truncate, fd, a.size)
            finally:
                os.close(fd)
            a = dataclasses.replace(a, size=None)
        self._apply(path, st, a)

    def _apply(self, path: str, st: os.stat_result, a: Sattr3) -> None:
        """Set attributes on the very inode `st` describes: through an O_PATH fd of it (a
        symlink's own attributes by its path, with no follow), never through a path a rename
        could have pointed elsewhere meanwhile."""
        valid_sattr(a)
        if a.size is not None:
            if pystat.S_ISDIR(st.st_mode):
                raise Nfs3Error(Stat.NFS3ERR_ISDIR)
            if not pystat.S_ISREG(st.st_mode):
                raise Nfs3Error(Stat.NFS3ERR_INVAL)
            if a.size != st.st_size:
                os.truncate(self.export.fd(path, st), a.size)
        if a.mode is None and a.uid is None and a.gid is None and a.atime is None and a.mtime is None:
            return
        if pystat.S_ISLNK(st.st_mode):
            self._apply_meta(path, False, a)
            return
        fd = self.export.open_object(path, st)
        try:
            self._apply_meta(proc_path(fd), True, a)
        finally:
            os.close(fd)

    @staticmethod
    def _apply_meta(target: str, follow: bool, a: Sattr3) -> None:
        if a.mode is not None and follow:  # (a symlink has no mode of its own on Linux)
            os.chmod(target, a.mode & 0o7777)
        if a.uid is not None or a.gid is not None:
            os.chown(target, -1 if a.uid is None else a.uid, -1 if a.gid is None else a.gid, follow_symlinks=follow)
        if a.atime is not None or a.mtime is not None:
            now = time.time_ns()
            cur = os.stat(target, follow_symlinks=follow)

            def pick(t: NfsTime | str | None, old: int) -> int:
                if t is None:
                    return old
                return now if isinstance(t, str) else t.to_ns()

            os.utime(target, ns=(pick(a.atime, cur.st_atime_ns), pick(a.mtime, cur.st_mtime_ns)),
                     follow_symlinks=follow)

    async def lookup(self, a: DirOpArgs, ctx: CallContext) -> LookupRes:
        return self._lookup(a, ctx, *await self._resolve(a.dir))

    def _lookup(self, a: DirOpArgs, ctx: CallContext, dpath: str, dst: os.stat_result) -> LookupRes:
        dattr = self._attr(dst)
        try:
            path = self.export.child_path(dpath, dst, a.name)
            check(dst, self._who(ctx), MAY_EXEC)
            st = os.lstat(path)
            if not self.export.same_fs(path, st):
                raise Nfs3Error(Stat.NFS3ERR_ACCES, "a mount point: not crossed")
        except Nfs3Error as e:
            return LookupRes(e.status, dir_attributes=dattr)
        except OSError as e:
            return LookupRes(errno_to_stat(e), dir_attributes=dattr)
        return LookupRes(_OK, self._handle_of(path, st), self._attr(st), dattr)

    async def access(self, a: AccessArgs, ctx: CallContext) -> AccessRes:
        return self._access(a, ctx, *await self._resolve(a.object))

    def _access(self, a: AccessArgs, ctx: CallContext, path: str, st: os.stat_result) -> AccessRes:
        return AccessRes(_OK, self._attr(st), a.access & self._access_bits(st, ctx))

    def _access_bits(self, st: os.stat_result, ctx: CallContext) -> int:
        mode = st.st_mode
        bits = mode_bits(st, self._who(ctx))
        out = 0
        if bits & MAY_READ:
            out |= ACCESS3_READ
        if bits & MAY_WRITE:
            out |= ACCESS3_MODIFY | ACCESS3_EXTEND
            if pystat.S_ISDIR(mode):
                out |= ACCESS3_DELETE
        if bits & MAY_EXEC:
            out |= ACCESS3_LOOKUP if pystat.S_ISDIR(mode) else ACCESS3_EXECUTE
        return out

    async def readlink(self, a: FhArgs, ctx: CallContext) -> ReadlinkRes:
        path, st = await self._resolve(a.object)
        if not pystat.S_ISLNK(st.st_mode):
            return ReadlinkRes(Stat.NFS3ERR_INVAL, self._attr(st))
        fd = self.export.open_object(path, st)
        try:
            target = os.readlink("", dir_fd=fd)  # readlinkat(fd, ""): that very symlink
        finally:
            os.close(fd)
        return ReadlinkRes(_OK, self._attr(st), target)

    async def read(self, a: ReadArgs, ctx: CallContext) -> ReadRes:
        return self._read(a, ctx, *await self._resolve(a.file))

    def _read(self, a: ReadArgs, ctx: CallContext, path: str, st: os.stat_result) -> ReadRes:
        if not pystat.S_ISREG(st.st_mode):
            raise Nfs3Error(Stat.NFS3ERR_ISDIR if pystat.S_ISDIR(st.st_mode) else Stat.NFS3ERR_INVAL)
        check(st, self._who(ctx), MAY_READ, owner_override=True)
        limit = self.udp_max_io if ctx.transport == "udp" else self.max_io
        count = min(a.count, limit, max(0, ctx.max_reply - 256))
        fd = self.export.fd(path, st)
        st = os.fstat(fd)
        offset = a.offset
        n = max(0, min(count, st.st_size - offset))
        eof = offset + n >= st.st_size
        # Read into memory and sent with the reply's header, as ganesha does. (The loop's way, for
        # a READ the service thread could not answer: a handle not resolved yet, say. The
        # thread's big READs over TCP go by sendfile, `call_fast`; here the reply may wait for
        # the connection, and the open-file cache may close its fd meanwhile.)
        data = os.pread(fd, n, offset) if n else b""
        if len(data) < n:  # the file shrank since the fstat
            n = len(data)
            eof = True
        return ReadRes(_OK, self._attr(st), n, eof, data)

    async def write(self, a: WriteArgs, ctx: CallContext) -> WriteRes:
        path, st = await self._resolve(a.file)
        if _write_now(a):
            return self._write(a, ctx, path, st)
        pre, fd, mv = self._write_checks(a, ctx, path, st)
        sync = None if a.stable == StableHow.UNSTABLE else os.fsync if a.stable == StableHow.FILE_SYNC else os.fdatasync
        # Big writes (and any sync) in a worker thread, on our own dup of the fd (the export's
        # fd cache may close its copy meanwhile): the event loop keeps serving.
        own = os.dup(fd)
        try:
            await trio.to_thread.run_sync(_write_sync, own, mv, a.offset, sync)
            st = os.fstat(own)
        finally:
            os.close(own)
        return WriteRes(_OK, WccData(pre, self._attr(st)), a.count, a.stable, self.verifier)

    def _write(self, a: WriteArgs, ctx: CallContext, path: str, st: os.stat_result) -> WriteRes:
        """An UNSTABLE WRITE up to INLINE_WRITE: a copy into the page cache, on the event loop."""
        pre, fd, mv = self._write_checks(a, ctx, path, st)
        _pwrite_all(fd, mv, a.offset)
        if self.write_behind.wrote(st.st_ino, len(mv)):
            self._start_writeback(fd, st.st_ino)
        return WriteRes(_OK, WccData(pre, self._attr(os.fstat(fd))), a.count, a.stable, self.verifier)

    def _start_writeback(self, fd: int, ino: int) -> None:
        """Start the file's writeback in a worker thread (the block layer may make it wait),
        without waiting for it: nfs/writeback.py."""
        own = os.dup(fd)

        async def run() -> None:
            # (a system task: whatever happens here must not end the server)
            try:
                await trio.to_thread.run_sync(start_writeback, own)
            except OSError:
                pass  # (the COMMIT's fsync reports what went wrong with the data)
            finally:
                self.write_behind.done(ino)
                with contextlib.suppress(OSError):
                    os.close(own)

        try:
            trio.lowlevel.spawn_system_task(run)
        except RuntimeError:  # not on the event loop's thread (a service thread): the loop starts it
            if self.loop_token is None:
                self.write_behind.done(ino)
                os.close(own)
                return
            self.loop_token.run_sync_soon(trio.lowlevel.spawn_system_task, run)

    def _write_checks(self, a: WriteArgs, ctx: CallContext, path: str,
                      st: os.stat_result) -> tuple[WccAttr, int, memoryview]:
        """A WRITE's checks (permission, size) in knfsd's order; its pre-op attributes, the
        file's fd and the data to write."""
        pre = WccAttr.from_stat(st)
        if pystat.S_ISREG(st.st_mode):
            check(st, self._who(ctx), MAY_WRITE, owner_override=True)
        fd = self.export.fd(path, st)
        if a.offset + a.count > MAX_FILE_SIZE:
            raise Nfs3Error(Stat.NFS3ERR_FBIG)
        data = a.data
        assert isinstance(data, memoryview)
        return pre, fd, data[: a.count] if a.count != len(data) else data

    # -- making objects --------------------------------------------------------------------

    async def _make(self, where: DirOpArgs, ctx: CallContext,
                    make: Callable[[_Dir, str, Cred], Awaitable[None]]) -> CreateRes:
        """CREATE, MKDIR, SYMLINK, MKNOD: `make` makes the entry (as root: it is given to its
        creator), then it and the directory are on disk before the reply."""
        async with self._dir(where.dir) as d:
            name = where.name
            who = self._who(ctx)

            async def change() -> None:
                self._new_name(name)
                check(d.st, who, MAY_WRITE | MAY_EXEC)
                await make(d, name, who)
                await _commit_metadata(d.fd, name, None)

            status = await _status(change)
            wcc = self._wcc(d)
            if status != _OK:
                return CreateRes(status, dir_wcc=wcc)
            path = os.path.join(d.path, name)
            st = d.child_st(name)
            return CreateRes(_OK, self.export.fh_for(path, st, d.st.st_ino), self._attr(st), wcc)

    async def create(self, a: CreateArgs, ctx: CallContext) -> CreateRes:
        attrs = a.attributes

        async def make(d: _Dir, name: str, who: Cred) -> None:
            valid_sattr(attrs)  # (before anything is created)
            if a.how == CreateMode.EXCLUSIVE:
                self._create_exclusive(d, name, who, a.verf)
                return
            perm = 0o644 if attrs.mode is None else attrs.mode & 0o7777
            flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
            try:
                fd = os.open(name, flags | os.O_EXCL, perm, dir_fd=d.fd)
                created = True
            except FileExistsError:
                if a.how == CreateMode.GUARDED:
                    raise
                fd = os.open(name, flags, perm, dir_fd=d.fd)  # UNCHECKED: an existing file is fine
                created = False
            os.close(fd)
            if created:
                self._give(d, name, who)
            st = d.child_st(name)
            if not pystat.S_ISREG(st.st_mode):
                raise Nfs3Error(Stat.NFS3ERR_EXIST)
            if not created:  # setting attributes of someone's existing file: SETATTR's rules
                self._check_setattr(st, attrs, who)
            # The requested mode exactly (not filtered by our umask, as knfsd), and the rest.
            await self._set(os.path.join(d.path, name), st, attrs)

        return await self._make(a.where, ctx, make)

    def _create_exclusive(self, d: _Dir, name: str, who: Cred, verf: bytes) -> None:
        """EXCLUSIVE: the verifier is kept in the new file's atime and mtime (as knfsd does), so
        a retransmitted CREATE finds its own file and succeeds, and another one gets EXIST."""
        atime_s, mtime_s = struct.unpack(">II", verf)
        try:
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                         dir_fd=d.fd)
        except FileExistsError:
            st = d.child_st(name)
            if not (pystat.S_ISREG(st.st_mode) and st.st_atime_ns == atime_s * 1_000_000_000
                    and st.st_mtime_ns == mtime_s * 1_000_000_000):
                raise
            return
        try:
            os.utime(fd, ns=(atime_s * 1_000_000_000, mtime_s * 1_000_000_000))
        finally:
            os.close(fd)
        self._give(d, name, who)

    async def mkdir(self, a: MkdirArgs, ctx: CallContext) -> CreateRes:
        async def make(d: _Dir, name: str, who: Cred) -> None:
            valid_sattr(a.attributes)
            if a.attributes.size is not None:
                raise Nfs3Error(Stat.NFS3ERR_INVAL, "a directory has no size to set")
            os.mkdir(name, 0o755 if a.attributes.mode is None else a.attributes.mode & 0o7777, dir_fd=d.fd)
            self._give(d, name, who)
            self._apply(os.path.join(d.path, name), d.child_st(name), a.attributes)

        return await self._make(a.where, ctx, make)

    async def symlink(self, a: SymlinkArgs, ctx: CallContext) -> CreateRes:
        async def make(d: _Dir, name: str, who: Cred) -> None:
            if not a.symlink_data:
                raise Nfs3Error(Stat.NFS3ERR_INVAL, "empty symlink target")
            # The target is stored as given: data, never looked up or followed here.
            os.symlink(a.symlink_data, name, dir_fd=d.fd)
            self._give(d, name, who)

        return await self._make(a.where, ctx, make)

    async def mknod(self, a: MknodArgs, ctx: CallContext) -> CreateRes:
        kind = _MKNOD_TYPES.get(FType(a.type))
        if kind is None:  # REG, DIR, LNK have their own procedures
            async with self._dir(a.where.dir) as d:
                return CreateRes(Stat.NFS3ERR_BADTYPE, dir_wcc=self._wcc(d))

        async def make(d: _Dir, name: str, who: Cred) -> None:
            valid_sattr(a.attributes)
            perm = 0o644 if a.attributes.mode is None else a.attributes.mode & 0o7777
            device = os.makedev(*a.spec) if kind in (pystat.S_IFCHR, pystat.S_IFBLK) else 0
            os.mknod(name, kind | perm, device, dir_fd=d.fd)
            self._give(d, name, who)

        return await self._make(a.where, ctx, make)

    # -- removing and renaming -------------------------------------------------------------

    async def remove(self, a: DirOpArgs, ctx: CallContext) -> WccRes:
        return await self._unlink(a, ctx, rmdir=False)

    async def rmdir(self, a: DirOpArgs, ctx: CallContext) -> WccRes:
        return await self._unlink(a, ctx, rmdir=True)

    async def _unlink(self, a: DirOpArgs, ctx: CallContext, rmdir: bool) -> WccRes:
        async with self._dir(a.dir) as d:
            gone: list[os.stat_result] = []
            held: list[int] = []  # a big file whose last link goes (`_hold`)

            async def change() -> None:
                if rmdir and a.name == "..":
                    raise Nfs3Error(Stat.NFS3ERR_NOTEMPTY)  # (Linux's answer for rmdir "..")
                self._old_name(a.name)
                st = d.child_st(a.name)
                isdir = pystat.S_ISDIR(st.st_mode)
                if isdir != rmdir:
                    raise Nfs3Error(Stat.NFS3ERR_ISDIR if isdir else Stat.NFS3ERR_NOTDIR)
                if rmdir and not self.export.same_fs(os.path.join(d.path, a.name), st):
                    raise Nfs3Error(Stat.NFS3ERR_ACCES, "a mount point")
                check_delete(d.st, st, self._who(ctx))
                if rmdir:
                    os.rmdir(a.name, dir_fd=d.fd)
                else:
                    self._hold(d.fd, a.name, st, held)
                    os.unlink(a.name, dir_fd=d.fd)
                gone.append(st)
                await _commit_metadata(d.fd, None)  # the name is gone on disk too

            try:
                status = await _status(change)
                if gone and gone[0].st_nlink <= 1:
                    self.export.close_ino(gone[0].st_ino)  # (a big file's fd is in `held`)
            finally:
                await _release(held)
            return WccRes(status, self._wcc(d))

    def _hold(self, dir_fd: int, name: str, st: os.stat_result, held: list[int]) -> None:
        """Before the last link of a big file goes (REMOVE, or a RENAME onto it): hold the
        file, by its cached fd taken out of the cache or else an O_PATH fd of it, so that its
        last close, which frees its page cache and blocks, is ours, in a worker (`_release`)."""
        if not frees_slowly(st, links=1):
            return
        fd = self.export.forget_fd(st.st_ino)
        if fd is None:
            with contextlib.suppress(OSError):
                fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        if fd is not None:
            held.append(fd)

    async def rename(self, a: RenameArgs, ctx: CallContext) -> RenameRes:
        self.export.same_export(a.source.dir, a.target.dir)  # XDEV first, as knfsd
        async with self._dir(a.source.dir) as src, self._dir(a.target.dir) as dst:
            who = self._who(ctx)
            held: list[int] = []  # a big file the rename replaces (`_hold`)

            async def change() -> None:
                for n in (a.source.name, a.target.name):
                    self._old_name(n)
                st = src.child_st(a.source.name)
                check_delete(src.st, st, who)
                check(dst.st, who, MAY_WRITE | MAY_EXEC)
                try:
                    old = dst.child_st(a.target.name)
                except FileNotFoundError:
                    pass
                else:
                    if (old.st_ino, old.st_dev) == (st.st_ino, st.st_dev):
                        return  # the same object under both names: nothing to do (RFC 1813)
                    check_delete(dst.st, old, who)
                    if pystat.S_ISDIR(old.st_mode) != pystat.S_ISDIR(st.st_mode):
                        raise Nfs3Error(Stat.NFS3ERR_EXIST if not pystat.S_ISDIR(st.st_mode) else Stat.NFS3ERR_NOTDIR)
                    self._hold(dst.fd, a.target.name, old, held)
                os.rename(a.source.name, a.target.name, src_dir_fd=src.fd, dst_dir_fd=dst.fd)
                self.export.moved(st.st_ino, os.path.join(dst.path, a.target.name), dst.st.st_ino,
                                  pystat.S_ISDIR(st.st_mode))
                await _commit_metadata(src.fd, None)
                if dst.st.st_ino != src.st.st_ino:
                    await _commit_metadata(dst.fd, None)

            try:
                status = await _status(change)
            finally:
                await _release(held)
            return RenameRes(status, self._wcc(src), self._wcc(dst))

    async def link(self, a: LinkArgs, ctx: CallContext) -> LinkRes:
        self.export.same_export(a.file, a.link.dir)
        path, st = await self._resolve(a.file)
        async with self._dir(a.link.dir) as d:

            async def change() -> None:
                self._new_name(a.link.name)
                if pystat.S_ISDIR(st.st_mode):
                    raise Nfs3Error(Stat.NFS3ERR_ISDIR, "no hard links to directories")
                check(d.st, self._who(ctx), MAY_WRITE | MAY_EXEC)
                fd = self.export.open_object(path, st)
                try:
                    # linkat of the very inode the handle names (through its O_PATH fd), never
                    # of a path: the source cannot be swapped for something outside meanwhile.
                    os.link(proc_path(fd), a.link.name, dst_dir_fd=d.fd, follow_symlinks=True)
                finally:
                    os.close(fd)
                await _commit_metadata(d.fd, a.link.name, None)

            status = await _status(change)
            return LinkRes(status, self._post_op(path), self._wcc(d))

    # -- directories -----------------------------------------------------------------------

    def _listing(self, dpath: str, dst: os.stat_result) -> list[tuple[str, int]]:
        parent = os.path.dirname(dpath) if dst.st_ino != self.export.root_ino else dpath
        entries = [(".", dst.st_ino), ("..", os.lstat(parent).st_ino)]
        with os.scandir(dpath) as it:
            # fileids must match GETATTR's, so st_ino (overlayfs's d_ino may differ from it).
            # Names that are not UTF-8 come as surrogates and go out as the bytes they are.
            for e in it:
                try:
                    entries.append((e.name, e.stat(follow_symlinks=False).st_ino))
                except OSError:
                    continue  # removed meanwhile
        entries[2:] = sorted(entries[2:])
        return entries

    async def readdir(self, a: ReaddirArgs, ctx: CallContext) -> ReaddirRes:
        return await self._readdir(a.dir, a.cookie, 0, a.count, ctx, plus=False)

    async def readdirplus(self, a: ReaddirplusArgs, ctx: CallContext) -> ReaddirRes:
        return await self._readdir(a.dir, a.cookie, a.dircount, a.maxcount, ctx, plus=True)

    async def _readdir(self, fh: bytes, cookie: int, dircount: int, maxcount: int, ctx: CallContext,
                       plus: bool) -> ReaddirRes:
        dpath, dst = await self._resolve(fh)
        if not pystat.S_ISDIR(dst.st_mode):
            return ReaddirRes(Stat.NFS3ERR_NOTDIR, self._attr(dst))
        check(dst, self._who(ctx), MAY_READ)
        entries = self._listing(dpath, dst)
        if cookie > len(entries):
            return ReaddirRes(Stat.NFS3ERR_BAD_COOKIE, self._attr(dst))
        maxcount = min(maxcount, self.max_io, max(0, ctx.max_reply - 256))
        res = ReaddirRes(_OK, self._attr(dst), eof=True)
        used = 4 + 4 + 84 + 8 + 8  # status, post_op_attr, cookieverf, list end and eof
        used_dir = 0
        for i in range(cookie, len(entries)):
            name, ino = entries[i]
            e = Entry3(ino, name, i + 1)
            if plus:
                self._plus(e, dpath, dst)
            dbytes, nbytes = entry_size(e, plus)
            if used + nbytes > maxcount or (plus and dircount and used_dir + dbytes > dircount):
                res.eof = False
                break
            res.entries.append(e)
            used += nbytes
            used_dir += dbytes
        if not res.entries and not res.eof:
            return ReaddirRes(Stat.NFS3ERR_TOOSMALL, self._attr(dst))
        return res

    def _plus(self, e: Entry3, dpath: str, dst: os.stat_result) -> None:
        """READDIRPLUS's attributes and handle of an entry; none for a mount point (not ours)."""
        try:
            cpath = self.export.child_path(dpath, dst, e.name)
            cst = os.lstat(cpath)
            if self.export.same_fs(cpath, cst):
                e.name_attributes = self._attr(cst)
                e.name_handle = self._handle_of(cpath, cst)
        except (OSError, Nfs3Error):
            pass

    # -- the file system -------------------------------------------------------------------

    async def fsstat(self, a: FhArgs, ctx: CallContext) -> FsstatRes:
        return self._fsstat(a, ctx, *await self._resolve(a.object))

    def _fsstat(self, a: FhArgs, ctx: CallContext, path: str, st: os.stat_result) -> FsstatRes:
        v = os.statvfs(path)
        return FsstatRes(_OK, self._attr(st), v.f_blocks * v.f_frsize, v.f_bfree * v.f_frsize,
                         v.f_bavail * v.f_frsize, v.f_files, v.f_ffree, v.f_favail, 0)

    async def fsinfo(self, a: FhArgs, ctx: CallContext) -> FsinfoRes:
        return self._fsinfo(a, ctx, *await self._resolve(a.object))

    def _fsinfo(self, a: FhArgs, ctx: CallContext, path: str, st: os.stat_result) -> FsinfoRes:
        io = self.udp_max_io if ctx.transport == "udp" else self.max_io
        return FsinfoRes(_OK, self._attr(st), io, io, 4096, io, io, 4096, min(io, 64 * 1024), MAX_FILE_SIZE,
                         NfsTime(0, 1), FSF3_LINK | FSF3_SYMLINK | FSF3_HOMOGENEOUS | FSF3_CANSETTIME)

    async def pathconf(self, a: FhArgs, ctx: CallContext) -> PathconfRes:
        return self._pathconf(a, ctx, *await self._resolve(a.object))

    def _pathconf(self, a: FhArgs, ctx: CallContext, path: str, st: os.stat_result) -> PathconfRes:
        return PathconfRes(_OK, self._attr(st), linkmax=32000, name_max=NAME_MAX)

    async def commit(self, a: CommitArgs, ctx: CallContext) -> CommitRes:
        path, st = await self._resolve(a.file)
        pre = WccAttr.from_stat(st)
        if not pystat.S_ISREG(st.st_mode):
            status = Stat.NFS3ERR_ISDIR if pystat.S_ISDIR(st.st_mode) else Stat.NFS3ERR_INVAL
            return CommitRes(status, WccData(pre, self._attr(st)))
        # On our own dup: the cache may close its fd while the fsync runs (eviction, the laundrette).
        own = os.dup(self.export.fd(path, st))
        try:
            await trio.to_thread.run_sync(os.fsync, own)  # offset and count: the whole file is committed
            post = os.fstat(own)
        finally:
            os.close(own)
        self.write_behind.synced(st.st_ino)
        return CommitRes(_OK, WccData(pre, self._attr(post)), self.verifier)


async def _commit_metadata_path(path: str, st: os.stat_result) -> None:
    """SETATTR's commit_metadata: the object's inode (or a symlink's directory) on disk."""
    def run() -> None:
        if pystat.S_ISLNK(st.st_mode) or pystat.S_ISSOCK(st.st_mode) or pystat.S_ISFIFO(st.st_mode):
            target = os.path.dirname(path)
        else:
            target = path
        fd = os.open(target, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    await trio.to_thread.run_sync(run)


__all__ = ["NfsProgram", "allowed", "valid_sattr"]
