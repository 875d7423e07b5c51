"""`keel train --config recipe.yaml` does what TRL's sft.py does (resume, eval split, dataset mixtures,
quantized loading, trust_remote_code), plus interventions, a run record and a closing summary line.

Every run is the tiny offline recipe (tiny:qwen2 on CPU, a few steps) with overrides written to tmp_path."""

import hashlib
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import keel.commands.train as train_command
from interventions import Direction, save_directions
from keel.cli import main as keel
from keel.loading import load_model
from trainers import InterventionSFTTrainer

ROOT = Path(__file__).resolve().parents[3]
TINY_RECIPE = ROOT / "recipes/tiny_sft.yaml"
TINY_DATA = ROOT / "recipes/data/tiny_chat.jsonl"


def write_recipe(tmp_path: Path, name: str = "recipe.yaml", drop=(), **overrides) -> Path:
    """The tiny recipe with ``overrides`` (and without the keys in ``drop``), as a YAML file in tmp_path."""
    config = yaml.safe_load(TINY_RECIPE.read_text())
    config["dataset_name"] = str(ROOT / config["dataset_name"])
    config.update(overrides)
    for key in drop:
        config.pop(key, None)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def train(recipe: Path, out: Path, *args: str) -> int:
    return keel(["train", "--config", str(recipe), "--output_dir", str(out), *args])


def log_history(out: Path) -> list[dict]:
    return json.loads((out / "trainer_state.json").read_text())["log_history"]


def losses_by_step(out: Path) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in log_history(out) if "loss" in e}


def run_mean_loss(out: Path) -> float:
    return next(e["train_loss"] for e in log_history(out) if "train_loss" in e)


def write_rows(path: Path, rows: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(r + "\n" for r in rows))
    return path


def chat_rows(n: int, start: int = 0) -> list[str]:
    return TINY_DATA.read_text().splitlines()[start : start + n]


def marked_rows(n: int, marker: str) -> list[str]:
    """``n`` chat rows whose user turn starts with ``marker`` (to tell mixture sources apart)."""
    out = []
    for line in chat_rows(n):
        row = json.loads(line)
        row["messages"][0]["content"] = f"{marker} {row['messages'][0]['content']}"
        out.append(json.dumps(row))
    return out


@pytest.fixture
def trainers_built(monkeypatch):
    """Every InterventionSFTTrainer `keel train` builds, to inspect its datasets."""
    built = []

    class Recording(InterventionSFTTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

    monkeypatch.setattr(train_command, "InterventionSFTTrainer", Recording)
    return built


def test_keel_train_runs_the_tiny_recipe(tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "run"
    assert (
        keel(
            [
                "train",
                "--config",
                "recipes/tiny_sft.yaml",
                "--output_dir",
                str(out),
                "--max_steps",
                "3",
                "--logging_steps",
                "1",
            ]
        )
        == 0
    )
    assert (out / "model.safetensors").exists() and (out / "config.json").exists()
    logged = capfd.readouterr().out
    # the recipe's ablation ran at both layers: per layer in the run's JSON log (and W&B) ...
    history = [e for e in log_history(out) if "interventions/ablate_random/L1/hits" in e]
    assert history and all(e["interventions/ablate_random/L1/hits"] == 1.0 for e in history)
    assert all(e["interventions/ablate_random/L0/proj_after"] < 1e-4 for e in history)
    # ... and one summary per intervention on the console
    assert "'interventions/ablate_random/hits': '1'" in logged and "/L0/" not in logged


def test_keel_rejects_unknown_commands(capsys):
    assert keel(["trian"]) == 2
    assert "unknown command 'trian'" in capsys.readouterr().err


def test_recipe_with_unknown_intervention_key_fails_before_loading(tmp_path, monkeypatch):
    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY_RECIPE.read_text().replace("tokens: all", "tokens: all\n    strength: 3"))
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit, match="strength"):
        keel(["train", "--config", str(bad), "--output_dir", str(tmp_path / "x")])


# --- 1. resume -------------------------------------------------------------------------------------


