"""The export: a directory on disk, and the opaque file handles that name what is inside it.

A handle is 44 bytes: magic "NSW1", the export's fsid, the inode number, the parent directory's
inode number (a hint for finding the file again after a restart) and a 16-byte keyed BLAKE2b
tag over all of that. The key is kept in the server's state directory, so handles survive a
restart; a handle whose tag does not verify was forged or mangled (NFS3ERR_BADHANDLE). A handle
is resolved only to a path found *inside* the export (from a cache of paths built from validated
names, or by walking the export without following symlinks), so no handle can reach outside it;
if the inode is no longer there the handle is stale (NFS3ERR_STALE).

Crossing mounts (knfsd without `crossmnt`): an object on another mount than the export's root is
not part of the export, even when it is the same device (a bind mount): LOOKUP does not cross
into it, no handle resolves to it, and a walk of the export does not descend into it. The mount
is told by statx's mount id (nfs/mntid.py), the device by st_dev.

Limitation (documented): without the inode generation number a deleted file's inode number that
the filesystem reuses inside the export would make an old handle name the new file.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import logging
import os
import stat as pystat
import struct
from collections import OrderedDict
from pathlib import Path

from nfs.mntid import fd_mount_id, mount_id
from nfs.nfs3 import NAME_MAX, Nfs3Error, Stat

log = logging.getLogger("netswap.nfs.store")

FH_MAGIC = b"NSW1"
_FH_BODY = struct.Struct(">4sQQQ")
FH_SIZE = _FH_BODY.size + 16  # 44
_MAX_KNOWN = 4096  # verified handles remembered


def default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "netswap" / "nfs"


def load_key(state_dir: Path) -> bytes:
    """The handle-signing key, created (mode 0600) on first use and kept across restarts."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / "fhkey"
    try:
        key = path.read_bytes()
        if len(key) == 32:
            return key
    except FileNotFoundError:
        pass
    key = os.urandom(32)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, key)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return key


def errno_to_stat(e: OSError) -> int:
    return {
        errno.ENOENT: Stat.NFS3ERR_NOENT, errno.EACCES: Stat.NFS3ERR_ACCES, errno.EPERM: Stat.NFS3ERR_PERM,
        errno.EEXIST: Stat.NFS3ERR_EXIST, errno.ENOTDIR: Stat.NFS3ERR_NOTDIR, errno.EISDIR: Stat.NFS3ERR_ISDIR,
        errno.EINVAL: Stat.NFS3ERR_INVAL, errno.EFBIG: Stat.NFS3ERR_FBIG, errno.ENOSPC: Stat.NFS3ERR_NOSPC,
        errno.EROFS: Stat.NFS3ERR_ROFS, errno.ENAMETOOLONG: Stat.NFS3ERR_NAMETOOLONG,
        errno.ENOTEMPTY: Stat.NFS3ERR_NOTEMPTY, errno.EDQUOT: Stat.NFS3ERR_DQUOT, errno.ELOOP: Stat.NFS3ERR_INVAL,
        errno.EXDEV: Stat.NFS3ERR_XDEV, errno.EMLINK: Stat.NFS3ERR_MLINK, errno.EOPNOTSUPP: Stat.NFS3ERR_NOTSUPP,
        errno.ENXIO: Stat.NFS3ERR_NXIO, errno.ENODEV: Stat.NFS3ERR_NODEV, errno.ESTALE: Stat.NFS3ERR_STALE,
    }.get(e.errno or 0, Stat.NFS3ERR_IO)


