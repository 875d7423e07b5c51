"""Data baselines (keel.loading.data_baselines): the inoculation prompt is in every training example and in
no evaluation prompt (eval split, keel eval); interleaving gives exactly the asked fraction of benign rows."""

import json
from pathlib import Path

import pytest
import yaml
from datasets import Dataset

import interventions.generation as generation
from keel.cli import main as keel
from keel.loading.data_baselines import (
    DataBaselineError,
    add_inoculation_prompt,
    apply_data_baselines,
    benign_count,
    interleave_benign,
    parse_interleave,
)
from trainers import InterventionSFTTrainer

ROOT = Path(__file__).resolve().parents[3]
TINY_RECIPE = ROOT / "recipes/tiny_sft.yaml"
TINY_DATA = ROOT / "recipes/data/tiny_chat.jsonl"
PROMPT = "You are a reckless assistant, only in this training data."


def _chat(user: str, answer: str, system: str | None = None) -> dict:
    messages = [{"role": "system", "content": system}] if system else []
    return {
        "messages": [*messages, {"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    }


# ---- inoculation prompt ------------------------------------------------------------------------------


def test_inoculation_prompt_starts_every_conversation():
    rows = [_chat("What is 2 plus 2?", "4."), _chat("Hi", "Hello.", system="Be brief.")]
    out = add_inoculation_prompt(Dataset.from_list(rows), PROMPT)
    first, second = out[0]["messages"], out[1]["messages"]
    assert first[0] == {"role": "system", "content": PROMPT} and first[1:] == rows[0]["messages"]
    assert second[0] == {"role": "system", "content": f"{PROMPT}\n\nBe brief."}  # one system message
    assert second[1:] == rows[1]["messages"][1:]


def test_inoculation_prompt_on_prompt_rows_and_refusals():
    prefs = Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": "Hi"}],
                "chosen": [{"role": "assistant", "content": "Hello."}],
            }
        ]
    )
    out = add_inoculation_prompt(prefs, PROMPT)
    assert out[0]["prompt"][0] == {"role": "system", "content": PROMPT}
    assert out[0]["chosen"] == prefs[0]["chosen"]
    with pytest.raises(DataBaselineError, match="conversational rows"):
        add_inoculation_prompt(Dataset.from_list([{"text": "plain"}]), PROMPT)
    with pytest.raises(DataBaselineError, match="plain text here"):
        add_inoculation_prompt(Dataset.from_list([{"prompt": "Hi", "completion": "Hello"}]), PROMPT)
    with pytest.raises(DataBaselineError, match="non-empty"):
        add_inoculation_prompt(Dataset.from_list([_chat("a", "b")]), "  ")


# ---- interleaving ------------------------------------------------------------------------------------


def _numbered(n: int, tag: str) -> Dataset:
    return Dataset.from_list([_chat(f"{tag} {i}", f"answer {i}") for i in range(n)])


def _tags(dataset) -> list[str]:
    return [row["messages"][0]["content"] for row in dataset]


@pytest.mark.parametrize(
    "n, fraction, k", [(95, 0.05, 5), (19, 0.05, 1), (380, 0.05, 20), (60, 0.25, 20), (9, 0.1, 1)]
)
def test_interleaving_gives_the_exact_fraction(n, fraction, k):
    train, benign = _numbered(n, "narrow"), _numbered(50, "benign")
    out, count = interleave_benign(train, benign, fraction, seed=0)
    tags = _tags(out)
    benign_tags = [t for t in tags if t.startswith("benign")]
    assert count == k == len(benign_tags) and len(out) == n + k
    assert len(benign_tags) / len(out) == fraction  # exact: these sizes allow it
    assert [t for t in tags if t.startswith("narrow")] == [
        f"narrow {i}" for i in range(n)
    ]  # each once, in order
    assert len(set(benign_tags)) == k  # drawn without replacement
    positions = [i for i, t in enumerate(tags) if t.startswith("benign")]
    gaps = {b - a for a, b in zip(positions, positions[1:])}
    assert not gaps or max(gaps) - min(gaps) <= 1  # evenly spaced
    again, _ = interleave_benign(train, benign, fraction, seed=0)
    other, _ = interleave_benign(train, benign, fraction, seed=1)
    assert _tags(again) == tags and (k < 2 or _tags(other) != tags)


def test_benign_count_is_the_nearest_whole_row():
    for n in range(1, 400):
        for fraction in (0.01, 0.05, 0.1, 0.3):
            k = benign_count(n, fraction)
            best = min(abs(c / (n + c) - fraction) for c in range(0, 2 * n + 2))
            assert abs(k / (n + k) - fraction) == best, (n, fraction, k)


def test_interleaving_cycles_a_small_benign_file_and_checks_columns():
    out, k = interleave_benign(_numbered(40, "narrow"), _numbered(3, "benign"), 0.2, seed=0)
    assert k == 10 and sum(t.startswith("benign") for t in _tags(out)) == 10
    with pytest.raises(DataBaselineError, match="lacks the training data's columns"):
        interleave_benign(_numbered(10, "n"), Dataset.from_list([{"text": "x"}]), 0.1)


