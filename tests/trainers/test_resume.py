"""Resuming from a checkpoint equals the uninterrupted run: scheduled coefficients and resample_ablate's
row shifts (the reference source's generator is saved with every checkpoint)."""

import shutil

import pytest
import torch
from tiny_settings import tiny_sft_config

from interventions import Direction, ReferenceSource
from trainers import InterventionSFTTrainer


def _config(out, **kw):
    return tiny_sft_config(out, max_steps=6, learning_rate=1e-2, save_strategy="steps", save_steps=3, **kw)


def _trainer(make_model, tokenizer, dataset, out, specs):
    return InterventionSFTTrainer(
        model=make_model("qwen2", seed=0),
        args=_config(out),
        train_dataset=dataset,
        processing_class=tokenizer,
        interventions=specs,
    )


def _losses(trainer):
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


SPECS = {
    "schedule": lambda d: [
        {
            "operator": "project_out",
            "direction": d,
            "layers": "all",
            "schedule": {"kind": "linear_warmup", "steps": 5},
        }
    ],
    "resample_ablate": lambda d: [{"operator": "resample_ablate", "direction": d, "layers": "all"}],
}


@pytest.mark.parametrize("case", sorted(SPECS))
def test_resume_equals_the_uninterrupted_run(make_model, tokenizer, chat_dataset, tmp_path, case):
    direction = Direction(torch.randn(2, 64, generator=torch.Generator().manual_seed(0)))
    specs = SPECS[case](direction)
    full = _trainer(make_model, tokenizer, chat_dataset, tmp_path / "full", specs)
    full.train()
    checkpoint = tmp_path / "full" / "checkpoint-3"
    if case == "resample_ablate":
        assert (checkpoint / ReferenceSource.STATE_FILE).is_file()
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "full", resumed_dir, ignore=shutil.ignore_patterns("checkpoint-6"))
    resumed = _trainer(make_model, tokenizer, chat_dataset, resumed_dir, specs)
    resumed.train(resume_from_checkpoint=str(resumed_dir / "checkpoint-3"))
    a, b = _losses(full), _losses(resumed)
    assert {4, 5, 6} <= set(b)  # steps 1-3 come from the checkpoint's trainer state
    for step in (4, 5, 6):
        assert abs(a[step] - b[step]) < 1e-6, (step, a[step], b[step])
    for (name, p), q in zip(full.model.named_parameters(), resumed.model.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=name)


def test_resample_resume_without_the_saved_state_drifts_and_warns(
    make_model, tokenizer, chat_dataset, tmp_path
):
    """The control for the test above: without the generator state, the resumed shifts differ."""
    direction = Direction(torch.randn(2, 64, generator=torch.Generator().manual_seed(0)))
    specs = SPECS["resample_ablate"](direction)
    full = _trainer(make_model, tokenizer, chat_dataset, tmp_path / "full", specs)
    full.train()
    (tmp_path / "full" / "checkpoint-3" / ReferenceSource.STATE_FILE).unlink()
    resumed = _trainer(make_model, tokenizer, chat_dataset, tmp_path / "full", specs)
    with pytest.warns(UserWarning, match="fresh row shifts"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    a, b = _losses(full), _losses(resumed)
    assert max(abs(a[s] - b[s]) for s in (4, 5, 6)) > 1e-4
