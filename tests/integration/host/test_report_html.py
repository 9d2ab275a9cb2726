"""report.html in a real browser: headless Chromium (Debian's `chromium`) loads the report of
real runs offline, every figure decodes, the side-by-side table and the deadlock report are
rendered, a screenshot is drawn, and nothing reaches the console (no script error, no resource
that failed).  And `netswap demo --scenario quiet` writes it, says what to do next, and exits 0.
"""

from __future__ import annotations

import html as htmlmod
import re
import subprocess
import sys
from pathlib import Path

from emu.host.html import render
from peers import require_binary

from .conftest import PAIRS, Observed

CHROMIUM_TIMEOUT = 90


def chromium(*args: str) -> subprocess.CompletedProcess[str]:
    exe = require_binary("chromium")["chromium"]
    return subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                           "--disable-background-networking", "--enable-logging=stderr", "--v=0", *args],
                          capture_output=True, text=True, timeout=CHROMIUM_TIMEOUT)


def test_report_renders_in_headless_chromium(observed: Observed, tmp_path: Path) -> None:
    runs = [observed.seen[p].to_json() for p in PAIRS]
    page = tmp_path / "report.html"
    page.write_text(render(runs, title="netswap test report", summary_png=None, footer=["netswap compare A.json B.json"]))
    text = page.read_text()
    assert "http://" not in text and "https://" not in text  # nothing from the network: works offline
    url = page.as_uri()
    dom = chromium("--virtual-time-budget=10000", "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    console = [x for x in dom.stderr.splitlines() if ":CONSOLE" in x]
    assert console == [], console
    body = dom.stdout
    n_img = sum(1 for r in runs if r["files"].get("timeline"))
    assert f'data-images="{n_img}/{n_img}"' in body  # every figure decoded (naturalWidth > 0)
    table = body[body.index('<table id="summary">'):]
    table = table[:table.index("</table>")]
    rows = re.findall(r"<tr><td>(.*?)</td>", table)
    assert rows[:3] == ["outcome", "verdict at (emulated s)", "wall time (s)"] and len(rows) >= 11
    for r in runs:
        assert f'{r["backend"]}<br>{r["policy"]}' in table
        assert f'class="{r["outcome"]}">{r["outcome"]}' in table
    stuck = [r for r in runs if r["deadlock_report"]]
    for r in stuck:
        assert "<details open=" in body or "<details open>" in body
        assert htmlmod.escape("SysRq : Show Blocked State") in body
    assert "Drops by reason" in body and "SKB_DROP_REASON_" in body
    assert '"SKB data reserve"' in htmlmod.unescape(body)  # v12's /proc/reserve_info
    shot = tmp_path / "shot.png"
    r = chromium("--virtual-time-budget=10000", f"--screenshot={shot}", "--window-size=1280,1600", url)
    assert r.returncode == 0 and shot.is_file(), r.stderr[-2000:]
    import matplotlib.image as mpimg

    img = mpimg.imread(str(shot))
    assert img.shape[0] == 1600 and img.shape[1] == 1280
    top = img[:800, :, :3]
    # the table and the first figure are drawn: many distinct colours, not a blank page
    assert len({tuple((px * 255).astype(int)) for px in top[::7, ::7].reshape(-1, 3)}) > 50


def test_quiet_demo_completes_as_expected_and_says_what_next(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    r = subprocess.run([sys.executable, "-m", "emu", "demo", "--scenario", "quiet", "--backend", "nfs-udp",
                        "--policy", "none", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr  # quiet's [expect]: none completes
    assert "as expected" in r.stdout and "Next steps" in r.stdout
    assert str(out / "report.html") in r.stdout and "netswap run quiet --backend nfs-udp --policy none --pcap" in r.stdout
    assert all(len(line) <= 80 for line in r.stdout.splitlines() if not line.startswith("  ")), r.stdout
    assert "…" not in r.stdout
    assert "–¹" in r.stdout  # the reserve under none, with its note
    for name in ("report.html", "summary.png", "summary.json", "nfs-udp-none.png", "nfs-udp-none-timeline.csv",
                 "nfs-udp-none-timeline.jsonl", "nfs-udp-none.json"):
        assert (out / name).is_file(), name
