"""MOUNT version 3 (RFC 1813 appendix I): the server program and the client's codecs.

MNT accepts the export's path (or its alias) and any directory below it, like Linux's mountd,
because libnfs mounts the directory that contains the file in its URL; symlinks in that path are
resolved, as mountd does, and the result must lie inside the export (MNT3ERR_ACCES otherwise).
"""

from __future__ import annotations

import enum
import ipaddress
import os
import stat as pystat
from collections import OrderedDict
from collections.abc import Sequence

from nfs.nfs3 import NFS3_FHSIZE, Nfs3Error, status_name
from nfs.nfsd import allowed
from nfs.rpc import AuthFlavor
from nfs.store import Export
from nfs.svc import Buffer, CallContext
from nfs.xdr import Packer, Unpacker, XdrError

MOUNT_PROGRAM = 100005
MOUNT_V3 = 3
MNTPATHLEN = 1024
MNTNAMLEN = 255


class MountProc(enum.IntEnum):
    NULL = 0
    MNT = 1
    DUMP = 2
    UMNT = 3
    UMNTALL = 4
    EXPORT = 5


class MountStat(enum.IntEnum):
    MNT3_OK = 0
    MNT3ERR_PERM = 1
    MNT3ERR_NOENT = 2
    MNT3ERR_IO = 5
    MNT3ERR_ACCES = 13
    MNT3ERR_NOTDIR = 20
    MNT3ERR_INVAL = 22
    MNT3ERR_NAMETOOLONG = 63
    MNT3ERR_NOTSUPP = 10004
    MNT3ERR_SERVERFAULT = 10006


class MountError(Exception):
    def __init__(self, status: int, path: str) -> None:
        super().__init__(f"MNT {path}: {status_name(MountStat, status)}")
        self.status = status


class MountProgram:
    prog = MOUNT_PROGRAM
    versions = (MOUNT_V3,)
    name = "MOUNT3"

    def __init__(self, export: Export, names: Sequence[str],
                 allow: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network], max_mounts: int = 1024) -> None:
        self.export = export
        self.names = [n.rstrip("/") or "/" for n in names]
        self.allow = list(allow)
        self.mounts: OrderedDict[tuple[str, str], None] = OrderedDict()
        self.max_mounts = max_mounts

    def has_proc(self, vers: int, proc: int) -> bool:
        return proc in MountProc._value2member_map_

    def non_idempotent(self, vers: int, proc: int) -> bool:
        return False

    async def call(self, vers: int, proc: int, args: Unpacker, ctx: CallContext) -> list[Buffer]:
        p = Packer()
        if proc == MountProc.NULL or proc == MountProc.UMNTALL:
            if proc == MountProc.UMNTALL:
                for key in [k for k in self.mounts if k[0] == ctx.host]:
                    del self.mounts[key]
            return []
        if proc == MountProc.MNT:
            path = args.string(MNTPATHLEN)
            status, fh = self.mnt(path, ctx.host)
            p.u32(status)
            if status == MountStat.MNT3_OK:
                p.opaque(fh, NFS3_FHSIZE)
                p.array([AuthFlavor.AUTH_SYS, AuthFlavor.AUTH_NONE], p.u32)
            return [p.buf]
        if proc == MountProc.DUMP:
            for host, d in self.mounts:
                p.bool(True)
                p.string(host, MNTNAMLEN)
                p.string(d, MNTPATHLEN)
            p.bool(False)
            return [p.buf]
        if proc == MountProc.UMNT:
            path = args.string(MNTPATHLEN)
            self.mounts.pop((ctx.host, path), None)
            return []
        # EXPORT: each name with the groups (client networks) allowed to mount it.
        for name in self.names:
            p.bool(True)
            p.string(name, MNTPATHLEN)
            for net in self.allow:
                p.bool(True)
                p.string(str(net), MNTNAMLEN)
            p.bool(False)
        p.bool(False)
        return [p.buf]

    def mnt(self, path: str, host: str) -> tuple[int, bytes]:
        if not allowed(host, self.allow):
            return MountStat.MNT3ERR_ACCES, b""
        norm = "/" + "/".join(c for c in path.split("/") if c)
        rest = None
        for name in self.names:
            if norm == name:
                rest = ""
                break
            prefix = name if name.endswith("/") else name + "/"
            if norm.startswith(prefix):
                rest = norm[len(prefix):]
                break
        if rest is None:
            return MountStat.MNT3ERR_NOENT, b""
        if rest:
            # mountd resolves symlinks in the path it is asked for (libnfs mounts the directory
            # of a file's path, which may be a symlink): the result must stay inside the export.
            real = os.path.realpath(os.path.join(self.export.root, rest))
            if real != self.export.root and not real.startswith(self.export.root + "/"):
                return MountStat.MNT3ERR_ACCES, b""
            rest = real[len(self.export.root):]
        dpath, dst = self.export.root, os.lstat(self.export.root)
        parent_ino = dst.st_ino
        try:
            for comp in (c for c in rest.split("/") if c):
                if comp in (".", ".."):
                    return MountStat.MNT3ERR_INVAL, b""
                child = self.export.child_path(dpath, dst, comp)
                cst = os.lstat(child)
                if not pystat.S_ISDIR(cst.st_mode):
                    return MountStat.MNT3ERR_NOTDIR, b""
                if not self.export.same_fs(child, cst):
                    return MountStat.MNT3ERR_ACCES, b""  # a mount point: not crossed
                parent_ino = dst.st_ino
                dpath, dst = child, cst
        except FileNotFoundError:
            return MountStat.MNT3ERR_NOENT, b""
        except (OSError, Nfs3Error):
            return MountStat.MNT3ERR_ACCES, b""
        fh = self.export.fh_for(dpath, dst, parent_ino) if dpath != self.export.root else self.export.root_fh
        self.mounts[(host, norm)] = None
        while len(self.mounts) > self.max_mounts:
            self.mounts.popitem(last=False)
        return MountStat.MNT3_OK, fh


# -- client codecs -------------------------------------------------------------------------------


def encode_mnt_args(path: str) -> bytes:
    p = Packer()
    p.string(path, MNTPATHLEN)
    return p.bytes()


def decode_mnt_res(u: Unpacker, path: str) -> tuple[bytes, list[int]]:
    status = u.u32()
    if status != MountStat.MNT3_OK:
        raise MountError(status, path)
    fh = u.opaque(NFS3_FHSIZE)
    flavors = u.array(u.u32, 64)
    return fh, flavors


def decode_exports(u: Unpacker) -> list[tuple[str, list[str]]]:
    out: list[tuple[str, list[str]]] = []
    while u.bool():
        d = u.string(MNTPATHLEN)
        groups = []
        while u.bool():
            groups.append(u.string(MNTNAMLEN))
            if len(groups) > 4096:
                raise XdrError("too many groups")
        out.append((d, groups))
        if len(out) > 4096:
            raise XdrError("too many exports")
    return out


def decode_mountlist(u: Unpacker) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    while u.bool():
        out.append((u.string(MNTNAMLEN), u.string(MNTPATHLEN)))
        if len(out) > 65536:
            raise XdrError("mount list too long")
    return out
