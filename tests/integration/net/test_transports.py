"""EmuStream / EmuDatagram: our NFS client over the emulated stack against our NFS server, and
echo round trips; every byte is charged to the emulated host."""

from __future__ import annotations

import functools
import hashlib
import socket
from pathlib import Path

import pytest
import trio

from emu.kernel.sched import TaskFlags, task
from emu.mm.gfp import GFP_NOFS, GFP_NOIO
from emu.mm.sizes import ISCSI_TASK, RPC_RQST
from emu.net.transport import EmuDatagram, EmuStream
from emu.swapdev.buffers import HostBuffers
from nfs.client import NfsClient
from nfs.nfs3 import CreateMode, StableHow
from nfs.server import NfsServer, ServerConfig
from nfs.transport import DatagramTransport


class CountingBuffers(HostBuffers):
    """The clients' request buffers in host memory, counting allocations."""

    def __init__(self, *a: object) -> None:
        super().__init__(*a)  # type: ignore[arg-type]
        self.allocs = 0

    async def alloc(self, nbytes: int) -> object:
        token = await super().alloc(nbytes)
        self.allocs += 1
        return token


def pattern(n: int, seed: int = 0) -> bytes:
    out = bytearray()
    i = 0
    while len(out) < n:
        out += hashlib.sha256(f"{seed}:{i}".encode()).digest()
        i += 1
    return bytes(out[:n])


@pytest.mark.parametrize("proto", ["udp", "tcp"])
async def test_nfs_client_over_emulated_transports(make_net, tmp_path: Path, proto: str) -> None:
    net = await make_net("pfmemalloc", ram=32 << 20)
    export = tmp_path / "export"
    export.mkdir()
    server = NfsServer(ServerConfig(export=export, port=0, mount_port=0, state_dir=tmp_path / "state"))
    opener = net.open_udp if proto == "udp" else net.connect_tcp
    async with trio.open_nursery() as n:
        ports = await n.start(server.serve)
        connect = functools.partial(opener, "127.0.0.1", ports["nfs"], memalloc=True)
        mount_connect = functools.partial(opener, "127.0.0.1", ports["mount"])
        buffers = CountingBuffers(net.slabs, GFP_NOFS, RPC_RQST)
        data = pattern(96 * 1024)
        async with NfsClient(connect, mount_connect=mount_connect, proto=proto, buffers=buffers,
                             wsize=32768, rsize=32768) as nfs:
            root = await nfs.mount(str(export))
            fh, _ = await nfs.create(root, "swapfile", how=CreateMode.UNCHECKED)
            with task("swap-writer", TaskFlags.PF_MEMALLOC):
                res = await nfs.write(fh, 0, data, stable=StableHow.FILE_SYNC)
            assert res.count == len(data)
            assert await nfs.read(fh, 0, len(data)) == data
            assert buffers.allocs > 0
            mem_sock = [s for s in net.socks if s.memalloc]
            assert len(mem_sock) == 1 and mem_sock[0].rport == ports["nfs"]
            assert net.sk_memalloc_socks == 1
        n.cancel_scope.cancel()
    assert (export / "swapfile").read_bytes() == data
    st = net.stat
    assert st.tx_skbs > 0 and st.tx_bytes > len(data)  # the writes were paid for on the way out
    assert st.delivered > 0 and st.bytes > len(data)  # the reads came through the receive stage
    if proto == "udp":
        assert st.frag_reassembled >= 3  # 32 KiB READ replies arrive as fragments
    else:
        assert st.frames >= len(data) // net.mss
    assert buffers.live == 0 and buffers.bytes_live == 0 and net.skbs.live == 0  # everything was freed again
    assert net.sk_memalloc_socks == 0  # closing the transport cleared SOCK_MEMALLOC


async def test_emu_datagram_and_stream_round_trips(make_net) -> None:
    net = await make_net("none", ram=16 << 20)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.setblocking(False)
    tudp = trio.socket.from_stdlib_socket(udp)

    async def udp_echo() -> None:
        while True:
            data, addr = await tudp.recvfrom(65536)
            await tudp.sendto(data[::-1], addr)

    async def tcp_echo(stream: trio.SocketStream) -> None:
        async with stream:
            async for chunk in stream:
                await stream.send_all(chunk)

    async with trio.open_nursery() as n:
        n.start_soon(udp_echo)
        listeners = await n.start(functools.partial(trio.serve_tcp, tcp_echo, 0, host="127.0.0.1"))
        tport = listeners[0].socket.getsockname()[1]
        dg = await net.open_udp("127.0.0.1", udp.getsockname()[1])
        assert isinstance(dg, EmuDatagram) and isinstance(dg, DatagramTransport)
        for size in (1, 1472, 1473, 20000):
            msg = pattern(size, size)
            await dg.send(msg)
            assert await dg.recv() == msg[::-1]
        st = await net.connect_tcp("127.0.0.1", tport)
        assert isinstance(st, EmuStream) and isinstance(st, trio.abc.Stream)
        msg = pattern(200_000)
        async with trio.open_nursery() as inner:
            inner.start_soon(st.send_all, msg)
            got = bytearray()
            while len(got) < len(msg):
                got += await st.receive_some()
        assert bytes(got) == msg
        tx = net.stat.tx_skbs
        assert tx >= len(msg) // net.mss + 4
        await dg.aclose()
        await st.aclose()
        with pytest.raises(trio.ClosedResourceError):
            await st.receive_some()
        with pytest.raises(trio.ClosedResourceError):
            await dg.send(b"x")
        n.cancel_scope.cancel()
    udp.close()
    assert net.skbs.live == 0 and net.socks == []


@pytest.mark.parametrize("policy", ["v12", "pfmemalloc"])
async def test_iscsi_initiator_over_emulated_stream(make_net, tmp_path: Path, policy: str) -> None:
    from iscsi.initiator import Initiator
    from iscsi.lun import DiskLun
    from iscsi.target import Target

    net = await make_net(policy, ram=32 << 20)
    iqn = "iqn.2024-01.org.netswap:emu-net-test"
    target = Target(iqn, {0: DiskLun(tmp_path / "disk.img", block_size=4096, size=4 << 20)})
    buffers = CountingBuffers(net.slabs, GFP_NOIO, ISCSI_TASK)
    async with trio.open_nursery() as n:
        listeners = await n.start(target.serve, "127.0.0.1", 0)
        port = listeners[0].socket.getsockname()[1]
        connect = functools.partial(net.connect_tcp, "127.0.0.1", port, memalloc=True)
        pages = [pattern(4096, i) for i in range(32)]
        async with Initiator(connect, iqn, buffers=buffers) as ini:
            assert net.sk_memalloc_socks == 1
            if policy == "v12":
                assert net.reserve.connected  # the first memalloc socket hung the network reserve
            with task("swap-writer", TaskFlags.PF_MEMALLOC):
                for i, page in enumerate(pages):
                    await ini.write(i, page, fua=True)
            assert await ini.read(0, 32) == b"".join(pages)
            sk = net.socks[0]
            assert sk.memalloc and sk.proto == "tcp"
            assert buffers.allocs >= 33
        n.cancel_scope.cancel()
    st = net.stat
    assert st.tx_bytes > 32 * 4096 and st.tx_skbs > 32 * 4096 // net.mss
    assert st.bytes > 32 * 4096 and st.delivered >= 32 * 4096 // net.mss
    assert buffers.live == 0 and net.skbs.live == 0
    assert net.sk_memalloc_socks == 0
    if policy == "v12":
        assert not net.reserve.connected
