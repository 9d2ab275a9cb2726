"""Big READ replies over TCP sent straight from the page cache, with sendfile(2).

A READ answered with pread(2) copies its data twice: page cache -> a buffer of ours, then that
buffer -> the socket. sendfile(2) to a TCP socket copies nothing on the server: the kernel
hands the socket references to the page cache's pages (`MSG_SPLICE_PAGES` since Linux 6.5,
`sendpage` before), and the client's `recv` copies straight from them (over loopback, the only
copy left). Linux's knfsd sends READ data the same way (`nfsd_splice_read`). On the 2-core
development VM (kernel 6.18), a bare socket pair (one request in flight, medians of 500,
interleaved): a 1 MiB reply took 138 us against 294 from a shared mapping with `sendmsg` (one
copy, this server's way before) and 334 with pread + `sendmsg`; 32 KiB ones 48-57 against
59-61; at 4 KiB the ways are even, so only READs of at least `SENDFILE_MIN_READ` go this way.
Our server's 1 MiB READ from a raw client: 225 us against 344 the way before (ganesha 385-413);
`netswap bench nfs`'s copy out over TCP (libnfs's `nfs-cat`, 1 MiB READs): 67-77 ms per 256 MiB
against 92-95.

A reply is a list of parts: buffers, and at most one `FileSlice` (an fd, an offset, a count)
for its data. The buffers before a slice go with `MSG_MORE`, so the record mark, the header
and the first data leave together. The slice names the open-file cache's fd, which is good
while the core lock is held; what the socket cannot take at once is sent later without the
lock, so the rest of a slice then holds a duplicate of the fd of its own (`hold`).

A file that cannot be spliced (sendfile fails with EINVAL, as on a filesystem without
`splice_read`) is read with pread for that reply instead. If it cannot be read at all (EIO
from the disk) after the header has gone, the record is cut (`FileReadError`) and the server
reads that file's next READs before their header, so the client gets the error
(NFS3ERR_IO), not the same cut again.

If the file is cut short before its slice has been sent, sendfile stops at the new end: the
record is cut short (`FileCutShort`), and the connection must end before anything else is sent
on it (the client would read it as the rest of the READ's data); the client reconnects and asks
again. As with knfsd's spliced pages, bytes the client has not read yet when a concurrent WRITE
changes them go out changed.
"""

from __future__ import annotations

import errno
import os
import socket
from dataclasses import dataclass
from typing import cast

SENDFILE_MIN_READ = 32 * 1024  # smaller READs cost the same with pread (see above)
_SOCKET_ERRORS = frozenset({errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.ECONNABORTED, errno.ESHUTDOWN,
                            errno.ETIMEDOUT})  # (sendfile(2) failing on the socket's side; any other, the file's)


@dataclass(frozen=True, slots=True)
class FileSlice:
    """`count` bytes of the file open as `fd`, from `offset`, for sendfile. Whoever made it
    keeps the fd open until the slice has been sent or dropped (`hold`)."""

    fd: int
    offset: int
    count: int

    def __len__(self) -> int:
        return self.count


class FileCutShort(OSError):
    """A slice's file ended before the slice had been sent: its record is cut short."""


class FileReadError(OSError):
    """A slice's file could not be read (EIO from the disk, say), neither by sendfile nor by
    pread, after its reply's header had gone: its record is cut short. `ino` names the file,
    so that its next READs are read before their header is sent (and answered with the error)."""

    def __init__(self, e: OSError, ino: int) -> None:
        super().__init__(e.errno, f"{e.strerror} (inode {ino})")
        self.ino = ino


_Bytes = bytes | bytearray | memoryview
Part = _Bytes | FileSlice  # one part of a reply on a stream


def send_now(sock: socket.socket, parts: list[Part]) -> list[Part]:
    """Send as much of `parts`, in order, as the non-blocking stream socket takes now; what is
    left (empty once all went). Raises OSError if the connection fails, FileCutShort if a
    slice's file ends before the slice does."""
    i, n = 0, len(parts)
    while i < n:
        p = parts[i]
        if isinstance(p, FileSlice):
            try:
                sent = os.sendfile(sock.fileno(), p.fd, p.offset, p.count)
            except BlockingIOError:
                return parts[i:]
            except OSError as e:
                if e.errno in _SOCKET_ERRORS:
                    raise
                # The file's side: one that cannot be spliced (EINVAL: a filesystem without
                # splice_read), or a read error. The slice's bytes, read here.
                parts = [_read(p), *parts[i + 1 :]]
                i, n = 0, len(parts)
                continue
            if sent == 0:
                raise FileCutShort(f"file ended {p.count} bytes before its READ's data")
            if sent < p.count:
                parts = parts[i:]
                parts[0] = FileSlice(p.fd, p.offset + sent, p.count - sent)
                i, n = 0, len(parts)
                continue
            i += 1
            continue
        j = i + 1
        while j < n and not isinstance(parts[j], FileSlice):
            j += 1
        run = cast(list[_Bytes], parts[i:j] if i or j < n else parts)
        flags = socket.MSG_DONTWAIT | (socket.MSG_MORE if j < n else 0)
        try:
            sent = sock.sendmsg(run, [], flags)
        except BlockingIOError:
            return parts[i:]
        if sent < sum(map(len, run)):
            return [*_drop_sent([memoryview(b).cast("B") for b in run if len(b)], sent), *parts[j:]]
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


def hold(parts: list[Part]) -> tuple[list[Part], list[int]]:
    """`parts` with each slice on a duplicate of its fd, and those duplicates: for sending the
    rest of a reply after the core lock is let go (the open-file cache may close its fds
    then). Close the duplicates (`release`) once the rest has been sent or dropped. With no fd
    to spare (EMFILE), a slice's bytes are read instead (FileCutShort if the file ended)."""
    fds: list[int] = []
    out: list[Part] = []
    try:
        for p in parts:
            if isinstance(p, FileSlice):
                try:
                    fds.append(os.dup(p.fd))
                    p = FileSlice(fds[-1], p.offset, p.count)
                except OSError:
                    p = _read(p)
            out.append(p)
    except BaseException:
        release(fds)
        raise
    return out, fds


def _read(p: FileSlice) -> bytes:
    """A slice's bytes, read (FileCutShort if the file ends first, FileReadError if it cannot
    be read)."""
    try:
        data = os.pread(p.fd, p.count, p.offset)
    except OSError as e:
        raise FileReadError(e, os.fstat(p.fd).st_ino) from e
    if len(data) < p.count:
        raise FileCutShort(f"file ended {p.count - len(data)} bytes before its READ's data")
    return data


def release(fds: list[int]) -> None:
    """Close the duplicates `hold` made."""
    for fd in fds:
        os.close(fd)
    fds.clear()


__all__ = ["SENDFILE_MIN_READ", "FileCutShort", "FileReadError", "FileSlice", "Part", "hold", "release", "send_now"]
