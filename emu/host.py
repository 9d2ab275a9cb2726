"""The emulated host: mm + net + swap device + workload + background traffic, under a watchdog.

One `Host` is one run: a zone of `ram` bytes under one policy, its slab caches, reserve tree,
kswapd, network stack (every socket backed by a real loopback socket), a swap area on a swap file
over NFS or on an iSCSI LUN, workload processes whose anonymous working set exceeds RAM,
application processes owning the sockets background traffic lands on, and a traffic generator in
a separate process. A sampler records the timeline and feeds the watchdog; the run ends when the
workload completes (then every page has been verified), when the watchdog declares a deadlock
(then the report is built from the live state), or at the scenario's timeout.

Nothing here decides the outcome: it emerges from the allocator, reclaim and receive rules of
emu/mm and emu/net under the chosen policy.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from emu import scenario as scen
from emu.report import InflightIO, ReportData, render_deadlock_report
from emu.servers import Server, local_server, parse_server_url
from emu.timeline import Recorder, Sample, plot
from emu.watchdog import Verdict, Watchdog, is_blocked
from emu.workload import Pattern, split_pages


@dataclass
class RunStatus:
    backend: str
    policy: str
    phase: str
    t: float = 0.0
    done: int = 0
    total: int = 0
    nr_free: int = 0
    wmark_min: int = 0
    reserve_used: int = 0
    pswpout: int = 0
    pswpin: int = 0
    drops: int = 0
    stalled_for: float = 0.0


@dataclass
class RunResult:
    outcome: str                     # "completed" | "deadlock" | "timeout" | "error"
    policy: str
    backend: str
    server: str
    ram: int
    page_size: int
    pages_swapped_out: int = 0
    pages_swapped_in: int = 0
    integrity: dict[str, Any] = field(default_factory=lambda: {"verified": 0, "mismatches": 0})
    drops: dict[str, int] = field(default_factory=dict)
    reserve: dict[str, int] = field(default_factory=lambda: {"size": 0, "peak": 0})
    duration_s: float = 0.0
    accesses_done: int = 0
    accesses_total: int = 0
    min_free: int = 0
    wmark_min: int = 0
    atomic_floor: int = 0
    stall: dict[str, Any] | None = None
    swap_retransmits: int = 0
    emergency_skbs: int = 0
    traffic: dict[str, Any] = field(default_factory=dict)
    vmstat: dict[str, int] = field(default_factory=dict)
    error: str = ""
    report: str = ""
    files: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "report"}
        d["deadlock_report"] = self.report or None
        return d


# --- background traffic (a separate process, bounded in time) ---------------------------------


def _plain_traffic(ports: list[int], rate: float, size: int, duration: float) -> None:
    """The plain-socket fallback generator: UDP datagrams to the ports, paced, bounded."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    payload = b"x" * size
    end = time.monotonic() + duration
    start = time.monotonic()
    sent = 0
    while (now := time.monotonic()) < end:
        due = int((now - start) * rate)
        while sent < due:
            with contextlib.suppress(OSError):
                s.sendto(payload, ("127.0.0.1", ports[sent % len(ports)]))
            sent += 1
        time.sleep(0.002)


def traffic_argv(tr: scen.TrafficSection, ports: list[int], duration: float) -> tuple[list[str], str]:
    """The command that sends the scenario's background traffic (in its own process, so it
    competes with the emulated host only for CPU), and which generator it is."""
    size = tr.frag_size if tr.profile == "frag" else tr.size
    try:
        import emu.traffic.api  # noqa: F401
    except ImportError:
        code = f"from emu.host import _plain_traffic; _plain_traffic({ports!r}, {float(tr.rate)!r}, {size}, {duration!r})"
        return [sys.executable, "-c", code], "plain UDP sockets"
    # fallback=True: without CAP_NET_RAW the injector sends udp-flood over an ordinary socket.
    spoof = repr(tr.spoof) if os.geteuid() == 0 else "None"
    code = ("from emu.traffic.api import make_spec, run; "
            f"run(make_spec({tr.profile!r}, {ports!r}, rate={float(tr.rate)!r}, duration={duration!r}, "
            f"size={size}, spoof={spoof}, distinct={tr.distinct}), fallback=True)")
    return [sys.executable, "-c", code], "emu.traffic (scapy)" if os.geteuid() == 0 else "emu.traffic (ordinary sockets)"


