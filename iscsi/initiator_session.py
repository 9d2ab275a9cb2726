"""The initiator's session, sans-IO: what outlives any one connection (RFC 7143 §6.3.5, §7.1).

It holds every task issued and not finished, puts them on whichever connection is up, and decides
what an answer means: BUSY and TASK SET FULL are retried after a backoff, a UNIT ATTENTION is retried
at once (as the Linux SCSI midlayer does, a bounded number of times), anything else finishes the task.

Session recovery is open-iscsi's: when the connection is lost the session enters recovery, the driver
logs in again (same ISID: session reinstatement) and `connection_up()` sends every unfinished task
again, in issue order; if no connection is up within `replacement_timeout` seconds, every outstanding
task fails with `SessionRecoveryTimeout`. A command unanswered for `command_timeout` seconds makes
the session ask the driver to drop the connection, which starts the same recovery.

Time is an argument (`now`), never read here: `get_timer()` says when `handle_timer(now)` is due.
The driver owns the sockets, the clock and the waiting.
"""

from __future__ import annotations

import enum
import heapq
import itertools
import logging
from collections import deque

from .initiator_conn import InitiatorConnection
from .initiator_task import ISCSIError, SessionRecoveryTimeout, Task, TaskKind
from .pdu import Pdu
from .sense import SenseKey, Status

log = logging.getLogger("iscsi.initiator")

REPLACEMENT_TIMEOUT = 120.0  # open-iscsi's node.session.timeo.replacement_timeout
BUSY_RETRIES = 20  # BUSY / TASK SET FULL answers retried with backoff before the command fails
UA_RETRIES = 3  # UNIT ATTENTION answers retried at once
BUSY_BACKOFF = (0.005, 0.5)  # first delay, largest delay (doubling)
RECONNECT_BACKOFF = (0.1, 1.0)  # between login attempts during recovery

_session_ids = itertools.count(1)


class SessionState(enum.Enum):
    FREE = "free"  # not logged in yet
    LOGGED_IN = "logged in"
    RECOVERING = "recovering"  # connection lost; logging in again until replacement_timeout
    TERMINATED = "terminated"  # logged out, or recovery timed out: every task fails


