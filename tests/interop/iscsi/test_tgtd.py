"""Our initiator against tgtd (tgtadm recipe in emu/peers/iscsi.py; LUN 1 is the disk), with and without digests."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import trio
from peers import require_binary, require_root

from emu.peers import iscsi as peer
from iscsi.initiator import Initiator, discover

pytestmark = pytest.mark.peers


@pytest.fixture(scope="module")
def tgt(tmp_path_factory: pytest.TempPathFactory) -> Iterator[peer.Daemon]:
    require_root()
    require_binary("tgtd", "tgtadm")
    with peer.tgtd(tmp_path_factory.mktemp("tgtd"), size=64 << 20, digests=True) as d:
        yield d


@pytest.mark.parametrize("digests", [False, True], ids=["plain", "crc32c"])
async def test_write_read_back_byte_identical(tgt: peer.Daemon, digests: bool) -> None:
    async def connect() -> trio.SocketStream:
        return await trio.open_tcp_stream("127.0.0.1", tgt.port)

    assert (tgt.iqn, f"127.0.0.1:{tgt.port},1") in await discover(connect)
    async with Initiator(connect, tgt.iqn, lun=tgt.lun, header_digest=digests, data_digest=digests) as ini:
        assert ini.params is not None
        assert ini.params.header_digest is digests and ini.params.data_digest is digests
        assert (ini.nblocks, ini.block_size) == (131072, 512)
        base = 2048 if digests else 0
        big = os.urandom(1 << 20)  # tgtd: InitialR2T=Yes, 8 KiB segments: R2Ts and many Data-Outs
        await ini.write(base, big, fua=True)
        assert await ini.read(base, len(big) // 512) == big
        pages = {i: os.urandom(4096) for i in range(48)}

        async def page(i: int) -> None:
            await ini.write(base + 4096 + i * 8, pages[i])

        async with trio.open_nursery() as n:
            for i in pages:
                n.start_soon(page, i)
        await ini.synchronize_cache()
        got = {}

        async def back(i: int) -> None:
            got[i] = await ini.read(base + 4096 + i * 8, 8)

        async with trio.open_nursery() as n:
            for i in pages:
                n.start_soon(back, i)
        assert got == pages
        assert await ini.nop(b"are you there") == b"are you there"
    with open(tgt.path, "rb") as f:  # and it is what tgtd put in its backing file
        f.seek(base * 512)
        assert f.read(len(big)) == big
