"""The watchdog's rule, the deadlock report's layout and the PNG timeline, without a host."""

from __future__ import annotations

from pathlib import Path

from emu.host.report import InflightIO, ReportData, render_deadlock_report
from emu.host.timeline import Recorder, Sample, plot
from emu.host.watchdog import Watchdog
from emu.kernel.policy import Policy

BLOCKED = [("workload0", "D reclaim", "shrink_page_list")]


def test_fires_only_after_stall_with_blocked_tasks_and_no_progress() -> None:
    dog = Watchdog(stall=2.0)
    assert dog.observe(0.0, 10, BLOCKED) is None
    assert dog.observe(1.9, 10, BLOCKED) is None
    v = dog.observe(2.0, 10, BLOCKED)
    assert v is not None and v.stalled_for == 2.0 and v.blocked == BLOCKED


def test_progress_or_unblocking_resets_the_clock() -> None:
    dog = Watchdog(stall=2.0)
    dog.observe(0.0, 10, BLOCKED)
    assert dog.observe(1.5, 11, BLOCKED) is None      # a page reclaimed / swap I/O completed
    assert dog.observe(3.0, 11, BLOCKED) is None      # 1.5 s since progress
    assert dog.observe(3.4, 11, []) is None           # nobody blocked: not a deadlock
    assert dog.observe(5.0, 11, BLOCKED) is None      # blocked again, clock restarted at 5.0
    assert dog.observe(6.9, 11, BLOCKED) is None
    assert dog.observe(7.0, 11, BLOCKED) is not None


def test_no_blocked_tasks_never_fires() -> None:
    dog = Watchdog(stall=0.5)
    assert all(dog.observe(t / 10, 5, []) is None for t in range(100))


def test_no_swap_io_in_flight_is_not_a_deadlock() -> None:
    dog = Watchdog(stall=0.5)
    assert all(dog.observe(t / 10, 5, BLOCKED, inflight=0) is None for t in range(100))


def test_livelock_is_creeping_progress_below_the_reference_with_replies_dropped() -> None:
    dog = Watchdog(stall=1.0, window=2.0, fraction=0.05, reference=1000.0)
    progress = drops = 0
    v = None
    for i in range(60):  # 0.1 s samples: 10 pages/s (1% of the reference), replies dropped
        t = i / 10
        progress += 1
        drops += 3
        v = dog.observe(t, progress, BLOCKED, inflight=8, reply_drops=drops)
        if v is not None:
            break
    assert v is not None and v.kind == "livelock"
    assert v.at >= 2.0 and v.stalled_for >= 2.0 * 0.999
    assert 5 < v.rate < 20 and v.reference == 1000.0


def test_slow_progress_without_dropped_replies_is_not_a_livelock() -> None:
    dog = Watchdog(stall=1.0, window=2.0, fraction=0.05, reference=1000.0)
    assert all(dog.observe(i / 10, i, BLOCKED, inflight=8, reply_drops=0) is None for i in range(60))


def test_no_progress_at_all_is_a_deadlock_not_a_livelock() -> None:
    dog = Watchdog(stall=1.0, window=0.5, fraction=0.05, reference=1000.0)
    v = None
    for i in range(30):
        v = dog.observe(i / 10, 7, BLOCKED, inflight=8, reply_drops=i)
        if v is not None:
            break
    assert v is not None and v.kind == "deadlock" and v.stalled_for >= 1.0


def test_livelock_reference_defaults_to_the_runs_own_best_window() -> None:
    dog = Watchdog(stall=1.0, window=1.0, fraction=0.05)
    progress = drops = 0
    v = None
    for i in range(80):  # 1000/s for 2 s, then 10/s with replies dropped
        progress += 100 if i < 20 else 1
        drops += 0 if i < 20 else 5
        v = dog.observe(i / 10, progress, BLOCKED, inflight=8, reply_drops=drops)
        if v is not None:
            break
    assert v is not None and v.kind == "livelock" and v.reference >= 900


def _report() -> ReportData:
    return ReportData(
        policy=Policy.NONE, backend="nfs-udp", server="nfs://127.0.0.1/x?nfsport=1&mountport=2", t=9.5,
        stalled_for=4.0, nr_pages=3072, nr_free=42, wmark_min=110, wmark_low=137, wmark_high=165,
        atomic_floor=42, pages_emerg=0, reserve_size=0, reserve_peak=0,
        socket_holders=[("udp 127.0.0.1:9001 app0", 200, 819200, False), ("udp 127.0.0.1:800 nfs", 0, 0, True)],
        frag_queues=3, frag_bytes=12000, route_entries=900, route_bytes=288000, route_max=8192,
        slabinfo="ip_dst_cache 900 900 320 12 1", inflight=[InflightIO("write", 17, 1, 3.9, 4, "WRITE FILE_SYNC xid=0x1")],
        swap_sock="udp 127.0.0.1:800 nfs", swap_sock_drops={"rx_nomem": 4}, swap_retransmits=3,
        drops={"rx_nomem": 5000, "rcvbuf_full": 20}, tasks=[(7, "workload0", "D reclaim", "shrink_page_list", "PF_MEMALLOC")],
    )


def test_report_names_dropped_replies_and_memory_holders() -> None:
    text = render_deadlock_report(_report())
    assert "DEADLOCK — policy none, backend nfs-udp" in text
    assert "free pages 42 of 3072: BELOW min" in text and "GFP_ATOMIC floor 42 pages (reached)" in text
    assert "replies to swap I/O dropped: rx_nomem 4" in text
    assert "udp 127.0.0.1:9001 app0" in text and "819200 bytes" in text
    assert "IPv4 route cache: 900 entries" in text and "IPv4 fragment queues: 3 queues" in text
    assert "write slot     17" in text and "sent 4x" in text
    assert "workload0" in text and "D reclaim" in text and "shrink_page_list" in text


def test_timeline_png(tmp_path: Path) -> None:
    rec = Recorder()
    for i in range(50):
        rec.add(Sample(t=i * 0.1, nr_free=max(42, 400 - i * 10), wmark_min=110, wmark_low=137, wmark_high=165,
                       atomic_floor=42, reserve_used=i % 5, reserve_size=60, pswpout=i * 20, pswpin=i * 5,
                       drops={"rx_nomem": i * i}))
    rec.dump(tmp_path / "t.json")
    back = Recorder.load(tmp_path / "t.json")
    assert back.samples == rec.samples
    out = plot(back, tmp_path / "t.png", "test", deadlock_at=4.0)
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