class InitiatorSession:
    """Tasks, their order, retries and session recovery, across connections."""

    def __init__(self, *, replacement_timeout: float = REPLACEMENT_TIMEOUT, command_timeout: float | None = 30.0,
                 reconnect_backoff: tuple[float, float] = RECONNECT_BACKOFF) -> None:
        if replacement_timeout < 0:
            raise ValueError("replacement_timeout must be >= 0")
        self.sid = next(_session_ids)
        self.replacement_timeout = replacement_timeout
        self.command_timeout = command_timeout
        self.reconnect_backoff = reconnect_backoff
        self.state = SessionState.FREE
        self.conn: InitiatorConnection | None = None
        self.error: ISCSIError | None = None  # why the session terminated
        self.outstanding: dict[int, Task] = {}  # seq -> every task issued and not finished
        self.queue: deque[Task] = deque()  # waiting to be sent (no connection, window closed, retry)
        self.delayed: list[tuple[float, int, Task]] = []  # (due, seq, task): BUSY retries
        self.finished: list[Task] = []  # finished since the driver last looked
        self.recovery_deadline: float | None = None
        self.recovery_cause = ""
        self.login_attempts = 0
        self.drop_reason: str | None = None  # set when the driver must drop the connection
        self._seq = itertools.count(1)
        self._conn_ids = itertools.count(1)
        self.stats = {"reconnects": 0, "reissued": 0, "busy_retries": 0, "ua_retries": 0, "command_timeouts": 0}

    @property
    def name(self) -> str:
        return f"connection{self.sid}:0"

    # --- issuing ----------------------------------------------------------------------------------

    def issue(self, task: Task) -> None:
        """A new task: queued for the next `flush`. Fails it at once if the session is over."""
        task.seq = next(self._seq)
        self.outstanding[task.seq] = task
        if self.state is SessionState.TERMINATED:
            assert self.error is not None
            self._finish(task, self.error)
            return
        self.queue.append(task)

    def flush(self, now: float, out: list[bytes]) -> None:
        """Put queued tasks on the connection while the CmdSN window allows (immediate ones
        always), in issue order; their bytes are appended to `out`."""
        conn = self.conn
        if conn is None or self.state is not SessionState.LOGGED_IN:
            return
        queue = self.queue
        while queue:
            task = queue[0]
            if not task.immediate and not conn.window_open():
                break
            queue.popleft()
            if task.finished:
                continue
            conn.submit(task, out)
            task.sent_at = now

    @property
    def sendable(self) -> bool:
        """Whether `flush` would send something now."""
        conn = self.conn
        if conn is None or self.state is not SessionState.LOGGED_IN or not self.queue:
            return False
        return self.queue[0].immediate or conn.window_open()

    # --- answers ----------------------------------------------------------------------------------

    def receive(self, pdu: Pdu, now: float, out: list[bytes]) -> None:
        """One PDU from the target on the current connection (ProtocolViolation propagates: the
        driver drops the connection)."""
        conn = self.conn
        assert conn is not None
        replies = conn.receive(pdu)
        if replies:
            out.extend(replies)
        if conn.completed:
            for task in conn.take_completed():
                self._answered(task, now)

    def _answered(self, task: Task, now: float) -> None:
        if task.finished:
            return
        res = task.result
        if task.error is None and res is not None:
            if res.status in (Status.BUSY, Status.TASK_SET_FULL):
                if task.busy_retries < BUSY_RETRIES:
                    first, most = BUSY_BACKOFF
                    delay = min(first * (1 << task.busy_retries), most)
                    task.busy_retries += 1
                    self.stats["busy_retries"] += 1
                    heapq.heappush(self.delayed, (now + delay, task.seq, task))
                    return
            elif (res.status == Status.CHECK_CONDITION and res.sense is not None
                  and res.sense.key == SenseKey.UNIT_ATTENTION and task.ua_retries < UA_RETRIES):
                task.ua_retries += 1
                self.stats["ua_retries"] += 1
                self.queue.append(task)
                return
        self._finish(task, task.error)

    def _finish(self, task: Task, error: ISCSIError | None) -> None:
        task.error = error
        task.finished = True
        self.outstanding.pop(task.seq, None)
        self.finished.append(task)

    def take_finished(self) -> list[Task]:
        done, self.finished = self.finished, []
        return done

    # --- connections ------------------------------------------------------------------------------

    def new_connection_id(self) -> int:
        return next(self._conn_ids)

    def connection_up(self, conn: InitiatorConnection, now: float) -> None:
        """A login succeeded: everything unfinished goes on this connection, in issue order."""
        recovering = self.state is SessionState.RECOVERING
        if self.state is SessionState.TERMINATED:
            raise ISCSIError("session terminated")
        self.conn = conn
        self.state = SessionState.LOGGED_IN
        self.recovery_deadline = None
        self.drop_reason = None
        if recovering:
            self.stats["reconnects"] += 1
            log.warning("%s is operational after recovery (%d attempts)", self.name, self.login_attempts + 1)
        else:
            log.info("%s is operational now", self.name)
        self.login_attempts = 0

    def connection_lost(self, cause: str, now: float) -> None:
        """The connection is gone (closed, reset, protocol error, or dropped on our request)."""
        if self.state is not SessionState.LOGGED_IN:
            return
        conn = self.conn
        self.conn = None
        self.state = SessionState.RECOVERING
        self.recovery_cause = cause
        self.recovery_deadline = now + self.replacement_timeout
        log.warning("%s: detected conn error (%s)", self.name, cause)
        if conn is None:
            return
        again = []
        for task in conn.tasks.values():
            task.conn_id = 0
            if task.kind is TaskKind.TMF:  # it names tasks of the old connection: meaningless now
                self._finish(task, ISCSIError(f"connection lost during a task management request: {cause}"))
            elif task.kind is TaskKind.LOGOUT:  # the connection is closed either way
                self._finish(task, None)
            else:
                again.append(task)
        conn.tasks.clear()
        if again:  # sent again, in issue order, ahead of what never went out
            self.queue = deque(sorted([*again, *self.queue], key=lambda t: t.seq))
            self.stats["reissued"] += len(again)

    def reconnect_delay(self) -> float:
        """How long the driver waits before its next login attempt."""
        first, most = self.reconnect_backoff
        return min(first * (1 << min(self.login_attempts, 16)), most)

    def login_failed(self, cause: str) -> None:
        self.login_attempts += 1
        log.info("%s: login attempt %d failed: %s", self.name, self.login_attempts, cause)

    def terminate(self, error: ISCSIError) -> None:
        """End the session (logout, or the driver going away): every task left fails with `error`."""
        if self.state is SessionState.TERMINATED:
            return
        self.state = SessionState.TERMINATED
        self.error = error
        self.conn = None
        self.recovery_deadline = None
        self.queue.clear()
        self.delayed.clear()
        for task in list(self.outstanding.values()):
            self._finish(task, error)

    # --- timers -----------------------------------------------------------------------------------

    def get_timer(self) -> float | None:
        """When `handle_timer` must next run (None: nothing pending)."""
        times: list[float] = []
        if self.state is SessionState.RECOVERING and self.recovery_deadline is not None:
            times.append(self.recovery_deadline)
        if self.delayed:
            times.append(self.delayed[0][0])
        if self.command_timeout is not None and self.state is SessionState.LOGGED_IN and self.conn is not None \
                and self.conn.tasks and self.drop_reason is None:
            times.append(min(t.sent_at for t in self.conn.tasks.values()) + self.command_timeout)
        return min(times) if times else None

    def handle_timer(self, now: float) -> None:
        if self.state is SessionState.RECOVERING and self.recovery_deadline is not None and now >= self.recovery_deadline:
            secs = f"{self.replacement_timeout:g}"
            log.error("session%d: session recovery timed out after %s secs", self.sid, secs)
            self.terminate(SessionRecoveryTimeout(
                f"session recovery timed out after {secs} secs (connection lost: {self.recovery_cause})"))
            return
        while self.delayed and self.delayed[0][0] <= now:
            _, _, task = heapq.heappop(self.delayed)
            if not task.finished:
                self.queue.append(task)
        conn = self.conn
        if self.command_timeout is not None and conn is not None and self.drop_reason is None:
            late = [t for t in conn.tasks.values() if now - t.sent_at >= self.command_timeout]
            if late:
                self.stats["command_timeouts"] += 1
                self.drop_reason = f"{late[0].describe()} unanswered for {self.command_timeout:g}s"
