"""Our client against our server over real loopback sockets, UDP and TCP."""

from __future__ import annotations

import os
import socket
import struct
from pathlib import Path

import pytest
import trio
from unit.nfs.helpers import client

from nfs.client import NfsClient, RpcClient
from nfs.mount import MOUNT_PROGRAM, MountError, MountStat
from nfs.nfs3 import (
    DATA_SYNC, FILE_SYNC, NFS_PROGRAM, UNSTABLE, CreateMode, FType, Nfs3Error, Proc, Stat,
)
from nfs.portmap import IPPROTO_TCP, IPPROTO_UDP, PMAP_PROGRAM, PmapProc, decode_dump_res, encode_getport_args
from nfs.rpc import AcceptStat, AuthFlavor, AuthStat, OpaqueAuth, RejectStat, RpcError, encode_call
from nfs.server import NfsServer, ServerConfig, parse_allow
from nfs.transport import udp_connect

H = "127.0.0.1"




@pytest.mark.parametrize("proto", ["tcp", "udp"])
async def test_file_life_cycle(nfs_server, proto: str) -> None:  # type: ignore[no-untyped-def]
    async with client(proto, nfs_server) as c:
        root = await c.mount(str(nfs_server.export))
        assert c.fsinfo_res is not None and c.fsinfo_res.wtmax >= 8192
        fh, attr = await c.create(root, "swap", mode=0o600, how=CreateMode.GUARDED)
        assert attr is not None and attr.type == FType.NF3REG and attr.mode == 0o600
        with pytest.raises(Nfs3Error) as ei:
            await c.create(root, "swap", how=CreateMode.GUARDED)
        assert ei.value.status == Stat.NFS3ERR_EXIST
        data = os.urandom(200_000)  # several wsize pieces over UDP
        for stable, off in ((FILE_SYNC, 0), (DATA_SYNC, 200_000), (UNSTABLE, 400_000)):
            res = await c.write(fh, off, data, stable=stable)
            assert res.count == len(data) and res.committed >= stable
            assert res.verifier == nfs_server.server.verifier
        assert c.commits.nbytes(fh) == len(data)  # the UNSTABLE write awaits its COMMIT
        assert await c.commit(fh) == nfs_server.server.verifier
        assert c.commits.nbytes(fh) == 0
        assert await c.read(fh, 0, 600_000) == data * 3
        assert await c.read(fh, 599_000, 10_000) == data[-1000:]  # short only at EOF
        assert (nfs_server.export / "swap").read_bytes() == data * 3
        await c.setattr(fh, size=4096)
        assert (await c.getattr(fh)).size == 4096
        fh2, _ = await c.lookup(root, "swap")
        assert fh2 == fh
        assert ("swap", attr.fileid) in await c.readdir(root)
        await c.remove(root, "swap")
        for call in (c.lookup(root, "swap"),):
            with pytest.raises(Nfs3Error) as ei:
                await call
            assert ei.value.status == Stat.NFS3ERR_NOENT
        with pytest.raises(Nfs3Error) as ei:
            await c.getattr(fh)
        assert ei.value.status == Stat.NFS3ERR_STALE
        with pytest.raises(Nfs3Error) as ei:
            await c.getattr(fh[:-1] + bytes([fh[-1] ^ 1]))
        assert ei.value.status == Stat.NFS3ERR_BADHANDLE


async def test_exclusive_create_and_concurrent_swap_pages(nfs_server) -> None:  # type: ignore[no-untyped-def]
    async with client("tcp", nfs_server, slots=4) as c:
        root = await c.mount(str(nfs_server.export))
        fh, _ = await c.create(root, "x", how=CreateMode.EXCLUSIVE, verf=b"12345678", mode=0o600)
        with pytest.raises(Nfs3Error):  # another verifier: a different create, EXIST
            await c.create(root, "x", how=CreateMode.EXCLUSIVE, verf=b"abcdefgh")
        pages = {i: os.urandom(4096) for i in range(64)}

        async def swap_out(i: int) -> None:
            res = await c.write(fh, i * 4096, pages[i], stable=FILE_SYNC)
            assert res.count == 4096

        async with trio.open_nursery() as n:
            for i in pages:
                n.start_soon(swap_out, i)
        assert c.rpc.slots.high_water == 4  # the slot table bounded what was in flight
        got: dict[int, bytes] = {}

        async def swap_in(i: int) -> None:
            got[i] = await c.read(fh, i * 4096, 4096)

        async with trio.open_nursery() as n:
            for i in pages:
                n.start_soon(swap_in, i)
        assert got == pages


