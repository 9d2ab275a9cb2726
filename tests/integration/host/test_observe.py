"""Observing a run changes nothing, and shows what happened: the pcapng of the emulated NIC
(read back with tshark: one frame per counted verdict, drop reasons as comments, RPC and iSCSI
decoded whole), the drop monitor, the live /proc views, the timeline's data and `netswap compare`.

Nothing here depends on the default scenario's exact numbers: every count is compared with the
run's own counters.
"""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from emu.host.timeline import COLUMNS, Recorder, columns, plotted_columns
from emu.net.dropmon import LOCATIONS
from emu.net.netstat import VERDICTS
from emu.swapdev.endpoint import NfsEndpoint, parse_server_url
from peers import require_binary

from .conftest import PAIRS, Observed

TSHARK_TIMEOUT = 120


def tshark(*args: str) -> str:
    exe = require_binary("tshark")["tshark"]
    r = subprocess.run([exe, *args], capture_output=True, text=True, timeout=TSHARK_TIMEOUT)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: "-".join(p))
def test_observers_change_no_outcome(observed: Observed, pair: tuple[str, str]) -> None:
    a, b = observed.plain[pair], observed.seen[pair]
    assert b.error == "" and a.error == ""
    assert (a.outcome, a.emulated_s, a.pages_swapped_out, a.pages_swapped_in) == \
        (b.outcome, b.emulated_s, b.pages_swapped_out, b.pages_swapped_in)
    assert a.drops == b.drops and a.emergency_skbs == b.emergency_skbs and a.vmstat == b.vmstat
    assert a.clock["cpu_busy_s"] == b.clock["cpu_busy_s"]


@pytest.mark.peers
@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: "-".join(p))
def test_pcap_has_one_frame_per_counted_verdict(observed: Observed, pair: tuple[str, str]) -> None:
    res = observed.seen[pair]
    assert res.pcap["left_out"] == 0 and res.pcap["frames_written"] == res.pcap["rx_frames"] + res.pcap["tx_frames"]
    comments = tshark("-r", str(observed.pcap(*pair)), "-T", "fields", "-e", "frame.comment").splitlines()
    assert len(comments) == res.pcap["frames_written"]
    got: dict[str, int] = {}
    for c in comments:
        if c.startswith("RX dropped: "):
            counter = c.split("(", 1)[1].split(")", 1)[0]
            reason = c.removeprefix("RX dropped: ").split(" ", 1)[0]
            assert LOCATIONS[counter][1] == reason  # the kernel's name for that counter
            got[counter] = got.get(counter, 0) + 1
    for name, reason in VERDICTS:
        if reason:
            assert got.get(name, 0) == res.drops[name], (name, got, res.drops)
    nstat = res.views["nstat"]
    delivered = sum(c.startswith("RX delivered") for c in comments)
    assert f"{delivered:>12}" in next(x for x in nstat.splitlines() if x.startswith("delivered"))
    assert sum(c == "TX" for c in comments) == res.pcap["tx_frames"] > 0
    reserve = sum("skb from the reserve" in c for c in comments)
    assert reserve == res.emergency_skbs  # every reserve skb, and only those, marked
    if pair[1] == "none":
        assert res.drops["rx_nomem"] > 0 and reserve == 0
    else:
        assert reserve > 0
    if res.drops["pfmemalloc_drop"]:  # the filter the README shows finds exactly the reserve drops
        pf = tshark("-r", str(observed.pcap(*pair)), "-Y", 'frame.comment contains "PFMEMALLOC"', "-T", "fields",
                    "-e", "frame.number").split()
        assert len(pf) == res.drops["pfmemalloc_drop"]


def dissect(path: str, *extra: str, only: str = "") -> list[list[str]]:
    """One tshark pass: protocols, RPC message type, NFSv3 procedure, iSCSI opcode and expert
    severity of every frame that is RPC, iSCSI, malformed or has an expert note; with `only`
    (a display filter), of those frames that match it too."""
    shown = "rpc || iscsi || _ws.malformed || _ws.expert.severity == error"
    out = tshark("-r", path, *extra, "-Y", f"({shown}) && ({only})" if only else shown, "-T", "fields",
                 "-E", "separator=;", "-e", "frame.protocols", "-e", "rpc.msgtyp", "-e", "nfs.procedure_v3",
                 "-e", "iscsi.opcode", "-e", "_ws.expert.severity")
    return [line.split(";") for line in out.splitlines()]


