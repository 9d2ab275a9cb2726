"""The login phase (RFC 7143 §6.3, §11.12-11.13): target and initiator state machines, and CHAP.

Sans-IO: each side takes a Login PDU and gives the next one. Stages: 0 security, 1 login operational
negotiation, 3 full feature phase. The security stage is optional unless the target requires CHAP.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import os
from dataclasses import dataclass, field
from typing import Callable

from .keys import (
    INITIATOR_DECLARATIVE,
    IRRELEVANT,
    KEY_RULES,
    NegotiationError,
    SessionParams,
    TargetPrefs,
    apply,
    digest_name,
    negotiate,
    number,
    yes_no,
)
from .pdu import F_CONTINUE, F_TRANSIT, Op, Pdu, encode_text, parse_text

SECURITY, OPERATIONAL, FULL_FEATURE = 0, 1, 3
MAX_LOGIN_TEXT = 64 << 10  # bound on a login's accumulated key text (C bit continuation)
CHAP_MD5 = 5


class LoginStatus(enum.IntEnum):
    SUCCESS = 0x0000
    TARGET_MOVED_TEMPORARILY = 0x0101
    TARGET_MOVED_PERMANENTLY = 0x0102
    INITIATOR_ERROR = 0x0200
    AUTHENTICATION_FAILURE = 0x0201
    AUTHORIZATION_FAILURE = 0x0202
    NOT_FOUND = 0x0203
    TARGET_REMOVED = 0x0204
    UNSUPPORTED_VERSION = 0x0205
    TOO_MANY_CONNECTIONS = 0x0206
    MISSING_PARAMETER = 0x0207
    CANT_INCLUDE_IN_SESSION = 0x0208
    SESSION_TYPE_NOT_SUPPORTED = 0x0209
    SESSION_DOES_NOT_EXIST = 0x020A
    INVALID_DURING_LOGIN = 0x020B
    TARGET_ERROR = 0x0300
    SERVICE_UNAVAILABLE = 0x0301
    OUT_OF_RESOURCES = 0x0302


class LoginError(Exception):
    def __init__(self, message: str, status: int = LoginStatus.INITIATOR_ERROR) -> None:
        super().__init__(message)
        self.status = status


def chap_response(ident: int, secret: bytes, challenge: bytes) -> bytes:
    """CHAP with MD5 (RFC 1994): MD5(identifier || secret || challenge)."""
    return hashlib.md5(bytes((ident,)) + secret + challenge).digest()


def chap_decode(value: str) -> bytes:
    """CHAP binary values are "0x<hex>" or "0b<base64>" (RFC 7143 §6.1)."""
    if value[:2] in ("0x", "0X"):
        return bytes.fromhex(value[2:])
    if value[:2] in ("0b", "0B"):
        return base64.b64decode(value[2:])
    raise ValueError(f"CHAP value {value[:20]!r} is neither 0x-hex nor 0b-base64")


def login_flags(transit: bool, csg: int, nsg: int, cont: bool = False) -> int:
    return (F_TRANSIT if transit else 0) | (F_CONTINUE if cont else 0) | (csg << 2) | (nsg if transit else 0)


# --- target side ----------------------------------------------------------------------------------


@dataclass
class LoginConfig:
    target_name: str
    portal_group_tag: int = 1
    allow_initiators: frozenset[str] | None = None
    chap: tuple[str, str] | None = None
    prefs: TargetPrefs = field(default_factory=TargetPrefs)
    target_alias: str = "netswap"


@dataclass
class LoginResult:
    session_type: str
    initiator_name: str
    target_name: str
    isid: bytes
    tsih: int
    cid: int
    params: SessionParams
    cmd_sn: int  # the next expected CmdSN
    stat_sn: int  # the next StatSN to send


class TargetLogin:
    """Target half of one connection's login. `receive(req)` -> (response, close_after_sending)."""

    def __init__(self, config: LoginConfig, new_tsih: Callable[[], int], *, max_cmd_window: int = 128) -> None:
        self.config = config
        self.new_tsih = new_tsih
        self.window = max_cmd_window
        self.params = SessionParams(max_recv_data_segment_length=config.prefs.max_recv_data_segment_length)
        self.declared: dict[str, str] = {}
        self.first: Pdu | None = None
        self.stat_sn = 0
        self.cmd_sn = 0
        self.pending_text = bytearray()
        self.authenticated = config.chap is None
        self.auth_method: str | None = None
        self.chap_state: tuple[int, bytes] | None = None
        self.answered: set[str] = set()
        self.sent_tpgt = False
        self.result: LoginResult | None = None
        self.stage = SECURITY

    def _response(self, req: Pdu, flags: int, text: list[tuple[str, str]], status: int = 0) -> Pdu:
        rsp = Pdu.new(Op.LOGIN_RSP, flags, itt=req.itt, data=encode_text(text))
        rsp.bhs[2] = 0  # version-max
        rsp.bhs[3] = 0  # version-active
        rsp.bhs[8:14] = req.bhs[8:14]  # ISID
        tsih = self.result.tsih if self.result else req.u16(14)
        rsp.set_u16(14, tsih)
        rsp.set_u32(24, self.stat_sn)
        self.stat_sn = (self.stat_sn + 1) & 0xFFFFFFFF
        rsp.set_u32(28, self.cmd_sn)
        rsp.set_u32(32, (self.cmd_sn + self.window - 1) & 0xFFFFFFFF)
        rsp.bhs[36] = status >> 8
        rsp.bhs[37] = status & 0xFF
        return rsp

    def fail(self, req: Pdu, status: int) -> tuple[Pdu, bool]:
        csg = (req.flags >> 2) & 3
        return self._response(req, csg << 2, [], status), True

    def receive(self, req: Pdu) -> tuple[Pdu, bool]:
        if req.opcode != Op.LOGIN_REQ:
            # Anything but a Login Request before the full feature phase: a protocol error.
            return self.fail(req, LoginStatus.INVALID_DURING_LOGIN)
        try:
            return self._receive(req)
        except LoginError as e:
            return self.fail(req, e.status)
        except (NegotiationError, ValueError):
            return self.fail(req, LoginStatus.INITIATOR_ERROR)

    def _receive(self, req: Pdu) -> tuple[Pdu, bool]:
        flags = req.flags
        transit = bool(flags & F_TRANSIT)
        cont = bool(flags & F_CONTINUE)
        csg = (flags >> 2) & 3
        nsg = flags & 3
        if req.bhs[3] > 0:  # version-min
            raise LoginError("unsupported version", LoginStatus.UNSUPPORTED_VERSION)
        if transit and cont:
            raise LoginError("T and C both set")
        if csg not in (SECURITY, OPERATIONAL) or (transit and (nsg <= csg or nsg == 2)):
            raise LoginError(f"bad stage transition CSG={csg} NSG={nsg}")
        if self.first is None:
            self.first = req
            self.cmd_sn = req.u32(24)
            self.stat_sn = req.u32(28)  # continue from the initiator's ExpStatSN
            if req.u16(14) != 0:
                # Adding a connection to an existing session: MaxConnections=1 here.
                raise LoginError("session does not exist", LoginStatus.SESSION_DOES_NOT_EXIST)
        else:
            if req.bhs[8:14] != self.first.bhs[8:14]:
                raise LoginError("ISID changed during login")
            if csg < self.stage:
                raise LoginError("stage went backwards")
        self.stage = csg
        self.pending_text += req.data
        if len(self.pending_text) > MAX_LOGIN_TEXT:
            raise LoginError("login text too long", LoginStatus.OUT_OF_RESOURCES)
        if cont:
            # More text follows: acknowledge with an empty response (RFC 7143 §6.2).
            return self._response(req, csg << 2, []), False
        pairs = parse_text(bytes(self.pending_text), strict=True)  # not UTF-8: INITIATOR ERROR
        self.pending_text.clear()
        answer: list[tuple[str, str]] = []
        for key, value in pairs:
            if key in INITIATOR_DECLARATIVE:
                self.declared[key] = value
        self._check_identity()
        for key, value in pairs:
            if key in INITIATOR_DECLARATIVE:
                continue
            answer.extend(self._answer(key, value, csg))
        # Security stage bookkeeping.
        if csg == SECURITY:
            if self.config.chap is None and self.auth_method is None:
                raise LoginError("no AuthMethod offered in the security stage", LoginStatus.AUTHENTICATION_FAILURE)
        elif not self.authenticated:
            raise LoginError("CHAP is required", LoginStatus.AUTHENTICATION_FAILURE)
        allow_transit = transit and (csg != SECURITY or self.authenticated)
        session_type = self.declared.get("SessionType", "Normal")
        if session_type == "Normal" and not self.sent_tpgt:
            answer.append(("TargetPortalGroupTag", str(self.config.portal_group_tag)))
            answer.append(("TargetAlias", self.config.target_alias))
            self.sent_tpgt = True
        if allow_transit and nsg == FULL_FEATURE:
            if "MaxRecvDataSegmentLength" not in self.answered:
                answer.append(("MaxRecvDataSegmentLength", str(self.params.max_recv_data_segment_length)))
            self.params.first_burst_length = min(self.params.first_burst_length, self.params.max_burst_length)
            first = self.first
            assert first is not None
            tsih = self.new_tsih()
            self.result = LoginResult(
                session_type=session_type,
                initiator_name=self.declared["InitiatorName"],
                target_name=self.declared.get("TargetName", ""),
                isid=bytes(first.bhs[8:14]),
                tsih=tsih,
                cid=first.u16(20),
                params=self.params,
                cmd_sn=self.cmd_sn,
                stat_sn=0,
            )
        rsp = self._response(req, login_flags(allow_transit, csg, nsg), answer)
        if self.result is not None:
            self.result.stat_sn = self.stat_sn
        return rsp, False

    def _check_identity(self) -> None:
        d = self.declared
        if "InitiatorName" not in d:
            raise LoginError("InitiatorName missing", LoginStatus.MISSING_PARAMETER)
        st = d.get("SessionType", "Normal")
        if st not in ("Normal", "Discovery"):
            raise LoginError(f"SessionType={st}", LoginStatus.SESSION_TYPE_NOT_SUPPORTED)
        if st == "Normal":
            if "TargetName" not in d:
                raise LoginError("TargetName missing", LoginStatus.MISSING_PARAMETER)
            if d["TargetName"] != self.config.target_name:
                raise LoginError(f"no target {d['TargetName']!r}", LoginStatus.NOT_FOUND)
        allow = self.config.allow_initiators
        if allow is not None and d["InitiatorName"] not in allow:
            raise LoginError("initiator not allowed", LoginStatus.AUTHORIZATION_FAILURE)

    def _answer(self, key: str, value: str, csg: int) -> list[tuple[str, str]]:
        if key == "AuthMethod":
            offered = value.split(",")
            want = "CHAP" if self.config.chap else "None"
            if want not in offered:
                raise LoginError(f"AuthMethod {value} does not include {want}", LoginStatus.AUTHENTICATION_FAILURE)
            self.auth_method = want
            return [("AuthMethod", want)]
        if key.startswith("CHAP_"):
            return self._chap(key, value)
        if key in KEY_RULES:
            self.answered.add(key)
            prefs = self.config.prefs
            if key == "MaxRecvDataSegmentLength":
                self.params.peer_max_recv_data_segment_length = number(key, value)
                return [(key, str(prefs.max_recv_data_segment_length))]
            result = negotiate(key, value, prefs.ours(key))
            if result == "Reject":
                return [(key, "Reject")]
            apply(self.params, key, result)
            return [(key, result)]
        if key in IRRELEVANT:
            return [(key, "No" if key == "RDMAExtensions" else "Irrelevant")]
        return [(key, "NotUnderstood")]

    def _chap(self, key: str, value: str) -> list[tuple[str, str]]:
        if self.config.chap is None or self.auth_method != "CHAP":
            raise LoginError(f"unexpected {key}", LoginStatus.AUTHENTICATION_FAILURE)
        user, secret = self.config.chap
        if key == "CHAP_A":
            if str(CHAP_MD5) not in value.split(","):
                raise LoginError("CHAP_A without MD5", LoginStatus.AUTHENTICATION_FAILURE)
            ident = os.urandom(1)[0]
            challenge = os.urandom(16)
            self.chap_state = (ident, challenge)
            return [("CHAP_A", str(CHAP_MD5)), ("CHAP_I", str(ident)), ("CHAP_C", "0x" + challenge.hex())]
        if key == "CHAP_N":
            if value != user or self.chap_state is None:
                raise LoginError("CHAP user unknown", LoginStatus.AUTHENTICATION_FAILURE)
            return []
        if key == "CHAP_R":
            if self.chap_state is None:
                raise LoginError("CHAP_R before CHAP_C", LoginStatus.AUTHENTICATION_FAILURE)
            ident, challenge = self.chap_state
            if chap_decode(value) != chap_response(ident, secret.encode(), challenge):
                raise LoginError("CHAP response mismatch", LoginStatus.AUTHENTICATION_FAILURE)
            self.authenticated = True
            self.chap_state = None
            return []
        # Mutual CHAP (CHAP_I/CHAP_C from the initiator) would need a target secret: not offered.
        raise LoginError(f"{key} not supported", LoginStatus.AUTHENTICATION_FAILURE)


