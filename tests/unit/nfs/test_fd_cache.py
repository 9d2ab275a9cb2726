"""The open-file cache (nfs/store.py `Export`): the laundrette's rounds, and fds pushed out
of it that would be slow to close."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nfs.store import SLOW_FREE, Export, close_fds
from unit.nfs.helpers import fds_on


def test_the_laundrette_takes_out_cached_fds_left_unused_for_a_round(tmp_path: Path) -> None:
    """`Export.expire_idle` (the server calls it every 2 s, as knfsd's file cache laundrette):
    an fd used since the last round stays; one not used for a whole round leaves the cache and
    is handed back still open, for `close_fds` (the server's worker thread) to close, so a file
    removed behind the server's back gives its space back."""
    root = tmp_path / "export"
    root.mkdir()
    export = Export(root, b"k" * 32)
    sts = []
    for i in range(2):
        p = root / f"f{i}"
        p.write_bytes(os.urandom(100_000))
        sts.append(os.lstat(p))
    fds = [export.fd(str(root / f"f{i}"), sts[i]) for i in range(2)]
    assert export.expire_idle() == []  # both used since the start
    (root / "f0").unlink()  # removed locally: the cache still holds it open
    assert export.fd(str(root / "f1"), sts[1]) == fds[1]  # f1 used in this round, f0 not
    assert export.expire_idle() == [fds[0]]
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
        return fds_on(root / name)

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
