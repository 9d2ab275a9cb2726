"""Helpers for the network stack tests (imported as `nethelp`)."""

from __future__ import annotations

import socket
from collections.abc import Callable

import trio

from emu.mm.gfp import GFP_ATOMIC
from emu.mm.page_alloc import Page, Zone


def hog(zone: Zone) -> list[Page]:
    """Take every page an ordinary atomic caller can get (process context, no PF_MEMALLOC):
    what is left is reachable only by ALLOC_NO_WATERMARKS (the reserve)."""
    pages: list[Page] = []
    while (got := zone.alloc_pages(GFP_ATOMIC)) is not None:
        pages.extend(got)
    return pages


def send_udp(port: int, payloads: list[bytes], src: str = "127.0.0.1") -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.bind((src, 0))
        for p in payloads:
            s.sendto(p, ("127.0.0.1", port))
    finally:
        s.close()


async def wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not cond():
            await trio.sleep(0.005)
