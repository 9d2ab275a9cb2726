"""The demo's report to share: one self-contained `report.html`.

Everything is inside the file (figures as data: URIs, styles inline, no script or font from any
network), so it opens offline, from a mail attachment or a CI artefact alike: the side-by-side
table, the summary figure, and per run its timeline, its deadlock report (folded open), its
`/proc/reserve_info` and its drop-reason tables.  A few lines of inline script only count the
figures that loaded into `<body data-images=...>` (tests/integration/host/test_report_html.py
reads it in headless Chromium).
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

from emu.net.dropmon import reason_table

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:1.5em auto;max-width:1200px;color:#222;padding:0 1em}
h1{font-size:1.4em}h2{font-size:1.15em;border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
h3{font-size:1em;margin-bottom:.3em}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th:first-child,td:first-child{text-align:left}
thead th{background:#f2f2f2}
.completed{color:#0a7a0a;font-weight:600}.deadlock,.livelock{color:#c00;font-weight:600}
.timeout,.error{color:#b86e00;font-weight:600}
pre{background:#f7f7f7;border:1px solid #ddd;padding:.6em;overflow-x:auto;font-size:.8em;line-height:1.25}
img{max-width:100%;border:1px solid #ddd}
.note{color:#555;font-size:.85em}
details>summary{cursor:pointer;font-weight:600}
"""

SCRIPT = """
window.addEventListener("load", function () {
  var imgs = document.querySelectorAll("img"), ok = 0;
  for (var i = 0; i < imgs.length; i++) { if (imgs[i].complete && imgs[i].naturalWidth > 0) { ok++; } }
  document.body.setAttribute("data-images", ok + "/" + imgs.length);
});
"""


def _img(path: str | None, alt: str) -> str:
    if not path or not Path(path).is_file():
        return f'<p class="note">({html.escape(alt)}: no figure)</p>'
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _e(x: Any) -> str:
    return html.escape(str(x))


def _summary_rows(runs: list[dict[str, Any]]) -> list[tuple[str, list[str]]]:
    def reserve(r: dict[str, Any]) -> str:
        if r["policy"] == "none":
            return "– (none: no reserve)"
        return f"{r['reserve']['size']} / {r['reserve']['peak']}"

    rows: list[tuple[str, list[str]]] = [
        ("outcome", [f'<span class="{_e(r["outcome"])}">{_e(r["outcome"])}</span>' for r in runs]),
        ("verdict at (emulated s)", [f"{(r.get('stall') or {}).get('t', r['emulated_s']):.3f}" for r in runs]),
        ("wall time (s)", [f"{r['wall_s']:.1f}" for r in runs]),
        ("workload done", [f"{r['accesses_done']}/{r['accesses_total']}" for r in runs]),
        ("pages swapped out / in", [f"{r['pages_swapped_out']} / {r['pages_swapped_in']}" for r in runs]),
        ("pages verified / mismatches", [f"{r['integrity']['verified']} / {r['integrity']['mismatches']}" for r in runs]),
        ("min free pages (min wmark)", [f"{r['min_free']} ({r['wmark_min']})" for r in runs]),
        ("reserve size / peak (pages)", [reserve(r) for r in runs]),
        ("swap retransmits", [str(r["swap_retransmits"]) for r in runs]),
        ("emergency skbs", [str(r["emergency_skbs"]) for r in runs]),
        ("traffic offered / delivered", [f"{r['traffic'].get('offered', 0)} / {r['traffic'].get('delivered', 0)}"
                                         for r in runs]),
    ]
    reasons = sorted({k for r in runs for k, v in r["drops"].items() if v})
    for k in reasons:
        rows.append((f"drops: {k}", [str(r["drops"].get(k, 0)) for r in runs]))
    return [(_e(label), cells) for label, cells in rows]


