"""XDR (RFC 4506) encoding and decoding with `struct` (xdrlib is gone in Python 3.13).

`Packer` appends to a bytearray; `Unpacker` reads from any buffer without copying opaque data
(it hands out memoryviews), which keeps the READ/WRITE hot path free of needless copies.
Every decode error is an `XdrError`, so a server can answer GARBAGE_ARGS for any undecodable call.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Protocol, TypeVar

T = TypeVar("T")

_U32 = struct.Struct(">I")
_I32 = struct.Struct(">i")
_U64 = struct.Struct(">Q")
_I64 = struct.Struct(">q")
_PAD = (b"", b"\0\0\0", b"\0\0", b"\0")


class XdrError(ValueError):
    """The bytes are not a valid XDR encoding of the expected type."""


def pad_len(n: int) -> int:
    return (4 - (n & 3)) & 3


def fs_name(s: str | bytes) -> bytes:
    """A name or path as the bytes it is on disk: str names hold undecodable bytes as
    surrogates (as os.fsdecode makes them), so non-UTF-8 names go out unchanged."""
    return s if isinstance(s, bytes) else s.encode("utf-8", "surrogateescape")


class Payload(Protocol):
    """Bulk data handed to a Packer by reference: bytes, a memoryview, a file segment."""

    def __len__(self) -> int: ...


class Packer:
    """Appends XDR to a bytearray. Bulk data (READ results, WRITE arguments) can be added by
    reference with `payload()`: the encoding is then the iovec `iov()`, Linux's xdr_buf with
    its head, pages and tail, so the data is never copied into the message."""

    __slots__ = ("buf", "_iov")

    def __init__(self, buf: bytearray | None = None) -> None:
        self.buf = buf if buf is not None else bytearray()
        self._iov: list[Payload] | None = None

    def payload(self, data: Payload) -> None:
        """The bytes of an opaque whose length the caller already packed, by reference, and
        their padding."""
        if self._iov is None:
            self._iov = []
        self._iov += (self.buf, data)
        self.buf = bytearray(_PAD[len(data) & 3])

    def iov(self) -> list[Payload]:
        """The whole encoding, as buffers to send in order."""
        return [*self._iov, self.buf] if self._iov else [self.buf]

    def u32(self, v: int) -> None:
        self.buf += _U32.pack(v)

    def i32(self, v: int) -> None:
        self.buf += _I32.pack(v)

    def u64(self, v: int) -> None:
        self.buf += _U64.pack(v)

    def i64(self, v: int) -> None:
        self.buf += _I64.pack(v)

    def bool(self, v: bool) -> None:
        self.buf += _U32.pack(1 if v else 0)

    def fopaque(self, data: bytes | bytearray | memoryview, size: int) -> None:
        """Fixed-length opaque[size]."""
        if len(data) != size:
            raise XdrError(f"fixed opaque needs {size} bytes, got {len(data)}")
        self.buf += data
        self.buf += _PAD[size & 3]

    def opaque(self, data: bytes | bytearray | memoryview, limit: int | None = None) -> None:
        """Variable-length opaque<limit>."""
        n = len(data)
        if limit is not None and n > limit:
            raise XdrError(f"opaque of {n} bytes exceeds its limit {limit}")
        self.buf += _U32.pack(n)
        self.buf += data
        self.buf += _PAD[n & 3]

    def string(self, s: str | bytes, limit: int | None = None) -> None:
        self.opaque(fs_name(s), limit)

    def array(self, items: list[T], pack: Callable[[T], None], limit: int | None = None) -> None:
        if limit is not None and len(items) > limit:
            raise XdrError(f"array of {len(items)} exceeds its limit {limit}")
        self.u32(len(items))
        for it in items:
            pack(it)

    def optional(self, item: T | None, pack: Callable[[T], None]) -> None:
        if item is None:
            self.bool(False)
        else:
            self.bool(True)
            pack(item)

    def raw(self, data: bytes | bytearray | memoryview) -> None:
        self.buf += data

    def bytes(self) -> bytes:
        return bytes(self.buf)


class Unpacker:
    __slots__ = ("buf", "pos", "end")

    def __init__(self, buf: bytes | bytearray | memoryview, pos: int = 0) -> None:
        self.buf = memoryview(buf) if not isinstance(buf, memoryview) else buf
        if self.buf.format != "B" or self.buf.ndim != 1:
            self.buf = self.buf.cast("B")
        self.pos = pos
        self.end = len(self.buf)

    def _need(self, n: int) -> int:
        p = self.pos
        if n < 0 or p + n > self.end:
            raise XdrError(f"truncated: need {n} bytes at offset {p}, have {self.end - p}")
        self.pos = p + n
        return p

    def u32(self) -> int:
        v: int = _U32.unpack_from(self.buf, self._need(4))[0]
        return v

    def i32(self) -> int:
        v: int = _I32.unpack_from(self.buf, self._need(4))[0]
        return v

    def u64(self) -> int:
        v: int = _U64.unpack_from(self.buf, self._need(8))[0]
        return v

    def i64(self) -> int:
        v: int = _I64.unpack_from(self.buf, self._need(8))[0]
        return v

    def bool(self) -> bool:
        v = self.u32()
        if v > 1:
            raise XdrError(f"bool must be 0 or 1, got {v}")
        return v == 1

    def enum(self, allowed: object) -> int:
        v = self.u32()
        if v not in allowed:  # type: ignore[operator]
            raise XdrError(f"enum value {v} not allowed")
        return v

    def fopaque_view(self, size: int) -> memoryview:
        p = self._need(size + pad_len(size))
        return self.buf[p : p + size]

    def fopaque(self, size: int) -> bytes:
        return bytes(self.fopaque_view(size))

    def opaque_view(self, limit: int | None = None) -> memoryview:
        n = self.u32()
        if limit is not None and n > limit:
            raise XdrError(f"opaque of {n} bytes exceeds its limit {limit}")
        return self.fopaque_view(n)

    def opaque(self, limit: int | None = None) -> bytes:
        return bytes(self.opaque_view(limit))

    def string(self, limit: int | None = None) -> str:
        try:
            return bytes(self.opaque_view(limit)).decode("utf-8", "surrogateescape")
        except UnicodeDecodeError as e:  # pragma: no cover - surrogateescape never fails
            raise XdrError(str(e)) from e

    def array(self, unpack: Callable[[], T], limit: int | None = None) -> list[T]:
        n = self.u32()
        if limit is not None and n > limit:
            raise XdrError(f"array of {n} exceeds its limit {limit}")
        if n > self.end - self.pos:  # every element takes at least one byte
            raise XdrError(f"array of {n} elements cannot fit in {self.end - self.pos} bytes")
        return [unpack() for _ in range(n)]

    def optional(self, unpack: Callable[[], T]) -> T | None:
        return unpack() if self.bool() else None

    def remaining(self) -> int:
        return self.end - self.pos

    def rest(self) -> memoryview:
        p = self.pos
        self.pos = self.end
        return self.buf[p:]

    def done(self) -> None:
        """Strict end: trailing bytes mean the call was not what it claimed to be."""
        if self.pos != self.end:
            raise XdrError(f"{self.end - self.pos} trailing bytes")
