"""keel.loading.dryrun: the name -> architecture table, layer scaling, direction stand-ins, data formats."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from interventions import Intervention
from keel.cli import main as keel
from keel.loading.dryrun import (
    DryRunError,
    LayerMap,
    TinyTarget,
    raw_regularisers,
    split_dry_run_argv,
    tiny_intervention,
    tiny_lora_targets,
    tiny_regulariser,
    tiny_target,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "name, model_type, depth",
    [
        ("Qwen/Qwen2.5-0.5B-Instruct", "qwen2", 24),
        ("Qwen/Qwen2.5-Coder-32B-Instruct", "qwen2", 64),
        ("unsloth/Qwen2.5-14B-Instruct", "qwen2", 48),  # a mirror: same name, same depth
        ("Qwen/Qwen3-8B", "qwen3", None),
        ("meta-llama/Llama-3.1-8B-Instruct", "llama", 32),
        ("meta-llama/Meta-Llama-3-8B-Instruct", "llama", None),
        ("mistralai/Mistral-Small-24B-Instruct-2501", "mistral", 40),
        ("mistralai/Mistral-7B-Instruct-v0.3", "mistral", None),
        ("tiny:llama", "llama", None),
    ],
)
def test_hub_names_map_to_tiny_architectures(name, model_type, depth):
    target = tiny_target(name)
    assert (target.model_type, target.depth, target.name) == (model_type, depth, f"tiny:{model_type}")


@pytest.mark.parametrize(
    "name", ["openai/gpt-oss-20b", "mistralai/Mistral-Small-3.1-24B-Instruct-2503", "bert-base-uncased"]
)
def test_unknown_names_are_an_error_not_a_guess(name):
    with pytest.raises(DryRunError, match="cannot tell the architecture"):
        tiny_target(name)


def test_a_local_folder_is_read_from_its_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 16}))
    target = tiny_target(str(tmp_path))
    assert (target.model_type, target.depth) == ("llama", 16)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    with pytest.raises(DryRunError, match="'mamba'"):
        tiny_target(str(tmp_path))


def test_layers_scale_proportionally_and_out_of_range_fails():
    layer_map = LayerMap(TinyTarget("Qwen/Qwen2.5-Coder-32B-Instruct", "qwen2", 64), [])
    assert [layer_map(x, "t") for x in (0, 12, 31, 32, 50, 63)] == [0, 0, 0, 1, 1, 1]
    with pytest.raises(DryRunError, match="layer 64 does not exist .* 64 decoder layers"):
        layer_map(64, "intervention 'x'")
    unknown = LayerMap(TinyTarget("x", "qwen2", None), [3, 9])  # depth unknown: deepest named + 1
    assert (unknown.depth, unknown(9, "t"), unknown(4, "t")) == (10, 1, 0)


def test_interventions_become_random_directions_of_the_tiny_width():
    target = TinyTarget("Qwen/Qwen2.5-7B-Instruct", "qwen2", 28)
    layer_map = LayerMap(target, [])
    caft = Intervention(
        "project_out", "runs/x/directions.safetensors", layers=[7, 21], components=[0, 3], direction_layer=7
    )
    new, note = tiny_intervention(caft, 0, target, layer_map)
    assert (new.direction, new.layers, new.components, new.direction_layer) == (
        "random:0:4",
        [0, 1],
        [0, 3],
        None,
    )
    assert "runs/x/directions.safetensors -> random:0:4" in note
    ranged, _ = tiny_intervention(Intervention("add", "v.safetensors", layers="7:21"), 1, target, layer_map)
    assert (ranged.direction, ranged.layers) == ("random:1:1", "0:2")
    kept, note = tiny_intervention(
        Intervention("project_out", "random:3:2", layers="all"), 2, target, layer_map
    )
    assert (kept.direction, kept.layers, note) == ("random:3:2", "all", None)
    mean, _ = tiny_intervention(
        Intervention("mean_ablate", "m.safetensors", layers=[3]), 3, target, layer_map
    )
    assert mean.direction.d_model == 64 and mean.direction.mean.tolist() == [0.0]


def test_lora_target_layers_are_scaled():
    layer_map = LayerMap(TinyTarget("Qwen/Qwen2.5-14B-Instruct", "qwen2", 48), [])
    assert tiny_lora_targets(["model.layers.24.mlp.down_proj", "q_proj"], layer_map) == [
        "model.layers.1.mlp.down_proj",
        "q_proj",
    ]
    assert (
        tiny_lora_targets(r"model\.layers\.12\.mlp\.down_proj", layer_map)
        == r"model\.layers\.0\.mlp\.down_proj"
    )
    assert tiny_lora_targets("all-linear", layer_map) == "all-linear"


def test_dry_run_options_are_taken_out_of_the_command_line():
    options, rest = split_dry_run_argv(
        ["--config", "r.yaml", "--dry_run", "--dry_run_steps", "3", "--seed", "1"]
    )
    assert (options.dry_run, options.dry_run_steps, rest) == (True, 3, ["--config", "r.yaml", "--seed", "1"])
    assert split_dry_run_argv(["--dry_run", "false"])[0].dry_run is False
    with pytest.raises(DryRunError, match="true or false"):
        split_dry_run_argv(["--dry_run", "maybe"])


def test_help_lists_the_dry_run_options(capsys):
    assert keel(["train", "--help"]) == 0
    assert "--dry_run" in capsys.readouterr().out


def test_dry_run_refuses_under_a_launcher(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit, match="a dry run is one CPU process"):
        keel(["train", "--config", str(ROOT / "recipes/tiny_sft.yaml"), "--dry_run"])


@pytest.mark.skipif(not (ROOT / "recipes/tiny_dpo.yaml").is_file(), reason="no DPO/GRPO recipes in this tree")
def test_dry_run_of_dpo_and_grpo_recipes_writes_their_data_formats(tmp_path, capfd):
    for name, fmt in (("tiny_dpo", "preference"), ("tiny_grpo", "prompt")):
        out = tmp_path / name
        recipe = ROOT / f"recipes/{name}.yaml"
        assert keel(["train", "--config", str(recipe), "--dry_run", "--dry_run_output_dir", str(out)]) == 0
        assert f"synthetic '{fmt}' rows" in capfd.readouterr().err


def test_regularisers_get_scaled_layers_random_directions_anchor_rows_and_a_tiny_sae(tmp_path):
    """Each kind's files become stand-ins of the tiny width; the mapped list parses as regularisers."""
    from interventions.extraction.sae import SAE
    from trainers.regularisers import parse_regularisers

    target = TinyTarget("meta-llama/Llama-3.1-8B-Instruct", "llama", 32)
    layer_map = LayerMap(target, [])
    raw = [
        {"kind": "kl", "weight": 0.1},
        {"name": "kl_anchor", "kind": "kl", "weight": 1.0e5, "anchor_data": "data/anchor/x.jsonl"},
        {"kind": "ldifs", "weight": 1.0, "layers": [0, 8, 16, 24, 31]},
        {"kind": "projection_penalty", "direction": "v.safetensors", "layers": "8:24", "direction_layer": 20},
        {"kind": "blocking", "direction": "up", "directions": "caft.safetensors", "layers": [8, 24],
         "components": [0, 4]},
        {"name": "block_sae", "kind": "blocking", "direction": "both", "sae": "saes/l16", "latents": [1043, 7],
         "layers": [16]},
        {"name": "block_saes", "kind": "blocking", "sae": {8: "a", 16: "b", 24: "c"}, "latents": [3]},
    ]  # fmt: skip
    mapped, notes = zip(
        *(tiny_regulariser(r, i, target, layer_map, tmp_path, "messages", 2) for i, r in enumerate(raw)),
        strict=True,
    )
    kl, anchor, ldifs, penalty, block, sae, saes = mapped
    assert kl == raw[0] and notes[0] == []  # nothing to change
    rows = [json.loads(line) for line in Path(anchor["anchor_data"]).read_text().splitlines()]
    assert len(rows) == 8 and all([m["role"] for m in r["messages"]] == ["user", "assistant"] for r in rows)
    assert "data/anchor/x.jsonl -> 8 synthetic 'messages' rows" in notes[1][0]
    assert ldifs["layers"] == [0, 1]
    assert (penalty["direction"], penalty["layers"], "direction_layer" in penalty) == (
        "random:1003:1",
        "0:2",
        False,
    )
    assert (block["directions"], block["direction"], block["layers"], block["components"]) == (
        "random:1004:5", "up", [0, 1], [0, 4]
    )  # fmt: skip
    loaded = SAE.load(sae["sae"])
    assert (loaded.d_model, loaded.d_sae, loaded.cfg["hook_layer"], sae["latents"]) == (64, 2, 1, [0, 1])
    assert "latents [1043, 7] -> [0, 1]" in notes[5][0]
    assert sorted(saes["sae"]) == [0, 1] and SAE.load(saes["sae"][1]).cfg["hook_layer"] == 1
    parsed = parse_regularisers(list(mapped))
    assert [r.kind for r in parsed] == [r["kind"] for r in raw]
    with pytest.raises(DryRunError, match="layer 32 does not exist"):
        tiny_regulariser({"kind": "ldifs", "layers": [32]}, 0, target, layer_map, tmp_path, "messages", 2)


