"""The CPU settings every trainer test starts from (a module, not a conftest: test folders have their own)."""

from __future__ import annotations

# What every tiny CPU trainer test sets, whatever the TRL trainer: deterministic, a log per step, no saving.
TINY_TRAINER_SETTINGS = dict(
    use_cpu=True,
    bf16=False,
    report_to=[],
    logging_steps=1,
    save_strategy="no",
    gradient_checkpointing=False,
    seed=0,
)

# Both processes of a two-process (gloo) SFT test, besides its steps, batch size and learning rate.
DDP_SFT_SETTINGS = dict(
    TINY_TRAINER_SETTINGS,
    assistant_only_loss=True,
    activation_checkpointing=False,
    data_seed=0,
    ddp_find_unused_parameters=False,
    disable_tqdm=True,
)

TINY_SFT_SETTINGS = dict(
    TINY_TRAINER_SETTINGS,
    max_steps=4,
    per_device_train_batch_size=4,
    learning_rate=1e-3,
    assistant_only_loss=True,
    data_seed=0,
    dataloader_drop_last=True,
)


def tiny_sft_config(folder, **overrides):
    """An InterventionSFTConfig for tiny CPU runs: deterministic, one log per step, no saving
    (``output_dir`` in ``overrides`` wins)."""
    from trainers import InterventionSFTConfig

    settings = {**TINY_SFT_SETTINGS, "output_dir": str(folder), **overrides}
    return InterventionSFTConfig(**settings)
