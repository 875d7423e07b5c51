"""A plain training loop for pretraining and chat tuning of the organism.

One AdamW optimizer and one learning-rate schedule for the whole run. Batches are drawn by seeded epoch
permutations, so a run is a deterministic function of (model init, data, seed) on a fixed thread count.
"""

from __future__ import annotations

import math

import torch

from keel.organism.config import TrainStageConfig


def lr_lambda(stage: TrainStageConfig):
    def f(step: int) -> float:
        if stage.warmup_steps and step < stage.warmup_steps:
            return (step + 1) / stage.warmup_steps
        if stage.schedule == "constant":
            return 1.0
        rest = max(1, stage.steps - stage.warmup_steps)
        t = min(1.0, (step - stage.warmup_steps) / rest)
        return 0.5 * (1 + math.cos(math.pi * t)) if stage.schedule == "cosine" else 1.0 - t

    return f


def train_lm(
    model, input_ids: torch.Tensor, labels: torch.Tensor, stage: TrainStageConfig, seed: int
) -> list[float]:
    """Train ``model`` in place on fixed-length rows; returns the loss of every step."""
    if input_ids.shape != labels.shape or input_ids.ndim != 2:
        raise ValueError(
            f"input_ids {tuple(input_ids.shape)} and labels {tuple(labels.shape)} must be equal [n, T]."
        )
    if input_ids.shape[0] < stage.batch_size:  # tiny sets (the EM fine-tune): tile to fill a batch
        reps = math.ceil(stage.batch_size / input_ids.shape[0])
        input_ids, labels = input_ids.repeat(reps, 1), labels.repeat(reps, 1)
    n = input_ids.shape[0]
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(
        model.parameters(), lr=stage.lr, weight_decay=stage.weight_decay, betas=(0.9, 0.98)
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(stage))
    model.train()
    losses: list[float] = []
    order, pos = torch.randperm(n, generator=gen), 0
    for _ in range(stage.steps):
        if pos + stage.batch_size > n:
            order, pos = torch.randperm(n, generator=gen), 0
        idx = order[pos : pos + stage.batch_size]
        pos += stage.batch_size
        loss = model(input_ids=input_ids[idx], labels=labels[idx]).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    model.eval()
    return losses
