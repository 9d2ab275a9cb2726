"""A burst of UDP calls beyond what the server runs at once waits in the socket's queue, as it
waits for a free nfsd thread in knfsd: every call is answered, none is dropped for the client to
retransmit.  (Many hosts swapping to one server send such bursts: 8 clients with 16 RPC slots
each have 128 FILE_SYNC WRITEs in flight, twice the calls one UDP socket runs at once.)"""

from __future__ import annotations

import os
import socket
import struct
from pathlib import Path

import trio

from nfs.client import NfsClient
from nfs.nfs3 import FILE_SYNC, NFS_PROGRAM, Proc
from nfs.nfs3xdr import NFS3_PROCEDURES, WriteArgs
from nfs.rpc import AuthSys, OpaqueAuth, encode_call
from nfs.server import NfsServer, ServerConfig
from nfs.xdr import Packer, Unpacker

H = "127.0.0.1"
BURST = 200  # > 64 calls at once per UDP socket (max_inflight x 4) and > 64 datagrams handed over
PAGE = 4096


def _call(xid: int, proc: Proc, args: object, cred: OpaqueAuth) -> bytes:
    p = Packer()
    NFS3_PROCEDURES[proc].encode_args(p, args)
    return bytes(encode_call(xid, NFS_PROGRAM, 3, proc, b"".join(p.iov()), cred))  # type: ignore[arg-type]


async def test_a_burst_beyond_the_running_calls_waits_in_the_socket_queue(tmp_path: Path, export_dir: Path) -> None:
    (export_dir / "swap").write_bytes(b"")
    async with trio.open_nursery() as n:
        server = NfsServer(ServerConfig(export=export_dir, port=0, mount_port=0, state_dir=tmp_path / "s"))
        ports = await n.start(server.serve)
        async with NfsClient.udp(H, ports["nfs"], ports["mount"], hard=False, timeo=3.0) as c:
            fh, _ = await c.lookup(await c.mount(str(export_dir)), "swap")
        cred = AuthSys().to_auth()
        pages = [os.urandom(PAGE) for _ in range(BURST)]

        def client() -> dict[int, int]:
            """All the calls at once, then every reply: xid -> bytes written."""
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)  # (room for every reply)
            s.settimeout(20)
            s.connect((H, ports["nfs"]))
            for i, page in enumerate(pages):
                s.send(_call(1000 + i, Proc.WRITE, WriteArgs(fh, i * PAGE, PAGE, FILE_SYNC, page), cred))
            got: dict[int, int] = {}
            try:
                while len(got) < BURST:
                    r = s.recv(65536)
                    (xid,) = struct.unpack_from(">I", r)
                    got[xid] = NFS3_PROCEDURES[Proc.WRITE].decode_res(Unpacker(r[24:])).count
            except TimeoutError:
                pass
            s.close()
            return got

        with trio.fail_after(60):
            got = await trio.to_thread.run_sync(client)
        assert sorted(got) == list(range(1000, 1000 + BURST)), f"{BURST - len(got)} calls never answered"
        assert set(got.values()) == {PAGE}
        assert server.svc.stats.system_err == 0
        assert (export_dir / "swap").read_bytes() == b"".join(pages)
        n.cancel_scope.cancel()
