"""The NIC: one softirq task (ksoftirqd/0) that hands the frames of every wire to the receive
path, at the NIC's interrupt times.

Frames wait in their wire's ring until they are due (emu.net.wire).  The NIC raises an interrupt
at the first multiple of `rx_usecs` at or after a frame's due time (interrupt coalescing, as
e1000's InterruptThrottleRate does; only under the host's emulated clock), then polls: every wire
with frames due, in the order they became due, at most `batch` frames per wire per turn (the NAPI
weight) and `BUDGET` frames per round before ksoftirqd yields (netdev_budget), all inside one
`RxPath.begin()` .. `end()`.
"""

from __future__ import annotations

import heapq
import itertools
import math
from typing import TYPE_CHECKING

import trio

from emu.kernel.sched import Task, TaskFlags, current, task

if TYPE_CHECKING:
    from emu.kernel.clock import EmuClock
    from emu.net.netstat import NetStat
    from emu.net.rx import RxPath
    from emu.net.wire import Wire

TCP_RTO_MIN = 0.2
TCP_RTO_MAX = 120.0
BATCH = 64  # frames per NAPI poll of one wire (the weight)
BUDGET = 300  # frames per softirq round before ksoftirqd yields (netdev_budget)


class Nic:
    """The host's NIC: the receive path it hands frames to, its poll discipline (weight, budget,
    interrupt coalescing), and its one softirq task over every wire."""

    def __init__(self, rx: RxPath, stat: NetStat, clock: EmuClock | None, *, batch: int = BATCH,
                 rx_usecs: float = 0.0, mss: int = 1448, tcp_rto_min: float = TCP_RTO_MIN,
                 tcp_rto_max: float = TCP_RTO_MAX) -> None:
        if batch < 1:
            raise ValueError("batch must be >= 1")
        if not 0 < tcp_rto_min <= tcp_rto_max:
            raise ValueError("need 0 < tcp_rto_min <= tcp_rto_max")
        self.rx = rx
        self.stat = stat
        self.clock = clock
        self.batch = batch
        self.rx_usecs = rx_usecs if clock is not None else 0.0
        self.mss = mss
        self.tcp_rto_min = tcp_rto_min
        self.tcp_rto_max = tcp_rto_max
        # (when, due of its first frame, wire index, wire): wires with work.  Ties go by what is
        # due first, then by the order the wires were made: never by which task happened to
        # read a real socket first, so the order of frames does not depend on the machine.
        self._heap: list[tuple[float, float, int, Wire]] = []
        self._index = itertools.count()
        self._sleep: trio.CancelScope | None = None
        self._sleep_until = math.inf
        self._nursery: trio.Nursery | None = None
        self._pending: list[Wire] = []
        self.ksoftirqd: Task | None = None

    def irq_time(self, due: float) -> float:
        """When the NIC raises the interrupt for a frame due at `due` (coalescing)."""
        q = self.rx_usecs
        if not q:
            return due
        return math.ceil(due / q - 1e-9) * q

    def attach(self, wire: Wire) -> None:
        """Start the wire's watcher (as soon as `run` is running)."""
        wire.index = next(self._index)
        if self._nursery is not None:
            self._nursery.start_soon(wire.watch)
        else:
            self._pending.append(wire)

    def schedule(self, wire: Wire, when: float) -> None:
        """The wire has work at `when` (emulated): make sure the NIC's task is there."""
        if when >= wire.scheduled:
            return
        wire.scheduled = when
        heapq.heappush(self._heap, (when, wire.head_due(), wire.index, wire))
        if when < self._sleep_until and self._sleep is not None:
            # Bring the NIC's timer forward rather than waking it now: it then always wakes by
            # its timer at the interrupt time, in the same place among the tasks that run then,
            # whether a watcher read the frame early or the clock read it just in time.
            self._sleep_until = when
            self._sleep.deadline = when

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """ksoftirqd/0: the watchers, and the polls, until cancelled."""
        with task("ksoftirqd/0", TaskFlags.PF_KTHREAD) as t:
            self.ksoftirqd = t
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for w in self._pending:
                    nursery.start_soon(w.watch)
                self._pending.clear()
                task_status.started()
                try:
                    await self._softirq()
                finally:
                    self._nursery = None

    def cutoff(self, now: float) -> float:
        """Frames due by this time are in the interrupt being served at `now`: exactly those
        whose `irq_time` is not after `now`."""
        q = self.rx_usecs
        if not q:
            return now
        return (math.floor(now / q + 1e-9) + 1e-9) * q

    async def _softirq(self) -> None:
        """net_rx_action: at each interrupt, one poll over every wire with frames due, `batch`
        frames per wire at a time, in the order of their first frame's due time (then the order
        the wires were made), `BUDGET` frames per round.  The order is decided when the poll
        runs, from what the rings hold then: never from when a watcher happened to read a real
        socket, so it does not depend on the machine."""
        heap = self._heap
        rx = self.rx
        current_time = trio.current_time
        t = current()
        while True:
            now = current_time()
            if heap and heap[0][0] <= now:
                cutoff = self.cutoff(now)
                ready: list[tuple[float, int, Wire]] = []
                while heap and heap[0][0] <= now:
                    when, _, _, wire = heapq.heappop(heap)
                    if when != wire.scheduled:
                        continue  # superseded by an earlier schedule
                    wire.scheduled = math.inf
                    if not wire.closed:
                        ready.append((wire.head_due(), wire.index, wire))
                heapq.heapify(ready)
                done = 0
                t.in_softirq = True
                rx.begin(now)
                try:
                    while ready and done < BUDGET:
                        _, index, wire = heapq.heappop(ready)
                        if wire.closed:
                            continue
                        n = wire.service(now, cutoff)
                        done += n
                        nxt = wire.next_time()
                        if n and nxt <= now:  # more due: another turn in this round
                            heapq.heappush(ready, (wire.head_due(), index, wire))
                        elif nxt < math.inf:
                            if nxt <= now:  # it took nothing: never spin on it within one instant
                                nxt = now + (self.rx_usecs or 1e-6)
                            self.schedule(wire, nxt)
                finally:
                    rx.end()
                    t.in_softirq = False
                    for _, _, wire in ready:  # the budget ran out: the rest in the next round
                        self.schedule(wire, now)
                await trio.lowlevel.checkpoint()
                continue
            until = heap[0][0] if heap else math.inf
            self._sleep_until = until
            with trio.move_on_at(until) as scope:
                self._sleep = scope
                await trio.sleep_forever()
            self._sleep = None
            self._sleep_until = math.inf
