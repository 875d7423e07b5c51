"""nnsight: the model wrapped once in ``NNsight``; every training forward is a ``trace`` that sets each
intervened layer's output (``envoy.output = f(envoy.output)``) and saves the logits; the loss and its
backward run after the trace, as in a training loop."""

from __future__ import annotations

import torch
from nnsight import NNsight

NAME = "nnsight"


def _layers(wrapped: NNsight, model: torch.nn.Module):
    envoy = wrapped
    path = "base_model.model.model.layers" if hasattr(model, "peft_config") else "model.layers"
    for part in path.split("."):
        envoy = getattr(envoy, part)
    return envoy


def _forward(model: torch.nn.Module, edit):
    wrapped = NNsight(model)
    layers = _layers(wrapped, model)

    def forward(b: dict) -> torch.Tensor:
        with wrapped.trace(input_ids=b["input_ids"], attention_mask=b["attention_mask"]):
            edit(layers)
            logits = wrapped.output.logits.save()
        return logits

    return forward


def _hidden(out):
    return out[0] if isinstance(out, tuple) else out


def steer(model: torch.nn.Module, layer: int, vector: torch.Tensor):
    def edit(layers):
        out = layers[layer].output
        if isinstance(out, tuple):
            layers[layer].output = (out[0] + vector, *out[1:])
        else:
            layers[layer].output = out + vector

    return _forward(model, edit)


def ablate(model: torch.nn.Module, direction: torch.Tensor):
    u = direction

    def edit(layers):
        for layer in layers:
            out = layer.output
            h = _hidden(out)
            new = h - (h @ u).unsqueeze(-1) * u
            layer.output = (new, *out[1:]) if isinstance(out, tuple) else new

    return _forward(model, edit)
