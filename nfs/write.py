"""Unstable writes and their commit (Linux's nfs/write.c commit lists), sans-IO.

An UNSTABLE WRITE reply means the data may still be lost if the server restarts. The client keeps
the data and the write verifier it got; COMMIT returns the server's current verifier. If the
verifiers differ the server restarted in between and the data must be written again.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from nfs.nfs3 import StableHow


@dataclass
class UncommittedWrite:
    offset: int
    data: bytes
    verf: bytes


@dataclass
class CommitList:
    writes: dict[bytes, list[UncommittedWrite]] = field(default_factory=dict)  # fh -> writes
    resends: int = 0
    verifier_changes: int = 0

    def record(self, fh: bytes, offset: int, data: bytes | bytearray | memoryview, committed: int,
               verf: bytes) -> None:
        """Remember a write whose reply said it is not yet stable."""
        if committed != StableHow.UNSTABLE:
            return
        self.writes.setdefault(fh, []).append(UncommittedWrite(offset, bytes(data), verf))

    def nbytes(self, fh: bytes | None = None) -> int:
        lists = [self.writes.get(fh, [])] if fh is not None else list(self.writes.values())
        return sum(len(w.data) for ws in lists for w in ws)

    def take(self, fh: bytes) -> list[UncommittedWrite]:
        """The writes a COMMIT about to be sent covers (those recorded later wait for the next)."""
        return self.writes.pop(fh, [])

    def restore(self, fh: bytes, ws: list[UncommittedWrite]) -> None:
        """The COMMIT failed: the writes are still uncommitted."""
        if ws:
            self.writes[fh] = ws + self.writes.get(fh, [])

    def lost(self, ws: list[UncommittedWrite], verf: bytes) -> list[UncommittedWrite]:
        """COMMIT succeeded with verifier `verf`: the writes made under another verifier were
        lost by a server restart and must be written again."""
        lost = [w for w in ws if w.verf != verf]
        if lost:
            self.verifier_changes += 1
            self.resends += len(lost)
        return lost
