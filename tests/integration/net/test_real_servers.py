"""The NFS client and the iSCSI initiator over the emulated stack against `netswap serve nfs` and
`netswap serve iscsi` running as separate processes (as the host runs them)."""

from __future__ import annotations

import functools
import re
import subprocess
import sys
from pathlib import Path

import trio

from emu.kernel.sched import TaskFlags, task
from emu.mm.gfp import GFP_NOFS, GFP_NOIO
from emu.mm.sizes import ISCSI_TASK, RPC_RQST
from emu.swapdev.buffers import HostBuffers
from iscsi.initiator import Initiator
from nfs.client import NfsClient
from nfs.nfs3 import CreateMode, StableHow

NETSWAP = [sys.executable, "-m", "emu"]


async def start(nursery: trio.Nursery, argv: list[str], pattern: str) -> tuple[trio.Process, re.Match[str]]:
    """Start a server process and wait for its ready line (which must match `pattern`)."""
    proc = await trio.lowlevel.open_process(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    buf = b""
    with trio.fail_after(20):
        while b"\n" not in buf:
            chunk = await proc.stdout.receive_some(4096)
            if not chunk:
                raise RuntimeError(f"{argv} exited before its ready line")
            buf += chunk
    m = re.search(pattern, buf.decode())
    assert m, buf
    return proc, m


async def test_clients_over_emulated_stack_against_netswap_servers(make_net, tmp_path: Path) -> None:
    net = await make_net("v12", ram=32 << 20)
    export = tmp_path / "export"
    export.mkdir()
    procs: list[trio.Process] = []
    try:
        async with trio.open_nursery() as n:
            nfsd, m = await start(n, [*NETSWAP, "serve", "nfs", "--export", str(export), "--port", "0",
                                      "--mount-port", "0", "--state-dir", str(tmp_path / "state")],
                                  r"nfs_port=(\d+) mount_port=(\d+)")
            procs.append(nfsd)
            nfs_port, mount_port = int(m.group(1)), int(m.group(2))
            tgt, m = await start(n, [*NETSWAP, "serve", "iscsi", "--lun", str(tmp_path / "disk.img"), "--size",
                                     "4M", "--block-size", "4096", "--port", "0", "--nop-interval", "0"],
                                 r"target (\S+) ready on [\d.]+:(\d+)")
            procs.append(tgt)
            iqn, iscsi_port = m.group(1), int(m.group(2))

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
        for p in procs:
            p.terminate()
            with trio.move_on_after(5):
                await p.wait()
            if p.returncode is None:
                p.kill()
    assert (export / "swapfile").read_bytes() == data
    assert net.stat.frag_reassembled > 0 and net.stat.tx_skbs > 0
    assert buffers.peak > 0 and iscsi_buffers.peak > 0  # the requests were paid for in host memory
    assert buffers.live == 0 and iscsi_buffers.live == 0 and net.skbs.live == 0 and net.sk_memalloc_socks == 0
    assert not net.reserve.connected