class Export:
    """One exported directory: handle minting and resolution, and a cache of open files."""

    def __init__(self, root: str | os.PathLike[str], key: bytes, max_open: int = 64,
                 max_walk: int = 200_000) -> None:
        self.root = os.path.realpath(root)
        st = os.stat(self.root)
        if not pystat.S_ISDIR(st.st_mode):
            raise NotADirectoryError(self.root)
        self.dev = st.st_dev
        self.mnt_id = mount_id(self.root)
        self.root_ino = st.st_ino
        # From the path and root inode, not st_dev: device numbers of overlay/tmpfs mounts can
        # change across reboots, and handles must survive restarts.
        self.fsid = int.from_bytes(hashlib.blake2b(f"{self.root}:{st.st_ino}".encode(), digest_size=8).digest(),
                                   "big")
        self._key = key
        self._paths: dict[int, str] = {st.st_ino: self.root}  # ino -> absolute path inside root
        self._parents: dict[int, int] = {st.st_ino: st.st_ino}
        self._fds: OrderedDict[int, int] = OrderedDict()  # ino -> fd, LRU
        self._referenced: set[int] = set()  # inodes whose cached fd was used since the last `expire_idle`
        self._known: dict[bytes, tuple[int, int]] = {}  # handles that verified -> (ino, parent ino)
        # Inodes a walk of the export did not find: later calls with their handles are STALE
        # at once instead of walking the whole export again (until the inode is seen again).
        self._gone: OrderedDict[int, None] = OrderedDict()
        self.max_open = max_open
        # fds of removed big files pushed out of the cache by newer ones: closed by the
        # laundrette (`expire_idle`), off the calls (at most MAX_DOOMED; past that, inline).
        self._doomed: list[int] = []
        self.max_walk = max_walk
        self.root_fh = self.make_fh(st.st_ino, st.st_ino)

    # -- handles ---------------------------------------------------------------------------

    def _tag(self, body: bytes) -> bytes:
        return hashlib.blake2b(body, key=self._key, digest_size=16).digest()

    def make_fh(self, ino: int, parent_ino: int) -> bytes:
        body = _FH_BODY.pack(FH_MAGIC, self.fsid, ino, parent_ino)
        return body + self._tag(body)

    def fh_for(self, path: str, st: os.stat_result, parent_ino: int) -> bytes:
        self._gone.pop(st.st_ino, None)
        self._paths[st.st_ino] = path
        self._parents[st.st_ino] = parent_ino
        return self.make_fh(st.st_ino, parent_ino)

    def decode_fh(self, fh: bytes) -> tuple[int, int]:
        """(ino, parent ino) of a handle this export minted; BADHANDLE otherwise. Handles that
        verified are remembered (a bounded table), so a client's next calls cost no MAC."""
        known = self._known.get(fh)
        if known is not None:
            return known
        if len(fh) != FH_SIZE or fh[:4] != FH_MAGIC:
            raise Nfs3Error(Stat.NFS3ERR_BADHANDLE, "not one of our handles")
        body = fh[: _FH_BODY.size]
        if not hmac.compare_digest(self._tag(body), fh[_FH_BODY.size :]):  # (constant time)
            raise Nfs3Error(Stat.NFS3ERR_BADHANDLE, "handle does not verify")
        _, fsid, ino, parent = _FH_BODY.unpack(body)
        if fsid != self.fsid:
            raise Nfs3Error(Stat.NFS3ERR_STALE, "handle of another export")
        if len(self._known) >= _MAX_KNOWN:
            self._known.clear()
        self._known[bytes(fh)] = (ino, parent)
        return ino, parent

    def same_export(self, a: bytes, b: bytes) -> None:
        """RENAME and LINK between two exports: NFS3ERR_XDEV (before either is resolved)."""
        fsids = set()
        for fh in (a, b):
            if len(fh) == FH_SIZE and fh[:4] == FH_MAGIC and hmac.compare_digest(
                    self._tag(fh[: _FH_BODY.size]), fh[_FH_BODY.size :]):
                fsids.add(_FH_BODY.unpack(fh[: _FH_BODY.size])[1])
        if len(fsids) > 1:
            raise Nfs3Error(Stat.NFS3ERR_XDEV, "the handles are of two exports")

    def moved(self, ino: int, path: str, parent_ino: int, isdir: bool) -> None:
        """RENAME moved an object: its cached path (and a directory's descendants') follow."""
        old = self._paths.get(ino)
        self._paths[ino] = path
        self._parents[ino] = parent_ino
        if isdir and old is not None:
            prefix = old + "/"
            for i, p in list(self._paths.items()):
                if p.startswith(prefix):
                    self._paths[i] = path + p[len(old):]

    def resolve(self, fh: bytes) -> tuple[str, os.stat_result]:
        """Path and lstat of the object a handle names; BADHANDLE or STALE on failure. May walk
        the export (blocking): the server uses resolve_cached/find/resolved to walk in a thread."""
        ino, parent, hit = self.resolve_cached(fh)
        if hit is not None:
            return hit
        return self.resolved(ino, self.find(ino, parent))

    def resolve_cached(self, fh: bytes) -> tuple[int, int, tuple[str, os.stat_result] | None]:
        """(ino, parent ino, (path, lstat) if known without walking the export)."""
        ino, parent = self.decode_fh(fh)
        path = self._paths.get(ino)
        if path is not None:
            st = self._lstat_ino(path, ino)
            if st is not None:
                return ino, parent, (path, st)
        if ino in self._gone:
            raise Nfs3Error(Stat.NFS3ERR_STALE, f"inode {ino} is gone")
        return ino, parent, None

    def resolved(self, ino: int, path: str | None) -> tuple[str, os.stat_result]:
        """Record what find() found (on the caller's thread: the caches are not locked)."""
        if path is None:
            self._forget(ino)
            raise Nfs3Error(Stat.NFS3ERR_STALE, f"inode {ino} is gone")
        st = os.lstat(path)
        self._paths[ino] = path
        return path, st

    def _lstat_ino(self, path: str, ino: int) -> os.stat_result | None:
        try:
            st = os.lstat(path)
            return st if st.st_ino == ino and self.same_fs(path, st) else None
        except OSError:
            return None

    def same_fs(self, path: str, st: os.stat_result) -> bool:
        """Is this object on the export's mount (knfsd's crossmnt rule)? Its mount id must be
        the root's (a bind mount of the same device has another); and a directory must be on
        the root's device (overlayfs may report other device numbers for plain files)."""
        if st.st_dev != self.dev and pystat.S_ISDIR(st.st_mode):
            return False
        return self.mnt_id is None or mount_id(path) == self.mnt_id

    def _verified(self, fd: int, st: os.stat_result) -> int:
        """`fd` if it is the object `st` describes, on the export's mount; else closed, STALE."""
        try:
            fst = os.fstat(fd)
            if fst.st_ino != st.st_ino or fst.st_dev != st.st_dev or (
                    self.mnt_id is not None and fd_mount_id(fd) != self.mnt_id):
                raise Nfs3Error(Stat.NFS3ERR_STALE, "the object changed under its path")
        except BaseException:
            os.close(fd)
            raise
        return fd

    def open_dir(self, path: str, st: os.stat_result) -> int:
        """An O_PATH fd of a directory of the export, checked to be the inode `st` describes:
        the procedures act on one name relative to it (mkdirat, renameat, ...), so no path of
        theirs passes through a symlink or a mount that appeared meanwhile."""
        if not pystat.S_ISDIR(st.st_mode):
            raise Nfs3Error(Stat.NFS3ERR_NOTDIR)
        fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        return self._verified(fd, st)

    def open_object(self, path: str, st: os.stat_result) -> int:
        """An O_PATH fd of any object of the export (a symlink itself, not its target), checked
        as open_dir's; act on it through /proc/self/fd (see `proc_path`)."""
        fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
        return self._verified(fd, st)

    def find(self, ino: int, parent: int) -> str | None:
        """Find an inode inside the export: first in its parent's directory, then by walking the
        export, visiting at most `max_walk` entries (a handle whose inode is not found within
        them is treated as stale). Touches no cache, so it may run in a worker thread."""
        if ino == self.root_ino:
            return self.root
        ppath = self._paths.get(parent)
        if ppath is not None and self._lstat_ino(ppath, parent) is not None:
            hit = self._scan_dir(ppath, ino)
            if hit:
                return hit
        budget = [self.max_walk]
        for dirpath, dirs, _files in os.walk(self.root, followlinks=False):
            # (os.walk descends into mount points: not into ours, they are not the export)
            dirs[:] = [d for d in dirs if self._same_mount(os.path.join(dirpath, d))]
            hit = self._scan_dir(dirpath, ino, budget)
            if hit:
                return hit
            if budget[0] <= 0:
                log.warning("inode %d not found within %d entries of the export: treated as stale", ino,
                            self.max_walk)
                return None
        return None

    def _scan_dir(self, dirpath: str, ino: int, budget: list[int] | None = None) -> str | None:
        try:
            with os.scandir(dirpath) as it:
                for ent in it:
                    if budget is not None:
                        budget[0] -= 1
                        if budget[0] < 0:
                            return None
                    # st_ino, not the dirent's d_ino: overlayfs may report different ones.
                    try:
                        st = ent.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    if st.st_ino == ino and self.same_fs(ent.path, st):
                        return ent.path
        except OSError:
            return None
        return None

    def _same_mount(self, path: str) -> bool:
        try:
            return self.same_fs(path, os.lstat(path))
        except OSError:
            return False

    def _forget(self, ino: int) -> None:
        self._gone[ino] = None
        while len(self._gone) > 4096:
            self._gone.popitem(last=False)
        self._paths.pop(ino, None)
        self._parents.pop(ino, None)
        self.close_ino(ino)

    # -- names -----------------------------------------------------------------------------

    def child_path(self, dir_path: str, dir_st: os.stat_result, name: str) -> str:
        """The path of `name` in a directory of the export; never leaves the export."""
        if not pystat.S_ISDIR(dir_st.st_mode):
            raise Nfs3Error(Stat.NFS3ERR_NOTDIR)
        check_name(name)
        if name == ".":
            return dir_path
        if name == "..":
            if dir_st.st_ino == self.root_ino:
                return dir_path
            return os.path.dirname(dir_path)
        return os.path.join(dir_path, name)

    def parent_ino(self, path: str) -> int:
        if path == self.root:
            return self.root_ino
        return os.lstat(os.path.dirname(path)).st_ino

    # -- open files for READ/WRITE ------------------------------------------------------------

    def fd(self, path: str, st: os.stat_result) -> int:
        """An fd open read-write (or read-only) on a regular file, cached by inode."""
        ino = st.st_ino
        fd = self._fds.get(ino)
        if fd is not None:
            self._fds.move_to_end(ino)
            self._referenced.add(ino)
            return fd
        if not pystat.S_ISREG(st.st_mode):
            raise Nfs3Error(Stat.NFS3ERR_ISDIR if pystat.S_ISDIR(st.st_mode) else Stat.NFS3ERR_INVAL)
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except PermissionError:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        if os.fstat(fd).st_ino != ino:
            os.close(fd)
            raise Nfs3Error(Stat.NFS3ERR_STALE)
        self._fds[ino] = fd
        self._referenced.add(ino)
        while len(self._fds) > self.max_open:
            _, old = self._fds.popitem(last=False)
            try:
                doomed = len(self._doomed) < MAX_DOOMED and frees_slowly(os.fstat(old))
            except OSError:
                doomed = False
            if doomed:
                self._doomed.append(old)
            else:
                os.close(old)
        return fd

    def open_file(self, fh: bytes) -> tuple[int, os.stat_result] | None:
        """The hot path's resolve (READ and WRITE): the cached fd of the regular file a known
        handle names and its fstat, or None (then resolve as usual). No lstat or statx of its
        path: the fd was opened through a path that resolved inside the export, and it stays on
        that inode, as knfsd's open-file cache does. A file with no link left is not served
        here, so a removed file's handle goes the usual way and is STALE."""
        known = self._known.get(fh)
        if known is None:
            return None
        ino = known[0]
        fd = self._fds.get(ino)
        if fd is None:
            return None
        st = os.fstat(fd)
        if st.st_nlink == 0:
            return None
        self._fds.move_to_end(ino)
        self._referenced.add(ino)
        return fd, st

    def expire_idle(self) -> list[int]:
        """Forget the cached fds not used since the last call (knfsd's file cache laundrette,
        which runs every 2 s and drops the files whose REFERENCED bit it finds clear, clearing
        it on the rest): an fd not used between two calls (2 to 4 s) leaves the cache, so a
        file removed behind the server's back (not by an NFS REMOVE) gives its space back.
        Returns those fds still open, for the caller to close (`close_fds`) away from the
        calls: the last close of a removed file frees its page cache and its blocks (50 ms for
        256 MiB on ext4), which the kernel, too, leaves to a worker (an nfsd thread's final fput
        runs later, from the delayed_fput work)."""
        idle = [ino for ino in self._fds if ino not in self._referenced]
        self._referenced.clear()
        doomed, self._doomed = self._doomed, []  # (and the removed big files pushed out since)
        return doomed + [fd for ino in idle if (fd := self.forget_fd(ino)) is not None]

    def forget_fd(self, ino: int) -> int | None:
        """Take an inode's cached fd out of the cache; returned still open, for the caller to
        close."""
        return self._fds.pop(ino, None)

    def close_ino(self, ino: int) -> None:
        if (fd := self.forget_fd(ino)) is not None:
            os.close(fd)

    def close(self) -> None:
        for fd in [*self._fds.values(), *self._doomed]:
            os.close(fd)
        self._fds.clear()
        self._doomed.clear()


