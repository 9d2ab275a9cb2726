"""Write-behind for UNSTABLE WRITEs: start writing a file's dirty pages out every `every` bytes.

An UNSTABLE WRITE only copies its data into the page cache; the COMMIT that follows must wait
until all of it is on stable storage (fsync). Left alone, the kernel starts writeback only past
its dirty thresholds or after 30 s, so a client that writes a file and then COMMITs waits for the
whole file's I/O at the COMMIT. Started early, in the background, the I/O overlaps the transfer
and the COMMIT's fsync finds little left to do (the idea of RocksDB's `bytes_per_sync`, with
sync_file_range(2) as it uses it). Nothing is weakened: sync_file_range(SYNC_FILE_RANGE_WRITE)
only starts writeback, waits for nothing and reports no error; COMMIT (and FILE_SYNC/DATA_SYNC
WRITEs) still fsync before they reply, and fsync still reports any writeback error.

`WriteBehind` is the bookkeeping (sans-IO): `wrote()` says when to start a file's writeback;
`start_writeback()` is the system call, for a worker thread.
"""

from __future__ import annotations

import ctypes
import os
from typing import Any

SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start writeback of dirty pages not already under it

_sync_file_range: Any
try:
    _libc = ctypes.CDLL(None, use_errno=True)
    _sync_file_range = _libc.sync_file_range
    _sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    _sync_file_range.restype = ctypes.c_int
except (OSError, AttributeError):  # pragma: no cover - a libc without it
    _sync_file_range = None

DEFAULT_WRITE_BEHIND = 4 * 1024 * 1024


def start_writeback(fd: int) -> None:
    """Start writeback of all of a file's dirty pages; returns without waiting for it."""
    if _sync_file_range is not None and _sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WRITE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class WriteBehind:
    """Per inode, the bytes written UNSTABLE since its writeback was last started. `every` 0:
    never (the kernel's own writeback only). At most one start is in flight per inode, and at
    most `max_files` inodes are tracked (the oldest is forgotten: it only starts later)."""

    def __init__(self, every: int = DEFAULT_WRITE_BEHIND, max_files: int = 1024) -> None:
        self.every = every
        self.max_files = max_files
        self._dirty: dict[int, int] = {}
        self._busy: set[int] = set()
        self.started = 0  # writebacks started

    def wrote(self, ino: int, n: int) -> bool:
        """n bytes of inode `ino` were written UNSTABLE: True if its writeback should start now
        (then call `done(ino)` once the start has returned)."""
        if self.every <= 0 or _sync_file_range is None:
            return False
        dirty = self._dirty.pop(ino, 0) + n
        if dirty < self.every or ino in self._busy:
            self._dirty[ino] = dirty  # (re-inserted: the dict stays oldest first)
            if len(self._dirty) > self.max_files:
                del self._dirty[next(iter(self._dirty))]
            return False
        self._busy.add(ino)
        self.started += 1
        return True

    def done(self, ino: int) -> None:
        self._busy.discard(ino)

    def synced(self, ino: int) -> None:
        """The file was fsync'ed (COMMIT): nothing of it is waiting any more."""
        self._dirty.pop(ino, None)


__all__ = ["DEFAULT_WRITE_BEHIND", "WriteBehind", "start_writeback"]
