"""repeng: a ``ControlModel`` over the model (it swaps each controlled decoder layer for a ``ControlModule``),
controls set with ``set_raw_control``; ablation through its ``operator`` keyword (current, control -> new).

repeng builds its padding mask from ``position_ids``; transformers 5 passes them to the layers as ``[1, T]``,
which fails at batch > 1 ("shape '[2, T, 1]' is invalid"), so the forward passes ``position_ids`` of shape
``[B, T]`` (the same positions the model uses by default)."""

from __future__ import annotations

import torch
from repeng import ControlModel

NAME = "repeng"


def _forward(model: torch.nn.Module, layer_ids: list[int], control: dict, **kwargs):
    wrapped = ControlModel(model, layer_ids)
    wrapped.set_raw_control(control, **kwargs)

    def forward(b: dict) -> torch.Tensor:
        ids = b["input_ids"]
        positions = torch.arange(ids.shape[1]).expand(ids.shape[0], -1)
        return wrapped(input_ids=ids, attention_mask=b["attention_mask"], position_ids=positions).logits

    return forward


def steer(model: torch.nn.Module, layer: int, vector: torch.Tensor):
    return _forward(model, [layer], {layer: vector})


def _project_out(current: torch.Tensor, control: torch.Tensor) -> torch.Tensor:
    return current - (current * control).sum(-1, keepdim=True) * control


def ablate(model: torch.nn.Module, direction: torch.Tensor):
    n = model.config.num_hidden_layers
    return _forward(model, list(range(n)), dict.fromkeys(range(n), direction), operator=_project_out)
