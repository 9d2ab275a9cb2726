"""The NFS client and the iSCSI initiator over the emulated stack against `netswap serve nfs` and
`netswap serve iscsi` running as separate processes (as the host runs them)."""

from __future__ import annotations

import functools
from pathlib import Path

import trio

from emu.host.servers import ServerProcess, spawn_server, wait_ready
from emu.kernel.sched import TaskFlags, task
from emu.mm.gfp import GFP_NOFS, GFP_NOIO
from emu.mm.sizes import ISCSI_TASK, RPC_RQST
from emu.swapdev.buffers import HostBuffers
from emu.swapdev.endpoint import IscsiEndpoint, NfsEndpoint
from iscsi.initiator import Initiator
from nfs.client import NfsClient
from nfs.nfs3 import CreateMode, StableHow


async def test_clients_over_emulated_stack_against_netswap_servers(make_net, tmp_path: Path) -> None:
    net = await make_net("v12", ram=32 << 20)
    servers: list[ServerProcess] = []
    try:
        async with trio.open_nursery() as n:
            servers.append(spawn_server("nfs", tmp_path, 0, state_dir=tmp_path / "state"))
            # 4 KiB blocks (a page per block), no NOP-In pings
            servers.append(spawn_server("iscsi", tmp_path, 4 << 20, extra=("--block-size", "4096", "--nop-interval", "0")))
            for sp in servers:
                await trio.to_thread.run_sync(wait_ready, sp)
            nfsd, tgt = servers[0].server, servers[1].server
            assert isinstance(nfsd, NfsEndpoint) and isinstance(tgt, IscsiEndpoint)
            export, nfs_port, mount_port = Path(nfsd.export), nfsd.nfsport, nfsd.mountport
            iqn, iscsi_port = tgt.iqn, tgt.port

            data = bytes(range(256)) * 256  # 64 KiB
            buffers = HostBuffers(net.slabs, GFP_NOFS, RPC_RQST)  # rpc_rqst + header buffers
            iscsi_buffers = HostBuffers(net.slabs, GFP_NOIO, ISCSI_TASK)
            async with NfsClient(functools.partial(net.open_udp, "127.0.0.1", nfs_port, memalloc=True),
                                 mount_connect=functools.partial(net.open_udp, "127.0.0.1", mount_port),
                                 proto="udp", buffers=buffers, wsize=32768, rsize=32768) as nfs:
                root = await nfs.mount(str(export))
                fh, _ = await nfs.create(root, "swapfile", how=CreateMode.UNCHECKED)
                with task("nfs-swap", TaskFlags.PF_MEMALLOC):
                    await nfs.write(fh, 0, data, stable=StableHow.FILE_SYNC)
                assert await nfs.read(fh, 0, len(data)) == data
            async with Initiator(functools.partial(net.connect_tcp, "127.0.0.1", iscsi_port, memalloc=True),
                                 iqn, buffers=iscsi_buffers) as ini:
                with task("iscsi-swap", TaskFlags.PF_MEMALLOC):
                    await ini.write(0, data, fua=True)
                assert await ini.read(0, len(data) // 4096) == data
            n.cancel_scope.cancel()
    finally:
        for sp in servers:
            sp.stop()
    assert (export / "swapfile").read_bytes() == data
    assert net.stat.frag_reassembled > 0 and net.stat.tx_skbs > 0
    assert buffers.peak > 0 and iscsi_buffers.peak > 0  # the requests were paid for in host memory
    assert buffers.live == 0 and iscsi_buffers.live == 0 and net.skbs.live == 0 and net.sk_memalloc_socks == 0
    assert not net.reserve.connected
