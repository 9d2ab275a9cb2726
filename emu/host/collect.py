"""A run's result, read from the live host at the moment the run ends.

Everything a person or a machine reads after a run (pages swapped, integrity, drops, the reserve,
the traffic, the /proc views, the deadlock report) is taken here from the kernel, the swap device,
the workload and the applications, before anything is torn down.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from emu.host.diagnose import report_data
from emu.host.observe import proc_views
from emu.host.report import render_deadlock_report
from emu.host.result import STUCK, RunResult

if TYPE_CHECKING:
    from emu.host.run import HostRun


def collect_result(run: HostRun, outcome: str) -> RunResult:
    """The result as the live kernel shows it now (wall time and errors are added later)."""
    sc = run.sc
    k = run.kernel
    vm = k.vmstat.counters
    now = run.clock.now
    res = RunResult(outcome, sc.policy, sc.backend, run.server.url(), sc.host.ram, sc.host.page_size,
                    seed=sc.workload.seed)
    res.pages_swapped_out = int(vm["pswpout"])
    res.pages_swapped_in = int(vm["pswpin"])
    w = run.workload
    res.integrity = {"verified": int(vm["pswpin"]) + w.verified, "mismatches": int(k.mm.nr_verify_errors) + w.mismatches,
                     "storage_audit": {"checked": run.swap.inflight.audit_checked,
                                       "mismatches": run.swap.inflight.audit_mismatches}}
    if w.mismatch_details:
        res.integrity["details"] = w.mismatch_details
    if k.mm.verify_errors:
        res.integrity["first_mismatches"] = [list(e) for e in k.mm.verify_errors[:10]]
    res.drops = k.net.stat.drops()
    res.reserve = {"size": k.reserve_size(), "peak": run.reserve_peak}
    res.emulated_s = round(now, 6)
    res.accesses_done = w.done
    res.accesses_total = w.total
    res.min_free = run.min_free
    res.wmark_min = k.zone.watermark_min
    res.atomic_floor = k.zone.atomic_floor()
    res.progress_rate = round(run.progress() / now, 3) if now > 0 else 0.0
    res.swap_retransmits = run.swap.retransmits()
    res.emergency_skbs = int(k.skbs_emergency())
    res.traffic = run.traffic.report() if run.traffic is not None else {"profile": "none"}
    if run.traffic is not None:
        socks = run.apps.socks
        res.traffic["delivered"] = sum(sk.dgrams_read + len(sk.receive_queue) for sk in socks)
        res.traffic["read_by_apps"] = sum(sk.dgrams_read for sk in socks)
        res.traffic["delivered_bytes"] = sum(sk.bytes_read + sk.rx_queued_bytes for sk in socks)
    res.socket_drops = {f"{sk.proto} {sk.local_str()} {sk.owner_name()}": {r: n for r, n in sk.rx_drops.items() if n}
                        for sk in [*k.net.socks, *run.swap.sockets] if any(sk.rx_drops.values())}
    res.views = proc_views(k)
    res.costs = sc.costs.to_json()
    res.clock = {"emulated_s": res.emulated_s, "cpu_busy_s": round(k.cpu.busy, 6), **run.clock.stats.to_json()}
    res.vmstat = {key: int(v) for key, v in vm.items() if v}
    res.server_outages = [{"down_at": round(a, 6), "up_at": None if b is None else round(b, 6)}
                          for a, b in run.swap.link.outages]
    res.server_events = list(run.server_events)
    v = run.verdict
    if v is not None and outcome in STUCK:
        detail = ""
        if v.kind == "livelock":
            detail = (f"progress {v.rate:.1f}/s over the last {v.stalled_for:.1f} s, below "
                      f"{run.dog.fraction:.0%} of the reference {v.reference:.1f}/s, with swap replies dropped")
        res.stall = {"kind": v.kind, "t": round(v.at, 6), "nr_free": k.zone.nr_free,
                     "stalled_for": round(v.stalled_for, 6), "blocked_tasks": len(v.blocked),
                     "inflight": len(run.swap.inflight.ios), "rate": round(v.rate, 3),
                     "reference_rate": round(v.reference, 3)}
        res.report = render_deadlock_report(report_data(
            k, run.swap, backend=sc.backend, server=run.server.url(), kind=v.kind, t=v.at,
            stalled_for=v.stalled_for, reserve_peak=run.reserve_peak, detail=detail))
    return res
