"""The cluster's timeline: one figure, one row per host, on a shared emulated-time axis.

Each row shows the host's free pages against its min watermark (and under a reserve policy the
reserve in use), its swap-out rate on the right axis, and a red line where its watchdog declared
it stuck.  Each host's time is its own emulated clock: rows line up by emulated seconds since each
host's start, not by the wall clock.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from emu.host.identity import host_addr, host_label

if TYPE_CHECKING:
    from emu.host.cluster import ClusterResult


def plot_hosts(res: ClusterResult, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = res.hosts
    fig, axes = plt.subplots(n, 1, figsize=(10, 0.9 + 1.15 * n), sharex=True, squeeze=False, layout="constrained")
    for k in range(n):
        ax = axes[k][0]
        i = k + 1
        r = res.results[k] if k < len(res.results) else None
        ss: list[dict[str, Any]] = res.samples.get(i, [])
        t = [s["t"] for s in ss]
        if ss:
            ax.plot(t, [s["nr_free"] for s in ss], color="tab:blue", lw=0.9, label="free pages")
            ax.plot(t, [s["wmark_min"] for s in ss], color="tab:gray", lw=0.8, ls="--", label="min")
            if any(s["reserve_used"] for s in ss):
                ax.plot(t, [s["reserve_used"] for s in ss], color="tab:green", lw=0.8, label="reserve used")
            ax2 = ax.twinx()
            rate = [0.0] + [(b["pswpout"] - a["pswpout"]) / (b["t"] - a["t"]) if b["t"] > a["t"] else 0.0
                            for a, b in zip(ss, ss[1:])]
            ax2.plot(t, rate, color="tab:orange", lw=0.6, alpha=0.7)
            ax2.set_ylabel("out/s", fontsize=7, color="tab:orange")
            ax2.tick_params(labelsize=6)
        outcome = r.outcome if r is not None else "no result"
        if r is not None and r.stall:
            ax.axvline(r.stall["t"], color="red", lw=1.2)
            outcome += f" at {r.stall['t']:.2f} s"
        ax.set_ylabel(f"{host_label(i)}\n{host_addr(i)}", fontsize=7, rotation=0, ha="right", va="center")
        ax.tick_params(labelsize=6)
        color = "red" if r is not None and r.stall else ("black" if outcome.startswith("completed") else "darkorange")
        ax.text(0.985, 0.9, outcome, transform=ax.transAxes, ha="right", va="top", fontsize=7, color=color,
                bbox={"facecolor": "white", "alpha": 0.85, "linewidth": 0})
        if k == 0:
            ax.legend(loc="upper left", fontsize=6, ncol=3)
    axes[-1][0].set_xlabel("emulated seconds (each host's own clock)")
    lat = res.server_stats.get("latency_s", {})
    extra = f"; server p50 {lat['p50_s'] * 1e3:.2f} ms, p99 {lat['p99_s'] * 1e3:.2f} ms" if lat else ""
    fig.suptitle(f"netswap cluster: {n} hosts, {res.backend}, policy {res.policy}: {res.completed} completed, "
                 f"{res.stuck} stuck{extra}", fontsize=9)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
