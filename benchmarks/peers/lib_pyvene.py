"""pyvene: an ``IntervenableModel`` over the model; steering is ``AdditionIntervention`` with a constant
``source_representation`` on ``block_output``; ablation is a function intervention (pyvene wraps plain
functions as interventions) on every layer's ``block_output``. ``unit_locations=None``: every position.

The constructor freezes the model and puts it in eval mode; a training loop undoes that with
``enable_model_gradients()`` (which unfreezes everything: under a LoRA adapter the base weights are frozen
again here, as the adapter had them)."""

from __future__ import annotations

import pyvene as pv
import torch

NAME = "pyvene"


def _forward(model: torch.nn.Module, representations: list[dict]):
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    wrapped = pv.IntervenableModel(representations, model=model)
    wrapped.enable_model_gradients()
    for n, p in model.named_parameters():
        p.requires_grad_(n in trained)
    model.train()
    model._peer_bench_wrapper = wrapped

    def forward(b: dict) -> torch.Tensor:
        _, out = wrapped(
            {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}, unit_locations=None
        )
        return out.logits

    return forward


def steer(model: torch.nn.Module, layer: int, vector: torch.Tensor):
    rep = {
        "layer": layer,
        "component": "block_output",
        "intervention_type": pv.AdditionIntervention,
        "source_representation": vector,
    }
    return _forward(model, [rep])


def ablate(model: torch.nn.Module, direction: torch.Tensor):
    u = direction

    def project_out(base, source=None, subspaces=None, **kwargs):
        return base - (base @ u).unsqueeze(-1) * u

    n = model.config.num_hidden_layers
    return _forward(
        model, [{"layer": i, "component": "block_output", "intervention": project_out} for i in range(n)]
    )
