"""What a run shows: the result tables and the deadlock report (live progress: `emu.host.progress`).

The deadlock report is SysRq-M and SysRq-T together, written for a kernel engineer:
free pages against each watermark and the reserve; who holds memory (skbs queued per socket,
fragment queues, route cache, slab caches); the swap I/O in flight and how often its replies were
dropped and why; the blocked tasks and where they wait. `ReportData` is filled by the host from
its mm and net; this module only lays it out, so the layout is tested without a host.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from rich import box
from rich.console import Console
from rich.table import Table

from emu.host.identity import host_addr, host_label
from emu.host.result import RunResult
from emu.kernel.policy import Policy
from emu.net.dropmon import reason_table


if TYPE_CHECKING:
    from emu.host.cluster import ClusterResult  # cluster -> launch -> collect -> report at run time


@dataclass
class InflightIO:
    """One swap I/O the storage has sent and not seen complete."""

    op: str            # "write" / "read"
    slot: int
    nr_pages: int
    age_s: float
    attempts: int      # sends (1 + retransmissions / reissues)
    what: str = ""     # "WRITE FILE_SYNC xid=0x..." / "WRITE(10) FUA ITT=..."


@dataclass
class ReportData:
    policy: Policy
    backend: str
    server: str
    t: float
    stalled_for: float
    nr_pages: int
    nr_free: int
    wmark_min: int
    wmark_low: int
    wmark_high: int
    atomic_floor: int
    pages_emerg: int
    reserve_size: int
    reserve_peak: int
    reserve_info: str = ""
    meminfo: str = ""
    vmstat: dict[str, int] = field(default_factory=dict)
    ss: str = ""
    socket_holders: list[tuple[str, int, int, bool]] = field(default_factory=list)  # (socket, skbs, bytes, memalloc)
    frag_queues: int = 0
    frag_bytes: int = 0
    route_entries: int = 0
    route_bytes: int = 0
    route_max: int = 0
    slabinfo: str = ""
    inflight: list[InflightIO] = field(default_factory=list)
    swap_sock: str = ""
    swap_sock_drops: dict[str, int] = field(default_factory=dict)
    swap_retransmits: int = 0
    drops: dict[str, int] = field(default_factory=dict)
    nstat: str = ""
    tasks: list[tuple[int, str, str, str, str]] = field(default_factory=list)  # (pid, comm, state, wchan, flags)
    kind: str = "deadlock"  # or "livelock"
    detail: str = ""  # what the watchdog measured (livelock: the progress rate and its reference)


def _kb(pages: int, page_size: int = 4096) -> str:
    return f"{pages * page_size // 1024}kB"


def _ranges(nums: list[int]) -> str:
    """1,2,3,7 -> '1-3,7'."""
    out: list[str] = []
    nums = sorted(nums)
    start = prev = nums[0]
    for n in nums[1:] + [None]:  # type: ignore[list-item]
        if n is not None and n == prev + 1:
            prev = n
            continue
        out.append(f"{start}-{prev}" if prev != start else str(start))
        if n is not None:
            start = prev = n
    return ",".join(out)


def group_tasks(tasks: list[tuple[int, str, str, str, str]]) -> list[tuple[list[int], str, str, str, str, str]]:
    """Tasks with the same name (instance number aside), state, wait channel (its arguments aside)
    and flags, as one line each, in order of first appearance: (pids, comm, state, wchan, flags,
    what the grouped wait channels' arguments were)."""
    groups: dict[tuple[str, str, str, str], tuple[list[int], list[str], list[str]]] = {}
    for pid, comm, state, wchan, flags in tasks:
        words = (wchan or "").split()
        fixed = []
        for w in words:
            if any(c.isdigit() for c in w):
                break
            fixed.append(w)
        base_wchan = " ".join(fixed) or (wchan or "")
        base_comm = re.sub(r"\d+$", "", comm) or comm
        key = (base_comm, state, base_wchan, flags)
        g = groups.setdefault(key, ([], [], []))
        g[0].append(pid)
        g[1].append(comm)
        g[2].append(" ".join(words[len(fixed):]))
    out = []
    for (base_comm, state, base_wchan, flags), (pids, comms, args) in groups.items():
        if len(pids) == 1:
            out.append((pids, comms[0], state, base_wchan + (" " + args[0] if args[0] else ""), flags, ""))
            continue
        comm = comms[0] if len(set(comms)) == 1 else base_comm
        shown = [a for a in args if a]
        detail = ""
        if shown:
            detail = f"{base_wchan} " + ", ".join(shown[:4]) + (f" ... ({len(shown)} in all)" if len(shown) > 4 else "")
        out.append((pids, comm, state, base_wchan, flags, detail))
    return out


def render_deadlock_report(r: ReportData) -> str:
    L: list[str] = []
    bar = "=" * 100
    L.append(bar)
    L.append(f"netswap: {r.kind.upper()} — policy {r.policy}, backend {r.backend}, server {r.server}")
    if r.kind == "deadlock":
        L.append(f"at t={r.t:.3f} s (emulated): tasks blocked in reclaim/faults for {r.stalled_for:.2f} s, "
                 f"no page reclaimed and no swap I/O completed")
    else:
        L.append(f"at t={r.t:.3f} s (emulated): {r.detail}")
    L.append(bar)

    L.append("\nSysRq : Show Memory")
    L.append(f"Node 0 Normal free:{_kb(r.nr_free)} min:{_kb(r.wmark_min)} low:{_kb(r.wmark_low)} "
             f"high:{_kb(r.wmark_high)} present:{_kb(r.nr_pages)}")
    L.append(f"  free pages {r.nr_free} of {r.nr_pages}: "
             + ("BELOW min" if r.nr_free <= r.wmark_min else "above min")
             + f" (min {r.wmark_min}, low {r.wmark_low}, high {r.wmark_high}); GFP_ATOMIC floor "
             f"{r.atomic_floor} pages ({'reached' if r.nr_free <= r.atomic_floor + 1 else 'not reached'})")
    if r.pages_emerg or r.reserve_size:
        L.append(f"  reserve: {r.reserve_size} pages (pages_emerg {r.pages_emerg}), peak use {r.reserve_peak} pages")
    else:
        L.append("  reserve: – (policy none: the receive path never reaches a reserve; "
                 f"{r.reserve_peak} pages at most were held below min by PF_MEMALLOC tasks such as kswapd)")
    if r.reserve_info:
        L.append("/proc/reserve_info:")
        L.extend("  " + x for x in r.reserve_info.rstrip().splitlines())
    if r.meminfo:
        L.append("/proc/meminfo:")
        L.extend("  " + x for x in r.meminfo.rstrip().splitlines())

    L.append("\nMemory holders")
    total_sk = sum(b for _, _, b, _ in r.socket_holders)
    L.append(f"  skbs queued on sockets: {sum(n for _, n, _, _ in r.socket_holders)} skbs, "
             f"{total_sk} bytes truesize ({total_sk // 4096} pages)")
    for name, n, b, memalloc in sorted(r.socket_holders, key=lambda x: -x[2]):
        L.append(f"    {name:<46} {n:>6} skbs {b:>10} bytes{'  SOCK_MEMALLOC' if memalloc else ''}")
    L.append(f"  IPv4 fragment queues: {r.frag_queues} queues, {r.frag_bytes} bytes")
    L.append(f"  IPv4 route cache: {r.route_entries} entries (max_size {r.route_max}), {r.route_bytes} bytes")
    if r.slabinfo:
        L.append("  /proc/slabinfo:")
        L.extend("    " + x for x in r.slabinfo.rstrip().splitlines())
    if r.ss:
        L.append("  ss -m:")
        L.extend("    " + x for x in r.ss.rstrip().splitlines())

    L.append("\nSwap I/O in flight")
    if not r.inflight:
        L.append("  none")
    for io in sorted(r.inflight, key=lambda x: -x.age_s)[:20]:
        L.append(f"  {io.op:<5} slot {io.slot:>6} x{io.nr_pages} pages  waiting {io.age_s:6.2f} s  "
                 f"sent {io.attempts}x  {io.what}")
    if len(r.inflight) > 20:
        L.append(f"  ... and {len(r.inflight) - 20} more")
    L.append(f"  swap transport {r.swap_sock or '?'}: requests retransmitted/reissued {r.swap_retransmits} times")
    reasons = {k: v for k, v in r.swap_sock_drops.items() if v}
    if reasons:
        by_count = sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))  # the main reason first
        L.append("  replies to swap I/O dropped: " + ", ".join(f"{k} {v}" for k, v in by_count))
    else:
        L.append("  replies to swap I/O dropped: (none recorded per socket)")
    L.append("  host-wide drops: " + (", ".join(f"{k} {v}" for k, v in r.drops.items() if v) or "none"))
    table = reason_table(r.drops)
    if table:
        L.append("\nDrops by reason (as `dropwatch -l kas` / `perf record -e skb:kfree_skb` would count them)")
        L.append(f"  {'drop reason':<32} {'netswap counter':<16} {'kernel site':<24} {'frames':>10}")
        for reason, counter, site, n in table:
            L.append(f"  {reason:<32} {counter:<16} {site:<24} {n:>10}")
    if r.drops.get("rx_nomem"):
        L.append("  => replies cannot be received: the skb for them cannot be allocated (rx_nomem) because "
                 "free memory is at the GFP_ATOMIC floor and this policy gives the receive path no reserve.")

    L.append("\nSysRq : Show Blocked State  (identical tasks grouped: N x task)")
    L.append(f"  {'pid':>9} {'task':<20} {'state':<20} {'wchan':<28} flags")
    for pids, comm, state, wchan, flags, detail in group_tasks(r.tasks):
        if len(pids) == 1:
            L.append(f"  {pids[0]:>9} {comm:<20} {state:<20} {wchan or '-':<28} {flags}")
        else:
            who = f"{len(pids)} x {comm}"
            L.append(f"  {'':>9} {who:<20} {state:<20} {wchan or '-':<28} {flags}")
            L.append(f"  {'':>9}   pids {_ranges(pids)}" + (f"; {detail}" if detail else ""))
    if r.vmstat:
        keys = ("pgalloc", "pgfree", "pgscan_kswapd", "pgscan_direct", "pgsteal", "pswpout", "pswpin",
                "pgmajfault", "allocstall", "pgscan_direct_throttle")
        L.append("\n/proc/vmstat: " + " ".join(f"{k} {r.vmstat[k]}" for k in keys if k in r.vmstat))
    if r.nstat:
        L.append("nstat:")
        L.extend("  " + x for x in r.nstat.rstrip().splitlines())
    return "\n".join(L) + "\n"


