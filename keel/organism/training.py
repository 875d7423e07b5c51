"""A plain, correct training loop for pretraining and chat tuning of the organism.

One AdamW optimizer and one learning-rate schedule for the whole run (the prototype restarted its
optimizer every 50 steps by accident). Batches are drawn by seeded epoch permutations, so a run is a
deterministic function of (model init, data, seed) on a fixed thread count.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from keel.organism.config import TrainPhaseConfig


def lr_lambda(phase: TrainPhaseConfig):
    def f(step: int) -> float:
        if phase.warmup_steps and step < phase.warmup_steps:
            return (step + 1) / phase.warmup_steps
        if phase.schedule == "constant":
            return 1.0
        rest = max(1, phase.steps - phase.warmup_steps)
        t = min(1.0, (step - phase.warmup_steps) / rest)
        return 0.5 * (1 + math.cos(math.pi * t)) if phase.schedule == "cosine" else 1.0 - t

    return f


def train_lm(
    model,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    phase: TrainPhaseConfig,
    seed: int,
    desc: str = "train",
    progress: bool = False,
    on_step=None,
) -> list[float]:
    """Train ``model`` in place on fixed-length rows; returns the loss of every step.

    ``on_step(step, model)`` is called after each optimizer step (e.g. to evaluate along the way).
    """
    if input_ids.shape != labels.shape or input_ids.ndim != 2:
        raise ValueError(
            f"input_ids {tuple(input_ids.shape)} and labels {tuple(labels.shape)} must be equal [n, T]."
        )
    if input_ids.shape[0] < phase.batch_size:  # tiny sets (the EM fine-tune): tile to fill a batch
        reps = math.ceil(phase.batch_size / input_ids.shape[0])
        input_ids, labels = input_ids.repeat(reps, 1), labels.repeat(reps, 1)
    n = input_ids.shape[0]
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(
        model.parameters(), lr=phase.lr, weight_decay=phase.weight_decay, betas=(0.9, 0.98)
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(phase))
    model.train()
    losses: list[float] = []
    order, pos = torch.randperm(n, generator=gen), 0
    bar = tqdm(range(phase.steps), desc=desc, disable=not progress, leave=False)
    for _ in bar:
        if pos + phase.batch_size > n:
            order, pos = torch.randperm(n, generator=gen), 0
        idx = order[pos : pos + phase.batch_size]
        pos += phase.batch_size
        loss = model(input_ids=input_ids[idx], labels=labels[idx]).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if on_step is not None:
            model.eval()
            on_step(len(losses), model)
            model.train()
        if progress and len(losses) % 50 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / 50:.3f}")
    model.eval()
    return losses