def render(runs: list[dict[str, Any]], *, title: str, summary_png: str | None = None, intro: str = "",
           footer: list[str] | None = None) -> str:
    """The report for runs given as their JSON results (`RunResult.to_json()`, files included)."""
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>{_e(title)}</title>", f"<style>{CSS}</style></head><body>", f"<h1>{_e(title)}</h1>"]
    if intro:
        out.append(f"<p>{_e(intro)}</p>")
    out.append('<h2 id="side-by-side">Side by side</h2><table id="summary"><thead><tr><th></th>')
    out += [f"<th>{_e(r['backend'])}<br>{_e(r['policy'])}</th>" for r in runs]
    out.append("</tr></thead><tbody>")
    for label, cells in _summary_rows(runs):
        out.append(f"<tr><td>{label}</td>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    out.append("</tbody></table>")
    out.append('<p class="note">Times are emulated seconds (the model\'s clock) unless marked wall. '
               "Under <code>none</code> the receive path reaches no reserve, shown as –.</p>")
    if summary_png:
        out.append('<h2 id="summary-figure">Free pages near the watermarks, every run</h2>')
        out.append(_img(summary_png, "summary figure"))
    for r in runs:
        rid = f"{r['backend']}-{r['policy']}"
        out.append(f'<h2 id="{_e(rid)}">{_e(r["backend"])} / {_e(r["policy"])}: '
                   f'<span class="{_e(r["outcome"])}">{_e(r["outcome"])}</span></h2>')
        files = r.get("files", {})
        out.append(_img(files.get("timeline"), f"timeline {rid}"))
        data = [f'<a href="{_e(Path(files[k]).name)}">{_e(Path(files[k]).name)}</a>'
                for k in ("timeline_csv", "timeline_jsonl", "json", "pcap") if k in files]
        if data:
            out.append(f'<p class="note">Data: {" · ".join(data)}</p>')
        if r.get("deadlock_report"):
            out.append(f"<details open><summary>{_e(r['outcome'])} report (SysRq-M + SysRq-T)</summary>"
                       f"<pre>{_e(r['deadlock_report'])}</pre></details>")
        table = reason_table(r.get("drops", {}))
        out.append("<h3>Drops by reason</h3>")
        if table:
            out.append('<table class="drops"><thead><tr><th>drop reason</th><th>counter</th><th>kernel site</th>'
                       "<th>frames</th></tr></thead><tbody>")
            out += [f"<tr><td>{_e(a)}</td><td>{_e(b)}</td><td>{_e(c)}</td><td>{n}</td></tr>" for a, b, c, n in table]
            out.append("</tbody></table>")
        else:
            out.append('<p class="note">no drops</p>')
        socks = sorted(r.get("socket_drops", {}).items(), key=lambda kv: -sum(kv[1].values()))
        if socks:
            out.append("<h3>Drops per socket</h3><table><thead><tr><th>socket</th><th>drops by counter</th>"
                       "</tr></thead><tbody>")
            for name, d in socks[:20]:
                out.append(f"<tr><td>{_e(name)}</td><td>{_e(', '.join(f'{k} {v}' for k, v in d.items()))}</td></tr>")
            out.append("</tbody></table>")
            if len(socks) > 20:
                out.append(f'<p class="note">... and {len(socks) - 20} more sockets (in the JSON)</p>')
        views = r.get("views", {})
        if views.get("reserve_info"):
            out.append(f"<h3>/proc/reserve_info at the end</h3><pre>{_e(views['reserve_info'])}</pre>")
        if views.get("meminfo"):
            out.append(f"<details><summary>/proc/meminfo at the end</summary><pre>{_e(views['meminfo'])}</pre></details>")
    if footer:
        out.append('<h2 id="next-steps">Next steps</h2><ul>')
        out += [f"<li><code>{_e(x)}</code></li>" for x in footer]
        out.append("</ul>")
    out.append(f"<script>{SCRIPT}</script></body></html>")
    return "\n".join(out) + "\n"
