"""Running hosts: one run in its own `trio.run` under its emulated clock, a scenario with its
server, and the matrix of backends and policies the demo shows.

`run_host` bounds a run by the wall clock (a safety net: outcome `timeout`, exit 1), turns what
went wrong into one line (`describe_failure`), writes the outputs, and on SIGINT/SIGTERM unwinds
with the partial result (`RunInterrupted`).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from time import perf_counter
from typing import Any

import trio

from emu import scenario as scen
from emu.host.collect import collect_result
from emu.host.identity import HostIdentity
from emu.host.kmsg import collect_kmsg
from emu.host.observe import Observe
from emu.host.result import STUCK, RunInterrupted, RunResult, write_outputs
from emu.host.run import WALL_TIMEOUT_DEFAULT, HostRun, Progress
from emu.host.servers import local_server
from emu.kernel.clock import EmuClock, deterministic_scheduling
from emu.kernel.policy import Policy
from emu.swapdev.endpoint import Endpoint, IscsiEndpoint, nfs_transport, parse_server_url
from emu.util.signals import is_interrupt


def run_host(sc: scen.Scenario, server: Endpoint, progress: Progress | None = None, out_dir: Path | None = None, *,
             raw_traffic: bool = True, reference_rate: float | None = None,
             wall_timeout: float = WALL_TIMEOUT_DEFAULT, observe: Observe | None = None,
             identity: HostIdentity | None = None, stem: str | None = None,
             on_result: Callable[[RunResult], None] | None = None) -> RunResult:
    """Run one host to its verdict, in a `trio.run` of its own under its emulated clock.

    `raw_traffic=False` sends the background traffic as an unprivileged user would even when we
    are root.  `reference_rate`: the progress rate of the same scenario under a reserve policy,
    for the livelock verdict (default: this run's own best).  `identity`: the host's address (and
    initiator name) when it shares the server with others.  `stem`: the output files' name.
    `on_result`: given the result once the run has ended, before its files are written.
    """
    clock = EmuClock()
    run = HostRun(sc, server, clock, raw_traffic=raw_traffic, reference_rate=reference_rate, observe=observe,
                  identity=identity)
    wall0 = perf_counter()
    scope_box: list[trio.CancelScope] = []
    error = ""
    outcome = "error"

    async def main() -> str:
        token = trio.lowlevel.current_trio_token()

        def expire() -> None:
            run.wall_expired = True
            if scope_box:
                scope_box[0].cancel()

        timer = threading.Timer(wall_timeout, lambda: token.run_sync_soon(expire))
        timer.daemon = True
        timer.start()
        try:
            return await run.main(progress, scope_box)
        finally:
            timer.cancel()
            with trio.CancelScope(shield=True), trio.move_on_after(3):
                await run.shutdown()

    try:
        with deterministic_scheduling(), collect_kmsg() as kmsg:
            run.server_events = kmsg.events  # the same list: messages up to the result are in it
            outcome = trio.run(main, clock=clock)
        if outcome == "server_down":
            since = run.swap.link.outages[-1][0] if run.swap.link.outages else 0.0
            error = (f"server {run.server.url()} not answering since t={since:.3f} s (emulated; "
                     f"{clock.now - since:.1f} s), still down when the run ended")
        elif run.wall_expired:
            error = f"wall-clock limit of {wall_timeout:g} s reached (emulated time {clock.now:.3f} s)"
        elif outcome == "timeout":
            error = f"not finished within watchdog.timeout = {sc.watchdog.timeout:g} emulated seconds"
    except BaseException as e:
        if not is_interrupt(e):
            if not isinstance(e, Exception):
                raise
        else:  # SIGINT/SIGTERM: the run unwound (its servers are stopped by our callers)
            res = run.final if run.final is not None else collect_result(run, "interrupted")
            res.outcome = "interrupted"
            res.error = "interrupted"
            res.server_events = list(run.server_events)
            res.wall_s = res.clock["wall_s"] = round(perf_counter() - wall0, 3)
            if out_dir is not None:
                with contextlib.suppress(OSError):
                    write_outputs(res, out_dir, f"{sc.backend}-{sc.policy}", run.recorder)
            raise RunInterrupted([res]) from None
        outcome = "error"
        error = describe_failure(e, run.phase, run.server.url())
        gone = run.swap.link.down_since
        if gone is not None and run.phase not in ("starting", "swapon"):
            # the transport gave up on a server that is down (a soft timeout, iSCSI's
            # replacement_timeout): the swap I/O error is the outage's
            outcome = "server_down"
            error = (f"server {run.server.url()} not answering since t={gone:.3f} s (emulated; "
                     f"{clock.now - gone:.1f} s): {error}")
    res = run.final if run.final is not None else collect_result(run, outcome)
    res.outcome = outcome
    res.error = error
    res.server_events = list(run.server_events)
    res.wall_s = res.clock["wall_s"] = round(perf_counter() - wall0, 3)
    res.timeline = run.recorder
    if on_result is not None:  # before the files: an interrupt while they are written keeps the run
        on_result(res)
    if run.obs is not None and run.obs.tap is not None:
        run.obs.tap.stop()
        decode = tshark_decode_as(server, sc.backend)
        res.pcap = run.obs.write_pcap(f"netswap run: backend {sc.backend}, policy {sc.policy}, scenario {sc.name}, "
                                      f"server {server.url()}, outcome {res.outcome} at t={res.emulated_s:.3f} s "
                                      f"(emulated; timestamps are the run's wall-clock start plus emulated time)"
                                      f"; decode the swap traffic with: {decode}")
        res.pcap["decode_as"] = decode
        res.files["pcap"] = str(res.pcap["file"])
    if out_dir is not None:
        write_outputs(res, out_dir, stem or f"{sc.backend}-{sc.policy}", run.recorder,
                      run.verdict.at if run.verdict is not None and outcome in STUCK else None)
    return res


def tshark_decode_as(server: Endpoint, backend: str) -> str:
    """The tshark options that decode the swap traffic by port. Our servers listen on free ports,
    which tshark does not know: iSCSI would stay undecoded, and RPC is found only by heuristics,
    which try RTCP's first (on UDP, a datagram whose XID starts 0x80C8 is an RTCP Sender Report
    to tshark; XIDs start at random, so about one NFS-over-UDP run in a hundred)."""
    if isinstance(server, IscsiEndpoint):
        return f"tshark -d tcp.port=={server.port},iscsi"
    proto = nfs_transport(backend)
    return f"tshark -d {proto}.port=={server.nfsport},rpc -d {proto}.port=={server.mountport},rpc"


def describe_failure(e: BaseException, phase: str, url: str) -> str:
    """Why a run failed, in one line: the innermost errors (trio wraps them in groups), without
    a class name where the message says it all, and where it happened."""
    parts = []
    for x in _leaves(e)[:3]:
        msg = (str(x).strip().splitlines() or [""])[0]
        if isinstance(x, ConnectionRefusedError):
            msg = "connection refused (nothing listens there)"
        elif isinstance(x, TimeoutError) and not msg:
            msg = "timed out"
        known = isinstance(x, (OSError, MemoryError)) or type(x).__name__ in ("NfsMountError", "ISCSIError",
                                                                               "SessionRecoveryTimeout", "LoginError")
        parts.append(msg if known and msg else f"{type(x).__name__}: {msg}")
    what = "; ".join(parts)
    if any(isinstance(x, MemoryError) for x in _leaves(e)) and phase in ("starting", "swapon"):
        return f"host.ram is too small for this scenario ({what}); give it more RAM (--ram)"
    if phase in ("starting", "swapon"):
        return f"swapon on {url} failed: {what}"
    return what


def _leaves(eg: BaseException) -> list[BaseException]:
    if isinstance(eg, BaseExceptionGroup):
        out: list[BaseException] = []
        for x in eg.exceptions:
            out.extend(_leaves(x))
        return out
    return [eg]


def run_scenario(sc: scen.Scenario, progress: Progress | None = None, out_dir: Path | None = None,
                 **kw: Any) -> RunResult:
    """Run one scenario (starting our server unless the scenario names one)."""
    if sc.server:
        return run_host(sc, parse_server_url(sc.server), progress, out_dir, **kw)
    with local_server(sc.backend, sc.host.swap) as sp:
        return run_host(sc, sp.server, progress, out_dir, **kw)


def run_matrix(base: scen.Scenario, backends: Sequence[str], policies: Sequence[Policy],
               out_dir: Path | None = None, progress: Progress | None = None,
               observe_for: Callable[[scen.Scenario], Observe | None] | None = None, **kw: Any) -> list[RunResult]:
    """Each backend under each policy with the same workload and traffic; one server per backend.

    The reserve policies run first, so that `none` is judged for livelock against the progress
    rate the same scenario reaches with a reserve.  Results come back in the order asked for."""
    order = sorted(policies, key=lambda p: p is Policy.NONE)
    results: dict[tuple[str, Policy], RunResult] = {}

    def one(sc: scen.Scenario, server: Endpoint) -> None:
        ref = None
        if sc.policy is Policy.NONE:
            rates = [r.progress_rate for (b, p), r in results.items() if b == sc.backend and r.outcome == "completed"]
            ref = max(rates) if rates else None
        obs = observe_for(sc) if observe_for is not None else None

        def keep(res: RunResult) -> None:
            results[(sc.backend, sc.policy)] = res

        # (kept by run_host as soon as the run has ended: a Ctrl-C while its files are written,
        # once its JSON is even there, would otherwise lose a finished run)
        run_host(sc, server, progress, out_dir, reference_rate=ref, observe=obs, on_result=keep, **kw)

    try:
        for b in backends:
            sc_b = base.replace(backend=b)
            if base.server:
                for p in order:
                    one(sc_b.replace(policy=p), parse_server_url(base.server))
                continue
            with local_server(b, base.host.swap) as sp:
                for p in order:
                    one(sc_b.replace(policy=p), sp.server)
    except RunInterrupted as e:
        e.results = [results[(b, p)] for b in backends for p in policies if (b, p) in results] + e.results
        raise
    except KeyboardInterrupt:  # between runs (a server starting or stopping)
        raise RunInterrupted([results[(b, p)] for b in backends for p in policies if (b, p) in results]) from None
    return [results[(b, p)] for b in backends for p in policies]