@pytest.mark.peers
def test_pcap_decodes_rpc_and_iscsi_without_malformed_frames(observed: Observed) -> None:
    nfs_res = observed.seen[("nfs-udp", "none")]
    ep = parse_server_url(nfs_res.server)
    assert isinstance(ep, NfsEndpoint)
    assert nfs_res.pcap["decode_as"] == f"tshark -d udp.port=={ep.nfsport},rpc -d udp.port=={ep.mountport},rpc"
    # the swap traffic's frames: background datagrams go to ephemeral ports, some of which tshark
    # knows as another protocol's (44818 EtherNet/IP, 47808 BACnet, ...), and 'netswap background
    # traffic' is not that protocol
    nfs = dissect(str(observed.pcap("nfs-udp", "none")), *nfs_res.pcap["decode_as"].split()[1:],
                  only=f"udp.port == {ep.nfsport} || udp.port == {ep.mountport}")
    calls = [f for f in nfs if f[1] == "0" and ":nfs" in f[0]]
    assert any("7" in f[2].split(",") for f in calls)  # NFSv3 WRITE calls: the swap-outs
    assert any(f[1] == "1" and ":nfs" in f[0] for f in nfs)  # and their replies, matched to them
    iscsi_pcap = str(observed.pcap("iscsi", "v12"))
    decode = observed.seen[("iscsi", "v12")].pcap["decode_as"]  # what the run says to use
    port = tshark("-r", iscsi_pcap, "-Y", 'tcp && frame.comment == "TX"', "-T", "fields", "-e", "tcp.dstport",
                  "-c", "1").strip()
    assert decode == f"tshark -d tcp.port=={port},iscsi"
    isc = dissect(iscsi_pcap, *decode.split()[1:], only=f"tcp.port == {port}")
    ops = {op for f in isc for op in f[3].split(",") if op}
    assert {"0x01", "0x21"} <= ops, sorted(ops)  # SCSI Command and SCSI Response PDUs
    for frames in (nfs, isc):
        bad = [f for f in frames if "_ws.malformed" in f[0] or "error" in f[4].split(",")
               or "8388608" in f[4].split(",")]  # PI_ERROR, for tshark versions that print the number
        assert bad == [], bad[:5]


@pytest.mark.peers
def test_decode_as_holds_rpc_whose_xid_looks_like_rtcp(observed: Observed, tmp_path: Path) -> None:
    """XIDs start at random. One that starts 0x80C8 makes a datagram an RTCP Sender Report to
    tshark's heuristics, which it tries before RPC's (a CI run met one): the run's decode_as
    keeps its RPC RPC whatever the XID."""
    from scapy.layers.inet import IP, UDP
    from scapy.utils import PcapNgReader, wrpcap

    res = observed.seen[("nfs-udp", "none")]
    ep = parse_server_url(res.server)
    assert isinstance(ep, NfsEndpoint)
    ours = {ep.nfsport, ep.mountport}
    frames: list[Any] = []
    calls: set[bytes] = set()
    with PcapNgReader(str(observed.pcap("nfs-udp", "none"))) as r:
        for pkt in r:
            # calls in one datagram (a page's WRITE goes in IP fragments) and the replies to them
            if UDP not in pkt or pkt[IP].flags.MF or pkt[IP].frag:
                continue
            body = bytearray(bytes(pkt[UDP].payload))
            if pkt[UDP].dport in ours:
                calls.add(bytes(body[:4]))
            if pkt[UDP].dport in ours or (pkt[UDP].sport in ours and bytes(body[:4]) in calls):
                body[:2] = b"\x80\xc8"  # version 2, packet type 200 (SR) to RTCP
                pkt[UDP].remove_payload()
                pkt[UDP].add_payload(bytes(body))
                pkt[UDP].chksum = None
                frames.append(pkt)
            if len(frames) == 10:  # the MOUNT and the swap file's setup (the pages go in IP fragments)
                break
    assert len(frames) == 10
    path = tmp_path / "rtcp-shaped-xids.pcap"
    wrpcap(str(path), frames)
    out = dissect(str(path), *res.pcap["decode_as"].split()[1:])
    odd = [f for f in out if not f[0].endswith((":rpc:nfs", ":rpc:mount")) or f[4] != ""]
    assert len(out) == 10 and odd == [], odd[:5]
    assert {f[0].rsplit(":", 1)[1] for f in out} == {"mount", "nfs"}


