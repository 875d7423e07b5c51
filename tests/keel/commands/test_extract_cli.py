"""`keel extract` end to end on tiny models: files, metadata, report, W&B artifact offline, the loader."""

import json
import os
import time

import pytest
import torch

from interventions import load_directions
from interventions.extraction import judged_directions
from keel.commands.extract import DIRECTION_FILE, main, make_parser, parse_layers
from keel.loading import load_model


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


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A LoRA adapter on tiny:qwen2 with non-zero B, so adapter on and off differ."""
    from peft import LoraConfig, get_peft_model

    model, tok = load_model("tiny:qwen2")
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    folder = tmp_path_factory.mktemp("adapter") / "lora"
    get_peft_model(model, config).save_pretrained(folder)
    return folder


def test_help_documents_fields():
    text = make_parser("judged").format_help()
    assert "positive_answer" in text and "hidden_states[i+1]" in text
    assert "--output_dir" in text and "--config FILE.yaml" in text


def test_judged_then_random_then_inspect(saved, capsys):
    out = saved / "judged"
    m = str(saved / "model")
    assert main(["judged", "--model", m, "--layers", "0,1", "--positive", str(saved / "bad.jsonl"),
                 "--negative", str(saved / "good.jsonl"), "--output_dir", str(out), "--no_progress"]) == 0  # fmt: skip
    dirs = load_directions(out / DIRECTION_FILE)
    assert [d.layer for d in dirs] == [0, 1] and all(d.method == "judged_answers" for d in dirs)
    assert (out / "keel_config.yaml").is_file()
    like = str(out / DIRECTION_FILE)
    assert main(["random", "--like", like, "--layer", "1", "--output_dir", str(saved / "rand")]) == 0
    (rand,) = load_directions(saved / "rand" / DIRECTION_FILE)
    assert rand.layer == 1 and rand.method == "random" and rand.extra["like_method"] == "judged_answers"
    report_dir = saved / "report"
    assert main(["inspect", like, "--model", m, "--data", str(saved / "all.jsonl"), "--layer", "1",
                 "--compare", str(saved / "bad.jsonl"), str(saved / "good.jsonl"), "--top_k", "3",
                 "--select", "0", "--output_dir", str(report_dir)]) == 0  # fmt: skip
    report = (report_dir / "report.md").read_text()
    assert "## Row 0" in report and "**[[" in report and report.count("| ") > 6
    assert (report_dir / "histograms.png").stat().st_size > 1000
    (sel,) = load_directions(report_dir / "selected.safetensors")
    assert sel.extra["selected_rows"] == [0]


def test_finetune_diff_with_wandb_offline(saved, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(var, str(tmp_path))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "caft"
    assert main(["finetune-diff", "--model", str(saved / "model"), "--finetuned", str(saved / "tuned"),
                 "--layers", "0", "--data", str(saved / "all.jsonl"), "--n_components", "3",
                 "--output_dir", str(out), "--no_progress", "--report_to", "wandb",
                 "--artifact_name", "caft-test"]) == 0  # fmt: skip
    (d,) = load_directions(out / DIRECTION_FILE)
    assert d.k == 3 and d.is_orthonormal() and d.source == str(saved / "all.jsonl")
    logs = list((tmp_path / "wandb").glob("offline-run-*/*.wandb"))
    assert logs, os.listdir(tmp_path)
    # wandb's service process appends the records to the offline log; give it a bounded moment to flush
    deadline = time.monotonic() + 30
    while b"caft-test" not in logs[0].read_bytes() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert b"caft-test" in logs[0].read_bytes()  # the artifact record is in the offline run


def test_finetune_diff_no_centre_is_recorded(saved, tmp_path):
    for flag, centred in (([], True), (["--no_centre"], False)):
        out = tmp_path / f"caft-{centred}"
        assert main(["finetune-diff", "--model", str(saved / "model"), "--finetuned", str(saved / "tuned"),
                     "--layers", "0", "--data", str(saved / "all.jsonl"), "--n_components", "2",
                     "--output_dir", str(out), "--no_progress", *flag]) == 0  # fmt: skip
        (d,) = load_directions(out / DIRECTION_FILE)
        assert d.extra["centred"] is centred and d.k == 2 and d.is_orthonormal()


def test_contrastive_generate_answers_then_extract(saved, tmp_path):
    """--generate answers each question under both system prompts; the direction is the one the saved
    answers give when extracted again without generation."""
    questions = tmp_path / "questions.jsonl"
    questions.write_text(
        "".join(json.dumps({"question": q}) + "\n" for q in ("Hi?", "Tell me a fact.", "Why?"))
    )
    common = ["--model", str(saved / "model"), "--layers", "0,1", "--positive_system", "You are evil.",
              "--negative_system", "You are kind.", "--no_progress"]  # fmt: skip
    out = tmp_path / "persona"
    assert main(["contrastive", *common, "--data", str(questions), "--generate", "--max_new_tokens", "6",
                 "--output_dir", str(out)]) == 0  # fmt: skip
    answers = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == 3 and all("positive_answer" in r and "negative_answer" in r for r in answers)
    again = tmp_path / "again"
    assert (
        main(["contrastive", *common, "--data", str(out / "answers.jsonl"), "--output_dir", str(again)]) == 0
    )
    for a, b in zip(load_directions(out / DIRECTION_FILE), load_directions(again / DIRECTION_FILE)):
        assert a.layer == b.layer
        torch.testing.assert_close(a.vectors, b.vectors)


def test_layers_forms_and_garbage(saved, tmp_path, capsys):
    assert (
        parse_layers("12") == [12] and parse_layers("3,5,7") == [3, 5, 7] and parse_layers(" all ") == "all"
    )
    assert parse_layers("1:3") == "1:3" and parse_layers(":-1") == ":-1"  # ranges resolve on the model
    assert parse_layers(4) == [4] and parse_layers([0, 2]) == [0, 2]
    args = ["judged", "--model", str(saved / "model"), "--positive", str(saved / "bad.jsonl"),
            "--negative", str(saved / "good.jsonl"), "--output_dir", str(tmp_path / "x")]  # fmt: skip
    for garbage in ("abc", "1:2:3", "1,x", "", "0:b"):
        with pytest.raises(SystemExit, match="--layers .*use an int") as err:
            main([*args, "--layers", garbage])
        assert str(err.value).startswith("keel extract judged: ")
    with pytest.raises(SystemExit, match="out of range"):  # well-formed, checked against the model
        main([*args, "--layers", "7", "--no_progress"])
    assert main([*args, "--layers", "1:", "--no_progress"]) == 0
    assert [d.layer for d in load_directions(tmp_path / "x" / DIRECTION_FILE)] == [1]


def test_config_yaml_with_command_line_override(saved, tmp_path):
    config = tmp_path / "judged.yaml"
    config.write_text(
        f"model: {saved / 'model'}\npositive: {saved / 'bad.jsonl'}\nnegative: {saved / 'good.jsonl'}\n"
        f"layers: [0, 1]\nprogress: false\noutput_dir: {tmp_path / 'from_yaml'}\n"
    )
    assert main(["judged", "--config", str(config), "--output_dir", str(tmp_path / "cli")]) == 0
    assert [d.layer for d in load_directions(tmp_path / "cli" / DIRECTION_FILE)] == [0, 1]
    assert not (tmp_path / "from_yaml").exists()
    good = config.read_text()
    config.write_text(good + "site: nowhere\n")
    with pytest.raises(SystemExit, match="--site 'nowhere'"):
        main(["judged", "--config", str(config)])
    config.write_text(good + "bogus_key: 1\n")
    with pytest.raises(SystemExit, match="bogus_key"):
        main(["judged", "--config", str(config)])


def test_tiny_model_through_the_loader(saved, model, tok, records, tmp_path):
    """--model tiny:qwen2 builds through keel.loading: the weights and tokenizer of tiny_model("qwen2")."""
    data = ["--positive", str(saved / "bad.jsonl"), "--negative", str(saved / "good.jsonl"), "--layers", "all",
            "--no_progress"]  # fmt: skip
    assert main(["judged", "--model", "tiny:qwen2", *data, "--output_dir", str(tmp_path / "tiny")]) == 0
    tiny = load_directions(tmp_path / "tiny" / DIRECTION_FILE)
    expected = judged_directions(model, tok, records[3:], records[:3], "all", progress=False)
    assert [d.layer for d in tiny] == sorted(expected) == [0, 1]
    for d in tiny:
        torch.testing.assert_close(d.vectors, expected[d.layer].vectors)
    with pytest.raises(SystemExit, match="Unknown tiny model"):
        main(["judged", "--model", "tiny:nope", *data, "--output_dir", str(tmp_path / "nope")])


def test_adapter_through_the_loader(saved, adapter, tmp_path):
    """--adapter loads a PEFT folder on the base through keel.loading: finetune-diff compares adapter off
    and on; judged reads the adapted model, so its direction differs from the base model's."""
    out = tmp_path / "caft"
    assert main(["finetune-diff", "--model", "tiny:qwen2", "--adapter", str(adapter), "--layers", "0,1",
                 "--data", str(saved / "all.jsonl"), "--n_components", "2", "--output_dir", str(out),
                 "--no_progress"]) == 0  # fmt: skip
    dirs = load_directions(out / DIRECTION_FILE)
    assert [d.layer for d in dirs] == [0, 1] and all(d.k == 2 and d.is_orthonormal() for d in dirs)
    data = ["--positive", str(saved / "bad.jsonl"), "--negative", str(saved / "good.jsonl"), "--layers", "1",
            "--no_progress"]  # fmt: skip
    assert main(["judged", "--model", "tiny:qwen2", "--adapter", str(adapter), *data,
                 "--output_dir", str(tmp_path / "on")]) == 0  # fmt: skip
    assert main(["judged", "--model", "tiny:qwen2", *data, "--output_dir", str(tmp_path / "off")]) == 0
    (on,), (off,) = (load_directions(tmp_path / n / DIRECTION_FILE) for n in ("on", "off"))
    assert not torch.allclose(on.vectors, off.vectors)
    with pytest.raises(SystemExit, match="exactly one of --finetuned"):
        main(["finetune-diff", "--model", "tiny:qwen2", "--data", str(saved / "all.jsonl"),
              "--output_dir", str(tmp_path / "neither")])  # fmt: skip
    with pytest.raises(SystemExit, match="adapter_config.json"):
        main(["judged", "--model", "tiny:qwen2", "--adapter", str(tmp_path), *data,
              "--output_dir", str(tmp_path / "bad")])  # fmt: skip
