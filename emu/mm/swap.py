"""Swap areas, slots, the swap cache's entries, and the storage interface.

A swap entry is an int, `type << SWP_TYPE_SHIFT | offset`, stored in a process's page table in
place of the page (as a non-present pte holds it).  Storage is reached through an
address-space-style interface (`SwapStorage`): `swap_activate`, asynchronous `swap_rw` of one or
more contiguous pages, `swap_deactivate`.  `LocalFileSwap` is the local-file implementation.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from typing import Any, Literal, Protocol, runtime_checkable

import trio

SWP_TYPE_SHIFT = 32
SWP_OFFSET_MASK = (1 << SWP_TYPE_SHIFT) - 1
MAX_SWAPFILES = 32
SWAP_MAGIC = b"SWAPSPACE2"


class SwapIOError(OSError):
    """A swap read or write failed (the storage said so, or the transport gave up)."""


def swp_entry(type_: int, offset: int) -> int:
    return (type_ << SWP_TYPE_SHIFT) | offset


def swp_type(entry: int) -> int:
    return entry >> SWP_TYPE_SHIFT


def swp_offset(entry: int) -> int:
    return entry & SWP_OFFSET_MASK


@runtime_checkable
class SwapStorage(Protocol):
    """Where a swap area's pages live (a local file, a swap file on NFS, an iSCSI LUN).

    Optional attribute `fs_backed: bool` (default False): True when writing to it enters a
    filesystem (swap over NFS), so reclaim under GFP_NOFS may not start writes to it.
    """

    async def swap_activate(self, nr_pages: int, page_size: int) -> None: ...

    async def swap_rw(self, op: Literal["read", "write"], slot: int, bufs: list[memoryview]) -> None: ...

    async def swap_deactivate(self) -> None: ...


class LocalFileSwap:
    """A swap file on the local filesystem (for tests and the swap-local benchmark).

    I/O is pread/pwrite on the trio thread (local page-cache I/O is microseconds; a thread hop
    costs more).  `latency` (seconds) delays each completion, so tests can have many writes in
    flight and a slow device; `fail_after` makes every I/O after that many fail (error paths).
    """

    fs_backed = False

    def __init__(self, path: str | os.PathLike[str], *, latency: float = 0.0, fail_after: int | None = None) -> None:
        self.path = os.fspath(path)
        self.latency = latency
        self.fail_after = fail_after
        self.fd: int | None = None
        self.page_size = 0
        self.nr_pages = 0
        self.nr_reads = 0
        self.nr_writes = 0
        self.inflight = 0
        self.max_inflight = 0

    async def swap_activate(self, nr_pages: int, page_size: int) -> None:
        if nr_pages < 2:
            raise ValueError(f"a swap area needs at least 2 pages (header + 1), not {nr_pages}")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            size = nr_pages * page_size
            # A swap file must have no holes: allocate every block now, as mkswap/swapon require.
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError:
                os.ftruncate(fd, size)
        except BaseException:
            os.close(fd)
            raise
        self.fd, self.page_size, self.nr_pages = fd, page_size, nr_pages

    async def swap_rw(self, op: Literal["read", "write"], slot: int, bufs: list[memoryview]) -> None:
        fd = self.fd
        if fd is None:
            raise SwapIOError("swap file not active")
        if slot < 0 or slot + len(bufs) > self.nr_pages:
            raise SwapIOError(f"slots {slot}..{slot + len(bufs) - 1} outside the swap file of {self.nr_pages}")
        self.inflight += 1
        self.max_inflight = max(self.max_inflight, self.inflight)
        try:
            if self.latency:
                await trio.sleep(self.latency)
            else:
                await trio.lowlevel.checkpoint()
            n = self.nr_reads + self.nr_writes
            if self.fail_after is not None and n >= self.fail_after:
                raise SwapIOError(f"injected {op} failure at slot {slot}")
            off = slot * self.page_size
            want = len(bufs) * self.page_size
            if op == "write":
                done = os.pwritev(fd, bufs, off)
                self.nr_writes += 1
            elif op == "read":
                done = os.preadv(fd, bufs, off)
                self.nr_reads += 1
            else:
                raise ValueError(f"bad swap op {op!r}")
            if done != want:
                raise SwapIOError(f"short {op} at slot {slot}: {done} of {want} bytes")
        finally:
            self.inflight -= 1

    async def swap_deactivate(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __repr__(self) -> str:
        return f"<LocalFileSwap {self.path} {self.nr_pages} pages>"


def make_swap_header(nr_pages: int, page_size: int) -> bytes:
    """mkswap's header page: version 1, last_page, nr_badpages 0, magic at the end."""
    hdr = bytearray(page_size)
    struct.pack_into("<III", hdr, 1024, 1, nr_pages - 1, 0)
    hdr[page_size - len(SWAP_MAGIC):] = SWAP_MAGIC
    return bytes(hdr)


