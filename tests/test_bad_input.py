"""Bad input, table-driven: each case names the error type, words the message must contain (what is wrong
and the fix), and files that must not exist afterwards (nothing half-written passed off as complete).

The `keel eval` cases against a misbehaving judge live in tests/keel/commands/test_eval_failures.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from datasets import Dataset

from interventions import (
    Direction,
    DirectionError,
    Intervention,
    InterventionSet,
    SpecError,
    decoder_layers,
    load_directions,
    parse_interventions,
    save_directions,
)
from interventions.extraction import ExtractionError, finetune_difference, text_example
from interventions.serialization import KeelInputError, load_yaml, read_jsonl
from keel.cli import main as keel
from keel.evaluation.questions import QuestionFormatError, load_questions
from keel.loading import LoadError, load_dataset_any, load_model
from trainers import InterventionSFTConfig, InterventionSFTTrainer

ROOT = Path(__file__).resolve().parents[1]
D = 64


@dataclass
class Case:
    run: object  # (tmp_path, make_model, tokenizer) -> anything
    error: type[BaseException]
    words: list[str]
    absent: list[str] = field(default_factory=list)  # paths under tmp_path that must not exist after


def _spec(**kw):
    base = dict(operator="project_out", direction=torch.ones(1, D))
    return Intervention(**{**base, **kw})


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _recipe(tmp_path, **overrides) -> Path:
    import yaml

    recipe = yaml.safe_load((ROOT / "recipes/tiny_sft.yaml").read_text())
    recipe.update(output_dir=str(tmp_path / "run"), max_steps=1, **overrides)
    return _write(tmp_path, "recipe.yaml", yaml.safe_dump(recipe))


def _identical_finetune_diff(tmp_path, make_model, tokenizer):
    examples = [text_example(tokenizer, f"hello there, general question {i}") for i in range(4)]
    finetune_difference(make_model().eval(), make_model().eval(), examples, layers=[0], progress=False)


def _stacked(tmp_path, make_model, tokenizer):
    model = make_model()
    first = InterventionSet(model, [Intervention("add", torch.ones(1, D), layers=[0], name="a")])
    second = InterventionSet(model, [Intervention("add", torch.ones(1, D), layers=[0], name="b")])
    with first, second:
        pass


def _unknown_architecture(tmp_path, make_model, tokenizer):
    model = make_model("gpt2")
    model.config.model_type = "falcon_like"
    decoder_layers(model)


def _empty_dataset_python_api(tmp_path, make_model, tokenizer):
    empty = Dataset.from_list([{"messages": [{"role": "user", "content": "a"}]}]).select([])
    args = InterventionSFTConfig(output_dir=str(tmp_path / "run"), use_cpu=True, bf16=False, report_to=[])
    InterventionSFTTrainer(model=make_model(), args=args, train_dataset=empty, processing_class=tokenizer)


def _nan_metadata(tmp_path, make_model, tokenizer):
    d = Direction(torch.ones(1, D), extra={"explained_variance_ratio": [math.nan]})
    save_directions([d], tmp_path / "dir.safetensors")


CASES = {
    # --- intervention specs: refused when built, before any model is loaded
    "nan coefficient": Case(lambda *a: _spec(coefficient=math.nan), SpecError, ["coefficient", "finite"]),
    "inf coefficient": Case(lambda *a: _spec(coefficient=math.inf), SpecError, ["coefficient", "finite"]),
    "nan clamp value": Case(
        lambda *a: _spec(operator="clamp", value=math.nan), SpecError, ["value", "finite"]
    ),
    "clamp without value": Case(lambda *a: _spec(operator="clamp"), SpecError, ["clamp", "value"]),
    "layers a:b": Case(lambda *a: _spec(layers="a:b"), SpecError, ["'a:b'", "start:stop"]),
    "layers [1.5]": Case(lambda *a: _spec(layers=[1.5]), SpecError, ["1.5", "list of ints"]),
    "layers true": Case(lambda *a: _spec(layers=True), SpecError, ["True", "an int"]),
    "unknown key": Case(
        lambda *a: Intervention.from_dict({"operator": "add", "direction": "x", "strength": 2}),
        SpecError,
        ["strength", "allowed keys"],
    ),
    "unknown operator": Case(
        lambda *a: _spec(operator="ablate"), SpecError, ["'ablate'", "register_operator"]
    ),
    "unknown site": Case(lambda *a: _spec(site="residual"), SpecError, ["'residual'", "resid_post"]),
    "reference operator while generating": Case(
        lambda *a: _spec(operator="reference_ablate", phases=["generate"]),
        SpecError,
        ["reference", "'train' and 'eval'"],
    ),
    "duplicate names": Case(
        lambda *a: parse_interventions("[{operator: add, direction: x}, {operator: add, direction: y}]"),
        SpecError,
        ["add@resid_post", "set `name`"],
    ),
    "duplicate names in a recipe": Case(
        lambda t, *a: InterventionSFTConfig(
            output_dir=str(t / "run"),
            use_cpu=True,
            bf16=False,
            interventions=[{"operator": "add", "direction": "x"}] * 2,
        ),
        SpecError,
        ["unique", "set `name`"],
    ),
    # --- files: the message names the file (and line)
    "malformed interventions yaml": Case(
        lambda t, *a: parse_interventions(_write(t, "iv.yaml", "- operator: add\n  direction: [1, 2\n")),
        KeelInputError,
        ["iv.yaml:", "not valid YAML"],
    ),
    "interventions file missing": Case(
        lambda t, *a: parse_interventions(str(t / "nope.yaml")), KeelInputError, ["nope.yaml", "no such file"]
    ),
    "malformed yaml": Case(
        lambda t, *a: load_yaml(_write(t, "q.yaml", "a: [1, 2\n")),
        KeelInputError,
        ["q.yaml:", "not valid YAML"],
    ),
    "malformed question file": Case(
        lambda t, *a: load_questions(
            str(_write(t, "questions.yaml", "- id: x\n  paraphrases: [a, b\n")), False, t
        ),
        QuestionFormatError,
        ["questions.yaml:", "not valid YAML"],
    ),
    "malformed jsonl": Case(
        lambda t, *a: read_jsonl(_write(t, "d.jsonl", '{"a": 1}\n{oops}\n')),
        KeelInputError,
        ["d.jsonl:2", "not valid JSON"],
    ),
    "malformed recipe": Case(
        lambda t, *a: keel(["train", "--config", str(_write(t, "r.yaml", "model_name_or_path: [tiny\n"))]),
        BaseException,
        ["r.yaml"],
    ),
    "unknown key in a recipe's intervention": Case(
        lambda t, *a: keel(
            [
                "train",
                "--config",
                str(_recipe(t, interventions=[{"operator": "add", "direction": "random:0", "strength": 1}])),
            ]
        ),
        SystemExit,
        ["strength", "allowed keys"],
        ["run/model.safetensors"],
    ),
    "interventions overridden on the command line, malformed": Case(
        lambda t, *a: keel(["train", "--config", str(_recipe(t)), "--interventions", "[{operator: add"]),
        SystemExit,
        ["interventions"],
        ["run/model.safetensors"],
    ),
    # --- data
    "empty dataset file": Case(
        lambda t, *a: load_dataset_any(str(_write(t, "empty.jsonl", ""))), BaseException, ["empty.jsonl"]
    ),
    "empty dataset through keel train": Case(
        lambda t, *a: keel(
            ["train", "--config", str(_recipe(t, dataset_name=str(_write(t, "empty.jsonl", ""))))]
        ),
        BaseException,
        ["empty.jsonl"],
        ["run/model.safetensors"],
    ),
    "empty dataset through the python api": Case(
        _empty_dataset_python_api, ValueError, ["train_dataset", "empty"]
    ),
    "missing eval split": Case(
        lambda t, *a: load_dataset_any(str(_write(t, "train.jsonl", '{"text": "a"}\n')), split="test"),
        LoadError,
        ["'test'", "test.jsonl"],
    ),
    # --- models and directions
    "unknown tiny model": Case(
        lambda *a: load_model("tiny:notamodel"), LoadError, ["tiny:notamodel", "qwen2"]
    ),
    "unknown architecture": Case(
        _unknown_architecture,
        ValueError,
        ["'falcon_like'", "'transformer.h'", "intervention_layers_path", "register_architecture"],
    ),
    "wrong hidden size": Case(
        lambda t, mm, tok: InterventionSet(mm(), [Intervention("add", torch.ones(1, D + 1), layers=[0])]),
        DirectionError,
        ["width 65", "hidden size is 64"],
    ),
    "nan direction": Case(lambda *a: Direction(torch.full((1, D), math.nan)), DirectionError, ["NaN"]),
    "zero direction": Case(lambda *a: Direction(torch.zeros(1, D)), DirectionError, ["all zero"]),
    "pickled direction": Case(
        lambda t, *a: (torch.save({"x": 1}, t / "d.pt"), load_directions(t / "d.pt")), BaseException, ["d.pt"]
    ),
    "nan in direction metadata": Case(
        _nan_metadata, DirectionError, ["NaN", "valid JSON"], ["dir.safetensors", "dir.json"]
    ),
    "finetune-diff of identical models": Case(
        _identical_finetune_diff, ExtractionError, ["do not differ", "--adapter"]
    ),
    # --- runtime
    "two sets stacking at one site": Case(_stacked, RuntimeError, ["stack", "allow_stacking=True"]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_refused_clearly(name, tmp_path, make_model, tokenizer, monkeypatch):
    case = CASES[name]
    monkeypatch.chdir(ROOT)
    with pytest.raises(case.error) as info:
        case.run(tmp_path, make_model, tokenizer)
    message = str(info.value)
    for word in case.words:
        assert word in message, f"{name}: {word!r} not in {message!r}"
    for path in case.absent:
        assert not (tmp_path / path).exists(), f"{name}: {path} was written"
