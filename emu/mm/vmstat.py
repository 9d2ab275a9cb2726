"""Event counters by their /proc/vmstat names, and the /proc/meminfo and /proc/vmstat views."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

from emu.mm.sizes import K

if TYPE_CHECKING:
    from emu.mm.page_alloc import Zone

# Listed first (and always) in vmstat(); other names appear once counted.
VM_EVENTS = (
    "pgalloc",
    "pgfree",
    "pgalloc_pfmemalloc",  # emulator: pages handed out below the watermarks (ALLOC_NO_WATERMARKS)
    "pgalloc_fail",  # emulator: allocation attempts that returned NULL
    "pgfault",
    "pgmajfault",
    "pgscan_kswapd",
    "pgscan_direct",
    "pgscan_direct_throttle",
    "pgsteal",
    "pgrotated",
    "pgactivate",
    "pswpin",
    "pswpout",
    "allocstall",
    "kswapd_wakeup",
    "pageoutrun",
    "swap_ra",
    "swap_ra_hit",
    "oom_kill",
)


class VmStat:
    """Counters by kernel name.  `inc` is on hot paths: it is a dict add."""

    __slots__ = ("counters",)

    def __init__(self) -> None:
        self.counters: Counter[str] = Counter({name: 0 for name in VM_EVENTS})

    def inc(self, name: str, n: int = 1) -> None:
        self.counters[name] += n

    def __getitem__(self, name: str) -> int:
        return self.counters[name]

    def snapshot(self) -> dict[str, int]:
        return dict(self.counters)

    def vmstat(self, zone: Zone | None = None) -> str:
        """/proc/vmstat: `name value` lines (zone state first when a zone is given)."""
        lines = []
        if zone is not None:
            lines.append(f"nr_free_pages {zone.nr_free}")
            for k, v in zone.page_state().items():
                lines.append(f"{k} {v}")
        lines.extend(f"{k} {v}" for k, v in self.counters.items())
        return "\n".join(lines) + "\n"

    def meminfo(self, zone: Zone, extra_kb: dict[str, int] | None = None) -> str:
        """/proc/meminfo for one zone (`extra_kb` adds lines such as Slab: or SwapTotal:)."""
        ps = zone.page_size
        st = zone.page_state()
        rows: list[tuple[str, int]] = [
            ("MemTotal", K(zone.nr_pages, ps)),
            ("MemFree", K(zone.nr_free, ps)),
            ("AnonPages", K(st.get("nr_anon_pages", 0), ps)),
            ("SwapCached", K(st.get("nr_swapcache", 0), ps)),
            ("Dirty", K(st.get("nr_dirty", 0), ps)),
            ("Writeback", K(st.get("nr_writeback", 0), ps)),
            ("Slab", K(st.get("nr_slab", 0), ps)),
        ]
        rows.extend((extra_kb or {}).items())
        rows.append(("MinFreeKbytes", zone.min_free_kbytes))
        rows.append(("EmergPages", K(zone.pages_emerg, ps)))
        return "".join(f"{(name + ':'):<16}{value:>8} kB\n" for name, value in rows)
