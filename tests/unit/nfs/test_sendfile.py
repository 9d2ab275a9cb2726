"""Replies sent with sendfile(2) from the page cache (nfs/sendfile.py): the right bytes in
order around the file's, what a full socket leaves (with an fd of its own), and a file cut
short under a slice."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from nfs.sendfile import FileCutShort, FileSlice, Part, hold, release, send_now
from unit.nfs.helpers import fds_on


@contextlib.contextmanager
def _pair(sndbuf: int | None = None) -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected TCP pair on loopback, the sender non-blocking."""
    with socket.create_server(("127.0.0.1", 0)) as ls:
        a = socket.socket()
        if sndbuf is not None:
            a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        a.connect(ls.getsockname())
        b, _ = ls.accept()
    a.setblocking(False)
    with a, b:
        yield a, b


def _recv_exactly(s: socket.socket, n: int) -> bytes:
    got = bytearray()
    s.settimeout(10)
    while len(got) < n:
        chunk = s.recv(n - len(got))
        if not chunk:
            break
        got += chunk
    return bytes(got)


def test_buffers_and_a_slice_go_in_order_with_the_files_bytes(tmp_path: Path) -> None:
    data = os.urandom(200_000)
    path = tmp_path / "f"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        with _pair() as (a, b):
            parts: list[Part] = [b"mark", bytearray(b"head"), FileSlice(fd, 1000, 50_001), b"\0\0\0"]
            want = 8 + 50_001 + 3
            got = bytearray()
            b.settimeout(10)
            while parts := send_now(a, parts):  # (if the socket's buffer is small)
                got += b.recv(want)
            got += _recv_exactly(b, want - len(got))
            assert bytes(got) == b"markhead" + data[1000:51_001] + b"\0\0\0"
            assert os.lseek(fd, 0, os.SEEK_CUR) == 0  # (the cached fd's offset is not moved)
    finally:
        os.close(fd)


def test_a_full_socket_leaves_the_rest_and_the_rest_keeps_its_own_fd(tmp_path: Path) -> None:
    """What the socket cannot take comes back (the rest of the slice as a slice); held on a
    duplicate of the fd (`hold`), the rest still goes once the original is closed (the
    open-file cache may close it meanwhile), and `release` closes the duplicate."""
    data = os.urandom(4 << 20)
    path = tmp_path / "f"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    with _pair(sndbuf=64 * 1024) as (a, b):
        left = send_now(a, [b"head", FileSlice(fd, 0, len(data)), b"tail"])
        assert left and isinstance(left[0], FileSlice)
        assert 0 < left[0].offset < len(data) and left[0].offset + left[0].count == len(data)
        rest, held = hold(left)
        assert len(held) == 1 and rest[0] == FileSlice(held[0], left[0].offset, left[0].count)
        os.close(fd)  # (the cache's fd)
        assert fds_on(path) == 1  # the rest's own
        got = bytearray()
        b.settimeout(10)
        while rest:
            got += b.recv(1 << 20)
            rest = send_now(a, rest)
        got += _recv_exactly(b, 4 + len(data) + 4 - len(got))
        assert bytes(got) == b"head" + data + b"tail"
        release(held)
        assert fds_on(path) == 0 and held == []
        release(held)  # (once only)


def test_a_file_cut_short_under_a_slice_raises_after_what_was_there(tmp_path: Path) -> None:
    """The file ends before the slice does (cut since its fstat): what it still had is sent,
    then FileCutShort, so the server ends the connection (the record is short)."""
    path = tmp_path / "f"
    data = os.urandom(300_000)
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.truncate(path, 100_000)
        with _pair() as (a, b):
            with pytest.raises(FileCutShort):
                send_now(a, [b"head", FileSlice(fd, 50_000, 200_000)])
            a.close()
            assert _recv_exactly(b, 1 << 20) == b"head" + data[50_000:100_000]
    finally:
        os.close(fd)


def test_a_file_that_cannot_be_spliced_is_read_instead(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """sendfile fails with EINVAL for a file whose filesystem cannot splice it: the slice's
    bytes are read with pread and sent, not lost (nor the connection)."""
    data = os.urandom(100_000)
    path = tmp_path / "f"
    path.write_bytes(data)

    def no_splice(out_fd: int, in_fd: int, offset: int, count: int) -> int:
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(os, "sendfile", no_splice)
    fd = os.open(path, os.O_RDONLY)
    try:
        with _pair() as (a, b):
            left = send_now(a, [b"head", FileSlice(fd, 10, 60_000), b"tail"])
            assert not any(isinstance(p, FileSlice) for p in left)  # (the rest, if any: bytes)
            want = 4 + 60_000 + 4
            got = bytearray()
            b.settimeout(10)
            while len(got) < want:
                got += b.recv(want - len(got))
                if left:
                    left = send_now(a, left)
            assert bytes(got) == b"head" + data[10:60_010] + b"tail"
        os.truncate(path, 1000)
        with _pair() as (a, b), pytest.raises(FileCutShort):
            send_now(a, [b"head", FileSlice(fd, 10, 60_000)])
    finally:
        os.close(fd)


def test_with_no_fd_to_spare_the_rest_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`hold` cannot duplicate a slice's fd (EMFILE): the slice's bytes are read while its fd
    is still good, and nothing is held."""
    data = os.urandom(100_000)
    path = tmp_path / "f"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)

    def no_fds(fd: int) -> int:
        raise OSError(errno.EMFILE, "Too many open files")

    try:
        monkeypatch.setattr(os, "dup", no_fds)
        rest, held = hold([b"x", FileSlice(fd, 5, 70_000)])
        assert rest == [b"x", data[5:70_005]] and held == []
    finally:
        os.close(fd)
