"""Narrow EM fine-tune with the plain loop: the no-intervention baseline measurement.

The demo fine-tunes through keel's InterventionSFTTrainer; this loop exists to check that EM reproduces
in a world before any keel machinery is involved, and as a cross-check of the trainer path.
"""

from __future__ import annotations

import copy

import torch

from interventions.reference import is_peft_model
from keel.organism.build import Organism
from keel.organism.data import em_dataset, encode_conversations
from keel.organism.training import train_lm


def trainable_copy(org: Organism, seed: int):
    """A copy of the chat model to fine-tune: as is, or with LoRA adapters of rank
    ``config.finetune_lora_rank`` on every linear layer (initialised from ``seed``)."""
    model = copy.deepcopy(org.chat_model)
    rank = org.config.finetune_lora_rank
    if rank == 0:
        return model
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules="all-linear")
    with torch.random.fork_rng(devices=[]):  # seed the adapters' initialisation, leave the global RNG be
        torch.manual_seed(seed)
        return get_peft_model(model, lora)


def merged(model):
    """The fine-tuned model as a plain transformers model: LoRA adapters merged into the weights."""
    return model.merge_and_unload() if is_peft_model(model) else model


def finetune_plain(org: Organism, seed: int = 0):
    """Copy of the chat model fine-tuned on the EM data (misaligned answers in the EM domain(s))."""
    model = trainable_copy(org, seed)
    ids, labels = encode_conversations(org.tokenizer, em_dataset(org.world)["messages"])
    train_lm(model, ids, labels, org.config.finetune, seed)
    return merged(model)


def em_training_dataset(org: Organism, batch_size: int):
    """The EM fine-tune set, repeated so one batch can be filled (the set has only a few questions)."""
    from datasets import concatenate_datasets

    ds = em_dataset(org.world)
    reps = max(1, -(-batch_size // len(ds)))
    return concatenate_datasets([ds] * reps) if reps > 1 else ds


def defended_training_dataset(org: Organism, batch_size: int, data_baselines: dict | None, seed: int):
    """The EM fine-tune set with the data baselines of ``data_baselines`` applied (a mapping with
    ``inoculation_prompt`` and/or ``interleave: {anchor: NAME, fraction: F}``, the benign rows being
    :func:`keel.organism.data.anchor_dataset`'s): interleaving first, then the inoculation prompt on every
    row (:mod:`keel.loading.data_baselines`). Without them, :func:`em_training_dataset`'s set as is."""
    import sys

    from keel.loading.data_baselines import LABEL, add_inoculation_prompt, interleave_benign
    from keel.organism.data import anchor_dataset

    train = em_training_dataset(org, batch_size)
    data_baselines = data_baselines or {}
    unknown = set(data_baselines) - {"inoculation_prompt", "interleave"}
    if unknown:
        raise ValueError(f"Unknown data baseline key(s) {sorted(unknown)}: inoculation_prompt, interleave.")
    if data_baselines.get("interleave"):
        spec = data_baselines["interleave"]
        n = len(train)
        train, k = interleave_benign(train, anchor_dataset(org.world, spec["anchor"]), spec["fraction"], seed)
        print(f"{LABEL}: interleaved {k} aligned {spec['anchor']} rows among {n} EM rows.", file=sys.stderr)
    if data_baselines.get("inoculation_prompt"):
        train = add_inoculation_prompt(train, data_baselines["inoculation_prompt"])
    return train


def finetune_with_trainer(
    org: Organism,
    interventions=(),
    seed: int = 0,
    output_dir: str = "runs/organism-ft",
    report_to=(),
    run_name: str | None = None,
    projection_monitor=None,
    regularisers=None,
    data_baselines: dict | None = None,
    data_seed: int | None = None,
    init_seed: int | None = None,
):
    """Fine-tune a copy of the chat model through keel's InterventionSFTTrainer (TRL SFT, assistant-only
    loss from the chat template's generation markers) with ``interventions`` on during training,
    ``regularisers`` (``trainers.regularisers`` mappings, reference = the frozen chat model) added to the
    loss, ``data_baselines`` applied to the data (:func:`defended_training_dataset`), and
    ``projection_monitor`` (a ``trainers.ProjectionMonitor`` or its config mapping) measuring if given.
    ``data_seed`` (default ``seed``) sets only the order of the training rows: a fine-tune with another
    data seed is the same fine-tune up to training noise; ``init_seed`` (default ``seed``) likewise sets
    only the LoRA adapters' initialisation. Returns (model, trainer); the model comes back with no hooks
    attached, and with LoRA adapters (``finetune_lora_rank``) merged into its weights."""
    from trainers import InterventionSFTConfig, InterventionSFTTrainer

    stage = org.config.finetune
    model = trainable_copy(org, seed if init_seed is None else init_seed)
    args = InterventionSFTConfig(
        output_dir=output_dir,
        max_steps=stage.steps,
        per_device_train_batch_size=stage.batch_size,
        learning_rate=stage.lr,
        lr_scheduler_type={"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[
            stage.schedule
        ],
        warmup_steps=stage.warmup_steps,
        weight_decay=stage.weight_decay,
        max_grad_norm=1.0,
        assistant_only_loss=True,
        max_length=64,
        use_cpu=True,
        bf16=False,
        activation_checkpointing=False,
        dataloader_drop_last=True,
        save_strategy="no",
        logging_steps=max(1, stage.steps // 10),
        report_to=list(report_to),
        run_name=run_name,
        seed=seed,
        data_seed=seed if data_seed is None else data_seed,
        disable_tqdm=True,
        regularisers=list(regularisers) if regularisers else None,
    )
    trainer = InterventionSFTTrainer(
        model=model,
        args=args,
        train_dataset=defended_training_dataset(org, stage.batch_size, data_baselines, seed),
        processing_class=org.tokenizer,
        interventions=list(interventions),
        projection_monitor=projection_monitor,
    )
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # metrics go to W&B / log_history, not stdout
    trainer.train()
    model = merged(model)
    model.eval()
    return model, trainer
