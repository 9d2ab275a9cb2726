"""`netswap sweep` for real: on the local pool, on a real Dask cluster (a `dask scheduler` and two
`dask worker` processes on loopback, one of them killed while it runs a point), and resumed
after SIGINT.  The scenario is tiny (a 4 MiB host, tests/integration/sweep/tiny.toml) so a run
takes seconds; what is asserted is what must hold anywhere: every run gets exactly one row with a
verdict, a point's row is the same wherever it ran (its verdict is decided on its own emulated
clock), the heatmap matches the table, an interrupted sweep keeps its rows and runs only the rest.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from proctree import alive, cmdline, descendants

from emu.util.procs import stop_process

HERE = Path(__file__).parent
TINY = HERE / "tiny.toml"
NETSWAP = [sys.executable, "-m", "emu"]
VERDICTS = ("completed", "deadlock", "livelock")
# what a run's row owes to the model alone (wall_s and worker are the machine's)
MODEL_COLUMNS = ("outcome", "stuck", "stall_t", "emulated_s", "drops", "swap_out", "swap_in")
POINTS = ["--vary", "traffic.rate=1000,65000", "--policy", "none"]


def env() -> dict[str, str]:
    e = dict(os.environ)
    root = str(HERE.parents[2])
    e["PYTHONPATH"] = root + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    e.pop("DASK_SCHEDULER_ADDRESS", None)
    return e


def rows(out: Path) -> list[dict[str, str]]:
    with (out / "runs.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def sweep(out: Path, *extra: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*NETSWAP, "sweep", str(TINY), *POINTS, "--out", str(out), "-q", "--json", *extra],
                          capture_output=True, text=True, timeout=timeout, env=env())


def check_complete(out: Path, n: int) -> list[dict[str, str]]:
    rs = rows(out)
    assert len(rs) == n and len({r["run_id"] for r in rs}) == n, rs
    for r in rs:
        assert r["outcome"] in VERDICTS, r
        assert r["late"] == "0", r  # no real input overran its grace: the row is the model's
        assert int(r["swap_out"]) > 0
    return rs


@pytest.fixture(scope="module")
def local_rows(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, str]]:
    out = tmp_path_factory.mktemp("local")
    r = sweep(out, "--workers", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    rs = check_complete(out, 2)
    summary = json.loads(r.stdout)
    assert summary["rows"] == 2 and summary["finished_now"] == 2 and summary["workers"] == 2
    stuck = sum(int(x["stuck"]) for x in rs)
    assert summary["per_policy"]["none"]["stuck"] == stuck
    assert (out / "pstuck.png").stat().st_size > 0 and (out / "pstuck-none.png").exists()
    return rs


def test_local_pool(local_rows: list[dict[str, str]]) -> None:
    assert {r["traffic.rate"] for r in local_rows} == {"1000", "65000"}
    assert len({r["worker"] for r in local_rows}) >= 1


def test_same_rows_again_when_resumed_into_a_finished_sweep(local_rows: list[dict[str, str]], tmp_path: Path) -> None:
    """A bad --out is refused with one line and exit 2, and loses nothing."""
    out = tmp_path / "s"
    out.mkdir()
    (out / "sweep.json").write_text('{"fingerprint": "another"}')
    r = sweep(out)
    assert r.returncode == 2 and "different sweep" in r.stderr, r.stderr
    assert (out / "sweep.json").read_text() == '{"fingerprint": "another"}'


@pytest.fixture
def dask_cluster(tmp_path: Path) -> Iterator[dict[str, Any]]:
    pytest.importorskip("distributed", reason="dask[distributed] is in the test extra")
    sched_file = tmp_path / "scheduler.json"
    procs: dict[str, subprocess.Popen[bytes]] = {}
    logs = []
    try:
        log = (tmp_path / "scheduler.log").open("wb")
        logs.append(log)
        procs["scheduler"] = subprocess.Popen(
            [sys.executable, "-m", "dask", "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
             "--scheduler-file", str(sched_file)], stdout=log, stderr=subprocess.STDOUT, env=env())
        deadline = time.monotonic() + 60
        while not sched_file.exists() or not sched_file.read_text().strip():
            assert time.monotonic() < deadline, (tmp_path / "scheduler.log").read_text()[-2000:]
            time.sleep(0.2)
        time.sleep(0.2)
        address = json.loads(sched_file.read_text())["address"]
        for name in ("wA", "wB"):
            log = (tmp_path / f"{name}.log").open("wb")
            logs.append(log)
            # no nanny: a killed worker stays dead, and its point must go to the other one
            procs[name] = subprocess.Popen(
                [sys.executable, "-m", "dask", "worker", address, "--name", name, "--nthreads", "1", "--no-nanny",
                 "--no-dashboard", "--host", "127.0.0.1"], stdout=log, stderr=subprocess.STDOUT, env=env())
        from distributed import Client

        with Client(address, timeout=30, set_as_default=False) as client:
            client.wait_for_workers(2, timeout=60)
            yield {"address": address, "procs": procs, "client": client, "dir": tmp_path}
    finally:
        for p in reversed(list(procs.values())):
            stop_process(p, grace=15)
        for f in logs:
            f.close()


def test_dask_worker_killed_mid_sweep(dask_cluster: dict[str, Any], local_rows: list[dict[str, str]], tmp_path: Path) -> None:
    client = dask_cluster["client"]
    procs = dask_cluster["procs"]
    out = tmp_path / "dask"
    e = env()
    e["DASK_SCHEDULER_ADDRESS"] = dask_cluster["address"]  # the environment names the scheduler
    proc = subprocess.Popen([*NETSWAP, "sweep", str(TINY), *POINTS, "--out", str(out), "-q", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=e)
    try:
        # wait until worker A runs a point, then kill it (SIGKILL: no goodbye to the scheduler)
        names = {}
        deadline = time.monotonic() + 120
        killed = None
        while killed is None:
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            info = client.scheduler_info(n_workers=-1)["workers"]
            names = {addr: w.get("name") for addr, w in info.items()}
            for addr, tasks in client.processing().items():
                if names.get(addr) == "wA" and any(str(t).startswith("netswap-run-") for t in tasks):
                    time.sleep(1.0)  # well inside the run (it starts its server and swaps)
                    servers = [p for p in descendants(procs["wA"].pid) if " serve " in cmdline(p)]  # (from a worker thread)
                    procs["wA"].send_signal(signal.SIGKILL)
                    killed = addr
            time.sleep(0.1)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr[-3000:]
    assert procs["wA"].wait(10) == -signal.SIGKILL
    assert servers, "worker wA ran no server"
    deadline = time.monotonic() + 15
    while any(alive(pid) for pid in servers):  # the killed worker's server went with it
        assert time.monotonic() < deadline, [pid for pid in servers if alive(pid)]
        time.sleep(0.1)
    rs = check_complete(out, 2)
    summary = json.loads(stdout)
    assert summary["executor"].startswith("dask") and summary["errors"] == 0
    # every point was finished by the worker that survived, the killed one's included
    assert {r["worker"].rsplit(":", 1)[1] for r in rs} == {str(procs["wB"].pid)}
    # and each row is the one the local pool gave: the verdict is the model's, wherever it ran
    by_id = {r["run_id"]: r for r in local_rows}
    for r in rs:
        assert {c: r[c] for c in MODEL_COLUMNS} == {c: by_id[r["run_id"]][c] for c in MODEL_COLUMNS}


def _interrupt_after_a_row(tmp_path: Path, name: str, sig: signal.Signals,
                           *extra: str) -> tuple[list[str], Path, int | None, str, list[int]]:
    """Start a 3-point sweep on one worker, send `sig` once its first row is written; returns
    (args, out dir, exit status, stderr, the pool's worker pids as they were)."""
    out = tmp_path / name
    args = [*NETSWAP, "sweep", str(TINY), "--vary", "traffic.rate=1000,2000,65000", "--policy", "none",
            "--out", str(out), "--workers", "1", "-q", *extra]
    err = tmp_path / f"{name}-stderr.txt"  # a file, not a pipe: it never fills while the sweep runs
    workers: list[int] = []
    with open(err, "w") as fh:
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=fh, text=True, env=env())
    try:
        deadline = time.monotonic() + 180
        while not ((out / "runs.csv").exists() and len(rows(out)) >= 1):
            assert time.monotonic() < deadline and proc.poll() is None, err.read_text()[-3000:]
            time.sleep(0.2)
        workers = _children(proc.pid)
    finally:
        status = stop_process(proc, grace=60, sig=sig)
    return args, out, status, err.read_text(), workers


