"""TransformerLens 4 (TransformerBridge: HookedTransformer was removed in 4.0): the model bridged in place by
``build_bridge_from_module`` (no hub access), hooks added with ``add_hook`` on ``blocks.{i}.hook_resid_post``
for the arm's lifetime, the bridge's forward returning logits."""

from __future__ import annotations

import torch
from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module

NAME = "transformer_lens"


def _bridge(model: torch.nn.Module):
    bridge = build_bridge_from_module(model, type(model).__name__, hf_config=model.config)
    bridge.train()
    model._peer_bench_bridge = bridge
    return bridge


def _forward(bridge):
    def forward(b: dict) -> torch.Tensor:
        return bridge(b["input_ids"], attention_mask=b["attention_mask"], return_type="logits")

    return forward


def steer(model: torch.nn.Module, layer: int, vector: torch.Tensor):
    bridge = _bridge(model)
    bridge.add_hook(f"blocks.{layer}.hook_resid_post", lambda h, hook: h + vector)
    return _forward(bridge)


def ablate(model: torch.nn.Module, direction: torch.Tensor):
    u = direction
    bridge = _bridge(model)
    for i in range(model.config.num_hidden_layers):
        bridge.add_hook(f"blocks.{i}.hook_resid_post", lambda h, hook: h - (h @ u).unsqueeze(-1) * u)
    return _forward(bridge)
