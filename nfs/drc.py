"""Duplicate request cache (knfsd's nfscache.c, in spirit).

A retransmitted non-idempotent call (SETATTR, WRITE, CREATE, MKDIR, SYMLINK, MKNOD, REMOVE, RMDIR,
RENAME, LINK) must not be executed twice: the second CREATE GUARDED or MKDIR would fail with EXIST,
a second REMOVE, RMDIR or RENAME with NOENT. Entries are keyed by
(xid, client host, prog, vers, proc) plus a checksum of the arguments' start, so two clients on
the same host that happen to pick the same xid do not collide, and a TCP client that reconnects
from a new port still hits. While the original is still being executed a duplicate is reported
IN_PROGRESS (svc.py drops it over UDP and waits for the original over TCP); afterwards the cached
reply is sent again. The cache is a bounded LRU.
"""

from __future__ import annotations

import enum
import zlib
from collections import OrderedDict
from dataclasses import dataclass


class DrcState(enum.Enum):
    NEW = "new"  # not seen: execute, then call done()
    IN_PROGRESS = "in_progress"  # the original is being executed: drop this copy
    DONE = "done"  # send the cached reply


DrcKey = tuple[int, str, int, int, int, int, int]


@dataclass
class DrcStats:
    hits: int = 0
    misses: int = 0
    in_progress_drops: int = 0
    evictions: int = 0


class DuplicateRequestCache:
    def __init__(self, capacity: int = 1024) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[DrcKey, bytes | None] = OrderedDict()
        self.stats = DrcStats()

    @staticmethod
    def key(xid: int, host: str, prog: int, vers: int, proc: int, args: bytes | bytearray | memoryview) -> DrcKey:
        head = bytes(args[:256])
        return (xid, host, prog, vers, proc, len(args), zlib.crc32(head))

    def lookup(self, key: DrcKey) -> tuple[DrcState, bytes | None]:
        if key not in self._entries:
            self.stats.misses += 1
            self._entries[key] = None
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
                self.stats.evictions += 1
            return DrcState.NEW, None
        self._entries.move_to_end(key)
        reply = self._entries[key]
        if reply is None:
            self.stats.in_progress_drops += 1
            return DrcState.IN_PROGRESS, None
        self.stats.hits += 1
        return DrcState.DONE, reply

    def done(self, key: DrcKey, reply: bytes | None) -> None:
        """Record the reply; None forgets the entry (nothing was sent, a retry may execute)."""
        if reply is None:
            self._entries.pop(key, None)
        elif key in self._entries:
            self._entries[key] = reply

    def __len__(self) -> int:
        return len(self._entries)
