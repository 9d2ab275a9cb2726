"""The file-backed disk LUN: SBC commands and their sense data."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from iscsi import scsi
from iscsi.lun import DiskLun, no_such_lun, report_luns
from iscsi.sense import Sense, SenseKey, Status


@pytest.fixture
def lun(tmp_path: Path) -> DiskLun:
    d = DiskLun(tmp_path / "disk.img", block_size=512, size=1 << 20)
    yield d
    d.close()


def sense_of(res) -> tuple[int, int, int]:
    assert res.status == Status.CHECK_CONDITION and res.sense is not None
    s = Sense.parse(res.sense.fixed())
    return s.key, s.asc, s.ascq


def test_creates_backing_file_of_size(tmp_path: Path) -> None:
    d = DiskLun(tmp_path / "new.img", size=64 << 10)
    assert (tmp_path / "new.img").stat().st_size == 64 << 10 and d.nblocks == 128
    d.close()
    with pytest.raises(ValueError):
        DiskLun(tmp_path / "tiny.img", size=100)


def test_write_read_roundtrip_and_fua_asks_for_fsync(lun: DiskLun) -> None:
    data = os.urandom(4096)
    res = lun.execute(scsi.cdb_write(8, 8), data)
    assert res.status == Status.GOOD and not res.sync
    assert lun.execute(scsi.cdb_write(8, 8, fua=True), data).sync
    assert lun.execute(scsi.cdb_read(8, 8)).data == data
    with open(lun.path, "rb") as f:
        f.seek(8 * 512)
        assert f.read(4096) == data
    assert lun.execute(scsi.cdb_synchronize_cache()).sync
    # 16-byte and 12-byte forms address the same blocks
    assert lun.execute(struct.pack(">BBQIBB", 0x88, 0, 8, 8, 0, 0)).data == data
    assert lun.execute(struct.pack(">BBIIBB", 0xA8, 0, 8, 8, 0, 0)).data == data
    # READ(6): transfer length 0 means 256 blocks
    assert len(lun.execute(bytes((0x08, 0, 0, 0, 0, 0))).data) == 256 * 512


def test_lba_out_of_range(lun: DiskLun) -> None:
    last = lun.nblocks - 1
    assert lun.execute(scsi.cdb_read(last, 1)).status == Status.GOOD
    assert sense_of(lun.execute(scsi.cdb_read(last, 2))) == (SenseKey.ILLEGAL_REQUEST, 0x21, 0x00)
    assert sense_of(lun.data_out_length(scsi.cdb_write(lun.nblocks, 1))[1]) == (SenseKey.ILLEGAL_REQUEST, 0x21, 0x00)
    assert sense_of(lun.execute(scsi.cdb_synchronize_cache(lun.nblocks + 1, 0))) == (SenseKey.ILLEGAL_REQUEST, 0x21, 0x00)


def test_unsupported_opcode_and_bad_fields(lun: DiskLun) -> None:
    assert sense_of(lun.execute(bytes((0xC0,)) + bytes(15))) == (SenseKey.ILLEGAL_REQUEST, 0x20, 0x00)
    assert sense_of(lun.execute(bytes((0x28, 0x20)) + bytes(8))) == (SenseKey.ILLEGAL_REQUEST, 0x24, 0x00)  # RDPROTECT
    assert sense_of(lun.execute(scsi.cdb_inquiry(96, False, 0x80))) == (SenseKey.ILLEGAL_REQUEST, 0x24, 0x00)
    assert sense_of(lun.execute(scsi.cdb_inquiry(96, True, 0x42))) == (SenseKey.ILLEGAL_REQUEST, 0x24, 0x00)


def test_inquiry_and_vpd(lun: DiskLun) -> None:
    std = lun.execute(scsi.cdb_inquiry(255)).data
    assert std[0] == 0 and std[3] & 0x0F == 2 and std[8:16] == b"NETSWAP " and std[4] == len(std) - 5
    assert len(lun.execute(scsi.cdb_inquiry(36)).data) == 36  # allocation length truncates
    pages = lun.execute(scsi.cdb_inquiry(255, True, 0)).data
    assert list(pages[4:]) == [0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2]
    for page in pages[4:]:
        body = lun.execute(scsi.cdb_inquiry(255, True, page)).data
        assert body[1] == page and struct.unpack_from(">H", body, 2)[0] == len(body) - 4
    b0 = lun.execute(scsi.cdb_inquiry(255, True, 0xB0)).data
    assert struct.unpack_from(">I", b0, 8)[0] == (8 << 20) // 512  # MAXIMUM TRANSFER LENGTH


def test_capacity(lun: DiskLun) -> None:
    assert lun.execute(scsi.cdb_read_capacity10()).data == struct.pack(">II", lun.nblocks - 1, 512)
    rc16 = lun.execute(scsi.cdb_read_capacity16(32)).data
    assert struct.unpack_from(">QI", rc16) == (lun.nblocks - 1, 512)


def test_mode_sense(lun: DiskLun) -> None:
    ms6 = lun.execute(bytes((0x1A, 0, 0x3F, 0, 255, 0))).data
    assert ms6[0] == len(ms6) - 1 and ms6[2] & 0x10 and ms6[3] == 8  # DPOFUA, one block descriptor
    caching = lun.execute(bytes((0x1A, 0x08, 0x08, 0, 255, 0))).data
    assert caching[4] == 0x08 and caching[6] & 0x04  # WCE
    ms10 = lun.execute(bytes((0x5A, 0, 0x0A, 0, 0, 0, 0, 0, 255, 0))).data
    assert struct.unpack_from(">H", ms10)[0] == len(ms10) - 2 and ms10[16] == 0x0A
    assert sense_of(lun.execute(bytes((0x1A, 0, 0xFF, 0, 255, 0)))) == (SenseKey.ILLEGAL_REQUEST, 0x39, 0x00)  # saved


def test_verify_bytchk_miscompare(lun: DiskLun) -> None:
    data = os.urandom(1024)
    lun.execute(scsi.cdb_write(4, 2), data)
    cdb = struct.pack(">BBIBHB", 0x2F, 0x02, 4, 0, 2, 0)
    assert lun.data_out_length(cdb) == (1024, None)
    assert lun.execute(cdb, data).status == Status.GOOD
    wrong = bytearray(data)
    wrong[700] ^= 1
    res = lun.execute(cdb, bytes(wrong))
    assert sense_of(res) == (SenseKey.MISCOMPARE, 0x1D, 0x00) and res.sense.information == 700


def test_report_luns_and_missing_lun() -> None:
    data = report_luns([0, 3], scsi.cdb_report_luns(4096)).data
    assert struct.unpack_from(">I", data)[0] == 16 and data[8:16] == bytes(8) and data[17] == 3
    assert no_such_lun(scsi.cdb_inquiry(96), [0]).data[0] == 0x7F
    res = no_such_lun(scsi.cdb_read(0, 1), [0])
    assert sense_of(res) == (SenseKey.ILLEGAL_REQUEST, 0x25, 0x00)


def test_report_supported_opcodes_usage_data(lun: DiskLun) -> None:
    one = lun.execute(struct.pack(">BBBBHIBB", 0xA3, 0x0C, 1, 0x2A, 0, 512, 0, 0)).data
    assert one[1] & 0x07 == 3 and one[4] == 0x2A and one[5] & 0x18 == 0x18  # WRITE(10) uses DPO/FUA
    allops = lun.execute(struct.pack(">BBBBHIBB", 0xA3, 0x0C, 0, 0, 0, 4096, 0, 0)).data
    ops = {allops[4 + i] for i in range(0, struct.unpack_from(">I", allops)[0], 8)}
    assert {0x28, 0x2A, 0x88, 0x8A, 0x35, 0x9E} <= ops


def test_write_same_and_prefetch(lun: DiskLun) -> None:
    block = os.urandom(512)
    ws10 = struct.pack(">BBIBHB", 0x41, 0, 100, 0, 300, 0)
    assert lun.data_out_length(ws10) == (512, None)
    assert lun.execute(ws10, block).status == Status.GOOD
    assert lun.execute(scsi.cdb_read(100, 300)).data == block * 300
    ndob = struct.pack(">BBQIBB", 0x93, 0x01, 100, 10, 0, 0)  # NDOB: zeros, no data-out
    assert lun.data_out_length(ndob) == (0, None) and lun.execute(ndob).status == Status.GOOD
    assert lun.execute(scsi.cdb_read(100, 10)).data == bytes(5120)
    # WSNZ 0: no blocks means "to the end of the LU"
    assert lun.execute(struct.pack(">BBIBHB", 0x41, 0, lun.nblocks - 3, 0, 0, 0), block).status == Status.GOOD
    assert lun.execute(scsi.cdb_read(lun.nblocks - 3, 3)).data == block * 3
    assert sense_of(lun.execute(struct.pack(">BBIBHB", 0x41, 0x08, 0, 0, 1, 0), block)) == (SenseKey.ILLEGAL_REQUEST, 0x24, 0)  # UNMAP
    assert sense_of(lun.execute(struct.pack(">BBIBHB", 0x41, 0, lun.nblocks, 0, 1, 0), block)) == (SenseKey.ILLEGAL_REQUEST, 0x21, 0)
    assert lun.execute(struct.pack(">BBIBHB", 0x34, 0x02, lun.nblocks - 1, 0, 1, 0)).status == Status.GOOD
    assert sense_of(lun.execute(struct.pack(">BBIBHB", 0x34, 0, lun.nblocks, 0, 1, 0))) == (SenseKey.ILLEGAL_REQUEST, 0x21, 0)


def test_compare_and_write(lun: DiskLun) -> None:
    old, new = os.urandom(1024), os.urandom(1024)
    lun.execute(scsi.cdb_write(20, 2), old)
    caw = struct.pack(">BBQxxxBBB", 0x89, 0x08, 20, 2, 0, 0)  # FUA
    assert lun.data_out_length(caw) == (2048, None)
    res = lun.execute(caw, old + new)
    assert res.status == Status.GOOD and res.sync
    assert lun.execute(scsi.cdb_read(20, 2)).data == new
    wrong = bytearray(new)
    wrong[600] ^= 0xFF
    res = lun.execute(caw, bytes(wrong) + old)
    assert sense_of(res) == (SenseKey.MISCOMPARE, 0x1D, 0) and res.sense.information == 600
    assert lun.execute(scsi.cdb_read(20, 2)).data == new  # nothing written on a miscompare
    too_many = struct.pack(">BBQxxxBBB", 0x89, 0, 0, 200, 0, 0)
    assert sense_of(lun.data_out_length(too_many)[1]) == (SenseKey.ILLEGAL_REQUEST, 0x24, 0)
