"""Every NFSv3 procedure through our client against our server, over UDP and TCP; retransmitted
non-idempotent calls; export confinement; names that are not UTF-8; bind mounts not crossed."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import trio
from peers import require_root, unavailable
from unit.nfs.every_procedure import run_every_procedure
from unit.nfs.helpers import client, expect
from unit.nfs.test_failures import UdpProxy

from nfs.client import NfsClient
from nfs.mount import MountError, MountStat
from nfs.nfs3 import FILE_SYNC, NFS_PROGRAM, CreateMode, FType, Proc, Stat

H = "127.0.0.1"




@pytest.mark.parametrize("proto", ["udp", "tcp"])
async def test_every_procedure(nfs_server, proto: str) -> None:  # type: ignore[no-untyped-def]
    async with client(proto, nfs_server) as c:
        await run_every_procedure(c, nfs_server.export)
    used = {int(k.split(".")[1]) for k in nfs_server.server.svc.stats.by_proc if k.startswith("NFS3.")}
    assert used == {int(p) for p in Proc}  # all 22
    assert nfs_server.server.svc.stats.system_err == 0


async def test_retransmitted_non_idempotent_calls_get_the_first_reply(nfs_server) -> None:  # type: ignore[no-untyped-def]
    """Each call reaches the server twice: executed twice, the second MKDIR would say EXIST, the
    second RENAME, REMOVE or RMDIR NOENT. The reply cache answers the copy with the first reply."""
    async with trio.open_nursery() as n:
        proxy = UdpProxy(nfs_server.nfs_port, copies=2)
        port = await n.start(proxy.run)
        async with NfsClient.udp(H, port, nfs_server.mount_port, timeo=2.0, hard=False) as c:
            root = await c.mount(str(nfs_server.export))
            d, _ = await c.mkdir(root, "d")
            f, _ = await c.create(d, "f", how=CreateMode.GUARDED)
            await c.symlink(d, "s", "f")
            await c.link(f, root, "hard")
            await c.rename(d, "f", root, "g")
            await c.remove(root, "hard")
            await c.remove(d, "s")
            await c.rmdir(root, "d")
            await c.remove(root, "g")
            await trio.sleep(0.05)
        drc = nfs_server.server.svc.drc.stats
        assert drc.hits + drc.in_progress_drops >= 9
        assert os.listdir(nfs_server.export) == []
        n.cancel_scope.cancel()


async def test_no_procedure_reaches_outside_the_export(tmp_path: Path, nfs_server) -> None:  # type: ignore[no-untyped-def]
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret"
    secret.write_bytes(b"secret")
    os.chmod(secret, 0o600)
    async with client("tcp", nfs_server) as c:
        root = await c.mount(str(nfs_server.export))
        # A symlink's target is data: it is stored, and never followed by the server.
        ln, attr = await c.symlink(root, "escape", str(outside))
        assert attr is not None and attr.type == FType.NF3LNK and await c.readlink(ln) == str(outside)
        await expect(Stat.NFS3ERR_NOTDIR, c.lookup(ln, "secret"))
        await expect(Stat.NFS3ERR_NOTDIR, c.create(ln, "new"))
        await expect(Stat.NFS3ERR_NOTDIR, c.mkdir(ln, "new"))
        await expect(Stat.NFS3ERR_NOTDIR, c.symlink(ln, "new", "x"))
        await expect(Stat.NFS3ERR_INVAL, c.read(ln, 0, 10))
        fl, _ = await c.symlink(root, "to-secret", str(secret))
        await c.setattr(fl, mode=0o666)  # the link's own attributes, not its target's
        await expect(Stat.NFS3ERR_INVAL, c.write(fl, 0, b"x", FILE_SYNC))
        # A CREATE over a symlink to a file outside does not create or open the target.
        await c.symlink(root, "dangling", str(outside / "created"))
        with pytest.raises(Exception):
            await c.create(root, "dangling", how=CreateMode.UNCHECKED)
        # Names cannot climb out: '/' and '..' are refused wherever a name is taken.
        f, _ = await c.create(root, "f")
        for bad in ("../x", "a/b", ".."):
            with pytest.raises(Exception):
                await c.link(f, root, bad)
            with pytest.raises(Exception):
                await c.rename(root, "f", root, bad)
            with pytest.raises(Exception):
                await c.symlink(root, bad, "t")
        assert (await c.lookup(root, ".."))[0] == root  # .. of the root is the root
        # MNT resolves symlinks in its path, as mountd does, but only to a place in the export.
        await c.mkdir(root, "sub")
        await c.symlink(root, "alias", "sub")
        assert await c.mount(str(nfs_server.export / "alias")) == (await c.lookup(root, "sub"))[0]
        with pytest.raises(MountError) as mi:
            await c.mount(str(nfs_server.export / "escape"))
        assert mi.value.status == MountStat.MNT3ERR_ACCES
    assert secret.stat().st_mode & 0o777 == 0o600 and secret.read_bytes() == b"secret"
    assert sorted(os.listdir(outside)) == ["secret"]


async def test_names_that_are_not_utf8_are_served_as_their_bytes(nfs_server) -> None:  # type: ignore[no-untyped-def]
    raw = b"caf\xe9-\xff"  # Latin-1, not UTF-8
    open(os.path.join(os.fsencode(nfs_server.export), raw), "wb").close()
    for proto in ("udp", "tcp"):
        async with client(proto, nfs_server) as c:
            root = await c.mount(str(nfs_server.export))
            names = [os.fsencode(n) for n, _ in await c.readdir(root)]
            assert raw in names
            plus = [e for e in await c.readdirplus(root) if os.fsencode(e.name) == raw]
            assert plus and plus[0].name_handle is not None
            fh, _ = await c.lookup(root, raw)
            assert fh == plus[0].name_handle
            made, _ = await c.create(root, raw + b"." + proto.encode(), how=CreateMode.GUARDED)
            await c.rename(root, raw + b"." + proto.encode(), root, b"\x80" + proto.encode())
    assert os.path.exists(os.path.join(os.fsencode(nfs_server.export), b"\x80udp"))
    assert nfs_server.server.svc.stats.system_err == 0


async def test_a_bind_mount_inside_the_export_is_not_crossed(tmp_path: Path, nfs_server) -> None:  # type: ignore[no-untyped-def]
    require_root()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"secret")
    inside = nfs_server.export / "bound"
    inside.mkdir()
    (nfs_server.export / "bound-file").write_bytes(b"")
    r = subprocess.run(["mount", "--bind", str(outside), str(inside)], capture_output=True, text=True)
    if r.returncode:
        unavailable(f"cannot bind mount here: {r.stderr.strip()}")
    r2 = subprocess.run(["mount", "--bind", str(outside / "secret"), str(nfs_server.export / "bound-file")],
                        capture_output=True, text=True)
    try:
        assert os.stat(inside).st_dev == os.stat(nfs_server.export).st_dev  # the same device
        async with client("tcp", nfs_server) as c:
            root = await c.mount(str(nfs_server.export))
            await expect(Stat.NFS3ERR_ACCES, c.lookup(root, "bound"))
            if r2.returncode == 0:
                await expect(Stat.NFS3ERR_ACCES, c.lookup(root, "bound-file"))
            plus = {e.name: e for e in await c.readdirplus(root)}
            assert plus["bound"].name_handle is None  # no handle into the other mount
            # A validly signed handle of an object on the other mount does not resolve.
            exp = nfs_server.server.export
            forged = exp.make_fh(os.stat(outside / "secret").st_ino, exp.root_ino)
            await expect(Stat.NFS3ERR_STALE, c.read(forged, 0, 6))
            forged_dir = exp.make_fh(os.stat(inside).st_ino, exp.root_ino)
            await expect(Stat.NFS3ERR_STALE, c.create(forged_dir, "planted"))
    finally:
        if r2.returncode == 0:
            subprocess.run(["umount", str(nfs_server.export / "bound-file")], check=False)
        subprocess.run(["umount", str(inside)], check=False)
    assert sorted(os.listdir(outside)) == ["secret"]


async def test_bad_arguments_get_garbage_args_and_lose_nothing(nfs_server) -> None:  # type: ignore[no-untyped-def]
    from nfs.client import RpcClient
    from nfs.rpc import AcceptStat, RpcError
    from nfs.transport import udp_connect

    (nfs_server.export / "keep").write_bytes(b"kept")
    async with RpcClient(lambda: udp_connect(H, nfs_server.nfs_port), proto="udp") as r:
        for proc in Proc:
            if proc == Proc.NULL:
                continue
            with pytest.raises(RpcError) as ei:  # each procedure's arguments, cut short
                await r.call(NFS_PROGRAM, 3, proc, b"\0\0\0\x2c" + b"\0" * 8)
            assert ei.value.accept_stat == AcceptStat.GARBAGE_ARGS, proc
    assert (nfs_server.export / "keep").read_bytes() == b"kept"
    assert nfs_server.server.svc.stats.system_err == 0
    async with client("udp", nfs_server) as c:  # and the server goes on serving
        root = await c.mount(str(nfs_server.export))
        assert (await c.lookup(root, "keep"))[1] is not None
