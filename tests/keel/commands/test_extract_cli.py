"""`keel extract` end to end on a tiny saved model: files, metadata, report, W&B artifact offline."""

import json
import os
import time

import pytest
import torch

from interventions import load_directions
from keel.commands.extract import main, make_parser


@pytest.fixture(scope="module")
def saved(tmp_path_factory, model, tok, records):
    root = tmp_path_factory.mktemp("cli")
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    tuned = type(model)(model.config)
    tuned.load_state_dict(model.state_dict())
    with torch.no_grad():
        tuned.model.layers[0].mlp.down_proj.weight.add_(
            0.5 * torch.randn_like(tuned.model.layers[0].mlp.down_proj.weight)
        )
    tuned.save_pretrained(root / "tuned")
    for name, rows in (("good", records[:3]), ("bad", records[3:]), ("all", records)):
        (root / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root


def test_help_documents_fields():
    text = make_parser().format_help()
    assert "positive_answer" in text and "hidden_states[i+1]" in text


def test_judged_then_random_then_inspect(saved, capsys):
    out = saved / "judged.safetensors"
    m = str(saved / "model")
    assert main(["judged", "--model", m, "--layers", "0,1", "--positive", str(saved / "bad.jsonl"),
                 "--negative", str(saved / "good.jsonl"), "--out", str(out), "--no-progress"]) == 0  # fmt: skip
    dirs = load_directions(out)
    assert [d.layer for d in dirs] == [0, 1] and all(d.method == "judged_answers" for d in dirs)
    assert main(["random", "--like", str(out), "--layer", "1", "--out", str(saved / "rand")]) == 0
    (rand,) = load_directions(saved / "rand")
    assert rand.layer == 1 and rand.method == "random" and rand.extra["like_method"] == "judged_answers"
    report_dir = saved / "report"
    assert main(["inspect", str(out), "--model", m, "--data", str(saved / "all.jsonl"), "--layer", "1",
                 "--compare", str(saved / "bad.jsonl"), str(saved / "good.jsonl"), "--top-k", "3",
                 "--select", "0", "--save-selected", str(saved / "sel"), "--out", str(report_dir)]) == 0  # fmt: skip
    report = (report_dir / "report.md").read_text()
    assert "## Row 0" in report and "**[[" in report and report.count("| ") > 6
    assert (report_dir / "histograms.png").stat().st_size > 1000
    (sel,) = load_directions(saved / "sel")
    assert sel.extra["selected_rows"] == [0]


def test_finetune_diff_with_wandb_offline(saved, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(var, str(tmp_path))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "caft.safetensors"
    assert main(["finetune-diff", "--model", str(saved / "model"), "--finetuned", str(saved / "tuned"),
                 "--layers", "0", "--data", str(saved / "all.jsonl"), "--n-components", "3", "--out", str(out),
                 "--no-progress", "--report-to", "wandb", "--artifact-name", "caft-test"]) == 0  # fmt: skip
    (d,) = load_directions(out)
    assert d.k == 3 and d.is_orthonormal() and d.source == str(saved / "all.jsonl")
    logs = list((tmp_path / "wandb").glob("offline-run-*/*.wandb"))
    assert logs, os.listdir(tmp_path)
    # wandb's service process appends the records to the offline log; give it a bounded moment to flush
    deadline = time.monotonic() + 30
    while b"caft-test" not in logs[0].read_bytes() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert b"caft-test" in logs[0].read_bytes()  # the artifact record is in the offline run


def test_finetune_diff_no_centre_is_recorded(saved, tmp_path):
    for flag, centred in (([], True), (["--no-centre"], False)):
        out = tmp_path / f"caft-{centred}.safetensors"
        assert main(["finetune-diff", "--model", str(saved / "model"), "--finetuned", str(saved / "tuned"),
                     "--layers", "0", "--data", str(saved / "all.jsonl"), "--n-components", "2", "--out", str(out),
                     "--no-progress", *flag]) == 0  # fmt: skip
        (d,) = load_directions(out)
        assert d.extra["centred"] is centred and d.k == 2 and d.is_orthonormal()


def test_contrastive_generate_answers_then_extract(saved, tmp_path):
    """--generate answers each question under both system prompts; the direction is the one the saved
    answers give when extracted again without generation."""
    questions = tmp_path / "questions.jsonl"
    questions.write_text(
        "".join(json.dumps({"question": q}) + "\n" for q in ("Hi?", "Tell me a fact.", "Why?"))
    )
    common = ["--model", str(saved / "model"), "--layers", "0,1", "--positive-system", "You are evil.",
              "--negative-system", "You are kind.", "--no-progress"]  # fmt: skip
    out = tmp_path / "persona.safetensors"
    assert main(["contrastive", *common, "--data", str(questions), "--generate", "--max-new-tokens", "6",
                 "--out", str(out)]) == 0  # fmt: skip
    answers = [json.loads(line) for line in out.with_suffix(".answers.jsonl").read_text().splitlines()]
    assert len(answers) == 3 and all("positive_answer" in r and "negative_answer" in r for r in answers)
    again = tmp_path / "again.safetensors"
    assert (
        main(["contrastive", *common, "--data", str(out.with_suffix(".answers.jsonl")), "--out", str(again)])
        == 0
    )
    for a, b in zip(load_directions(out), load_directions(again)):
        assert a.layer == b.layer
        torch.testing.assert_close(a.vectors, b.vectors)
