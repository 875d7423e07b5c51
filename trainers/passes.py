"""Each forward pass of a preference or RL trainer (DPO, GRPO) in its own phase.

TRL runs several kinds of forward pass inside one training step, most of them through the same hooked
modules. Each intervention acts in the passes its ``phases`` name (default ``["train"]``: the policy only):

================================  =================================================  ===============
pass                              how keel recognises it                             phase
================================  =================================================  ===============
policy loss forward (gradients)   the step: ``training_step`` / ``prediction_step``  train / eval
policy scoring, no gradients      the step (GRPO's old log-probs)                    train / eval
reference, PEFT                   a call of the policy with its adapters off (or     reference
                                  TRL's ``"ref"`` adapter active)
reference, separate model         any call of ``ref_model`` (its own set, attached   reference
                                  with the policy's)
sampling (GRPO)                   the trainer's generation seam                      generate
================================  =================================================  ===============

Token masks follow each call: a call that carries ``labels`` (TRL's loss, reference and scoring passes all
do) gets the completion mask ``labels != -100`` of that very call, so chunked scoring passes are masked
right; while sampling, the prefill is prompt and every one-position (KV-cache) step is a completion token.
Diagnostics (projection norms, hits) are collected in the step's own passes only, never in reference or
sampling passes, so the logged numbers mean what they mean for SFT.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from interventions import InterventionSet, TokenContext, unwrap_model
from interventions.reference import ReferenceSource, is_peft_model

REFERENCE, GENERATE = "reference", "generate"
REFERENCE_ADAPTER = "ref"  # the adapter TRL's DPO creates when re-training an existing adapter


def adapters_off(model: nn.Module) -> bool:
    """Whether a PEFT ``model`` runs as its reference right now: adapters disabled (``disable_adapter()``),
    or TRL's ``"ref"`` adapter active."""
    if not is_peft_model(model):
        return False
    enabled = getattr(model, "has_active_enabled_adapter", None)
    if enabled is None:
        enabled = not getattr(model, "_adapters_disabled", False)
    return not enabled or getattr(model, "active_adapter", None) == REFERENCE_ADAPTER


def reference_specs(interventions) -> list:
    return [spec for spec in interventions if REFERENCE in spec.phases]


