"""A sweep's output folder: `sweep.json` (what the sweep is) and `runs.csv` (one row per run).

Each row is appended, flushed and fsynced as soon as its run is done, so an interrupted sweep
loses only the runs still in flight.  Restarted with the same --out, the sweep reads the rows back
and runs only what is missing (rows of runs that could not run, outcome `error`, are run again;
the last row of a run is the one that counts).  A folder holding a different sweep is refused.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

from emu.sweep.spec import Run, Sweep, label
from emu.sweep.task import RESULT_COLUMNS

CSV_NAME = "runs.csv"
MANIFEST_NAME = "sweep.json"


class SweepDirError(ValueError):
    """--out holds something else (another sweep, an unreadable table)."""


def columns(sweep: Sweep) -> list[str]:
    return ["run_id", "policy", *sweep.keys, "repeat", "seed", *RESULT_COLUMNS]


class RunTable:
    def __init__(self, out: Path, sweep: Sweep) -> None:
        self.out = out
        self.sweep = sweep
        self.path = out / CSV_NAME
        self.columns = columns(sweep)
        self.rows: dict[str, dict[str, str]] = {}  # run_id -> its last row

    def open(self) -> None:
        """Create the folder, or check it holds this sweep and read what is done."""
        self.out.mkdir(parents=True, exist_ok=True)
        mpath = self.out / MANIFEST_NAME
        fp = self.sweep.fingerprint()
        if mpath.exists():
            try:
                old = json.loads(mpath.read_text())
            except (OSError, ValueError) as e:
                raise SweepDirError(f"{mpath}: unreadable ({e}); use another --out") from None
            if old.get("fingerprint") != fp:
                raise SweepDirError(f"{self.out} holds a different sweep (its {MANIFEST_NAME} differs in the scenario, "
                                    "--vary, --policy or --repeat); use another --out")
        else:
            mpath.write_text(json.dumps({"fingerprint": fp, **self.sweep.manifest()}, indent=2) + "\n")
        if self.path.exists():
            _drop_partial_line(self.path)
            with self.path.open(newline="") as f:
                reader = csv.DictReader(f)
                if reader.fieldnames != self.columns:
                    raise SweepDirError(f"{self.path}: its columns are not this sweep's; use another --out")
                for row in reader:
                    if row.get("run_id"):
                        self.rows[row["run_id"]] = row
        else:
            with self.path.open("w", newline="") as f:
                csv.writer(f).writerow(self.columns)

    def done(self, run_id: str) -> bool:
        row = self.rows.get(run_id)
        return row is not None and row.get("outcome") not in ("", "error")

    def todo(self, runs: list[Run]) -> list[Run]:
        return [r for r in runs if not self.done(r.run_id)]

    def append(self, run: Run, result: dict[str, Any]) -> dict[str, str]:
        row = {"run_id": run.run_id, "policy": run.policy, **{k: label(v) for k, v in run.values.items()},
               "repeat": str(run.repeat), "seed": str(run.seed)}
        row.update({c: "" if result.get(c) is None else str(result.get(c)) for c in RESULT_COLUMNS})
        buf = io.StringIO()
        csv.DictWriter(buf, self.columns).writerow(row)
        # one write of one whole line, then to the disk: a kill leaves whole rows only
        with self.path.open("a", newline="") as f:
            f.write(buf.getvalue())
            f.flush()
            os.fsync(f.fileno())
        self.rows[run.run_id] = row
        return row

    def current(self, runs: list[Run]) -> list[dict[str, str]]:
        """The last row of each run of the sweep that has one."""
        return [self.rows[r.run_id] for r in runs if r.run_id in self.rows]


def _drop_partial_line(path: Path) -> None:
    """A row cut short by a crash mid-write is dropped (its run is simply run again)."""
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with path.open("r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)