# --- the host ---------------------------------------------------------------------------------


class Host:
    """Assembles one emulated host for a scenario and a server (see the module docstring)."""

    def __init__(self, sc: scen.Scenario, server: Server, *, raw_traffic: bool = True) -> None:
        """`raw_traffic=False` sends the background traffic as an unprivileged user would even
        when we are root: plain UDP over an ordinary socket, no spoofed sources, no fragments."""
        from emu.mm.gfp import Policy
        from emu.mm.page_alloc import Zone
        from emu.mm.vmstat import VmStat

        self.sc = sc
        self.raw_traffic = raw_traffic
        self.server = server
        self.policy = Policy(sc.policy)
        h = sc.host
        self.vmstat = VmStat()
        self.zone = Zone(h.ram, h.page_size, self.policy, h.min_free_kbytes or None, self.vmstat)
        self._build_mm()
        self._build_net()
        self.storage: Any = None
        self.recorder = Recorder()
        self.dog = Watchdog(stall=sc.watchdog.stall)
        self.procs: list[Any] = []
        self.apps: list[Any] = []
        self.app_socks: list[Any] = []
        self.done = 0
        self.pattern_total = 0
        self.min_free = self.zone.nr_free
        self.reserve_peak = 0
        self.verdict: Verdict | None = None
        self.report_text = ""
        self.traffic_info: dict[str, Any] = {}
        self.t0 = 0.0
        self.final_verified = 0
        self.app_ports: list[int] = []
        self.listening_at: float | None = None
        self.phase = "starting"
        self.final_mismatches = 0
        self.mismatch_details: list[dict[str, Any]] = []

    # ---- construction (adapts to emu/mm and emu/net) ------------------------------------------

    def _build_mm(self) -> None:
        from emu.mm.mm import Mm
        from emu.mm.reserve import ReserveTree
        from emu.mm.slab import Slabs

        h = self.sc.host
        self.slabs = Slabs(self.zone)
        self.reserve = ReserveTree(self.zone, route_max_size=h.route_max_size or None,
                                   ipfrag_high_thresh=h.ipfrag_high_thresh)
        # Swap-out I/O size: 2.6.22's swap_writepage writes one page at a time: over NFS one WRITE
        # RPC per page (a_ops->swap_out; the RPC slot table bounds how many are in flight), on the
        # iSCSI LUN one bio, i.e. one SCSI WRITE per page (the emulated block layer has no
        # elevator to merge them).
        self.mm = Mm(self.zone, self.slabs, self.reserve, self.vmstat, max_io_pages=self.sc.host.swap_cluster)

    def _build_net(self) -> None:
        from emu.net.stack import NetStack

        h = self.sc.host
        self.net = NetStack(self.mm, self.policy, mtu=h.mtu, rmem_default=h.rmem_default,
                            ipfrag_high_thresh=h.ipfrag_high_thresh, ipfrag_low_thresh=h.ipfrag_low_thresh,
                            ipfrag_time=h.ipfrag_time)

    @property
    def swap_reply_drops(self) -> dict[str, int]:
        """Why the swap transport's replies were dropped, by reason: the per-socket drop reasons
        (Sock.rx_drops, attributed before demux too: rx_nomem, route_nomem, frag_nomem) summed
        over every socket the transport has had (the storage keeps them across reconnects)."""
        drops: dict[str, int] = {}
        for sk in getattr(self.storage, "sockets", None) or ():
            for reason, n in sk.rx_drops.items():
                if n:
                    drops[reason] = drops.get(reason, 0) + n
        return drops

    # ---- views -------------------------------------------------------------------------------

    def atomic_floor(self) -> int:
        """The lowest free count a GFP_ATOMIC allocation can reach (min - min/2 - min/4 (+emerg))."""
        m = self.zone.watermark_min
        m -= m // 2
        m -= m // 4
        emerg = self.zone.pages_emerg if self.sc.policy == "v12" else 0
        return m + emerg + 1

    def reserve_size(self) -> int:
        if self.sc.policy == "v12":
            return self.zone.pages_emerg
        if self.sc.policy == "pfmemalloc":
            return self.zone.watermark_min
        return 0

    def reserve_used(self) -> int:
        """Pages handed out from the reserve and not yet freed (pfmemalloc-tagged)."""
        return sum(1 for p in self.zone.mem_map if p.pfmemalloc and not p.PG_buddy)

    def drops(self) -> dict[str, int]:
        return dict(self.net.stat.drops())

    def progress(self) -> int:
        """What the watchdog calls progress: pages freed by reclaim (pgsteal) and swap I/Os
        *completed* (pswpout/pswpin count I/O started, which continues into a deadlock)."""
        done = self.storage.inflight.completed if self.storage is not None else 0
        return int(self.vmstat["pgsteal"]) + done

    def blocked(self) -> list[tuple[str, str, str]]:
        from emu.mm.sched import all_tasks

        return [(t.comm, t.state, t.wchan) for t in all_tasks() if is_blocked(t.state)]

    def integrity(self) -> dict[str, int]:
        """Every swap-in is checked by the mm against (pid, page, version); the final pass checks
        every page of every workload process once more, resident or not."""
        return {"verified": int(self.vmstat["pswpin"]) + self.final_verified,
                "mismatches": int(self.mm.nr_verify_errors) + self.final_mismatches}

    def sample(self, now: float) -> Sample:
        z = self.zone
        used = self.reserve_used()
        self.reserve_peak = max(self.reserve_peak, used)
        self.min_free = min(self.min_free, z.nr_free)
        vm = self.vmstat.counters
        s = Sample(t=now - self.t0, nr_free=z.nr_free, wmark_min=z.watermark_min, wmark_low=z.watermark_low,
                   wmark_high=z.watermark_high, atomic_floor=self.atomic_floor(), reserve_used=used,
                   reserve_size=self.reserve_size(), pswpout=vm["pswpout"], pswpin=vm["pswpin"], drops=self.drops())
        self.recorder.add(s)
        return s

    def status(self, phase: str, s: Sample | None = None, now: float | None = None) -> RunStatus:
        now = trio.current_time() if now is None else now
        z = self.zone
        return RunStatus(self.sc.backend, self.sc.policy, phase, now - self.t0, self.done, self.pattern_total,
                         z.nr_free, z.watermark_min, s.reserve_used if s else 0, self.vmstat["pswpout"],
                         self.vmstat["pswpin"], sum(self.drops().values()), self.dog.stalled_for(now))

    # ---- the deadlock report ----------------------------------------------------------------

    def report_data(self, now: float, stalled_for: float) -> ReportData:
        from emu.mm.sched import all_tasks

        z = self.zone
        net = self.net
        holders = []
        for sk in net.socks:
            holders.append((f"{sk.proto} {sk.local_str()} {sk.owner_name()}", len(sk.receive_queue),
                            sk.sk_rmem_alloc, sk.memalloc))
        inflight = []
        if self.storage is not None:
            for op, slot, n, age, attempts, what in self.storage.inflight.snapshot(now):
                inflight.append(InflightIO(op, slot, n, age, attempts, what))
        swap_sock = self.storage.sock_name() if self.storage is not None else ""
        swap_drops = dict(self.swap_reply_drops)
        retrans = self.storage.retransmits() if self.storage is not None else 0
        from emu.mm.sizes import DST_ENTRY

        mem = net.memory()
        frag_q, frag_b = mem["frag_queues"], mem["ip_frag_mem"]
        route_n, route_max = mem["route_entries"], net.routes.max_size
        route_b = route_n * DST_ENTRY
        tasks = [(t.pid, t.comm, t.state, t.wchan, str(t.flags)) for t in all_tasks()
                 if t.state != "X" and (is_blocked(t.state) or t.comm in ("kswapd0",))]
        return ReportData(
            policy=self.sc.policy, backend=self.sc.backend, server=self.server.url(), t=now - self.t0,
            stalled_for=stalled_for, nr_pages=z.nr_pages, nr_free=z.nr_free, wmark_min=z.watermark_min,
            wmark_low=z.watermark_low, wmark_high=z.watermark_high, atomic_floor=self.atomic_floor(),
            pages_emerg=z.pages_emerg, reserve_size=self.reserve_size(), reserve_peak=self.reserve_peak,
            reserve_info=self.reserve.reserve_info() if self.sc.policy == "v12" else "",
            meminfo=self.vmstat.meminfo(z), vmstat=self.vmstat.snapshot(), ss=net.ss(),
            socket_holders=holders, frag_queues=frag_q, frag_bytes=frag_b, route_entries=route_n,
            route_bytes=route_b, route_max=route_max, slabinfo=self.slabs.slabinfo(), inflight=inflight,
            swap_sock=swap_sock, swap_sock_drops=swap_drops, swap_retransmits=retrans, drops=self.drops(),
            nstat=net.stat.nstat(), tasks=tasks)

    # ---- running -----------------------------------------------------------------------------

    async def _workload_proc(self, i: int, nr_pages: int, pattern: Pattern) -> None:
        from emu.mm.process import Process
        from emu.mm.sched import task

        from emu.mm.page_alloc import Page

        with task(f"workload{i}"):
            proc = Process(self.mm, f"workload{i}", nr_pages)
            self.procs.append(proc)
            checkpoint = trio.lowlevel.checkpoint
            for page, write in pattern:
                await proc.touch(page, write=write)
                self.done += 1
                await checkpoint()  # a resident access never sleeps: let the others run (the tick)
            # Finally read every page back once and check its bytes, resident or swapped.
            for page in range(nr_pages):
                await proc.touch(page, write=False)
                pte = proc.pte[page]
                if pte.__class__ is Page and proc.verify(page, pte.data):
                    self.final_verified += 1
                else:
                    self.final_mismatches += 1
                    if len(self.mismatch_details) < 10 and pte.__class__ is Page:
                        # what the page holds instead: (pid, page, version) of its first 16 bytes
                        found = struct.unpack_from("<IIQ", pte.data)
                        self.mismatch_details.append({"process": proc.name, "pid": proc.pid, "page": page,
                                                      "version": proc.version[page], "found": list(found),
                                                      "pfn": pte.pfn})
                self.done += 1
                await trio.lowlevel.checkpoint()

    async def run(self, progress: Callable[[RunStatus], None] | None = None) -> RunResult:
        sc = self.sc
        self.t0 = trio.current_time()
        wall0 = time.monotonic()
        res = RunResult("error", sc.policy, sc.backend, self.server.url(), sc.host.ram, sc.host.page_size)
        outcome = "timeout"
        try:
            async with trio.open_nursery() as nursery:
                await self.start_kernel(nursery)
                nursery.start_soon(self._sampler, progress)
                await self.start_apps(nursery)
                # User space (workload and application processes) in its own nursery, stopped
                # before the kernel (mm, net, swap transport) at the end of the run: a process
                # woken by an I/O completion just as the kernel stops would otherwise start
                # swap-out on an mm that no longer runs.
                user_scope = trio.CancelScope()
                user_done = trio.Event()

                async def user_space(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
                    try:
                        with user_scope:
                            async with trio.open_nursery() as un:
                                task_status.started(un)
                                await trio.sleep_forever()
                    finally:
                        user_done.set()

                user = await nursery.start(user_space)
                self._app_nursery = user
                deadline = self.t0 + sc.watchdog.timeout
                if self.app_ports:
                    # The background traffic runs from the start (its generator needs a moment
                    # to build its packets). A plain socket outside the emulated host, also a
                    # target, tells us when it flows.
                    self._probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                    self._probe.bind(("127.0.0.1", 0))
                    self._probe.setblocking(False)
                    nursery.start_soon(self.traffic, min(sc.traffic.duration, sc.watchdog.timeout))
                self.phase = "swapon"
                await self.swapon(nursery)
                if self.app_ports:
                    self.phase = "traffic"
                    with trio.move_on_after(20):
                        while "error" not in self.traffic_info:
                            try:
                                self._probe.recv(65536)
                                break
                            except BlockingIOError:
                                await trio.sleep(0.02)
                    self._probe.close()
                nr = sc.workload.working_set // sc.host.page_size
                sizes = split_pages(nr, sc.workload.processes)
                patterns = [Pattern(sc.workload.kind, n, sc.workload.passes, sc.workload.seed + i,
                                    sc.workload.hot_fraction, sc.workload.hot_probability, sc.workload.write_fraction)
                            for i, n in enumerate(sizes)]
                self.pattern_total = sum(len(p) + n for p, n in zip(patterns, sizes))
                finished = trio.Event()
                verdict_box: list[Verdict] = []

                async def workload() -> None:
                    async with trio.open_nursery() as wn:
                        for i, (n, p) in enumerate(zip(sizes, patterns)):
                            wn.start_soon(self._workload_proc, i, n, p)
                    finished.set()

                user.start_soon(workload)
                self.phase = "running"
                # the low watermark as the allocator sees it (v12 adds pages_emerg to every mark)
                low = self.zone.watermark_low + (self.zone.pages_emerg if sc.policy == "v12" else 0)
                listen_below = low if sc.traffic.start_after <= 0 else None
                listen_at = trio.current_time() + sc.traffic.start_after
                while True:
                    now = trio.current_time()
                    if self.app_ports and not self.app_socks and (
                            (listen_below is not None and self.zone.nr_free <= listen_below)
                            or (listen_below is None and now >= listen_at)):
                        await self.listen_apps()
                    if finished.is_set():
                        outcome = "completed"
                        break
                    v = self.dog.observe(now, self.progress(), self.blocked())
                    if v is not None:
                        verdict_box.append(v)
                        outcome = "deadlock"
                        break
                    if now >= deadline:
                        outcome = "timeout"
                        break
                    await trio.sleep(sc.watchdog.sample)
                self.phase = outcome
                now = trio.current_time()
                self.sample(now)
                if outcome == "timeout" and os.environ.get("NETSWAP_DEBUG_TIMEOUT"):
                    self.report_text = render_deadlock_report(self.report_data(now, self.dog.stalled_for(now)))
                if outcome == "deadlock":
                    self.verdict = verdict_box[0]
                    self.report_text = render_deadlock_report(self.report_data(now, self.verdict.stalled_for))
                    res.stall = {"t": round(now - self.t0, 2), "nr_free": self.zone.nr_free,
                                 "stalled_for": round(self.verdict.stalled_for, 2),
                                 "blocked_tasks": len(self.verdict.blocked),
                                 "inflight": len(self.storage.inflight.ios) if self.storage else 0}
                self._fill_result(res, outcome, time.monotonic() - wall0)
                if progress:
                    progress(self.status(outcome, self.recorder.samples[-1] if self.recorder.samples else None, now))
                user_scope.cancel()
                with trio.move_on_after(2):
                    await user_done.wait()
                nursery.cancel_scope.cancel()
        finally:
            with trio.move_on_after(3, shield=True):
                await self.shutdown()
        return res

    def _fill_result(self, res: RunResult, outcome: str, duration: float) -> None:
        vm = self.vmstat.counters
        res.outcome = outcome
        res.pages_swapped_out = int(vm["pswpout"])
        res.pages_swapped_in = int(vm["pswpin"])
        res.integrity = self.integrity()
        if self.storage is not None:
            res.integrity["storage_audit"] = {"checked": self.storage.inflight.audit_checked,
                                              "mismatches": self.storage.inflight.audit_mismatches}
        if self.mismatch_details:
            res.integrity["details"] = self.mismatch_details
        if self.mm.verify_errors:
            res.integrity["first_mismatches"] = [list(e) for e in self.mm.verify_errors[:10]]  # type: ignore[assignment]
        res.drops = self.drops()
        res.reserve = {"size": self.reserve_size(), "peak": self.reserve_peak}
        res.duration_s = round(duration, 3)
        res.accesses_done = self.done
        res.accesses_total = self.pattern_total
        res.min_free = self.min_free
        res.wmark_min = self.zone.watermark_min
        res.atomic_floor = self.atomic_floor()
        res.swap_retransmits = self.storage.retransmits() if self.storage else 0
        res.emergency_skbs = int(self.net.stat.skbs_emergency)
        res.traffic = self.traffic_info
        res.vmstat = {k: int(v) for k, v in vm.items() if v}
        res.report = self.report_text

    # ---- parts -------------------------------------------------------------------------------

    async def _sampler(self, progress: Callable[[RunStatus], None] | None) -> None:
        """The timeline, from the first moment: one sample per tick, progress every 0.1 s."""
        last = 0.0
        while True:
            now = trio.current_time()
            s = self.sample(now)
            if progress and now - last >= 0.1:
                last = now
                progress(self.status(self.phase, s, now))
            await trio.sleep(self.sc.watchdog.sample)

    async def start_kernel(self, nursery: trio.Nursery) -> None:
        await nursery.start(self.mm.run)    # kswapd and the swap-I/O tasks
        await nursery.start(self.net.run)   # the receive stage (ksoftirqd) and IP timers

    async def swapon(self, nursery: trio.Nursery) -> None:
        from emu.swapdev import make_storage

        self.storage = make_storage(self, self.server)
        await nursery.start(self.storage.run)
        nr_slots = self.sc.host.swap // self.sc.host.page_size
        await self.mm.swapon(self.storage, nr_slots)

    async def start_apps(self, nursery: trio.Nursery) -> None:
        """The application daemons: their processes (heaps written once) and the UDP ports they
        will listen on. They start listening when the host comes under memory pressure
        (`listen_apps`); until then the traffic aimed at those ports finds no socket on this
        machine and the real kernel discards it."""
        from emu.mm.process import Process
        from emu.mm.sched import task
        from emu.servers import free_port

        tr = self.sc.traffic
        if tr.profile == "none" or tr.apps == 0:
            return
        for i in range(tr.apps):
            proc = Process(self.mm, f"app{i}", tr.app_pages)
            with task(f"app{i}"):
                for page in range(tr.app_pages):
                    await proc.touch(page, write=True)
            self.apps.append(proc)
            port = free_port(udp_too=True)
            while port in self.app_ports:
                port = free_port(udp_too=True)
            self.app_ports.append(port)
        self._app_nursery = nursery

    async def listen_apps(self) -> None:
        for i, (proc, port) in enumerate(zip(self.apps, self.app_ports)):
            sk = await self.net.open_app_udp(port, proc)
            self.app_socks.append(sk)
            self._app_nursery.start_soon(self._app_loop, i, proc, sk)
        self.listening_at = trio.current_time() - self.t0

    async def _app_loop(self, i: int, proc: Any, sk: Any) -> None:
        """An application: whenever data is queued (at most every `app_period` s) it looks at
        the next `app_touch` pages of its heap (round robin) and reads everything queued. A page
        it has not used for a while has been swapped out: it waits in the fault, its queue fills."""
        from emu.mm.sched import task
        from emu.net.sock import app_reader

        tr = self.sc.traffic
        state = {"next": 0}

        async def resident() -> None:
            for _ in range(tr.app_touch):
                await proc.touch(state["next"], write=False)
                state["next"] = (state["next"] + 1) % tr.app_pages

        with task(f"app{i}"):
            await app_reader(sk, resident, tr.app_period)

    async def traffic(self, duration: float) -> None:
        """The background traffic, from a separate process (bounded by `duration`); stopped
        (SIGTERM) when the run ends."""
        tr = self.sc.traffic
        ports = list(self.app_ports) + [self._probe.getsockname()[1]]
        size = tr.frag_size if tr.profile == "frag" else tr.size
        self.traffic_info = {"profile": tr.profile, "rate": tr.rate, "size": size, "ports": ports,
                             "duration": round(duration, 1)}
        try:
            from emu.traffic.api import inject, make_spec
        except ImportError:
            argv, how = traffic_argv(tr, ports, duration)
            self.traffic_info["generator"] = how
            await trio.run_process(argv, check=False)
            return
        privileged = os.geteuid() == 0 and self.raw_traffic
        spoof = tr.spoof if privileged else None
        spec = make_spec(tr.profile, ports, rate=float(tr.rate), duration=duration, size=size, spoof=spoof,
                         distinct=tr.distinct)
        if not privileged and spec.needs_raw:
            spec = spec.without_raw()  # what resolve(fallback=True) does without CAP_NET_RAW
            self.traffic_info["profile"] = str(spec.profile)
            self.traffic_info["size"] = spec.size
            self.traffic_info["fallback"] = f"no CAP_NET_RAW: {tr.profile} sent as {spec.profile}, no spoofing"
        self.traffic_info["generator"] = "emu.traffic (scapy, raw socket)" if spoof else "emu.traffic (ordinary socket)"
        self.traffic_info["spoof"] = spoof
        try:
            stats = await inject(spec, isolate=True, fallback=True)
        except Exception as e:  # noqa: BLE001 - the run goes on; the result says why there was no traffic
            self.traffic_info["error"] = f"{type(e).__name__}: {e}"
            return
        self.traffic_info.update({"sent": stats.sent, "packets": stats.packets, "achieved_rate": round(stats.rate),
                                  "method": stats.method})

    async def shutdown(self) -> None:
        if self.storage is not None:
            with contextlib.suppress(Exception):
                await self.storage.close()
        with contextlib.suppress(Exception):
            self.net.close_all()


def stop_process(p: subprocess.Popen[bytes]) -> None:
    if p.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            p.send_signal(signal.SIGTERM)
        try:
            p.wait(3)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(3)


# --- entry points -----------------------------------------------------------------------------


def write_outputs(res: RunResult, host: Host | None, out_dir: Path, stem: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    if host is not None:
        png = plot(host.recorder, out_dir / f"{stem}.png",
                   f"netswap {res.backend} / policy {res.policy}: {res.outcome} "
                   f"({res.pages_swapped_out} pages out, {res.pages_swapped_in} in)",
                   deadlock_at=(host.verdict.at - host.t0) if host.verdict else None)
        res.files["timeline"] = str(png)
    if res.report:
        rp = out_dir / f"{stem}-deadlock.txt"
        rp.write_text(res.report)
        res.files["report"] = str(rp)
    jp = out_dir / f"{stem}.json"
    res.files["json"] = str(jp)
    jp.write_text(json.dumps(res.to_json(), indent=2) + "\n")


async def run_host(sc: scen.Scenario, server: Server, progress: Callable[[RunStatus], None] | None = None,
                   out_dir: Path | None = None, *, raw_traffic: bool = True) -> RunResult:
    host = Host(sc, server, raw_traffic=raw_traffic)
    res = await host.run(progress)
    if out_dir is not None:
        write_outputs(res, host, out_dir, f"{sc.backend}-{sc.policy}")
    return res


def run_scenario(sc: scen.Scenario, progress: Callable[[RunStatus], None] | None = None,
                 out_dir: Path | None = None) -> RunResult:
    """Run one scenario (starting our server unless the scenario names one)."""
    if sc.server:
        return trio.run(run_host, sc, parse_server_url(sc.server), progress, out_dir)
    with local_server(sc.backend, sc.host.swap) as sp:
        return trio.run(run_host, sc, sp.server, progress, out_dir)


def run_matrix(base: scen.Scenario, backends: tuple[str, ...] | list[str], policies: tuple[str, ...] | list[str],
               out_dir: Path | None = None, progress: Callable[[RunStatus], None] | None = None) -> list[RunResult]:
    """Each backend under each policy with the same workload and traffic; one server per backend."""
    results = []
    for b in backends:
        sc_b = base.replace(backend=b)
        if base.server:
            server = parse_server_url(base.server)
            for p in policies:
                results.append(trio.run(run_host, sc_b.replace(policy=p), server, progress, out_dir))
            continue
        with local_server(b, base.host.swap) as sp:
            for p in policies:
                results.append(trio.run(run_host, sc_b.replace(policy=p), sp.server, progress, out_dir))
    return results


