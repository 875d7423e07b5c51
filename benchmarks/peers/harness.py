"""The shared harness of the peers benchmark: model, batch, directions, the optimiser step, the
interleaved timing, the fresh-process memory measurement and the comparison with keel's outputs.

It imports only torch, transformers and peft, so it runs in every peer's virtual environment. A
library module (``lib_<name>.py``) supplies ``steer(model, layer, vector)`` and ``ablate(model, unit)``;
each returns a *forward*: a function of the batch that runs the intervened model and returns its logits.
The harness applies the setting (gradient checkpointing, a LoRA adapter) to the model before handing it
to the library, and computes the loss from the logits itself, so every arm takes the same step.
"""

from __future__ import annotations

import gc
import os
import resource
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from benchmarks.overhead import SIZES  # stdlib + torch only: importable in every peer's venv

# The overhead bench's ~50M-parameter shape: 47.9M parameters.
MODEL = dict(SIZES["50m"], max_position_embeddings=256, tie_word_embeddings=False)
BATCH, SEQ = 2, 64
STEER_LAYER = MODEL["num_hidden_layers"] // 2
STEER_COEFFICIENT = 4.0
SETTINGS = ("base", "ckpt", "lora")
OPS = ("steer", "ablate")
CASES = tuple(op if s == "base" else f"{op}_{s}" for s in SETTINGS for op in OPS)
TOLERANCE = 1e-5
# gradients compared with keel's: full model -> these weights; LoRA -> every lora_B (lora_A's grads are 0 at init)
GRAD_PARAMS = (
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.q_proj.weight",
    f"model.layers.{STEER_LAYER}.mlp.down_proj.weight",
    "lm_head.weight",
)

Forward = Callable[[dict], torch.Tensor]


class NotExpressible(Exception):
    """The library has no way to express this case; the message says why."""


def case_name(op: str, setting: str) -> str:
    return op if setting == "base" else f"{op}_{setting}"


def split_case(case: str) -> tuple[str, str]:
    op, _, setting = case.partition("_")
    return op, setting or "base"


