"""The cluster world: N emulated hosts, each its own OS process, swapping to one real server.

Host i (1-based) is a process of its own (spawned: its own memory, its own `trio.run` under its
own EmuClock) with its own loopback address 127.0.1.i: every socket it opens, the swap
transport's included, is bound to it, so the server sees N distinct clients (its reply cache and
export / initiator checks work per client, as on a LAN).  On NFS each host has its own swap file
(`host<i>.swap`) in the one export; on iSCSI its own LUN (i-1) of the one target and its own
initiator name.  Background traffic is spread as `[cluster] traffic` says: `split` gives each host
traffic.rate / N (the same total at every N), `each` gives each host the full rate.  Host i's
workload seed is workload.seed + i - 1.

Determinism is weaker than for one host.  Each host's verdict is decided on its own emulated
clock, and a server reply is seen exactly when that host's model says; but the hosts share one
real server, whose order of work between clients is real time.  Whatever depends only on
replies' timing (when they are seen) is still the model's; what depends on their *content* under
contention (a retransmission answered from the reply cache or dropped as in progress) may differ.
With no retransmissions and `clock.late == 0` on every host, each host's run is a function of its
scenario, as a lone host's is.

The result (`ClusterResult`) is each host's RunResult, the counts of completed and stuck hosts,
and the server as the clients never see it: its calls, throughput, service-time percentiles overall
and per host (our NFS server's RPC calls or our iSCSI target's SCSI commands, from its `--stats`;
wall clock, for people) and its peak RSS.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import queue as queue_mod
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emu import scenario as scen
from emu.host.cluster_timeline import plot_hosts
from emu.host.identity import host_addr, host_identity, host_label
from emu.host.launch import run_host
from emu.host.result import STUCK, RunResult, RunStatus
from emu.host.run import WALL_TIMEOUT_DEFAULT, Progress
from emu.host.servers import local_server
from emu.kernel.policy import Policy
from emu.swapdev.endpoint import Endpoint, IscsiEndpoint, NfsEndpoint, parse_server_url

SAMPLES_PER_HOST = 1500  # the timeline points a host sends back for the cluster's figure


def host_scenario(sc: scen.Scenario, i: int) -> scen.Scenario:
    """Host i's own scenario: its share of the traffic, its seed; one host of one."""
    n = sc.cluster.hosts
    rate = sc.traffic.rate if sc.cluster.traffic == "each" else max(1, round(sc.traffic.rate / n))
    return scen.set_values(sc, {"traffic.rate": rate, "workload.seed": sc.workload.seed + i - 1, "cluster.hosts": 1},
                           source=f"{sc.source} (host {i} of {n})")


def host_endpoint(server: Endpoint, i: int) -> Endpoint:
    if isinstance(server, NfsEndpoint):
        return dataclasses.replace(server, swapfile=f"host{i}.swap")
    assert isinstance(server, IscsiEndpoint)
    return dataclasses.replace(server, lun=server.lun + i - 1)


# ---- one host, in its own process ----------------------------------------------------------------