def check_swap_header(data: bytes | bytearray | memoryview, nr_pages: int, page_size: int) -> None:
    if bytes(data[page_size - len(SWAP_MAGIC):page_size]) != SWAP_MAGIC:
        raise SwapIOError("swap header magic SWAPSPACE2 not found after writing it: storage lost the write")
    version, last_page, _ = struct.unpack_from("<III", data, 1024)
    if version != 1 or last_page != nr_pages - 1:
        raise SwapIOError(f"swap header reads back wrong (version {version}, last_page {last_page})")


class SwapArea:
    """swap_info_struct: one swap device, its slot map and its storage.

    Slot 0 holds the header, as in Linux.  Slots are handed out in ascending runs from
    `cluster_next`, so that a batch of pages goes out as a few large contiguous writes.
    """

    def __init__(self, storage: SwapStorage, nr_slots: int, type_: int = 0, prio: int = -1) -> None:
        if nr_slots < 2:
            raise ValueError(f"a swap area needs at least 2 slots, not {nr_slots}")
        self.storage = storage
        self.type = type_
        self.prio = prio
        self.nr_slots = nr_slots
        self.swap_map = bytearray(nr_slots)  # 0 free, 1 in use (one mapping per anon page here)
        self.swap_map[0] = 0xFF  # header
        self.inuse_pages = 0
        self.cluster_next = 1
        self.fs_backed = bool(getattr(storage, "fs_backed", False))
        self.nr_read_errors = 0
        self.nr_write_errors = 0

    @property
    def nr_free(self) -> int:
        return self.nr_slots - 1 - self.inuse_pages

    def get_swap_page(self) -> int | None:
        """scan_swap_map(): the next free slot at or after cluster_next (wrapping), or None."""
        if self.inuse_pages >= self.nr_slots - 1:
            return None
        m = self.swap_map
        off = m.find(0, self.cluster_next)
        if off < 0:
            off = m.find(0, 1)
        m[off] = 1
        self.inuse_pages += 1
        self.cluster_next = off + 1
        return swp_entry(self.type, off)

    def swap_free(self, entry: int) -> None:
        off = entry & SWP_OFFSET_MASK
        if off <= 0 or off >= self.nr_slots or self.swap_map[off] != 1:
            raise RuntimeError(f"swap_free: bad swap entry {entry:#x} (offset {off})")
        self.swap_map[off] = 0
        self.inuse_pages -= 1

    def __repr__(self) -> str:
        return f"<SwapArea type={self.type} {self.inuse_pages}/{self.nr_slots - 1} used {self.storage!r}>"


def group_contiguous(slots_pages: Sequence[tuple[int, Any]], max_pages: int) -> list[tuple[int, list[Any]]]:
    """Group (slot, page) pairs sorted by slot into runs of contiguous slots of at most max_pages."""
    runs: list[tuple[int, list[Any]]] = []
    start = -2
    cur: list[Any] = []
    for slot, page in slots_pages:
        if cur and slot == start + len(cur) and len(cur) < max_pages:
            cur.append(page)
        else:
            if cur:
                runs.append((start, cur))
            start, cur = slot, [page]
    if cur:
        runs.append((start, cur))
    return runs

