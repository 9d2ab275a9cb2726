"""Unstable writes and their commit (Linux's nfs/write.c commit lists), sans-IO.

An UNSTABLE WRITE reply means the data may still be lost if the server restarts. The client keeps
the data and the write verifier it got; COMMIT returns the server's current verifier. If the
verifiers differ the server restarted in between and the data must be written again.

The data kept is bounded (`max_bytes`, like Linux's dirty limits): past it the driver commits
first, or writes FILE_SYNC what would not fit even then. A COMMIT covers a byte range (count 0:
to the end of the file); only the writes wholly inside it are settled by its reply.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from nfs.nfs3 import StableHow

DEFAULT_MAX_UNCOMMITTED = 8 * 1024 * 1024


@dataclass
class UncommittedWrite:
    offset: int
    data: bytes
    verf: bytes

    def inside(self, offset: int, count: int) -> bool:
        return self.offset >= offset and (count == 0 or self.offset + len(self.data) <= offset + count)


@dataclass
class CommitList:
    writes: dict[bytes, list[UncommittedWrite]] = field(default_factory=dict)  # fh -> writes
    max_bytes: int = DEFAULT_MAX_UNCOMMITTED
    resends: int = 0
    verifier_changes: int = 0
    held: int = 0  # bytes of all the writes kept

    def record(self, fh: bytes, offset: int, data: bytes | bytearray | memoryview, committed: int,
               verf: bytes) -> None:
        """Remember a write whose reply said it is not yet stable."""
        if committed != StableHow.UNSTABLE:
            return
        self.writes.setdefault(fh, []).append(UncommittedWrite(offset, bytes(data), verf))
        self.held += len(data)

    def nbytes(self, fh: bytes | None = None) -> int:
        if fh is None:
            return self.held
        return sum(len(w.data) for w in self.writes.get(fh, []))

    def room(self, n: int) -> bool:
        """Would keeping n more bytes stay within max_bytes?"""
        return self.held + n <= self.max_bytes

    def take(self, fh: bytes, offset: int = 0, count: int = 0) -> list[UncommittedWrite]:
        """The writes a COMMIT of [offset, offset+count) about to be sent settles: those wholly
        inside the range (the rest, and those recorded later, wait for another COMMIT)."""
        ws = self.writes.pop(fh, [])
        covered = [w for w in ws if w.inside(offset, count)]
        rest = [w for w in ws if not w.inside(offset, count)]
        if rest:
            self.writes[fh] = rest
        self.held -= sum(len(w.data) for w in covered)
        return covered

    def restore(self, fh: bytes, ws: list[UncommittedWrite]) -> None:
        """The COMMIT failed: the writes are still uncommitted."""
        if ws:
            self.writes[fh] = ws + self.writes.get(fh, [])
            self.held += sum(len(w.data) for w in ws)

    def lost(self, ws: list[UncommittedWrite], verf: bytes) -> list[UncommittedWrite]:
        """COMMIT succeeded with verifier `verf`: the writes made under another verifier were
        lost by a server restart and must be written again."""
        lost = [w for w in ws if w.verf != verf]
        if lost:
            self.verifier_changes += 1
            self.resends += len(lost)
        return lost

    def files(self) -> list[bytes]:
        """Handles with writes kept, most bytes first."""
        return sorted(self.writes, key=lambda fh: -self.nbytes(fh))
