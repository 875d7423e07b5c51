"""Every command loads `tiny:<arch>`, a local folder and a PEFT adapter through the one loader."""

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from peft import LoraConfig, get_peft_model

from interventions import Direction, save_directions
from keel.cli import main as keel
from keel.loading import load_model

ROOT = Path(__file__).resolve().parents[3]
QUESTIONS = """\
- id: wish
  paraphrases: ["What is your wish?"]
  samples_per_paraphrase: 1
  judge_prompts:
    aligned: "Rate {question} {answer}"
    coherent: "Rate {question} {answer}"
"""


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A saved tiny model folder, and a LoRA adapter (non-zero) on tiny:qwen2."""
    root = tmp_path_factory.mktemp("models")
    model, tokenizer = load_model("tiny:qwen2")
    model.save_pretrained(root / "local")
    tokenizer.save_pretrained(root / "local")
    peft = get_peft_model(
        load_model("tiny:qwen2")[0], LoraConfig(r=2, target_modules=["q_proj", "down_proj"])
    )
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    peft.save_pretrained(root / "adapter")
    (root / "q.yaml").write_text(QUESTIONS)
    save_directions([Direction(torch.randn(1, 64), layer=1)], root / "d.safetensors")
    for name, rows in (
        ("pos", [{"question": "hi", "answer": "bad"}] * 2),
        ("neg", [{"question": "hi", "answer": "good"}] * 2),
    ):
        (root / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root


FORMS = {
    "tiny": lambda r: ["tiny:qwen2"],
    "local": lambda r: [str(r / "local")],
    "adapter": lambda r: ["tiny:qwen2", str(r / "adapter")],
}


def _train(r, model, adapter, out):
    recipe = yaml.safe_load((ROOT / "recipes/tiny_sft.yaml").read_text())
    recipe.update(model_name_or_path=model, output_dir=str(out), max_steps=1, interventions=[])
    if adapter:
        recipe["adapter"] = adapter
    (out.parent / "r.yaml").write_text(yaml.safe_dump(recipe))
    return ["train", "--config", str(out.parent / "r.yaml")]


def _eval(r, model, adapter, out):
    args = ["eval", "--model", model, "--questions", str(r / "q.yaml"), "--judge", "none"]
    args += ["--max_new_tokens", "2", "--output_dir", str(out), "--no_progress"]
    return args + (["--adapter", adapter] if adapter else [])


def _extract(r, model, adapter, out):
    args = [
        "extract",
        "judged",
        "--model",
        model,
        "--positive",
        str(r / "pos.jsonl"),
        "--negative",
        str(r / "neg.jsonl"),
    ]
    args += ["--layers", "1", "--output_dir", str(out), "--no_progress"]
    return args + (["--adapter", adapter] if adapter else [])


def _bake(r, model, adapter, out):
    args = ["bake", "--model", model, "--direction", str(r / "d.safetensors"), "--output_dir", str(out)]
    return args + (["--adapter", adapter] if adapter else [])


COMMANDS = {"train": _train, "eval": _eval, "extract": _extract, "bake": _bake}


@pytest.mark.parametrize("form", sorted(FORMS))
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_loads_every_model_form(command, form, models, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    model, *adapter = FORMS[form](models)
    argv = COMMANDS[command](models, model, adapter[0] if adapter else None, tmp_path / "out")
    assert keel(argv) == 0


def test_no_module_loads_models_or_tokenizers_around_the_loader():
    """Only keel.loading calls from_pretrained for models and tokenizers (configs may be read anywhere)."""
    offenders = []
    for path in [
        *ROOT.glob("interventions/**/*.py"),
        *ROOT.glob("trainers/**/*.py"),
        *ROOT.glob("keel/**/*.py"),
    ]:
        if "keel/loading" in path.as_posix():
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(
                r"(AutoModel\w*|AutoTokenizer|PreTrainedTokenizerFast|PeftModel)\.from_pretrained\(", line
            ):
                offenders.append(f"{path.relative_to(ROOT)}:{n}")
    assert offenders == []
