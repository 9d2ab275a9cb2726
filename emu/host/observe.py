"""What a person may ask to see of a run while it goes: the pcapng (`--pcap`), the drop monitor
(`--dropwatch`) and live /proc views (`--proc-dir`).

Everything here observes: it reads counters and views and writes files or lines on stderr; it
never allocates emulated memory, charges the CPU or sleeps, so a run with it gives exactly the
outcome, emulated time and counters of the same run without it (tests/integration/host/
test_observe.py checks that).  Ticks come from the run's sampler (`HostRun._sampler`), which runs
anyway; the /proc files are rewritten at most once a wall-clock second, for `watch cat`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from emu.kernel.policy import Policy
from emu.net.capture import PacketTap
from emu.net.dropmon import DropMonitor

if TYPE_CHECKING:
    from emu.host.kernel import Kernel

PROC_FILES = ("meminfo", "vmstat", "slabinfo", "reserve_info", "nstat", "ss")


@dataclass
class Observe:
    """The observers asked for (all off by default)."""

    pcap: Path | None = None
    pcap_snaplen: int = 128  # bytes kept of each background frame (0: whole); swap traffic stays whole
    pcap_ring: int = 128 << 20  # bytes: the file holds the last this many bytes of frames
    dropwatch: Callable[[str], None] | None = None  # gets one line per (site, socket) each second
    proc_dir: Path | None = None


def proc_views(k: Kernel) -> dict[str, str]:
    """The texts of /proc/meminfo, vmstat, slabinfo, reserve_info, nstat and ss -m, now."""
    return {
        "meminfo": k.mm.meminfo(),
        "vmstat": k.vmstat.vmstat(k.zone),
        "slabinfo": k.slabs.slabinfo(),
        "reserve_info": (k.reserve.reserve_info() if k.reserve is not None and k.policy is Policy.V12
                         else f"# no reserve tree under policy {k.policy}\n"),
        "nstat": k.net.nstat(),
        "ss": k.net.ss(),
    }


def write_proc_dir(d: Path, views: dict[str, str], header: str) -> None:
    """Each view as a file, replaced atomically (a reader never sees half of one)."""
    d.mkdir(parents=True, exist_ok=True)
    for name, text in views.items():
        tmp = d / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, d / name)
    tmp = d / ".status.tmp"
    tmp.write_text(header + "\n")
    os.replace(tmp, d / "status")


class Observers:
    """The observers of one run, fed by its sampler."""

    def __init__(self, opts: Observe, kernel: Kernel, label: str) -> None:
        self.opts = opts
        self.kernel = kernel
        self.label = label
        self.tap: PacketTap | None = None
        self.dropmon = DropMonitor(kernel.net) if opts.dropwatch is not None else None
        self._next_second = 1.0
        self._proc_wall = 0.0
        if opts.pcap is not None:
            reserve = {Policy.V12: "v12 emergency", Policy.PFMEMALLOC: "pfmemalloc"}.get(kernel.policy, "")
            self.tap = PacketTap(snaplen=opts.pcap_snaplen, ring_bytes=opts.pcap_ring, mtu=kernel.net.mtu,
                                 reserve_name=reserve, t0=float(int(time.time())))
            kernel.net.set_tap(self.tap)

    def tick(self, now: float, status: str) -> None:
        o = self.opts
        if self.dropmon is not None and now >= self._next_second:
            self._next_second = int(now) + 1.0
            for line in self.dropmon.lines(now):
                o.dropwatch(f"{self.label} {line}")  # type: ignore[misc]
        if o.proc_dir is not None:
            wall = time.monotonic()
            if wall - self._proc_wall >= 1.0:
                self._proc_wall = wall
                self.write_proc(now, status)

    def write_proc(self, now: float, status: str) -> None:
        if self.opts.proc_dir is not None:
            write_proc_dir(self.opts.proc_dir, proc_views(self.kernel), f"{self.label} t={now:.3f}s {status}")

    def stop(self, now: float, status: str) -> None:
        """The result was taken: the capture stops here, the views show this moment."""
        if self.tap is not None:
            self.tap.stop()
        if self.dropmon is not None:
            for line in self.dropmon.lines(now):
                self.opts.dropwatch(f"{self.label} {line}")  # type: ignore[misc]
        self.write_proc(now, status)

    def write_pcap(self, comment: str) -> dict[str, Any]:
        """Write the capture (after the run); what went into it."""
        tap = self.tap
        if tap is None or self.opts.pcap is None:
            return {}
        t = time.perf_counter()
        self.opts.pcap.parent.mkdir(parents=True, exist_ok=True)
        n = tap.write(str(self.opts.pcap), comment)
        return {"file": str(self.opts.pcap), "frames_written": n, "rx_frames": tap.rx_frames,
                "tx_frames": tap.tx_frames, "left_out": tap.left_out, "snaplen": tap.snaplen,
                "ring_bytes": tap.ring_max, "write_s": round(time.perf_counter() - t, 3)}