def test_dropwatch_accounts_for_every_drop(observed: Observed) -> None:
    for pair in PAIRS:
        res, lines = observed.seen[pair], observed.dropwatch[pair]
        total = 0
        for line in lines:  # "nfs-udp/none t=1.00s    2482 drops at SITE [REASON] SOCKET"
            m = re.match(r"^\S+ t=[\d.]+s +(\d+) drops at (\S+) \[(\w+)\] ", line)
            assert m, line
            assert m[2] in {s for s, _ in LOCATIONS.values()}
            total += int(m[1])
        counted = sum(v for k, v in res.drops.items() if k in LOCATIONS)
        assert total == counted, (pair, total, counted)
        if counted:
            assert any("udp 127.0.0.1:" in x and " app" in x for x in lines)


def test_proc_dir_holds_the_views_at_the_end(observed: Observed) -> None:
    for pair in PAIRS:
        d = observed.proc(*pair)
        res = observed.seen[pair]
        for name in ("meminfo", "vmstat", "slabinfo", "reserve_info", "nstat", "ss"):
            assert (d / name).read_text() == res.views[name], name
        assert (d / "status").read_text().startswith(f"{pair[0]}/{pair[1]} t={res.emulated_s:.3f}s {res.outcome}")
        assert "MemFree:" in (d / "meminfo").read_text()
    assert '"SKB data reserve"' in (observed.proc("iscsi", "v12") / "reserve_info").read_text()


def test_timeline_data_holds_every_plotted_series(observed: Observed) -> None:
    for pair in PAIRS:
        res = observed.seen[pair]
        rec: Recorder = res.timeline
        with open(res.files["timeline_csv"]) as f:
            table = list(csv.DictReader(f))
        assert len(table) == len(rec.samples) > 10
        head = list(table[0])
        assert head == columns(rec)
        assert set(plotted_columns(rec, res.policy)) <= set(head)
        documented = {c.replace("<counter>", r) for c in COLUMNS for r in rec.reasons()} | set(COLUMNS)
        assert set(head) <= documented
        jl = [json.loads(x) for x in Path(res.files["timeline_jsonl"]).read_text().splitlines()]
        assert [str(x["nr_free"]) for x in jl] == [r["nr_free"] for r in table]
        assert float(table[-1]["pswpout"]) == res.pages_swapped_out or res.outcome != "completed"
        assert Path(res.files["timeline"]).read_bytes()[:4] == b"\x89PNG"


def test_result_says_what_traffic_was_offered_and_delivered(observed: Observed) -> None:
    for pair in PAIRS:
        tr = observed.seen[pair].traffic
        assert tr["offered"] >= tr["expected"] >= tr["arrived"] > 0
        assert 0 < tr["delivered"] <= tr["arrived"] and tr["read_by_apps"] <= tr["delivered"]
        assert tr["delivered_bytes"] > 0


def test_compare_two_real_runs(observed: Observed, tmp_path: Path) -> None:
    a, b = (observed.seen[p].files["json"] for p in PAIRS)
    png = tmp_path / "cmp.png"
    r = subprocess.run([sys.executable, "-m", "emu", "compare", a, b, "--plot", str(png)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert f"A: {a}" in out and f"B: {b}" in out
    assert all(len(line) <= 80 for line in out.splitlines()), out
    assert "policy" in out and "none" in out and "v12" in out  # they differ, so the row is there
    assert "2 of 2 runs had a timeline" in r.stderr and png.read_bytes()[:4] == b"\x89PNG"
    js = json.loads(subprocess.run([sys.executable, "-m", "emu", "compare", a, b, "--plot", str(png), "--json"],
                                   capture_output=True, text=True, timeout=120, check=True).stdout)
    assert js["rows"]["outcome"] == {"A": observed.seen[PAIRS[0]].outcome, "B": observed.seen[PAIRS[1]].outcome} \
        or observed.seen[PAIRS[0]].outcome == observed.seen[PAIRS[1]].outcome
    bad = subprocess.run([sys.executable, "-m", "emu", "compare", a, str(tmp_path / "missing.json")],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "missing.json: cannot read" in bad.stderr
    assert bad.stderr.startswith("netswap: error: ") and len(bad.stderr.splitlines()) == 1
    for plot, says in ((tmp_path / "cmp.txt", "expected a .png, .svg or .pdf"),
                       (tmp_path / "nodir" / "cmp.png", "does not exist")):
        r = subprocess.run([sys.executable, "-m", "emu", "compare", a, b, "--plot", str(plot)],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and says in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "nodir").exists() and not (tmp_path / "cmp.txt").exists()
