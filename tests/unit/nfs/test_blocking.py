"""Blocking work stays off the event loop: the syncs (and the WRITEs they follow) and the walk of
the export on a handle-cache miss run in worker threads (UNSTABLE WRITEs, copies into the page
cache, stay inline: cheaper there), and metadata and data are on disk before the reply says so."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import trio

from nfs.client import NfsClient
from nfs.nfs3 import DATA_SYNC, FILE_SYNC, UNSTABLE, Nfs3Error, Stat
from nfs.server import NfsServer, ServerConfig
from nfs.store import Export

H = "127.0.0.1"


def test_the_walk_of_the_export_is_capped(tmp_path: Path) -> None:
    root = tmp_path / "e"
    (root / "a").mkdir(parents=True)
    for i in range(30):
        (root / "a" / f"f{i:02}").write_bytes(b"")
    key = os.urandom(32)
    first = Export(root, key)
    rst = os.lstat(root)
    ast = os.lstat(root / "a")
    last = root / "a" / "f29"
    fh = first.make_fh(os.lstat(last).st_ino, ast.st_ino)  # a handle whose parent is not cached
    assert Export(root, key).resolve(fh)[0] == str(last)  # an uncapped walk finds it
    capped = Export(root, key, max_walk=5)
    with pytest.raises(Nfs3Error) as ei:
        capped.resolve(fh)  # more than 5 entries to visit: given up, stale
    assert ei.value.status == Stat.NFS3ERR_STALE
    assert rst.st_ino == capped.root_ino


async def test_big_writes_and_walks_run_in_worker_threads(tmp_path: Path, export_dir: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    loop_thread = threading.get_ident()
    threads: list[tuple[str, int, bool]] = []
    real_pwrite = os.pwrite

    def pwrite(fd: int, data: object, offset: int) -> int:
        n = real_pwrite(fd, data, offset)  # type: ignore[arg-type]
        # inline: on the event loop or in the connection's service thread, not a worker thread
        inline = threading.get_ident() == loop_thread or threading.current_thread().name.startswith("nfsd-tcp-")
        threads.append(("pwrite", n, inline))
        return n

    monkeypatch.setattr(os, "pwrite", pwrite)
    (export_dir / "d").mkdir()
    (export_dir / "d" / "deep").write_bytes(b"x")
    async with trio.open_nursery() as n:
        server = NfsServer(ServerConfig(export=export_dir, port=0, mount_port=0, state_dir=tmp_path / "s"))
        ports = await n.start(server.serve)
        async with NfsClient.tcp(H, ports["nfs"], ports["mount"], hard=False, timeo=3.0) as c:
            root = await c.mount(str(export_dir))
            fh, _ = await c.create(root, "f")
            await c.write(fh, 0, os.urandom(1 << 20), FILE_SYNC)
            await c.write(fh, 0, os.urandom(1 << 20), UNSTABLE)
            assert ("pwrite", 1 << 20, False) in threads  # with its fsync: in a worker thread
            assert ("pwrite", 1 << 20, True) in threads  # UNSTABLE: a page-cache copy, inline
            # A handle the server has not seen since it started: found by a walk, in a thread.
            dfh, _ = await c.lookup(root, "d")
            deep_fh, _ = await c.lookup(dfh, "deep")
        n.cancel_scope.cancel()
    walks: list[bool] = []
    async with trio.open_nursery() as n:
        server = NfsServer(ServerConfig(export=export_dir, port=0, mount_port=0, state_dir=tmp_path / "s"))
        real_find = server.export.find

        def find(ino: int, parent: int) -> str | None:
            walks.append(threading.get_ident() == loop_thread)
            return real_find(ino, parent)

        server.export.find = find  # type: ignore[method-assign]
        ports = await n.start(server.serve)
        async with NfsClient.tcp(H, ports["nfs"], ports["mount"], hard=False, timeo=3.0) as c:
            await c.mount(str(export_dir))
            assert (await c.getattr(deep_fh)).size == 1
        assert walks == [False]
        n.cancel_scope.cancel()


async def test_syncs_happen_before_the_reply_and_only_when_asked(tmp_path: Path, export_dir: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[tuple[str, int]] = []  # (which sync, inode), in the order they completed
    real = {"fsync": os.fsync, "fdatasync": os.fdatasync}

    def counting(name: str):  # type: ignore[no-untyped-def]
        def sync(fd: int) -> None:
            real[name](fd)
            synced.append((name, os.fstat(fd).st_ino))
        return sync

    monkeypatch.setattr(os, "fsync", counting("fsync"))
    monkeypatch.setattr(os, "fdatasync", counting("fdatasync"))
    dir_ino = os.lstat(export_dir).st_ino
    async with trio.open_nursery() as n:
        server = NfsServer(ServerConfig(export=export_dir, port=0, mount_port=0, state_dir=tmp_path / "s"))
        ports = await n.start(server.serve)
        async with NfsClient.tcp(H, ports["nfs"], ports["mount"], hard=False, timeo=3.0) as c:
            root = await c.mount(str(export_dir))
            synced.clear()
            fh, attr = await c.create(root, "f")  # the new inode and its directory
            assert attr is not None
            ino = attr.fileid
            assert {("fsync", ino), ("fsync", dir_ino)} <= set(synced)
            for stable, want in ((UNSTABLE, []), (DATA_SYNC, [("fdatasync", ino)]), (FILE_SYNC, [("fsync", ino)])):
                synced.clear()
                await c.write(fh, 0, b"p" * 4096, stable)  # each reply comes after its sync
                assert synced == want, stable
                synced.clear()
                await c.write(fh, 0, b"q" * 300_000, stable)  # (the big-write path too)
                assert synced == want, stable
            synced.clear()
            await c.write(fh, 0, b"u" * 4096, UNSTABLE)
            await c.commit(fh)
            assert synced == [("fsync", ino)]
            synced.clear()
            await c.setattr(fh, mode=0o640)
            assert synced == [("fsync", ino)]
            synced.clear()
            await c.remove(root, "f")
            assert synced == [("fsync", dir_ino)]
        n.cancel_scope.cancel()
