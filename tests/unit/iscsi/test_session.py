"""The target's full feature phase, driven by the initiator's sans-IO core over real PDU bytes."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from iscsi import scsi
from iscsi.initiator_conn import InitiatorConnection
from iscsi.initiator_task import Task, TaskKind
from iscsi.keys import SessionParams
from iscsi.login import LoginResult
from iscsi.lun import DiskLun
from iscsi.pdu import RESERVED_TAG, Op, Pdu, PduReader, TmfFunction, TmfResponse, encode_text, parse_text
from iscsi.sense import SenseKey, Status
from iscsi.session import TargetCore, TargetSession

IQN = "iqn.2024-01.test:disk"


class Pair:
    """A target session and an initiator core wired back to back through PDU bytes."""

    def __init__(self, tmp: Path, *, window: int = 8, session_type: str = "Normal", **kw: object) -> None:
        self.lun = DiskLun(tmp / "d.img", size=1 << 20)
        self.core = TargetCore(IQN, {0: self.lun}, portal="127.0.0.1:3260")
        tparams = SessionParams(**kw)  # type: ignore[arg-type]
        iparams = SessionParams(**kw)  # type: ignore[arg-type]
        # each side's peer limit is the other's own limit
        tparams.peer_max_recv_data_segment_length = iparams.max_recv_data_segment_length
        iparams.peer_max_recv_data_segment_length = tparams.max_recv_data_segment_length
        res = LoginResult(session_type, "iqn.test:ini", IQN, b"\x80" * 6, 1, 0, tparams, cmd_sn=1, stat_sn=100)
        self.ts = TargetSession(self.core, res, window=window)
        self.ic = InitiatorConnection(iparams, cmd_sn=1, exp_stat_sn=100, exp_cmd_sn=1, max_cmd_sn=window)
        self.to_target = PduReader(max_data=tparams.max_recv_data_segment_length, header_digest=tparams.header_digest, data_digest=tparams.data_digest)
        self.to_initiator = PduReader(header_digest=iparams.header_digest, data_digest=iparams.data_digest)
        self.seen: list[Pdu] = []  # every PDU the target sent

    def send(self, chunks: list[bytes]) -> None:
        pending = b"".join(chunks)
        while pending:
            self.to_target.feed(pending)
            while (p := self.to_target.next()) is not None:
                self.ts.receive(p)
            out = b"".join(self.ts.out)
            self.ts.out.clear()
            self.to_initiator.feed(out)
            back: list[bytes] = []
            while (p := self.to_initiator.next()) is not None:
                self.seen.append(p)
                back += self.ic.receive(p)
            pending = b"".join(back)

    def submit(self, task: Task) -> list[bytes]:
        out: list[bytes] = []
        self.ic.submit(task, out)
        return out

    def run(self, task: Task) -> Task:
        self.send(self.submit(task))
        return task


def scsi_task(cdb: bytes, *, data: bytes | None = None, read_len: int = 0) -> Task:
    return Task(TaskKind.SCSI, 0, cdb, memoryview(data) if data is not None else None, read_len)


@pytest.fixture
def pair(tmp_path: Path) -> Pair:
    return Pair(tmp_path)


def test_write_with_r2t_then_read_in_many_data_in(tmp_path: Path) -> None:
    p = Pair(tmp_path, initial_r2t=True, immediate_data=False, max_burst_length=4096, max_recv_data_segment_length=1024)
    data = os.urandom(16384)
    w = p.run(scsi_task(scsi.cdb_write(10, 32), data=data))
    assert w.result is not None and w.result.status == Status.GOOD
    r2ts = [x for x in p.seen if x.opcode == Op.R2T]
    assert [x.u32(40) for x in r2ts] == [0, 4096, 8192, 12288]  # BufferOffset of each burst
    assert [x.u32(36) for x in r2ts] == [0, 1, 2, 3]  # R2TSN
    p.seen.clear()
    r = p.run(scsi_task(scsi.cdb_read(10, 32), read_len=16384))
    assert r.result.data == data
    data_in = [x for x in p.seen if x.opcode == Op.DATA_IN]
    assert len(data_in) == 16 and [x.u32(36) for x in data_in] == list(range(16))  # DataSN
    assert data_in[-1].flags & 0x01 and not data_in[0].flags & 0x01  # status only in the last


def test_immediate_and_unsolicited_data(tmp_path: Path) -> None:
    p = Pair(tmp_path, initial_r2t=False, immediate_data=True, first_burst_length=8192, max_recv_data_segment_length=2048)
    data = os.urandom(20480)
    w = p.run(scsi_task(scsi.cdb_write(0, 40), data=data))
    assert w.result.status == Status.GOOD
    r2ts = [x for x in p.seen if x.opcode == Op.R2T]
    assert r2ts and r2ts[0].u32(40) == 8192  # the first 8192 bytes came unsolicited
    assert p.lun.execute(scsi.cdb_read(0, 40)).data == data


def test_statsn_and_cmdsn_window(pair: Pair) -> None:
    tur = scsi.cdb_test_unit_ready()
    for _ in range(3):
        pair.run(scsi_task(tur))
    stat_sns = [x.u32(24) for x in pair.seen]
    assert stat_sns == [100, 101, 102]
    assert pair.seen[-1].u32(28) == 4 and pair.seen[-1].u32(32) == 4 + 8 - 1  # ExpCmdSN, MaxCmdSN
    # CmdSN beyond MaxCmdSN, and below ExpCmdSN: silently ignored
    for bad in (pair.ic.max_cmd_sn + 1, pair.ic.cmd_sn - 1):
        t = Task(TaskKind.SCSI, 0, tur)
        out = pair.submit(t)
        pair.ic.cmd_sn -= 1
        bhs = bytearray(out[0])
        struct.pack_into(">I", bhs, 24, bad)
        n = len(pair.seen)
        pair.send([bytes(bhs)])
        assert len(pair.seen) == n and pair.ts.stats["ignored"] >= 1
        pair.ic.tasks.pop(t.itt)
    assert pair.run(scsi_task(tur)).result.status == Status.GOOD


def test_commands_ahead_of_expcmdsn_wait_for_the_gap(pair: Pair) -> None:
    a, b = scsi_task(scsi.cdb_test_unit_ready()), scsi_task(scsi.cdb_test_unit_ready())
    first = pair.submit(a)
    second = pair.submit(b)
    pair.send(second)
    assert b.result is None and len(pair.ts.pending) == 1
    pair.send(first)
    assert a.result.status == b.result.status == Status.GOOD
    assert [x.itt for x in pair.seen] == [a.itt, b.itt]  # executed in CmdSN order


@pytest.mark.parametrize("edtl,flag,resid,datalen", [(200, 0x04, 312, 200), (10000, 0x02, 10000 - 512, 512), (0, 0x04, 512, 0)])
def test_read_residuals(pair: Pair, edtl: int, flag: int, resid: int, datalen: int) -> None:
    t = scsi_task(scsi.cdb_read(0, 1), read_len=edtl)
    pair.run(t)
    assert t.result.status == Status.GOOD and len(t.result.data) == datalen
    last = pair.seen[-1]
    assert last.flags & 0x06 == flag and last.u32(44) == resid


def test_lba_out_of_range_sense(pair: Pair) -> None:
    t = pair.run(scsi_task(scsi.cdb_read(pair.lun.nblocks, 1), read_len=512))
    assert t.result.status == Status.CHECK_CONDITION
    assert (t.result.sense.key, t.result.sense.asc, t.result.sense.ascq) == (SenseKey.ILLEGAL_REQUEST, 0x21, 0)
    t = pair.run(scsi_task(bytes((0xEE,)) + bytes(9)))
    assert (t.result.sense.key, t.result.sense.asc) == (SenseKey.ILLEGAL_REQUEST, 0x20)


def test_fua_write_and_sync_cache_ask_for_fsync(pair: Pair) -> None:
    pair.run(scsi_task(scsi.cdb_write(0, 1), data=bytes(512)))
    assert not pair.ts.sync_luns
    pair.run(scsi_task(scsi.cdb_write(0, 1, fua=True), data=bytes(512)))
    assert pair.ts.sync_luns == {pair.lun}
    pair.ts.sync_luns.clear()
    pair.run(scsi_task(scsi.cdb_synchronize_cache()))
    assert pair.ts.sync_luns == {pair.lun}


def _data_out(itt: int, ttt: int, data_sn: int, offset: int, data: bytes, final: bool) -> bytes:
    p = Pdu.new(Op.DATA_OUT, 0x80 if final else 0, itt=itt, data=data)
    p.set_u32(20, ttt).set_u32(36, data_sn).set_u32(40, offset)
    return p.encode()


def test_bad_datasn_fails_the_command(tmp_path: Path) -> None:
    p = Pair(tmp_path, initial_r2t=True, immediate_data=False)
    t = scsi_task(scsi.cdb_write(0, 2), data=bytes(1024))
    cmd = p.submit(t)
    p.to_target.feed(b"".join(cmd))
    p.ts.receive(p.to_target.next())
    r2t = p.ts.out
    p.to_initiator.feed(b"".join(r2t))
    p.ts.out = []
    r2t_pdu = p.to_initiator.next()
    ttt = r2t_pdu.u32(20)
    p.send([_data_out(t.itt, ttt, 1, 0, bytes(512), False), _data_out(t.itt, ttt, 0, 512, bytes(512), True)])
    assert t.result.status == Status.CHECK_CONDITION and t.result.sense.key == SenseKey.ABORTED_COMMAND


def test_nop_both_ways(pair: Pair) -> None:
    t = Task(TaskKind.NOP, immediate=True, payload=b"ping!")
    pair.run(t)
    assert t.response == b"ping!"
    pair.ts.nop_in_ping()
    assert pair.ts.nops_unanswered == 1
    out = b"".join(pair.ts.out)
    pair.ts.out.clear()
    pair.to_initiator.feed(out)
    answer = pair.ic.receive(pair.to_initiator.next())
    pair.send(answer)  # the initiator's NOP-Out echoes the TTT
    assert pair.ts.nops_unanswered == 0


def test_abort_task_and_resets(tmp_path: Path) -> None:
    p = Pair(tmp_path, initial_r2t=True, immediate_data=False)
    w = scsi_task(scsi.cdb_write(0, 2), data=bytes(1024))
    p.to_target.feed(b"".join(p.submit(w)))
    p.ts.receive(p.to_target.next())
    p.ts.out.clear()  # the R2T is never answered: the write is in progress
    assert w.itt in p.ts.writes

    def tmf(function: int, ref: int = RESERVED_TAG) -> int:
        t = p.run(Task(TaskKind.TMF, immediate=True, tmf=(function, ref, w.cmd_sn)))
        return t.response  # type: ignore[return-value]

    assert tmf(TmfFunction.ABORT_TASK, w.itt) == TmfResponse.FUNCTION_COMPLETE
    assert w.itt not in p.ts.writes and w.result is None  # no SCSI response for an aborted task
    assert tmf(TmfFunction.ABORT_TASK, 0xABCD) == TmfResponse.TASK_DOES_NOT_EXIST
    assert tmf(TmfFunction.LOGICAL_UNIT_RESET) == TmfResponse.FUNCTION_COMPLETE
    assert tmf(TmfFunction.TARGET_WARM_RESET) == TmfResponse.FUNCTION_COMPLETE
    assert tmf(TmfFunction.TASK_REASSIGN) == TmfResponse.REASSIGNMENT_NOT_SUPPORTED
    assert p.ts.write_buffered == 0 and p.core.write_buffered == 0


def test_rejects(pair: Pair) -> None:
    for op in (0x1F, Op.SNACK, Op.NOP_IN):
        bad = Pdu.new(op, 0x80, itt=77)
        pair.send([bad.encode()])
        rej = pair.seen[-1]
        assert rej.opcode == Op.REJECT and rej.data[:48] == bytes(bad.bhs)  # carries the header
    stat = [x.u32(24) for x in pair.seen]
    assert stat == [100, 101, 102]  # StatSN advances after each Reject


def test_logout(pair: Pair) -> None:
    t = Task(TaskKind.LOGOUT, immediate=True)
    pair.run(t)
    assert t.response == 0 and pair.ts.closing


def test_sendtargets_discovery(tmp_path: Path) -> None:
    p = Pair(tmp_path, session_type="Discovery")
    t = Task(TaskKind.TEXT)
    t.payload = encode_text([("SendTargets", "All")])
    p.run(t)
    rsp = p.seen[-1]
    assert rsp.opcode == Op.TEXT_RSP and rsp.flags == 0x80 and rsp.u32(20) == RESERVED_TAG
    assert parse_text(t.response) == [("TargetName", IQN), ("TargetAddress", "127.0.0.1:3260,1")]
    s = scsi_task(scsi.cdb_test_unit_ready())
    p.run(s)
    assert p.seen[-1].opcode == Op.REJECT  # no SCSI in a discovery session


def test_write_buffering_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import iscsi.session as sess

    monkeypatch.setattr(sess, "MAX_WRITE_BUFFERED", 4096)
    p = Pair(tmp_path, initial_r2t=True, immediate_data=False)
    first = scsi_task(scsi.cdb_write(0, 8), data=bytes(4096))
    p.to_target.feed(b"".join(p.submit(first)))
    p.ts.receive(p.to_target.next())
    p.ts.out.clear()
    second = p.run(scsi_task(scsi.cdb_write(8, 8), data=bytes(4096)))
    assert second.result.status == Status.TASK_SET_FULL


def test_data_in_sequences_respect_max_burst_length(tmp_path: Path) -> None:
    p = Pair(tmp_path, max_burst_length=4096, max_recv_data_segment_length=3000)
    data = os.urandom(12288)
    p.lun.execute(scsi.cdb_write(0, 24), data)
    r = p.run(scsi_task(scsi.cdb_read(0, 24), read_len=len(data)))
    assert r.result.data == data
    data_in = [x for x in p.seen if x.opcode == Op.DATA_IN]
    assert [len(x.data) for x in data_in] == [3000, 1096] * 3  # never across a burst boundary
    assert [bool(x.flags & 0x80) for x in data_in] == [False, True] * 3  # F ends every sequence
    assert [x.u32(40) for x in data_in] == [0, 3000, 4096, 7096, 8192, 11192]


def test_reserve6_conflicts_for_other_nexus_and_is_released(tmp_path: Path) -> None:
    a = Pair(tmp_path)
    other = Pair.__new__(Pair)
    other.__dict__.update(a.__dict__)
    # a second I_T nexus on the same target and LUN
    res = LoginResult("Normal", "iqn.test:other", IQN, b"\x80\x01\x02\x03\x04\x05", 2, 0, a.ts.params, cmd_sn=1, stat_sn=1)
    other.ts = TargetSession(a.core, res, window=8)
    other.ic = InitiatorConnection(SessionParams(), cmd_sn=1, exp_stat_sn=1, exp_cmd_sn=1, max_cmd_sn=8)
    other.to_target, other.to_initiator, other.seen = PduReader(), PduReader(), []
    a.core.sessions.update({a.ts, other.ts})

    def status(p: Pair, cdb: bytes, read_len: int = 0) -> int:
        return p.run(scsi_task(cdb, read_len=read_len)).result.status

    reserve, release = bytes((0x16, 0, 0, 0, 0, 0)), bytes((0x17, 0, 0, 0, 0, 0))
    assert status(a, reserve) == Status.GOOD
    assert status(other, reserve) == Status.RESERVATION_CONFLICT
    assert status(other, scsi.cdb_read(0, 1), 512) == Status.RESERVATION_CONFLICT
    assert status(other, scsi.cdb_inquiry(96), 96) == Status.GOOD  # exempt
    assert status(other, release) == Status.GOOD and a.lun.reservations.spc2_holder == a.ts.nexus  # a no-op
    assert status(a, scsi.cdb_read(0, 1), 512) == Status.GOOD
    a.ts.close()  # I_T nexus loss releases it
    assert status(other, reserve) == Status.GOOD


def fast_and_general(tmp_path: Path, digests: bool) -> list[Pair]:
    """Two target sessions on twin LUNs: one that may only take the fast path, one never."""
    pairs = []
    for fast in (True, False):
        (tmp_path / str(fast)).mkdir()
        p = Pair(tmp_path / str(fast), header_digest=digests, data_digest=digests)
        if fast:
            def general(pdu: Pdu) -> None:
                raise AssertionError("the general path was taken")

            p.ts.dispatch[Op.SCSI_CMD] = general
        else:
            p.ts._fast = lambda bhs, data: False  # type: ignore[method-assign]
        pairs.append(p)
    return pairs


@pytest.mark.parametrize("digests", [False, True])
def test_read_fast_path_is_byte_identical_to_the_general_path(tmp_path: Path, digests: bool) -> None:
    outputs = []
    for p in fast_and_general(tmp_path, digests):
        p.lun.execute(scsi.cdb_write(0, 64), bytes(range(256)) * 128)
        read16 = struct.pack(">BBQIBB", 0x88, 0, 8, 8, 0, 0)
        for cdb, n in ((scsi.cdb_read(0, 8), 4096), (read16, 4096), (scsi.cdb_read(3, 1), 512)):
            p.run(scsi_task(cdb, read_len=n))
        outputs.append([bytes(x.bhs) + x.data for x in p.seen])
        assert p.ts.stats["commands"] == 3
    assert outputs[0] == outputs[1]


@pytest.mark.parametrize("digests", [False, True])
def test_write_and_sync_fast_paths_are_byte_identical_to_the_general_path(tmp_path: Path, digests: bool) -> None:
    outputs, files, synced = [], [], []
    write16 = struct.pack(">BBQIBB", 0x8A, 0x08, 40, 8, 0, 0)  # FUA
    sync16 = struct.pack(">BBQIBB", 0x91, 0, 0, 16, 0, 0)
    commands = ((scsi.cdb_write(0, 8), b"a" * 4096), (write16, b"b" * 4096), (scsi.cdb_write(9, 1, fua=True), b"c" * 512),
                (scsi.cdb_synchronize_cache(0, 8), None), (sync16, None))
    for p in fast_and_general(tmp_path, digests):
        for cdb, data in commands:
            p.run(scsi_task(cdb, data=data))
            synced.append(bool(p.ts.sync_luns))
            p.ts.sync_luns.clear()
        outputs.append([bytes(x.bhs) + x.data for x in p.seen])
        files.append(p.lun.path.read_bytes())
        assert p.ts.stats["commands"] == 5
    assert outputs[0] == outputs[1] and files[0] == files[1]
    assert synced == [False, True, True, True, True] * 2  # FUA and SYNCHRONIZE CACHE wait for an fsync


def _tmf(p: Pair, function: int, rtt: int = RESERVED_TAG, ref_cmd_sn: int = 0) -> int:
    t = p.run(Task(TaskKind.TMF, immediate=True, tmf=(function, rtt, ref_cmd_sn)))
    return t.response  # type: ignore[return-value]


@pytest.mark.parametrize("function", [TmfFunction.ABORT_TASK, TmfFunction.ABORT_TASK_SET, TmfFunction.LOGICAL_UNIT_RESET, TmfFunction.TARGET_WARM_RESET])
def test_aborting_a_queued_command_keeps_the_cmdsn_sequence(pair: Pair, function: int) -> None:
    lost = scsi_task(scsi.cdb_test_unit_ready())
    late = pair.submit(lost)  # CmdSN 1: held back, as if delayed on the wire
    queued = scsi_task(scsi.cdb_test_unit_ready())
    pair.send(pair.submit(queued))  # CmdSN 2 waits for 1
    assert list(pair.ts.pending) == [queued.cmd_sn]
    assert _tmf(pair, function, queued.itt, queued.cmd_sn) == TmfResponse.FUNCTION_COMPLETE
    assert queued.result is None  # aborted: never answered
    pair.send(late)
    assert lost.result.status == Status.GOOD and pair.ts.exp_cmd_sn == queued.cmd_sn + 1
    after = pair.run(scsi_task(scsi.cdb_test_unit_ready()))  # CmdSN 3 is served
    assert after.result is not None and after.result.status == Status.GOOD
    assert not pair.ts.pending and queued.result is None


def test_logout_with_a_queued_command_leaves_no_hole(pair: Pair) -> None:
    late = pair.submit(scsi_task(scsi.cdb_test_unit_ready()))
    queued = scsi_task(scsi.cdb_test_unit_ready())
    pair.send(pair.submit(queued))
    pair.ts.abort_tasks(None)  # what Logout and I_T nexus loss do
    assert pair.ts.pending == {queued.cmd_sn: None}
    pair.send(late)
    assert pair.ts.exp_cmd_sn == queued.cmd_sn + 1 and not pair.ts.pending and queued.result is None


def test_abort_task_of_a_never_received_command_counts_its_cmdsn(pair: Pair) -> None:
    lost = scsi_task(scsi.cdb_test_unit_ready())
    late = pair.submit(lost)  # CmdSN 1, lost on the way (RFC 7143 §11.5.1 case b)
    assert _tmf(pair, TmfFunction.ABORT_TASK, lost.itt, lost.cmd_sn) == TmfResponse.FUNCTION_COMPLETE
    assert pair.ts.exp_cmd_sn == lost.cmd_sn + 1 and not pair.ts.pending
    nxt = pair.run(scsi_task(scsi.cdb_test_unit_ready()))
    assert nxt.result is not None and nxt.result.status == Status.GOOD
    n = len(pair.seen)
    pair.send(late)  # arrives after all: below ExpCmdSN, ignored
    assert len(pair.seen) == n and lost.result is None


def test_abort_task_of_a_lost_command_behind_another_gap(pair: Pair) -> None:
    first = pair.submit(scsi_task(scsi.cdb_test_unit_ready()))  # CmdSN 1, delayed
    lost = scsi_task(scsi.cdb_test_unit_ready())
    pair.submit(lost)  # CmdSN 2, lost
    third = scsi_task(scsi.cdb_test_unit_ready())
    pair.send(pair.submit(third))  # CmdSN 3, queued
    assert _tmf(pair, TmfFunction.ABORT_TASK, lost.itt, lost.cmd_sn) == TmfResponse.FUNCTION_COMPLETE
    assert pair.ts.pending.get(lost.cmd_sn, 0) is None and third.result is None
    pair.send(first)  # the gap fills: 1 runs, 2 is stepped past, 3 runs
    assert third.result is not None and third.result.status == Status.GOOD and pair.ts.exp_cmd_sn == 4


def test_abort_task_answers_task_does_not_exist_outside_the_range(pair: Pair) -> None:
    done = pair.run(scsi_task(scsi.cdb_test_unit_ready()))
    assert done.result is not None
    # (a) received and answered already
    assert _tmf(pair, TmfFunction.ABORT_TASK, done.itt, done.cmd_sn) == TmfResponse.TASK_DOES_NOT_EXIST
    # a RefCmdSN at or beyond the TMF's own CmdSN was never issued before it
    assert _tmf(pair, TmfFunction.ABORT_TASK, 0x1234, pair.ic.cmd_sn) == TmfResponse.TASK_DOES_NOT_EXIST
    assert pair.ts.exp_cmd_sn == pair.ic.cmd_sn and not pair.ts.pending


def _feed_target(p: Pair, blob: bytes) -> list[Pdu]:
    """Bytes into the target as the trio driver does (digest errors included); PDUs it sent back."""
    from iscsi.pdu import DataDigestError

    p.to_target.feed(blob)
    while True:
        try:
            x = p.to_target.next()
        except DataDigestError as e:
            p.ts.data_digest_error(e.pdu)
            continue
        if x is None:
            break
        p.ts.receive(x)
    out = b"".join(p.ts.out)
    p.ts.out.clear()
    p.to_initiator.feed(out)
    got = []
    while (x := p.to_initiator.next()) is not None:
        got.append(x)
        p.ic.receive(x)
    return got


def _data_out_dd(itt: int, ttt: int, data_sn: int, offset: int, data: bytes, final: bool, corrupt: bool) -> bytes:
    pdu = Pdu.new(Op.DATA_OUT, 0x80 if final else 0, itt=itt, data=data)
    pdu.set_u32(20, ttt).set_u32(36, data_sn).set_u32(40, offset)
    raw = bytearray(pdu.encode(data_digest=True))
    if corrupt:
        raw[-1] ^= 0xFF
    return bytes(raw)


@pytest.mark.parametrize("bad", [0, 1])  # which Data-Out of two has the digest error: 1 is the final one
def test_data_digest_error_on_data_out_fails_the_write(tmp_path: Path, bad: int) -> None:
    p = Pair(tmp_path, initial_r2t=True, immediate_data=False, data_digest=True)
    w = scsi_task(scsi.cdb_write(0, 2), data=os.urandom(1024))
    (r2t,) = _feed_target(p, b"".join(p.submit(w)))
    assert r2t.opcode == Op.R2T
    ttt = r2t.u32(20)
    got = _feed_target(p, b"".join(_data_out_dd(w.itt, ttt, i, 512 * i, w.data_out[512 * i : 512 * (i + 1)], i == 1, i == bad) for i in range(2)))
    assert [x.opcode for x in got] == [Op.REJECT, Op.SCSI_RSP] and got[0].bhs[2] == 0x02  # DATA DIGEST ERROR
    assert w.result is not None and w.result.status == Status.CHECK_CONDITION
    assert (w.result.sense.key, w.result.sense.asc, w.result.sense.ascq) == (SenseKey.ABORTED_COMMAND, 0x47, 0x05)
    assert not p.ts.writes and p.ts.write_buffered == 0 and p.core.write_buffered == 0
    assert p.lun.execute(scsi.cdb_read(0, 2)).data == bytes(1024)  # nothing written


def test_queued_immediate_data_counts_against_the_write_limits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import iscsi.session as sess

    monkeypatch.setattr(sess, "MAX_WRITE_BUFFERED", 4096)
    p = Pair(tmp_path)  # ImmediateData=Yes: each write below carries its 2048 bytes with it
    late = p.submit(scsi_task(scsi.cdb_test_unit_ready()))  # CmdSN 1 held back: the rest queue
    writes = [scsi_task(scsi.cdb_write(4 * i, 4), data=bytes([i + 1]) * 2048) for i in range(3)]
    for w in writes:
        p.send(p.submit(w))
    assert len(p.ts.pending) == 3
    assert p.ts.write_buffered == p.core.write_buffered == 4096
    assert writes[2].result is not None and writes[2].result.status == Status.TASK_SET_FULL
    assert writes[0].result is None and writes[1].result is None
    assert _tmf(p, TmfFunction.ABORT_TASK, writes[1].itt, writes[1].cmd_sn) == TmfResponse.FUNCTION_COMPLETE
    assert p.ts.write_buffered == p.core.write_buffered == 2048  # released on abort
    p.send(late)
    assert writes[0].result is not None and writes[0].result.status == Status.GOOD and writes[1].result is None
    assert p.ts.write_buffered == p.core.write_buffered == 0 and not p.ts.pending  # released on drain
    assert p.lun.execute(scsi.cdb_read(0, 12)).data == b"\x01" * 2048 + bytes(4096)


def test_queued_immediate_data_is_released_when_the_session_closes(tmp_path: Path) -> None:
    p = Pair(tmp_path)
    p.submit(scsi_task(scsi.cdb_test_unit_ready()))  # never delivered
    p.send(p.submit(scsi_task(scsi.cdb_write(0, 8), data=bytes(4096))))
    assert p.core.write_buffered == 4096
    p.ts.close()
    assert p.ts.write_buffered == p.core.write_buffered == 0


def test_immediate_data_when_immediatedata_no_is_rejected(tmp_path: Path) -> None:
    p = Pair(tmp_path, immediate_data=False)
    p.ic.params.immediate_data = True  # an initiator that ignores the negotiated ImmediateData=No
    w = p.run(scsi_task(scsi.cdb_write(0, 1), data=b"\xAA" * 512))
    assert p.seen[-1].opcode == Op.REJECT and p.seen[-1].bhs[2] == 0x04  # PROTOCOL ERROR
    assert isinstance(w.error, Exception) and w.result is None
    assert p.lun.execute(scsi.cdb_read(0, 1)).data == bytes(512)  # not executed
    r = p.run(scsi_task(scsi.cdb_read(0, 1), read_len=512))  # no CmdSN hole left behind
    assert r.result is not None and r.result.status == Status.GOOD


def test_immediate_data_beyond_first_burst_length_is_rejected_not_cut(tmp_path: Path) -> None:
    p = Pair(tmp_path, first_burst_length=4096, max_recv_data_segment_length=8192)
    p.ic.params.first_burst_length = 8192  # sends 8192 bytes with the command
    w = p.run(scsi_task(scsi.cdb_write(0, 16), data=b"\xBB" * 8192))
    assert p.seen[-1].opcode == Op.REJECT and w.result is None
    assert not [x for x in p.seen if x.opcode == Op.R2T] and not p.ts.writes
    assert p.lun.execute(scsi.cdb_read(0, 16)).data == bytes(8192)


def test_f_clear_with_the_first_burst_already_in_immediate_data_advances(tmp_path: Path) -> None:
    p = Pair(tmp_path, initial_r2t=False, first_burst_length=2048, max_recv_data_segment_length=8192)
    data = os.urandom(4096)
    w = scsi_task(scsi.cdb_write(0, 8), data=data)
    out = p.submit(w)  # BHS, then 2048 bytes of immediate data (all of FirstBurstLength)
    bhs = bytearray(out[0])
    assert len(out[1]) == 2048 and bhs[1] & 0x80
    bhs[1] &= 0x7F  # F clear: "unsolicited Data-Out follows", though none may
    p.send([bytes(bhs), *out[1:]])
    r2ts = [x for x in p.seen if x.opcode == Op.R2T]
    assert [x.u32(40) for x in r2ts] == [2048]  # the rest is solicited at once
    assert w.result is not None and w.result.status == Status.GOOD
    assert p.lun.execute(scsi.cdb_read(0, 8)).data == data


def test_text_request_that_is_not_utf8_is_rejected(pair: Pair) -> None:
    t = Task(TaskKind.TEXT)
    t.payload = b"SendTargets=\xff\0"
    pair.run(t)
    assert pair.seen[-1].opcode == Op.REJECT and pair.seen[-1].bhs[2] == 0x04


def _text(p: Pair, pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    t = Task(TaskKind.TEXT)
    t.payload = encode_text(pairs)
    p.run(t)
    assert p.seen[-1].opcode == Op.TEXT_RSP and p.seen[-1].flags == 0x80
    return parse_text(t.response)  # type: ignore[arg-type]


def test_text_in_full_feature_phase_redeclares_mrdsl_and_refuses_login_keys(pair: Pair) -> None:
    answers = _text(pair, [("MaxRecvDataSegmentLength", "1024"), ("HeaderDigest", "CRC32C"), ("MaxBurstLength", "4096"),
                           ("InitiatorAlias", "box"), ("CHAP_A", "5"), ("X-Vendor", "1")])
    assert answers == [("MaxRecvDataSegmentLength", "8192"), ("HeaderDigest", "Irrelevant"), ("MaxBurstLength", "Irrelevant"),
                       ("CHAP_A", "Irrelevant"), ("X-Vendor", "NotUnderstood")]
    assert not pair.ts.params.header_digest and pair.ts.params.max_burst_length == 262144  # unchanged
    data = os.urandom(4096)
    pair.lun.execute(scsi.cdb_write(0, 8), data)
    pair.seen.clear()
    r = pair.run(scsi_task(scsi.cdb_read(0, 8), read_len=4096))
    assert r.result.data == data
    assert [len(x.data) for x in pair.seen if x.opcode == Op.DATA_IN] == [1024] * 4  # the new limit
    assert _text(pair, [("MaxRecvDataSegmentLength", "100")]) == [("MaxRecvDataSegmentLength", "Reject")]
    assert pair.ts.mrdsl == 1024  # a bad declaration changes nothing
