"""UNIT ATTENTION conditions of one logical unit, per I_T nexus (SAM-5 §5.14, SPC-4 §5.14).

Something happened that an initiator must hear of before its next command: a reset, a reservation
preempted or released, mode parameters changed. The next command from that I_T nexus (except
INQUIRY, REPORT LUNS and REQUEST SENSE) ends with CHECK CONDITION, UNIT ATTENTION and the
condition, which is then cleared. Resets are reported first.
"""

from __future__ import annotations

from collections.abc import Iterable

from .nexus import Nexus
from .sense import Sense, SenseKey

MAX_PENDING = 16  # conditions kept per nexus; more of them say nothing new

Condition = tuple[int, int]  # ASC, ASCQ


class UnitAttentions:
    def __init__(self) -> None:
        self.pending: dict[Nexus, list[Condition]] = {}

    def __bool__(self) -> bool:
        return bool(self.pending)

    def establish(self, nexuses: Iterable[Nexus], condition: Condition) -> None:
        for nexus in nexuses:
            queue = self.pending.setdefault(nexus, [])
            if condition in queue:
                continue
            if condition[0] == 0x29:  # a reset: reported before anything else
                queue.insert(0, condition)
            elif len(queue) < MAX_PENDING:
                queue.append(condition)

    def take(self, nexus: Nexus) -> Sense | None:
        """The condition to report to `nexus` now (cleared by reporting it), if any."""
        queue = self.pending.get(nexus)
        if not queue:
            return None
        asc, ascq = queue.pop(0)
        if not queue:
            del self.pending[nexus]
        return Sense(SenseKey.UNIT_ATTENTION, asc, ascq)

    def forget(self, nexus: Nexus) -> None:
        """The I_T nexus is gone: nobody is left to hear its conditions."""
        self.pending.pop(nexus, None)
