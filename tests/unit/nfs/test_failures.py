"""Loss, duplicates, silence, restarts and garbage: the client recovers, the server survives."""

from __future__ import annotations

import functools
import os
import re
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from emu.util.procs import stop_process
from nfs.client import NfsClient
from nfs.nfs3 import FILE_SYNC, NFS_PROGRAM, UNSTABLE, CreateMode, Proc
from nfs.record import LAST_FRAG
from nfs.rpc import AuthSys, encode_call
from nfs.server import NfsServer, ServerConfig
from nfs.xprt import RpcTimeout

H = "127.0.0.1"


class UdpProxy:
    """Relays datagrams client <-> server, dropping the first `drop` calls and sending each call
    `copies` times (to exercise retransmission and the duplicate request cache)."""

    def __init__(self, server_port: int, drop: int = 0, copies: int = 1) -> None:
        self.server_port, self.drop, self.copies = server_port, drop, copies
        self.calls = 0
        self.port = 0

    async def run(self, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        front = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        back = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        await front.bind((H, 0))
        await back.connect((H, self.server_port))
        self.port = front.getsockname()[1]
        client_addr: list[object] = []

        async def replies() -> None:
            while True:
                data = await back.recv(70000)
                if client_addr:
                    await front.sendto(data, client_addr[0])

        async with trio.open_nursery() as n:
            n.start_soon(replies)
            task_status.started(self.port)
            while True:
                data, addr = await front.recvfrom(70000)
                client_addr[:] = [addr]
                self.calls += 1
                if self.calls <= self.drop:
                    continue
                for _ in range(self.copies):
                    await back.send(data)


async def test_udp_retransmits_with_backoff_through_loss(nfs_server) -> None:  # type: ignore[no-untyped-def]
    async with trio.open_nursery() as n:
        proxy = UdpProxy(nfs_server.nfs_port, drop=2)
        port = await n.start(proxy.run)
        async with NfsClient.udp(H, port, nfs_server.mount_port, timeo=0.1, retrans=5, hard=False) as c:
            t0 = trio.current_time()
            root = await c.mount(str(nfs_server.export))  # MNT direct, FSINFO through the proxy
            assert root == nfs_server.server.export.root_fh
            assert proxy.calls >= 3 and c.stats["retransmissions"] >= 2  # (more if the machine is slow)
            assert trio.current_time() - t0 >= 0.1 + 0.2  # backed off: 0.1 then 0.2
        n.cancel_scope.cancel()


async def test_duplicate_calls_hit_the_reply_cache(nfs_server) -> None:  # type: ignore[no-untyped-def]
    async with trio.open_nursery() as n:
        proxy = UdpProxy(nfs_server.nfs_port, copies=2)
        port = await n.start(proxy.run)
        async with NfsClient.udp(H, port, nfs_server.mount_port, timeo=2.0, hard=False) as c:
            root = await c.mount(str(nfs_server.export))
            # Executed twice, a GUARDED create or a REMOVE would fail (EXIST / NOENT).
            fh, _ = await c.create(root, "once", how=CreateMode.GUARDED)
            await c.remove(root, "once")
            await trio.sleep(0.05)
            assert nfs_server.server.svc.drc.stats.hits + nfs_server.server.svc.drc.stats.in_progress_drops >= 2
            assert c.stats["bad_xids"] >= 1  # the second copy's reply matched nobody
        n.cancel_scope.cancel()


async def test_soft_timeout_against_a_silent_server() -> None:
    silent = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await silent.bind((H, 0))
    port = silent.getsockname()[1]
    async with NfsClient.udp(H, port, port, timeo=0.05, retrans=2, hard=False) as c:
        t0 = trio.current_time()
        with pytest.raises(RpcTimeout):
            await c.null()
        assert c.stats["transmissions"] == 3  # first try + retrans
        assert trio.current_time() - t0 >= 0.05 + 0.1 + 0.2
    silent.close()


async def test_restart_reconnect_and_resend_of_lost_unstable_writes(tmp_path: Path, export_dir: Path) -> None:
    state = tmp_path / "state"

    def make(nfs_port: int = 0, mount_port: int = 0) -> NfsServer:
        return NfsServer(ServerConfig(export=export_dir, port=nfs_port, mount_port=mount_port, state_dir=state))

    data = os.urandom(256 * 1024)
    async with trio.open_nursery() as outer:
        s1 = make()
        scope1 = trio.CancelScope()

        async def run(server: NfsServer, scope: trio.CancelScope, task_status=trio.TASK_STATUS_IGNORED):  # type: ignore[no-untyped-def]
            with scope:
                await server.serve(task_status=task_status)

        ports = await outer.start(run, s1, scope1)
        async with NfsClient.tcp(H, ports["nfs"], ports["mount"], timeo=1.0, retrans=10, hard=False) as c:
            root = await c.mount(str(export_dir))
            fh, _ = await c.create(root, "swapfile")
            res = await c.write(fh, 0, data, stable=UNSTABLE)
            assert res.verifier == s1.verifier
            scope1.cancel()  # the server goes away...
            await trio.sleep(0.05)
            os.truncate(export_dir / "swapfile", 0)  # ...and its unstable data with it
            s2 = make(ports["nfs"], ports["mount"])
            await outer.start(run, s2, trio.CancelScope())
            assert s2.verifier != s1.verifier
            # The handle still works after the restart; COMMIT sees a new verifier and resends.
            assert await c.commit(fh) == s2.verifier
            assert c.stats["commit_resends"] == 1 and c.stats["reconnects"] >= 1
            assert await c.read(fh, 0, len(data)) == data
        outer.cancel_scope.cancel()


async def test_garbage_never_stops_the_server(nfs_server) -> None:  # type: ignore[no-untyped-def]
    call = encode_call(5, NFS_PROGRAM, 3, Proc.WRITE, b"\0\0\0\x2c" + b"z" * 20)
    # UDP: random bytes, a truncated header, a truncated call.
    u = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await u.connect((H, nfs_server.nfs_port))
    for junk in (os.urandom(1000), b"\0\0\0\1\0\0", bytes(call[:30]), bytes(call)):
        await u.send(junk)
    with trio.fail_after(2):
        reply = await u.recv(1000)  # only the full (garbage-args) call gets an answer
    assert struct.unpack(">IIIIII", reply[:24])[5] == 4  # GARBAGE_ARGS
    u.close()
    # TCP: random bytes; a truncated record then EOF; a huge record mark (closes that connection).
    for junk, closes in ((os.urandom(5000), False), (struct.pack(">I", LAST_FRAG | 100) + b"x" * 10, False),
                         (struct.pack(">I", LAST_FRAG | 0x7FFFFFFF), True)):
        s = await trio.open_tcp_stream(H, nfs_server.nfs_port)
        await s.send_all(junk)
        if closes:
            with trio.fail_after(2):
                assert await s.receive_some(100) == b""
        await s.aclose()
    assert nfs_server.server.stats.oversized_records >= 1  # (random bytes may also make a huge mark)
    # A well-behaved client is served as before.
    async with NfsClient.tcp(H, nfs_server.nfs_port, nfs_server.mount_port, hard=False, timeo=2.0) as c:
        root = await c.mount(str(nfs_server.export))
        fh, _ = await c.create(root, "after")
        assert (await c.write(fh, 0, b"ok", FILE_SYNC)).count == 2


async def test_tcp_record_in_many_fragments_is_served(nfs_server) -> None:  # type: ignore[no-untyped-def]
    msg = encode_call(9, NFS_PROGRAM, 3, Proc.NULL)
    frags = b"".join(struct.pack(">I", (LAST_FRAG if i == len(msg) - 1 else 0) | 1) + msg[i:i + 1]
                     for i in range(len(msg)))
    s = await trio.open_tcp_stream(H, nfs_server.nfs_port)
    await s.send_all(frags)
    with trio.fail_after(2):
        reply = await s.receive_some(100)
    assert struct.unpack(">IIIIIII", reply[:28]) == (LAST_FRAG | 24, 9, 1, 0, 0, 0, 0)
    await s.aclose()


def test_cli_ready_line_and_clean_stop(tmp_path: Path) -> None:
    exp = tmp_path / "e"
    exp.mkdir()
    netswap = [sys.executable, "-m", "emu"]
    bad = subprocess.run([*netswap, "serve", "nfs", "--export", str(exp), "--allow", "not-a-cidr"],
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "--allow" in bad.stderr
    p = subprocess.Popen([*netswap, "serve", "nfs", "--export", str(exp), "--port", "0", "--mount-port", "0",
                          "--state-dir", str(tmp_path / "s")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    try:
        line = p.stdout.readline()  # type: ignore[union-attr]
        m = re.search(r"nfs_port=(\d+) mount_port=(\d+)", line)
        assert m, line
        with socket.create_connection((H, int(m.group(1))), timeout=5):
            pass
    finally:
        status = stop_process(p, grace=10)  # SIGTERM
    assert status == 0


async def test_client_resetting_its_connection_mid_call_does_not_stop_the_server(nfs_server) -> None:  # type: ignore[no-untyped-def]
    for _ in range(3):
        s = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        await s.connect((H, nfs_server.nfs_port))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST
        msg = encode_call(3, NFS_PROGRAM, 3, Proc.FSINFO, b"\0\0\0\0")
        await s.send(struct.pack(">I", LAST_FRAG | len(msg)) + msg + struct.pack(">I", LAST_FRAG | 100) + b"x")
        s.close()
    await trio.sleep(0.1)
    async with NfsClient.tcp(H, nfs_server.nfs_port, nfs_server.mount_port, hard=False, timeo=2.0) as c:
        await c.null()
        assert await c.mount(str(nfs_server.export)) == nfs_server.server.export.root_fh


async def test_tcp_timeout_forces_a_reconnect_then_a_soft_error() -> None:
    accepted: list[trio.SocketStream] = []

    async def mute(stream: trio.SocketStream) -> None:  # accepts, reads, never answers
        accepted.append(stream)
        async for _ in stream:
            pass

    async with trio.open_nursery() as n:
        listeners = await n.start(functools.partial(trio.serve_tcp, mute, 0, host=H))
        port = listeners[0].socket.getsockname()[1]
        async with NfsClient.tcp(H, port, port, timeo=0.05, retrans=2, hard=False) as c:
            with pytest.raises(RpcTimeout):
                await c.null()
            assert c.stats["transmissions"] == 3
            assert c.stats["reconnects"] == 2 and len(accepted) == 3  # a new connection per retry
        n.cancel_scope.cancel()


async def test_request_buffers_are_held_until_the_reply_is_decoded(nfs_server) -> None:  # type: ignore[no-untyped-def]
    class Recording:
        def __init__(self) -> None:
            self.live: dict[int, int] = {}
            self.sizes: list[int] = []
            self.n = 0

        async def alloc(self, nbytes: int) -> object:
            self.n += 1
            self.live[self.n] = nbytes
            self.sizes.append(nbytes)
            return self.n

        def free(self, token: object) -> None:
            del self.live[token]  # type: ignore[arg-type]

    bufs = Recording()
    async with NfsClient.udp(H, nfs_server.nfs_port, nfs_server.mount_port, hard=False, timeo=2.0,
                             buffers=bufs) as c:
        root = await c.mount(str(nfs_server.export))
        fh, _ = await c.create(root, "f")

        async def write(i: int) -> None:
            await c.write(fh, i * 4096, bytes(4096), FILE_SYNC)

        async with trio.open_nursery() as n:
            for i in range(8):
                n.start_soon(write, i)
        assert bufs.live == {}  # every buffer was given back
        assert sum(1 for s in bufs.sizes if s > 4096) == 8  # one per WRITE, sized by its call


async def test_a_stalled_client_does_not_hold_up_others(nfs_server) -> None:  # type: ignore[no-untyped-def]
    stalled = await trio.open_tcp_stream(H, nfs_server.nfs_port)
    await stalled.send_all(struct.pack(">I", LAST_FRAG | 1_000_000) + b"w" * 1000)  # and then nothing
    async with NfsClient.tcp(H, nfs_server.nfs_port, nfs_server.mount_port, hard=False, timeo=2.0) as c:
        with trio.fail_after(5):
            root = await c.mount(str(nfs_server.export))
            fh, _ = await c.create(root, "busy")
            assert (await c.write(fh, 0, b"y" * 100_000, FILE_SYNC)).count == 100_000
    await stalled.aclose()


async def test_a_duplicate_on_a_new_tcp_connection_gets_the_original_reply(nfs_server) -> None:  # type: ignore[no-untyped-def]
    from nfs.nfs3 import FILE_SYNC as FS
    from nfs.nfs3xdr import NFS3_PROCEDURES, WriteArgs
    from nfs.xdr import Packer

    (nfs_server.export / "w").write_bytes(b"")
    fh = nfs_server.server.export.fh_for(str(nfs_server.export / "w"), os.lstat(nfs_server.export / "w"),
                                         nfs_server.server.export.root_ino)
    data = os.urandom(512 * 1024)
    p = Packer()
    NFS3_PROCEDURES[Proc.WRITE].encode_args(p, WriteArgs(fh, 0, len(data), FS, data))
    call = encode_call(4242, NFS_PROGRAM, 3, Proc.WRITE, b"".join(p.iov()),  # type: ignore[arg-type]
                       AuthSys().to_auth())  # root (AUTH_NONE is the anonymous user: no write to root's file)
    rec = struct.pack(">I", LAST_FRAG | len(call)) + call
    a = await trio.open_tcp_stream(H, nfs_server.nfs_port)
    b = await trio.open_tcp_stream(H, nfs_server.nfs_port)
    drc = nfs_server.server.svc.drc.stats
    await a.send_all(rec)
    with trio.fail_after(10):  # A's call has started (under load, closing A before that may drop it)
        while not drc.misses:
            await trio.sleep(0.005)
    await b.send_all(rec)  # "the client reconnected and resent": same xid, A's running or done
    await a.aclose()  # A's reply goes nowhere
    got = bytearray()
    with trio.fail_after(10):
        while len(got) < 8 or len(got) < 4 + (struct.unpack(">I", got[:4])[0] & 0x7FFFFFFF):
            got += await b.receive_some(65536)
    xid, mtype, rstat, _, _, astat, nfsstat = struct.unpack(">IIIIIII", got[4:32])
    assert (xid, mtype, rstat, astat, nfsstat) == (4242, 1, 0, 0, 0)
    await b.aclose()
    assert (nfs_server.export / "w").read_bytes() == data
    assert drc.misses == 1 and drc.hits + drc.in_progress_drops >= 1  # executed once, answered twice


async def test_hard_client_outlasts_major_timeouts_until_the_server_comes(tmp_path: Path, export_dir: Path,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("WARNING", logger="nfs.client")
    from emu.util.ports import free_port

    port = free_port(H, udp_too=True)
    done = trio.Event()
    async with trio.open_nursery() as n:
        async with NfsClient.udp(H, port, port, timeo=0.05, retrans=1, hard=True) as c:

            async def probe() -> None:
                await c.null()  # hard: never gives up
                done.set()

            n.start_soon(probe)
            await trio.sleep(0.5)  # several major timeouts: 0.05 + 0.1, then again
            assert not done.is_set() and c.stats["major_timeouts"] >= 2
            server = NfsServer(ServerConfig(export=export_dir, port=port, mount_port=0, state_dir=tmp_path / "s"))
            await n.start(server.serve)
            with trio.fail_after(5):
                await done.wait()
        n.cancel_scope.cancel()
    said = [r.getMessage() for r in caplog.records if r.name == "nfs.client"]
    # The kernel's messages: once when the server stops answering, once when it is back.
    assert said == ["server 127.0.0.1 not responding, still trying", "server 127.0.0.1 OK"]


async def test_mount_failures_are_named_not_hangs() -> None:
    from nfs.client import NfsMountError
    from nfs.rpc import AcceptStat, encode_reply_accepted

    # tcpmux's port: nothing listens there, and the kernel never hands it out as an ephemeral
    # port (a free port picked here could be taken by another process before the calls)
    closed = 1
    with trio.fail_after(3):  # TCP: a refused connection is final at once
        async with NfsClient.tcp(H, closed, closed, timeo=0.2) as c:
            with pytest.raises(NfsMountError, match=r"server 127.0.0.1: MOUNT failed: connection refused"):
                await c.mount("/x")
    with trio.fail_after(5):  # UDP: nobody there, bounded by mount_timeout
        async with NfsClient.udp(H, closed, closed, mount_timeout=0.7) as c:
            with pytest.raises(NfsMountError, match=r"did not answer MOUNT within 0.7 s \(connection refused\)"):
                await c.mount("/x")
    other = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # a server of another program
    await other.bind((H, 0))

    async def not_mountd() -> None:
        while True:
            msg, addr = await other.recvfrom(9000)
            await other.sendto(encode_reply_accepted(struct.unpack(">I", msg[:4])[0], AcceptStat.PROG_UNAVAIL), addr)

    async with trio.open_nursery() as n:
        n.start_soon(not_mountd)
        with trio.fail_after(3):
            async with NfsClient.udp(H, closed, other.getsockname()[1]) as c:
                with pytest.raises(NfsMountError, match="program not registered"):
                    await c.mount("/x")
        n.cancel_scope.cancel()
    other.close()
