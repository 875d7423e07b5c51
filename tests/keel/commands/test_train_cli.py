"""`keel train --config recipes/tiny_sft.yaml` runs offline and trains with the recipe's intervention."""

from pathlib import Path

import pytest

from keel.cli import main as keel

ROOT = Path(__file__).resolve().parents[3]


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
    # the recipe's ablation ran at both layers and left ~zero projection
    assert "'interventions/ablate_random/L0/proj_after'" in logged
    assert "'interventions/ablate_random/L1/hits': '1'" in logged


def test_keel_rejects_unknown_commands(capsys):
    assert keel(["trian"]) == 2
    assert "unknown command 'trian'" in capsys.readouterr().err


def test_recipe_with_unknown_intervention_key_fails_before_loading(tmp_path, monkeypatch):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        (ROOT / "recipes/tiny_sft.yaml").read_text().replace("tokens: all", "tokens: all\n    strength: 3")
    )
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit, match="strength"):
        keel(["train", "--config", str(bad), "--output_dir", str(tmp_path / "x")])
