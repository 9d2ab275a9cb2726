"""Our trio target and our initiator over real loopback TCP: data, concurrency, recovery, bad input."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from iscsi.initiator import Initiator, ISCSIError, ScsiError, SessionRecoveryTimeout, discover
from iscsi.login import LoginError, LoginStatus
from iscsi.lun import DiskLun
from iscsi.pdu import Op, Pdu
from iscsi.sense import SenseKey
from iscsi.target import Target
from unit.iscsi.raw import raw_login

IQN = "iqn.2024-01.test:loop"


class Served:
    def __init__(self, target: Target, port: int, lun: DiskLun) -> None:
        self.target, self.port, self.lun = target, port, lun

    async def connect(self) -> trio.SocketStream:
        return await trio.open_tcp_stream("127.0.0.1", self.port)

    def initiator(self, **kw: object) -> Initiator:
        return Initiator(self.connect, IQN, **kw)  # type: ignore[arg-type]


@asynccontextmanager
async def _serve(tmp_path: Path, lun_type: type[DiskLun] = DiskLun, **kw: object) -> AsyncIterator[Served]:
    lun = lun_type(tmp_path / "lun.img", size=4 << 20)
    target = Target(IQN, {0: lun}, **kw)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(target.serve, "127.0.0.1", 0)
        yield Served(target, listeners[0].socket.getsockname()[1], lun)
        nursery.cancel_scope.cancel()
    lun.close()


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    async with _serve(tmp_path) as s:
        yield s


async def test_write_read_fua_sync(served: Served) -> None:
    async with served.initiator() as ini:
        assert (ini.nblocks, ini.block_size) == (8192, 512)
        data = os.urandom(1 << 20)  # beyond FirstBurstLength: unsolicited data and R2Ts
        await ini.write(64, data, fua=True)
        with open(served.lun.path, "rb") as f:  # on disk before the response came
            f.seek(64 * 512)
            assert f.read(len(data)) == data
        assert await ini.read(64, len(data) // 512) == data
        await ini.synchronize_cache()
        assert await ini.nop(b"x" * 100) == b"x" * 100
        with pytest.raises(ScsiError) as e:
            await ini.read(ini.nblocks, 1)
        assert (e.value.sense.key, e.value.sense.asc) == (SenseKey.ILLEGAL_REQUEST, 0x21)


async def test_many_in_flight_with_digests_and_buffers_hook(served: Served) -> None:
    class Counting:
        def __init__(self) -> None:
            self.live = 0
            self.peak = 0
            self.total = 0

        async def alloc(self, nbytes: int) -> object:
            self.live += 1
            self.total += 1
            self.peak = max(self.peak, self.live)
            return nbytes

        def free(self, token: object) -> None:
            self.live -= 1

    bufs = Counting()
    async with served.initiator(header_digest=True, data_digest=True, buffers=bufs) as ini:
        assert ini.params.header_digest and ini.params.data_digest
        pages = {i: os.urandom(4096) for i in range(64)}

        async def one(i: int) -> None:
            await ini.write(i * 8, pages[i])
            assert await ini.read(i * 8, 8) == pages[i]

        async with trio.open_nursery() as n:
            for i in pages:
                n.start_soon(one, i)
    assert bufs.live == 0 and bufs.total >= 128 and bufs.peak > 1  # concurrent, all freed


async def test_cmdsn_window_is_respected(tmp_path: Path) -> None:
    async with _serve(tmp_path, cmd_window=2) as s:
        async with s.initiator() as ini:
            results = []

            async def rd(i: int) -> None:
                results.append(len(await ini.read(i, 1)))

            with trio.fail_after(10):  # a command sent beyond MaxCmdSN would never be answered
                async with trio.open_nursery() as n:
                    for i in range(40):
                        n.start_soon(rd, i)
            assert results == [512] * 40  # none ignored by the target, none lost
            (sess,) = s.target.core.sessions
            assert sess.window == 2 and sess.stats["ignored"] == 0 and sess.stats["commands"] >= 41
            conn = ini.session.conn
            assert conn is not None and conn.max_cmd_sn == (conn.exp_cmd_sn + 1) & 0xFFFFFFFF


async def test_session_recovery_reissues_outstanding(served: Served) -> None:
    async with served.initiator(reconnect_delay=0.01) as ini:
        await ini.write(0, b"a" * 4096)
        # The target drops every connection (what a restarted or wedged target does).
        for scope in list(served.target.by_nexus.values()):
            scope.cancel()
        data = os.urandom(4096)
        await ini.write(8, data)  # issued while the session is down or coming back
        assert await ini.read(8, 8) == data
        assert ini.reconnects >= 1


async def test_recovery_gives_up_after_replacement_timeout(tmp_path: Path) -> None:
    async with _serve(tmp_path) as s:
        ini = s.initiator(reconnect_delay=0.01, replacement_timeout=0.5)
        async with ini:
            s.target.login_config.target_name = "iqn.2024-01.test:renamed"  # relogins now fail
            for scope in list(s.target.by_nexus.values()):
                scope.cancel()
            with pytest.raises(SessionRecoveryTimeout, match="session recovery timed out after 0.5 secs"):
                await ini.read(0, 1)
            with pytest.raises(SessionRecoveryTimeout):  # and later commands fail at once
                await ini.read(0, 1)


async def test_chap_and_refusals(tmp_path: Path) -> None:
    async with _serve(tmp_path, chap=("user", "twelve-chars!")) as s:
        async with s.initiator(chap=("user", "twelve-chars!")) as ini:
            assert len(await ini.read(0, 1)) == 512
        with pytest.raises(LoginError) as e:
            async with s.initiator(chap=("user", "wrong-secret")):
                pass
        assert e.value.status == LoginStatus.AUTHENTICATION_FAILURE
        with pytest.raises(LoginError) as e:
            async with Initiator(s.connect, "iqn.2024-01.test:other"):
                pass
        assert e.value.status == LoginStatus.NOT_FOUND


async def test_discovery(served: Served) -> None:
    found = await discover(served.connect)
    assert found == [(IQN, f"127.0.0.1:{served.port},1")]


async def test_bad_input_never_disturbs_other_sessions(served: Served) -> None:
    async with served.initiator() as ini:
        data = os.urandom(4096)
        await ini.write(0, data)
        # 1) garbage before login: the connection is closed, nothing crashes
        s = await served.connect()
        await s.send_all(os.urandom(4096))
        with trio.fail_after(35):
            while await s.receive_some(65536):
                pass
        await s.aclose()
        # 2) an oversized data segment after login: Reject (carrying the header), then closed
        s = await served.connect()
        reader = (await raw_login(s, IQN)).reader
        huge = Pdu.new(Op.SCSI_CMD, 0x80, itt=5)
        hdr = bytearray(huge.encode())
        hdr[5:8] = (1 << 24 - 1).to_bytes(3, "big")  # 8 MiB claimed, never sent
        await s.send_all(bytes(hdr))
        got = b""
        with trio.fail_after(5):
            while chunk := await s.receive_some(65536):
                got += chunk
        reader.feed(got)
        rej = reader.next()
        assert rej is not None and rej.opcode == Op.REJECT and rej.data[:5] == bytes(hdr[:5])
        await s.aclose()
        # 3) a login PDU out of order in the full feature phase: Reject, session lives on
        s = await served.connect()
        reader = (await raw_login(s, IQN)).reader
        again = Pdu.new(Op.LOGIN_REQ, 0x87, immediate=True, itt=2)
        await s.send_all(again.encode())
        while (p := reader.next()) is None:
            reader.feed(await s.receive_some(65536))
        assert p.opcode == Op.REJECT
        await s.aclose()
        # the first session saw none of it
        assert await ini.read(0, 8) == data


async def test_half_open_connections_are_bounded(tmp_path: Path) -> None:
    async with _serve(tmp_path, max_pending_per_source=3) as s:
        socks = [socket.create_connection(("127.0.0.1", s.port)) for _ in range(5)]
        try:
            with trio.fail_after(5):  # the target accepts all five
                while s.target.stats["evicted"] < 2:
                    await trio.sleep(0.01)
            assert len(s.target.pending) == 3 and s.target.stats["evicted"] == 2  # the oldest two closed
            for x in socks[:2]:
                x.settimeout(5)
                assert x.recv(1) == b""
        finally:
            for x in socks:
                x.close()
        async with s.initiator() as ini:  # and service goes on
            await ini.test_unit_ready()


async def test_target_nop_in_pings_are_answered(tmp_path: Path) -> None:
    async with _serve(tmp_path, nop_interval=0.05) as s:
        async with s.initiator() as ini:
            (sess,) = s.target.core.sessions
            with trio.fail_after(5):  # several pings; unanswered ones would close the session
                while sess.nop_ttt <= 0x10000003:
                    await trio.sleep(0.05)
            assert s.target.core.sessions == {sess}  # (still open)
            # several pings went out; at most the one just sent is not answered yet
            assert sess.nop_ttt > 0x10000003 and sess.nops_unanswered <= 1
            assert len(await ini.read(0, 1)) == 512


async def test_unanswered_command_times_out_and_is_reissued(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import iscsi.session as sess

    real = sess.TargetSession._scsi_cmd
    swallowed = []

    def lossy(self: sess.TargetSession, pdu: Pdu) -> None:
        if pdu.bhs[32] == 0x28 and not swallowed:  # the first READ(10) is never answered
            swallowed.append(pdu.itt)
            return
        real(self, pdu)

    monkeypatch.setattr(sess.TargetSession, "_scsi_cmd", lossy)
    monkeypatch.setattr(sess.TargetSession, "_fast", lambda self, bhs, data: False)
    async with _serve(tmp_path) as s:
        async with s.initiator(command_timeout=1.0, reconnect_delay=0.01) as ini:
            await ini.write(0, b"z" * 512)
            with trio.fail_after(10):
                assert await ini.read(0, 1) == b"z" * 512
            assert swallowed and ini.reconnects == 1


async def test_fuzzed_pdus_after_login_never_take_the_target_down(served: Served) -> None:
    import random

    rng = random.Random(7143)
    async with served.initiator() as ini:
        data = os.urandom(4096)
        await ini.write(0, data)
        for round_ in range(40):
            s = await served.connect()
            await raw_login(s, IQN)
            blob = b""
            for _ in range(20):
                bhs = bytearray(rng.randbytes(48))
                bhs[0] = rng.choice([0x00, 0x01, 0x02, 0x04, 0x05, 0x06, 0x10, 0x41, 0x42, 0x46, rng.randrange(256)])
                bhs[4] = rng.choice([0, 0, 1])
                dlen = rng.choice([0, 0, 5, 512, 4096])
                bhs[5:8] = dlen.to_bytes(3, "big")
                ahs = rng.randbytes(bhs[4] * 4)
                payload = rng.randbytes(dlen) + bytes(-dlen % 4)
                blob += bytes(bhs) + ahs + payload
            with trio.move_on_after(0.05):
                await s.send_all(blob)
                with contextlib.suppress(trio.BrokenResourceError):
                    while await s.receive_some(65536):
                        pass
            await s.aclose()
        assert served.target.stats["handler_errors"] == 0  # every input handled by the protocol code
        assert await ini.read(0, 8) == data  # the target and the first session are still fine
        async with served.initiator() as again:  # and it still accepts new sessions
            assert await again.read(0, 8) == data


async def test_commands_after_logout_fail_fast(served: Served) -> None:
    async with served.initiator() as ini:
        await ini.test_unit_ready()
        await ini.logout()
        with trio.fail_after(2), pytest.raises(ISCSIError, match="logged out"):
            await ini.read(0, 1)
    assert not served.target.core.sessions  # the target closed its side too


async def test_busy_target_is_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import iscsi.session as sess
    from iscsi.sense import Status

    real = sess.TargetSession._scsi_cmd
    busy = {"left": 3}

    def sometimes_busy(self: sess.TargetSession, pdu: Pdu) -> None:
        if pdu.bhs[32] == 0x28 and busy["left"]:
            busy["left"] -= 1
            self.scsi_response(pdu.itt, Status.TASK_SET_FULL)
            return
        real(self, pdu)

    monkeypatch.setattr(sess.TargetSession, "_scsi_cmd", sometimes_busy)
    monkeypatch.setattr(sess.TargetSession, "_fast", lambda self, bhs, data: False)
    async with _serve(tmp_path) as s:
        async with s.initiator() as ini:
            assert len(await ini.read(0, 1)) == 512 and busy["left"] == 0


async def test_recovery_across_a_target_restart(tmp_path: Path) -> None:
    lun = DiskLun(tmp_path / "lun.img", size=1 << 20)
    port = 0
    async with trio.open_nursery() as outer:
        first = Target(IQN, {0: lun})
        scope = trio.CancelScope()

        async def run_first(task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
            with scope:
                async with trio.open_nursery() as n:
                    listeners = await n.start(first.serve, "127.0.0.1", 0)
                    task_status.started(listeners[0].socket.getsockname()[1])
                    await trio.sleep_forever()

        port = await outer.start(run_first)

        async def connect() -> trio.SocketStream:
            return await trio.open_tcp_stream("127.0.0.1", port)

        async with Initiator(connect, IQN, reconnect_delay=0.05) as ini:
            data = os.urandom(8192)
            await ini.write(0, data, fua=True)
            scope.cancel()  # the whole target goes: listener and sessions; a new one takes the port
            await trio.sleep(0.5)  # meanwhile logins fail (connection refused) and are retried
            second = Target(IQN, {0: lun})
            await outer.start(second.serve, "127.0.0.1", port)
            with trio.fail_after(10):
                assert await ini.read(0, 16) == data
            assert ini.reconnects >= 1 and second.stats["logins"] >= 1
        outer.cancel_scope.cancel()
    lun.close()


class SlowSyncLun(DiskLun):
    """A LUN whose fsync takes a while and records when it finished."""

    def __init__(self, *a: object, **kw: object) -> None:
        super().__init__(*a, **kw)  # type: ignore[arg-type]
        self.synced: list[float] = []
        self.started = 0  # fsyncs begun
        self.fast_sync = False  # always in a worker thread

    def fsync(self) -> None:
        import time

        self.started += 1
        time.sleep(0.2)  # runs in a worker thread: the event loop keeps going meanwhile
        super().fsync()
        self.synced.append(time.monotonic())


async def test_fua_write_and_synchronize_cache_answer_only_after_fsync(tmp_path: Path) -> None:
    import time

    async with _serve(tmp_path, SlowSyncLun) as s, s.initiator() as ini:
        lun = s.lun
        assert isinstance(lun, SlowSyncLun)
        await ini.write(0, b"w" * 4096)
        assert lun.synced == []  # a plain write waits for no fsync
        await ini.write(8, b"f" * 4096, fua=True)
        answered = time.monotonic()
        assert len(lun.synced) == 1 and lun.synced[0] <= answered
        await ini.synchronize_cache()
        answered = time.monotonic()
        assert len(lun.synced) == 2 and lun.synced[1] <= answered


async def test_answers_wait_for_fsync_in_order_while_one_fsync_covers_many_writes(tmp_path: Path) -> None:
    async with _serve(tmp_path, SlowSyncLun) as s, s.initiator() as ini:
        lun = s.lun
        assert isinstance(lun, SlowSyncLun)
        done: list[str] = []
        read_at: list[float] = []

        async def fua(i: int) -> None:
            await ini.write(i * 8, bytes([i]) * 4096, fua=True)
            done.append("write")

        async def read() -> None:
            with trio.fail_after(30):
                while not lun.started:  # issued while the first fsync runs, however slow the machine
                    await trio.sleep(0.005)
            await ini.read(0, 1)
            done.append("read")
            read_at.append(time.monotonic())

        async with trio.open_nursery() as n:
            for i in range(16):
                n.start_soon(fua, i)
            n.start_soon(read)
        # every write was answered after an fsync that covered it, with far fewer fsyncs than
        # writes (the ones that arrived during an fsync share the next one) ...
        assert done.count("write") == 16 and 1 <= len(lun.synced) <= 3
        # ... and the READ, made while the first fsync ran, was answered only after that fsync had
        # ended: it waited behind the writes' answers. (Not the order the initiator's tasks saw
        # their answers in: answers that arrive together wake their tasks in any order.)
        assert read_at[0] > lun.synced[0]
