"""A user-registered operator is usable by name from a YAML recipe through `keel train`."""

import json
from pathlib import Path

import pytest
import yaml

from interventions import OPERATORS, Operator, project_out, register_operator
from keel.cli import main as keel

ROOT = Path(__file__).resolve().parents[3]


class HalfAblation(Operator):
    name, needs = "half_ablation_test", frozenset({"basis"})

    def apply(self, h, inputs, alpha):
        return project_out(h, inputs.vectors, 0.5 * alpha)


@pytest.fixture
def half_ablation():
    op = register_operator(HalfAblation())
    yield op
    OPERATORS.pop(op.name)


def test_registered_operator_from_a_recipe(tmp_path, half_ablation, monkeypatch, capfd):
    recipe = yaml.safe_load((ROOT / "recipes/tiny_sft.yaml").read_text())
    recipe["interventions"] = [
        {"name": "half", "operator": half_ablation.name, "direction": "random:0:1", "layers": [1]}
    ]
    recipe.update(output_dir=str(tmp_path / "run"), max_steps=2, logging_steps=1)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    monkeypatch.chdir(ROOT)
    assert keel(["train", "--config", str(path)]) == 0
    (entry,) = [
        e
        for e in json.loads((tmp_path / "run" / "trainer_state.json").read_text())["log_history"]
        if "interventions/half/L1/hits" in e and e["step"] == 1
    ]
    assert entry["interventions/half/L1/hits"] == 1.0
    # half the projection is removed: proj_after = proj_before / 2 on every token
    before, after = entry["interventions/half/L1/proj_before"], entry["interventions/half/L1/proj_after"]
    assert after == pytest.approx(before / 2, rel=1e-3)
    assert (
        "'interventions/half/proj_after'" in capfd.readouterr().out
    )  # the console's per-intervention summary
