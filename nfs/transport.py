"""Client transports: what the NFS client sends its RPCs over.

- Stream transport: any `trio.abc.Stream` (a `trio.SocketStream`, or the emulated host's
  `EmuStream`); RPCs go in TCP record marking.
- Datagram transport: anything with the `DatagramTransport` methods; `udp_connect` makes one
  over a plain connected trio UDP socket.

Clients take a *connect factory* (`Callable[[], Awaitable[transport]]`), never a socket, so they
can reconnect. `RequestBuffers` lets a caller account the memory of each request (the emulated
host charges its slab for it); `NullBuffers` accounts nothing.
"""

from __future__ import annotations

import socket as pysocket
from collections.abc import Awaitable, Callable
from typing import Protocol, runtime_checkable

import trio

UDP_MAX_DATAGRAM = 65536


@runtime_checkable
class DatagramTransport(Protocol):
    async def send(self, data: bytes) -> None: ...

    async def recv(self) -> bytes: ...

    async def aclose(self) -> None: ...


Transport = trio.abc.Stream | DatagramTransport
ConnectFactory = Callable[[], Awaitable[Transport]]


class UdpTransport:
    """A connected UDP socket: one datagram per RPC message."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock

    async def send(self, data: bytes | bytearray | memoryview) -> None:
        await self.sock.send(data)

    async def recv(self) -> bytes:
        """The next datagram. ConnectionRefusedError: an ICMP port unreachable came for an
        earlier datagram (nobody listens there, yet); the socket stays usable."""
        return await self.sock.recv(UDP_MAX_DATAGRAM)

    async def aclose(self) -> None:
        self.sock.close()
        await trio.lowlevel.checkpoint()


async def udp_connect(host: str, port: int) -> UdpTransport:
    family = pysocket.AF_INET6 if ":" in host else pysocket.AF_INET
    sock = trio.socket.socket(family, pysocket.SOCK_DGRAM)
    try:
        sock.setsockopt(pysocket.SOL_SOCKET, pysocket.SO_RCVBUF, 4 * 1024 * 1024)
        await sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return UdpTransport(sock)


async def tcp_connect(host: str, port: int) -> trio.SocketStream:
    stream = await trio.open_tcp_stream(host, port)
    stream.setsockopt(pysocket.IPPROTO_TCP, pysocket.TCP_NODELAY, 1)
    return stream


class RequestBuffers(Protocol):
    """Accounting hook: `alloc` before a request is sent (may sleep, e.g. to reclaim memory),
    `free` once its reply has been processed (or the request abandoned)."""

    async def alloc(self, nbytes: int) -> object: ...

    def free(self, token: object) -> None: ...


class NullBuffers:
    async def alloc(self, nbytes: int) -> object:
        return None

    def free(self, token: object) -> None:
        return None


def is_stream(transport: object) -> bool:
    return isinstance(transport, trio.abc.Stream)
