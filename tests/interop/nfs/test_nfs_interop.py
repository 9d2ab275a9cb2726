"""Real peers: libnfs tools and our client (every procedure, UDP and TCP) against `netswap serve
nfs`, dissected by tshark; rpcinfo against its portmapper; our client against nfs-ganesha over
UDP and TCP."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest
import trio
from peers import require_binary, require_root

from nfs.client import NfsClient
from nfs.nfs3 import FILE_SYNC, UNSTABLE, CreateMode
from emu.peers.nfs import H, capture, ganesha, libnfs, netswap_server
from emu.util.ports import port_open
from unit.nfs.every_procedure import run_every_procedure

pytestmark = pytest.mark.peers


def test_libnfs_tools_against_our_server_and_tshark_finds_nothing_malformed(tmp_path: Path) -> None:
    require_root()
    require_binary("nfs-ls", "nfs-cp", "nfs-cat", "dumpcap", "tshark")
    export = tmp_path / "export"
    (export / "dir").mkdir(parents=True)
    (export / "hello.txt").write_text("hello over NFSv3\n")
    src = tmp_path / "random.bin"
    src.write_bytes(os.urandom(16 * 1024 * 1024))
    back = tmp_path / "back.bin"
    cap = tmp_path / "nfs.pcapng"
    with netswap_server(export, tmp_path / "state") as srv:
        flt = f"port {srv.nfs_port} or port {srv.mount_port}"
        with capture(flt, cap):
            ls = libnfs("nfs-ls", srv.url())
            assert ls.returncode == 0, ls.stderr
            assert "hello.txt" in ls.stdout and "dir" in ls.stdout
            cat = libnfs("nfs-cat", srv.url("hello.txt"))
            assert cat.returncode == 0 and cat.stdout == "hello over NFSv3\n", cat.stderr
            cp_in = libnfs("nfs-cp", str(src), srv.url("dir/random.bin"))
            assert cp_in.returncode == 0, cp_in.stderr
            cp_out = libnfs("nfs-cp", srv.url("dir/random.bin"), str(back))
            assert cp_out.returncode == 0, cp_out.stderr
            missing = libnfs("nfs-cat", srv.url("nope.txt"))
            assert missing.returncode != 0
            trio.run(_our_client_over_udp, srv.nfs_port, srv.mount_port, srv.export_path)  # captured too
            # A new user's mkdir, ln -s and mv through our client; libnfs sees them, and reads a
            # file through the symlink (libnfs resolves it with READLINK).
            trio.run(_make_tree, srv.nfs_port, srv.mount_port, srv.export_path)
            ls = libnfs("nfs-ls", srv.url("made"))
            assert ls.returncode == 0 and "link" in ls.stdout and "renamed" in ls.stdout, ls.stderr
            cat = libnfs("nfs-cat", srv.url("made/link"))
            assert cat.returncode == 0 and cat.stdout == "through a symlink\n", cat.stderr
            cat = libnfs("nfs-cat", srv.url("made-alias/target.txt"))  # (MNT resolves the alias)
            assert cat.returncode == 0 and cat.stdout == "through a symlink\n", cat.stderr
            cp = libnfs("nfs-cp", str(src), srv.url("made/sub/copy.bin"))  # into a directory MKDIR made
            assert cp.returncode == 0, cp.stderr
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    assert hashlib.sha256((export / "dir" / "random.bin").read_bytes()).hexdigest() == digest
    assert hashlib.sha256(back.read_bytes()).hexdigest() == digest
    # tshark dissected the traffic as NFS/MOUNT, and nothing of it is malformed.
    dis = subprocess.run(["tshark", "-r", str(cap), *_decode_as(srv.nfs_port, srv.mount_port), "-Y", "nfs || mount", "-T", "fields", "-e", "frame.number"],
                         capture_output=True, text=True, timeout=120)
    assert dis.returncode == 0, dis.stderr
    assert len(dis.stdout.split()) >= 2 * (16 + 8)  # at least the 16 MiB in and out, 1-2 MiB per call
    udp = subprocess.run(["tshark", "-r", str(cap), *_decode_as(srv.nfs_port, srv.mount_port), "-Y",
                          "udp && nfs.procedure_v3 == 7", "-T", "fields", "-e",
                          "frame.number"], capture_output=True, text=True, timeout=120)
    assert len(udp.stdout.split()) >= 2 * 4  # our client's WRITE calls and replies over UDP
    # Nothing malformed, and no warning but those that are TCP's and libnfs's, not the protocol's:
    # libnfs ends its connections with a reset (RST from the client's port), a 1 MiB WRITE or
    # READ fills a TCP window (flow control doing its job), and on a loaded machine the kernel's
    # TCP may retransmit spuriously, which the receiver answers with a D-SACK, and the capture on
    # lo may see a segment sent from one CPU before one sent earlier from the other (tshark:
    # "Out-Of-Order"; it happens against the previous server version as well, about 1 run in 5).
    theirs = (f"(tcp.flags.reset == 1 && (tcp.dstport == {srv.nfs_port} || tcp.dstport == {srv.mount_port}))"
              f" || tcp.analysis.window_full || tcp.analysis.spurious_retransmission || tcp.analysis.out_of_order"
              f" || tcp.analysis.retransmission || tcp.options.sack.dsack || {CAPTURE_LOSS}")
    bad = subprocess.run(["tshark", "-r", str(cap), *_decode_as(srv.nfs_port, srv.mount_port), "-Y",
                          f"_ws.malformed || (_ws.expert.severity >= warning && !({theirs}))"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 0, bad.stderr
    assert bad.stdout.strip() == "", bad.stdout[:3000]


# What a capture that dropped packets on a busy machine shows (dumpcap's, not the protocol's).
CAPTURE_LOSS = "tcp.analysis.ack_lost_segment || tcp.analysis.lost_segment"


def _decode_as(*ports: int) -> list[str]:
    """Our ports are RPC: without this, tshark may take a privileged source port of libnfs's
    for the service registered there (MSDP on 639, say) and call the packets malformed."""
    out = []
    for port in ports:
        out += ["-d", f"tcp.port=={port},rpc", "-d", f"udp.port=={port},rpc"]
    return out


async def _make_tree(nfs_port: int, mount_port: int, export: str) -> None:
    async with NfsClient.tcp(H, nfs_port, mount_port, hard=False, timeo=5.0) as c:
        root = await c.mount(export)
        made, _ = await c.mkdir(root, "made")
        await c.mkdir(made, "sub")
        fh, _ = await c.create(made, "target.txt")
        await c.write(fh, 0, b"through a symlink\n")
        await c.symlink(made, "link", "target.txt")
        assert await c.readlink((await c.lookup(made, "link"))[0]) == "target.txt"
        await c.mkdir(made, "gone")
        await c.rename(made, "gone", made, "renamed")
        await c.mkdir(made, "empty")
        await c.rmdir(made, "empty")
        await c.symlink(root, "made-alias", "made")  # a symlinked directory in a libnfs URL


@pytest.mark.parametrize("proto", ["udp", "tcp"])
def test_every_procedure_on_the_wire_is_well_formed(tmp_path: Path, proto: str) -> None:
    """Our client's every-procedure session, over each transport, as tshark dissects it."""
    require_root()
    require_binary("dumpcap", "tshark")
    export = tmp_path / "export"
    export.mkdir()
    cap = tmp_path / "procs.pcapng"
    with netswap_server(export, tmp_path / "state") as srv:
        with capture(f"port {srv.nfs_port} or port {srv.mount_port}", cap):
            trio.run(_every_procedure, proto, srv.nfs_port, srv.mount_port, export)
    ports = _decode_as(srv.nfs_port, srv.mount_port)
    procs = subprocess.run(["tshark", "-r", str(cap), *ports, "-Y", f"{proto} && nfs && rpc.msgtyp == 1",
                            "-T", "fields", "-e", "nfs.procedure_v3"], capture_output=True, text=True, timeout=120)
    assert {int(p) for p in procs.stdout.split()} == set(range(22))  # all 22 replies dissected as NFSv3
    bad = subprocess.run(["tshark", "-r", str(cap), *ports, "-Y",
                          f"_ws.malformed || (_ws.expert.severity >= warning && !({CAPTURE_LOSS}))"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 0 and bad.stdout.strip() == "", bad.stdout[:3000]


async def _every_procedure(proto: str, nfs_port: int, mount_port: int, export: Path) -> None:
    ctor = NfsClient.udp if proto == "udp" else NfsClient.tcp
    async with ctor(H, nfs_port, mount_port, hard=False, timeo=5.0) as c:
        await run_every_procedure(c, export)


def test_rpcinfo_lists_our_portmapper_on_port_111(tmp_path: Path) -> None:
    """`rpcinfo -p` with no rpcbind: the portmapper answers for itself, as rpcbind does."""
    require_root()
    require_binary("rpcinfo")
    if port_open(111):
        from peers import unavailable

        unavailable("port 111 is taken (an rpcbind is running): stop it to run this test")
    export = tmp_path / "export"
    export.mkdir()
    with netswap_server(export, tmp_path / "state", extra=("--portmap-port", "111")) as srv:
        r = subprocess.run(["rpcinfo", "-p", H], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        rows = {tuple(line.split()[:4]) for line in r.stdout.splitlines()[1:]}
        for proto in ("tcp", "udp"):
            assert ("100000", "2", proto, "111") in rows, r.stdout
            assert ("100003", "3", proto, str(srv.nfs_port)) in rows
            assert ("100005", "3", proto, str(srv.mount_port)) in rows
        probe = subprocess.run(["rpcinfo", "-u", H, "portmapper", "2"], capture_output=True, text=True, timeout=30)
        assert probe.returncode == 0 and "ready and waiting" in probe.stdout, probe.stderr


async def _our_client_over_udp(nfs_port: int, mount_port: int, export: str) -> None:
    async with NfsClient.udp(H, nfs_port, mount_port, hard=False, timeo=5.0) as c:
        root = await c.mount(export)
        fh, _ = await c.create(root, "udp.bin", how=CreateMode.GUARDED)
        data = os.urandom(100_000)
        await c.write(fh, 0, data, stable=UNSTABLE)
        await c.commit(fh)
        assert await c.read(fh, 0, len(data)) == data
        await c.remove(root, "udp.bin")


@pytest.mark.parametrize("proto", ["udp", "tcp"])
async def test_our_client_against_ganesha(tmp_path: Path, proto: str) -> None:
    require_root()
    require_binary("ganesha.nfsd", "rpcbind")
    data = os.urandom(3 * 1024 * 1024 + 123)
    page = os.urandom(4096)
    with ganesha(tmp_path / "ganesha", tmpfs_size="64m") as g:
        ctor = NfsClient.udp if proto == "udp" else NfsClient.tcp
        async with ctor(H, g.nfs_port, g.mount_port, hard=False, timeo=5.0) as c:
            root = await c.mount(g.export_path)
            fh, _ = await c.create(root, f"file-{proto}", mode=0o644, how=CreateMode.GUARDED)
            res = await c.write(fh, 0, data, stable=UNSTABLE)
            assert res.count == len(data)
            verf = await c.commit(fh)
            assert len(verf) == 8 and c.commits.nbytes() == 0
            assert (await c.write(fh, len(data), page, stable=FILE_SYNC)).committed == FILE_SYNC
            assert (await c.getattr(fh)).size == len(data) + 4096
            assert await c.read(fh, 0, len(data) + 4096) == data + page

            async def swap_page(i: int) -> None:  # several in flight, like the host's swap-out
                await c.write(fh, i * 4096, page, stable=FILE_SYNC)

            async with trio.open_nursery() as n:
                for i in range(16):
                    n.start_soon(swap_page, i)
            assert await c.read(fh, 0, 16 * 4096) == page * 16
            fh2, _ = await c.lookup(root, f"file-{proto}")
            assert fh2 == fh
        assert (g.export / f"file-{proto}").read_bytes() == page * 16 + data[16 * 4096:] + page
