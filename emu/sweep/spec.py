"""What a sweep varies, and the runs it makes: `--vary KEY=VALUES`, the policies, the repeats.

VALUES is one of:

    a..b:n        n values from a to b, evenly spaced (both ends included)
    a..b:n:log    n values from a to b, evenly spaced on a log scale (a, b > 0)
    a..b          every integer from a to b (integer keys: seeds, counts)
    v1,v2,v3      a list

KEY is any scenario key, `section.key` (`traffic.rate`, `host.ram`, `host.reserve_scale`,
`workload.seed`, `costs.peer_rtt` ...) or `backend`.  Sizes take size units (`host.ram=8M..16M:5`,
rounded to whole pages); integers are rounded; every value is checked against the scenario's
schema before anything runs.  A run is one point of the grid under one policy and one repeat;
repeat r adds r to `workload.seed` (a run is deterministic, so repeats differ only by seed).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from dataclasses import dataclass, field
from typing import Any

from emu import scenario as scen
from emu.util.units import format_size, parse_size

PAGE = 4096


class SweepSpecError(ValueError):
    """A bad --vary, --policy or --repeat: one line for the user."""


@dataclass(frozen=True)
class Vary:
    key: str
    values: tuple[Any, ...]  # as set_values takes them: sizes as "16M", numbers as numbers
    text: str  # as the user wrote it

    def labels(self) -> list[str]:
        return [label(v) for v in self.values]


def label(v: Any) -> str:
    """A value as the CSV and the plots show it."""
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def _number(text: str, kind: str, what: str) -> float:
    try:
        return float(parse_size(text)) if kind == "size" else float(text)
    except ValueError as e:
        raise SweepSpecError(f"--vary {what}: {text!r} is not a {'size' if kind == 'size' else 'number'} ({e})") from None


def _typed(x: float, kind: str) -> Any:
    if kind == "size":
        return format_size(max(PAGE, int(round(x / PAGE)) * PAGE))
    if kind == "int":
        return int(round(x))
    return float(f"{x:.6g}")


def _scalar(text: str, kind: str, what: str) -> Any:
    text = text.strip()
    if kind in ("size", "str", "choice", "net"):
        return text
    if kind == "bool":
        if text.lower() not in ("true", "false"):
            raise SweepSpecError(f"--vary {what}: {text!r} is not true or false")
        return text.lower() == "true"
    x = _number(text, kind, what)
    if kind == "int" and x != int(x):
        raise SweepSpecError(f"--vary {what}: {text!r} is not an integer")
    return int(x) if kind == "int" else x


def parse_vary(text: str) -> Vary:
    """`traffic.rate=2000..40000:8` -> Vary('traffic.rate', (2000, 7429, ...))."""
    key, eq, spec = text.partition("=")
    key, spec = key.strip(), spec.strip()
    if not eq or not key or not spec:
        raise SweepSpecError(f"--vary {text!r}: expected KEY=a..b:n, KEY=a..b:n:log, KEY=a..b or KEY=v1,v2,...")
    try:
        meta = scen.key_meta(key)
    except KeyError as e:
        raise SweepSpecError(f"--vary {text!r}: {e.args[0]}") from None
    kind = meta["kind"]
    values: list[Any]
    if ".." in spec:
        lo_s, _, rest = spec.partition("..")
        parts = rest.split(":")
        hi_s, n_s, scale = parts[0], parts[1] if len(parts) > 1 else None, parts[2] if len(parts) > 2 else "lin"
        if len(parts) > 3 or scale not in ("lin", "log"):
            raise SweepSpecError(f"--vary {text!r}: expected a..b:n or a..b:n:log")
        if kind not in ("int", "float", "size"):
            raise SweepSpecError(f"--vary {text!r}: {key} is not a number; give a list v1,v2,...")
        lo, hi = _number(lo_s, kind, text), _number(hi_s, kind, text)
        if n_s is None:
            if kind != "int" or lo != int(lo) or hi != int(hi) or hi < lo:
                raise SweepSpecError(f"--vary {text!r}: a..b without :n needs integers a <= b; else give a..b:n")
            if hi - lo >= 10_000:
                raise SweepSpecError(f"--vary {text!r}: more than 10000 values")
            values = list(range(int(lo), int(hi) + 1))
        else:
            try:
                n = int(n_s)
            except ValueError:
                raise SweepSpecError(f"--vary {text!r}: n = {n_s!r} is not a whole number") from None
            if not 1 <= n <= 10_000:
                raise SweepSpecError(f"--vary {text!r}: n must be 1 to 10000")
            if scale == "log" and (lo <= 0 or hi <= 0):
                raise SweepSpecError(f"--vary {text!r}: a log range needs a, b > 0")
            if n == 1:
                xs = [lo]
            elif scale == "log":
                xs = [math.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * i / (n - 1)) for i in range(n)]
            else:
                xs = [lo + (hi - lo) * i / (n - 1) for i in range(n)]
            values = [_typed(x, kind) for x in xs]
    else:
        values = [_scalar(v, kind, text) for v in spec.split(",") if v.strip()]
        if not values:
            raise SweepSpecError(f"--vary {text!r}: no values")
    dedup: list[Any] = []
    for v in values:  # rounding may make neighbours equal
        if v not in dedup:
            dedup.append(v)
    return Vary(key, tuple(dedup), text)


@dataclass(frozen=True)
class Run:
    """One run of a sweep: a point, a policy, a repeat."""

    run_id: str
    policy: str
    values: dict[str, Any] = field(hash=False)
    repeat: int
    seed: int


@dataclass
class Sweep:
    base: scen.Scenario
    varies: list[Vary]
    policies: list[str]
    repeat: int = 1

    def __post_init__(self) -> None:
        keys = [v.key for v in self.varies]
        dup = {k for k in keys if keys.count(k) > 1}
        if dup:
            raise SweepSpecError(f"--vary {', '.join(sorted(dup))} given twice")
        if "policy" in keys:
            raise SweepSpecError("--vary policy: use --policy none,v12,pfmemalloc")
        bad = [p for p in self.policies if p not in scen.POLICIES]
        if bad or not self.policies:
            raise SweepSpecError(f"--policy {','.join(bad) or '(none)'}: expected some of {', '.join(scen.POLICIES)}")
        if not 1 <= self.repeat <= 1000:
            raise SweepSpecError(f"--repeat {self.repeat}: expected 1 to 1000")

    @property
    def keys(self) -> list[str]:
        return [v.key for v in self.varies]

    def runs(self) -> list[Run]:
        """Every run, in grid order (policies outermost, then the keys, then the repeats)."""
        out = []
        grids = itertools.product(*(v.values for v in self.varies))
        points = [dict(zip(self.keys, combo)) for combo in grids]
        for policy in self.policies:
            for point in points:
                base_seed = int(point.get("workload.seed", self.base.workload.seed))
                for r in range(self.repeat):
                    rid = "|".join([policy, *(f"{k}={label(v)}" for k, v in point.items()), f"r{r}"])
                    out.append(Run(rid, policy, point, r, base_seed + r))
        return out

    def scenario_for(self, run: Run) -> scen.Scenario:
        values = {**run.values, "policy": run.policy, "workload.seed": run.seed}
        return scen.set_values(self.base, values)

    def check(self) -> None:
        """Every point is a valid scenario (raises SweepSpecError naming the first bad one)."""
        seen: set[str] = set()
        for run in self.runs():
            key = json.dumps(run.values, sort_keys=True, default=str) + run.policy
            if key in seen:
                continue
            seen.add(key)
            try:
                self.scenario_for(run)
            except scen.ScenarioError as e:
                raise SweepSpecError(f"point {run.run_id}: {e}") from None

    def manifest(self) -> dict[str, Any]:
        """What makes two sweeps the same sweep (resume is allowed only into the same one)."""
        return {"scenario": scen.dumps(self.base), "vary": {v.key: [label(x) for x in v.values] for v in self.varies},
                "policies": self.policies, "repeat": self.repeat}

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.manifest(), sort_keys=True).encode()).hexdigest()[:16]