class PassRouter:
    """Switches an :class:`InterventionSet` to the phase of each forward pass a trainer makes.

    ``policy``: the trainer's model (``trainer.model``, PEFT-wrapped or not): hooks on its top module see
    every loss, scoring and PEFT-reference call. ``ref_model``: a separate reference model, which gets its
    own set (the interventions with ``reference`` in their phases), always in phase ``reference``.
    ``reference_source`` with ``capture_per_call``: reference operators (reference_ablate) get the reference
    model's pass over each call's own inputs (GRPO, whose policy passes run on batches TRL forms inside
    the step); without it the trainer captures once per step, before the loss forward.

    A context manager, like the set: hooks on while inside, removed (only ours) on exit.
    """

    def __init__(
        self,
        intervention_set: InterventionSet,
        policy: nn.Module,
        ref_model: nn.Module | None = None,
        reference_source: ReferenceSource | None = None,
        capture_per_call: bool = False,
    ):
        self.iset = intervention_set
        self.policy = policy
        self.ref_model = ref_model
        specs = reference_specs(intervention_set.interventions)
        self.ref_set: InterventionSet | None = None
        if ref_model is not None and specs:
            self.ref_set = InterventionSet(ref_model, specs, layers_path=intervention_set.layers_path)
        self.source = reference_source
        self.capture_per_call = capture_per_call
        self._calls: list[tuple[InterventionSet, contextlib.AbstractContextManager, tuple]] = []
        self._handles: list = []
        self._depth = 0

    # --- lifetime ----------------------------------------------------------------------------------
    def __enter__(self) -> PassRouter:
        self._depth += 1
        if self._depth > 1:
            return self
        try:
            self._handles.append(self.policy.register_forward_pre_hook(self._enter_policy, with_kwargs=True))
            self._handles.append(self.policy.register_forward_hook(self._exit_call, always_call=True))
            if self.ref_set is not None:
                self.ref_set.attach()
                self._handles.append(
                    self.ref_model.register_forward_pre_hook(self._enter_reference, with_kwargs=True)
                )
                self._handles.append(self.ref_model.register_forward_hook(self._exit_call, always_call=True))
        except BaseException:
            self._depth = 1
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._depth = max(self._depth - 1, 0)
        if self._depth:
            return
        while self._calls:  # a call that never returned (an exception before our exit hook ran)
            self._exit_call(None, None, None)
        while self._handles:
            self._handles.pop().remove()
        if self.ref_set is not None:
            self.ref_set.detach(force=True)

    # --- per call ----------------------------------------------------------------------------------
    def _push(self, iset: InterventionSet, phase: str | None, kwargs: dict) -> None:
        switch = iset.phase(phase)
        switch.__enter__()
        self._calls.append((iset, switch, (iset.context, iset.collect_stats)))
        labels, attention_mask = kwargs.get("labels"), kwargs.get("attention_mask")
        if torch.is_tensor(labels) and labels.dim() == 2:
            if not (torch.is_tensor(attention_mask) and attention_mask.dim() == 2):
                attention_mask = None
            iset.set_batch(attention_mask=attention_mask, labels=labels)
        if phase in (REFERENCE, GENERATE):
            iset.collect_stats = False

    def _enter_policy(self, module, args, kwargs) -> None:
        phase = self.iset.current_phase
        if phase is not None and phase != GENERATE and adapters_off(self.policy):
            phase = REFERENCE
        self._push(self.iset, phase, kwargs)
        if (
            self.capture_per_call
            and self.source is not None
            and phase in ("train", "eval")
            and self.iset.needs_reference_in(phase)
            and torch.is_tensor(kwargs.get("input_ids"))
        ):
            inputs = {k: kwargs.get(k) for k in ("input_ids", "attention_mask", "position_ids")}
            self.source.capture(self.iset, phase, **inputs)

    def _enter_reference(self, module, args, kwargs) -> None:
        self._push(self.ref_set, REFERENCE, kwargs)

    def _exit_call(self, module, args, output) -> None:
        if not self._calls:
            return None
        iset, switch, (context, collect_stats) = self._calls.pop()
        iset.context, iset.collect_stats = context, collect_stats
        switch.__exit__(None, None, None)
        return None

    # --- sampling ----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def generating(self, model: nn.Module | None = None) -> Iterator[None]:
        """Phase ``generate`` around sampling from ``model`` (default: the policy): only interventions with
        ``generate`` in their phases act. Masks follow the generated tokens: the prefill is prompt (padding
        excluded through the call's attention mask), each one-position (KV-cache) step a completion token."""
        iset = self.iset
        base = unwrap_model(model if model is not None else self.policy)

        def follow(module, args, kwargs):
            mask = kwargs.get("attention_mask")
            iset.context = TokenContext(
                attention_mask=mask if torch.is_tensor(mask) and mask.dim() == 2 else None, generating=True
            )

        saved = (iset.context, iset.collect_stats)
        handle = base.register_forward_pre_hook(follow, with_kwargs=True)
        iset.set_batch(generating=True)
        iset.collect_stats = False
        try:
            with iset.phase(GENERATE):
                yield
        finally:
            handle.remove()
            iset.context, iset.collect_stats = saved

    @contextlib.contextmanager
    def reference_pass(self, model: nn.Module, inputs: dict) -> Iterator[None]:
        """An explicit reference pass over ``inputs`` (DPO's ``compute_ref_log_probs``): the policy's set in
        phase ``reference`` when ``model`` is the policy, the reference set otherwise."""
        same = unwrap_model(model) is unwrap_model(self.policy)
        iset = self.iset if same else self.ref_set
        if iset is None:
            yield
            return
        with self, iset:
            self._push(iset, REFERENCE, {})
            iset.set_batch(
                attention_mask=inputs.get("attention_mask"), completion_mask=inputs.get("completion_mask")
            )
            try:
                yield
            finally:
                self._exit_call(None, None, None)
