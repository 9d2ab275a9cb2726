"""Read-only shared mappings of the open-file cache's files, for big READ replies sent from the
page cache.

A READ answered with pread(2) copies its data twice: page cache -> a buffer of ours (pread), then
buffer -> socket (sendmsg). Handed a view of a shared mapping of the file instead, sendmsg copies
straight from the page cache: one copy, no buffer. Linux's knfsd saves the same copy by splicing
the page cache pages into its reply. On the 2-core development VM (raw client, one call in
flight, medians of four rounds) a 1 MiB READ over TCP took 358 us instead of 488 (server CPU 338
instead of 438); 64 KiB READs 6-12% less time; 32 KiB ones (UDP's largest) 11% *more*, so only
READs of at least MAP_MIN_READ use it.

Why this is safe: only the kernel reads the mapped bytes, inside sendmsg. If the file shrinks
between the fstat a view was cut by and that copy, the kernel's copy faults on the pages past
the new end; a fault in the kernel's own access to user memory is fixed up, not turned into
SIGBUS: sendmsg sends what it copied and then fails with EFAULT (tests/unit/nfs/test_filemap.py
checks this kernel's behaviour). Over TCP the record is then cut short and the connection is
shut down at once, before any reply held back behind this one can follow the cut bytes (the
client would read it as the rest of the READ's data); the client reconnects and sends the call
again, and gets the shorter file. (UDP never gets here: a datagram's READ is at most 64 KiB less
its headers, under MAP_MIN_READ.) User space must never read a view (a SIGBUS there
would end the server): views go to sendmsg only (the hot path's READ, `NfsProgram.call_fast`; READ
is idempotent, so its replies are never kept in the reply cache). As with knfsd's spliced pages,
bytes the socket has not taken yet when a concurrent WRITE changes them go out changed.

A mapping lives as long as the open-file cache keeps the file's fd: `Export` drops it whenever
it closes that fd (an inode number can be reused by a new file; a mapping must never outlive
the fd it was made from). A dropped mapping is unmapped once the last reply holding a view of
it has been sent.
"""

from __future__ import annotations

import mmap
from collections import OrderedDict

MAP_MIN_READ = 64 * 1024  # smaller READs are cheaper with pread (see above)


class FileMaps:
    """Per inode, a read-only MAP_SHARED mapping of a cached fd's file, as long as the file was
    when mapped (remapped when a READ reaches past that); at most `max_maps` (LRU; each holds
    a duplicate of its fd, as Python's mmap does)."""

    def __init__(self, max_maps: int = 16) -> None:
        self.max_maps = max_maps
        self._maps: OrderedDict[int, tuple[memoryview, int] | None] = OrderedDict()  # ino -> (view, length) | None: not mappable
        self.mapped = 0  # mappings made

    def view(self, ino: int, fd: int, size: int, offset: int, n: int) -> memoryview | None:
        """Bytes [offset, offset + n) of the file (fd, whose current size is `size`, with
        offset + n <= size) as a view of its mapping; None if the file cannot be mapped (then
        pread it)."""
        maps = self._maps
        if ino in maps:
            ent = maps[ino]
            if ent is None:
                return None
            if offset + n <= ent[1]:
                maps.move_to_end(ino)
                return ent[0][offset : offset + n]
        try:
            whole = memoryview(mmap.mmap(fd, size, prot=mmap.PROT_READ))
        except ValueError:  # the file is shorter than `size` now (cut since its fstat), or empty
            return None  # (not remembered: the next READ, with the new size, maps it)
        except OSError:  # a filesystem without mmap; no address space for a huge sparse file
            maps[ino] = None
            self._trim()
            return None
        self.mapped += 1
        maps[ino] = (whole, size)
        maps.move_to_end(ino)
        self._trim()
        return whole[offset : offset + n]

    def drop(self, ino: int) -> None:
        """The cache is closing the inode's fd: forget its mapping (unmapped when no reply holds
        a view of it any more)."""
        self._maps.pop(ino, None)

    def clear(self) -> None:
        self._maps.clear()

    def __len__(self) -> int:
        return sum(1 for ent in self._maps.values() if ent is not None)

    def _trim(self) -> None:
        while len(self._maps) > self.max_maps:
            self._maps.popitem(last=False)


__all__ = ["MAP_MIN_READ", "FileMaps"]
