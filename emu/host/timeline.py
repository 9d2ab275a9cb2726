"""A run's time series and its PNG timeline.

`Recorder` keeps one `Sample` per tick (free pages, watermarks, reserve use, cumulative swap and
drop counters); `plot()` draws three stacked panels sharing the time axis: free pages against
min/low/high, the atomic floor and the reserve in use; swap pages out/in per second; drops per
second by reason. A deadlock is marked where the watchdog declared it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


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


def _rates(ts: list[float], values: list[int]) -> list[float]:
    out = [0.0]
    for i in range(1, len(ts)):
        dt = ts[i] - ts[i - 1]
        out.append((values[i] - values[i - 1]) / dt if dt > 0 else 0.0)
    return out


def plot(rec: Recorder, path: Path, title: str, deadlock_at: float | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = rec.samples
    fig, (ax1, ax2, ax3) = plt.subplots(3, 1, figsize=(10, 8.5), sharex=True,
                                         gridspec_kw={"height_ratios": [3, 1.4, 1.4]})
    if not s:
        ax1.text(0.5, 0.5, "no samples", ha="center", va="center", transform=ax1.transAxes)
    else:
        t = [x.t for x in s]
        ax1.plot(t, [x.nr_free for x in s], color="black", lw=1.4, label="free pages")
        ax1.step(t, [x.wmark_high for x in s], where="post", color="tab:green", ls="--", lw=1, label="high")
        ax1.step(t, [x.wmark_low for x in s], where="post", color="tab:olive", ls="--", lw=1, label="low")
        ax1.step(t, [x.wmark_min for x in s], where="post", color="tab:red", ls="--", lw=1, label="min")
        ax1.step(t, [x.atomic_floor for x in s], where="post", color="tab:purple", ls=":", lw=1,
                 label="GFP_ATOMIC floor")
        if any(x.reserve_size for x in s):
            ax1.step(t, [x.reserve_size for x in s], where="post", color="tab:orange", ls="-.", lw=1,
                     label="reserve size")
        ax1.fill_between(t, 0, [x.reserve_used for x in s], color="tab:orange", alpha=0.35,
                         label="reserve in use")
        ax1.set_ylabel("pages")
        ax1.set_ylim(bottom=0)
        ax1.legend(loc="upper right", fontsize=7, ncol=4)
        ax2.plot(t, _rates(t, [x.pswpout for x in s]), color="tab:blue", lw=1, label="pswpout/s")
        ax2.plot(t, _rates(t, [x.pswpin for x in s]), color="tab:cyan", lw=1, label="pswpin/s")
        ax2.set_ylabel("swap pages/s")
        ax2.legend(loc="upper right", fontsize=7)
        reasons = sorted({k for x in s for k in x.drops})
        for r in reasons:
            ax3.plot(t, _rates(t, [x.drops.get(r, 0) for x in s]), lw=1, label=r)
        ax3.set_ylabel("drops/s")
        ax3.set_xlabel("time (s)")
        if reasons:
            ax3.legend(loc="upper right", fontsize=7, ncol=3)
        if deadlock_at is not None:
            for ax in (ax1, ax2, ax3):
                ax.axvline(deadlock_at, color="red", lw=1.5)
            ax1.annotate("deadlock declared", (deadlock_at, ax1.get_ylim()[1] * 0.9), color="red",
                         fontsize=8, ha="right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