async def test_rpc_level_errors(nfs_server) -> None:  # type: ignore[no-untyped-def]
    async with RpcClient(lambda: udp_connect(H, nfs_server.nfs_port)) as r:
        cases = [(400_000, 1, 0, AcceptStat.PROG_UNAVAIL), (NFS_PROGRAM, 2, 0, AcceptStat.PROG_MISMATCH),
                 (NFS_PROGRAM, 3, 22, AcceptStat.PROC_UNAVAIL), (NFS_PROGRAM, 3, 99, AcceptStat.PROC_UNAVAIL),
                 (NFS_PROGRAM, 3, Proc.WRITE, AcceptStat.GARBAGE_ARGS),  # no arguments at all
                 (NFS_PROGRAM, 3, Proc.GETATTR, AcceptStat.GARBAGE_ARGS)]
        for prog, vers, proc, want in cases:
            with pytest.raises(RpcError) as ei:
                await r.call(prog, vers, proc, b"\0\0\0\x10" if proc == Proc.GETATTR else b"")
            assert ei.value.accept_stat == want, (prog, vers, proc)
    # Denied replies need raw messages: rpcvers 3, and a flavor we do not take (RPCSEC_GSS).
    s = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await s.connect((H, nfs_server.nfs_port))
    bad = bytearray(encode_call(77, NFS_PROGRAM, 3, 0))
    bad[8:12] = struct.pack(">I", 3)
    await s.send(bad)
    assert struct.unpack(">IIII", (await s.recv(100))[:16]) == (77, 1, 1, RejectStat.RPC_MISMATCH)
    await s.send(encode_call(78, NFS_PROGRAM, 3, 0, cred=OpaqueAuth(AuthFlavor.RPCSEC_GSS, b"x")))
    assert struct.unpack(">IIIII", await s.recv(100)) == (78, 1, 1, RejectStat.AUTH_ERROR, AuthStat.AUTH_BADCRED)
    s.close()


async def test_mount_portmap_and_exports(nfs_server) -> None:  # type: ignore[no-untyped-def]
    (nfs_server.export / "sub").mkdir()
    (nfs_server.export / "file").write_bytes(b"")
    async with client("udp", nfs_server) as c:
        exports = await c.exports()
        assert exports[0][0] == str(nfs_server.export) and "127.0.0.0/8" in exports[0][1]
        sub = await c.mount(str(nfs_server.export) + "/sub")  # a directory below the export
        assert sub != nfs_server.server.export.root_fh
        for path, status in (("/nope", MountStat.MNT3ERR_NOENT), (str(nfs_server.export) + "/file",
                                                                  MountStat.MNT3ERR_NOTDIR)):
            with pytest.raises(MountError) as ei:
                await c.mount(path)
            assert ei.value.status == status
    async with RpcClient(lambda: udp_connect(H, nfs_server.ports["portmap"])) as pm:
        for prot in (IPPROTO_TCP, IPPROTO_UDP):
            port = await pm.call(PMAP_PROGRAM, 2, PmapProc.GETPORT, encode_getport_args(NFS_PROGRAM, 3, prot),
                                 lambda u: u.u32())
            assert port == nfs_server.nfs_port
        maps = await pm.call(PMAP_PROGRAM, 2, PmapProc.DUMP, b"", decode_dump_res)
        assert {(m.prog, m.prot, m.port) for m in maps} == {
            (prog, prot, port) for prog, port in ((PMAP_PROGRAM, nfs_server.ports["portmap"]),
                                                  (NFS_PROGRAM, nfs_server.nfs_port),
                                                  (MOUNT_PROGRAM, nfs_server.mount_port))
            for prot in (IPPROTO_TCP, IPPROTO_UDP)}  # the portmapper lists itself, as rpcbind does
        for prot in (IPPROTO_TCP, IPPROTO_UDP):
            port = await pm.call(PMAP_PROGRAM, 2, PmapProc.GETPORT, encode_getport_args(PMAP_PROGRAM, 2, prot),
                                 lambda u: u.u32())
            assert port == nfs_server.ports["portmap"]


async def test_clients_outside_allow_are_refused(tmp_path: Path, export_dir: Path) -> None:
    server = NfsServer(ServerConfig(export=export_dir, port=0, mount_port=0, state_dir=tmp_path / "s",
                                    allow=parse_allow(["10.0.0.0/8"])))
    async with trio.open_nursery() as n:
        ports = await n.start(server.serve)
        async with NfsClient.udp(H, ports["nfs"], ports["mount"], hard=False, timeo=2.0) as c:
            with pytest.raises(MountError) as ei:
                await c.mount(str(export_dir))
            assert ei.value.status == MountStat.MNT3ERR_ACCES
            with pytest.raises(Nfs3Error) as ei2:  # a handle obtained elsewhere does not help
                await c.getattr(server.export.root_fh)
            assert ei2.value.status == Stat.NFS3ERR_ACCES
        n.cancel_scope.cancel()


