"""The CPU settings every trainer test starts from (a module, not a conftest: test folders have their own)."""

from __future__ import annotations

TINY_SFT_SETTINGS = dict(
    max_steps=4,
    per_device_train_batch_size=4,
    learning_rate=1e-3,
    use_cpu=True,
    bf16=False,
    report_to=[],
    logging_steps=1,
    save_strategy="no",
    assistant_only_loss=True,
    gradient_checkpointing=False,
    seed=0,
    data_seed=0,
    dataloader_drop_last=True,
)


def tiny_sft_config(folder, **overrides):
    """An InterventionSFTConfig for tiny CPU runs: deterministic, one log per step, no saving
    (``output_dir`` in ``overrides`` wins)."""
    from trainers import InterventionSFTConfig

    settings = {**TINY_SFT_SETTINGS, "output_dir": str(folder), **overrides}
    return InterventionSFTConfig(**settings)
