"""`--vary` grammar, the grid of runs, and runs.csv's resume rules (no runs executed here)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from emu import scenario as scen
from emu.host.kernel import Kernel
from emu.kernel.cpu import Costs
from emu.kernel.policy import Policy
from emu.mm.reserve import MemReserve
from emu.sweep.spec import Sweep, SweepSpecError, parse_vary
from emu.sweep.table import RunTable, SweepDirError


def test_ranges_lists_and_units() -> None:
    assert parse_vary("traffic.rate=2000..40000:3").values == (2000, 21000, 40000)
    assert parse_vary("traffic.rate=1000..100000:3:log").values == (1000, 10000, 100000)
    assert parse_vary("workload.seed=1..4").values == (1, 2, 3, 4)
    assert parse_vary("host.ram=8M..16M:3").values == ("8M", "12M", "16M")
    # sizes are rounded to whole pages, and neighbours made equal by rounding are merged
    assert parse_vary("host.ram=8M..8200K:3").values == ("8M", "8196K", "8200K")
    assert parse_vary("host.reserve_scale=0..1:5").values == (0.0, 0.25, 0.5, 0.75, 1.0)
    assert parse_vary("backend=nfs-udp,iscsi").values == ("nfs-udp", "iscsi")
    assert parse_vary("workload.processes=1..3:9").values == (1, 2, 3)


@pytest.mark.parametrize("text, says", [
    ("traffic.rate", "expected KEY="),
    ("nosuch.key=1,2", "unknown key"),
    ("traffic.rate=a..b:3", "not a number"),
    ("traffic.rate=1..10:0", "n must be"),
    ("traffic.rate=0..10:3:log", "log range"),
    ("traffic.rate=1..10:3:cubic", "a..b:n:log"),
    ("traffic.profile=1..3:3", "not a number"),
    ("host.reserve_scale=0..1", "a..b without :n"),
    ("workload.seed=1.5,2", "not an integer"),
])
def test_bad_vary_is_one_clear_line(text: str, says: str) -> None:
    with pytest.raises(SweepSpecError, match=says) as e:
        parse_vary(text)
    assert "\n" not in str(e.value)


def test_grid_repeats_seeds_and_validation() -> None:
    base = scen.default()
    sw = Sweep(base, [parse_vary("traffic.rate=1000,2000"), parse_vary("host.ram=8M,12M")], ["none", "v12"], repeat=2)
    runs = sw.runs()
    assert len(runs) == 2 * 2 * 2 * 2 and len({r.run_id for r in runs}) == len(runs)
    assert {r.seed for r in runs} == {base.workload.seed, base.workload.seed + 1}
    sc = sw.scenario_for(runs[-1])
    assert (sc.policy, sc.traffic.rate, sc.host.ram, sc.workload.seed) == ("v12", 2000, 12 << 20, base.workload.seed + 1)
    with pytest.raises(SweepSpecError, match="host.ram"):
        Sweep(base, [parse_vary("host.ram=1M,12M")], ["none"]).check()  # 1M cannot hold the workload's reserve
    with pytest.raises(SweepSpecError, match="twice"):
        Sweep(base, [parse_vary("traffic.rate=1,2"), parse_vary("traffic.rate=3")], ["none"])


def test_reserve_scale_shrinks_only_the_pool() -> None:
    """host.reserve_scale sets pages_emerg to that share of the tree's pages; 1 is the tree itself."""
    host = scen.default().host
    full = Kernel(host, Policy.V12, Costs(), None)
    half = Kernel(scen.set_values(scen.default(), {"host.reserve_scale": 0.5}).host, Policy.V12, Costs(), None)
    assert full.reserve is not None and half.reserve is not None
    for k in (full, half):  # a subsystem's node, as the swap transport hangs its own at swapon
        assert k.reserve is not None
        MemReserve("rpc tx", k.reserve.root).set_pages(41)
    assert full.zone.pages_emerg == full.reserve.pages >= 41
    assert half.reserve.pages == full.reserve.pages  # the tree (and every limit) is unchanged
    assert half.reserve.root.limit == full.reserve.root.limit
    assert half.zone.pages_emerg == int(full.reserve.pages * 0.5)


def _sweep() -> Sweep:
    return Sweep(scen.default(), [parse_vary("traffic.rate=1000,2000")], ["none"])


def test_table_resumes_and_refuses_another_sweep(tmp_path: Path) -> None:
    sw = _sweep()
    t = RunTable(tmp_path, sw)
    t.open()
    runs = sw.runs()
    t.append(runs[0], {"outcome": "deadlock", "stuck": 1, "emulated_s": 1.5})
    t.append(runs[1], {"outcome": "error", "stuck": 0, "error": "server did not start"})
    with (tmp_path / "runs.csv").open("a") as f:  # a crash mid-write leaves half a row
        f.write("none|traffic.rate=2000|r0,none,20")
    again = RunTable(tmp_path, sw)
    again.open()
    assert [r.run_id for r in again.todo(runs)] == [runs[1].run_id]  # errors run again
    assert again.rows[runs[0].run_id]["outcome"] == "deadlock"
    rows = list(csv.DictReader((tmp_path / "runs.csv").open()))
    assert len(rows) == 2  # the half row is gone
    other = Sweep(scen.default(), [parse_vary("traffic.rate=1000,3000")], ["none"])
    with pytest.raises(SweepDirError, match="different sweep"):
        RunTable(tmp_path, other).open()
