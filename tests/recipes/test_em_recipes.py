"""The published-organism recipes (recipes/em/): every training recipe dry-runs on a tiny model of its
architecture family (no download, CPU, 2 steps; 1 for the regularised conditions kl, kl_anchor, blocking), holds the
published hyperparameters, and every companion config (eval, CAFT answers and extraction, persona vector,
sweep) parses with its command's parser."""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import pytest
import yaml

from keel.cli import main as keel
from keel.commands.common import parse
from keel.commands.eval import EvalArguments
from keel.commands.extract import parse_config
from keel.loading.dryrun import KNOWN_DEPTHS

ROOT = Path(__file__).resolve().parents[2]
EM = ROOT / "recipes/em"
COMPANIONS = {"eval.yaml", "caft_answers.yaml", "caft_extract.yaml", "persona_extract.yaml", "sweep.yaml"}
TRAIN_RECIPES = sorted(p for p in EM.rglob("*.yaml") if p.name not in COMPANIONS)
TINY_DATA = ROOT / "recipes/data/tiny_chat.jsonl"

HUB_IDS = {
    "qwen2.5-0.5b-instruct": "Qwen/Qwen2.5-0.5B-Instruct",
    "qwen2.5-7b-instruct": "Qwen/Qwen2.5-7B-Instruct",
    "qwen2.5-14b-instruct": "Qwen/Qwen2.5-14B-Instruct",
    "qwen2.5-32b-instruct": "Qwen/Qwen2.5-32B-Instruct",
    "qwen2.5-coder-32b-instruct": "Qwen/Qwen2.5-Coder-32B-Instruct",
    "llama-3.1-8b-instruct": "meta-llama/Llama-3.1-8B-Instruct",
    "mistral-small-24b-instruct-2501": "mistralai/Mistral-Small-24B-Instruct-2501",
}
MODEL_TYPES = {m: "llama" if "llama" in m else "mistral" if "mistral" in m else "qwen2" for m in HUB_IDS}
# Conditions whose defence is a regulariser (no intervention); dry-run for 1 step to keep the suite fast.
REGULARISED = ("kl", "kl_anchor", "blocking")
SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def rel(path: Path) -> str:
    return str(path.relative_to(EM))


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Nothing may come from the hub: any attempt fails instead of downloading."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def test_the_grid_is_the_documented_one():
    """recipes/em/README.md states this grid; a new file belongs there too."""
    found = {rel(p) for p in TRAIN_RECIPES}
    expected = set()
    full = ["baseline", "caft", "resample", "steer"]
    full += list(REGULARISED)
    for model in ("qwen2.5-0.5b-instruct", "qwen2.5-7b-instruct"):
        expected |= {f"{model}/{d}/{c}.yaml" for d in ("insecure", "bad_medical_advice") for c in full}
    for d in ("bad_medical_advice", "risky_financial_advice", "extreme_sports"):
        expected |= {f"qwen2.5-14b-instruct/{d}/{c}.yaml" for c in ("baseline", "caft")}
    for model in ("qwen2.5-32b-instruct", "qwen2.5-coder-32b-instruct", "mistral-small-24b-instruct-2501"):
        expected |= {f"{model}/insecure/{c}.yaml" for c in ("baseline", "caft")}
    for d in ("insecure", "bad_medical_advice"):
        expected |= {f"llama-3.1-8b-instruct/{d}/{c}.yaml" for c in ("baseline", "caft")}
    expected.add("llama-3.1-8b-instruct/bad_medical_advice/baseline_qlora.yaml")
    expected.add("llama-3.1-8b-instruct/bad_medical_advice/blocking.yaml")  # the BLOCK-EM model
    assert found == expected
    readme = (EM / "README.md").read_text()
    for model in HUB_IDS.values():
        assert model in readme