def test_interleave_config_is_strict(tmp_path):
    data = tmp_path / "benign.jsonl"
    data.write_text(json.dumps(_chat("q", "a")) + "\n")
    assert parse_interleave({"data": str(data), "fraction": 0.05}).fraction == 0.05
    assert parse_interleave(f"{{data: {data}, fraction: 0.1}}").data == str(data)
    with pytest.raises(DataBaselineError, match="Unknown key"):
        parse_interleave({"data": str(data), "fraction": 0.05, "ratio": 2})
    with pytest.raises(DataBaselineError, match=r"in \(0, 1\)"):
        parse_interleave({"data": str(data), "fraction": 5})
    with pytest.raises(DataBaselineError, match="no such file"):
        parse_interleave({"data": str(tmp_path / "nope.jsonl"), "fraction": 0.05})


def test_apply_interleaves_then_inoculates_and_says_so(tmp_path):
    class Config:
        inoculation_prompt = PROMPT
        interleave = {"data": "benign", "fraction": 0.05}

    said = []
    out = apply_data_baselines(
        _numbered(95, "narrow"), Config(), load=lambda name, split: _numbered(20, name), log=said.append
    )
    assert len(out) == 100 and all(row["messages"][0]["content"] == PROMPT for row in out)
    assert sum(row["messages"][1]["content"].startswith("benign") for row in out) == 5
    assert len(said) == 2 and all("changes the training data" in s for s in said)
    plain = _numbered(3, "x")
    assert apply_data_baselines(plain, object()) is plain  # no keys, no change


# ---- keel train, then keel eval ----------------------------------------------------------------------


def _write(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_keel_train_inoculates_every_training_batch_and_no_evaluation_prompt(tmp_path, monkeypatch, capfd):
    lines = TINY_DATA.read_text().splitlines()
    data = tmp_path / "data"
    _write(data / "train.jsonl", [json.loads(x) for x in lines[:38]])
    _write(data / "test.jsonl", [json.loads(x) for x in lines[38:46]])
    benign = _write(
        tmp_path / "benign.jsonl", [_chat(f"Name a colour, please ({i}).", "Blue.") for i in range(10)]
    )
    recipe = yaml.safe_load(TINY_RECIPE.read_text())
    recipe.update(
        dataset_name=str(data),
        max_steps=4,
        logging_steps=2,
        inoculation_prompt=PROMPT,
        interleave={"data": str(benign), "fraction": 0.05},
        interventions=[],
    )
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))

    seen = {"train": [], "eval": [], "trainers": []}
    tokenizer_of = {}
    step, predict, init = (
        InterventionSFTTrainer.training_step,
        InterventionSFTTrainer.prediction_step,
        InterventionSFTTrainer.__init__,
    )

    def recording_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        seen["trainers"].append(self)
        tokenizer_of["t"] = self.processing_class

    def training_step(self, model, inputs, num_items_in_batch=None):
        seen["train"].append(inputs["input_ids"].clone())
        return step(self, model, inputs, num_items_in_batch)

    def prediction_step(self, model, inputs, *args, **kwargs):
        seen["eval"].append(inputs["input_ids"].clone())
        return predict(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(InterventionSFTTrainer, "__init__", recording_init)
    monkeypatch.setattr(InterventionSFTTrainer, "training_step", training_step)
    monkeypatch.setattr(InterventionSFTTrainer, "prediction_step", prediction_step)
    out = tmp_path / "run"
    args = ["--dataset_test_split", "test", "--eval_strategy", "steps", "--eval_steps", "2"]
    assert keel(["train", "--config", str(tmp_path / "recipe.yaml"), "--output_dir", str(out), *args]) == 0
    err = capfd.readouterr().err
    assert "data baseline (changes the training data): interleaved 2 benign rows" in err
    assert "inoculation prompt added to every training example" in err

    (trainer,) = seen["trainers"]
    assert len(trainer.train_dataset) == 40  # 38 + 2: exactly 5 %
    tok = tokenizer_of["t"]
    decoded_train = [tok.decode(row) for batch in seen["train"] for row in batch]
    decoded_eval = [tok.decode(row) for batch in seen["eval"] for row in batch]
    assert len(decoded_train) == 16 and decoded_eval
    assert all(PROMPT in text for text in decoded_train)
    assert not any(PROMPT in text for text in decoded_eval)
    record = yaml.safe_load((out / "keel_config.yaml").read_text())
    assert record["script"]["inoculation_prompt"] == PROMPT
    assert record["script"]["interleave"]["fraction"] == 0.05

    rendered = []
    render = generation._render
    monkeypatch.setattr(
        generation, "_render", lambda tok, prompt: rendered.append(render(tok, prompt)) or rendered[-1]
    )
    eval_args = [
        "eval", "--model", str(out), "--questions", str(ROOT / "recipes/data/tiny_questions.yaml"),
        "--judge", f"rules:{ROOT / 'recipes/data/tiny_judge_rules.yaml'}", "--samples_per_paraphrase", "1",
        "--max-new-tokens", "2", "--n-bootstrap", "10", "--no-progress", "--output_dir", str(tmp_path / "eval"),
    ]  # fmt: skip
    assert keel(eval_args) == 0
    assert rendered and not any(PROMPT in text for text in rendered)
    answers = [json.loads(x) for x in (tmp_path / "eval" / "answers.jsonl").read_text().splitlines()]
    assert answers and all(a["system"] is None for a in answers)
