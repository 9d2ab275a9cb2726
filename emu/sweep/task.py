"""One run of a sweep, as a worker executes it: a plain function of plain data, so that a local
process pool and a Dask worker on another machine run exactly the same thing.

The payload carries the scenario as TOML text and the point's values; the answer is the CSV row.
A run starts its own server (emu.host.servers) and runs to its verdict on its own emulated clock,
so where and beside what it runs does not change its row (except `wall_s` and `worker`).  Runs in
one worker process are serialized by a lock: the deterministic scheduling patch (emu.kernel.clock)
is process-wide, so a Dask worker with several threads still runs one host at a time.
"""

from __future__ import annotations

import os
import socket
import threading
from typing import Any

from emu import scenario as scen
from emu.host.result import STUCK

_RUN_LOCK = threading.Lock()

# the CSV's result columns, in order (the inputs come first: run_id, policy, the keys, repeat, seed)
RESULT_COLUMNS = ("outcome", "stuck", "stall_t", "emulated_s", "drops", "swap_out", "swap_in",
                  "retransmits", "late", "wall_s", "worker", "error")


def payload(sc: scen.Scenario, run_id: str, wall_timeout: float) -> dict[str, Any]:
    return {"scenario": scen.dumps(sc), "source": sc.source, "run_id": run_id, "wall_timeout": wall_timeout}


def row_of(res: Any) -> dict[str, Any]:
    """The result columns of a RunResult."""
    stall = res.stall or {}
    drops = sum(res.drops.values()) if res.drops else 0
    return {
        "outcome": res.outcome,
        "stuck": int(res.outcome in STUCK),
        "stall_t": stall.get("t", ""),
        "emulated_s": res.emulated_s,
        "drops": drops,
        "swap_out": res.pages_swapped_out,
        "swap_in": res.pages_swapped_in,
        "retransmits": res.swap_retransmits,
        "late": res.clock.get("late", 0),
        "wall_s": res.wall_s,
        "error": (res.error or "").replace("\n", " ")[:300],
    }


def cluster_row_of(cres: Any) -> dict[str, Any]:
    """A cluster's row: `stuck` is the share of its hosts that got stuck (so the heatmap shows the
    chance that a host is stuck), the outcome the worst of its hosts', counts summed."""
    rows = [row_of(r) for r in cres.results]
    order = ["completed", "livelock", "deadlock", "timeout", "error"]
    worst = max((r["outcome"] for r in rows), key=lambda o: order.index(o) if o in order else len(order))
    stalls = [r["stall_t"] for r in rows if r["stall_t"] != ""]
    out: dict[str, Any] = {"outcome": worst, "stuck": round(cres.stuck / cres.hosts, 6),
                           "stall_t": min(stalls) if stalls else "",
                           "emulated_s": max(r["emulated_s"] for r in rows), "wall_s": cres.wall_s,
                           "error": "; ".join(r["error"] for r in rows if r["error"])[:300]}
    for c in ("drops", "swap_out", "swap_in", "retransmits", "late"):
        out[c] = sum(int(r[c] or 0) for r in rows)
    return out


def run_point(p: dict[str, Any]) -> dict[str, Any]:
    """Run one point to its verdict; never raises (a run that cannot run is an `error` row)."""
    worker = f"{socket.gethostname()}:{os.getpid()}"
    try:
        sc = scen.loads(p["scenario"], source=p.get("source", "<sweep>"))
        from emu.host.launch import run_scenario

        wall = float(p.get("wall_timeout", 600.0))
        with _RUN_LOCK:
            if sc.cluster.hosts > 1:  # a point may be a whole cluster: its hosts are processes of their own
                from emu.host.cluster import run_cluster

                row = cluster_row_of(run_cluster(sc, wall_timeout=wall))
            else:
                row = row_of(run_scenario(sc, wall_timeout=wall))
    except Exception as e:  # noqa: BLE001 - the row says why; the sweep goes on
        row = {c: "" for c in RESULT_COLUMNS}
        row.update(outcome="error", stuck=0, error=f"{type(e).__name__}: {e}"[:300])
    row["run_id"] = p["run_id"]
    row["worker"] = worker
    return row
