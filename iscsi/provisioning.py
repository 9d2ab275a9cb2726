"""Thin provisioning on a sparse backing file (SBC-3 §4.7): unmapping punches holes, and the
holes are what GET LBA STATUS reports as deallocated.

An LBA is deallocated when its whole byte range lies in a hole of the file; it reads as zeros
(LBPRZ). A filesystem that cannot punch holes gets zeros written instead: the LBAs still read as
zeros, they are just not given back to the filesystem.
"""

from __future__ import annotations

import errno
import os

from .libc import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, fallocate

MAPPED, DEALLOCATED = 0, 1  # PROVISIONING STATUS of an LBA status descriptor
_ZEROS = bytes(1 << 20)


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Deallocate [offset, offset+length) of the file; it reads as zeros afterwards."""
    if length <= 0:
        return
    try:
        fallocate(fd, FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, offset, length)
        return
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
            raise
    end = offset + length
    while offset < end:  # no holes here: zeros keep LBPRZ true
        n = min(len(_ZEROS), end - offset)
        os.pwrite(fd, _ZEROS[:n], offset)
        offset += n


def _seek(fd: int, offset: int, whence: int, end: int) -> int:
    try:
        return min(os.lseek(fd, offset, whence), end)
    except OSError as e:
        if e.errno == errno.ENXIO:  # no data after offset: a hole to the end
            return end
        raise


def lba_status(fd: int, start: int, nblocks: int, block_size: int, max_descriptors: int) -> list[tuple[int, int, int]]:
    """(LBA, number of LBAs, provisioning status) extents from `start` towards the end of the LU,
    at most `max_descriptors` of them, each at most 2**32 - 1 LBAs long."""
    out: list[tuple[int, int, int]] = []
    end = nblocks * block_size
    lba = start
    while lba < nblocks and len(out) < max_descriptors:
        pos = lba * block_size
        data = _seek(fd, pos, os.SEEK_DATA, end)
        if data // block_size > lba:  # whole LBAs in a hole
            stop = data // block_size
            status = DEALLOCATED
        else:  # LBA `lba` holds data (maybe only part of it): mapped up to the next hole
            hole = _seek(fd, max(data, pos), os.SEEK_HOLE, end)
            stop = -(-hole // block_size)
            status = MAPPED
        stop = min(stop, nblocks, lba + 0xFFFFFFFF)
        if out and out[-1][2] == status and out[-1][0] + out[-1][1] == lba and out[-1][1] + stop - lba <= 0xFFFFFFFF:
            first, count, _ = out.pop()
            out.append((first, count + stop - lba, status))
        else:
            out.append((lba, stop - lba, status))
        lba = stop
    return out
