"""P(stuck) over two varied keys, one heatmap per policy.

Each cell is the share of its runs (repeats, and the points of any further key) that ended
`deadlock` or `livelock`, written in the cell as `stuck/runs`; a cell whose runs are not all done
yet shows what is done.  Runs that could not run (`error`) are left out and counted apart.
With one varied key the map is one row; with none there is nothing to draw.
"""

from __future__ import annotations

from pathlib import Path

from emu.sweep.spec import Sweep


def stuck_grid(sweep: Sweep, rows: list[dict[str, str]], policy: str) -> tuple[list[list[float]], list[list[int]]]:
    """(stuck, runs) per cell: [y][x] over the second key (y) and the first (x).  A cluster's row
    counts the share of its hosts that got stuck."""
    xs = sweep.varies[0].labels()
    ys = sweep.varies[1].labels() if len(sweep.varies) > 1 else [""]
    kx = sweep.keys[0]
    ky = sweep.keys[1] if len(sweep.keys) > 1 else None
    stuck = [[0.0] * len(xs) for _ in ys]
    runs = [[0] * len(xs) for _ in ys]
    for r in rows:
        if r["policy"] != policy or r["outcome"] in ("", "error"):
            continue
        i = xs.index(r[kx])
        j = ys.index(r[ky]) if ky else 0
        runs[j][i] += 1
        stuck[j][i] += float(r["stuck"] or 0)
    return stuck, runs


def plot(sweep: Sweep, rows: list[dict[str, str]], out: Path, title: str = "") -> Path | None:
    """One PNG with a panel per policy (and `pstuck-<policy>.png` each); None with no varied key."""
    if not sweep.varies:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = sweep.varies[0].labels()
    ys = sweep.varies[1].labels() if len(sweep.varies) > 1 else [""]
    extra = f" (averaged over {', '.join(sweep.keys[2:])})" if len(sweep.keys) > 2 else ""

    def panel(ax: object, policy: str, ylabel: bool = True) -> object:
        stuck, runs = stuck_grid(sweep, rows, policy)
        grid = [[(s / n if n else float("nan")) for s, n in zip(sr, nr)] for sr, nr in zip(stuck, runs)]
        im = ax.imshow(grid, origin="lower", cmap="Reds", vmin=0.0, vmax=1.0, aspect="auto")  # type: ignore[attr-defined]
        ax.set_xticks(range(len(xs)), xs, rotation=45, ha="right")  # type: ignore[attr-defined]
        ax.set_yticks(range(len(ys)), ys)  # type: ignore[attr-defined]
        ax.set_xlabel(sweep.keys[0])  # type: ignore[attr-defined]
        if len(sweep.keys) > 1 and ylabel:
            ax.set_ylabel(sweep.keys[1])  # type: ignore[attr-defined]
        ax.set_title(f"policy {policy}: P(stuck)")  # type: ignore[attr-defined]
        for j in range(len(ys)):
            for i in range(len(xs)):
                if runs[j][i]:
                    p = stuck[j][i] / runs[j][i]
                    ax.text(i, j, f"{stuck[j][i]:g}/{runs[j][i]}", ha="center", va="center", fontsize=8,  # type: ignore[attr-defined]
                            color="white" if p > 0.6 else "black")
        return im

    out.mkdir(parents=True, exist_ok=True)
    width = max(4.0, 0.55 * len(xs) + 2.5)
    height = max(2.2, 0.45 * len(ys) + 1.8)
    for policy in sweep.policies:
        fig, ax = plt.subplots(figsize=(width, height), layout="constrained")
        fig.colorbar(panel(ax, policy), ax=ax, label="P(stuck)")  # type: ignore[arg-type]
        fig.suptitle((title or "netswap sweep") + extra, fontsize=9)
        fig.savefig(out / f"pstuck-{policy}.png", dpi=110)
        plt.close(fig)
    n = len(sweep.policies)
    fig, axes = plt.subplots(1, n, figsize=(width * n, height + 0.3), squeeze=False, layout="constrained")
    im = None
    for k, (ax, policy) in enumerate(zip(axes[0], sweep.policies)):
        im = panel(ax, policy, ylabel=k == 0)
    fig.colorbar(im, ax=list(axes[0]), label="P(stuck)")  # type: ignore[arg-type]
    fig.suptitle((title or "netswap sweep") + extra, fontsize=10)
    path = out / "pstuck.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
