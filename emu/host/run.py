"""One run of the emulated host, in emulated time, and the verdict it ends with.

`HostRun` assembles one host (kernel, swap device, workload, applications, watchdog) and its
`main` runs it under the host's `EmuClock` (emu.kernel.clock), so everything the model decides
happens on the model's clock (`emu.host.launch.run_host` owns the `trio.run` and the wall-clock
safety net).  The run:

1. starts the kernel (kswapd, swap I/O, the wires) and the application processes;
2. starts the background traffic (from the start; the applications start listening when free
   memory first reaches the low watermark, or `traffic.start_after` seconds in);
3. activates swap on the server (MOUNT and the swap file, or the iSCSI login);
4. runs the workload while sampling the timeline and feeding the watchdog every `sample` seconds;
5. ends `completed` (every page verified), `deadlock` or `livelock` (the report is built from the
   live state at that moment), or `timeout` (watchdog.timeout emulated seconds, or the wall limit).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import trio

from emu import scenario as scen
from emu.host.collect import collect_result
from emu.host.diagnose import blocked_tasks, swap_reply_drops
from emu.host.identity import HostIdentity
from emu.host.kernel import Kernel
from emu.host.observe import Observe, Observers
from emu.host.result import RunResult, RunStatus
from emu.host.timeline import Recorder, Sample
from emu.host.traffic import HostTraffic
from emu.host.userspace import Apps, Workload
from emu.host.watchdog import Verdict, Watchdog
from emu.kernel.clock import EmuClock
from emu.swapdev import make_swap
from emu.swapdev.endpoint import Endpoint

Progress = Callable[[RunStatus], None]
WALL_TIMEOUT_DEFAULT = 600.0


class HostRun:
    """One host, one scenario, one server: assembled here, run by `main` under the host's clock."""

    def __init__(self, sc: scen.Scenario, server: Endpoint, clock: EmuClock, *, raw_traffic: bool = True,
                 reference_rate: float | None = None, observe: Observe | None = None,
                 identity: HostIdentity | None = None) -> None:
        self.sc = sc
        self.server = server
        self.clock = clock
        self.identity = identity or HostIdentity()
        self.policy = sc.policy
        self.kernel = Kernel(sc.host, self.policy, sc.costs, clock, local_addr=self.identity.addr)
        k = self.kernel
        self.swap = make_swap(sc.backend, server, k.net, initiator_name=self.identity.initiator_name)
        self.workload = Workload(k.mm, k.cpu, sc.workload, sc.host.page_size)
        self.apps = Apps(k.mm, k.net, sc.traffic)
        self.traffic: HostTraffic | None = None
        self.raw_traffic = raw_traffic
        wd = sc.watchdog
        self.dog = Watchdog(stall=wd.stall, window=wd.livelock_window, fraction=wd.livelock_fraction,
                            reference=reference_rate)
        self.recorder = Recorder()
        self.phase = "starting"
        self.min_free = k.zone.nr_free
        self.reserve_peak = 0
        self.verdict: Verdict | None = None
        self.wall_expired = False
        self.final: RunResult | None = None  # the result, read from the live kernel at the end
        # --pcap, --dropwatch, --proc-dir: observers only (emu.host.observe); the tap is in place
        # before the kernel starts, so it sees every frame
        self.obs = Observers(observe, k, f"{sc.backend}/{sc.policy}") if observe is not None else None
        self.server_events: list[dict[str, Any]] = []  # the transports' kernel messages (emu.host.kmsg)

    # ---- views -----------------------------------------------------------------------------------

    def progress(self) -> int:
        """Pages freed by reclaim plus swap I/Os completed (see emu.host.watchdog)."""
        return int(self.kernel.vmstat["pgsteal"]) + self.swap.inflight.completed

    def reply_drops(self) -> int:
        return sum(swap_reply_drops(self.swap).values())

    def sample(self, now: float) -> Sample:
        k = self.kernel
        z = k.zone
        used = k.reserve_used()
        self.reserve_peak = max(self.reserve_peak, used)
        self.min_free = min(self.min_free, z.nr_free)
        vm = k.vmstat.counters
        s = Sample(t=now, nr_free=z.nr_free, wmark_min=z.watermark_min, wmark_low=z.watermark_low,
                   wmark_high=z.watermark_high, atomic_floor=z.atomic_floor(), reserve_used=used,
                   reserve_size=k.reserve_size(), pswpout=vm["pswpout"], pswpin=vm["pswpin"],
                   drops=k.net.stat.drops())
        self.recorder.add(s)
        return s

    def status(self, now: float, s: Sample | None = None) -> RunStatus:
        k = self.kernel
        return RunStatus(self.sc.backend, self.sc.policy, self.phase, now, self.workload.done, self.workload.total,
                         k.zone.nr_free, k.zone.watermark_min, s.reserve_used if s else 0, k.vmstat["pswpout"],
                         k.vmstat["pswpin"], sum(k.net.stat.drops().values()), self.dog.stalled_for(now),
                         s.reserve_size if s else k.reserve_size(), self.swap.link.down_since is not None)

    # ---- the run ---------------------------------------------------------------------------------

    async def main(self, progress: Progress | None, cancel_scope_box: list[trio.CancelScope]) -> str:
        sc = self.sc
        k = self.kernel
        outcome = "timeout"
        with trio.CancelScope() as outer:
            cancel_scope_box.append(outer)
            async with trio.open_nursery() as nursery:
                await k.start(nursery)
                nursery.start_soon(self._sampler, progress)
                if self.apps.enabled:
                    await self.apps.start()
                    self.traffic = HostTraffic(sc.traffic, k.net, self.apps.ports, sc.costs, raw=self.raw_traffic)
                    self.traffic.build()
                    nursery.start_soon(self.traffic.run, min(sc.traffic.duration, sc.watchdog.timeout))
                # User space in its own nursery, stopped before the kernel at the end of the run: a
                # process woken by an I/O completion as the kernel stops would otherwise start
                # swap-out on an mm that no longer runs.
                user = trio.CancelScope()
                user_nursery: list[trio.Nursery] = []
                user_done = trio.Event()

                async def user_space(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
                    try:
                        with user:
                            async with trio.open_nursery() as un:
                                user_nursery.append(un)
                                task_status.started()
                                await trio.sleep_forever()
                    finally:
                        user_done.set()

                await nursery.start(user_space)
                self.phase = "swapon"
                await nursery.start(self.swap.run)
                # swapon is bounded by the run's deadline too (a server gone during it)
                with trio.move_on_at(sc.watchdog.timeout) as swapon_scope:
                    await k.mm.swapon(self.swap, sc.host.swap // sc.host.page_size)
                if swapon_scope.cancelled_caught:
                    outcome = "server_down" if self.swap.link.down_since is not None else "timeout"
                else:
                    un = user_nursery[0]
                    un.start_soon(self.workload.run)
                    self.phase = "running"
                    outcome = await self._watch(un)
                self.phase = outcome
                now = trio.current_time()
                self.sample(now)
                self.final = collect_result(self, outcome)
                if self.obs is not None:
                    self.obs.stop(now, outcome)
                if progress:
                    progress(self.status(now, self.recorder.samples[-1]))
                user.cancel()
                with trio.move_on_after(2):
                    await user_done.wait()
                nursery.cancel_scope.cancel()
        if self.wall_expired:
            return "server_down" if self.swap.link.down_since is not None else "timeout"
        return outcome

    async def _watch(self, user: trio.Nursery) -> str:
        sc = self.sc
        k = self.kernel
        deadline = sc.watchdog.timeout
        tr = sc.traffic
        listen_below = k.low_mark() if tr.start_after <= 0 else None
        listening = False
        while True:
            now = trio.current_time()
            if self.apps.enabled and not listening and (
                    (listen_below is not None and k.zone.nr_free <= listen_below)
                    or (listen_below is None and now >= tr.start_after)):
                # in a task of its own: opening a socket allocates, and may block in reclaim,
                # which the watchdog must never do
                listening = True
                user.start_soon(self.apps.listen, user)
            if self.workload.finished.is_set():
                return "completed"
            down = self.swap.link.down_since is not None
            v = self.dog.observe(now, self.progress(), blocked_tasks(), len(self.swap.inflight.ios),
                                 self.reply_drops(), server_down=down or self._outage_io())
            if v is not None:
                self.verdict = v
                return v.kind
            if now >= deadline:
                return "server_down" if down else "timeout"
            await trio.sleep(sc.watchdog.sample)

    def _outage_io(self) -> bool:
        """Is swap I/O that started before the server's last outage ended still in flight?"""
        outages = self.swap.link.outages
        if not outages:
            return False
        up = outages[-1][1]
        return up is not None and any(io.started < up for io in self.swap.inflight.ios.values())

    async def _sampler(self, progress: Progress | None) -> None:
        """The timeline, from the first moment: one sample per `sample` emulated seconds."""
        last = -1.0
        while True:
            now = trio.current_time()
            s = self.sample(now)
            if self.obs is not None:
                self.obs.tick(now, self.phase)
            if progress and now - last >= 0.1:
                last = now
                progress(self.status(now, s))
            await trio.sleep(self.sc.watchdog.sample)

    async def shutdown(self) -> None:
        if self.traffic is not None:
            self.traffic.close()
        self.apps.close()
        await self.swap.close()
        self.kernel.net.close_all()
