"""Which kernel's reserve design the emulated host runs: the one knob every layer is built for.

It lives in the base layer because everything above reads it (mm decides allocations by it, net
drops by it, a scenario names it) and none of them should import another layer for a name.
"""

from __future__ import annotations

import enum


class Policy(str, enum.Enum):
    """Which kernel's reserve design the emulated host runs."""

    NONE = "none"  # vanilla ~2.6.22
    V12 = "v12"  # Zijlstra's swap-over-network series, v12 (2007)
    PFMEMALLOC = "pfmemalloc"  # Mel Gorman's design, merged in Linux 3.6

    def __str__(self) -> str:
        return self.value
