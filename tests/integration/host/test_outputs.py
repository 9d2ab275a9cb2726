"""What a person reads, without a host: tables within 80 columns (no "…"), "–" for the reserve
under none, SysRq-T style grouping of identical tasks, the drop-reason table, rates without a
spike at a last sample taken just after another, and the verdicts a scenario expects."""

from __future__ import annotations

from rich.console import Console

from emu import scenario as scen
from emu.host.progress import LiveProgress
from emu.host.report import ReportData, group_tasks, print_result, render_deadlock_report, results_table
from emu.host.result import RunResult, RunStatus
from emu.host.timeline import Recorder, Sample, columns, plotted_columns, rows
from emu.kernel.policy import Policy


def _result(backend: str, policy: Policy, outcome: str) -> RunResult:
    r = RunResult(outcome, policy, backend, "nfs://127.0.0.1/x", 12 << 20, 4096)
    r.drops = {"rx_nomem": 123456, "rx_missed": 1234567, "pfmemalloc_drop": 0, "rcvbuf_full": 33082}
    r.reserve = {"size": 0 if policy is Policy.NONE else 874, "peak": 34}
    r.pages_swapped_out, r.pages_swapped_in, r.accesses_total, r.accesses_done = 12345, 6789, 131072, 131072
    r.min_free, r.wmark_min, r.emulated_s, r.wall_s = 96, 256, 12.345678, 123.4
    return r


def test_demo_table_fits_80_columns_with_a_note_for_none() -> None:
    results = [_result(b, p, "deadlock" if p is Policy.NONE else "completed") for b in scen.BACKENDS for p in Policy]
    con = Console(width=80, record=True, color_system=None)
    results_table(con, results, "netswap demo — scenario demo, 95 s")
    text = con.export_text()
    assert all(len(line) <= 80 for line in text.splitlines()), text
    assert "…" not in text
    assert "–¹" in text and "no reserve" in text and "874/34" in text
    for b in scen.BACKENDS:
        assert b in text
    assert text.count("pfmemalloc") == 3


def test_live_table_fits_80_columns_and_completed_runs_show_no_stall() -> None:
    con = Console(width=80, record=True, color_system=None, force_terminal=True)
    live = LiveProgress(con)
    for b in scen.BACKENDS:
        for p in Policy:
            live.add_run(b, p)
            live.rows[(b, p)] = RunStatus(b, p, "completed" if p is not Policy.NONE else "deadlock", 12.3456, 131072,
                                          131072, 1234, 256, 12, 123456, 65432, 12345678, 0.1)
    con.print(live._render())
    text = con.export_text()
    assert all(len(line) <= 80 for line in text.splitlines()), text
    assert "…" not in text
    v12 = next(line for line in text.splitlines() if "completed" in line)
    assert v12.rstrip().endswith("–")  # a completed run never stalled
    assert "0.1s" in text  # the stuck ones say for how long


def test_report_and_progress_lines_are_not_rewrapped_in_a_file() -> None:
    """Output to a file gets a console 100 wide: the deadlock report (laid out in its own lines),
    the file paths and the progress lines keep their lines whole; the tables fit."""
    r = _result("nfs-udp", Policy.NONE, "deadlock")
    r.report = "deadlock: " + " ".join(f"word{i}" for i in range(40)) + "\nsecond line"
    r.files = {"timeline": "/a/very/long/path/" + "x" * 120 + "/timeline.csv"}
    con = Console(width=100, record=True, color_system=None, force_terminal=False)
    print_result(con, r)
    live = LiveProgress(con)
    assert live.plain
    live.update(RunStatus("nfs-udp", Policy.NONE, "deadlock", 12.3456, 131072, 131072, 1234, 256, 12, 123456, 65432,
                          12345678, 0.1))
    lines = con.export_text().splitlines()
    assert r.report.splitlines()[0] in lines and "second line" in lines
    assert f"timeline: {r.files['timeline']}" in lines
    assert sum(1 for line in lines if "deadlock" in line and "nfs-udp" in line) >= 1
    assert all(len(line) <= 100 for line in lines if line.strip().startswith(("│", "┃", "─", "━")))