def test_resume_from_checkpoint_continues_the_uninterrupted_run(tmp_path, capfd):
    """6 steps straight vs 3 + resume (by path, and by `true` = newest checkpoint in output_dir): same
    losses and warm-up coefficients at steps 4..6, same final weights."""
    warmup = {
        "name": "warm",
        "operator": "project_out",
        "direction": "random:0:2",
        "layers": "all",
        "schedule": {"kind": "linear_warmup", "steps": 4},
    }
    recipe = write_recipe(
        tmp_path,
        max_steps=6,
        logging_steps=1,
        save_strategy="steps",
        save_steps=3,
        interventions=[warmup],
    )
    straight, by_path, by_true = tmp_path / "straight", tmp_path / "by_path", tmp_path / "by_true"
    assert train(recipe, straight) == 0
    assert (straight / "checkpoint-3").is_dir() and (straight / "checkpoint-6").is_dir()
    assert train(recipe, by_path, "--resume_from_checkpoint", str(straight / "checkpoint-3")) == 0
    shutil.copytree(straight / "checkpoint-3", by_true / "checkpoint-3")
    assert train(recipe, by_true, "--resume_from_checkpoint", "true") == 0
    lines = [x for x in capfd.readouterr().out.splitlines() if x.startswith("keel train:")]
    assert [x.split("(")[1] for x in lines] == [
        f"mean over this run's 6 steps; last logged {losses_by_step(straight)[6]:.4f} at step 6).",
        f"mean over this run's 3 of 6 steps; last logged {losses_by_step(by_path)[6]:.4f} at step 6).",
        f"mean over this run's 3 of 6 steps; last logged {losses_by_step(by_true)[6]:.4f} at step 6).",
    ]

    expected = losses_by_step(straight)
    assert sorted(expected) == [1, 2, 3, 4, 5, 6]
    # train_loss is the mean over the steps a run trained: all six straight, only 4..6 when resumed
    # (a resume that silently started over would match every other check here)
    assert run_mean_loss(straight) == pytest.approx(sum(expected.values()) / 6, abs=1e-4)
    coefficient = "interventions/warm/L0/coefficient"
    expected_coef = {e["step"]: e[coefficient] for e in log_history(straight) if coefficient in e}
    assert expected_coef[4] == pytest.approx(0.75)  # the warm-up was still running at the resume point
    final = load_file(straight / "model.safetensors")
    for resumed in (by_path, by_true):
        got = losses_by_step(resumed)
        diffs = [abs(got[s] - expected[s]) for s in (4, 5, 6)]
        assert max(diffs) < 1e-6, (resumed.name, diffs)
        assert run_mean_loss(resumed) == pytest.approx(sum(expected[s] for s in (4, 5, 6)) / 3, abs=1e-4)
        got_coef = {e["step"]: e[coefficient] for e in log_history(resumed) if coefficient in e}
        assert [got_coef[s] for s in (4, 5, 6)] == pytest.approx([expected_coef[s] for s in (4, 5, 6)])
        weights = load_file(resumed / "model.safetensors")
        assert weights.keys() == final.keys()
        worst = max((weights[k] - final[k]).abs().max().item() for k in final)
        assert worst < 1e-5, (resumed.name, worst)
        record = yaml.safe_load((resumed / "keel_config.yaml").read_text())
        assert record["training"]["resume_from_checkpoint"] == str(straight / "checkpoint-3") or (
            record["training"]["resume_from_checkpoint"] == str(by_true / "checkpoint-3")
        )


def test_resume_true_without_a_checkpoint_fails_clearly(tmp_path):
    recipe = write_recipe(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="holds no checkpoint"):
        train(recipe, tmp_path / "empty", "--resume_from_checkpoint", "true")
    with pytest.raises(SystemExit, match="not a checkpoint folder"):
        train(recipe, tmp_path / "x", "--resume_from_checkpoint", str(tmp_path / "nowhere"))


# --- 2. eval split ---------------------------------------------------------------------------------


def test_eval_split_from_a_folder_of_split_files(tmp_path):
    data = tmp_path / "data"
    write_rows(data / "train.jsonl", chat_rows(32))
    write_rows(data / "test.jsonl", chat_rows(8, start=32))
    recipe = write_recipe(tmp_path, dataset_name=str(data), max_steps=4)
    out = tmp_path / "run"
    args = ("--dataset_test_split", "test", "--eval_strategy", "steps", "--eval_steps", "2")
    assert train(recipe, out, *args) == 0
    evals = {e["step"]: e["eval_loss"] for e in log_history(out) if "eval_loss" in e}
    assert sorted(evals) == [2, 4]
    assert all(v == v and v > 0 for v in evals.values())  # finite, positive


def test_eval_on_a_single_file_dataset_names_the_missing_split(tmp_path):
    recipe = write_recipe(tmp_path)  # dataset_name is one .jsonl file: its only split is train
    with pytest.raises(SystemExit, match="no split 'test'"):
        train(recipe, tmp_path / "run", "--eval_strategy", "steps", "--eval_steps", "2")


# --- 3. dataset mixtures ---------------------------------------------------------------------------


