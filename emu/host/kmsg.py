"""The swap transports' kernel messages, kept for the run's result (a `dmesg` of the run).

The NFS client and the iSCSI initiator say what Linux would ("server 127.0.0.1 not responding,
still trying", "server 127.0.0.1 OK", "connection1:0: detected conn error", "session recovery
timed out") through the `logging` loggers `nfs.client` and `iscsi.initiator`.  During a run they
are collected here, stamped with the emulated time, instead of going to stderr under the live
progress; `netswap run` prints them after the run and the JSON has them (`server_events`).
Collecting them changes nothing the model does.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import trio

LOGGERS = ("nfs.client", "iscsi.initiator")


class KmsgHandler(logging.Handler):
    def __init__(self, limit: int = 200) -> None:
        super().__init__(logging.WARNING)
        self.events: list[dict[str, Any]] = []
        self.limit = limit
        self.dropped = 0

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.events) >= self.limit:
            self.dropped += 1
            return
        try:
            t: float | None = round(trio.current_time(), 6)
        except RuntimeError:  # outside the host's trio.run
            t = None
        self.events.append({"t": t, "source": record.name, "message": record.getMessage()})


@contextlib.contextmanager
def collect_kmsg() -> Iterator[KmsgHandler]:
    """Collect the transports' warnings for the duration of the block."""
    handler = KmsgHandler()
    loggers = [logging.getLogger(n) for n in LOGGERS]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        yield handler
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