def _host_main(i: int, toml: str, source: str, server: Endpoint, out_dir: str | None, raw_traffic: bool,
               wall_timeout: float, q: Any) -> None:
    """Host i's process: run to its verdict, streaming its status, then send its result."""
    sc = scen.loads(toml, source=source)
    last = [0.0]

    def progress(st: RunStatus) -> None:
        now = time.monotonic()
        if st.phase in ("completed", "deadlock", "livelock", "timeout") or now - last[0] >= 0.25:
            last[0] = now
            q.put(("status", i, dataclasses.asdict(st)))

    try:
        res = run_host(sc, server, progress, Path(out_dir) if out_dir else None, raw_traffic=raw_traffic,
                       wall_timeout=wall_timeout, identity=host_identity(i, sc.backend), stem=host_label(i))
        samples = res.timeline.samples if res.timeline is not None else []
        step = max(1, len(samples) // SAMPLES_PER_HOST)
        q.put(("result", i, res.to_json(), [dataclasses.asdict(s) for s in samples[::step]]))
    except BaseException as e:  # noqa: BLE001 - the parent must hear of it, whatever it was
        q.put(("error", i, f"{type(e).__name__}: {e}"))


# ---- the cluster -------------------------------------------------------------------------------


@dataclass
class ClusterResult:
    hosts: int
    backend: str
    policy: Policy
    server: str
    traffic: str
    results: list[RunResult] = field(default_factory=list)
    samples: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    wall_s: float = 0.0
    server_stats: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)

    @property
    def outcomes(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.results:
            out[r.outcome] = out.get(r.outcome, 0) + 1
        return out

    @property
    def stuck(self) -> int:
        return sum(r.outcome in STUCK for r in self.results)

    @property
    def completed(self) -> int:
        return sum(r.outcome == "completed" for r in self.results)

    @property
    def exit_status(self) -> int:
        if any(r.outcome not in ("completed", *STUCK) for r in self.results) or len(self.results) < self.hosts:
            return 1
        return 3 if self.stuck else 0

    def to_json(self) -> dict[str, Any]:
        return {"hosts": self.hosts, "backend": self.backend, "policy": self.policy.value, "server": self.server,
                "traffic": self.traffic, "completed": self.completed, "stuck": self.stuck,
                "outcomes": self.outcomes, "wall_s": self.wall_s, "server_stats": self.server_stats,
                "files": self.files,
                "host_results": [{"host": i + 1, "addr": host_addr(i + 1), **r.to_json()}
                                 for i, r in enumerate(self.results)]}


def _server_summary(stats: dict[str, Any], rss_kib: int, results: list[RunResult], wall_s: float,
                    page_size: int) -> dict[str, Any]:
    pages = sum(r.pages_swapped_out + r.pages_swapped_in for r in results)
    out: dict[str, Any] = {"rss_peak_kib": rss_kib,
                           "swap_pages": pages,
                           "swap_MiB_per_wall_s": round(pages * page_size / (1 << 20) / wall_s, 3) if wall_s else 0.0}
    clients = stats.get("clients")
    if clients is None:
        out["note"] = "per-client calls and latency: our own server's --stats (not available from another server)"
        return out
    lat = stats.get("latency", {})
    out.update({
        "calls": stats.get("calls", 0),
        "calls_per_wall_s": round(stats.get("calls", 0) / wall_s, 1) if wall_s else 0.0,
        "bytes_in": sum(c["bytes_in"] for c in clients.values()),
        "bytes_out": sum(c["bytes_out"] for c in clients.values()),
        "latency_s": {k: round(v, 7) for k, v in lat.items() if k != "calls"},
        "clients": {addr: {"calls": c["calls"], "p50_s": round(c["latency"]["p50_s"], 7),
                           "p99_s": round(c["latency"]["p99_s"], 7),
                           **({"initiators": c["initiators"]} if "initiators" in c else {})}
                    for addr, c in clients.items()},
    })
    if "drc_hits" in stats:  # NFS: retransmissions answered from the reply cache
        out["drc_hits"] = stats["drc_hits"]
    return out


def run_cluster(sc: scen.Scenario, progress: Progress | None = None, out_dir: Path | None = None, *,
                raw_traffic: bool = True, wall_timeout: float = WALL_TIMEOUT_DEFAULT) -> ClusterResult:
    """Run `sc.cluster.hosts` hosts at once against one server (ours unless `sc.server`)."""
    n = sc.cluster.hosts
    if n > 250:  # pragma: no cover - the schema caps it lower
        raise ValueError("at most 250 hosts on 127.0.1.0/24")
    res = ClusterResult(n, sc.backend, sc.policy, "", sc.cluster.traffic)
    with tempfile.TemporaryDirectory(prefix="netswap-cluster-") as tmp:
        stats_path = Path(tmp) / "server-stats.json"
        if sc.server:
            server = parse_server_url(sc.server)
            rss, wall = _run_hosts(sc, server, progress, out_dir, raw_traffic, wall_timeout, res, None)
        else:
            with local_server(sc.backend, sc.host.swap, luns=n, stats_path=stats_path) as sp:
                server = sp.server
                rss, wall = _run_hosts(sc, server, progress, out_dir, raw_traffic, wall_timeout, res, sp)
        stats = json.loads(stats_path.read_text()) if stats_path.exists() else {}
    res.server = server.url()
    res.wall_s = round(wall, 3)
    res.server_stats = _server_summary(stats, rss, res.results, wall, sc.host.page_size)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        png = plot_hosts(res, out_dir / "cluster.png")
        res.files["timeline"] = str(png)
        jp = out_dir / "cluster.json"
        res.files["json"] = str(jp)
        jp.write_text(json.dumps(res.to_json(), indent=2) + "\n")
    return res


def _run_hosts(sc: scen.Scenario, server: Endpoint, progress: Progress | None, out_dir: Path | None,
               raw_traffic: bool, wall_timeout: float, res: ClusterResult, sp: Any) -> tuple[int, float]:
    n = sc.cluster.hosts
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    procs = {}
    for i in range(1, n + 1):
        hs = host_scenario(sc, i)
        p = ctx.Process(target=_host_main, name=host_label(i), daemon=True,
                        args=(i, scen.dumps(hs), hs.source, host_endpoint(server, i),
                              str(out_dir) if out_dir else None, raw_traffic, wall_timeout, q))
        p.start()
        procs[i] = p
    t0 = time.monotonic()
    results: dict[int, RunResult] = {}
    rss = 0
    last_rss = 0.0
    try:
        while len(results) < n:
            try:
                msg = q.get(timeout=0.5)
            except queue_mod.Empty:
                msg = None
            if sp is not None and time.monotonic() - last_rss > 1.0:
                last_rss = time.monotonic()
                rss = max(rss, sp.peak_rss_kib())
            if msg is None:
                for i, p in procs.items():  # a host that died without a word
                    if i not in results and not p.is_alive() and p.exitcode not in (0, None):
                        results[i] = _error_result(sc, server, f"host process exited with status {p.exitcode}")
                if time.monotonic() - t0 > wall_timeout + 60:
                    for i in range(1, n + 1):
                        results.setdefault(i, _error_result(sc, server, "no result within the wall-clock limit"))
                continue
            kind, i = msg[0], msg[1]
            if kind == "status" and progress is not None:
                st = RunStatus(**msg[2])
                st.backend = f"{host_label(i)} {host_addr(i)}"
                progress(st)
            elif kind == "result":
                results[i] = _from_json(msg[2])
                res.samples[i] = msg[3]
            elif kind == "error":
                results[i] = _error_result(sc, server, msg[2])
        wall = time.monotonic() - t0
        if sp is not None:
            rss = max(rss, sp.peak_rss_kib())
    finally:
        for p in procs.values():
            p.join(10)
            if p.is_alive():
                p.terminate()
                p.join(5)
    res.results = [results[i] for i in range(1, n + 1)]
    return rss, wall


def _from_json(d: dict[str, Any]) -> RunResult:
    names = {f.name for f in dataclasses.fields(RunResult)}
    r = RunResult(**{k: v for k, v in d.items() if k in names})
    r.policy = Policy(d["policy"])  # its JSON names it
    r.report = d.get("deadlock_report") or ""
    return r


def _error_result(sc: scen.Scenario, server: Endpoint, why: str) -> RunResult:
    r = RunResult("error", sc.policy, sc.backend, server.url(), sc.host.ram, sc.host.page_size)
    r.error = why
    return r
