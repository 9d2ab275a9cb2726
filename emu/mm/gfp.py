"""GFP flags (get-free-page modifiers).

Bit values follow 2.6.22's include/linux/gfp.h where the flag existed then; __GFP_MEMALLOC is 3.6's
value and __GFP_EMERGENCY (the v12 series' flag) sits in a bit that was free at the time.
"""

from __future__ import annotations

import enum


class Gfp(enum.IntFlag):
    """`__GFP_*` modifiers.  Spelled without the leading underscores (Python mangles `__X`)."""

    HIGHMEM = 0x02
    WAIT = 0x10  # may sleep (and so may reclaim)
    HIGH = 0x20  # may dip below min by half (GFP_ATOMIC)
    IO = 0x40  # may start physical I/O
    FS = 0x80  # may call into the filesystem (swap over NFS is a filesystem)
    MEMALLOC = 0x2000  # 3.6: use the reserve unconditionally
    NOMEMALLOC = 0x10000  # never use the reserve (overrides everything)
    HARDWALL = 0x20000
    EMERGENCY = 0x100000  # v12: may use the emergency reserve

    def __str__(self) -> str:
        if not self.value:
            return "0"
        return "|".join(f"__GFP_{m.name}" for m in Gfp if m.value & self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)


GFP_NOWAIT = Gfp(0)
GFP_ATOMIC = Gfp.HIGH
GFP_NOIO = Gfp.WAIT
GFP_NOFS = Gfp.WAIT | Gfp.IO
GFP_KERNEL = Gfp.WAIT | Gfp.IO | Gfp.FS
GFP_USER = GFP_KERNEL | Gfp.HARDWALL
GFP_HIGHUSER = GFP_KERNEL | Gfp.HARDWALL | Gfp.HIGHMEM

# Names a kernel engineer would write, for reports and for parsing `--gfp` style inputs.
GFP_NAMES: dict[str, Gfp] = {
    "GFP_NOWAIT": GFP_NOWAIT,
    "GFP_ATOMIC": GFP_ATOMIC,
    "GFP_NOIO": GFP_NOIO,
    "GFP_NOFS": GFP_NOFS,
    "GFP_KERNEL": GFP_KERNEL,
    "GFP_USER": GFP_USER,
    "GFP_HIGHUSER": GFP_HIGHUSER,
}


def gfp_name(gfp: Gfp) -> str:
    """`GFP_KERNEL`, or `GFP_NOIO|__GFP_MEMALLOC`: the base mask's name plus extra modifiers."""
    best = ""
    best_bits = -1
    for name, mask in GFP_NAMES.items():
        if mask & ~gfp == 0 and bin(mask).count("1") > best_bits:
            best, best_bits = name, bin(mask).count("1")
    rest = Gfp(gfp & ~GFP_NAMES[best])
    return best if not rest else f"{best}|{rest}"
