"""The two Linux calls the `os` module lacks: fallocate(2) with flags, and fstatfs(2)'s f_type."""

from __future__ import annotations

import ctypes
import ctypes.util
import os

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
# statfs f_type of filesystems that live in memory: an fsync there has nothing to write
TMPFS_MAGIC = 0x01021994
RAMFS_MAGIC = 0x858458F6
MEMORY_FILESYSTEMS = frozenset({TMPFS_MAGIC, RAMFS_MAGIC})

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_fallocate.restype = ctypes.c_int
_fstatfs = _libc.fstatfs
_fstatfs.argtypes = (ctypes.c_int, ctypes.c_void_p)
_fstatfs.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def filesystem_type(fd: int) -> int:
    """The f_type of the filesystem holding `fd` (the first field of struct statfs, a long)."""
    buf = ctypes.create_string_buffer(256)  # larger than struct statfs
    if _fstatfs(fd, buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ctypes.c_ulong.from_buffer(buf).value & 0xFFFFFFFF
