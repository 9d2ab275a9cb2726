"""The emulated kernel of one host, assembled: its CPU and clock, its memory, its network stack.

One zone of `host.ram` under the policy, the slab caches, (v12) the reserve root, the mm with
kswapd and the swap-I/O tasks, and the network stack (every socket a real loopback socket, its
reserve nodes under the root).  Nothing here decides anything: the outcome emerges from the rules
of emu/mm and emu/net.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

from emu.kernel.cpu import Costs, Cpu
from emu.kernel.policy import Policy
from emu.mm.page_alloc import Zone
from emu.mm.reserve import ReserveRoot
from emu.mm.slab import Slabs
from emu.mm.vm import Vm
from emu.mm.vmstat import VmStat
from emu.net.stack import NetStack

if TYPE_CHECKING:
    from emu.kernel.clock import EmuClock
    from emu.scenario import HostSection


class Kernel:
    def __init__(self, host: HostSection, policy: Policy, costs: Costs, clock: EmuClock | None, *,
                 local_addr: str = "127.0.0.1") -> None:
        self.policy = policy
        self.cpu = Cpu(costs, clock)
        self.vmstat = VmStat()
        self.zone = zone = Zone(host.ram, host.page_size, policy, host.min_free_kbytes or None, self.vmstat)
        self.slabs = Slabs(zone)
        self.reserve: ReserveRoot | None = None
        if policy is Policy.V12:
            self.reserve = ReserveRoot(zone, scale=host.reserve_scale)
        # 2.6.22's swap_writepage writes one page at a time: over NFS one WRITE per page, on the
        # LUN one bio (no elevator here to merge them); `swap_cluster` raises that.
        self.mm = Vm(zone, self.slabs, self.reserve, self.vmstat, max_io_pages=host.swap_cluster, cpu=self.cpu)
        self.net = NetStack(zone, self.slabs, reserve=self.reserve, cpu=self.cpu, mtu=host.mtu,
                            rmem_default=host.rmem_default, ip_rt_max_size=host.route_max_size or None,
                            ipfrag_high_thresh=host.ipfrag_high_thresh, ipfrag_low_thresh=host.ipfrag_low_thresh,
                            ipfrag_time=host.ipfrag_time, local_addr=local_addr)

    async def start(self, nursery: trio.Nursery) -> None:
        await nursery.start(self.mm.run)  # kswapd and the swap-I/O tasks
        await nursery.start(self.net.run)  # the wires (ksoftirqd) and the IP timers

    # ---- views ---------------------------------------------------------------------------------

    def reserve_size(self) -> int:
        """Pages the receive path may take below the watermarks: v12's pages_emerg, 3.6's min."""
        if self.policy is Policy.V12:
            return self.zone.pages_emerg
        if self.policy is Policy.PFMEMALLOC:
            return self.zone.watermark_min
        return 0

    def reserve_used(self) -> int:
        """Pages handed out from the reserve and not yet freed (pfmemalloc-tagged)."""
        return self.zone.nr_pfmemalloc

    def low_mark(self) -> int:
        """The low watermark as the allocator sees it (v12 adds pages_emerg to every mark)."""
        z = self.zone
        return z.watermark_low + (z.pages_emerg if self.policy is Policy.V12 else 0)

    def skbs_emergency(self) -> int:
        """RX skbs allocated from the reserve so far."""
        return self.net.skbs.rx_reserve
