"""The data of a stuck run's report, read from the live kernel (SysRq-M and SysRq-T together).

`emu.host.report` lays it out; this module only gathers it, at the moment of the verdict.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from emu.host.report import InflightIO, ReportData
from emu.host.watchdog import is_blocked
from emu.kernel.sched import all_tasks
from emu.kernel.policy import Policy
from emu.mm.sizes import DST_ENTRY

if TYPE_CHECKING:
    from emu.host.kernel import Kernel
    from emu.swapdev.remote import RemoteSwap


def swap_reply_drops(swap: RemoteSwap | None) -> dict[str, int]:
    """Why the swap transport's replies were dropped, by reason: the per-socket drop reasons
    (`Sock.rx_drops`, attributed before demux too) summed over every socket the transport has had."""
    drops: dict[str, int] = {}
    for sk in (swap.sockets if swap is not None else ()):
        for reason, n in sk.rx_drops.items():
            if n:
                drops[reason] = drops.get(reason, 0) + n
    return drops


def blocked_tasks() -> list[tuple[str, str, str]]:
    return [(t.comm, t.state, t.wchan) for t in all_tasks() if is_blocked(t.state)]


def report_data(kernel: Kernel, swap: RemoteSwap | None, *, backend: str, server: str, kind: str, t: float,
                stalled_for: float, reserve_peak: int, detail: str = "") -> ReportData:
    z = kernel.zone
    net = kernel.net
    holders = [(f"{sk.proto} {sk.local_str()} {sk.owner_name()}", len(sk.receive_queue), sk.sk_rmem_alloc, sk.memalloc)
               for sk in net.socks]
    inflight = []
    if swap is not None:
        for op, slot, n, age, attempts, what in swap.inflight.snapshot(t):
            inflight.append(InflightIO(op, slot, n, age, attempts, what))
    mem = net.memory()
    tasks = [(task.pid, task.comm, task.state, task.wchan, str(task.flags)) for task in all_tasks()
             if task.state != "X" and (is_blocked(task.state) or task.comm == "kswapd0")]
    return ReportData(
        policy=kernel.policy, backend=backend, server=server, t=t, stalled_for=stalled_for,
        nr_pages=z.nr_pages, nr_free=z.nr_free, wmark_min=z.watermark_min, wmark_low=z.watermark_low,
        wmark_high=z.watermark_high, atomic_floor=z.atomic_floor(), pages_emerg=z.pages_emerg,
        reserve_size=kernel.reserve_size(), reserve_peak=reserve_peak,
        reserve_info=kernel.reserve.reserve_info() if kernel.reserve is not None and kernel.policy is Policy.V12 else "",
        meminfo=kernel.vmstat.meminfo(z), vmstat=kernel.vmstat.snapshot(), ss=net.ss(), socket_holders=holders,
        frag_queues=mem["frag_queues"], frag_bytes=mem["ip_frag_mem"], route_entries=mem["route_entries"],
        route_bytes=mem["route_entries"] * DST_ENTRY, route_max=net.routes.max_size, slabinfo=kernel.slabs.slabinfo(),
        inflight=inflight, swap_sock=swap.sock_name() if swap is not None else "",
        swap_sock_drops=swap_reply_drops(swap), swap_retransmits=swap.retransmits() if swap is not None else 0,
        drops=net.stat.drops(), nstat=net.nstat(), tasks=tasks, kind=kind, detail=detail)
