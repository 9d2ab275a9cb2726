"""Permission checks from the call's credential (the server runs as root: the kernel checks
nothing for it), root_squash, and AUTH_NONE as the anonymous user."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
from peers import require_root

from nfs.auth import Squash
from nfs.client import NfsClient
from nfs.nfs3 import FILE_SYNC, CreateMode, Nfs3Error, Stat
from nfs.rpc import AUTH_NONE, AuthSys
from nfs.server import NfsServer, ServerConfig

H = "127.0.0.1"
OWNER = os.getuid()  # who owns the files the test makes (root in CI)
OTHER = OWNER + 1000 if OWNER else 1000  # another, unprivileged user


@contextlib.asynccontextmanager
async def serving(export: Path, state: Path, **kw: object) -> AsyncIterator[dict[str, int]]:
    async with trio.open_nursery() as n:
        server = NfsServer(ServerConfig(export=export, port=0, mount_port=0, state_dir=state, **kw))  # type: ignore[arg-type]
        yield await n.start(server.serve)
        n.cancel_scope.cancel()


def as_user(ports: dict[str, int], uid: int, gid: int | None = None) -> NfsClient:
    return NfsClient.tcp(H, ports["nfs"], ports["mount"], hard=False, timeo=3.0,
                         cred=AuthSys(machinename="t", uid=uid, gid=uid if gid is None else gid))


async def expect(status: int, call: object) -> None:
    with pytest.raises(Nfs3Error) as ei:
        await call  # type: ignore[misc]
    assert ei.value.status == status, ei.value


@pytest.fixture
def secret(export_dir: Path) -> Path:
    os.chmod(export_dir, 0o755)
    f = export_dir / "secret"
    f.write_bytes(b"owner only")
    os.chmod(f, 0o600)
    return f


async def test_another_uid_is_refused_on_a_0600_file(tmp_path: Path, export_dir: Path, secret: Path) -> None:
    async with serving(export_dir, tmp_path / "s") as ports, as_user(ports, OTHER) as c:
        root = await c.mount(str(export_dir))
        fh, _ = await c.lookup(root, "secret")  # the directory is searchable: LOOKUP is fine
        await expect(Stat.NFS3ERR_ACCES, c.read(fh, 0, 10))
        await expect(Stat.NFS3ERR_ACCES, c.write(fh, 0, b"mine now", FILE_SYNC))
        await expect(Stat.NFS3ERR_ACCES, c.setattr(fh, size=0))
        await expect(Stat.NFS3ERR_PERM, c.setattr(fh, mode=0o666))  # chmod by a non-owner
        await expect(Stat.NFS3ERR_PERM, c.setattr(fh, uid=OTHER))  # chown by a non-owner
        await expect(Stat.NFS3ERR_ACCES, c.remove(root, "secret"))  # the directory is 0755
        await expect(Stat.NFS3ERR_ACCES, c.create(root, "new", how=CreateMode.GUARDED))
        assert await c.access(fh, 0x3F) == 0  # ACCESS says the same
    assert secret.read_bytes() == b"owner only" and secret.stat().st_mode & 0o777 == 0o600
    assert not (export_dir / "new").exists()


async def test_owner_and_root_keep_their_rights(tmp_path: Path, export_dir: Path, secret: Path) -> None:
    os.chmod(export_dir, 0o777)
    async with serving(export_dir, tmp_path / "s") as ports:
        async with as_user(ports, OWNER) as c:  # no_root_squash by default: root (or the owner) works
            root = await c.mount(str(export_dir))
            fh, _ = await c.lookup(root, "secret")
            assert await c.read(fh, 0, 10) == b"owner only"
            await c.setattr(fh, mode=0o640)
        async with as_user(ports, OTHER) as c:  # a user's own file in a world-writable directory
            root = await c.mount(str(export_dir))
            fh, attr = await c.create(root, "theirs", mode=0o600, how=CreateMode.GUARDED)
            if os.geteuid() == 0:
                assert attr is not None and attr.uid == OTHER  # created as the caller
                assert (await c.write(fh, 0, b"ok", FILE_SYNC)).count == 2
                assert await c.read(fh, 0, 2) == b"ok"
            await c.remove(root, "theirs")
    assert secret.stat().st_mode & 0o777 == 0o640


async def test_root_squash_and_auth_none_are_anonymous(tmp_path: Path, export_dir: Path, secret: Path) -> None:
    require_root()  # root_squash is about uid 0
    async with serving(export_dir, tmp_path / "s", squash=Squash(root_squash=True)) as ports:
        async with as_user(ports, 0) as c:
            root = await c.mount(str(export_dir))
            fh, _ = await c.lookup(root, "secret")
            await expect(Stat.NFS3ERR_ACCES, c.read(fh, 0, 10))
            await expect(Stat.NFS3ERR_PERM, c.setattr(fh, mode=0o666))
    async with serving(export_dir, tmp_path / "s") as ports:
        c = NfsClient.tcp(H, ports["nfs"], ports["mount"], hard=False, timeo=3.0)
        c.rpc.core.cred = AUTH_NONE  # NFS calls without a credential
        async with c:
            root = await c.mount(str(export_dir))
            fh, _ = await c.lookup(root, "secret")
            await expect(Stat.NFS3ERR_ACCES, c.read(fh, 0, 10))


async def test_setattr_out_of_range_values_are_refused_not_faults(tmp_path: Path, export_dir: Path) -> None:
    from nfs.nfs3xdr import NfsTime

    async with trio.open_nursery() as n:
        server = NfsServer(ServerConfig(export=export_dir, port=0, mount_port=0, state_dir=tmp_path / "s"))
        ports = await n.start(server.serve)
        async with as_user(ports, OWNER) as c:
            root = await c.mount(str(export_dir))
            fh, _ = await c.create(root, "f")
            await expect(Stat.NFS3ERR_FBIG, c.setattr(fh, size=2**64 - 1))
            await expect(Stat.NFS3ERR_FBIG, c.setattr(fh, size=2**63))
            await expect(Stat.NFS3ERR_INVAL, c.setattr(fh, mtime=NfsTime(5, 2_000_000_000)))
            await expect(Stat.NFS3ERR_FBIG, c.create(root, "g", size=2**64 - 1))
            assert not (export_dir / "g").exists()
            await c.setattr(fh, size=4096, mtime=NfsTime(1_000_000, 999_999_999))  # the edges are fine
            assert (export_dir / "f").stat().st_size == 4096
        assert server.svc.stats.system_err == 0
        n.cancel_scope.cancel()


async def test_tracebacks_of_unexpected_failures_are_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    from nfs.rpc import AcceptStat, decode_reply, encode_call
    from nfs.svc import CallContext, RpcService

    class Buggy:  # a program with a bug any client can trigger
        prog, versions, name = 400_000, (1,), "BUGGY"

        def has_proc(self, vers: int, proc: int) -> bool:
            return True

        def non_idempotent(self, vers: int, proc: int) -> bool:
            return False

        async def call(self, vers: int, proc: int, args: object, ctx: object) -> list[bytes]:
            raise RuntimeError("bug")

    svc = RpcService([Buggy()])
    with caplog.at_level("ERROR", logger="netswap.nfs.svc"):
        for xid in range(200):
            reply = await svc.dispatch(encode_call(xid, 400_000, 1, 0), CallContext(H, 1, "udp"))
            assert reply is not None
            with pytest.raises(Exception) as ei:
                decode_reply(b"".join(bytes(b) for b in reply))  # type: ignore[arg-type]
            assert getattr(ei.value, "accept_stat", None) == AcceptStat.SYSTEM_ERR
    assert svc.stats.system_err == 200
    assert 1 <= len([r for r in caplog.records if r.exc_info]) <= 10
