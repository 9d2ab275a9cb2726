"""TCP record marking (RFC 5531 §11): each record is one or more fragments, each preceded by a
4-byte big-endian mark whose bit 31 says "last fragment" and whose low 31 bits give its length.

`RecordDecoder` is sans-IO. Bytes go in either with `feed(data)` or, on the hot path, straight
into the decoder's own buffer: `buf = dec.get_buffer()`, `n = sock.recv_into(buf)`,
`dec.commit(n)` — so a 1 MiB WRITE is received without an extra copy. Records come out of
`next_record()` as memoryviews; `recycle()` hands a buffer back for reuse. A record (all
fragments together) larger than `max_record` raises `RecordTooLarge` before any of its payload
is buffered. A mark only *announces* bytes: the record's buffer grows as they actually arrive
(a recycled buffer is used when one is big enough), so a peer that announces 4 MiB and sends 10
bytes costs 10 bytes, not 4 MiB. `received` tells the driver how many bytes it holds, to charge
to a byte budget; `in_record` whether a record is only partly there (a stall is timed).
"""

from __future__ import annotations

import struct

LAST_FRAG = 0x8000_0000
_MIN_GROW = 16 * 1024
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
        self._ready_bytes = 0  # payload bytes of the records in _ready

    # -- the state machine ------------------------------------------------------------------

    def _start_fragment(self, mark: int) -> None:
        length = mark & 0x7FFF_FFFF
        self._last = bool(mark & LAST_FRAG)
        total = self._rec_len + length
        if total > self.max_record:
            raise RecordTooLarge(f"record of at least {total} bytes exceeds the limit {self.max_record}")
        # A recycled buffer that already fits the fragment is used as is (no allocation); a new
        # one is only grown as the payload arrives (_ensure), never sized from the mark alone.
        if self._rec_len == 0 and len(self._rec) < total and (spare := self.pool.get(total)) is not None:
            self._rec = spare
        self._frag_left = length
        self._in_frag = True
        if length == 0:
            self._end_fragment()

    def _ensure(self, want: int) -> None:
        """Room for `want` more payload bytes of the current fragment (at least min(want, a
        growth step)), doubling the buffer so a big fragment costs few reallocations."""
        need = self._rec_len + min(want, self._frag_left)
        cap = len(self._rec)
        if cap >= need:
            return
        end = self._rec_len + self._frag_left  # the fragment never needs more than this
        new_cap = min(end, max(need, 2 * cap, _MIN_GROW))
        self._rec += bytes(new_cap - cap)  # (realloc: large buffers grow in place with mremap)

    def _end_fragment(self) -> None:
        self._in_frag = False
        if self._last:
            self._ready.append(memoryview(self._rec)[: self._rec_len])
            self._ready_bytes += self._rec_len
            self._rec = bytearray()
            self._rec_len = 0

    def recycle(self, record: memoryview) -> None:
        """The consumer is done with `record` (and holds no view of it any more): its buffer may
        hold the next record, so a connection does not allocate a fresh buffer per call."""
        buf = record.obj
        record.release()
        if isinstance(buf, bytearray) and len(buf) <= self.max_record:
            self.pool.put(buf)

    def feed(self, data: bytes | bytearray | memoryview, stop_after_mark: bool = False) -> int:
        """Take bytes from the stream; returns how many were taken. With `stop_after_mark` it
        stops right after a record mark whose fragment's payload is not all in `data` (before
        that payload), so the driver can charge the bytes the mark announced before any more of
        them is buffered (a payload that is all there already is in memory: it is taken)."""
        mv = memoryview(data)
        total = len(mv)
        while len(mv):
            if not self._in_frag:
                if not self._mark and len(mv) >= 4:  # (a whole mark: the usual case)
                    mark = _MARK.unpack_from(mv)[0]
                    mv = mv[4:]
                else:
                    need = 4 - len(self._mark)
                    self._mark += mv[:need]
                    mv = mv[need:]
                    if len(self._mark) < 4:
                        continue
                    mark = _MARK.unpack(self._mark)[0]
                    self._mark.clear()
                self._start_fragment(mark)
                if stop_after_mark and self._in_frag and self._frag_left > len(mv):
                    break
                continue
            take = min(self._frag_left, len(mv))
            self._ensure(take)
            self._rec[self._rec_len : self._rec_len + take] = mv[:take]
            self._rec_len += take
            self._frag_left -= take
            mv = mv[take:]
            if self._frag_left == 0:
                self._end_fragment()
        return total - len(mv)

    # -- zero-copy receive ------------------------------------------------------------------

    def get_buffer(self, hint: int = 256 * 1024) -> memoryview | None:
        """A buffer to recv_into for the current fragment's payload (at most `hint` bytes more
        than already arrived are allocated for it), or None when the decoder needs mark bytes
        (then use feed() with a small read). Release the view before calling commit()."""
        if not self._in_frag or self._frag_left == 0:
            return None
        self._ensure(hint)
        start = self._rec_len
        return memoryview(self._rec)[start : start + min(self._frag_left, len(self._rec) - start)]

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
        if not self._ready:
            return None
        rec = self._ready.pop(0)
        self._ready_bytes -= len(rec)
        return rec

    @property
    def buffered(self) -> int:
        """Payload bytes held: received but not yet handed out, plus records handed out by
        next_record() that were not recycled are the caller's."""
        return self._rec_len + len(self._mark) + self._ready_bytes

    @property
    def received(self) -> int:
        """Payload bytes that arrived for the record being assembled and the records ready to
        hand out: what a byte budget charges (a mark alone announces, it costs nothing)."""
        return self._rec_len + self._ready_bytes

    @property
    def frag_left(self) -> int:
        """Payload bytes the current fragment still expects (0 between fragments)."""
        return self._frag_left if self._in_frag else 0

    @property
    def in_record(self) -> bool:
        """Part of a record (a mark, or some of its payload) arrived, not all of it."""
        return self._in_frag or self._rec_len > 0 or len(self._mark) > 0

    @property
    def reserved(self) -> int:
        """Bytes the marks seen so far announced for the record being assembled and the records
        ready to hand out: what a byte budget must cover before they are read."""
        return self._rec_len + (self._frag_left if self._in_frag else 0) + self._ready_bytes

    @property
    def allocated(self) -> int:
        """Bytes of memory the decoder's record buffer holds now (grown as payload arrives)."""
        return len(self._rec)