SLOW_FREE = 1 << 20  # bytes: a regular file this big takes longer to free than a trip to a worker thread
MAX_DOOMED = 64  # evicted fds of removed big files waiting for the laundrette


def frees_slowly(st: os.stat_result, links: int = 0) -> bool:
    """Whether freeing this file (once it has no link and no fd left; `links`: the links it
    may still have, about to go) is worth a worker thread: freeing 256 MiB of page cache and
    blocks takes about 50 ms on ext4, a worker thread's round trip about 0.1 ms."""
    return pystat.S_ISREG(st.st_mode) and st.st_nlink <= links and st.st_size >= SLOW_FREE


def close_fds(fds: list[int]) -> None:
    """Close fds taken out of the open-file cache (`Export.expire_idle`, `forget_fd`), in a
    worker thread: the last close of a removed file frees its page cache and blocks."""
    for fd in fds:
        os.close(fd)


def proc_path(fd: int) -> str:
    """The path that names exactly the object an fd holds (the kernel's magic link)."""
    return f"/proc/self/fd/{fd}"


def check_name(name: str) -> None:
    if not name or "/" in name or "\0" in name:
        raise Nfs3Error(Stat.NFS3ERR_INVAL if name else Stat.NFS3ERR_NOENT, "bad name")
    if len(name.encode("utf-8", "surrogateescape")) > NAME_MAX:
        raise Nfs3Error(Stat.NFS3ERR_NAMETOOLONG)
