"""keel: one InterventionSet per arm, attached once, its ``train`` phase on for forward and backward alike
(as keel's trainers do in ``training_step``), diagnostics off (the trainers measure them on logged steps only)."""

from __future__ import annotations

import contextlib

import torch

from interventions import Intervention, InterventionSet

NAME = "keel"


def _forward(model: torch.nn.Module, spec: Intervention):
    iset = InterventionSet(model, [spec])
    iset.collect_stats = False
    stack = contextlib.ExitStack()
    stack.enter_context(iset)
    stack.enter_context(iset.phase("train"))
    model._keel_bench_hooks = stack  # lives as long as the model

    def forward(b: dict) -> torch.Tensor:
        return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits

    return forward


def steer(model: torch.nn.Module, layer: int, vector: torch.Tensor):
    return _forward(model, Intervention("add", vector, layers=[layer], coefficient=1.0))


def ablate(model: torch.nn.Module, direction: torch.Tensor):
    return _forward(model, Intervention("project_out", direction, layers="all"))
