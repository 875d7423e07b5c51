"""Pure operators on activations ``h: [..., d]`` with directions ``U: [k, d]``.

No state, no in-place writes: each returns a new tensor, so autograd stays correct and the functions are
testable on plain tensors. Projections are computed in float32 and the update cast back to ``h``'s dtype,
so bf16 activations lose no accuracy in the projection itself. ``alpha`` scales the update: 0 leaves
``h`` unchanged, 1 is the full operation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import einsum


def projection(h: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    """Coordinates of ``h`` on the rows of ``U`` (``[..., k]``, float32)."""
    return einsum(h.float(), U.float(), "... d, k d -> ... k")


def _apply(h: torch.Tensor, coords: torch.Tensor, U: torch.Tensor, alpha: float) -> torch.Tensor:
    delta = einsum(coords, U.float(), "... k, k d -> ... d")
    return h + (alpha * delta).to(h.dtype)


def project_out(h: torch.Tensor, U: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """Zero-ablate the subspace spanned by orthonormal rows ``U``: ``h - alpha (h U^T) U``."""
    return _apply(h, -projection(h, U), U, alpha)


def mean_ablate(h: torch.Tensor, U: torch.Tensor, mean: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """Set the projection onto orthonormal ``U`` to a reference ``mean`` (``[k]``) instead of zero.

    Zero is not neutral when the base model's projection sits far from zero; the mean over reference
    data is.
    """
    return _apply(h, mean.float() - projection(h, U), U, alpha)


def clamp(h: torch.Tensor, U: torch.Tensor, value: float | torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """Set the projection onto orthonormal ``U`` to ``value`` (a scalar or ``[k]``)."""
    target = torch.as_tensor(value, dtype=torch.float32, device=h.device)
    return _apply(h, target - projection(h, U), U, alpha)


def reference_ablate(
    h: torch.Tensor, U: torch.Tensor, reference_coords: torch.Tensor, alpha: float = 1.0
) -> torch.Tensor:
    """Set the projection onto orthonormal ``U`` to a reference model's projection at the same tokens
    (``reference_coords: [..., k]``, e.g. the frozen pre-fine-tune model on the same batch).

    Token by token, the subspace carries exactly what it carried before fine-tuning: the fine-tune can
    neither use a change along it nor learn to depend on a value (zero, a mean) the model never has.
    """
    return _apply(h, reference_coords.float() - projection(h, U), U, alpha)


def add(h: torch.Tensor, v: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """Steer: ``h + alpha * sum_k v_k`` (rows of ``v`` are added as given; normalise them first if wanted)."""
    return h + (alpha * v.float().sum(0)).to(h.dtype)


# ---- operators as registered objects ----------------------------------------------------------------

BASIS, VECTORS, MEAN, VALUE, REFERENCE = "basis", "vectors", "mean", "value", "reference"
NEEDS = (BASIS, VECTORS, MEAN, VALUE, REFERENCE)


@dataclass(frozen=True)
class OperatorInputs:
    """What the runtime hands an operator at one site: the direction rows (orthonormal when the operator
    needs a basis), the stored mean, the clamp value and the reference's coordinates, as declared."""

    vectors: torch.Tensor
    mean: torch.Tensor | None = None
    value: torch.Tensor | None = None
    reference: torch.Tensor | None = None


class Operator:
    """An operator keel can run by name from a recipe. Subclass, set ``name`` and ``needs``, implement
    ``apply``, and ``register_operator(MyOperator())``.

    ``needs``: ``basis`` (orthonormal rows) or ``vectors`` (rows as given); ``mean`` (the direction's
    stored reference mean projection); ``value`` (the spec's ``value``); ``reference`` (the reference
    model's coordinates on the same batch). ``resample``: the reference's values come from another row
    of the batch. ``phases``: the phases it can run in (reference operators need a reference pass,
    which keel trainers run for ``train`` and ``eval`` only).
    """

    name: str = ""
    needs: frozenset[str] = frozenset({BASIS})
    resample: bool = False
    phases: tuple[str, ...] | None = None  # None: any phase

    def check(self, value) -> str | None:
        """Problems with the spec's ``value`` for this operator (None when fine); runs when the spec is built."""
        if VALUE in self.needs and value is None:
            return f"operator {self.name!r} needs `value`."
        return None

    def apply(self, h: torch.Tensor, inputs: OperatorInputs, alpha: float) -> torch.Tensor:
        raise NotImplementedError


class ProjectOut(Operator):
    name, needs = "project_out", frozenset({BASIS})

    def apply(self, h, inputs, alpha):
        return project_out(h, inputs.vectors, alpha)


class MeanAblate(Operator):
    name, needs = "mean_ablate", frozenset({BASIS, MEAN})

    def apply(self, h, inputs, alpha):
        return mean_ablate(h, inputs.vectors, inputs.mean, alpha)


class Clamp(Operator):
    name, needs = "clamp", frozenset({BASIS, VALUE})

    def check(self, value):
        if value is None:
            return "operator 'clamp' needs `value` (the projection to clamp to)."
        return None

    def apply(self, h, inputs, alpha):
        return clamp(h, inputs.vectors, inputs.value, alpha)


class ReferenceAblate(Operator):
    name, needs = "reference_ablate", frozenset({BASIS, REFERENCE})
    phases = ("train", "eval")

    def apply(self, h, inputs, alpha):
        return reference_ablate(h, inputs.vectors, inputs.reference, alpha)


class ResampleAblate(ReferenceAblate):
    """The same operation; the runtime gives it the reference's values from another row of the batch."""

    name, resample = "resample_ablate", True


class Add(Operator):
    name, needs = "add", frozenset({VECTORS})

    def apply(self, h, inputs, alpha):
        return add(h, inputs.vectors, alpha)


OPERATORS: dict[str, Operator] = {}


def register_operator(operator: Operator, replace: bool = False) -> Operator:
    """Make ``operator`` usable by its name in specs and recipes."""
    if not isinstance(operator, Operator) or not operator.name:
        raise TypeError("register_operator takes an Operator instance with a `name`.")
    bad = sorted(set(operator.needs) - set(NEEDS))
    if bad or not ({BASIS, VECTORS} & set(operator.needs)):
        raise ValueError(
            f"Operator {operator.name!r} declares needs {sorted(operator.needs)}: choose from {NEEDS}, "
            "with one of 'basis' or 'vectors'."
        )
    if operator.name in OPERATORS and not replace:
        raise ValueError(f"An operator named {operator.name!r} is registered already; pass replace=True.")
    OPERATORS[operator.name] = operator
    return operator


for _op in (ProjectOut(), MeanAblate(), Clamp(), ReferenceAblate(), ResampleAblate(), Add()):
    register_operator(_op)
