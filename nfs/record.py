"""TCP record marking (RFC 5531 §11): each record is one or more fragments, each preceded by a
4-byte big-endian mark whose bit 31 says "last fragment" and whose low 31 bits give its length.

`RecordDecoder` is sans-IO. Bytes go in either with `feed(data)` or, on the hot path, straight
into the decoder's own buffer: `buf = dec.get_buffer()`, `n = sock.recv_into(buf)`,
`dec.commit(n)` — so a 1 MiB WRITE is received without an extra copy. Records come out of
`next_record()` as memoryviews; `recycle()` hands a buffer back for reuse. A record (all
fragments together) larger than `max_record` raises `RecordTooLarge` before any of its payload
is buffered, so buffering is always bounded.
"""

from __future__ import annotations

import struct

LAST_FRAG = 0x8000_0000
_MARK = struct.Struct(">I")

DEFAULT_MAX_RECORD = 4 * 1024 * 1024 + 64 * 1024


class BufferPool:
    """A few record-sized buffers to reuse, so a connection (or the server's write-behind, which
    hands buffers back once their data is on disk) does not fault in a fresh megabyte per call."""

    def __init__(self, max_buffers: int = 8) -> None:
        self.max_buffers = max_buffers
        self._free: list[bytearray] = []

    def get(self, n: int) -> bytearray | None:
        for i, buf in enumerate(self._free):
            if len(buf) >= n:
                return self._free.pop(i)
        return None

    def put(self, buf: object) -> None:
        if isinstance(buf, bytearray) and len(self._free) < self.max_buffers:
            self._free.append(buf)


class RecordTooLarge(Exception):
    """A record mark announced more bytes than the receiver accepts: close the connection."""


def encode_record(msg: bytes | bytearray | memoryview, max_fragment: int = 0x7FFF_FFFF) -> bytes:
    """Frame one message as a record (several fragments if it is longer than max_fragment)."""
    n = len(msg)
    if n <= max_fragment:
        return _MARK.pack(LAST_FRAG | n) + bytes(msg)
    out = bytearray()
    mv = memoryview(msg)
    for off in range(0, n, max_fragment):
        chunk = mv[off : off + max_fragment]
        last = off + max_fragment >= n
        out += _MARK.pack((LAST_FRAG if last else 0) | len(chunk))
        out += chunk
    return bytes(out)


def record_mark(n: int) -> bytes:
    return _MARK.pack(LAST_FRAG | n)


class RecordDecoder:
    """Reassemble records from a byte stream (any split of the bytes gives the same records)."""

    def __init__(self, max_record: int = DEFAULT_MAX_RECORD, pool: BufferPool | None = None) -> None:
        self.max_record = max_record
        self.pool = pool if pool is not None else BufferPool(1)
        self._mark = bytearray()  # partial 4-byte mark
        self._frag_left = 0  # payload bytes still expected for the current fragment
        self._last = False
        self._rec = bytearray()  # the record being assembled (pre-sized; may be longer)
        self._rec_len = 0  # bytes of payload already in _rec
        self._in_frag = False
        self._ready: list[memoryview] = []

    # -- the state machine ------------------------------------------------------------------

    def _start_fragment(self, mark: int) -> None:
        length = mark & 0x7FFF_FFFF
        self._last = bool(mark & LAST_FRAG)
        total = self._rec_len + length
        if total > self.max_record:
            raise RecordTooLarge(f"record of at least {total} bytes exceeds the limit {self.max_record}")
        # Size the buffer to hold this fragment so recv_into can write straight into it: a
        # recycled buffer if it is big enough, else a new one (never a zero-filled temporary).
        if self._rec_len == 0 and len(self._rec) < total and (spare := self.pool.get(total)) is not None:
            self._rec = spare
        elif len(self._rec) < total:
            if self._rec_len == 0:
                self._rec = bytearray(total)
            else:
                grown = bytearray(total)
                grown[: self._rec_len] = memoryview(self._rec)[: self._rec_len]
                self._rec = grown
        self._frag_left = length
        self._in_frag = True
        if length == 0:
            self._end_fragment()

    def _end_fragment(self) -> None:
        self._in_frag = False
        if self._last:
            self._ready.append(memoryview(self._rec)[: self._rec_len])
            self._rec = bytearray()
            self._rec_len = 0

    def recycle(self, record: memoryview) -> None:
        """The consumer is done with `record` (and holds no view of it any more): its buffer may
        hold the next record, so a connection does not allocate a fresh buffer per call."""
        buf = record.obj
        record.release()
        if isinstance(buf, bytearray) and len(buf) <= self.max_record:
            self.pool.put(buf)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        mv = memoryview(data)
        while len(mv):
            if not self._in_frag:
                need = 4 - len(self._mark)
                self._mark += mv[:need]
                mv = mv[need:]
                if len(self._mark) == 4:
                    mark = _MARK.unpack(self._mark)[0]
                    self._mark.clear()
                    self._start_fragment(mark)
                continue
            take = min(self._frag_left, len(mv))
            self._rec[self._rec_len : self._rec_len + take] = mv[:take]
            self._rec_len += take
            self._frag_left -= take
            mv = mv[take:]
            if self._frag_left == 0:
                self._end_fragment()

    # -- zero-copy receive ------------------------------------------------------------------

    def get_buffer(self) -> memoryview | None:
        """A buffer to recv_into for the current fragment's payload, or None when the decoder
        needs mark bytes (then use feed() with a small read)."""
        if not self._in_frag or self._frag_left == 0:
            return None
        start = self._rec_len
        return memoryview(self._rec)[start : start + self._frag_left]

    def commit(self, n: int) -> None:
        """Account for n payload bytes written into the buffer from get_buffer()."""
        if n > self._frag_left:
            raise ValueError("commit beyond the fragment")
        self._rec_len += n
        self._frag_left -= n
        if self._frag_left == 0:
            self._end_fragment()

    def wants_mark(self) -> int:
        """Bytes of record mark still needed (0 while inside a fragment)."""
        return 0 if self._in_frag else 4 - len(self._mark)

    def next_record(self) -> memoryview | None:
        """The next complete record: a view of a buffer owned by the caller from now on (give it
        back with recycle() once nothing refers to it)."""
        return self._ready.pop(0) if self._ready else None

    @property
    def buffered(self) -> int:
        return self._rec_len + len(self._mark) + sum(len(r) for r in self._ready)