def test_regularisers_are_read_from_the_command_line_before_the_config(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("regularisers:\n  - {kind: kl, weight: 0.1}\n")
    assert raw_regularisers(["--config", str(recipe)]) == [{"kind": "kl", "weight": 0.1}]
    argv = ["--config", str(recipe), "--regularisers", "[{kind: ldifs, weight: 2}]"]
    assert raw_regularisers(argv) == [{"kind": "ldifs", "weight": 2}]
    assert raw_regularisers(["--config", str(recipe), "--regularisers", "[]"]) is None


def test_a_sae_blocking_recipe_dry_runs(tmp_path, capfd):
    """No SAE file, no anchor file: the dry run writes stand-ins and trains one step with both terms."""
    out = tmp_path / "dry"
    regs = (
        "[{name: block, kind: blocking, direction: up, sae: saes/missing, latents: [9000, 12], layers: [16]},"
        " {name: anchor, kind: kl, weight: 1.0e+5, anchor_data: data/anchor/missing.jsonl}]"
    )
    recipe = ROOT / "recipes/em/llama-3.1-8b-instruct/bad_medical_advice/baseline.yaml"
    args = ["--dry_run", "--dry_run_steps", "1", "--dry_run_output_dir", str(out), "--regularisers", regs]
    assert keel(["train", "--config", str(recipe), *args]) == 0
    assert "sae saes/missing -> a tiny random (hook_layer 1) SAE" in capfd.readouterr().err
    state = json.loads((out / "trainer_state.json").read_text())
    logged = {k for e in state["log_history"] for k in e}
    assert {"regularisers/block", "regularisers/anchor"} <= logged
