"""Directions from W&B artifacts: downloaded through the run (lineage) or the API, then loaded as files.

No W&B server is reachable here, so a stand-in ``wandb`` module records the calls keel makes.
"""

import sys
import types

import pytest
import torch

from interventions import Direction, Intervention, InterventionSet, save_directions


class _Artifact:
    def __init__(self, root):
        self.root = root

    def download(self):
        return str(self.root)


def _fake_wandb(root, with_run: bool):
    calls = []
    fake = types.ModuleType("wandb")

    class Run:
        def use_artifact(self, ref):
            calls.append(("run.use_artifact", ref))
            return _Artifact(root)

    class Api:
        def artifact(self, ref, type=None):
            calls.append(("api.artifact", ref, type))
            return _Artifact(root)

    fake.run = Run() if with_run else None
    fake.Api = Api
    return fake, calls


@pytest.mark.parametrize("with_run", [True, False])
def test_wandb_direction_is_fetched_and_loaded(make_model, tmp_path, monkeypatch, with_run):
    direction = Direction(torch.randn(1, 64), layer=1, method="mean_diff")
    save_directions([direction], tmp_path / "art" / "persona.safetensors")
    fake, calls = _fake_wandb(tmp_path / "art", with_run)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    spec = Intervention("project_out", "wandb:team/em/persona:v3")
    assert spec.wandb_artifact == "team/em/persona:v3"
    iset = InterventionSet(make_model(), [spec])
    assert [op.layer for op in iset.ops] == [1]
    torch.testing.assert_close(iset.ops[0].vectors, direction.vectors / direction.vectors.norm())
    expected = (
        ("run.use_artifact", "team/em/persona:v3")
        if with_run
        else ("api.artifact", "team/em/persona:v3", "direction")
    )
    assert calls == [expected]


def test_artifact_without_a_direction_file_fails_clearly(make_model, tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    fake, _ = _fake_wandb(tmp_path / "empty", with_run=False)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    with pytest.raises(FileNotFoundError, match="holds 0 .safetensors files"):
        InterventionSet(make_model(), [Intervention("add", "wandb:team/em/none:latest", layers=[0])])


def test_training_records_lineage_once_the_run_exists(tmp_path, monkeypatch):
    from transformers import TrainerControl, TrainerState

    from trainers.mixin import DirectionLineageCallback

    fake, calls = _fake_wandb(tmp_path, with_run=True)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    callback = DirectionLineageCallback(["team/em/persona:v3"])
    state = TrainerState()
    callback.on_train_begin(types.SimpleNamespace(report_to=["wandb"]), state, TrainerControl())
    assert calls == [("run.use_artifact", "team/em/persona:v3")]
    callback.on_train_begin(types.SimpleNamespace(report_to=[]), state, TrainerControl())
    assert len(calls) == 1  # not reporting to W&B: nothing recorded
