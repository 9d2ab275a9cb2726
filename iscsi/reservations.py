"""Reservations of one logical unit: RESERVE(6)/RELEASE(6) (SPC-2 §5.5.1) and persistent
reservations (SPC-4 §5.12, PERSISTENT RESERVE IN/OUT §6.15-6.16), sans-IO.

Everything is per I_T nexus: a registration is a reservation key registered through one nexus, and
stays across that nexus's sessions (and across LU resets) until it is unregistered, preempted or
cleared. Persistence through power loss (APTPL) is not offered: it lives as long as the target.
Every change that an initiator must learn of establishes its UNIT ATTENTION (SPC-4 §5.12.11).
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from . import sense as S
from .nexus import Nexus
from .scsi import MEDIUM_READS, SAI_GET_LBA_STATUS, SAI_READ_CAPACITY_16, Opcode
from .sense import GOOD, RESERVATION_CONFLICT, ScsiResult, illegal

LU_SCOPE = 0


class PrType(enum.IntEnum):
    WRITE_EXCLUSIVE = 1
    EXCLUSIVE_ACCESS = 3
    WRITE_EXCLUSIVE_REGISTRANTS_ONLY = 5
    EXCLUSIVE_ACCESS_REGISTRANTS_ONLY = 6
    WRITE_EXCLUSIVE_ALL_REGISTRANTS = 7
    EXCLUSIVE_ACCESS_ALL_REGISTRANTS = 8


REGISTRANTS_TYPES = frozenset({PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY, PrType.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY,
                               PrType.WRITE_EXCLUSIVE_ALL_REGISTRANTS, PrType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS})
ALL_REGISTRANTS_TYPES = frozenset({PrType.WRITE_EXCLUSIVE_ALL_REGISTRANTS, PrType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS})
EXCLUSIVE_ACCESS_TYPES = frozenset({PrType.EXCLUSIVE_ACCESS, PrType.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY,
                                    PrType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS})
_TYPES = frozenset(int(t) for t in PrType)
# PERSISTENT RESERVATION TYPE MASK of REPORT CAPABILITIES: WR_EX_AR, EX_AC_RO, WR_EX_RO, EX_AC, WR_EX; EX_AC_AR
TYPE_MASK = 0x80 | 0x40 | 0x20 | 0x08 | 0x02, 0x01


class In(enum.IntEnum):  # PERSISTENT RESERVE IN service actions
    READ_KEYS = 0
    READ_RESERVATION = 1
    REPORT_CAPABILITIES = 2
    READ_FULL_STATUS = 3


class Out(enum.IntEnum):  # PERSISTENT RESERVE OUT service actions
    REGISTER = 0
    RESERVE = 1
    RELEASE = 2
    CLEAR = 3
    PREEMPT = 4
    PREEMPT_AND_ABORT = 5
    REGISTER_AND_IGNORE_EXISTING_KEY = 6
    REGISTER_AND_MOVE = 7


PROUT_PARAMETERS = 24  # the basic PERSISTENT RESERVE OUT parameter list
_SPEC_I_PT, _ALL_TG_PT, _APTPL = 0x08, 0x04, 0x01

# Commands any I_T nexus may send whatever the reservation (SPC-4 table 58, SBC-3 table 13).
ALWAYS_ALLOWED = frozenset({Opcode.INQUIRY, Opcode.REPORT_LUNS, Opcode.REQUEST_SENSE, Opcode.TEST_UNIT_READY,
                            Opcode.READ_CAPACITY_10, Opcode.PERSISTENT_RESERVE_IN, Opcode.PERSISTENT_RESERVE_OUT,
                            Opcode.MAINTENANCE_IN})
# ... and while another I_T nexus holds a RESERVE(6) (SPC-2 §5.5.1).
SPC2_ALLOWED = frozenset({Opcode.INQUIRY, Opcode.REPORT_LUNS, Opcode.REQUEST_SENSE, Opcode.RELEASE_6,
                          Opcode.READ_CAPACITY_10, Opcode.SERVICE_ACTION_IN_16, Opcode.MAINTENANCE_IN,
                          Opcode.PERSISTENT_RESERVE_IN})


@dataclass
class Reservation:
    holder: Nexus  # for the all-registrants types: the nexus that reserved (every registrant holds it)
    type: PrType


EstablishUA = Callable[[Iterable[Nexus], tuple[int, int]], None]


class Reservations:
    def __init__(self, establish_ua: EstablishUA) -> None:
        self.establish_ua = establish_ua
        self.spc2_holder: Nexus | None = None  # RESERVE(6)
        self.registrations: dict[Nexus, int] = {}  # nexus -> reservation key
        self.reservation: Reservation | None = None
        self.generation = 0  # PRgeneration: bumped by every REGISTER, CLEAR and PREEMPT that does something

    def __bool__(self) -> bool:
        """Whether anything is registered or reserved (the hot path checks this first)."""
        return self.spc2_holder is not None or bool(self.registrations)

    def holds(self, nexus: Nexus) -> bool:
        r = self.reservation
        if r is None:
            return False
        if r.type in ALL_REGISTRANTS_TYPES:
            return nexus in self.registrations
        return r.holder == nexus

    def conflict(self, nexus: Nexus, cdb: bytes) -> bool:
        """Whether `cdb` from `nexus` must end with RESERVATION CONFLICT."""
        op = cdb[0]
        if self.spc2_holder is not None and self.spc2_holder != nexus:
            return op not in SPC2_ALLOWED
        r = self.reservation
        if r is None or op in ALWAYS_ALLOWED or self.holds(nexus):
            return False
        if op == Opcode.SERVICE_ACTION_IN_16 and cdb[1] & 0x1F == SAI_READ_CAPACITY_16:
            return False
        if r.type in REGISTRANTS_TYPES and nexus in self.registrations:
            return False  # registrants may read and write under the registrants-only/all types
        reads = op in MEDIUM_READS or op in (Opcode.MODE_SENSE_6, Opcode.MODE_SENSE_10) or (
            op == Opcode.SERVICE_ACTION_IN_16 and cdb[1] & 0x1F == SAI_GET_LBA_STATUS)
        return not reads or r.type in EXCLUSIVE_ACCESS_TYPES

    # --- RESERVE(6) / RELEASE(6) ------------------------------------------------------------------

    def reserve6(self, nexus: Nexus) -> ScsiResult:
        if self.registrations or (self.spc2_holder is not None and self.spc2_holder != nexus):
            return RESERVATION_CONFLICT  # persistent reservations exclude SPC-2 ones (SPC-4 §5.12.3)
        self.spc2_holder = nexus
        return GOOD

    def release6(self, nexus: Nexus) -> ScsiResult:
        if self.spc2_holder == nexus:
            self.spc2_holder = None
        return GOOD  # releasing what one does not hold is not an error

    def reset(self) -> None:
        """LOGICAL UNIT RESET, TARGET WARM RESET: RESERVE(6) is released; persistent
        reservations are not affected by resets (SPC-4 §5.12.1)."""
        self.spc2_holder = None

    def nexus_lost(self, nexus: Nexus) -> None:
        """I_T nexus loss releases that nexus's RESERVE(6); its registrations stay."""
        if self.spc2_holder == nexus:
            self.spc2_holder = None

    # --- PERSISTENT RESERVE IN --------------------------------------------------------------------

    def persistent_reserve_in(self, cdb: bytes) -> ScsiResult:
        sa = cdb[1] & 0x1F
        alloc = struct.unpack_from(">H", cdb, 7)[0]
        gen = struct.pack(">I", self.generation)
        if sa == In.READ_KEYS:
            body = b"".join(struct.pack(">Q", key) for key in self.registrations.values())
            data = gen + struct.pack(">I", len(body)) + body
        elif sa == In.READ_RESERVATION:
            r = self.reservation
            if r is None:
                data = gen + bytes(4)
            else:
                key = 0 if r.type in ALL_REGISTRANTS_TYPES else self.registrations.get(r.holder, 0)
                data = gen + struct.pack(">IQxxxxxBxx", 16, key, (LU_SCOPE << 4) | r.type)
        elif sa == In.REPORT_CAPABILITIES:
            # CRH 0, SIP_C 0, ATP_C 0, PTPL_C 0; TMV 1, ALLOW COMMANDS 000b; PTPL_A 0
            data = struct.pack(">HBBBBxx", 8, 0, 0x80, *TYPE_MASK)
        elif sa == In.READ_FULL_STATUS:
            body = b""
            for nexus, key in self.registrations.items():
                holder = self.holds(nexus)
                r = self.reservation
                scope_type = (LU_SCOPE << 4 | r.type) if holder and r is not None else 0
                tid = nexus.transport_id()
                body += struct.pack(">QxxxxBBxxxxHI", key, 0x01 if holder else 0, scope_type, 1, len(tid)) + tid
            data = gen + struct.pack(">I", len(body)) + body
        else:
            return illegal(S.INVALID_FIELD_IN_CDB, field_pointer=1)
        return ScsiResult(data=data[:alloc])  # the lengths inside keep telling the full size

    # --- PERSISTENT RESERVE OUT -------------------------------------------------------------------

    def persistent_reserve_out(self, nexus: Nexus, cdb: bytes, params: bytes | bytearray | memoryview
                               ) -> tuple[ScsiResult, list[Nexus]]:
        """Run one PERSISTENT RESERVE OUT; also returns the I_T nexuses whose tasks a PREEMPT AND
        ABORT aborts."""
        sa = cdb[1] & 0x1F
        scope, pr_type = cdb[2] >> 4, cdb[2] & 0x0F
        length = struct.unpack_from(">I", cdb, 5)[0]
        if sa > Out.REGISTER_AND_IGNORE_EXISTING_KEY:  # REGISTER AND MOVE is not offered
            return illegal(S.INVALID_FIELD_IN_CDB, field_pointer=1), []
        if length != PROUT_PARAMETERS or len(params) < PROUT_PARAMETERS:
            return illegal(S.PARAMETER_LIST_LENGTH_ERROR), []
        key, sa_key = struct.unpack_from(">QQ", params)
        flags = params[20]
        registering = sa in (Out.REGISTER, Out.REGISTER_AND_IGNORE_EXISTING_KEY)
        if flags & _SPEC_I_PT or (registering and flags & (_ALL_TG_PT | _APTPL)):
            return illegal(S.INVALID_FIELD_IN_PARAMETER_LIST), []  # SIP_C, ATP_C, PTPL_C are all 0
        if self.spc2_holder is not None and self.spc2_holder != nexus:
            return RESERVATION_CONFLICT, []
        if sa in (Out.RESERVE, Out.PREEMPT, Out.PREEMPT_AND_ABORT) and (scope != LU_SCOPE or pr_type not in _TYPES):
            return illegal(S.INVALID_FIELD_IN_CDB, field_pointer=2), []
        mine = self.registrations.get(nexus)
        if registering:
            if sa == Out.REGISTER and key != (mine or 0):
                return RESERVATION_CONFLICT, []
            if sa_key == 0:
                if mine is not None:
                    self._unregister(nexus)
                    self.generation += 1
            else:
                self.registrations[nexus] = sa_key
                self.generation += 1
            return GOOD, []
        if mine is None or key != mine:
            return RESERVATION_CONFLICT, []
        if sa == Out.RESERVE:
            return self._reserve(nexus, PrType(pr_type)), []
        if sa == Out.RELEASE:
            return self._release(nexus, scope, pr_type), []
        if sa == Out.CLEAR:
            self.establish_ua([n for n in self.registrations if n != nexus], S.RESERVATIONS_PREEMPTED)
            self.registrations.clear()
            self.reservation = None
            self.generation += 1
            return GOOD, []
        return self._preempt(nexus, sa_key, PrType(pr_type))

    def _reserve(self, nexus: Nexus, pr_type: PrType) -> ScsiResult:
        r = self.reservation
        if r is None:
            self.reservation = Reservation(nexus, pr_type)
            return GOOD
        if self.holds(nexus) and r.type == pr_type:
            return GOOD  # reserving again what one holds changes nothing
        return RESERVATION_CONFLICT

    def _release(self, nexus: Nexus, scope: int, pr_type: int) -> ScsiResult:
        r = self.reservation
        if r is None or not self.holds(nexus):
            return GOOD  # nothing of ours to release
        if scope != LU_SCOPE or pr_type != r.type:
            return illegal(S.INVALID_RELEASE_OF_PERSISTENT_RESERVATION)
        self.reservation = None
        if r.type in REGISTRANTS_TYPES:
            self.establish_ua([n for n in self.registrations if n != nexus], S.RESERVATIONS_RELEASED)
        return GOOD

    def _preempt(self, nexus: Nexus, sa_key: int, pr_type: PrType) -> tuple[ScsiResult, list[Nexus]]:
        r = self.reservation
        all_registrants = r is not None and r.type in ALL_REGISTRANTS_TYPES
        holder_key = None if r is None or all_registrants else self.registrations.get(r.holder)
        takes_reservation = r is not None and ((all_registrants and sa_key == 0) or sa_key == holder_key)
        if sa_key == 0 and not (all_registrants and takes_reservation):
            return illegal(S.INVALID_FIELD_IN_PARAMETER_LIST), []
        if all_registrants and sa_key == 0:
            victims = [n for n in self.registrations if n != nexus]
        else:
            if sa_key not in self.registrations.values():
                return RESERVATION_CONFLICT, []
            victims = [n for n, k in self.registrations.items() if k == sa_key and n != nexus]
        for victim in victims:
            del self.registrations[victim]
        if takes_reservation:
            assert r is not None
            changed = r.type != pr_type
            self.reservation = Reservation(nexus, pr_type)
            if changed:
                self.establish_ua([n for n in self.registrations if n != nexus], S.RESERVATIONS_RELEASED)
        elif all_registrants and not self.registrations:
            self.reservation = None
        self.establish_ua(victims, S.REGISTRATIONS_PREEMPTED)
        self.generation += 1
        return GOOD, victims

    def _unregister(self, nexus: Nexus) -> None:
        del self.registrations[nexus]
        r = self.reservation
        if r is None:
            return
        if r.type in ALL_REGISTRANTS_TYPES:
            if not self.registrations:  # the last registrant leaves: nobody holds it
                self.reservation = None
        elif r.holder == nexus:
            self.reservation = None
            if r.type in REGISTRANTS_TYPES:
                self.establish_ua(self.registrations, S.RESERVATIONS_RELEASED)
