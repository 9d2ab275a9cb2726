"""A new user's session through our client: every NFSv3 procedure, with the errors RFC 1813
gives each and the directories' wcc_data; shared by the unit tests (UDP and TCP) and the interop
test that has tshark dissect it."""

from __future__ import annotations

import os
from pathlib import Path

from unit.nfs.helpers import expect, raw

from nfs.client import NfsClient
from nfs.nfs3 import FILE_SYNC, UNSTABLE, CreateMode, FType, Proc, Stat
from nfs.nfs3xdr import DirOpArgs, MkdirArgs, RenameArgs, Sattr3


async def run_every_procedure(c: NfsClient, export: Path) -> None:
    """mkdir, write, ln -s, readlink, ln, mv, ls, rm, rmdir and the rest: all 22 procedures."""
    root = await c.mount(str(export))
    await c.null()
    d, dattr = await c.mkdir(root, "dir", mode=0o750)
    assert dattr is not None and dattr.type == FType.NF3DIR and dattr.mode == 0o750
    await expect(Stat.NFS3ERR_EXIST, c.mkdir(root, "dir"))
    await expect(Stat.NFS3ERR_NAMETOOLONG, c.mkdir(root, "n" * 256))
    fh, _ = await c.create(d, "file", mode=0o644, how=CreateMode.GUARDED)
    data = os.urandom(50_000)
    assert (await c.write(fh, 0, data, stable=UNSTABLE)).count == len(data)
    await c.commit(fh)
    assert await c.read(fh, 0, len(data)) == data
    assert (await c.getattr(fh)).size == len(data)
    await c.setattr(fh, mode=0o600)
    assert await c.access(fh, 0x3F) & 0x1  # ACCESS3_READ
    # ln -s and readlink: the target is stored as given, never resolved by the server.
    sl, sattr = await c.symlink(d, "link", "file")
    assert sattr is not None and sattr.type == FType.NF3LNK
    assert await c.readlink(sl) == "file"
    await expect(Stat.NFS3ERR_INVAL, c.readlink(fh))  # not a symlink
    await expect(Stat.NFS3ERR_EXIST, c.symlink(d, "link", "other"))
    # ln: a second name for the file
    lattr = await c.link(fh, root, "hardlink")
    assert lattr is not None and lattr.nlink == 2
    await expect(Stat.NFS3ERR_EXIST, c.link(fh, root, "hardlink"))
    # mv: the wcc_data of both directories, before and after
    res = await raw(c, Proc.RENAME, RenameArgs(DirOpArgs(d, "file"), DirOpArgs(root, "moved")))
    assert res.status == Stat.NFS3_OK  # type: ignore[attr-defined]
    for wcc in (res.fromdir_wcc, res.todir_wcc):  # type: ignore[attr-defined]
        assert wcc.before is not None and wcc.after is not None
    _, mattr = await c.lookup(root, "moved")
    assert mattr is not None and mattr.fileid == (await c.getattr(fh)).fileid  # the old handle still works
    await expect(Stat.NFS3ERR_NOENT, c.lookup(d, "file"))
    await expect(Stat.NFS3ERR_INVAL, c.rename(root, "moved", d, ".."))
    # ls: READDIR and READDIRPLUS
    assert {n for n, _ in await c.readdir(d)} == {".", "..", "link"}
    plus = {e.name: e for e in await c.readdirplus(root)}
    assert plus["dir"].name_handle == d and plus["moved"].name_attributes is not None
    # mknod: a FIFO (devices need CAP_MKNOD; REG is not MKNOD's)
    ff, fattr = await c.mknod(d, "fifo", FType.NF3FIFO, mode=0o600)
    assert fattr is not None and fattr.type == FType.NF3FIFO
    await expect(Stat.NFS3ERR_BADTYPE, c.mknod(d, "reg", FType.NF3REG))
    # rmdir and rm, with their errors (a failure still carries the directory's wcc_data)
    res = await raw(c, Proc.RMDIR, DirOpArgs(root, "dir"))
    assert res.status == Stat.NFS3ERR_NOTEMPTY and res.wcc.before is not None  # type: ignore[attr-defined]
    await expect(Stat.NFS3ERR_NOTDIR, c.rmdir(root, "moved"))
    await expect(Stat.NFS3ERR_ISDIR, c.remove(root, "dir"))
    await expect(Stat.NFS3ERR_INVAL, c.rmdir(d, "."))
    await expect(Stat.NFS3ERR_NOTDIR, c.lookup(fh, "x"))
    for name in ("link", "fifo"):
        await c.remove(d, name)
    await c.rmdir(root, "dir")
    await c.remove(root, "hardlink")
    assert (await c.getattr(fh)).nlink == 1
    # mkdir with a sattr3 size is INVAL; the file system's answers
    res = await raw(c, Proc.MKDIR, MkdirArgs(DirOpArgs(root, "sized"), Sattr3(size=1)))
    assert res.status == Stat.NFS3ERR_INVAL  # type: ignore[attr-defined]
    assert (await c.fsstat(root)).tbytes > 0
    assert (await c.pathconf(root)).name_max == 255
    assert (await c.fsinfo(root)).wtmax >= 8192
    # EXCLUSIVE create: a retransmission (same verifier) succeeds, another verifier is EXIST
    x1, _ = await c.create(root, "x", how=CreateMode.EXCLUSIVE, verf=b"verifier", mode=0o600)
    x2, _ = await c.create(root, "x", how=CreateMode.EXCLUSIVE, verf=b"verifier", mode=0o600)
    assert x1 == x2
    await expect(Stat.NFS3ERR_EXIST, c.create(root, "x", how=CreateMode.EXCLUSIVE, verf=b"other!!!"))
    assert (await c.write(x1, 0, b"page", FILE_SYNC)).committed == FILE_SYNC
    await c.remove(root, "x")
    await c.remove(root, "moved")
    assert sorted(os.listdir(export)) == []
