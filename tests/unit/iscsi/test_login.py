"""Login state machines: target and initiator driven against each other in memory (sans-IO)."""

from __future__ import annotations

import itertools

import pytest

from iscsi.keys import TargetPrefs
from iscsi.login import (
    InitiatorConfig,
    InitiatorLogin,
    LoginConfig,
    LoginError,
    LoginStatus,
    TargetLogin,
    chap_response,
)
from iscsi.pdu import Op, Pdu, PduReader, encode_text, parse_text

IQN = "iqn.2024-01.test:disk"


def run_login(tcfg: LoginConfig, icfg: InitiatorConfig) -> tuple[InitiatorLogin, TargetLogin, list[Pdu]]:
    tsih = itertools.count(1)
    target = TargetLogin(tcfg, lambda: next(tsih))
    ini = InitiatorLogin(icfg, isid=b"\x80\x01\x02\x03\x04\x05", cmd_sn=10)
    req = ini.start()
    responses = []
    for _ in range(10):
        # through the real byte encoding both ways
        r = PduReader()
        r.feed(req.encode())
        rsp, close = target.receive(r.next())
        r.feed(rsp.encode())
        rsp = r.next()
        responses.append(rsp)
        if close:
            ini.receive(rsp)  # raises LoginError with the status
        req = ini.receive(rsp)
        if req is None:
            return ini, target, responses
    raise AssertionError("login did not finish")


def test_login_without_security_stage_answers_every_key() -> None:
    ini, target, rsps = run_login(LoginConfig(IQN), InitiatorConfig(target_name=IQN))
    assert ini.done and target.result is not None
    assert target.result.tsih == ini.tsih == 1
    assert target.result.cmd_sn == 10  # the login's CmdSN is the first command's
    answered = {k for k, _ in ini.target_text}
    assert set(ini.offered) <= answered  # libiscsi applies no defaults: every key answered
    assert "TargetPortalGroupTag" in answered
    assert rsps[-1].flags & 0x80 and rsps[-1].flags & 0x03 == 3


def test_digest_negotiation_follows_the_offer() -> None:
    ini, target, _ = run_login(LoginConfig(IQN), InitiatorConfig(target_name=IQN, header_digest=True, data_digest=True))
    assert ini.params.header_digest and ini.params.data_digest
    assert target.result.params.header_digest and target.result.params.data_digest


def test_chap() -> None:
    tcfg = LoginConfig(IQN, chap=("alice", "secret-secret"))
    ini, target, rsps = run_login(tcfg, InitiatorConfig(target_name=IQN, chap=("alice", "secret-secret")))
    assert ini.done and target.authenticated
    assert len(rsps) >= 3  # AuthMethod, CHAP challenge, CHAP answer, operational
    with pytest.raises(LoginError) as e:
        run_login(tcfg, InitiatorConfig(target_name=IQN, chap=("alice", "wrong-secret!")))
    assert e.value.status == LoginStatus.AUTHENTICATION_FAILURE
    with pytest.raises(LoginError) as e:  # no CHAP at all when the target requires it
        run_login(tcfg, InitiatorConfig(target_name=IQN))
    assert e.value.status == LoginStatus.AUTHENTICATION_FAILURE


def test_chap_response_is_md5_of_id_secret_challenge() -> None:
    import hashlib

    assert chap_response(7, b"s", b"c") == hashlib.md5(b"\x07sc").digest()


@pytest.mark.parametrize(
    "icfg,tcfg,status",
    [
        (InitiatorConfig(target_name="iqn.2024-01.test:nope"), LoginConfig(IQN), LoginStatus.NOT_FOUND),
        (InitiatorConfig(target_name=IQN, initiator_name="iqn.x:evil"), LoginConfig(IQN, allow_initiators=frozenset({"iqn.x:good"})), LoginStatus.AUTHORIZATION_FAILURE),
    ],
)
def test_refusals(icfg: InitiatorConfig, tcfg: LoginConfig, status: int) -> None:
    with pytest.raises(LoginError) as e:
        run_login(tcfg, icfg)
    assert e.value.status == status


def test_discovery_needs_no_target_name() -> None:
    ini, target, _ = run_login(LoginConfig(IQN), InitiatorConfig(session_type="Discovery"))
    assert target.result.session_type == "Discovery"


def _req(text: dict[str, str], flags: int = 0x87) -> Pdu:
    p = Pdu.new(Op.LOGIN_REQ, flags, immediate=True, itt=1, data=encode_text(text))
    p.bhs[8:14] = b"\x80abcde"
    return p


def test_target_rejects_bad_logins() -> None:
    target = TargetLogin(LoginConfig(IQN), lambda: 1)
    rsp, close = target.receive(_req({"SessionType": "Normal", "TargetName": IQN}))  # no InitiatorName
    assert close and (rsp.bhs[36], rsp.bhs[37]) == (2, 7)
    target = TargetLogin(LoginConfig(IQN), lambda: 1)
    rsp, close = target.receive(Pdu.new(Op.SCSI_CMD, 0x80))  # not a login at all
    assert close and rsp.bhs[36] == 2
    target = TargetLogin(LoginConfig(IQN), lambda: 1)
    bad = _req({"InitiatorName": "iqn.x:y", "TargetName": IQN}, flags=0x80 | (1 << 2) | 2)  # NSG 2 is reserved
    rsp, close = target.receive(bad)
    assert close and rsp.bhs[36] == 2


def test_unknown_keys_get_notunderstood_and_continuation_is_bounded() -> None:
    target = TargetLogin(LoginConfig(IQN), lambda: 1)
    rsp, close = target.receive(_req({"InitiatorName": "iqn.x:y", "TargetName": IQN, "X-Vendor": "1", "MaxBurstLength": "4096"}))
    answers = dict(parse_text(rsp.data))
    assert not close and answers["X-Vendor"] == "NotUnderstood" and answers["MaxBurstLength"] == "4096"
    target = TargetLogin(LoginConfig(IQN), lambda: 1)
    chunk = _req({"X-Pad": "a" * 8000}, flags=0x40 | (1 << 2))  # C bit: more text follows
    for _ in range(12):
        rsp, close = target.receive(chunk)
        if close:
            break
    assert close and (rsp.bhs[36], rsp.bhs[37]) == (3, 2)  # out of resources, not unbounded buffering


def test_target_prefs_bound_burst_lengths() -> None:
    prefs = TargetPrefs(max_burst_length=65536, first_burst_length=65536)
    ini, target, _ = run_login(LoginConfig(IQN, prefs=prefs), InitiatorConfig(target_name=IQN))
    assert ini.params.max_burst_length == target.result.params.max_burst_length == 65536
    assert ini.params.first_burst_length <= ini.params.max_burst_length


@pytest.mark.parametrize("name", [b"iqn.2024-01.test:\xff\xfe", b"iqn.2024-01.test:\xc3"])  # invalid, truncated
def test_initiator_name_that_is_not_utf8_is_an_initiator_error(name: bytes) -> None:
    target = TargetLogin(LoginConfig(IQN), lambda: 1)
    req = _req({})
    req.data = b"InitiatorName=" + name + b"\0" + encode_text({"TargetName": IQN, "HeaderDigest": "None"})
    rsp, close = target.receive(req)
    assert close and (rsp.bhs[36], rsp.bhs[37]) == (0x02, 0x00)  # INITIATOR ERROR
    assert target.result is None
