"""Transports over emulated sockets, for the NFS client and the iSCSI initiator.

`EmuStream` is a `trio.abc.Stream` and `EmuDatagram` has the shape of `nfs/transport.py`'s
`DatagramTransport` (`send`, `recv`, `aclose`).  Every byte they send is paid for with TX skbs
(allocated with the socket's `sk_allocation`, freed when the real socket took it) and every byte
they receive went through the receive stage as charged RX skbs, freed as it is read.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from emu.net.sock import Sock


class _OwnsSock:
    """What both transports do with the emulated socket they wrap."""

    sock: Sock

    async def aclose(self) -> None:
        self.sock.close()
        await trio.lowlevel.checkpoint()

    def sk_set_memalloc(self) -> None:
        self.sock.sk_set_memalloc()

    def sk_clear_memalloc(self) -> None:
        self.sock.sk_clear_memalloc()


class EmuStream(_OwnsSock, trio.abc.Stream):
    """A TCP connection of the emulated host."""

    def __init__(self, sock: Sock) -> None:
        if sock.proto != "tcp":
            raise ValueError("EmuStream needs a TCP socket")
        self.sock = sock
        self._sending = False
        self._receiving = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        if self.sock.closed:
            raise trio.ClosedResourceError("stream closed")
        self._sending = True
        try:
            try:
                await self.sock.sendmsg(data)
            except OSError as exc:
                raise trio.BrokenResourceError(str(exc)) from exc
        finally:
            self._sending = False

    async def wait_send_all_might_not_block(self) -> None:
        if self.sock.closed:
            raise trio.ClosedResourceError("stream closed")
        await self.sock.tsock.wait_writable()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving on this stream")
        if self.sock.closed:
            raise trio.ClosedResourceError("stream closed")
        self._receiving = True
        try:
            try:
                return await self.sock.recv(max_bytes if max_bytes is not None else 65536)
            except OSError as exc:
                if self.sock.closed:
                    raise trio.ClosedResourceError("stream closed") from exc
                raise trio.BrokenResourceError(str(exc)) from exc
        finally:
            self._receiving = False


class EmuDatagram(_OwnsSock):
    """A connected UDP socket of the emulated host (nfs.transport.DatagramTransport)."""

    def __init__(self, sock: Sock) -> None:
        if sock.proto != "udp":
            raise ValueError("EmuDatagram needs a UDP socket")
        self.sock = sock

    async def send(self, data: bytes) -> None:
        if self.sock.closed:
            raise trio.ClosedResourceError("transport closed")
        await self.sock.sendmsg(data)

    async def recv(self) -> bytes:
        data, _ = await self.sock.recvfrom()
        return data
