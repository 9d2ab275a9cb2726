"""Where a sweep's runs execute: a local pool of worker processes, or a Dask distributed cluster.

Both take the runs' payloads and call back with each row as soon as its run is done, in the order
they finish.  Neither schedules anything itself: the pool is concurrent.futures', the cluster
is Dask's (its scheduler hands out the tasks, and re-runs a task whose worker died: Dask's
`distributed.scheduler.allowed-failures`, 3 by default, before it gives up with KilledWorker).
"""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing
import os
import signal
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Any

from emu.sweep.task import run_point

OnRow = Callable[[str, dict[str, Any]], None]
SCHEDULER_ENV = "DASK_SCHEDULER_ADDRESS"


class SchedulerError(RuntimeError):
    """The Dask scheduler cannot be reached, or dask is not installed."""


def default_workers() -> int:
    """One worker per core this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def _ignore_sigint() -> None:
    # Ctrl-C reaches the whole process group: the sweep itself stops the workers, and rows are
    # written only by the sweep, so a worker must not die half-way through on its own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def run_local(payloads: dict[str, dict[str, Any]], on_row: OnRow, workers: int) -> None:
    """The runs on a pool of `workers` processes (spawned: no state of ours is inherited)."""
    ctx = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_ignore_sigint)
    pending: dict[Future[dict[str, Any]], str] = {}
    ids = iter(payloads)
    try:
        for rid in ids:  # keep every worker busy, and no more queued than that: an interrupt loses little
            pending[pool.submit(run_point, payloads[rid])] = rid
            if len(pending) >= workers:
                break
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                rid = pending.pop(fut)
                try:
                    row = fut.result()
                except Exception as e:  # noqa: BLE001 - a worker that died (BrokenProcessPool ...)
                    row = {"outcome": "error", "stuck": 0, "error": f"{type(e).__name__}: {e}"}
                on_row(rid, row)
                nxt = next(ids, None)
                if nxt is not None:
                    pending[pool.submit(run_point, payloads[nxt])] = nxt
    except BaseException:
        _stop_pool(pool)
        raise
    pool.shutdown(wait=True)


def _stop_pool(pool: ProcessPoolExecutor) -> None:
    """Stop now: cancel what is queued and end the workers (their runs' servers die with them)."""
    procs = list(getattr(pool, "_processes", {}).values())
    manager = getattr(pool, "_executor_manager_thread", None)  # (shutdown forgets it)
    pool.shutdown(wait=False, cancel_futures=True)
    for p in procs:
        with contextlib.suppress(Exception):
            p.terminate()
    for p in procs:
        with contextlib.suppress(Exception):
            p.join(5)
    # Then let the pool's manager thread end: it closes its wake-up pipe as it does, and at exit
    # CPython 3.11's hook (concurrent.futures.process._python_exit) writes to that pipe without
    # a lock, so a close in between printed an "Exception ignored ... Bad file descriptor"
    # traceback after the interrupted sweep's message (once in a CI run).
    if manager is not None:
        manager.join(10)


def scheduler_address(option: str | None) -> str | None:
    """--scheduler, else $DASK_SCHEDULER_ADDRESS, else None (the local pool)."""
    return option or os.environ.get(SCHEDULER_ENV) or None


@contextlib.contextmanager
def dask_client(address: str, timeout: float = 20.0) -> Iterator[Any]:
    try:
        from distributed import Client
    except ImportError:
        raise SchedulerError("--scheduler needs Dask: pip install 'netswap[dask]'") from None
    try:
        client = Client(address, timeout=timeout)
    except (OSError, TimeoutError, ValueError) as e:  # ValueError: not an address
        raise SchedulerError(f"cannot reach the Dask scheduler at {address}: {e}") from None
    try:
        yield client
    finally:
        client.close()


def run_dask(payloads: dict[str, dict[str, Any]], on_row: OnRow, address: str, fingerprint: str) -> int:
    """Every run a Dask task; rows stream back as tasks finish.  Returns the cluster's worker count
    when the sweep began."""
    from distributed import as_completed

    with dask_client(address) as client:
        nworkers = len(client.scheduler_info(n_workers=-1).get("workers", {}))
        futures = {}
        for rid, p in payloads.items():
            # a task key per run of this sweep: re-submitting after a restart names the same task
            key = f"netswap-run-{fingerprint}-{hashlib.sha256(rid.encode()).hexdigest()[:16]}"
            futures[client.submit(run_point, p, key=key, pure=False)] = rid
        try:
            for fut in as_completed(futures):
                rid = futures[fut]
                try:
                    row = fut.result()
                except Exception as e:  # noqa: BLE001 - KilledWorker after too many deaths, ...
                    row = {"outcome": "error", "stuck": 0, "error": f"{type(e).__name__}: {e}"[:300]}
                on_row(rid, row)
        except BaseException:
            client.cancel(list(futures))
            raise
    return nworkers
