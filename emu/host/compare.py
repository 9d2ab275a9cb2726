"""`netswap compare`: runs side by side, from their JSON results.

`load_runs` reads `netswap run --json` / `--out` results (a demo's summary.json gives all its
runs); `differences` flattens the figures that matter and keeps the rows where the runs differ;
`plot_overlay` draws one figure with every run's timeline overlaid (free pages near the
watermarks, pages swapped out, drops), from the `*-timeline.jsonl` files the runs wrote.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from emu.host.timeline import read_jsonl


class CompareError(ValueError):
    pass


def load_runs(paths: list[str]) -> list[tuple[str, dict[str, Any]]]:
    """(path, run JSON) for each file; a summary.json contributes each of its runs."""
    out: list[tuple[str, dict[str, Any]]] = []
    for p in paths:
        try:
            data = json.loads(Path(p).read_text())
        except OSError as e:
            raise CompareError(f"{p}: cannot read: {e.strerror}") from None
        except json.JSONDecodeError as e:
            raise CompareError(f"{p}: not JSON: {e}") from None
        if isinstance(data, dict) and isinstance(data.get("runs"), list):
            out += [(f"{p}#{r.get('backend')}-{r.get('policy')}", r) for r in data["runs"]]
        elif isinstance(data, dict) and "outcome" in data and "policy" in data:
            out.append((p, data))
        else:
            raise CompareError(f"{p}: not a netswap run result (netswap run --json) nor a demo summary.json")
    if len(out) < 2:
        raise CompareError("need at least two runs to compare")
    return out


def flatten(r: dict[str, Any]) -> dict[str, Any]:
    """The figures compared, by row name."""
    f: dict[str, Any] = {
        "backend": r.get("backend"), "policy": r.get("policy"), "outcome": r.get("outcome"),
        "verdict at (s)": (r.get("stall") or {}).get("t", r.get("emulated_s")),
        "emulated_s": r.get("emulated_s"), "wall_s": r.get("wall_s"),
        "workload done": f"{r.get('accesses_done')}/{r.get('accesses_total')}",
        "pages out": r.get("pages_swapped_out"), "pages in": r.get("pages_swapped_in"),
        "verified": (r.get("integrity") or {}).get("verified"),
        "mismatches": (r.get("integrity") or {}).get("mismatches"),
        "min free": r.get("min_free"), "wmark min": r.get("wmark_min"),
        "reserve size": "–" if r.get("policy") == "none" else (r.get("reserve") or {}).get("size"),
        "reserve peak": (r.get("reserve") or {}).get("peak"),
        "progress/s": r.get("progress_rate"), "swap retransmits": r.get("swap_retransmits"),
        "emergency skbs": r.get("emergency_skbs"),
        "cpu busy s": (r.get("clock") or {}).get("cpu_busy_s"),
    }
    tr = r.get("traffic") or {}
    for k in ("offered", "arrived", "delivered", "read_by_apps"):
        if k in tr:
            f[f"traffic {k}"] = tr[k]
    for k, v in (r.get("drops") or {}).items():
        f[f"drops {k}"] = v
    for k in ("pgscan_kswapd", "pgscan_direct", "pgsteal", "allocstall", "pgmajfault"):
        if k in (r.get("vmstat") or {}):
            f[k] = r["vmstat"][k]
    return f


def differences(runs: list[dict[str, Any]], all_rows: bool = False) -> list[tuple[str, list[Any]]]:
    flat = [flatten(r) for r in runs]
    keys = list(dict.fromkeys(k for f in flat for k in f))
    out = []
    for k in keys:
        vals = [f.get(k, 0 if k.startswith("drops ") else None) for f in flat]
        if all_rows or len({json.dumps(v) for v in vals}) > 1:
            out.append((k, vals))
    return out


def _timeline_of(path: str, r: dict[str, Any]) -> list[dict[str, float]] | None:
    p = (r.get("files") or {}).get("timeline_jsonl")
    if not p:
        return None
    # As written (relative to where the run was started), relative to the result's folder (the
    # run was started there), or beside the result.
    here = Path(path.split("#")[0]).parent
    cand = [Path(p), here / p, here / Path(p).name]
    for c in cand:
        if c.is_file():
            return read_jsonl(c)
    return None


def plot_overlay(runs: list[tuple[str, dict[str, Any]]], labels: list[str], path: Path) -> tuple[Path, int]:
    """One figure, the runs overlaid; returns (path, runs that had a timeline)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(3, 1, figsize=(11, 8.5), sharex=True,
                                        gridspec_kw={"height_ratios": [2.2, 1.2, 1.2]})
    drawn = 0
    top = 0.0
    for (p, r), label in zip(runs, labels):
        rows = _timeline_of(p, r)
        if not rows:
            continue
        drawn += 1
        t = [x["t_s"] for x in rows]
        line, = ax1.plot(t, [x["nr_free"] for x in rows], lw=1.3, label=f"{label}: {r['backend']}/{r['policy']} {r['outcome']}")
        c = line.get_color()
        ax1.plot(t, [x["wmark_min"] for x in rows], color=c, ls="--", lw=0.8)
        top = max(top, max(x["wmark_high"] for x in rows), max(x["reserve_size"] + x["atomic_floor"] for x in rows))
        ax2.plot(t, [x["pswpout"] for x in rows], color=c, lw=1.2)
        drops = [sum(v for k, v in x.items() if k.startswith("drops_") and not k.endswith("_per_s")) for x in rows]
        ax3.plot(t, drops, color=c, lw=1.2)
        stall = (r.get("stall") or {}).get("t")
        if stall is not None:
            for ax in (ax1, ax2, ax3):
                ax.axvline(stall, color=c, lw=1, ls=":")
    if top:
        ax1.set_ylim(0, top * 1.6)
    ax1.set_ylabel("free pages (zoom)\n-- : min watermark")
    ax2.set_ylabel("pages swapped out")
    ax3.set_ylabel("frames dropped")
    ax3.set_xlabel("emulated time (s)  (dotted: stuck verdict)")
    if drawn:
        ax1.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    else:
        ax1.text(0.5, 0.5, "no timelines found (run with --out)", ha="center", transform=ax1.transAxes)
    fig.suptitle("netswap compare", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path, drawn
