"""A run's time series: its data (CSV and JSON lines) and its PNG timeline.

`Recorder` keeps one `Sample` per tick (free pages, watermarks, reserve use, cumulative swap and
drop counters).  `rows()` turns them into the table behind every plot, one row per sample, with
the columns of `COLUMNS` (names and units documented there and in the README); `write_csv` /
`write_jsonl` write it beside the PNG.  `plot()` draws four stacked panels sharing the time axis:
free pages over the whole zone; the same zoomed to the watermarks, with the atomic floor and the
reserve (its size, and the part in use, filled); swap pages out/in per second; drops per second
by reason.  Every line it draws is a column of the table (`plotted_columns`).  A stuck verdict is
marked where the watchdog declared it.  `plot_summary()` is the demo's one figure: policies x
backends, each the zoomed free-pages panel.
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from emu.kernel.policy import Policy


@dataclass
class Sample:
    t: float
    nr_free: int
    wmark_min: int
    wmark_low: int
    wmark_high: int
    atomic_floor: int
    reserve_used: int          # pages of the reserve in use (pfmemalloc/emergency pages held)
    reserve_size: int          # pages
    pswpout: int
    pswpin: int
    drops: dict[str, int] = field(default_factory=dict)


@dataclass
class Recorder:
    samples: list[Sample] = field(default_factory=list)
    max_samples: int = 20000   # bounded: decimate by two when full

    def add(self, s: Sample) -> None:
        self.samples.append(s)
        if len(self.samples) >= self.max_samples:
            self.samples = self.samples[::2]

    def to_json(self) -> list[dict[str, Any]]:
        return [asdict(s) for s in self.samples]

    def dump(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json()))

    @classmethod
    def load(cls, path: Path) -> "Recorder":
        return cls([Sample(**d) for d in json.loads(path.read_text())])

    def reasons(self) -> list[str]:
        return sorted({k for x in self.samples for k in x.drops})


# column -> (unit, what it is).  Counters are cumulative since the run began; `_per_s` columns are
# the rate of the counter of the same name over the interval since the previous sample (at least
# half a sample period long, so a sample taken just after another does not spike).
COLUMNS: dict[str, tuple[str, str]] = {
    "t_s": ("s", "emulated time since the run began"),
    "nr_free": ("pages", "free pages in the zone"),
    "wmark_min": ("pages", "min watermark"),
    "wmark_low": ("pages", "low watermark"),
    "wmark_high": ("pages", "high watermark"),
    "atomic_floor": ("pages", "lowest free count a GFP_ATOMIC allocation may leave (min - min/2 - min/8)"),
    "reserve_size": ("pages", "what the receive path may take below the watermarks: v12 pages_emerg, pfmemalloc the min watermark, none 0"),
    "reserve_used": ("pages", "reserve pages handed out and not yet freed (pfmemalloc-tagged)"),
    "pswpout": ("pages", "pages swapped out (cumulative)"),
    "pswpin": ("pages", "pages swapped in (cumulative)"),
    "pswpout_per_s": ("pages/s", "swap-out rate"),
    "pswpin_per_s": ("pages/s", "swap-in rate"),
    "drops_<counter>": ("frames", "frames dropped for this reason (cumulative; counters of `nstat`)"),
    "drops_<counter>_per_s": ("frames/s", "drop rate for this reason"),
}
BASE_COLUMNS = [c for c in COLUMNS if "<" not in c]


def _rates(ts: list[float], values: list[int]) -> list[float]:
    """Per-second rate at each sample, over at least half the median sample interval."""
    n = len(ts)
    out = [0.0] * n
    if n < 2:
        return out
    gaps = sorted(ts[i] - ts[i - 1] for i in range(1, n))
    min_dt = gaps[len(gaps) // 2] / 2
    for i in range(1, n):
        j = i - 1
        while j > 0 and ts[i] - ts[j] < min_dt:
            j -= 1
        dt = ts[i] - ts[j]
        out[i] = (values[i] - values[j]) / dt if dt > 0 else out[i - 1]
    return out


def columns(rec: Recorder) -> list[str]:
    reasons = rec.reasons()
    return BASE_COLUMNS + [f"drops_{r}" for r in reasons] + [f"drops_{r}_per_s" for r in reasons]


def rows(rec: Recorder) -> list[dict[str, float | int]]:
    """The table behind the plots: one dict per sample, keys `columns(rec)`."""
    s = rec.samples
    t = [x.t for x in s]
    out_rate = _rates(t, [x.pswpout for x in s])
    in_rate = _rates(t, [x.pswpin for x in s])
    reasons = rec.reasons()
    drop_rates = {r: _rates(t, [x.drops.get(r, 0) for x in s]) for r in reasons}
    table = []
    for i, x in enumerate(s):
        row: dict[str, float | int] = {
            "t_s": round(x.t, 6), "nr_free": x.nr_free, "wmark_min": x.wmark_min, "wmark_low": x.wmark_low,
            "wmark_high": x.wmark_high, "atomic_floor": x.atomic_floor, "reserve_size": x.reserve_size,
            "reserve_used": x.reserve_used, "pswpout": x.pswpout, "pswpin": x.pswpin,
            "pswpout_per_s": round(out_rate[i], 3), "pswpin_per_s": round(in_rate[i], 3)}
        for r in reasons:
            row[f"drops_{r}"] = x.drops.get(r, 0)
        for r in reasons:
            row[f"drops_{r}_per_s"] = round(drop_rates[r][i], 3)
        table.append(row)
    return table


def write_csv(rec: Recorder, path: Path) -> Path:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns(rec))
        w.writeheader()
        w.writerows(rows(rec))
    return path


def write_jsonl(rec: Recorder, path: Path) -> Path:
    with path.open("w") as f:
        for row in rows(rec):
            f.write(json.dumps(row) + "\n")
    return path


def read_jsonl(path: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plotted_columns(rec: Recorder, policy: Policy | None = None) -> list[str]:
    """The columns `plot` draws, in order (each line of the PNG is one of them)."""
    cols = ["nr_free", "wmark_high", "wmark_low", "wmark_min", "atomic_floor"]
    if policy is not Policy.PFMEMALLOC and any(x.reserve_size for x in rec.samples):
        cols.append("reserve_size")  # under pfmemalloc it is the min watermark: drawn as that
    if policy is not Policy.NONE:
        cols.append("reserve_used")
    cols += ["pswpout_per_s", "pswpin_per_s"]
    cols += [f"drops_{r}_per_s" for r in rec.reasons() if any(x.drops.get(r) for x in rec.samples)]
    return cols


def _zoom_top(rec: Recorder) -> float:
    s = rec.samples
    top = max(max(x.wmark_high for x in s), max(x.reserve_size + x.atomic_floor for x in s))
    return top * 1.6


def _free_panel(ax: Any, rec: Recorder, table: list[dict[str, float | int]], policy: Policy | None, zoom: bool) -> None:
    t = [r["t_s"] for r in table]
    ax.plot(t, [r["nr_free"] for r in table], color="black", lw=1.4, label="free pages", zorder=5)
    ax.step(t, [r["wmark_high"] for r in table], where="post", color="tab:green", ls="--", lw=1, label="high")
    ax.step(t, [r["wmark_low"] for r in table], where="post", color="tab:olive", ls="--", lw=1, label="low")
    min_label = "min (= pfmemalloc reserve)" if policy is Policy.PFMEMALLOC else "min"
    ax.step(t, [r["wmark_min"] for r in table], where="post", color="tab:red", ls="--", lw=1.2, label=min_label)
    ax.step(t, [r["atomic_floor"] for r in table], where="post", color="tab:purple", ls=":", lw=1.2,
            label="GFP_ATOMIC floor")
    if zoom:
        if "reserve_size" in plotted_columns(rec, policy):
            ax.step(t, [r["reserve_size"] for r in table], where="post", color="darkorange", ls="-", lw=2.2,
                    label="reserve size (pages_emerg)")
        if policy is not Policy.NONE:
            ax.fill_between(t, 0, [r["reserve_used"] for r in table], step="post", facecolor="orange", alpha=0.6,
                            edgecolor="darkorange", hatch="///", lw=0.8, label="reserve in use", zorder=4)
        ax.set_ylim(0, _zoom_top(rec))
        ax.set_ylabel("pages (zoom)")
    else:
        ax.set_ylim(0, max(max(r["nr_free"] for r in table) * 1.05, 1))
        ax.set_ylabel("free pages")


def plot(rec: Recorder, path: Path, title: str, deadlock_at: float | None = None, policy: Policy | None = None,
         verdict: str = "deadlock") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = rec.samples
    fig, axes = plt.subplots(4, 1, figsize=(11, 10), sharex=True,
                             gridspec_kw={"height_ratios": [1.3, 2.4, 1.3, 1.5]})
    ax0, ax1, ax2, ax3 = axes
    if not s:
        ax1.text(0.5, 0.5, "no samples", ha="center", va="center", transform=ax1.transAxes)
    else:
        table = rows(rec)
        t = [r["t_s"] for r in table]
        _free_panel(ax0, rec, table, policy, zoom=False)
        ax0.set_title("free pages, whole zone", fontsize=8, loc="left")
        _free_panel(ax1, rec, table, policy, zoom=True)
        ax1.set_title("near the watermarks" + ("" if policy is not Policy.NONE else "  (policy none: no reserve)"),
                      fontsize=8, loc="left")
        ax2.plot(t, [r["pswpout_per_s"] for r in table], color="tab:blue", lw=1, label="pswpout/s")
        ax2.plot(t, [r["pswpin_per_s"] for r in table], color="tab:cyan", lw=1, label="pswpin/s")
        ax2.set_ylabel("swap pages/s")
        for col in plotted_columns(rec, policy):
            if col.startswith("drops_"):
                ax3.plot(t, [r[col] for r in table], lw=1, label=col.removeprefix("drops_").removesuffix("_per_s"))
        ax3.set_ylabel("drops/s")
        ax3.set_xlabel("emulated time (s)")
        if not any(c.startswith("drops_") for c in plotted_columns(rec, policy)):
            ax3.text(0.5, 0.5, "no drops", ha="center", va="center", transform=ax3.transAxes, color="gray")
        for ax in axes:  # legends outside, on the right: nothing drawn is hidden under them
            if ax.get_legend_handles_labels()[0]:
                ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False)
        if deadlock_at is not None:
            for ax in axes:
                ax.axvline(deadlock_at, color="red", lw=1.5)
            ax1.text(deadlock_at, 0.97, f" {verdict} declared at {deadlock_at:.2f} s ", transform=ax1.get_xaxis_transform(),
                     color="red", fontsize=8, ha="right", va="top",
                     bbox={"facecolor": "white", "edgecolor": "red", "alpha": 0.9})
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_summary(runs: list[tuple[str, Policy, str, Recorder, float | None]], path: Path, title: str) -> Path:
    """One figure for a demo: (backend, policy, outcome, recorder, verdict time) each, in a grid
    of backends (rows) by policies (columns), each the zoomed free-pages panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backends = list(dict.fromkeys(r[0] for r in runs))
    policies = list(dict.fromkeys(r[1] for r in runs))
    fig, axes = plt.subplots(len(backends), len(policies), figsize=(4.2 * len(policies), 2.8 * len(backends)),
                             squeeze=False)
    for backend, policy, outcome, rec, at in runs:
        ax = axes[backends.index(backend)][policies.index(policy)]
        if rec.samples:
            _free_panel(ax, rec, rows(rec), policy, zoom=True)
            if at is not None:
                ax.axvline(at, color="red", lw=1.2)
        color = "green" if outcome == "completed" else "red"
        ax.set_title(f"{backend} / {policy}: {outcome}", fontsize=9, color=color)
        ax.tick_params(labelsize=7)
        ax.set_ylabel("")
    axes[-1][0].set_xlabel("emulated time (s)", fontsize=8)
    axes[0][0].set_ylabel("pages", fontsize=8)
    handles: dict[str, Any] = {}
    for row in axes:
        for ax in row:
            for h, lab in zip(*ax.get_legend_handles_labels()):
                handles.setdefault(lab, h)
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(len(handles), 5), fontsize=8,
               frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 0.96))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
