"""Causal validation of candidate directions: does intervening on a direction change the behaviour?

Before anyone trains with a direction, apply it (ablate, or add) to the unchanged model on a probe set and
measure how much the unwanted behaviour moves, and how much of the wanted behaviour survives. On the
synthetic organism the probe is the in-context misaligned persona on pretraining-style text; on a real
model it is a judged EM eval of the steered chat model. The prototype behind the synthetic organism found
that this test, not the operator, decided whether ablation prevented EM, so candidates are ranked and
selected by it.

A probe is any callable ``probe(model) -> float`` (a rate or score where higher means more of the
behaviour). It runs under the interventions' ``eval`` phase; interventions with ``tokens`` other than
``all`` need the probe to call ``InterventionSet.set_batch`` itself, so this module uses ``all``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from torch import nn

from .runtime import InterventionSet
from .spec import Intervention

Probe = Callable[[nn.Module], float]


@dataclass
class ValidationResult:
    """One candidate's causal test. ``effect`` = baseline - intervened on the behaviour probe (positive:
    the intervention removes behaviour); ``kept`` = intervened / baseline on the control probe (1.0: the
    wanted behaviour is untouched)."""

    name: str
    baseline: float
    intervened: float
    control_baseline: float | None = None
    control_intervened: float | None = None
    extra: dict = field(default_factory=dict)

    @property
    def effect(self) -> float:
        return self.baseline - self.intervened

    @property
    def relative_effect(self) -> float:
        return self.effect / self.baseline if self.baseline else 0.0

    @property
    def kept(self) -> float | None:
        if self.control_baseline is None or self.control_intervened is None:
            return None
        return self.control_intervened / self.control_baseline if self.control_baseline else 0.0

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "baseline": self.baseline,
            "intervened": self.intervened,
            "effect": self.effect,
            "relative_effect": self.relative_effect,
            "control_baseline": self.control_baseline,
            "control_intervened": self.control_intervened,
            "kept": self.kept,
            **self.extra,
        }


def _as_eval(spec: Intervention | dict) -> Intervention:
    spec = Intervention.from_dict(spec)
    return dataclasses.replace(spec, phases=["eval"], schedule=None)


def measure(model: nn.Module, interventions: Sequence[Intervention | dict], probe: Probe) -> float:
    """``probe(model)`` with ``interventions`` switched on (eval phase); hooks are gone afterwards."""
    iset = InterventionSet(model, [_as_eval(i) for i in interventions])
    with iset, iset.phase("eval"):
        return float(probe(model))


def validate(
    model: nn.Module,
    interventions: Intervention | dict | Sequence[Intervention | dict],
    probe: Probe,
    control_probe: Probe | None = None,
    name: str | None = None,
    baseline: float | None = None,
    control_baseline: float | None = None,
) -> ValidationResult:
    """Causal test of one candidate (one or several interventions applied together).

    Pass ``baseline`` / ``control_baseline`` to reuse the unintervened measurements across candidates.
    """
    specs = [interventions] if isinstance(interventions, (Intervention, Mapping)) else list(interventions)
    if not specs:
        raise ValueError("validate() needs at least one intervention.")
    specs = [_as_eval(s) for s in specs]
    if baseline is None:
        baseline = float(probe(model))
    if control_probe is not None and control_baseline is None:
        control_baseline = float(control_probe(model))
    iset = InterventionSet(model, specs)
    with iset, iset.phase("eval"):
        intervened = float(probe(model))
        control = float(control_probe(model)) if control_probe is not None else None
    return ValidationResult(
        name=name or "+".join(s.name for s in specs),
        baseline=baseline,
        intervened=intervened,
        control_baseline=control_baseline,
        control_intervened=control,
    )


def rank_candidates(
    model: nn.Module,
    candidates: Mapping[str, Intervention | dict | Sequence[Intervention | dict]],
    probe: Probe,
    control_probe: Probe | None = None,
    progress: Callable | None = None,
) -> list[ValidationResult]:
    """Validate every candidate (name -> interventions) and sort by effect, largest first."""
    if not candidates:
        raise ValueError("rank_candidates() got no candidates.")
    base = float(probe(model))
    control_base = float(control_probe(model)) if control_probe is not None else None
    items = list(candidates.items())
    results = [
        validate(model, specs, probe, control_probe, name=name, baseline=base, control_baseline=control_base)
        for name, specs in (progress(items) if progress else items)
    ]
    return sorted(results, key=lambda r: r.effect, reverse=True)


def select(
    results: Sequence[ValidationResult], k: int = 1, min_kept: float | None = None, min_effect: float = 0.0
) -> list[ValidationResult]:
    """The ``k`` strongest candidates whose effect exceeds ``min_effect`` and, when a control probe was
    used, that keep at least ``min_kept`` of the wanted behaviour (a direction that breaks the model also
    "removes" the persona; that is not what we want). Raises if none qualifies, naming the best seen."""
    ok = [
        r
        for r in sorted(results, key=lambda r: r.effect, reverse=True)
        if r.effect > min_effect and (min_kept is None or r.kept is None or r.kept >= min_kept)
    ]
    if not ok:
        best = max(results, key=lambda r: r.effect) if results else None
        raise ValueError(
            "No candidate direction passed validation"
            + (f" (best: {best.name}, effect {best.effect:.3f}, kept {best.kept})" if best else "")
            + "; try other layers/positions, or lower min_kept/min_effect."
        )
    return ok[:k]
