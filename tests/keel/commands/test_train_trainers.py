"""`keel train` chooses its TRL trainer with ``trainer: sft|dpo|grpo``; GRPO's rewards are import paths.

The tiny offline DPO and GRPO recipes run end to end (tiny:qwen2 on CPU, two steps)."""

import json
from pathlib import Path

import pytest
import yaml

import keel.commands.train as train_command
from interventions.serialization import KeelInputError
from keel.cli import main as keel
from keel.rewards import keyword_reward, length_reward, load_reward_funcs, resolve_reward
from trainers import (
    InterventionDPOConfig,
    InterventionDPOTrainer,
    InterventionGRPOConfig,
    InterventionGRPOTrainer,
    InterventionSFTConfig,
)

ROOT = Path(__file__).resolve().parents[3]


def recipe(tmp_path: Path, name: str, **overrides) -> Path:
    config = yaml.safe_load((ROOT / "recipes" / name).read_text())
    config["dataset_name"] = str(ROOT / config["dataset_name"])
    config.update(overrides)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def log_history(out: Path) -> list[dict]:
    return json.loads((out / "trainer_state.json").read_text())["log_history"]


def test_trainer_is_read_from_the_command_line_or_the_recipe(tmp_path):
    dpo = recipe(tmp_path, "tiny_dpo.yaml")
    assert train_command.trainer_name(["--config", str(dpo)]) == "dpo"
    assert train_command.trainer_name([f"--config={dpo}", "--trainer", "grpo"]) == "grpo"
    assert train_command.trainer_name(["--config", str(ROOT / "recipes/tiny_sft.yaml")]) == "sft"
    assert train_command.trainer_name([]) == "sft"
    assert train_command.config_types(["--trainer=dpo"])[1] is InterventionDPOConfig
    assert train_command.config_types(["--trainer", "grpo"])[1] is InterventionGRPOConfig
    assert train_command.config_types([])[1] is InterventionSFTConfig
    with pytest.raises(KeelInputError, match="choose one of sft, dpo, grpo"):
        train_command.trainer_name(["--trainer", "ppo"])


def test_tiny_dpo_recipe_trains(tmp_path):
    out = tmp_path / "dpo"
    assert (
        keel(
            [
                "train",
                "--config",
                str(recipe(tmp_path, "tiny_dpo.yaml")),
                "--output_dir",
                str(out),
                "--max_steps",
                "2",
                "--logging_steps",
                "1",
            ]
        )
        == 0
    )
    logs = [h for h in log_history(out) if "loss" in h]
    assert len(logs) == 2 and "rewards/margins" in logs[0]
    assert logs[0]["loss"] == pytest.approx(0.6931472, abs=1e-5)  # ablation in policy and reference alike
    record = yaml.safe_load((out / "keel_config.yaml").read_text())
    assert record["script"]["trainer"] == "dpo"
    assert record["training"]["interventions"][0]["phases"] == ["train", "reference"]
    assert (out / "model.safetensors").is_file()


def test_tiny_grpo_recipe_trains(tmp_path):
    out = tmp_path / "grpo"
    args = ["--max_steps", "2", "--logging_steps", "1", "--max_completion_length", "6"]
    assert (
        keel(["train", "--config", str(recipe(tmp_path, "tiny_grpo.yaml")), "--output_dir", str(out), *args])
        == 0
    )
    logs = [h for h in log_history(out) if "loss" in h]
    assert len(logs) == 2 and "rewards/length_reward/mean" in logs[0]
    assert "interventions/ablate_random/L1/proj_after" in logs[0]
    record = yaml.safe_load((out / "keel_config.yaml").read_text())
    assert record["script"]["trainer"] == "grpo"
    assert record["script"]["reward_funcs"] == ["keel.rewards:length_reward"]


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"reward_funcs": ["keel.rewards:no_such_reward"]}, "has no function 'no_such_reward'"),
        ({"reward_funcs": ["no_such_module:f"]}, "cannot import module 'no_such_module'"),
        ({"reward_funcs": None}, "trainer grpo needs reward_funcs"),
        ({"trainer": "dpo"}, "reward_funcs is for trainer grpo"),
    ],
)
def test_bad_trainer_choices_fail_before_the_model_loads(tmp_path, monkeypatch, overrides, message):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(train_command, "load_model", no_loading)
    config = recipe(tmp_path, "tiny_grpo.yaml", **overrides)
    if overrides.get("trainer") == "dpo":  # a DPO recipe naming rewards: drop GRPO-only keys
        data = yaml.safe_load(config.read_text())
        for key in ("num_generations", "max_completion_length"):
            data.pop(key)
        config.write_text(yaml.safe_dump(data))
    with pytest.raises(SystemExit, match=message):
        keel(["train", "--config", str(config), "--output_dir", str(tmp_path / "out")])


def test_vllm_with_hook_interventions_is_refused_by_keel_train(tmp_path):
    config = recipe(tmp_path, "tiny_grpo.yaml", use_vllm=True)
    with pytest.raises(SystemExit, match="keel bake"):
        keel(["train", "--config", str(config), "--output_dir", str(tmp_path / "out")])


def test_trainer_classes_by_name():
    class Args:
        trainer = "dpo"
        reward_funcs = None

    assert train_command.trainer_class(Args) == (InterventionDPOTrainer, {})
    Args.trainer, Args.reward_funcs = "grpo", ["length_reward"]
    cls, kwargs = train_command.trainer_class(Args)
    assert cls is InterventionGRPOTrainer and kwargs == {"reward_funcs": [length_reward]}


def test_rewards_by_import_path_and_their_values():
    assert resolve_reward("keel.rewards:length_reward") is length_reward
    assert resolve_reward("keel.rewards.keyword_reward") is keyword_reward  # TRL's dotted form
    assert resolve_reward("length_reward") is length_reward
    assert load_reward_funcs("length_reward") == [length_reward]
    chat = [[{"role": "assistant", "content": "x" * 40}], [{"role": "assistant", "content": ""}]]
    assert length_reward(chat) == [1.0, 0.0]
    assert length_reward(["x" * 60]) == [0.5]
    assert keyword_reward(["I can help you stay safe", "no"]) == [1.0, 0.0]
