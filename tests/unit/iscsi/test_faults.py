"""Faults on real loopback sockets: login floods and stalls against the target; lost connections,
a target that does not come back, and their log lines for the initiator."""

from __future__ import annotations

import logging
import os
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing

from iscsi.initiator import Initiator, SessionRecoveryTimeout
from iscsi.initiator_session import InitiatorSession, SessionState
from iscsi.initiator_task import Task, TaskKind
from iscsi.keys import SessionParams
from iscsi.initiator_conn import InitiatorConnection
from iscsi.login import LoginConfig, TargetLogin
from iscsi.lun import DiskLun
from iscsi.pdu import Op, Pdu, PduReader, encode_text
from iscsi.session import TargetCore, TargetSession
from iscsi.target import Target

IQN = "iqn.2024-01.test:faults"


@asynccontextmanager
async def serving(tmp_path: Path, **kw: object) -> AsyncIterator[tuple[Target, int]]:
    lun = DiskLun(tmp_path / "lun.img", size=1 << 20)
    target = Target(IQN, {0: lun}, **kw)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(target.serve, "127.0.0.1", 0)
        yield target, listeners[0].socket.getsockname()[1]
        nursery.cancel_scope.cancel()
    lun.close()


def connector(port: int):  # noqa: ANN201
    async def connect() -> trio.SocketStream:
        return await trio.open_tcp_stream("127.0.0.1", port)
    return connect


# --- the target: connections that never log in ----------------------------------------------------


async def test_waves_of_connections_that_never_log_in_do_not_lock_out_a_login(tmp_path: Path) -> None:
    async with serving(tmp_path) as (target, port):
        for wave in range(3):
            idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(64)]
            try:
                await trio.sleep(0.1)
                with trio.fail_after(5):  # logged in at once, not after some timeout
                    async with Initiator(connector(port), IQN, command_timeout=5) as ini:
                        assert len(await ini.read(0, 1)) == 512
                assert len(target.pending) <= target.max_pending_per_source
            finally:
                for x in idle:
                    x.close()
        assert target.stats["evicted"] >= 3 * (64 - target.max_pending_per_source)
        assert target.stats["handler_errors"] == 0


async def test_a_login_that_stalls_is_closed_after_the_login_timeout(tmp_path: Path) -> None:
    async with serving(tmp_path, login_timeout=0.3) as (target, port):
        s = await trio.open_tcp_stream("127.0.0.1", port)
        half = Pdu.new(Op.LOGIN_REQ, 0x87, immediate=True, itt=1, data=encode_text([("InitiatorName", "iqn.x:slow")])).encode()
        await s.send_all(half[:30])  # part of a login PDU, then nothing
        with trio.fail_after(5):
            assert await s.receive_some(1) == b""  # closed by the target
        await s.aclose()
        assert target.stats["login_timeouts"] == 1 and not target.pending


async def test_a_reset_connection_is_one_log_line_not_a_traceback(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="iscsi.target")
    async with serving(tmp_path, nop_interval=0.05) as (target, port):
        async with Initiator(connector(port), IQN) as ini:
            stream = ini.stream
            assert isinstance(stream, trio.SocketStream)
            # an abortive close: the target's next read gets ECONNRESET
            stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            stream.socket.close()
            await trio.sleep(0.3)  # the pinger and the reader both meet the reset
            assert target.stats["handler_errors"] == 0
    lost = [r for r in caplog.records if "connection lost" in r.getMessage()]
    assert lost and all(r.exc_info is None and "\n" not in r.getMessage() for r in caplog.records)
    assert "connection reset by peer" in lost[0].getMessage()


# --- the initiator: session recovery --------------------------------------------------------------


async def test_recovery_reissues_what_was_in_flight_and_logs_as_open_iscsi(tmp_path: Path,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="iscsi.initiator")
    connects: list[trio.abc.Stream] = []
    async with serving(tmp_path) as (target, port):
        async with Initiator(connector(port), IQN, reconnect_delay=0.01, on_connect=connects.append) as ini:
            pages = {i: os.urandom(4096) for i in range(32)}

            async def write(i: int) -> None:
                await ini.write(i * 8, pages[i], fua=True)

            async with trio.open_nursery() as n:
                for i in pages:
                    n.start_soon(write, i)
                await trio.sleep(0)  # issued; now the target drops every connection
                for scope in list(target.by_nexus.values()):
                    scope.cancel()
            for i, page in pages.items():
                assert await ini.read(i * 8, 8) == page
            assert ini.reconnects >= 1 and len(connects) == 1 + ini.reconnects
            assert ini.stats["reissued"] == ini.reissued
    sid = ini.session.sid
    messages = [r.getMessage() for r in caplog.records if r.name == "iscsi.initiator"]
    assert f"connection{sid}:0 is operational now" in messages
    assert any(m.startswith(f"connection{sid}:0: detected conn error (") for m in messages)
    assert any(m.startswith(f"connection{sid}:0 is operational after recovery (") for m in messages)


