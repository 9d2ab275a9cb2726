"""Runs shared by the observer tests (pcap, dropwatch, /proc views, timeline data, compare,
report.html): each backend/policy pair once with every observer on and once without, in
--out folders, so every test asserts on real runs without paying for them twice."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from emu import scenario as scen
from emu.host import RunResult, run_host
from emu.host.observe import Observe
from emu.host.servers import local_server

PAIRS = (("nfs-udp", "none"), ("iscsi", "v12"))


@dataclass
class Observed:
    dir: Path
    plain: dict[tuple[str, str], RunResult] = field(default_factory=dict)
    seen: dict[tuple[str, str], RunResult] = field(default_factory=dict)
    dropwatch: dict[tuple[str, str], list[str]] = field(default_factory=dict)

    def pcap(self, backend: str, policy: str) -> Path:
        return self.dir / f"{backend}-{policy}.pcapng"

    def proc(self, backend: str, policy: str) -> Path:
        return self.dir / f"proc-{backend}-{policy}"


@pytest.fixture(scope="session")
def observed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Observed]:
    obs = Observed(tmp_path_factory.mktemp("observed"))
    for backend, policy in PAIRS:
        sc = scen.default().replace(backend=backend, policy=policy)
        # a fresh server each (a second run on a server finds its swap file made: another run)
        with local_server(backend, sc.host.swap) as sp:
            obs.plain[(backend, policy)] = run_host(sc, sp.server)
        lines: list[str] = []
        # a ring big enough for the whole run, background frames cut to 96 bytes
        o = Observe(pcap=obs.pcap(backend, policy), pcap_snaplen=96, pcap_ring=1 << 30,
                    dropwatch=lines.append, proc_dir=obs.proc(backend, policy))
        with local_server(backend, sc.host.swap) as sp:
            obs.seen[(backend, policy)] = run_host(sc, sp.server, out_dir=obs.dir / "out", observe=o)
        obs.dropwatch[(backend, policy)] = lines
    yield obs