# --- initiator side -------------------------------------------------------------------------------


@dataclass
class InitiatorConfig:
    initiator_name: str = "iqn.2024-01.org.netswap:initiator"
    target_name: str | None = None
    session_type: str = "Normal"
    chap: tuple[str, str] | None = None
    header_digest: bool = False
    data_digest: bool = False
    max_recv_data_segment_length: int = 262144
    max_burst_length: int = 1 << 20
    first_burst_length: int = 262144
    immediate_data: bool = True
    initial_r2t: bool = False


class InitiatorLogin:
    """Initiator half of a login: `start()` gives the first request, `receive(rsp)` the next (or None)."""

    def __init__(self, config: InitiatorConfig, *, isid: bytes, tsih: int = 0, cid: int = 0, cmd_sn: int = 1, exp_stat_sn: int = 0, itt: int = 0) -> None:
        self.config = config
        self.isid = isid
        self.tsih = tsih
        self.cid = cid
        self.cmd_sn = cmd_sn
        self.exp_stat_sn = exp_stat_sn
        self.itt = itt
        self.params = SessionParams(max_recv_data_segment_length=config.max_recv_data_segment_length)
        self.stage = SECURITY if config.chap else OPERATIONAL
        self.offered: dict[str, str] = {}
        self.pending_text = bytearray()
        self.done = False
        self.exp_cmd_sn = cmd_sn
        self.max_cmd_sn = cmd_sn
        self.target_text: list[tuple[str, str]] = []

    def _request(self, transit: bool, csg: int, nsg: int, text: list[tuple[str, str]]) -> Pdu:
        req = Pdu.new(Op.LOGIN_REQ, login_flags(transit, csg, nsg), immediate=True, itt=self.itt, data=encode_text(text))
        req.bhs[2] = 0
        req.bhs[3] = 0
        req.bhs[8:14] = self.isid
        req.set_u16(14, self.tsih)
        req.set_u16(20, self.cid)
        req.set_u32(24, self.cmd_sn)
        req.set_u32(28, self.exp_stat_sn)
        return req

    def _operational_offer(self) -> list[tuple[str, str]]:
        c = self.config
        if c.session_type == "Discovery":
            offer = [("HeaderDigest", digest_name(c.header_digest)), ("DataDigest", digest_name(c.data_digest)), ("MaxRecvDataSegmentLength", str(c.max_recv_data_segment_length))]
        else:
            offer = [
                ("HeaderDigest", digest_name(c.header_digest)),
                ("DataDigest", digest_name(c.data_digest)),
                ("MaxConnections", "1"),
                ("InitialR2T", yes_no(c.initial_r2t)),
                ("ImmediateData", yes_no(c.immediate_data)),
                ("MaxRecvDataSegmentLength", str(c.max_recv_data_segment_length)),
                ("MaxBurstLength", str(c.max_burst_length)),
                ("FirstBurstLength", str(c.first_burst_length)),
                ("DefaultTime2Wait", "2"),
                ("DefaultTime2Retain", "0"),
                ("MaxOutstandingR2T", "1"),
                ("DataPDUInOrder", "Yes"),
                ("DataSequenceInOrder", "Yes"),
                ("ErrorRecoveryLevel", "0"),
                ("IFMarker", "No"),
                ("OFMarker", "No"),
            ]
        self.offered.update(offer)
        return offer

    def _identity(self) -> list[tuple[str, str]]:
        c = self.config
        text = [("InitiatorName", c.initiator_name), ("SessionType", c.session_type)]
        if c.session_type == "Normal":
            if not c.target_name:
                raise LoginError("a normal session needs a target name")
            text.append(("TargetName", c.target_name))
        return text

    def start(self) -> Pdu:
        if self.stage == SECURITY:
            return self._request(True, SECURITY, OPERATIONAL, self._identity() + [("AuthMethod", "CHAP,None")])
        return self._request(True, OPERATIONAL, FULL_FEATURE, self._identity() + self._operational_offer())

    def receive(self, rsp: Pdu) -> Pdu | None:
        if rsp.opcode != Op.LOGIN_RSP:
            raise LoginError(f"expected a Login Response, got {rsp.describe()}")
        status = (rsp.bhs[36] << 8) | rsp.bhs[37]
        self.exp_stat_sn = (rsp.u32(24) + 1) & 0xFFFFFFFF
        self.exp_cmd_sn = rsp.u32(28)
        self.max_cmd_sn = rsp.u32(32)
        if status != 0:
            text = dict(parse_text(rsp.data)) if rsp.data else {}
            where = f" (TargetAddress={text['TargetAddress']})" if "TargetAddress" in text else ""
            try:
                name = LoginStatus(status).name
            except ValueError:
                name = "UNKNOWN"
            raise LoginError(f"login failed: status 0x{status:04x} {name}{where}", status)
        flags = rsp.flags
        transit = bool(flags & F_TRANSIT)
        csg = (flags >> 2) & 3
        nsg = flags & 3
        self.pending_text += rsp.data
        if len(self.pending_text) > MAX_LOGIN_TEXT:
            raise LoginError("login response text too long")
        if flags & F_CONTINUE:
            return self._request(False, csg, csg, [])
        pairs = parse_text(bytes(self.pending_text))
        self.pending_text.clear()
        self.target_text.extend(pairs)
        reply: list[tuple[str, str]] = []
        got = dict(pairs)
        for key, value in pairs:
            if key in KEY_RULES:
                if key == "MaxRecvDataSegmentLength":
                    self.params.peer_max_recv_data_segment_length = number(key, value)
                elif value in ("Reject", "Irrelevant", "NotUnderstood"):
                    continue
                elif key in self.offered:
                    apply(self.params, key, value)
                else:
                    # The target offered a key we did not: answer it with the RFC rule.
                    _, default = KEY_RULES[key]
                    ours = {"HeaderDigest": "CRC32C,None" if self.config.header_digest else "None", "DataDigest": "CRC32C,None" if self.config.data_digest else "None"}.get(key, default)
                    result = negotiate(key, value, ours)
                    if result != "Reject":
                        apply(self.params, key, result)
                    reply.append((key, result))
        if csg == SECURITY:
            return self._security(got, transit, nsg, reply)
        if transit and nsg == FULL_FEATURE:
            if self.tsih == 0:
                self.tsih = rsp.u16(14)
            self.done = True
            self.params.first_burst_length = min(self.params.first_burst_length, self.params.max_burst_length)
            return None
        # The target did not transit yet: ask again (answering whatever it offered).
        return self._request(True, OPERATIONAL, FULL_FEATURE, reply)

    def _security(self, got: dict[str, str], transit: bool, nsg: int, reply: list[tuple[str, str]]) -> Pdu:
        chap = self.config.chap
        if transit and nsg == OPERATIONAL:
            self.stage = OPERATIONAL
            return self._request(True, OPERATIONAL, FULL_FEATURE, reply + self._operational_offer())
        if "CHAP_C" in got:
            assert chap is not None
            ident = int(got["CHAP_I"])
            challenge = chap_decode(got["CHAP_C"])
            resp = chap_response(ident, chap[1].encode(), challenge)
            return self._request(True, SECURITY, OPERATIONAL, [("CHAP_N", chap[0]), ("CHAP_R", "0x" + resp.hex())])
        if got.get("AuthMethod") == "CHAP":
            return self._request(False, SECURITY, SECURITY, [("CHAP_A", str(CHAP_MD5))])
        if got.get("AuthMethod") == "None":
            return self._request(True, SECURITY, OPERATIONAL, [])
        raise LoginError(f"unexpected security-stage response: {got}")
