"""User space of the emulated host: the workload, and the applications background traffic is for.

- Workload processes run their access patterns (emu.host.workload) over an anonymous working set
  larger than RAM, then read every page back once and check its bytes.  Each access costs the
  CPU `user_access` (the program's own work between two touches of memory).
- Application daemons own UDP sockets.  They start listening when the host comes under memory
  pressure (free memory at the low watermark) or `start_after` seconds into the run; whenever data
  is queued (at most every `app_period` s) each looks at the next `app_touch` pages of its heap,
  round robin, and reads everything queued.  A page it has not used for a while has been swapped
  out: it waits in the fault, and its socket's queue fills.
"""

from __future__ import annotations

import socket
import struct
from typing import TYPE_CHECKING, Any

import trio

from emu.host.workload import Pattern, split_pages
from emu.kernel.sched import task
from emu.mm.page_alloc import Page
from emu.mm.process import Process
from emu.net.sock import Sock, app_reader

if TYPE_CHECKING:
    from emu.kernel.cpu import Cpu
    from emu.mm.vm import Vm
    from emu.net.stack import NetStack
    from emu.scenario import TrafficSection, WorkloadSection


class Workload:
    """The workload processes; `done`/`total` count accesses (the final check included)."""

    def __init__(self, mm: Vm, cpu: Cpu, w: WorkloadSection, page_size: int) -> None:
        self.mm = mm
        self.cpu = cpu
        nr = w.working_set // page_size
        self.sizes = split_pages(nr, w.processes)
        self.patterns = [Pattern(w.kind, n, w.passes, w.seed + i, w.hot_fraction, w.hot_probability, w.write_fraction)
                         for i, n in enumerate(self.sizes)]
        self.total = sum(len(p) + n for p, n in zip(self.patterns, self.sizes))
        self.done = 0
        self.verified = 0
        self.mismatches = 0
        self.mismatch_details: list[dict[str, Any]] = []
        self.procs: list[Process] = []
        self.finished = trio.Event()

    async def run(self) -> None:
        async with trio.open_nursery() as n:
            for i, (nr, p) in enumerate(zip(self.sizes, self.patterns)):
                n.start_soon(self._proc, i, nr, p)
        self.finished.set()

    async def _proc(self, i: int, nr_pages: int, pattern: Pattern) -> None:
        cpu = self.cpu
        access = cpu.costs.user_access
        checkpoint = trio.lowlevel.checkpoint
        with task(f"workload{i}"):
            proc = Process(self.mm, f"workload{i}", nr_pages)
            self.procs.append(proc)
            for page, write in pattern:
                cpu.charge(access)
                await proc.touch(page, write=write)
                self.done += 1
                await checkpoint()  # the scheduler tick: a resident access never sleeps
            # Finally read every page back once and check its bytes, resident or swapped.
            for page in range(nr_pages):
                cpu.charge(access)
                await proc.touch(page, write=False)
                pte = proc.pte[page]
                if pte.__class__ is Page and proc.verify(page, pte.data):  # type: ignore[union-attr]
                    self.verified += 1
                else:
                    self.mismatches += 1
                    if len(self.mismatch_details) < 10 and pte.__class__ is Page:
                        # what the page holds instead: (pid, page, version) of its first 16 bytes
                        found = struct.unpack_from("<IIQ", pte.data)  # type: ignore[union-attr]
                        self.mismatch_details.append({"process": proc.name, "pid": proc.pid, "page": page,
                                                      "version": proc.version[page], "found": list(found),
                                                      "pfn": pte.pfn})  # type: ignore[union-attr]
                self.done += 1
                await checkpoint()


class Apps:
    """The application daemons that own the sockets background traffic lands on."""

    def __init__(self, mm: Vm, net: NetStack, tr: TrafficSection) -> None:
        self.mm = mm
        self.net = net
        self.tr = tr
        self.procs: list[Process] = []
        self.ports: list[int] = []
        self._reserved: list[socket.socket | None] = []
        self.socks: list[Sock] = []
        self.listening_at: float | None = None

    @property
    def enabled(self) -> bool:
        return self.tr.profile != "none" and self.tr.apps > 0

    async def start(self) -> None:
        """Their processes (heaps written once) and the UDP ports they will listen on."""
        tr = self.tr
        for i in range(tr.apps):
            proc = Process(self.mm, f"app{i}", tr.app_pages)
            with task(f"app{i}"):
                for page in range(tr.app_pages):
                    await proc.touch(page, write=True)
            self.procs.append(proc)
            # bound now, so that no other run on this machine takes the port before listen()
            raw = self.net.reserve_udp_port()
            self._reserved.append(raw)
            self.ports.append(raw.getsockname()[1])

    def close(self) -> None:
        """Release the ports of a run that ended before its applications listened."""
        for raw in self._reserved:
            if raw is not None:
                raw.close()
        self._reserved = [None] * len(self._reserved)

    async def listen(self, nursery: trio.Nursery) -> None:
        """Open their sockets and start reading; until now the traffic found no socket on this
        machine and the real kernel discarded it."""
        for i, (proc, port) in enumerate(zip(self.procs, self.ports)):
            raw, self._reserved[i] = self._reserved[i], None
            sk = await self.net.open_app_udp(port, proc, reserved=raw)
            self.socks.append(sk)
            nursery.start_soon(self._loop, i, proc, sk)
        self.listening_at = trio.current_time()

    async def _loop(self, i: int, proc: Process, sk: Sock) -> None:
        tr = self.tr
        nxt = 0

        async def resident() -> None:
            nonlocal nxt
            for _ in range(tr.app_touch):
                await proc.touch(nxt, write=False)
                nxt = (nxt + 1) % tr.app_pages

        with task(f"app{i}"):
            await app_reader(sk, resident, tr.app_period)
