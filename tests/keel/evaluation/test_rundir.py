"""The evaluation run folder: status file, resume rule, refusals, atomic writes."""

from __future__ import annotations

import json
import os

import pytest

from keel.evaluation.rundir import Resume, RunFolder, RunFolderError, atomic_write_text, sha256_text

GEN = {"model": "m", "temperature": 1.0, "questions_sha256": "q"}
JUDGING = {"judge": "openai:j", "base_url": "http://x/v1", "judge_prompts_sha256": None}


def finished_run(path, gen=GEN, judging=JUDGING, answers="a\n"):
    folder = RunFolder(path)
    assert folder.check(gen, judging) == Resume()
    folder.start({"generation": gen, "judging": judging}, Resume(), keep_answers=False)
    (path / "answers.jsonl").write_text(answers)
    folder.update(answers=folder.answers_record(), stage="judging")
    (path / "metrics.json").write_text("{}")
    folder.complete(["answers.jsonl", "metrics.json"])
    return folder


def test_status_records_run_and_resume_reuses_answers(tmp_path):
    finished_run(tmp_path)
    st = json.loads((tmp_path / "status.json").read_text())
    assert st["state"] == "done" and st["schema"] == 1 and st["pid"] == os.getpid()
    assert st["answers"] == {"file": "answers.jsonl", "n": 1, "sha256": sha256_text("a\n")}
    folder = RunFolder(tmp_path)
    resume = folder.check(GEN, JUDGING)
    assert resume.attempt == 2 and resume.previous_state == "done" and folder.reusable_answers(resume)
    folder.start({"generation": GEN, "judging": JUDGING}, resume, keep_answers=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["answers.jsonl", "status.json"]  # old metrics gone
    folder.fail("boom")
    st = json.loads((tmp_path / "status.json").read_text())
    assert (st["state"], st["error"], st["attempt"], st["resumed_from"]) == ("failed", "boom", 2, "done")
    (tmp_path / "answers.jsonl").write_text("edited\n")
    assert not RunFolder(tmp_path).reusable_answers(RunFolder(tmp_path).check(GEN, JUDGING))


def test_refusals_name_what_differs(tmp_path):
    finished_run(tmp_path)
    with pytest.raises(
        RunFolderError, match=r"another configuration \(answers differ: temperature: 1.0 -> 0.0\)"
    ):
        RunFolder(tmp_path).check({**GEN, "temperature": 0.0}, JUDGING)
    with pytest.raises(RunFolderError, match=r"judged otherwise \(judge: 'openai:j' -> 'openai:k'\)"):
        RunFolder(tmp_path).check(GEN, {**JUDGING, "judge": "openai:k"})
    # Re-scoring the run's own answers (by sha256) is the same run; judging it after a generate-only run too.
    resume = RunFolder(tmp_path).check({"answers_sha256": sha256_text("a\n")}, JUDGING, sha256_text("a\n"))
    assert resume.generation == GEN and resume.answers_sha256 is None
    assert RunFolder(tmp_path).check({**GEN, "temperature": 0.0}, JUDGING, overwrite=True) == Resume()
    gen_only = tmp_path / "gen_only"
    finished_run(gen_only, judging=None)
    assert RunFolder(gen_only).check(GEN, JUDGING).attempt == 2


def test_live_writer_and_foreign_folders_are_refused(tmp_path):
    folder = finished_run(tmp_path)
    folder.update(state="running", pid=os.getppid())  # another live process on this host
    with pytest.raises(RunFolderError, match="is in use"):
        RunFolder(tmp_path).check(GEN, JUDGING)
    (tmp_path / "status.json").write_text(json.dumps({"state": "done"}))  # e.g. a sweep's status file
    with pytest.raises(RunFolderError, match="not a keel eval status file"):
        RunFolder(tmp_path).check(GEN, JUDGING)
    (tmp_path / "status.json").unlink()
    with pytest.raises(RunFolderError, match="holds answers.jsonl, metrics.json but no status.json"):
        RunFolder(tmp_path).check(GEN, JUDGING)


def test_atomic_write_leaves_no_temporary_file(tmp_path):
    atomic_write_text(tmp_path / "f.json", "1")
    atomic_write_text(tmp_path / "f.json", "2")
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"] and (tmp_path / "f.json").read_text() == "2"