def unit(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(MODEL["hidden_size"], generator=g)
    return v / v.norm()


def steer_vector() -> torch.Tensor:
    """What every library adds at ``STEER_LAYER``: ``STEER_COEFFICIENT`` times a unit vector."""
    return STEER_COEFFICIENT * unit(2)


def ablate_direction() -> torch.Tensor:
    """The unit direction every library projects out of every layer's output."""
    return unit(1)


def batch() -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, MODEL["vocab_size"], (BATCH, SEQ), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def build_model(setting: str) -> torch.nn.Module:
    """The random-init Llama-shaped model (seed 0), float32, in training mode, with ``setting`` applied."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(**MODEL, pad_token_id=0, bos_token_id=1, eos_token_id=2, use_cache=False)
    )
    model.train()
    if setting == "ckpt":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif setting == "lora":
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(1)
        cfg = LoraConfig(
            r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"]
        )
        model = get_peft_model(model, cfg)
        model.train()
    elif setting != "base":
        raise ValueError(f"unknown setting {setting!r}")
    return model


def grad_params(model: torch.nn.Module, setting: str) -> dict[str, torch.nn.Parameter]:
    """The parameters whose gradients are compared, by name, taken before a library wraps the model."""
    named = dict(model.named_parameters())
    if setting == "lora":
        return {n: p for n, p in named.items() if "lora_B" in n}
    return {n: named[n] for n in GRAD_PARAMS}


def plain_forward(model: torch.nn.Module) -> Forward:
    def forward(b: dict) -> torch.Tensor:
        return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits

    return forward


def loss_of(logits: torch.Tensor, b: dict) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), b["labels"][:, 1:].flatten())


class Arm:
    """One arm: the model (with its setting), the forward to train through, the parameters the setting
    trains (taken before the library wraps the model, so every arm steps the same ones) and those whose
    gradients are compared with keel's."""

    def __init__(self, library, op: str, setting: str, inner: bool = False):
        self.model = build_model(setting)
        self.params = grad_params(self.model, setting)
        self.trained = [p for p in self.model.parameters() if p.requires_grad]
        # inner: the library gets the PEFT model's transformers model (``get_base_model()``: the LoRA layers
        # live inside it), for libraries that do not accept a PeftModel
        target = self.model.get_base_model() if inner else self.model
        if op == "plain":
            self.forward = plain_forward(self.model)
        elif op == "steer":
            self.forward = library.steer(target, STEER_LAYER, steer_vector())
        elif op == "ablate":
            self.forward = library.ablate(target, ablate_direction())
        else:
            raise ValueError(op)
        self.optimizer = torch.optim.AdamW(self.trained, lr=1e-4)


def train_step(forward: Forward, optimizer: torch.optim.Optimizer, b: dict) -> float:
    """The optimiser step every arm takes: forward, loss, backward, AdamW step, zero_grad."""
    loss = loss_of(forward(b), b)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def outputs(forward: Forward, params: dict, b: dict) -> dict:
    """Logits and the loss gradient wrt ``params`` on one batch (no optimiser step; grads cleared after)."""
    logits = forward(b)
    loss_of(logits, b).backward()
    grads = {n: p.grad.detach().clone() if p.grad is not None else None for n, p in params.items()}
    for p in params.values():
        p.grad = None
    return {"logits": logits.detach().clone(), "grads": grads}


def compare(out: dict, ref: dict) -> dict:
    """Max abs logit difference, max gradient difference relative to max(1, max |reference grad|)."""
    if out["logits"].shape != ref["logits"].shape:
        return {"matches_keel": False, "why": f"logits shape {tuple(out['logits'].shape)} != keel's"}
    logit_diff = float((out["logits"] - ref["logits"]).abs().max())
    grad_diff = 0.0
    for name, r in ref["grads"].items():
        g = out["grads"].get(name)
        if g is None:
            return {"matches_keel": False, "logits_max_diff": logit_diff, "why": f"no gradient for {name}"}
        grad_diff = max(grad_diff, float((g - r).abs().max()) / max(1.0, float(r.abs().max())))
    ok = logit_diff <= TOLERANCE and grad_diff <= TOLERANCE
    return {"matches_keel": ok, "logits_max_diff": logit_diff, "grads_max_rel_diff": grad_diff}


def paired_ratios(times: dict[str, list[float]], base: str = "plain") -> dict[str, float]:
    """Per arm: the median over rounds of its step time over the plain step time of the same round."""
    return {
        arm: statistics.median(t / p for t, p in zip(ts, times[base]))
        for arm, ts in times.items()
        if arm != base and ts
    }


def interleaved_times(arms: dict[str, Arm], b: dict, rounds: int) -> dict[str, list[float]]:
    """One optimiser step per arm in turn, the order rotated every round; round 0 only warms up."""
    order = list(arms)
    times: dict[str, list[float]] = {a: [] for a in order}
    for r in range(rounds + 1):
        for name in order[r % len(order) :] + order[: r % len(order)]:
            arm = arms[name]
            t0 = time.perf_counter()
            train_step(arm.forward, arm.optimizer, b)
            if r > 0:
                times[name].append(time.perf_counter() - t0)
    return times


# ---- memory: a fresh process per arm ------------------------------------------------------------------


def _status(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return float(line.split()[1]) * 1024
    raise KeyError(field)


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS to its current RSS (Linux ``clear_refs``); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> float:
    try:
        return _status("VmHWM")
    except (OSError, KeyError):
        return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def measure_memory(library, op: str, setting: str, steps: int = 2, inner: bool = False) -> float:
    """Peak RSS growth of this (fresh) process from just before the model is built through ``steps``
    optimiser steps: weights, the library's wrapping, optimiser state, activations and gradients."""
    b = batch()
    gc.collect()
    base = _status("VmRSS") if reset_peak_rss() else peak_rss()
    arm = Arm(library, op, setting, inner)
    for _ in range(steps):
        train_step(arm.forward, arm.optimizer, b)
    return peak_rss() - base


def error_text(err: BaseException, limit: int = 600) -> str:
    text = f"{type(err).__name__}: {err}".strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def set_threads() -> None:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
