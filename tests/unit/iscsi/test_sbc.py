"""The disk LU's SPC-4/SBC-3 features, sans-IO: persistent reservations, unit attentions, thin
provisioning, ORWRITE, the SWP bit, EXTENDED COPY."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from iscsi import scsi
from iscsi.lun import DiskLun
from iscsi.nexus import Nexus
from iscsi.reservations import PrType
from iscsi.sense import Sense, SenseKey, Status
from iscsi.session import TargetCore

A = Nexus("iqn.2024-01.test:a", bytes.fromhex("800000000001"))
B = Nexus("iqn.2024-01.test:b", bytes.fromhex("800000000002"))
C = Nexus("iqn.2024-01.test:c", bytes.fromhex("800000000003"))
OBSERVER = Nexus("iqn.2024-01.test:observer", bytes.fromhex("800000000004"))  # never registers
READ = scsi.cdb_read(0, 1)
WRITE = scsi.cdb_write(0, 1)
BLOCK = bytes(512)


@pytest.fixture
def lun(tmp_path: Path) -> Iterator[DiskLun]:
    d = DiskLun(tmp_path / "disk.img", size=1 << 20)
    yield d
    d.close()


@pytest.fixture
def thin(tmp_path: Path) -> Iterator[DiskLun]:
    d = DiskLun(tmp_path / "thin.img", size=4 << 20, thin=True)
    yield d
    d.close()


def sense_of(res) -> tuple[int, int, int]:
    assert res.status == Status.CHECK_CONDITION and res.sense is not None, res
    s = Sense.parse(res.sense.fixed())
    assert s is not None
    return s.key, s.asc, s.ascq


def run(lun: DiskLun, nexus: Nexus, cdb: bytes, data: bytes = b""):
    """What the session does with a command: admit it (UNIT ATTENTION, RESERVATION CONFLICT),
    then execute it."""
    early = lun.admit(nexus, cdb)
    return early if early is not None else lun.execute(cdb, data, nexus)


# --- persistent reservations ----------------------------------------------------------------------


def prout(lun: DiskLun, nexus: Nexus, sa: int, key: int = 0, sa_key: int = 0, pr_type: int = 0, flags: int = 0):
    cdb = struct.pack(">BBBxxIB", 0x5F, sa, pr_type, 24, 0)
    params = struct.pack(">QQxxxxBxxx", key, sa_key, flags)
    return run(lun, nexus, cdb, params)


def prin(lun: DiskLun, nexus: Nexus, sa: int, alloc: int = 8192) -> bytes:
    res = run(lun, nexus, struct.pack(">BBxxxxxHB", 0x5E, sa, alloc, 0))
    assert res.status == Status.GOOD, res
    return bytes(res.data)


def keys(lun: DiskLun) -> tuple[int, list[int]]:
    data = prin(lun, OBSERVER, 0)
    gen, length = struct.unpack_from(">II", data)
    return gen, [struct.unpack_from(">Q", data, 8 + i)[0] for i in range(0, length, 8)]


def status(res) -> int:
    return res.status


REGISTER, RESERVE, RELEASE, CLEAR, PREEMPT, PREEMPT_AND_ABORT, REGISTER_AND_IGNORE = 0, 1, 2, 3, 4, 5, 6


def test_register_rules_and_generation(lun: DiskLun) -> None:
    assert keys(lun) == (0, [])
    assert status(prout(lun, A, REGISTER, key=5, sa_key=1)) == Status.RESERVATION_CONFLICT  # not registered: key must be 0
    assert status(prout(lun, A, REGISTER, sa_key=0x11)) == Status.GOOD
    assert status(prout(lun, B, REGISTER_AND_IGNORE, key=99, sa_key=0x22)) == Status.GOOD
    assert keys(lun) == (2, [0x11, 0x22])
    assert status(prout(lun, A, REGISTER, key=0x12, sa_key=0x13)) == Status.RESERVATION_CONFLICT  # wrong key
    assert status(prout(lun, A, REGISTER, key=0x11, sa_key=0x13)) == Status.GOOD  # key changed
    assert status(prout(lun, A, REGISTER, key=0x13, sa_key=0)) == Status.GOOD  # unregistered
    assert keys(lun) == (4, [0x22])
    assert status(prout(lun, C, REGISTER, sa_key=0)) == Status.GOOD and keys(lun)[0] == 4  # a no-op
    # APTPL, ALL_TG_PT and SPEC_I_PT are not offered; a wrong PARAMETER LIST LENGTH is an error
    for flags in (0x01, 0x04, 0x08):
        assert sense_of(prout(lun, C, REGISTER, sa_key=7, flags=flags)) == (SenseKey.ILLEGAL_REQUEST, 0x26, 0x00)
    short = run(lun, C, struct.pack(">BBBxxIB", 0x5F, 0, 0, 16, 0), bytes(16))
    assert sense_of(short) == (SenseKey.ILLEGAL_REQUEST, 0x1A, 0x00)


# Per type: can a registered non-holder read, write; can an unregistered one read, write
ACCESS = {
    PrType.WRITE_EXCLUSIVE: (True, False, True, False),
    PrType.EXCLUSIVE_ACCESS: (False, False, False, False),
    PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY: (True, True, True, False),
    PrType.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY: (True, True, False, False),
    PrType.WRITE_EXCLUSIVE_ALL_REGISTRANTS: (True, True, True, False),
    PrType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS: (True, True, False, False),
}


@pytest.mark.parametrize("pr_type", list(PrType))
def test_reservation_conflicts_follow_the_type(lun: DiskLun, pr_type: PrType) -> None:
    prout(lun, A, REGISTER, sa_key=1)
    prout(lun, B, REGISTER, sa_key=2)
    assert status(prout(lun, A, RESERVE, key=1, pr_type=pr_type)) == Status.GOOD
    data = prin(lun, C, 1)  # READ RESERVATION, from anyone
    all_registrants = pr_type in (PrType.WRITE_EXCLUSIVE_ALL_REGISTRANTS, PrType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS)
    assert struct.unpack_from(">IQ", data, 4) == (16, 0 if all_registrants else 1) and data[21] == pr_type
    assert status(run(lun, A, READ)) == status(run(lun, A, WRITE, BLOCK)) == Status.GOOD  # the holder
    reg_read, reg_write, unreg_read, unreg_write = ACCESS[pr_type]
    ok = {True: Status.GOOD, False: Status.RESERVATION_CONFLICT}
    assert status(run(lun, B, READ)) == ok[reg_read]
    assert status(run(lun, B, WRITE, BLOCK)) == ok[reg_write]
    assert status(run(lun, C, READ)) == ok[unreg_read]
    assert status(run(lun, C, WRITE, BLOCK)) == ok[unreg_write]
    for cdb in (scsi.cdb_inquiry(96), scsi.cdb_test_unit_ready(), scsi.cdb_read_capacity16(32), scsi.cdb_report_luns(64)):
        assert status(run(lun, C, cdb)) == Status.GOOD  # always allowed
    # another type from the holder, or any reservation from someone else: conflict
    assert status(prout(lun, B, RESERVE, key=2, pr_type=pr_type)) == (Status.GOOD if all_registrants else Status.RESERVATION_CONFLICT)
    other = PrType.EXCLUSIVE_ACCESS if pr_type != PrType.EXCLUSIVE_ACCESS else PrType.WRITE_EXCLUSIVE
    assert status(prout(lun, A, RESERVE, key=1, pr_type=other)) == Status.RESERVATION_CONFLICT
    # a release of the wrong type is refused; of the right type it works
    assert sense_of(prout(lun, A, RELEASE, key=1, pr_type=other)) == (SenseKey.ILLEGAL_REQUEST, 0x26, 0x04)
    assert status(prout(lun, A, RELEASE, key=1, pr_type=pr_type)) == Status.GOOD
    assert prin(lun, A, 1)[4:8] == bytes(4)  # not reserved
    if pr_type in (PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY, PrType.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY) or all_registrants:
        assert sense_of(run(lun, B, READ)) == (SenseKey.UNIT_ATTENTION, 0x2A, 0x04)  # RESERVATIONS RELEASED
    assert status(run(lun, C, WRITE, BLOCK)) == Status.GOOD


def test_holder_unregistering_releases_but_all_registrants_stay(lun: DiskLun) -> None:
    prout(lun, A, REGISTER, sa_key=1)
    prout(lun, B, REGISTER, sa_key=2)
    prout(lun, A, RESERVE, key=1, pr_type=PrType.EXCLUSIVE_ACCESS)
    prout(lun, A, REGISTER, key=1, sa_key=0)
    assert lun.reservations.reservation is None
    prout(lun, A, REGISTER, sa_key=1)
    prout(lun, A, RESERVE, key=1, pr_type=PrType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS)
    prout(lun, A, REGISTER, key=1, sa_key=0)
    assert lun.reservations.reservation is not None and status(run(lun, B, WRITE, BLOCK)) == Status.GOOD
    prout(lun, B, REGISTER, key=2, sa_key=0)  # the last registrant leaves: nothing is reserved
    assert lun.reservations.reservation is None


def test_preempt_clear_and_their_unit_attentions(lun: DiskLun) -> None:
    prout(lun, A, REGISTER, sa_key=1)
    prout(lun, B, REGISTER, sa_key=2)
    gen = keys(lun)[0]
    # no reservation: PREEMPT removes the registrations with that key
    assert status(prout(lun, B, PREEMPT, key=2, sa_key=1, pr_type=PrType.EXCLUSIVE_ACCESS)) == Status.GOOD
    assert keys(lun) == (gen + 1, [2])
    assert sense_of(run(lun, A, READ)) == (SenseKey.UNIT_ATTENTION, 0x2A, 0x05)  # REGISTRATIONS PREEMPTED
    assert status(prout(lun, A, RESERVE, key=1, pr_type=PrType.EXCLUSIVE_ACCESS)) == Status.RESERVATION_CONFLICT
    assert status(prout(lun, B, PREEMPT, key=2, sa_key=7, pr_type=PrType.EXCLUSIVE_ACCESS)) == Status.RESERVATION_CONFLICT
    assert sense_of(prout(lun, B, PREEMPT, key=2, sa_key=0, pr_type=PrType.EXCLUSIVE_ACCESS))[:2] == (SenseKey.ILLEGAL_REQUEST, 0x26)
    # the holder's key: B takes A's reservation over, with its own type
    prout(lun, A, REGISTER, sa_key=1)
    prout(lun, A, RESERVE, key=1, pr_type=PrType.WRITE_EXCLUSIVE)
    assert status(prout(lun, B, PREEMPT_AND_ABORT, key=2, sa_key=1, pr_type=PrType.EXCLUSIVE_ACCESS)) == Status.GOOD
    r = lun.reservations.reservation
    assert r is not None and r.holder == B and r.type == PrType.EXCLUSIVE_ACCESS and keys(lun)[1] == [2]
    # CLEAR: every registration and the reservation go; the others hear RESERVATIONS PREEMPTED
    prout(lun, C, REGISTER, sa_key=3)
    assert status(prout(lun, B, CLEAR, key=2)) == Status.GOOD
    assert keys(lun)[1] == [] and lun.reservations.reservation is None
    assert sense_of(run(lun, C, scsi.cdb_test_unit_ready())) == (SenseKey.UNIT_ATTENTION, 0x2A, 0x03)


def test_report_capabilities_and_read_full_status(lun: DiskLun) -> None:
    caps = prin(lun, A, 2)
    length, flags1, flags2, mask = struct.unpack_from(">HBBH", caps)
    assert length == 8 and flags2 & 0x80 and mask == 0xEA01  # TMV; every type
    prout(lun, A, REGISTER, sa_key=0xAA)
    prout(lun, A, RESERVE, key=0xAA, pr_type=PrType.WRITE_EXCLUSIVE)
    full = prin(lun, B, 3)
    gen, length = struct.unpack_from(">II", full)
    key, holder, scope_type, tid_len = struct.unpack_from(">QxxxxBBxxxxxxI", full, 8)
    assert (key, holder, scope_type) == (0xAA, 0x01, PrType.WRITE_EXCLUSIVE)
    assert full[32 + 4 : 32 + tid_len].rstrip(b"\0") == b"iqn.2024-01.test:a,i,0x800000000001"
    truncated = prin(lun, B, 0, alloc=8)  # READ KEYS into 8 bytes: the length still tells all
    assert len(truncated) == 8 and struct.unpack_from(">I", truncated, 4)[0] == 8
    for sa in range(4, 0x20):
        res = run(lun, A, struct.pack(">BBxxxxxHB", 0x5E, sa, 64, 0))
        assert sense_of(res) == (SenseKey.ILLEGAL_REQUEST, 0x24, 0x00)


def test_registrations_outlive_a_session_and_resets(tmp_path: Path) -> None:
    lun = DiskLun(tmp_path / "d.img", size=1 << 20)
    core = TargetCore("iqn.2024-01.test:t", {0: lun})
    prout(lun, A, REGISTER, sa_key=1)
    prout(lun, A, RESERVE, key=1, pr_type=PrType.EXCLUSIVE_ACCESS)
    assert status(run(lun, A, bytes((0x16, 0, 0, 0, 0, 0)))) == Status.RESERVATION_CONFLICT  # RESERVE(6) under PR
    lun.nexus_lost(A)  # the session ends; the registration and the reservation are the nexus's, and stay
    lun.reset((0x29, 0x03))
    r = lun.reservations.reservation
    assert r is not None and r.holder == A and status(run(lun, B, READ)) == Status.RESERVATION_CONFLICT
    lun.close()
    assert core.luns[0] is lun


# --- unit attentions and resets ----------------------------------------------------------------------


def test_unit_attention_is_reported_once_and_inquiry_does_not_clear_it(lun: DiskLun) -> None:
    lun.logged_in = lambda: (A, B)
    lun.reset((0x29, 0x03))
    assert status(run(lun, A, scsi.cdb_inquiry(96))) == Status.GOOD  # INQUIRY neither reports nor clears
    assert sense_of(run(lun, A, READ)) == (SenseKey.UNIT_ATTENTION, 0x29, 0x03)
    assert status(run(lun, A, READ)) == Status.GOOD
    rs = run(lun, B, bytes((0x03, 0, 0, 0, 18, 0)))  # REQUEST SENSE reports it as data, and clears it
    assert Sense.parse(bytes(rs.data)) == Sense(SenseKey.UNIT_ATTENTION, 0x29, 0x03)
    assert status(run(lun, B, READ)) == Status.GOOD


def test_resets_reach_every_session_and_release_reserve6(tmp_path: Path) -> None:
    from iscsi.login import LoginResult
    from iscsi.keys import SessionParams
    from iscsi.session import TargetSession

    luns = {0: DiskLun(tmp_path / "0.img", size=1 << 20), 1: DiskLun(tmp_path / "1.img", size=1 << 20)}
    core = TargetCore("iqn.2024-01.test:t", luns)
    sessions = []
    for nexus in (A, B):
        s = TargetSession(core, LoginResult("Normal", nexus.initiator_name, core.target_name, nexus.isid, 1, 0,
                                            SessionParams(), cmd_sn=1, stat_sn=1))
        core.sessions.add(s)
        sessions.append(s)
    assert status(run(luns[0], A, bytes((0x16, 0, 0, 0, 0, 0)))) == Status.GOOD  # RESERVE(6)
    core.lun_reset(0, sessions[0])
    assert luns[0].reservations.spc2_holder is None
    for nexus in (A, B):  # the sender's own nexus too
        assert sense_of(run(luns[0], nexus, READ)) == (SenseKey.UNIT_ATTENTION, 0x29, 0x03)
        assert status(run(luns[1], nexus, READ)) == Status.GOOD  # the other LU was not reset
    core.target_warm_reset(sessions[1])
    for lun in luns.values():
        for nexus in (A, B):
            assert sense_of(run(lun, nexus, READ)) == (SenseKey.UNIT_ATTENTION, 0x29, 0x02)
    for lun in luns.values():
        lun.close()


# --- thin provisioning ----------------------------------------------------------------------------


def lba_status(lun: DiskLun, lba: int) -> list[tuple[int, int, int]]:
    res = run(lun, A, struct.pack(">BBQIBB", 0x9E, 0x12, lba, 4096, 0, 0))
    assert res.status == Status.GOOD
    n = (struct.unpack_from(">I", res.data)[0] - 4) // 16
    return [struct.unpack_from(">QIB", res.data, 8 + 16 * i) for i in range(n)]


def unmap(lun: DiskLun, *ranges: tuple[int, int]):
    descs = b"".join(struct.pack(">QIxxxx", lba, n) for lba, n in ranges)
    params = struct.pack(">HHxxxx", 6 + len(descs), len(descs)) + descs
    return run(lun, A, struct.pack(">BBxxxxxHB", 0x42, 0, len(params), 0), params)


def test_unmap_punches_holes_that_read_as_zeros_and_get_lba_status_sees(thin: DiskLun) -> None:
    rc16 = run(thin, A, scsi.cdb_read_capacity16(32)).data
    assert rc16[14] & 0xC0 == 0xC0  # LBPME, LBPRZ
    b2 = run(thin, A, scsi.cdb_inquiry(64, True, 0xB2)).data
    assert b2[5] & 0xE4 == 0xE4 and b2[6] & 0x07 == 2  # LBPU, LBPWS, LBPWS10, LBPRZ; thin
    b0 = run(thin, A, scsi.cdb_inquiry(64, True, 0xB0)).data
    assert struct.unpack_from(">II", b0, 20) == ((64 << 20) // 512, 1024)  # MAXIMUM UNMAP LBA / DESCRIPTOR COUNT
    data = os.urandom(1 << 20)
    assert run(thin, A, scsi.cdb_write(0, 2048), data).status == Status.GOOD
    os.fsync(thin.fd)
    before = os.fstat(thin.fd).st_blocks
    assert lba_status(thin, 0)[0] == (0, 2048, 0)  # mapped
    assert unmap(thin, (8, 1016), (1536, 512)).status == Status.GOOD
    assert os.fstat(thin.fd).st_blocks < before  # given back to the filesystem
    assert run(thin, A, scsi.cdb_read(8, 1016)).data == bytes(1016 * 512)
    assert run(thin, A, scsi.cdb_read(0, 8)).data == data[:4096]  # outside the ranges: untouched
    assert lba_status(thin, 0)[:3] == [(0, 8, 0), (8, 1016, 1), (1024, 512, 0)]
    assert lba_status(thin, 1536)[0] == (1536, 6656, 1)  # to the end of the LU: never written
    assert sense_of(unmap(thin, (thin.nblocks - 1, 2))) == (SenseKey.ILLEGAL_REQUEST, 0x21, 0x00)
    # WRITE SAME with UNMAP unmaps too; with NUMBER OF LOGICAL BLOCKS 0, to the end of the LU
    run(thin, A, scsi.cdb_write(4000, 8), os.urandom(4096))
    ws = struct.pack(">BBIBHB", 0x41, 0x08, 4000, 0, 0, 0)
    assert run(thin, A, ws, b"\xff" * 512).status == Status.GOOD
    assert run(thin, A, scsi.cdb_read(4000, 8)).data == bytes(4096)


def test_fully_provisioned_lu_refuses_unmap_and_reports_everything_mapped(lun: DiskLun) -> None:
    assert sense_of(unmap(lun, (0, 1))) == (SenseKey.ILLEGAL_REQUEST, 0x20, 0x00)
    assert sense_of(run(lun, A, struct.pack(">BBIBHB", 0x41, 0x08, 0, 0, 1, 0), BLOCK)) == (SenseKey.ILLEGAL_REQUEST, 0x24, 0)
    assert lba_status(lun, 5) == [(5, lun.nblocks - 5, 0)]
    assert sense_of(run(lun, A, struct.pack(">BBQIBB", 0x9E, 0x12, lun.nblocks, 64, 0, 0)))[1] == 0x21
    assert run(lun, A, scsi.cdb_read_capacity16(32)).data[14] & 0xC0 == 0


# --- ORWRITE, SWP, EXTENDED COPY ------------------------------------------------------------------


def test_orwrite_ors_into_the_medium(lun: DiskLun) -> None:
    run(lun, A, scsi.cdb_write(3, 1), b"\x0f" * 512)
    orw = struct.pack(">BBQIBB", 0x8B, 0x08, 3, 1, 0, 0)  # FUA
    assert lun.data_out_length(orw) == (512, None)
    res = run(lun, A, orw, b"\xf1" * 512)
    assert res.status == Status.GOOD and res.sync
    assert run(lun, A, scsi.cdb_read(3, 1)).data == b"\xff" * 512
    assert sense_of(lun.data_out_length(struct.pack(">BBQIBB", 0x8B, 0, lun.nblocks, 1, 0, 0))[1])[1] == 0x21


def mode_select_control(lun: DiskLun, nexus: Nexus, swp: bool):
    control = bytearray(run(lun, nexus, bytes((0x1A, 0x08, 0x0A, 0, 255, 0))).data[4:])  # DBD: the page alone
    control[0] &= 0x7F  # PS is reserved in MODE SELECT
    control[4] = (control[4] & ~0x08) | (0x08 if swp else 0)
    params = bytes(4) + bytes(control)
    return run(lun, nexus, bytes((0x15, 0x10, 0, 0, len(params), 0)), params)


def test_swp_write_protects_and_other_nexuses_hear_of_the_change(lun: DiskLun) -> None:
    lun.logged_in = lambda: (A, B)
    changeable = run(lun, A, bytes((0x1A, 0x08, 0x4A, 0, 255, 0))).data
    assert changeable[4 + 4] == 0x08  # only SWP
    assert mode_select_control(lun, A, True).status == Status.GOOD
    assert run(lun, A, bytes((0x1A, 0, 0x3F, 0, 255, 0))).data[2] & 0x80  # WP in the device-specific parameter
    protected = (SenseKey.DATA_PROTECT, 0x27, 0x02)
    assert sense_of(lun.data_out_length(WRITE)[1]) == protected
    assert sense_of(run(lun, A, struct.pack(">BBIBHB", 0x41, 0, 0, 0, 1, 0), BLOCK)) == protected
    assert run(lun, A, READ).status == Status.GOOD  # reading is fine
    assert sense_of(run(lun, B, READ)) == (SenseKey.UNIT_ATTENTION, 0x2A, 0x01)  # MODE PARAMETERS CHANGED
    # a bit that is not changeable may not change
    page = bytearray(run(lun, A, bytes((0x1A, 0x08, 0x0A, 0, 255, 0))).data[4:])
    page[3] ^= 0x10
    res = run(lun, A, bytes((0x15, 0x10, 0, 0, 4 + len(page), 0)), bytes(4) + bytes(page))
    assert sense_of(res) == (SenseKey.ILLEGAL_REQUEST, 0x26, 0x00)
    assert mode_select_control(lun, A, False).status == Status.GOOD
    assert run(lun, A, WRITE, BLOCK).status == Status.GOOD


def test_extended_copy_between_two_luns(tmp_path: Path) -> None:
    luns = {0: DiskLun(tmp_path / "0.img", size=1 << 20), 1: DiskLun(tmp_path / "1.img", size=1 << 20)}
    TargetCore("iqn.2024-01.test:t", luns)
    data = os.urandom(64 * 512)
    run(luns[0], A, scsi.cdb_write(10, 64), data)

    def target(lun: DiskLun) -> bytes:
        naa = lun.identity.naa
        return bytes((0xE4, 0, 0, 0, 1, 3, 0, len(naa))) + naa + bytes(4) + bytes((0, 0, 2, 0))

    segment = struct.pack(">BBHHHxxHQQ", 0x02, 0, 24, 0, 1, 64, 10, 100)
    descs = target(luns[0]) + target(luns[1])
    params = struct.pack(">BBHxxxxII", 7, 0, len(descs), len(segment), 0) + descs + segment
    xcopy = struct.pack(">BBxxxxxxxxIBB", 0x83, 0, len(params), 0, 0)
    assert run(luns[0], A, xcopy, params).status == Status.GOOD
    assert run(luns[1], A, scsi.cdb_read(100, 64)).data == data
    rcr = run(luns[0], A, struct.pack(">BBBxxxxxxxIBB", 0x84, 0, 7, 64, 0, 0))  # COPY STATUS of list 7
    assert struct.unpack_from(">IBHBI", rcr.data) == (8, 0, 1, 0, 64 * 512)
    beyond = params[:-8] + struct.pack(">Q", luns[1].nblocks - 1)
    assert sense_of(run(luns[0], A, xcopy, beyond))[0] == SenseKey.COPY_ABORTED
    for lun in luns.values():
        lun.close()
