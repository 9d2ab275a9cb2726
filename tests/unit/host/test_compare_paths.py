"""`netswap compare` finds a run's timeline however the run wrote its path: as given (relative
to where the run started), relative to the result's folder, or beside the result."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from emu.host.compare import _timeline_of

SAMPLE = {"t": 0.5, "nr_free": 100.0}


@pytest.mark.parametrize("where", ["runs/x-timeline.jsonl", "x-timeline.jsonl"])
def test_timeline_found_from_another_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    run_dir = tmp_path / "started-here"
    (run_dir / "runs").mkdir(parents=True)
    (run_dir / where).write_text(json.dumps(SAMPLE) + "\n")
    result = run_dir / "a.json"
    result.write_text(json.dumps({"files": {"timeline_jsonl": where}}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert _timeline_of(str(result), json.loads(result.read_text())) == [SAMPLE]


def test_no_timeline_is_none(tmp_path: Path) -> None:
    result = tmp_path / "a.json"
    assert _timeline_of(str(result), {"files": {"timeline_jsonl": "runs/gone.jsonl"}}) is None
    assert _timeline_of(str(result), {}) is None