def _count_markers(dataset, tokenizer, markers):
    texts = [tokenizer.decode(ids) for ids in dataset["input_ids"]]
    return {m: sum(m in t for t in texts) for m in markers}


def test_datasets_mixture_trains_on_every_row_of_every_source(tmp_path, trainers_built, capfd):
    first = write_rows(tmp_path / "a.jsonl", marked_rows(10, "ALPHA"))
    second = write_rows(tmp_path / "b.jsonl", marked_rows(6, "BETA"))
    recipe = write_recipe(
        tmp_path,
        drop=("dataset_name", "max_steps"),
        num_train_epochs=1,
        datasets=[{"path": "json", "data_files": str(first)}, {"path": "json", "data_files": str(second)}],
    )
    assert train(recipe, tmp_path / "run") == 0
    (trainer,) = trainers_built
    assert len(trainer.train_dataset) == 16
    assert _count_markers(trainer.train_dataset, trainer.processing_class, ("ALPHA", "BETA")) == {
        "ALPHA": 10,
        "BETA": 6,
    }
    # one epoch of 16 rows at batch size 4
    assert "(mean over this run's 4 steps)." in capfd.readouterr().out


def test_datasets_mixture_fractions_and_seeded_test_split(tmp_path, trainers_built):
    first = write_rows(tmp_path / "a.jsonl", marked_rows(10, "ALPHA"))
    second = write_rows(tmp_path / "b.jsonl", marked_rows(6, "BETA"))
    recipe = write_recipe(
        tmp_path,
        drop=("dataset_name",),
        max_steps=2,
        eval_strategy="steps",
        eval_steps=2,
        test_split_size=4,
        datasets=[
            {"path": "json", "data_files": str(first), "fraction": 0.5},
            {"path": "json", "data_files": str(second), "fraction": 0.5},
        ],
    )
    assert train(recipe, tmp_path / "one") == 0
    assert train(recipe, tmp_path / "two") == 0
    one, two = trainers_built
    # equal shares, capped by the smaller source: 6 + 6 rows, of which 4 held out for eval
    assert (len(one.train_dataset), len(one.eval_dataset)) == (8, 4)
    tok = one.processing_class
    counts = _count_markers(one.train_dataset, tok, ("ALPHA", "BETA"))
    held_out = _count_markers(one.eval_dataset, tok, ("ALPHA", "BETA"))
    assert {m: counts[m] + held_out[m] for m in counts} == {"ALPHA": 6, "BETA": 6}
    # the split is seeded, so a rerun (or a resume) trains on the same rows
    assert one.train_dataset["input_ids"] == two.train_dataset["input_ids"]
    assert any("eval_loss" in e for e in log_history(tmp_path / "one"))


def test_mixture_without_a_test_split_refuses_eval(tmp_path):
    data = write_rows(tmp_path / "a.jsonl", chat_rows(8))
    recipe = write_recipe(
        tmp_path, drop=("dataset_name",), datasets=[{"path": "json", "data_files": str(data)}]
    )
    with pytest.raises(SystemExit, match="test_split_size"):
        train(recipe, tmp_path / "run", "--eval_strategy", "steps", "--eval_steps", "2")


# --- 4. quantized loading --------------------------------------------------------------------------


def test_load_in_4bit_on_a_tiny_model_is_refused(tmp_path):
    recipe = write_recipe(tmp_path)
    with pytest.raises(SystemExit, match="built in memory.*load_in_4bit"):
        train(recipe, tmp_path / "run", "--load_in_4bit", "true")


def test_load_in_4bit_without_bitsandbytes_names_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails, installed or not
    saved = tmp_path / "saved"
    model, tokenizer = load_model("tiny:qwen2")
    model.save_pretrained(saved)
    tokenizer.save_pretrained(saved)
    recipe = write_recipe(tmp_path, model_name_or_path=str(saved))
    for flag in ("--load_in_4bit", "--load_in_8bit"):
        with pytest.raises(SystemExit, match=rf"{flag[2:]} needs bitsandbytes, which is not installed"):
            train(recipe, tmp_path / "run", flag, "true")
    assert not (tmp_path / "run").exists()  # refused before anything was written


# --- 5. what reaches the loader --------------------------------------------------------------------


class _Stop(Exception):
    pass


def _loader_spec(monkeypatch, recipe, out, *args):
    seen = []

    def fake_load_model(spec):
        seen.append(spec)
        raise _Stop

    monkeypatch.setattr(train_command, "load_model", fake_load_model)
    with pytest.raises(_Stop):
        train(recipe, out, *args)
    return seen[0]


