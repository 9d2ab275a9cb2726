"""One run of the emulated host, in emulated time, and the verdict it ends with.

`run_host` owns the run's `trio.run`, with the host's `EmuClock` (emu.kernel.clock) and FIFO
scheduling, so everything the model decides happens on the model's clock; the wall clock only
bounds the run (`wall_timeout`, a safety net: outcome `timeout`, exit 1) and measures how long a
person waited (`wall_s`).  The run:

1. starts the kernel (kswapd, swap I/O, the wires) and the application processes;
2. starts the background traffic (from the start; the applications start listening when free
   memory first reaches the low watermark, or `traffic.start_after` seconds in);
3. activates swap on the server (MOUNT and the swap file, or the iSCSI login);
4. runs the workload while sampling the timeline and feeding the watchdog every `sample` seconds;
5. ends `completed` (every page verified), `deadlock` or `livelock` (the report is built from the
   live state at that moment), or `timeout` (watchdog.timeout emulated seconds, or the wall limit).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from time import perf_counter
from typing import Any

import trio

from emu import scenario as scen
from emu.host.diagnose import blocked_tasks, report_data, swap_reply_drops
from emu.host.kernel import Kernel
from emu.host.observe import Observe, Observers, proc_views
from emu.host.kmsg import collect_kmsg
from emu.host.report import render_deadlock_report
from emu.host.result import STUCK, RunInterrupted, RunResult, RunStatus, write_outputs
from emu.host.servers import local_server
from emu.host.timeline import Recorder, Sample
from emu.host.traffic import HostTraffic
from emu.host.userspace import Apps, Workload
from emu.host.watchdog import Verdict, Watchdog
from emu.kernel.clock import EmuClock, deterministic_scheduling
from emu.mm.gfp import Policy
from emu.swapdev import make_swap
from emu.swapdev.endpoint import Endpoint, parse_server_url
from emu.util.signals import is_interrupt

Progress = Callable[[RunStatus], None]
WALL_TIMEOUT_DEFAULT = 600.0


@dataclass(frozen=True)
class HostIdentity:
    """Who a host is to its server: its loopback address (every socket it opens is bound to it)
    and, on iSCSI, its initiator name.  One host alone is 127.0.0.1 with the initiator's default
    name; the hosts of a cluster are 127.0.1.N and `iqn.2026-01.org.netswap:hostN`."""

    addr: str = "127.0.0.1"
    initiator_name: str | None = None


class HostRun:
    """One host, one scenario, one server: assembled here, run by `main` under the host's clock."""

    def __init__(self, sc: scen.Scenario, server: Endpoint, clock: EmuClock, *, raw_traffic: bool = True,
                 reference_rate: float | None = None, observe: Observe | None = None,
                 identity: HostIdentity | None = None) -> None:
        self.sc = sc
        self.server = server
        self.clock = clock
        self.identity = identity or HostIdentity()
        self.policy = Policy(sc.policy)
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

                async def user_space(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
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
                self.final = self.result(outcome)
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

    # ---- the result ------------------------------------------------------------------------------

    def result(self, outcome: str) -> RunResult:
        """The result as the live kernel shows it now (wall time and errors are added later)."""
        sc = self.sc
        k = self.kernel
        vm = k.vmstat.counters
        now = self.clock.now
        res = RunResult(outcome, sc.policy, sc.backend, self.server.url(), sc.host.ram, sc.host.page_size,
                        seed=sc.workload.seed)
        res.pages_swapped_out = int(vm["pswpout"])
        res.pages_swapped_in = int(vm["pswpin"])
        w = self.workload
        res.integrity = {"verified": int(vm["pswpin"]) + w.verified, "mismatches": int(k.mm.nr_verify_errors) + w.mismatches,
                         "storage_audit": {"checked": self.swap.inflight.audit_checked,
                                           "mismatches": self.swap.inflight.audit_mismatches}}
        if w.mismatch_details:
            res.integrity["details"] = w.mismatch_details
        if k.mm.verify_errors:
            res.integrity["first_mismatches"] = [list(e) for e in k.mm.verify_errors[:10]]
        res.drops = k.net.stat.drops()
        res.reserve = {"size": k.reserve_size(), "peak": self.reserve_peak}
        res.emulated_s = round(now, 6)
        res.accesses_done = w.done
        res.accesses_total = w.total
        res.min_free = self.min_free
        res.wmark_min = k.zone.watermark_min
        res.atomic_floor = k.zone.atomic_floor()
        res.progress_rate = round(self.progress() / now, 3) if now > 0 else 0.0
        res.swap_retransmits = self.swap.retransmits()
        res.emergency_skbs = int(k.skbs_emergency())
        res.traffic = self.traffic.report() if self.traffic is not None else {"profile": "none"}
        if self.traffic is not None:
            socks = self.apps.socks
            res.traffic["delivered"] = sum(sk.dgrams_read + len(sk.receive_queue) for sk in socks)
            res.traffic["read_by_apps"] = sum(sk.dgrams_read for sk in socks)
            res.traffic["delivered_bytes"] = sum(sk.bytes_read + sk.rx_queued_bytes for sk in socks)
        res.socket_drops = {f"{sk.proto} {sk.local_str()} {sk.owner_name()}": {r: n for r, n in sk.rx_drops.items() if n}
                            for sk in [*k.net.socks, *self.swap.sockets] if any(sk.rx_drops.values())}
        res.views = proc_views(k)
        res.costs = sc.costs.to_json()
        res.clock = {"emulated_s": res.emulated_s, "cpu_busy_s": round(k.cpu.busy, 6), **self.clock.stats.to_json()}
        res.vmstat = {key: int(v) for key, v in vm.items() if v}
        res.server_outages = [{"down_at": round(a, 6), "up_at": None if b is None else round(b, 6)}
                              for a, b in self.swap.link.outages]
        res.server_events = list(self.server_events)
        v = self.verdict
        if v is not None and outcome in STUCK:
            detail = ""
            if v.kind == "livelock":
                detail = (f"progress {v.rate:.1f}/s over the last {v.stalled_for:.1f} s, below "
                          f"{self.dog.fraction:.0%} of the reference {v.reference:.1f}/s, with swap replies dropped")
            res.stall = {"kind": v.kind, "t": round(v.at, 6), "nr_free": k.zone.nr_free,
                         "stalled_for": round(v.stalled_for, 6), "blocked_tasks": len(v.blocked),
                         "inflight": len(self.swap.inflight.ios), "rate": round(v.rate, 3),
                         "reference_rate": round(v.reference, 3)}
            res.report = render_deadlock_report(report_data(
                k, self.swap, backend=sc.backend, server=self.server.url(), kind=v.kind, t=v.at,
                stalled_for=v.stalled_for, reserve_peak=self.reserve_peak, detail=detail))
        return res


def run_host(sc: scen.Scenario, server: Endpoint, progress: Progress | None = None, out_dir: Path | None = None, *,
             raw_traffic: bool = True, reference_rate: float | None = None,
             wall_timeout: float = WALL_TIMEOUT_DEFAULT, observe: Observe | None = None,
             identity: HostIdentity | None = None, stem: str | None = None) -> RunResult:
    """Run one host to its verdict, in a `trio.run` of its own under its emulated clock.

    `raw_traffic=False` sends the background traffic as an unprivileged user would even when we
    are root.  `reference_rate`: the progress rate of the same scenario under a reserve policy,
    for the livelock verdict (default: this run's own best).  `identity`: the host's address (and
    initiator name) when it shares the server with others.  `stem`: the output files' name.
    """
    clock = EmuClock()
    run = HostRun(sc, server, clock, raw_traffic=raw_traffic, reference_rate=reference_rate, observe=observe,
                  identity=identity)
    wall0 = perf_counter()
    scope_box: list[trio.CancelScope] = []
    error = ""
    outcome = "error"

    async def main() -> str:
        token = trio.lowlevel.current_trio_token()

        def expire() -> None:
            run.wall_expired = True
            if scope_box:
                scope_box[0].cancel()

        timer = threading.Timer(wall_timeout, lambda: token.run_sync_soon(expire))
        timer.daemon = True
        timer.start()
        try:
            return await run.main(progress, scope_box)
        finally:
            timer.cancel()
            with trio.CancelScope(shield=True), trio.move_on_after(3):
                await run.shutdown()

    try:
        with deterministic_scheduling(), collect_kmsg() as kmsg:
            run.server_events = kmsg.events  # the same list: messages up to the result are in it
            outcome = trio.run(main, clock=clock)
        if outcome == "server_down":
            since = run.swap.link.outages[-1][0] if run.swap.link.outages else 0.0
            error = (f"server {run.server.url()} not answering since t={since:.3f} s (emulated; "
                     f"{clock.now - since:.1f} s), still down when the run ended")
        elif run.wall_expired:
            error = f"wall-clock limit of {wall_timeout:g} s reached (emulated time {clock.now:.3f} s)"
        elif outcome == "timeout":
            error = f"not finished within watchdog.timeout = {sc.watchdog.timeout:g} emulated seconds"
    except BaseException as e:
        if not is_interrupt(e):
            if not isinstance(e, Exception):
                raise
        else:  # SIGINT/SIGTERM: the run unwound (its servers are stopped by our callers)
            res = run.final if run.final is not None else run.result("interrupted")
            res.outcome = "interrupted"
            res.error = "interrupted"
            res.server_events = list(run.server_events)
            res.wall_s = res.clock["wall_s"] = round(perf_counter() - wall0, 3)
            if out_dir is not None:
                with contextlib.suppress(OSError):
                    write_outputs(res, out_dir, f"{sc.backend}-{sc.policy}", run.recorder)
            raise RunInterrupted([res]) from None
        outcome = "error"
        error = describe_failure(e, run.phase, run.server.url())
        gone = run.swap.link.down_since
        if gone is not None and run.phase not in ("starting", "swapon"):
            # the transport gave up on a server that is down (a soft timeout, iSCSI's
            # replacement_timeout): the swap I/O error is the outage's
            outcome = "server_down"
            error = (f"server {run.server.url()} not answering since t={gone:.3f} s (emulated; "
                     f"{clock.now - gone:.1f} s): {error}")
    res = run.final if run.final is not None else run.result(outcome)
    res.outcome = outcome
    res.error = error
    res.server_events = list(run.server_events)
    res.wall_s = res.clock["wall_s"] = round(perf_counter() - wall0, 3)
    res.timeline = run.recorder
    if run.obs is not None and run.obs.tap is not None:
        run.obs.tap.stop()
        decode = ""
        if sc.backend == "iscsi" and hasattr(server, "port"):
            decode = f"tshark -d tcp.port=={server.port},iscsi"  # our target listens on a free port
        res.pcap = run.obs.write_pcap(f"netswap run: backend {sc.backend}, policy {sc.policy}, scenario {sc.name}, "
                                      f"server {server.url()}, outcome {res.outcome} at t={res.emulated_s:.3f} s "
                                      f"(emulated; timestamps are the run's wall-clock start plus emulated time)"
                                      + (f"; decode iSCSI with: {decode}" if decode else ""))
        if decode:
            res.pcap["decode_as"] = decode
        res.files["pcap"] = str(res.pcap["file"])
    if out_dir is not None:
        write_outputs(res, out_dir, stem or f"{sc.backend}-{sc.policy}", run.recorder,
                      run.verdict.at if run.verdict is not None and outcome in STUCK else None)
    return res


def describe_failure(e: BaseException, phase: str, url: str) -> str:
    """Why a run failed, in one line: the innermost errors (trio wraps them in groups), without
    a class name where the message says it all, and where it happened."""
    parts = []
    for x in _leaves(e)[:3]:
        msg = (str(x).strip().splitlines() or [""])[0]
        if isinstance(x, ConnectionRefusedError):
            msg = "connection refused (nothing listens there)"
        elif isinstance(x, TimeoutError) and not msg:
            msg = "timed out"
        known = isinstance(x, (OSError, MemoryError)) or type(x).__name__ in ("NfsMountError", "ISCSIError",
                                                                               "SessionRecoveryTimeout", "LoginError")
        parts.append(msg if known and msg else f"{type(x).__name__}: {msg}")
    what = "; ".join(parts)
    if any(isinstance(x, MemoryError) for x in _leaves(e)) and phase in ("starting", "swapon"):
        return f"host.ram is too small for this scenario ({what}); give it more RAM (--ram)"
    if phase in ("starting", "swapon"):
        return f"swapon on {url} failed: {what}"
    return what


def _leaves(eg: BaseException) -> list[BaseException]:
    if isinstance(eg, BaseExceptionGroup):
        out: list[BaseException] = []
        for x in eg.exceptions:
            out.extend(_leaves(x))
        return out
    return [eg]


def run_scenario(sc: scen.Scenario, progress: Progress | None = None, out_dir: Path | None = None,
                 **kw: Any) -> RunResult:
    """Run one scenario (starting our server unless the scenario names one)."""
    if sc.server:
        return run_host(sc, parse_server_url(sc.server), progress, out_dir, **kw)
    with local_server(sc.backend, sc.host.swap) as sp:
        return run_host(sc, sp.server, progress, out_dir, **kw)


def run_matrix(base: scen.Scenario, backends: tuple[str, ...] | list[str], policies: tuple[str, ...] | list[str],
               out_dir: Path | None = None, progress: Progress | None = None,
               observe_for: Callable[[scen.Scenario], Observe | None] | None = None, **kw: Any) -> list[RunResult]:
    """Each backend under each policy with the same workload and traffic; one server per backend.

    The reserve policies run first, so that `none` is judged for livelock against the progress
    rate the same scenario reaches with a reserve.  Results come back in the order asked for."""
    order = sorted(policies, key=lambda p: p == "none")
    results: dict[tuple[str, str], RunResult] = {}

    def one(sc: scen.Scenario, server: Endpoint) -> None:
        ref = None
        if sc.policy == "none":
            rates = [r.progress_rate for (b, p), r in results.items() if b == sc.backend and r.outcome == "completed"]
            ref = max(rates) if rates else None
        obs = observe_for(sc) if observe_for is not None else None
        results[(sc.backend, sc.policy)] = run_host(sc, server, progress, out_dir, reference_rate=ref, observe=obs, **kw)

    try:
        for b in backends:
            sc_b = base.replace(backend=b)
            if base.server:
                for p in order:
                    one(sc_b.replace(policy=p), parse_server_url(base.server))
                continue
            with local_server(b, base.host.swap) as sp:
                for p in order:
                    one(sc_b.replace(policy=p), sp.server)
    except RunInterrupted as e:
        e.results = [results[(b, p)] for b in backends for p in policies if (b, p) in results] + e.results
        raise
    except KeyboardInterrupt:  # between runs (a server starting or stopping)
        raise RunInterrupted([results[(b, p)] for b in backends for p in policies if (b, p) in results]) from None
    return [results[(b, p)] for b in backends for p in policies]
