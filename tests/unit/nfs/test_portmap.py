"""Portmap SET/UNSET: only from loopback and a privileged source port (rpcbind's rule)."""

from __future__ import annotations

import errno
import socket
from pathlib import Path

import trio
from peers import require_root

from nfs.client import RpcClient
from nfs.nfs3 import NFS_PROGRAM
from nfs.portmap import IPPROTO_TCP, IPPROTO_UDP, PMAP_PROGRAM, Mapping, PmapProc, encode_getport_args, may_change
from nfs.server import NfsServer, ServerConfig
from nfs.transport import UdpTransport, udp_connect
from nfs.xdr import Packer

H = "127.0.0.1"


def _mapping(prog: int, vers: int, port: int) -> bytes:
    p = Packer()
    Mapping(prog, vers, IPPROTO_UDP, port).pack(p)
    return p.bytes()


async def _privileged_udp(port: int) -> UdpTransport:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for src in range(1023, 600, -1):
        try:
            await sock.bind((H, src))
            break
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                raise
    await sock.connect((H, port))
    return UdpTransport(sock)


def test_the_rule() -> None:
    assert may_change("127.0.0.1", 700) and may_change("::1", 1023) and may_change("::ffff:127.0.0.2", 1)
    assert not may_change("127.0.0.1", 40000)  # any local user
    assert not may_change("10.0.0.1", 700) and not may_change("nonsense", 700)


async def test_set_and_unset_from_an_unprivileged_port_are_refused(tmp_path: Path, export_dir: Path) -> None:
    async with trio.open_nursery() as n:
        server = NfsServer(ServerConfig(export=export_dir, port=0, mount_port=0, portmap_port=0,
                                        state_dir=tmp_path / "s"))
        ports = await n.start(server.serve)
        pm_port = ports["portmap"]

        async def call(rpc: RpcClient, proc: int, args: bytes) -> int:
            return await rpc.call(PMAP_PROGRAM, 2, proc, args, lambda u: u.u32())

        async with RpcClient(lambda: udp_connect(H, pm_port), proto="udp") as anyone:
            assert await call(anyone, PmapProc.SET, _mapping(300_000, 1, 4444)) == 0  # FALSE
            assert await call(anyone, PmapProc.UNSET, _mapping(NFS_PROGRAM, 3, 0)) == 0
            # Nothing changed: NFS is still where the server put it, the intruder nowhere.
            assert await call(anyone, PmapProc.GETPORT, encode_getport_args(NFS_PROGRAM, 3, IPPROTO_TCP)) == ports["nfs"]
            assert await call(anyone, PmapProc.GETPORT, encode_getport_args(300_000, 1, IPPROTO_UDP)) == 0
        assert server.portmap is not None and server.portmap.refused == 2
        require_root()  # binding a privileged source port needs root
        async with RpcClient(lambda: _privileged_udp(pm_port), proto="udp") as root:
            assert await call(root, PmapProc.SET, _mapping(300_000, 1, 4444)) == 1  # TRUE
            assert await call(root, PmapProc.GETPORT, encode_getport_args(300_000, 1, IPPROTO_UDP)) == 4444
            assert await call(root, PmapProc.UNSET, _mapping(300_000, 1, 0)) == 1
        n.cancel_scope.cancel()