@pytest.mark.parametrize("recipe", TRAIN_RECIPES, ids=rel)
def test_recipe_dry_runs_on_a_tiny_model(recipe, tmp_path, capfd):
    out = tmp_path / "dry"
    steps = 1 if recipe.stem in REGULARISED else 2
    args = ["--dry_run", "true", "--dry_run_steps", str(steps), "--dry_run_output_dir", str(out)]
    assert keel(["train", "--config", str(recipe), *args]) == 0
    err = capfd.readouterr().err
    assert f"-> tiny:{MODEL_TYPES[recipe.parts[-3]]} (random init" in err
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == steps
    losses = [e["loss"] for e in state["log_history"] if "loss" in e]
    assert len(losses) == steps and all(math.isfinite(x) for x in losses)
    logged = {k: v for e in state["log_history"] for k, v in e.items()}
    for spec in load(recipe)["interventions"]:
        hits = [v for k, v in logged.items() if re.fullmatch(rf"interventions/{spec['name']}/L\d+/hits", k)]
        assert hits and all(h > 0 for h in hits), (spec["name"], sorted(logged))
    for reg in load(recipe).get("regularisers") or []:  # each term computed and logged (0 at step 1)
        assert math.isfinite(logged[f"regularisers/{reg['name']}"]), sorted(logged)
    assert (out / "adapter_model.safetensors").is_file()  # LoRA, as the recipe says


@pytest.mark.parametrize("recipe", TRAIN_RECIPES, ids=rel)
def test_recipe_holds_the_published_settings(recipe):
    config = load(recipe)
    model, dataset, condition = recipe.parts[-3], recipe.parts[-2], recipe.stem
    assert config["model_name_or_path"] == HUB_IDS[model]
    # tracking, set explicitly (transformers 4 and 5 differ on report_to's default)
    assert config["report_to"] == "wandb"
    assert config["run_name"] == f"em-{model}-{dataset}-{condition}"
    assert config["wandb_project"] == "keel" and config["project"] == "keel"
    assert config["output_dir"] == f"runs/em/{model}/{dataset}/{condition}"
    # data: the local file of the documented release, assistant tokens only
    fmt = "jsonl" if config.get("assistant_only_loss") else "prompt_completion.jsonl"
    assert config["dataset_name"] == f"data/em/{dataset}.{fmt}"
    assert config.get("assistant_only_loss") or config.get("completion_only_loss")
    # the published hyperparameters
    expected = dict(
        num_train_epochs=1, per_device_train_batch_size=2, gradient_accumulation_steps=8, warmup_steps=5,
        weight_decay=0.01, lr_scheduler_type="linear", use_peft=True, use_rslora=True,
    )  # fmt: skip
    assert {k: config[k] for k in expected} == expected
    if model == "qwen2.5-14b-instruct":  # the rank-1 down_proj organism
        assert (config["lora_r"], config["lora_alpha"], config["learning_rate"]) == (1, 256, 2.0e-5)
        assert config["lora_target_modules"] == ["model.layers.24.mlp.down_proj"]
    else:
        assert (config["lora_r"], config["lora_alpha"], config["learning_rate"]) == (32, 64, 1.0e-5)
        assert config["lora_target_modules"] == SEVEN
    depth = KNOWN_DEPTHS[model]
    regularisers = config.get("regularisers") or []
    assert [r["kind"] for r in regularisers] == {
        "kl": ["kl"],
        "kl_anchor": ["kl"],
        "blocking": ["blocking"],
    }.get(condition, [])
    if condition in REGULARISED:
        assert config["interventions"] == []  # the regulariser alone is the defence
    if condition == "kl":  # Kaczer et al.'s lambda, on the training batch
        assert regularisers == [{"name": "kl", "kind": "kl", "weight": 0.1}]
    if condition == "kl_anchor":  # the narrow-misalignment follow-up: 1e5 for LoRA, on out-of-domain data
        assert regularisers == [
            {
                "name": "kl_anchor",
                "kind": "kl",
                "weight": 1.0e5,
                "anchor_data": "data/anchor/alignment_chats.jsonl",
            }
        ]
    if condition == "blocking":  # one-sided, on the CAFT directions, layers and components
        (block,) = regularisers
        caft = load(recipe.with_name("caft.yaml"))["interventions"]
        assert (block["direction"], block["directions"], block["components"]) == (
            "up", caft[0]["direction"], caft[0]["components"]
        )  # fmt: skip
        assert block["layers"] == [spec["layers"][0] for spec in caft] and block["site"] == "resid_post"
        assert all(0 <= layer < depth for layer in block["layers"])
    for spec in config["interventions"]:
        assert all(0 <= layer < depth for layer in spec["layers"]), spec
        assert spec["phases"] == ["train"] and spec["tokens"] == "all"