def test_resume_after_sigint(tmp_path: Path) -> None:
    args, out, status, stderr, _ = _interrupt_after_a_row(tmp_path, "resume", signal.SIGINT, "--json")  # Ctrl-C
    assert status == 130, stderr[-3000:]
    assert "run the same command again" in stderr
    before = rows(out)
    assert 1 <= len(before) < 3
    r = subprocess.run(args, capture_output=True, text=True, timeout=240, env=env())
    assert r.returncode == 0, r.stderr[-3000:]
    after = check_complete(out, 3)
    assert after[: len(before)] == before  # the rows written before the interrupt are kept as they were
    assert json.loads(r.stdout)["finished_now"] == 3 - len(before)  # and only the rest ran


def test_sigterm_stops_the_workers_and_keeps_the_rows(tmp_path: Path) -> None:
    _, out, status, stderr, workers = _interrupt_after_a_row(tmp_path, "term", signal.SIGTERM)  # a service manager
    assert workers, "no pool worker found"
    assert status == 143, stderr[-3000:]
    assert "run the same command again" in stderr and "Traceback" not in stderr, stderr[-3000:]
    assert 1 <= len(rows(out)) < 3
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{pid}").exists() for pid in workers):  # no worker left orphaned
        assert time.monotonic() < deadline, [pid for pid in workers if Path(f"/proc/{pid}").exists()]
        time.sleep(0.1)


def _children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            kids += [int(c) for c in (task / "children").read_text().split()]
    return kids
