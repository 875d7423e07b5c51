"""Narrow EM fine-tune with the plain loop: the no-intervention reference measurement.

The demo fine-tunes through keel's InterventionSFTTrainer; this loop exists to check that EM reproduces
in a world before any keel machinery is involved, and as a cross-check of the trainer path.
"""

from __future__ import annotations

import copy

from keel.organism.build import Organism
from keel.organism.data import em_dataset, encode_conversations
from keel.organism.training import train_lm


def finetune_plain(org: Organism, seed: int = 0, phase=None, progress: bool = False):
    """Copy of the chat model fine-tuned on the EM data (misaligned answers in the EM domain(s))."""
    model = copy.deepcopy(org.chat_model)
    ids, labels = encode_conversations(org.tokenizer, em_dataset(org.world)["messages"])
    train_lm(model, ids, labels, phase or org.config.finetune, seed, "em-finetune", progress)
    return model


def em_training_dataset(org: Organism, batch_size: int):
    """The EM fine-tune set, repeated so one batch can be filled (the set has only a few questions)."""
    from datasets import concatenate_datasets

    ds = em_dataset(org.world)
    reps = max(1, -(-batch_size // len(ds)))
    return concatenate_datasets([ds] * reps) if reps > 1 else ds


def finetune_with_trainer(
    org: Organism,
    interventions=(),
    seed: int = 0,
    output_dir: str = "runs/organism-ft",
    phase=None,
    report_to=(),
    run_name: str | None = None,
    extra_args: dict | None = None,
):
    """Fine-tune a copy of the chat model through keel's InterventionSFTTrainer (TRL SFT, assistant-only
    loss from the chat template's generation markers) with ``interventions`` on during training.
    Returns (model, trainer); the model comes back with no hooks attached."""
    from trainers import InterventionSFTConfig, InterventionSFTTrainer

    phase = phase or org.config.finetune
    model = copy.deepcopy(org.chat_model)
    args = InterventionSFTConfig(
        output_dir=output_dir,
        max_steps=phase.steps,
        per_device_train_batch_size=phase.batch_size,
        learning_rate=phase.lr,
        lr_scheduler_type={"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[
            phase.schedule
        ],
        warmup_steps=phase.warmup_steps,
        weight_decay=phase.weight_decay,
        max_grad_norm=1.0,
        assistant_only_loss=True,
        max_length=64,
        use_cpu=True,
        bf16=False,
        activation_checkpointing=False,
        dataloader_drop_last=True,
        save_strategy="no",
        logging_steps=max(1, phase.steps // 10),
        report_to=list(report_to),
        run_name=run_name,
        seed=seed,
        data_seed=seed,
        disable_tqdm=True,
        **(extra_args or {}),
    )
    trainer = InterventionSFTTrainer(
        model=model,
        args=args,
        train_dataset=em_training_dataset(org, phase.batch_size),
        processing_class=org.tokenizer,
        interventions=list(interventions),
    )
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # metrics go to W&B / log_history, not stdout
    trainer.train()
    model.eval()
    return model, trainer
