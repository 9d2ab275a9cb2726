"""The mappings big READs are sent from (nfs/filemap.py): the right bytes, one mapping per file
until a READ reaches past it, none kept after its fd is closed, a bounded number, and the
kernel's behaviour the design rests on: a file cut short under a mapping makes sendmsg fail
with EFAULT (no SIGBUS)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from nfs.filemap import FileMaps
from nfs.store import SLOW_FREE, Export, close_fds


@contextlib.contextmanager
def _opened(tmp_path: Path, size: int, flags: int) -> Iterator[tuple[Path, bytes, int]]:
    """A file of `size` random bytes, and an fd open on it (closed after)."""
    path = tmp_path / "f"
    data = os.urandom(size)
    path.write_bytes(data)
    fd = os.open(path, flags)
    try:
        yield path, data, fd
    finally:
        os.close(fd)


def test_views_have_the_files_bytes_and_are_remapped_only_when_it_grew(tmp_path: Path) -> None:
    maps = FileMaps()
    with _opened(tmp_path, 300_000, os.O_RDWR) as (_, data, fd):
        st = os.fstat(fd)
        assert bytes(maps.view(st.st_ino, fd, st.st_size, 0, 100_000) or b"") == data[:100_000]
        assert bytes(maps.view(st.st_ino, fd, st.st_size, 200_000, 100_000) or b"") == data[200_000:]
        assert maps.mapped == 1 and len(maps) == 1
        more = os.urandom(70_000)
        os.pwrite(fd, more, 300_000)
        st = os.fstat(fd)
        assert bytes(maps.view(st.st_ino, fd, st.st_size, 250_000, 120_000) or b"") == data[250_000:] + more
        assert maps.mapped == 2
        # A write through the fd shows in the mapping: it is the page cache itself.
        os.pwrite(fd, b"x" * 10, 0)
        assert bytes(maps.view(st.st_ino, fd, st.st_size, 0, 10) or b"") == b"x" * 10
        assert maps.mapped == 2
        maps.drop(st.st_ino)
        assert len(maps) == 0
        assert maps.view(st.st_ino, fd, st.st_size, 0, 10) is not None and maps.mapped == 3


def test_an_empty_file_gives_no_view_and_the_number_of_mappings_is_bounded(tmp_path: Path) -> None:
    maps = FileMaps(max_maps=3)
    fds = []
    try:
        for i in range(6):
            p = tmp_path / f"f{i}"
            p.write_bytes(b"" if i == 0 else os.urandom(8192))
            fds.append(os.open(p, os.O_RDONLY))
            st = os.fstat(fds[-1])
            view = maps.view(st.st_ino, fds[-1], st.st_size, 0, min(10, st.st_size))
            assert (view is None) == (i == 0)
        assert len(maps) == 3  # the three most recent
    finally:
        for fd in fds:
            os.close(fd)


def test_the_export_drops_a_files_mapping_with_its_fd(tmp_path: Path) -> None:
    root = tmp_path / "export"
    root.mkdir()
    export = Export(root, b"k" * 32, max_open=2)
    sts = []
    for i in range(3):
        p = root / f"f{i}"
        p.write_bytes(os.urandom(100_000))
        sts.append(os.lstat(p))
    fd0 = export.fd(str(root / "f0"), sts[0])
    assert export.maps.view(sts[0].st_ino, fd0, sts[0].st_size, 0, 100_000) is not None
    assert len(export.maps) == 1
    export.fd(str(root / "f1"), sts[1])
    export.fd(str(root / "f2"), sts[2])  # f0's fd is the least recently used: closed
    assert len(export.maps) == 0
    fd1 = export.fd(str(root / "f1"), sts[1])
    assert export.maps.view(sts[1].st_ino, fd1, sts[1].st_size, 0, 10) is not None
    export.close_ino(sts[1].st_ino)
    assert len(export.maps) == 0
    export.close()


def test_a_file_cut_short_under_a_view_makes_sendmsg_fail_with_efault(tmp_path: Path) -> None:
    """In a process of its own (a SIGBUS would kill it, not the test run): sendmsg from a view
    of pages the file no longer has sends what it copied, then fails with EFAULT; the process
    lives on."""
    script = textwrap.dedent("""
        import errno, os, socket, sys
        from nfs.filemap import FileMaps
        path = sys.argv[1]
        with open(path, "wb") as f:
            f.write(os.urandom(1 << 20))
        fd = os.open(path, os.O_RDONLY)
        st = os.fstat(fd)
        view = FileMaps().view(st.st_ino, fd, st.st_size, 0, 1 << 20)
        ls = socket.create_server(("127.0.0.1", 0))
        c = socket.create_connection(ls.getsockname())
        s, _ = ls.accept()
        os.truncate(path, 100_000)
        try:
            s.sendmsg([b"head", view[:4096]])  # (pages still in the file)
            sent = s.sendmsg([b"head", view[50_000:300_000]], [], socket.MSG_DONTWAIT)
            assert 4 < sent < 4 + 250_000, sent
            s.sendmsg([view[200_000:300_000]], [], socket.MSG_DONTWAIT)
        except OSError as e:
            assert e.errno == errno.EFAULT, e
            print("EFAULT after", sent)
        else:
            sys.exit("no error")
    """)
    r = subprocess.run([sys.executable, "-c", script, str(tmp_path / "f")], capture_output=True, text=True,
                       timeout=60, cwd=Path(__file__).resolve().parents[3])
    assert r.returncode == 0, (r.returncode, r.stderr)
    assert r.stdout.startswith("EFAULT after"), r.stdout


def test_a_file_cut_short_before_it_is_mapped_is_mapped_by_the_next_read(tmp_path: Path) -> None:
    """A READ whose fstat saw the file longer than it is when the mapping is made gets no view
    (pread then answers it); the next READ, with the file's new size, is sent from a mapping:
    one lost race does not make the file pread-only for as long as its fd stays cached."""
    maps = FileMaps()
    with _opened(tmp_path, 300_000, os.O_RDONLY) as (path, data, fd):
        st = os.fstat(fd)
        os.truncate(path, 200_000)  # (after the fstat, before the mapping)
        assert maps.view(st.st_ino, fd, st.st_size, 0, 100_000) is None
        size = os.fstat(fd).st_size
        view = maps.view(st.st_ino, fd, size, 100_000, 100_000)
        assert view is not None and bytes(view) == data[100_000:200_000]
        assert maps.mapped == 1 and len(maps) == 1


def test_the_laundrette_takes_out_cached_fds_left_unused_for_a_round(tmp_path: Path) -> None:
    """`Export.expire_idle` (the server calls it every 2 s, as knfsd's file cache laundrette):
    an fd used since the last round stays; one not used for a whole round leaves the cache,
    with its mapping, and is handed back still open, for `close_fds` (the server's worker
    thread) to close, so a file removed behind the server's back gives its space back."""
    root = tmp_path / "export"
    root.mkdir()
    export = Export(root, b"k" * 32)
    sts = []
    for i in range(2):
        p = root / f"f{i}"
        p.write_bytes(os.urandom(100_000))
        sts.append(os.lstat(p))
    fds = [export.fd(str(root / f"f{i}"), sts[i]) for i in range(2)]
    assert export.maps.view(sts[0].st_ino, fds[0], sts[0].st_size, 0, 100_000) is not None
    assert export.expire_idle() == []  # both used since the start
    (root / "f0").unlink()  # removed locally: the cache still holds it open
    assert export.fd(str(root / "f1"), sts[1]) == fds[1]  # f1 used in this round, f0 not
    assert export.expire_idle() == [fds[0]]
    assert len(export.maps) == 0
    assert os.fstat(fds[0]).st_nlink == 0  # out of the cache, not closed yet
    fd = export.fd(str(root / "f1"), sts[1])
    assert fd == fds[1]  # the rest of the cache is untouched
    close_fds([fds[0]])
    with pytest.raises(OSError):  # (closed: nothing has opened a file since, to reuse its number)
        os.fstat(fds[0])
    assert export.expire_idle() == []  # f1 used in the last round
    assert export.expire_idle() == [fds[1]]
    close_fds([fds[1]])
    assert export.expire_idle() == []
    export.close()


def test_a_removed_big_file_pushed_out_of_the_cache_is_left_to_the_laundrette(tmp_path: Path) -> None:
    """A newer file pushes the oldest fd out of the open-file cache (at `max_open`). Closing it
    is cheap unless it is the last reference to a removed big file (its page cache and blocks
    are freed then, 50 ms per 256 MiB on ext4): such an fd is kept open for the laundrette's
    next round (`expire_idle`, closed in a worker thread); any other is closed at once."""
    root = tmp_path / "export"
    root.mkdir()
    export = Export(root, b"k" * 32, max_open=2)
    sizes = {"big": SLOW_FREE, "small": SLOW_FREE - 1, "linked": SLOW_FREE, "a": 10, "b": 10, "c": 10}
    sts = {}
    for name, size in sizes.items():
        (root / name).write_bytes(os.urandom(size))
        sts[name] = os.lstat(root / name)

    def fd(name: str) -> int:
        return export.fd(str(root / name), sts[name])

    def held(name: str) -> int:
        """This process's fds on the file (removed or not)."""
        path = str(root / name)
        n = 0
        for f in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                n += os.readlink(f"/proc/self/fd/{f}") in (path, f"{path} (deleted)")
        return n

    big = fd("big")
    fd("small")
    for name in ("big", "small"):
        (root / name).unlink()  # removed locally: the cache holds them open
    fd("a")
    fd("b")  # both pushed out: the big one kept open, the small one closed
    assert (held("big"), held("small")) == (1, 0)
    fd("linked")
    fd("c")
    fd("a")  # pushed out, but still linked: closed at once
    assert held("linked") == 0
    out = export.expire_idle()
    assert big in out  # (with the idle ones), for the worker to close
    close_fds(out)
    assert held("big") == 0
    export.close()