def test_blocked_tasks_are_grouped_as_sysrq_t_would() -> None:
    tasks = [(1, "kswapd0", "D reclaim", "congestion_wait", "PF_MEMALLOC|PF_KSWAPD")]
    tasks += [(20 + i, f"workload{i}", "D reclaim", "congestion_wait", "PF_MEMALLOC") for i in range(4)]
    tasks += [(300 + i, "kswapio", "D writeback", f"swap_rw write 0:{i}+1", "PF_MEMALLOC|PF_KTHREAD") for i in range(256)]
    g = group_tasks(tasks)
    assert [(len(p), c, w) for p, c, _, w, _, _ in g] == [
        (1, "kswapd0", "congestion_wait"), (4, "workload", "congestion_wait"), (256, "kswapio", "swap_rw write")]
    r = ReportData(policy=Policy.NONE, backend="nfs-udp", server="x", t=2.0, stalled_for=1.5, nr_pages=3072, nr_free=96,
                   wmark_min=256, wmark_low=320, wmark_high=384, atomic_floor=96, pages_emerg=0, reserve_size=0,
                   reserve_peak=34, drops={"rx_nomem": 12, "rx_missed": 1350, "pfmemalloc_drop": 0}, tasks=tasks)
    text = render_deadlock_report(r)
    assert "256 x kswapio" in text and "pids 300-555" in text and "4 x workload" in text
    assert text.count("kswapio") == 1
    assert "reserve: – (policy none" in text
    assert "SKB_DROP_REASON_NOMEM" in text and "e1000_alloc_rx_buffers" in text and "__netdev_alloc_skb" in text


def test_rates_do_not_spike_at_a_last_sample_just_after_another() -> None:
    rec = Recorder()
    for i in range(100):
        rec.add(Sample(t=i * 0.01, nr_free=100, wmark_min=10, wmark_low=12, wmark_high=15, atomic_floor=5,
                       reserve_used=0, reserve_size=0, pswpout=i * 10, pswpin=0, drops={"rx_nomem": i * 5}))
    rec.add(Sample(t=0.99 + 1e-6, nr_free=100, wmark_min=10, wmark_low=12, wmark_high=15, atomic_floor=5,
                   reserve_used=0, reserve_size=0, pswpout=1000, pswpin=0, drops={"rx_nomem": 500}))
    table = rows(rec)
    assert max(r["drops_rx_nomem_per_s"] for r in table[1:]) <= 1000  # over 0.01 s, not 5 drops / 1e-6 s
    assert abs(table[50]["pswpout_per_s"] - 1000) < 1e-6
    assert list(table[0]) == columns(rec)
    assert set(plotted_columns(rec, Policy.NONE)) <= set(columns(rec))
    assert "reserve_used" not in plotted_columns(rec, Policy.NONE)


def test_scenarios_state_the_expected_verdicts() -> None:
    quiet, demo = scen.load("quiet").expect, scen.load("demo").expect
    assert all(quiet.allows(p, "completed") for p in Policy)
    assert not quiet.allows(Policy.NONE, "deadlock")
    assert (demo.allows(Policy.NONE, "deadlock") and demo.allows(Policy.NONE, "livelock")
            and not demo.allows(Policy.NONE, "completed"))
    assert demo.allows(Policy.V12, "completed") and not demo.allows(Policy.PFMEMALLOC, "deadlock")
    bad = '[expect]\nnone = "finished"\n'
    try:
        scen.loads(bad, "x.toml")
    except scen.ScenarioError as e:
        assert "x.toml:2: expect.none" in str(e) and "completed" in str(e)
    else:
        raise AssertionError("an unknown verdict must be refused")


def test_run_puts_the_result_on_stdout_and_progress_on_stderr(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import subprocess
    import sys

    # a run cut short at 0.05 emulated seconds (outcome timeout, exit 1): it still has a result
    r = subprocess.run([sys.executable, "-m", "emu", "run", "quiet", "--policy", "none", "--duration", "0.05",
                        "--proc-dir", str(tmp_path / "proc")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr[-2000:]
    assert "netswap run: nfs-udp / none" in r.stdout and "outcome" in r.stdout and "timeout" in r.stdout
    assert "not finished within watchdog.timeout" in r.stderr  # the error is a log line
    assert "t=" not in r.stdout  # progress lines stay on stderr
    assert "MemFree:" in (tmp_path / "proc" / "meminfo").read_text()


def test_bad_observer_flags_are_usage_errors_before_any_run(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import subprocess
    import sys

    for args, what in ((["--pcap", str(tmp_path / "nodir" / "x.pcapng")], "no such directory"),
                       (["--pcap", str(tmp_path)], "is a directory"),
                       (["--pcap", str(tmp_path / "x.pcapng"), "--pcap-ring", "0"], "at least 4K"),
                       (["--pcap-snaplen", "-1"], "--pcap-snaplen")):
        r = subprocess.run([sys.executable, "-m", "emu", "run", *args], capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and what in r.stderr, (args, r.stderr)
    assert not (tmp_path / "x.pcapng").exists()
