"""The host's one CPU and the cost table that says how long its work takes.

Emulated time advances by the *modelled* cost of what the host does, so a run's outcome is the
model's, not the machine's (see `emu.kernel.clock`).  Each entry of `Costs` is one kind of work,
in seconds (or bits per second for the link), with a default taken from published figures of the
seed's era (2007: a 2-3 GHz x86 server with DDR2 memory on gigabit Ethernet); `COST_SOURCES` says
where each figure comes from.  A scenario's `[costs]` section overrides any of them.

`Cpu.charge` is how the kernel's code spends time; without an emulated clock (unit tests, the
benchmarks of the receive stage) charges are only summed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from emu.kernel.clock import EmuClock


def _c(default: float, unit: str, help: str, source: str) -> Any:
    return field(default=default, metadata={"unit": unit, "help": help, "source": source})


@dataclass(frozen=True)
class Costs:
    # -- the CPU (a 2007 server core) --
    rx_frame: float = _c(
        2.0e-6, "s", "receive one frame: NIC driver, netif_receive_skb, ip_rcv, udp_rcv/tcp_v4_rcv, skb alloc",
        "A 2007 Linux core receives about 500,000 small packets/s (e1000 + NAPI; Intel, 'Improving "
        "Linux networking performance', and pktgen/receive figures of the 2.6 era): 2 us per frame")
    tx_frame: float = _c(
        1.5e-6, "s", "transmit one frame: sock_sendmsg, ip_output, the driver (checksum offloaded)",
        "The transmit path costs somewhat less than receive on the same hardware; page data goes "
        "by sendpage (sunrpc xs_sendpages, iscsi_tcp), so no per-byte copy")
    copy_byte: float = _c(
        0.5e-9, "s/byte", "copy one byte (copy_to_user, skb data into a page)",
        "DDR2-667/800 memcpy of about 2 GB/s: 1-2 us per 4 KiB page")
    page_fault: float = _c(
        1.0e-6, "s", "handle one page fault (minor or major), not counting copies or I/O",
        "About 1 us per anonymous page fault on 2007 x86 (lmbench-era 'page fault' latency)")
    page_scan: float = _c(
        0.2e-6, "s", "scan one page in reclaim (shrink_page_list: referenced check, rmap, swap cache)",
        "A few hundred ns per page: reclaim scans about 5 million pages/s per core")
    swap_io: float = _c(
        5.0e-6, "s", "build and submit one swap request (bio / rpc_task: RPC or SCSI command encode)",
        "An NFS WRITE or SCSI command through sunrpc / the block layer: a few us of CPU")
    user_access: float = _c(
        0.5e-6, "s", "the workload's own work between two accesses to its pages",
        "A modelled program touching a page every 0.5 us: memory-bound work at DDR2 speed")
    # -- the network (gigabit Ethernet on a LAN) --
    link_rate: float = _c(
        1.0e9, "bit/s", "the NIC's line rate (serialization of frames on the wire)",
        "Gigabit Ethernet: 81,274 full-size frames/s (1,538 bytes on the wire each)")
    peer_rtt: float = _c(
        100e-6, "s", "round trip to the storage server: wire, switch, the server's turnaround",
        "A GbE LAN round trip with interrupt coalescing is about 50-200 us")
    wire_latency: float = _c(
        50e-6, "s", "one-way latency of background traffic from its sender to this host's NIC",
        "Half of a 100 us LAN round trip")
    rx_usecs: float = _c(
        125e-6, "s", "interrupt coalescing: the NIC raises at most one interrupt per this interval",
        "Intel e1000's default InterruptThrottleRate of 8,000 interrupts/s")

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def describe(cls) -> list[tuple[str, float, str, str, str]]:
        """(name, default, unit, what, source) for each entry: the documented table."""
        return [(f.name, cast(float, f.default), f.metadata["unit"], f.metadata["help"], f.metadata["source"])
                for f in dataclasses.fields(cls)]

    def replace(self, **changes: float) -> Costs:
        bad = [k for k in changes if k not in self.names()]
        if bad:
            raise ValueError(f"unknown cost {bad[0]!r}; known: {', '.join(self.names())}")
        for k, v in changes.items():
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0 or v != v or v == float("inf"):
                raise ValueError(f"cost {k} must be a positive finite number, not {v!r}")
        return dataclasses.replace(self, **{k: float(v) for k, v in changes.items()})

    def to_json(self) -> dict[str, float]:
        return dataclasses.asdict(self)

    def serialization(self, nbytes: int) -> float:
        """Seconds `nbytes` take on the wire at the link rate."""
        return nbytes * 8.0 / self.link_rate


class Cpu:
    """The emulated host's one CPU: `charge(seconds)` of modelled work advances its clock."""

    __slots__ = ("clock", "costs", "busy")

    def __init__(self, costs: Costs | None = None, clock: EmuClock | None = None) -> None:
        self.costs = costs if costs is not None else Costs()
        self.clock = clock
        self.busy = 0.0  # seconds of modelled work so far

    def charge(self, seconds: float) -> None:
        self.busy += seconds
        clock = self.clock
        if clock is not None:
            clock.charge(seconds)

    def now(self) -> float:
        """Emulated now (only meaningful inside the host's trio.run)."""
        import trio

        return trio.current_time()


NULL_COSTS = Costs()
