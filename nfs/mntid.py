"""Which mount an object is on: statx(2)'s STATX_MNT_ID, for knfsd's crossmnt rule.

A bind mount of the export's own filesystem inside the export has the export's device number, so
st_dev cannot tell that an object is on another mount; its mount id can. Python 3.11 has no
os.statx, so it is called through libc. Where statx or its mount id is missing (old kernels),
`mount_id` returns None and the export falls back to comparing devices.
"""

from __future__ import annotations

import ctypes
import os
import struct
from typing import Any

AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
AT_EMPTY_PATH = 0x1000
STATX_MNT_ID = 0x1000
_STATX_SIZE = 256
_MASK_AND_MNT = struct.Struct("=I")  # stx_mask at 0
_MNT_ID_OFFSET = 144  # stx_mnt_id (u64)

_statx: Any
try:
    _libc = ctypes.CDLL(None, use_errno=True)
    _statx = _libc.statx
    _statx.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p]
    _statx.restype = ctypes.c_int
except (OSError, AttributeError):  # pragma: no cover - a libc without statx
    _statx = None


def mount_id(path: str | bytes, dir_fd: int = AT_FDCWD) -> int | None:
    """The mount id of `path` (its last component not followed), None if unknown. Raises
    OSError if the object cannot be looked up."""
    if _statx is None:
        return None
    buf = ctypes.create_string_buffer(_STATX_SIZE)
    raw = os.fsencode(path)
    flags = AT_SYMLINK_NOFOLLOW | (AT_EMPTY_PATH if not raw else 0)
    if _statx(dir_fd, raw, flags, STATX_MNT_ID, buf) != 0:
        err = ctypes.get_errno()
        if err == 38:  # ENOSYS
            return None
        raise OSError(err, os.strerror(err), path)
    if not _MASK_AND_MNT.unpack_from(buf, 0)[0] & STATX_MNT_ID:
        return None
    mnt: int = struct.unpack_from("=Q", buf, _MNT_ID_OFFSET)[0]
    return mnt


def fd_mount_id(fd: int) -> int | None:
    """The mount id of an open file descriptor (an O_PATH one included)."""
    return mount_id(b"", fd)
