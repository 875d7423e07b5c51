"""InterventionSet: the runtime that puts interventions into a model through forward hooks.

One named hook per site module, registered once (``attach`` / context manager) and switched by phase,
so a training loop never adds and removes hooks per step. It owns only its own handles and removes
them in ``finally``; foreign hooks (PEFT's, a user's) are never touched. Hooks are pure functions of
their inputs and of state set before the forward (phase, masks, coefficients), so gradient
checkpointing's recompute sees the same computation.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from . import operators
from .direction import DirectionError
from .sites import decoder_layers, hidden_size, register_site_hook, resolve_layers, unwrap_model
from .spec import Intervention, check_unique_names, prepare_direction

# Sets attached to each model (weakly held: a model that is gone takes its entry with it).
_ATTACHED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass
class _BoundOp:
    """One intervention at one layer, with its tensors resolved for this model."""

    spec: Intervention
    layer: int
    vectors: torch.Tensor  # [k, d]; orthonormal when the operator needs a basis
    basis: torch.Tensor  # orthonormal basis used for diagnostics
    mean: torch.Tensor | None
    value: torch.Tensor | None
    coefficient: float
    reference: torch.Tensor | None = None  # reference operators: the reference model's coords, this batch
    _cache: dict = field(default_factory=dict)

    @property
    def needs_reference(self) -> bool:
        return operators.REFERENCE in self.spec.op.needs

    def on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        if device not in self._cache:
            mean = None if self.mean is None else self.mean.to(device)
            self._cache[device] = (self.vectors.to(device), self.basis.to(device), mean)
        return self._cache[device]

    def apply(self, h: torch.Tensor) -> torch.Tensor:
        vectors, _, mean = self.on(h.device)
        inputs = operators.OperatorInputs(
            vectors,
            mean,
            None if self.value is None else self.value.to(h.device),
            self._reference_for(h) if self.needs_reference else None,
        )
        return self.spec.op.apply(h, inputs, self.coefficient)

    def _reference_for(self, h: torch.Tensor) -> torch.Tensor:
        if self.reference is None:
            raise RuntimeError(
                f"Intervention {self.spec.name!r} ({self.spec.operator}) ran without the reference model's "
                "activations for this batch. Inside keel trainers they come from the trainer's reference "
                "model; elsewhere call interventions.ReferenceSource(...).capture(iset, input_ids=...) first."
            )
        if self.reference.shape[:-1] != h.shape[:-1]:
            raise RuntimeError(
                f"Reference activations of shape {tuple(self.reference.shape[:-1])} do not match activations "
                f"{tuple(h.shape[:-1])} at layer {self.layer}; the reference was captured on a different batch."
            )
        return self.reference.to(h.device)


@dataclass
class TokenContext:
    """Per-batch token masks the trainer (or generation helper) sets before a forward.

    ``generating``: during cached generation, a pass over more than one position is the prompt prefill
    and a one-position pass is a newly generated (completion) token.
    """

    attention_mask: torch.Tensor | None = None
    completion_mask: torch.Tensor | None = None
    generating: bool = False

    def real_tokens(self, h: torch.Tensor) -> torch.Tensor | None:
        """Non-padding positions of ``h`` (``[B, T]``), when the attention mask says which they are."""
        if self.attention_mask is None or self.attention_mask.dim() != 2:
            return None
        mask = self.attention_mask[:, -h.shape[1] :].to(h.device).bool()
        return mask if mask.shape == h.shape[:2] else None

    def mask(self, tokens: str, h: torch.Tensor) -> torch.Tensor | None:
        if tokens == "all":
            return None
        B, T = h.shape[0], h.shape[1]
        if self.generating:
            if T == 1:
                return torch.full((B, 1), tokens == "completion", device=h.device)
            prompt = (
                self.attention_mask[:, -T:].bool()
                if self.attention_mask is not None
                else torch.ones(B, T, dtype=torch.bool, device=h.device)
            )
            return prompt if tokens == "prompt" else torch.zeros_like(prompt)
        if self.completion_mask is None:
            raise RuntimeError(
                f"An intervention with tokens={tokens!r} ran without a completion mask. Inside keel trainers "
                "this comes from the batch's labels; elsewhere call InterventionSet.set_batch(labels=...)."
            )
        completion = self.completion_mask.to(h.device)
        if completion.shape != (B, T):
            raise RuntimeError(
                f"Completion mask of shape {tuple(completion.shape)} does not match activations [{B}, {T}]; "
                "set_batch() was given a different batch than the model is running on."
            )
        if tokens == "completion":
            return completion
        prompt = ~completion
        if self.attention_mask is not None:
            prompt = prompt & self.attention_mask.to(h.device).bool()
        return prompt


class InterventionSet:
    """Interventions resolved against one model, attached as forward hooks while in use.

    Usage::

        iset = InterventionSet(model, [Intervention("project_out", "dir.safetensors", layers=[12])])
        with iset, iset.phase("train"):
            loss = model(**batch).loss
    """

    def __init__(
        self,
        model: nn.Module,
        interventions: Sequence[Intervention | dict],
        layers_path: str | None = None,
        allow_stacking: bool = False,
    ):
        self.model = model
        self.layers_path = layers_path
        self.interventions = [Intervention.from_dict(i) for i in interventions]
        check_unique_names(self.interventions)
        self.allow_stacking = allow_stacking
        self.context = TokenContext()
        self._phase: str | None = None
        self._handles: list = []
        self._depth = 0
        self.step = 0
        self.collect_stats = True  # trainers turn this off on steps whose metrics will not be logged
        self._ops_by_site: dict[tuple[str, int], list[_BoundOp]] = {}
        self._stats: dict[str, dict[str, torch.Tensor | int]] = {}
        self._resolve()

    # --- construction ------------------------------------------------------------------------------
    def _resolve(self) -> None:
        num_layers = len(decoder_layers(self.model, self.layers_path))
        d_model = hidden_size(self.model)
        for spec in self.interventions:
            layer_spec = spec.layers if spec.layers is not None else spec.default_layers(d_model)
            layers = resolve_layers(layer_spec, num_layers)
            for layer, direction in spec.directions_by_layer(layers, d_model).items():
                try:
                    direction.check_usable(d_model)
                except DirectionError as err:
                    raise DirectionError(f"Intervention {spec.name!r} at layer {layer}: {err}") from None
                vectors, mean, value = prepare_direction(spec, direction)
                needs_basis = operators.BASIS in spec.op.needs
                basis = vectors if needs_basis else direction.orthonormalized().vectors
                op = _BoundOp(spec, layer, vectors, basis, mean, value, spec.coefficient_at(0))
                self._ops_by_site.setdefault((spec.site, layer), []).append(op)

    @property
    def ops(self) -> list[_BoundOp]:
        return [op for ops in self._ops_by_site.values() for op in ops]

    def phases(self) -> set[str]:
        return {p for spec in self.interventions for p in spec.phases}

    # --- lifetime ----------------------------------------------------------------------------------
    def attach(self) -> InterventionSet:
        """Register the hooks (idempotent: nested use keeps one set of hooks)."""
        self._depth += 1
        if self._depth > 1:
            return self
        try:
            self._check_stacking()
            for (kind, layer), ops in self._ops_by_site.items():
                run = functools.partial(self._run_ops, ops)
                self._handles.append(register_site_hook(self.model, kind, layer, run, self.layers_path))
        except BaseException:
            self.detach(force=True)
            raise
        return self

    def detach(self, force: bool = False) -> None:
        """Remove exactly the handles this set registered."""
        self._depth = 0 if force else max(self._depth - 1, 0)
        if self._depth == 0:
            while self._handles:
                self._handles.pop().remove()
            _ATTACHED.get(unwrap_model(self.model), set()).discard(self)

    def _check_stacking(self) -> None:
        """Two sets acting at the same site of one model stack silently (two ``add`` steer twice): refuse
        unless both sets were built with ``allow_stacking=True``."""
        others = _ATTACHED.setdefault(unwrap_model(self.model), set())
        for other in others:
            shared = sorted(set(self._ops_by_site) & set(other._ops_by_site))
            if shared and not (self.allow_stacking and other.allow_stacking):
                mine = sorted({op.spec.name for key in shared for op in self._ops_by_site[key]})
                theirs = sorted({op.spec.name for key in shared for op in other._ops_by_site[key]})
                raise RuntimeError(
                    f"Another InterventionSet ({theirs}) is attached to this model at {shared}, where this one "
                    f"({mine}) acts too: their effects would stack. Detach it first, merge them into one set, "
                    "or build both with allow_stacking=True if stacking is what you want."
                )
        others.add(self)

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def __enter__(self) -> InterventionSet:
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    @contextlib.contextmanager
    def phase(self, name: str | None) -> Iterator[None]:
        """Switch the interventions of phase ``name`` on for the block (None: all off)."""
        previous, self._phase = self._phase, name
        try:
            yield
        finally:
            self._phase = previous

    @property
    def current_phase(self) -> str | None:
        return self._phase

    # --- per-batch / per-step state ----------------------------------------------------------------
    def set_batch(
        self, attention_mask=None, labels=None, completion_mask=None, generating: bool = False
    ) -> None:
        """Token masks for the next forward: completion = ``labels != -100`` unless given directly."""
        if completion_mask is None and labels is not None:
            completion_mask = labels != -100
        self.context = TokenContext(attention_mask, completion_mask, generating)

    def reference_ops(self, phase: str | None = None) -> list[_BoundOp]:
        """The bound operators that read a reference pass (in ``phase``, when given)."""
        return [op for op in self.ops if op.needs_reference and (phase is None or phase in op.spec.phases)]

    @property
    def needs_reference(self) -> bool:
        """Whether some intervention takes its target from a reference model's pass (reference_ablate)."""
        return bool(self.reference_ops())

    def needs_reference_in(self, phase: str) -> bool:
        return bool(self.reference_ops(phase))

    def set_step(self, step: int) -> None:
        """Move scheduled coefficients to training step ``step``."""
        self.step = step
        for op in self.ops:
            op.coefficient = op.spec.coefficient_at(step)

    # --- hooks -------------------------------------------------------------------------------------
    def _active(self, op: _BoundOp) -> bool:
        return self._phase is not None and self._phase in op.spec.phases and op.coefficient != 0.0

    def _run_ops(self, ops: list[_BoundOp], h: torch.Tensor) -> torch.Tensor | None:
        changed = False
        for op in ops:
            if not self._active(op):
                continue
            mask = self.context.mask(op.spec.tokens, h)
            new = op.apply(h)
            if mask is not None:
                new = torch.where(mask.unsqueeze(-1), new, h)
            if self.collect_stats:
                self._record(op, h, new, mask)
            h, changed = new, True
        return h if changed else None

    # --- diagnostics -------------------------------------------------------------------------------
    @torch.no_grad()
    def _record(self, op: _BoundOp, before: torch.Tensor, after: torch.Tensor, mask) -> None:
        _, basis, _ = op.on(before.device)
        p_before = operators.projection(before, basis).abs().mean(-1)
        p_after = operators.projection(after, basis).abs().mean(-1)
        if mask is None:  # count real tokens only: padding would make the mean depend on how rows are batched
            mask = self.context.real_tokens(before)
        if mask is not None:
            m = mask.to(p_before.dtype)
            s_before, s_after, n = (p_before * m).sum(), (p_after * m).sum(), m.sum()
        else:
            s_before, s_after, n = p_before.sum(), p_after.sum(), torch.tensor(float(p_before.numel()))
        key = f"{op.spec.name}/L{op.layer}"
        st = self._stats.setdefault(key, {"before": 0.0, "after": 0.0, "tokens": 0.0, "hits": 0})
        st["before"] = st["before"] + s_before
        st["after"] = st["after"] + s_after
        st["tokens"] = st["tokens"] + n.to(s_before.device)
        st["hits"] += 1

    def pop_metrics(
        self, prefix: str = "interventions/", sum_over_processes=None, processes: int = 1
    ) -> dict[str, float]:
        """Mean |projection| before/after each operator (token-weighted) and hook hits per process since the
        last call, then reset. Under several processes pass ``sum_over_processes`` (a function summing a
        tensor across them, e.g. ``accelerator.reduce(t, "sum")``) and their number: every process must
        call this at the same step, with the same interventions."""
        keys = sorted(self._stats)
        sums = torch.tensor(
            [[float(self._stats[k][f]) for f in ("before", "after", "tokens", "hits")] for k in keys],
            dtype=torch.float64,
        ).reshape(len(keys), 4)
        if sum_over_processes is not None and processes > 1:
            sums = sum_over_processes(sums)
        out = {}
        for key, (before, after, tokens, hits) in zip(keys, sums.tolist()):
            if tokens > 0:
                out[f"{prefix}{key}/proj_before"] = before / tokens
                out[f"{prefix}{key}/proj_after"] = after / tokens
            out[f"{prefix}{key}/hits"] = hits / max(processes, 1)
        self._stats = {}
        return out