async def test_a_target_that_never_returns_fails_commands_after_replacement_timeout(tmp_path: Path,
                                                                                    caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="iscsi.initiator")
    lun = DiskLun(tmp_path / "lun.img", size=1 << 20)
    async with trio.open_nursery() as outer:
        scope = trio.CancelScope()

        async def run_target(task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
            with scope:
                async with trio.open_nursery() as n:
                    listeners = await n.start(Target(IQN, {0: lun}).serve, "127.0.0.1", 0)
                    task_status.started(listeners[0].socket.getsockname()[1])
                    await trio.sleep_forever()

        port = await outer.start(run_target)
        async with Initiator(connector(port), IQN, reconnect_delay=0.02, replacement_timeout=0.6) as ini:
            await ini.write(0, b"q" * 512)
            scope.cancel()  # listener and sessions gone; nothing takes the port again
            started = trio.current_time()
            with pytest.raises(SessionRecoveryTimeout, match="session recovery timed out after 0.6 secs"):
                await ini.read(0, 1)
            assert 0.5 < trio.current_time() - started < 5
            assert ini.session.state is SessionState.TERMINATED
        outer.cancel_scope.cancel()
    lun.close()
    assert any("session recovery timed out after 0.6 secs" in r.getMessage() for r in caplog.records)


# --- the session core's timers, sans-IO, and the driver on trio's (mock) clock --------------------


def test_session_core_recovery_deadline_and_reissue_order() -> None:
    session = InitiatorSession(replacement_timeout=120.0, command_timeout=None)
    conn = InitiatorConnection(SessionParams(), cmd_sn=1, exp_stat_sn=0, exp_cmd_sn=1, max_cmd_sn=64)
    session.connection_up(conn, now=0.0)
    tasks = [Task(TaskKind.SCSI, cdb=bytes(6)) for _ in range(3)]
    for t in tasks:
        session.issue(t)
    out: list[bytes] = []
    session.flush(1.0, out)
    assert out and len(conn.tasks) == 3 and not session.queue
    session.connection_lost("connection reset by peer", now=10.0)
    assert session.state is SessionState.RECOVERING and session.get_timer() == 130.0
    assert list(session.queue) == tasks  # to be sent again, in issue order
    session.handle_timer(129.9)
    assert session.state is SessionState.RECOVERING and not session.take_finished()
    session.handle_timer(130.0)
    finished = session.take_finished()
    assert session.state is SessionState.TERMINATED and finished == tasks
    assert all(isinstance(t.error, SessionRecoveryTimeout) for t in finished)
    late = Task(TaskKind.SCSI, cdb=bytes(6))
    session.issue(late)  # after the end: failed at once
    assert session.take_finished() == [late] and isinstance(late.error, SessionRecoveryTimeout)


async def _memory_target(stream: trio.abc.Stream, lun: DiskLun) -> None:
    """Our target's sans-IO login and session over any stream (here an in-memory one)."""
    core = TargetCore(IQN, {0: lun})
    reader = PduReader()
    login = TargetLogin(LoginConfig(target_name=IQN), lambda: 1)
    while login.result is None:
        while (pdu := reader.next()) is None:
            reader.feed(await stream.receive_some(65536))
        rsp, _ = login.receive(pdu)
        await stream.send_all(rsp.encode())
    session = TargetSession(core, login.result)
    while data := await stream.receive_some(65536):
        reader.feed(data)
        while (pdu := reader.next()) is not None:
            session.receive(pdu)
        await stream.send_all(b"".join(session.out))
        session.out.clear()


def test_timers_run_on_trios_clock_default_replacement_timeout(tmp_path: Path) -> None:
    """Under a mock clock the default 120 s of recovery pass in no time: no timer reads the
    system clock. The connect factory hands out in-memory streams, as the emulated host's do."""
    lun = DiskLun(tmp_path / "lun.img", size=1 << 20)
    clock = trio.testing.MockClock(autojump_threshold=0)
    record: dict[str, float] = {}

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            attempts = {"n": 0}

            async def connect() -> trio.abc.Stream:
                attempts["n"] += 1
                if attempts["n"] > 1:
                    raise ConnectionRefusedError(111, "Connection refused")  # the target is gone
                ours, theirs = trio.testing.memory_stream_pair()
                nursery.start_soon(_memory_target, theirs, lun)
                return ours

            async with Initiator(connect, IQN, command_timeout=None) as ini:
                assert ini.session.replacement_timeout == 120.0
                await ini.write(0, b"m" * 512)
                assert ini.stream is not None
                await ini.stream.aclose()  # the connection is lost
                start = trio.current_time()
                with pytest.raises(SessionRecoveryTimeout):
                    await ini.read(0, 1)
                record["elapsed"] = trio.current_time() - start
                record["attempts"] = attempts["n"]
            nursery.cancel_scope.cancel()

    trio.run(main, clock=clock)
    lun.close()
    assert 120.0 <= record["elapsed"] < 122.0 and record["attempts"] > 100  # login retried all along