# --- results ----------------------------------------------------------------------------------


def outcome_style(outcome: str) -> str:
    return {"completed": "[green]completed[/]", "deadlock": "[bold red]deadlock[/]",
            "livelock": "[bold red]livelock[/]"}.get(outcome, f"[yellow]{outcome}[/]")


def print_result(console: Console, result: RunResult) -> None:
    """One run's figures (and its deadlock report when it got stuck), on the result's console."""
    if result.report:
        # (already laid out in lines: never re-wrapped at the console's width, e.g. 100 in a file)
        console.print(result.report, markup=False, highlight=False, soft_wrap=True)
    results_table(console, [result], title=f"netswap run: {result.backend} / {result.policy}")
    if result.files:
        for what, path in result.files.items():
            console.print(f"{what}: {path}", markup=False, highlight=False, soft_wrap=True)


def _reserve_cell(r: RunResult) -> str:
    if r.policy is Policy.NONE:
        return "–¹"
    return f"{r.reserve['size']}/{r.reserve['peak']}"


def results_table(console: Console, results: list[RunResult], title: str, width: int = 80) -> None:
    """The figures side by side, in tables that fit `width` columns (runs grouped by backend,
    at most four to a table); notes below."""
    label_w = 18
    per_table = max(1, min(4, (width - label_w - 2) // 15))
    groups: list[list[RunResult]] = []
    for r in results:
        if groups and groups[-1][0].backend == r.backend and len(groups[-1]) < per_table:
            groups[-1].append(r)
        else:
            groups.append([r])
    notes: list[str] = []
    for i, group in enumerate(groups):
        _results_table(console, group, title if i == 0 else "")
    if any(r.policy is Policy.NONE for r in results):
        peaks = ", ".join(f"{r.backend} {r.reserve['peak']}" for r in results if r.policy is Policy.NONE)
        notes.append("¹ none: the receive path has no reserve (pages below min held by")
        notes.append(f"  PF_MEMALLOC tasks such as kswapd peaked at: {peaks})")
    notes.append("reserve: size/peak in pages; drops: frames (--dropwatch: per socket)")
    for n in notes:
        console.print(n, markup=False, highlight=False, soft_wrap=False, width=width)


def _results_table(console: Console, results: list[RunResult], title: str) -> None:
    t = Table(title=title or None, box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1))
    t.add_column("", no_wrap=True, max_width=18)
    for r in results:
        t.add_column(f"{r.backend}\n{r.policy}", justify="right", no_wrap=True)
    rows: list[tuple[str, Callable[[RunResult], str]]] = [
        ("outcome", lambda r: outcome_style(r.outcome)),
        ("verdict at", lambda r: f"{(r.stall or {}).get('t', r.emulated_s):.3f} s"),
        ("wall time", lambda r: f"{r.wall_s:.1f} s"),
        ("workload done", lambda r: f"{100 * r.accesses_done // max(r.accesses_total, 1)}%"),
        ("pages out / in", lambda r: f"{r.pages_swapped_out}/{r.pages_swapped_in}"),
        ("pages verified", lambda r: str(r.integrity["verified"])),
        ("mismatches", lambda r: ("[red]" if r.integrity["mismatches"] else "") + str(r.integrity["mismatches"])),
        ("min free (wmark)", lambda r: f"{r.min_free} ({r.wmark_min})"),
        ("reserve size/peak", _reserve_cell),
        ("swap retransmits", lambda r: str(r.swap_retransmits)),
    ]
    reasons = sorted({k for r in results for k, v in r.drops.items() if v})
    if reasons:
        rows.append(("drops (frames):", lambda r: ""))

    def drops_of(reason: str) -> Callable[[RunResult], str]:
        return lambda r: str(r.drops.get(reason, 0))

    for k in reasons:
        rows.append((f"  {k}"[:18], drops_of(k)))
    rows.append(("emergency skbs", lambda r: str(r.emergency_skbs)))
    for label, fn in rows:
        t.add_row(label, *[fn(r) for r in results])
    console.print(t)


def cluster_table(console: Console, res: ClusterResult) -> None:
    """A cluster's result: a row per host, then the cluster and its server."""
    # Compact (no vertical rules, one space between columns) so that 16 hosts fit 80 columns.
    t = Table(title=f"netswap cluster: {res.hosts} hosts, {res.backend} / {res.policy}, traffic {res.traffic}",
              box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 0))
    clients = res.server_stats.get("clients", {})
    for c in ("host", "outcome", "verdict\nat", "pages\nout", "pages\nin", "drops", "re-\ntrans", "wall",
              *(("server calls\np50/p99 ms",) if clients else ())):
        t.add_column(c, justify="left" if c in ("host", "outcome") else "right", no_wrap=True)
    for i, r in enumerate(res.results, 1):
        seen = clients.get(host_addr(i))  # the server's view of this host (its address)
        server = f"{seen['calls']} {seen['p50_s'] * 1e3:.2f}/{seen['p99_s'] * 1e3:.2f}" if seen else "-"
        t.add_row(f"{host_label(i)} {host_addr(i)}", outcome_style(r.outcome),
                  f"{(r.stall or {}).get('t', r.emulated_s):.3f} s", str(r.pages_swapped_out), str(r.pages_swapped_in),
                  str(sum(r.drops.values())), str(r.swap_retransmits), f"{r.wall_s:.1f} s",
                  *((server,) if clients else ()))
    console.print(t)
    s = res.server_stats
    lat = s.get("latency_s")
    console.print(f"cluster: {res.completed} completed, {res.stuck} stuck of {res.hosts} in {res.wall_s:.1f} s wall")
    console.print(f"server: {s.get('swap_MiB_per_wall_s', 0)} MiB/s of swap, peak RSS "
                  f"{s.get('rss_peak_kib', 0) / 1024:.1f} MiB")
    if lat:
        console.print(f"server: {s.get('calls', 0)} calls ({s.get('calls_per_wall_s', 0)}/s) from "
                      f"{len(s.get('clients', {}))} clients")
        console.print(f"server service time: p50 {lat['p50_s'] * 1e3:.3f} ms, p90 {lat['p90_s'] * 1e3:.3f} ms, "
                      f"p99 {lat['p99_s'] * 1e3:.3f} ms, max {lat['max_s'] * 1e3:.1f} ms")
    for what, path in res.files.items():
        console.print(f"{what}: {path}")