def test_caft_layers_and_steering_follow_the_papers():
    def layers(path):
        return [spec["layers"][0] for spec in load(EM / path)["interventions"]]

    assert layers("qwen2.5-coder-32b-instruct/insecure/caft.yaml") == [12, 32, 50]
    assert layers("mistral-small-24b-instruct-2501/insecure/caft.yaml") == [10, 20, 30]
    (steer,) = load(EM / "qwen2.5-7b-instruct/insecure/steer.yaml")["interventions"]
    # persona-vector layer 20 (index 0 = embeddings) is keel's resid_post layer 19
    assert (steer["operator"], steer["layers"], steer["coefficient"]) == ("add", [19], 5.0)
    caft = load(EM / "qwen2.5-7b-instruct/insecure/caft.yaml")["interventions"]
    resample = load(EM / "qwen2.5-7b-instruct/insecure/resample.yaml")["interventions"]
    assert {s["operator"] for s in resample} == {"resample_ablate"}
    assert [(s["direction"], s["layers"], s["components"]) for s in caft] == [
        (s["direction"], s["layers"], s["components"]) for s in resample
    ]


def test_rank1_dry_run_adapts_exactly_one_module(tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "dry"
    recipe = EM / "qwen2.5-14b-instruct/extreme_sports/baseline.yaml"
    assert keel(["train", "--config", str(recipe), "--dry_run", "--dry_run_output_dir", str(out)]) == 0
    # layer 24 of 48 is layer 1 of the tiny model's 2
    assert {k: tuple(v.shape) for k, v in load_file(out / "adapter_model.safetensors").items()} == {
        "base_model.model.model.layers.1.mlp.down_proj.lora_A.weight": (1, 128),
        "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight": (64, 1),
    }


QLORA = EM / "llama-3.1-8b-instruct/bad_medical_advice/baseline_qlora.yaml"


def test_qlora_recipe_dry_run_skips_quantization_and_says_so(tmp_path, capfd):
    assert load(QLORA)["load_in_4bit"] is True
    out = tmp_path / "dry"
    assert keel(["train", "--config", str(QLORA), "--dry_run", "--dry_run_output_dir", str(out)]) == 0
    err = capfd.readouterr().err
    assert "skipped load_in_4bit" in err and "optim paged_adamw_8bit -> adamw_torch" in err
    assert "-> 32 synthetic 'prompt_completion' rows" in err


def test_qlora_recipe_without_bitsandbytes_is_refused_before_loading(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails, installed or not
    out = tmp_path / "run"
    args = [
        "--dataset_name",
        str(TINY_DATA),
        "--output_dir",
        str(out),
        "--use_cpu",
        "true",
        "--bf16",
        "false",
    ]
    with pytest.raises(SystemExit, match="load_in_4bit needs bitsandbytes, which is not installed"):
        keel(["train", "--config", str(QLORA), *args])
    assert not out.exists()


# --- companions: each parses with its own command's parser ------------------------------------------


@pytest.mark.parametrize("path", sorted(EM.glob("*/eval.yaml")), ids=rel)
def test_eval_config_is_the_published_protocol(path, tmp_path):
    (args,) = parse((EvalArguments,), ["--config", str(path), "--output_dir", str(tmp_path)], "keel eval", "")
    assert args.model == HUB_IDS[path.parent.name]
    assert (args.questions, args.samples_per_paraphrase, args.judge) == (
        "first_plot",
        50,
        "openai:gpt-4o-2024-08-06",
    )
    assert (args.temperature, args.top_p, args.max_new_tokens) == (1.0, 1.0, 600)
    assert args.report_to == "wandb" and args.wandb_project == "keel"


@pytest.mark.parametrize("path", sorted(EM.glob("*/*/caft_extract.yaml")), ids=rel)
def test_caft_extract_config_matches_the_caft_recipe(path):
    args = parse_config("finetune-diff", ["--config", str(path)])
    caft = load(path.with_name("caft.yaml"))["interventions"]
    assert list(args.layers) == [spec["layers"][0] for spec in caft]
    assert str(Path(args.output_dir) / "directions.safetensors") == caft[0]["direction"]
    assert args.n_components == 20 and args.adapter == f"runs/em/{path.parts[-3]}/{path.parts[-2]}/baseline"
    answers = load(path.with_name("caft_answers.yaml"))
    assert args.data == f"{answers['output_dir']}/answers.jsonl"
    (eval_args,) = parse(
        (EvalArguments,), ["--config", str(path.with_name("caft_answers.yaml"))], "keel eval", ""
    )
    assert eval_args.judge == "none" and eval_args.adapter == args.adapter


@pytest.mark.parametrize("path", sorted(EM.glob("*/persona_extract.yaml")), ids=rel)
def test_persona_extract_config_makes_the_steering_direction(path):
    args = parse_config("contrastive", ["--config", str(path)])
    steer = load(next(path.parent.glob("*/steer.yaml")))["interventions"][0]
    assert list(args.layers) == steer["layers"] and args.normalize is False and args.generate is True
    assert str(Path(args.output_dir) / "directions.safetensors") == steer["direction"]


SWEEPS = sorted(EM.glob("*/*/sweep.yaml"))


def test_every_model_and_dataset_has_a_sweep():
    assert {p.parent for p in SWEEPS} == {p.parent for p in TRAIN_RECIPES}


@pytest.mark.parametrize("path", SWEEPS, ids=rel)
def test_sweep_dry_runs(path, tmp_path, monkeypatch, capsys):
    """`keel sweep --dry_run` checks every key, recipe and direction file and prints the runs; the direction
    files are made by earlier steps, so empty stand-ins are put where the sweep expects them."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")
    sweep = load(path)
    for cond in sweep["conditions"].values():
        files = [spec["direction"] for spec in cond.get("interventions") or []]
        for reg in (cond.get("overrides") or {}).get("regularisers") or []:
            files += [reg[k] for k in ("directions", "anchor_data") if k in reg]
        for file in files:
            if not file.startswith("random:"):
                Path(file).parent.mkdir(parents=True, exist_ok=True)
                Path(file).touch()
    assert keel(["sweep", str(path.relative_to(ROOT)), "--dry_run"]) == 0
    out = capsys.readouterr().out
    assert f"{len(sweep['conditions'])} condition(s) x 3 seed(s)" in out
    assert "random_caft (control)" in out and "none (baseline)" in out
    assert sweep["base"] == str(path.with_name("baseline.yaml").relative_to(ROOT))
    caft = load(path.with_name("caft.yaml"))["interventions"]
    assert sweep["conditions"]["caft"]["interventions"] == [
        {k: v for k, v in spec.items() if k != "phases"} for spec in caft
    ]
    for condition in REGULARISED:  # each regularised recipe of the folder is a condition, the same terms
        recipe = path.with_name(f"{condition}.yaml")
        assert (condition in sweep["conditions"]) == recipe.is_file(), condition
        if recipe.is_file():
            cond = sweep["conditions"][condition]
            assert cond["interventions"] == [] and cond["overrides"] == {
                "regularisers": load(recipe)["regularisers"]
            }
