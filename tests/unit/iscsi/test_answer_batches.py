"""The target's answers to one read of many commands go out ANSWER_BATCH at a time, and a FUA
WRITE's answer still goes out only after an fsync that began once its data was written: inline
(`fast_sync`, a LUN in memory) or in a worker thread (a disk), where the answers that waited for
one fsync go out together when it ends.

Real target, real loopback TCP, a raw initiator that sends all its commands in one write. The
target's own calls are watched (os.pwrite, os.write, the LUN's fsync) by wrappers that record and
then make the real call."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from iscsi import scsi
from iscsi import target as target_mod
from iscsi.lun import DiskLun
from iscsi.pdu import BHS_LEN, F_FINAL, F_WRITE, SCSI_CMD_BHS, Op, Pdu, frame
from iscsi.target import ANSWER_BATCH, Target
from unit.iscsi.raw import raw_login

IQN = "iqn.2024-01.test:batches"
COMMANDS = 2 * ANSWER_BATCH + 3  # two full batches and a remainder


class Recorder:
    """Events in the order the target made them; fsync runs in a worker thread, hence the lock."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int]] = []
        self.lock = threading.Lock()

    def add(self, what: str, n: int = 0) -> None:
        with self.lock:
            self.events.append((what, n))


class WatchedLun(DiskLun):
    """Records each fsync's start and end (a real fdatasync in between)."""

    recorder: Recorder

    def fsync(self) -> None:
        self.recorder.add("fsync_start")
        if not self.fast_sync:  # in a worker thread, as on a disk: commands arrive meanwhile
            threading.Event().wait(0.05)
        super().fsync()
        self.recorder.add("fsync_end")


def _watch(monkeypatch: pytest.MonkeyPatch, rec: Recorder, socket_fds: set[int]) -> None:
    real_write: Callable[..., int] = os.write
    real_pwrite: Callable[..., int] = os.pwrite

    def write(fd: int, data: Any) -> int:
        n = real_write(fd, data)
        if fd in socket_fds:
            rec.add("send", n)
        return n

    def pwrite(fd: int, data: Any, offset: int) -> int:
        rec.add("pwrite", offset)
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(target_mod.os, "write", write)
    monkeypatch.setattr(target_mod.os, "pwrite", pwrite)


@pytest.mark.parametrize("fast_sync", [True, False], ids=["inline-fsync", "thread-fsync"])
async def test_fua_answers_go_out_in_batches_each_after_an_fsync_covering_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fast_sync: bool) -> None:
    rec = Recorder()
    lun = WatchedLun(tmp_path / "lun.img", size=1 << 20)
    lun.recorder = rec
    lun.fast_sync = fast_sync
    target = Target(IQN, {0: lun})
    socket_fds: set[int] = set()
    real_handle = target.handle

    async def handle(stream: trio.SocketStream) -> None:
        socket_fds.add(stream.socket.fileno())
        await real_handle(stream)

    target.handle = handle  # type: ignore[method-assign]
    pages = [bytes([i + 1]) * 512 for i in range(COMMANDS)]
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(target.serve, "127.0.0.1", 0)
        port = listeners[0].socket.getsockname()[1]
        with trio.fail_after(30):
            s = await trio.open_tcp_stream("127.0.0.1", port)
            raw = await raw_login(s, IQN, "iqn.x:batches", (("ImmediateData", "Yes"),))
            reader, cmd_sn, exp_stat_sn = raw.reader, raw.cmd_sn, raw.exp_stat_sn
            _watch(monkeypatch, rec, socket_fds)
            out: list[bytes] = []
            for i, page in enumerate(pages):  # one block each, FUA, all of its data immediate
                cdb = scsi.cdb_write(i, 1, fua=True).ljust(16, b"\0")
                frame(out, SCSI_CMD_BHS.pack(Op.SCSI_CMD, F_FINAL | F_WRITE | 1, 0, 0, len(page), bytes(8), 0x100 + i,
                                             len(page), cmd_sn + i, exp_stat_sn, cdb), page)
            await s.send_all(b"".join(out))  # ~11 KB: one segment, one read for the target
            answers: list[Pdu] = []
            while len(answers) < COMMANDS:
                while (p := reader.next()) is not None:
                    answers.append(p)
                if len(answers) < COMMANDS:
                    reader.feed(await s.receive_some(65536))
            await s.aclose()
        nursery.cancel_scope.cancel()
    monkeypatch.undo()
    lun.close()

    # every write GOOD, answered in CmdSN order with consecutive StatSNs, its data in the file
    assert [p.opcode for p in answers] == [Op.SCSI_RSP] * COMMANDS
    assert [p.itt for p in answers] == [0x100 + i for i in range(COMMANDS)]
    assert [p.bhs[3] for p in answers] == [0] * COMMANDS
    stat_sns = [int.from_bytes(p.bhs[24:28], "big") for p in answers]
    assert stat_sns == list(range(stat_sns[0], stat_sns[0] + COMMANDS))
    with open(tmp_path / "lun.img", "rb") as f:
        assert f.read(512 * COMMANDS) == b"".join(pages)

    # no write to the socket carried more than ANSWER_BATCH answers (a SCSI Response is one BHS),
    # and before each one an fsync had begun after the data of every write it answers, and ended
    pwrites = started_after = 0
    covered = answered = 0
    sends: list[int] = []
    for what, n in rec.events:
        if what == "pwrite":
            pwrites += 1
        elif what == "fsync_start":
            started_after = pwrites
        elif what == "fsync_end":
            covered = started_after
        elif what == "send":
            assert n % BHS_LEN == 0
            sends.append(n // BHS_LEN)
            answered += n // BHS_LEN
            assert answered <= covered, f"answers sent before an fsync covered them: {rec.events}"
    assert sum(sends) == COMMANDS and pwrites == COMMANDS
    if fast_sync:  # the first answers went out while the rest were still to be executed
        assert max(sends) <= ANSWER_BATCH and len(sends) >= 3, sends
