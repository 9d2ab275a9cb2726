"""Big READ replies over TCP sent straight from the page cache, with sendfile(2).

A READ answered with pread(2) copies its data twice: page cache -> a buffer of ours, then that
buffer -> the socket. sendfile(2) to a TCP socket copies nothing on the server: since Linux 6.5
it splices the page cache's pages into the socket (`MSG_SPLICE_PAGES`), and the client's
`recv` copies straight from them (over loopback, the only copy left). Linux's knfsd sends READ
data the same way (`nfsd_splice_read`). On the 2-core development VM (kernel 6.18, one call in
flight, medians of 500 calls, interleaved) a 1 MiB reply took 138 us against 294 from a shared
mapping with `sendmsg` (one copy, this server's way before) and 334 with pread + `sendmsg`;
32 KiB ones 48-57 against 59-61; at 4 KiB the ways are even, so only READs of at least
`SENDFILE_MIN_READ` go this way. `netswap bench nfs`'s copy out over TCP (libnfs's `nfs-cat`,
1 MiB READs): 67-77 ms per 256 MiB against 92-95 before.

A reply is a list of parts: buffers, and at most one `FileSlice` (an fd, an offset, a count)
for its data. The buffers before a slice go with `MSG_MORE`, so the record mark, the header
and the first data leave together. The slice names the open-file cache's fd, which is good
while the core lock is held; what the socket cannot take at once is sent later without the
lock, so the rest of a slice then holds a duplicate of the fd of its own (`own`).

If the file is cut short before its slice has been sent, sendfile stops at the new end: the
record is cut short (`FileCutShort`), and the connection must end before anything else is sent
on it (the client would read it as the rest of the READ's data); the client reconnects and asks
again. As with knfsd's spliced pages, bytes the client has not read yet when a concurrent WRITE
changes them go out changed.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

SENDFILE_MIN_READ = 32 * 1024  # smaller READs cost the same with pread (see above)


@dataclass(slots=True)
class FileSlice:
    """`count` bytes of the file open as `fd`, from `offset`, for sendfile. `owned`: the fd is
    this slice's own duplicate (closed by `release`), else it is borrowed from the open-file
    cache, good only while the core lock is held."""

    fd: int
    offset: int
    count: int
    owned: bool = False

    def __len__(self) -> int:
        return self.count

    def own(self) -> FileSlice:
        """This slice with an fd of its own, for sending after the core lock is let go."""
        return self if self.owned else FileSlice(os.dup(self.fd), self.offset, self.count, True)

    def release(self) -> None:
        if self.owned:
            self.owned = False
            os.close(self.fd)


class FileCutShort(OSError):
    """A slice's file ended before the slice had been sent: its record is cut short."""


Part = bytes | bytearray | memoryview | FileSlice  # one part of a reply on a stream


def send_now(sock: socket.socket, parts: list[Part]) -> list[Part]:
    """Send as much of `parts`, in order, as the non-blocking stream socket takes now; what is
    left (empty once all went), buffers as memoryviews. Raises OSError if the connection fails,
    FileCutShort if a slice's file ends before the slice does."""
    i, n = 0, len(parts)
    fileno = sock.fileno()
    while i < n:
        p = parts[i]
        if isinstance(p, FileSlice):
            try:
                sent = os.sendfile(fileno, p.fd, p.offset, p.count)
            except BlockingIOError:
                return parts[i:]
            if sent == 0:
                raise FileCutShort(f"file ended {p.count} bytes before its READ's data")
            if sent < p.count:
                parts = parts[i:]
                parts[0] = FileSlice(p.fd, p.offset + sent, p.count - sent, p.owned)
                i, n = 0, len(parts)
                continue
            i += 1
            continue
        j = i + 1
        while j < n and not isinstance(parts[j], FileSlice):
            j += 1
        views = [memoryview(b).cast("B") for b in parts[i:j] if len(b)]  # type: ignore[arg-type]
        flags = socket.MSG_DONTWAIT | (socket.MSG_MORE if j < n else 0)
        try:
            sent = sock.sendmsg(views, [], flags) if views else 0
        except BlockingIOError:
            return [*views, *parts[j:]]
        left = _drop_sent(views, sent)
        if left:
            return [*left, *parts[j:]]
        i = j
    return []


def _drop_sent(views: list[memoryview], n: int) -> list[memoryview]:
    """What is left of an iovec after a (partial) send of n bytes."""
    i = 0
    while i < len(views) and n >= len(views[i]):
        n -= len(views[i])
        i += 1
    left = views[i:]
    if left and n:
        left[0] = left[0][n:]
    return left


def release(parts: list[Part]) -> None:
    """Close the fds of the slices among `parts` that own one."""
    for p in parts:
        if isinstance(p, FileSlice):
            p.release()


__all__ = ["SENDFILE_MIN_READ", "FileCutShort", "FileSlice", "Part", "release", "send_now"]