async def test_readdir_follows_cookies(nfs_server) -> None:  # type: ignore[no-untyped-def]
    names = {f"file-{i:04d}-{'x' * 40}" for i in range(300)}
    for name in names:
        (nfs_server.export / name).write_bytes(b"")
    async with client("tcp", nfs_server) as c:
        root = await c.mount(str(nfs_server.export))
        listed = {n for n, _ in await c.readdir(root)}
        assert listed == names | {".", ".."}


async def test_create_modes_are_exact_and_unchecked_truncates(nfs_server) -> None:  # type: ignore[no-untyped-def]
    async with client("tcp", nfs_server) as c:
        root = await c.mount(str(nfs_server.export))
        fh, attr = await c.create(root, "m", mode=0o666, how=CreateMode.GUARDED)
        assert attr is not None and attr.mode == 0o666  # the server's umask does not apply
        await c.write(fh, 0, b"x" * 5000, FILE_SYNC)
        fh2, attr = await c.create(root, "m", mode=0o640, how=CreateMode.UNCHECKED, size=0)
        assert fh2 == fh and attr is not None and attr.size == 0 and attr.mode == 0o640


async def test_a_call_too_big_for_udp_is_refused_not_retried(nfs_server) -> None:  # type: ignore[no-untyped-def]
    async with client("udp", nfs_server, hard=True) as c:
        root = await c.mount(str(nfs_server.export))
        fh, _ = await c.create(root, "big")
        with pytest.raises(ValueError, match="UDP datagram"), trio.fail_after(5):
            await c.write_once(fh, 0, bytes(70_000), FILE_SYNC)
        assert (await c.write(fh, 0, bytes(70_000), FILE_SYNC)).count == 70_000  # split by wsize


async def test_connections_are_made_in_the_context_that_entered_the_client(nfs_server) -> None:  # type: ignore[no-untyped-def]
    import contextvars

    from nfs.transport import tcp_connect

    who = contextvars.ContextVar("who", default="nobody")
    seen: list[str] = []

    async def connect():  # type: ignore[no-untyped-def]
        seen.append(who.get())
        return await tcp_connect(H, nfs_server.nfs_port)

    who.set("rpciod")  # the host enters the client as its PF_MEMALLOC rpciod task
    async with NfsClient(connect, hard=False, timeo=2.0) as c:
        async def caller() -> None:
            who.set("some process")
            await c.null()

        async with trio.open_nursery() as n:
            n.start_soon(caller)
        await c.rpc._kill(c.rpc._conn)  # type: ignore[arg-type]  # force a reconnect
        async with trio.open_nursery() as n:
            n.start_soon(caller)
    assert seen == ["rpciod", "rpciod"]


async def test_long_names_get_nametoolong(nfs_server) -> None:  # type: ignore[no-untyped-def]
    from nfs.nfs3xdr import pack_fh
    from nfs.xdr import Packer

    async with client("tcp", nfs_server) as c:
        root = await c.mount(str(nfs_server.export))
        p = Packer()
        pack_fh(p, root)
        p.string("n" * 300)  # the client refuses such names itself; send it raw

        def status(u):  # type: ignore[no-untyped-def]
            return u.u32()

        assert await c.rpc.call(NFS_PROGRAM, 3, Proc.LOOKUP, p.buf, status) == Stat.NFS3ERR_NAMETOOLONG


async def test_mount_dump_lists_who_mounted_what(nfs_server) -> None:  # type: ignore[no-untyped-def]
    from nfs.mount import MOUNT_V3, MountProc, decode_mountlist

    async with client("tcp", nfs_server) as c:
        await c.mount(str(nfs_server.export))
        async with RpcClient(lambda: udp_connect(H, nfs_server.mount_port), proto="udp") as m:
            dump = await m.call(MOUNT_PROGRAM, MOUNT_V3, MountProc.DUMP, b"", decode_mountlist)
            assert (H, str(nfs_server.export)) in dump
            await c.umount()
            dump = await m.call(MOUNT_PROGRAM, MOUNT_V3, MountProc.DUMP, b"", decode_mountlist)
            assert (H, str(nfs_server.export)) not in dump
