from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from emu.mm.vm import Vm
from emu.mm.page_alloc import Zone
from emu.mm.swap import LocalFileSwap


@pytest.fixture
def swapfile(tmp_path: Path) -> str:
    return str(tmp_path / "swapfile")


class Host:
    """A zone + Vm + local-file swap, running in its own nursery (cancelled at teardown)."""

    def __init__(self, mm: Vm, storage: LocalFileSwap | None) -> None:
        self.mm = mm
        self.zone = mm.zone
        self.storage = storage


async def start_host(
    nursery: trio.Nursery,
    path: str | None,
    *,
    ram: int = 2 << 20,
    policy: str = "none",
    swap_pages: int = 4096,
    latency: float = 0.0,
    kswapd: bool = True,
    **mm_kw: object,
) -> Host:
    zone = Zone(ram, policy=policy)
    mm = Vm(zone, kswapd=kswapd, **mm_kw)  # type: ignore[arg-type]
    await nursery.start(mm.run)
    storage = None
    if path is not None:
        storage = LocalFileSwap(path, latency=latency)
        await mm.swapon(storage, swap_pages)
    return Host(mm, storage)


@pytest.fixture
async def host_nursery() -> AsyncIterator[trio.Nursery]:
    async with trio.open_nursery() as n:
        yield n
        n.cancel_scope.cancel()


@pytest.fixture
def make_host(host_nursery: trio.Nursery):  # type: ignore[no-untyped-def]
    """make_host(path, ram=..., policy=..., latency=..., kswapd=...) -> Host, running."""

    async def make(path: str | None, **kw: object) -> Host:
        return await start_host(host_nursery, path, **kw)  # type: ignore[arg-type]

    return make