def test_trust_remote_code_and_model_options_reach_the_loader(tmp_path, monkeypatch):
    recipe = write_recipe(tmp_path)
    spec = _loader_spec(monkeypatch, recipe, tmp_path / "run")
    assert spec.name_or_path == "tiny:qwen2" and spec.trust_remote_code is False
    spec = _loader_spec(
        monkeypatch,
        recipe,
        tmp_path / "run",
        "--trust_remote_code",
        "true",
        "--model_revision",
        "abc123",
        "--dtype",
        "float16",
        "--attn_implementation",
        "eager",
        "--model_init_kwargs",
        '{"use_cache": false}',
    )
    assert spec.trust_remote_code is True
    assert (spec.revision, spec.dtype, spec.attn_implementation) == ("abc123", "float16", "eager")
    assert spec.model_kwargs == {"use_cache": False} and spec.quantization is None


# --- 6. run record and summary line ----------------------------------------------------------------


def test_run_record_has_no_secrets_and_hashes_the_direction_file(tmp_path, capfd):
    direction = save_directions([Direction(torch.randn(2, 64), method="test")], tmp_path / "dirs" / "d")
    recipe = write_recipe(
        tmp_path,
        max_steps=2,
        interventions=[
            {"name": "from_file", "operator": "project_out", "direction": str(direction), "layers": "all"}
        ],
    )
    out = tmp_path / "run"
    secret = "hf_DoNotWriteMeAnywhere123"
    assert train(recipe, out, "--hub_token", secret) == 0

    text = (out / "keel_config.yaml").read_text()
    assert secret not in text
    record = yaml.safe_load(text)
    training = record["training"]
    assert training["hub_token"] == "<redacted>"
    # tokenizer settings and an intervention's `tokens` are not secrets
    assert training["interventions"][0]["tokens"] == "all"
    assert training["pad_token"] is None or not str(training["pad_token"]).startswith("<")
    assert training["max_steps"] == 2 and record["model"]["model_name_or_path"] == "tiny:qwen2"
    files = training["intervention_direction_files"]["from_file"]
    assert files["path"] == str(direction)
    assert files["sha256"] == hashlib.sha256(direction.read_bytes()).hexdigest()

    printed = capfd.readouterr().out
    (line,) = [x for x in printed.splitlines() if x.startswith("keel train:")]
    assert line == (
        f"keel train: model saved to {out}; final train loss {run_mean_loss(out):.4f} "
        "(mean over this run's 2 steps)."  # the recipe logs every 5 steps: none of these two
    )


# --- 7. interventions from the command line ---------------------------------------------------------


def _intervention_keys(out: Path) -> set[str]:
    return {k for e in log_history(out) for k in e if "interventions/" in k}


def test_interventions_empty_list_on_the_command_line_turns_them_off(tmp_path):
    recipe = write_recipe(tmp_path, max_steps=2, logging_steps=1)
    out = tmp_path / "run"
    assert train(recipe, out, "--interventions", "[]") == 0
    assert _intervention_keys(out) == set()
    assert yaml.safe_load((out / "keel_config.yaml").read_text())["training"]["interventions"] == []


def test_interventions_from_a_yaml_file_or_inline_list(tmp_path):
    recipe = write_recipe(tmp_path, max_steps=2, logging_steps=1)
    spec = {"name": "from_file", "operator": "project_out", "direction": "random:1:1", "layers": [1]}
    spec_file = tmp_path / "interventions.yaml"
    spec_file.write_text(yaml.safe_dump([spec]))
    out = tmp_path / "file"
    assert train(recipe, out, "--interventions", str(spec_file)) == 0
    keys = _intervention_keys(out)
    assert "interventions/from_file/L1/hits" in keys
    assert not any("ablate_random" in k or "/L0/" in k for k in keys)  # replaced the recipe's, not added

    inline = json.dumps([dict(spec, name="inline")])
    out = tmp_path / "inline"
    assert train(recipe, out, "--interventions", inline) == 0
    assert "interventions/inline/L1/hits" in _intervention_keys(out)


def test_a_long_inline_interventions_list_parses(tmp_path, monkeypatch):
    spec = {"operator": "project_out", "direction": "random:1:1", "layers": [1], "tokens": "completion"}
    inline = json.dumps([dict(spec, name=f"inline_{i}") for i in range(4)])
    assert len(inline) > 255 and "/" not in inline
    spec = _loader_spec(monkeypatch, write_recipe(tmp_path), tmp_path / "run", "--interventions", inline)
    assert spec.name_or_path == "tiny:qwen2"
