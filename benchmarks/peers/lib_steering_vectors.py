"""steering-vectors: a ``SteeringVector`` patched into the model for the arm's lifetime
(``patch_activations``, the persistent form of ``apply``); ablation through its ``ablation_operator``."""

from __future__ import annotations

import torch
from steering_vectors import (
    SteeringVector,
    ablation_operator,
    get_num_matching_layers,
    guess_and_enhance_layer_config,
)

NAME = "steering_vectors"


def _forward(model: torch.nn.Module, vector: SteeringVector, **kwargs):
    model._peer_bench_handle = vector.patch_activations(model, **kwargs)

    def forward(b: dict) -> torch.Tensor:
        return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits

    return forward


def steer(model: torch.nn.Module, layer: int, vector: torch.Tensor):
    return _forward(model, SteeringVector({layer: vector}, "decoder_block"))


def ablate(model: torch.nn.Module, direction: torch.Tensor):
    matcher = guess_and_enhance_layer_config(model, layer_type="decoder_block")["decoder_block"]
    n = get_num_matching_layers(model, matcher)
    vector = SteeringVector(dict.fromkeys(range(n), direction), "decoder_block")
    return _forward(model, vector, operator=ablation_operator())
