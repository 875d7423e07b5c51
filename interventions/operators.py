"""Pure operators on activations ``h: [..., d]`` with directions ``U: [k, d]``.

No state, no in-place writes: each returns a new tensor, so autograd stays correct and the functions are
testable on plain tensors. Projections are computed in float32 and the update cast back to ``h``'s dtype,
so bf16 activations lose no accuracy in the projection itself. ``alpha`` scales the update: 0 leaves
``h`` unchanged, 1 is the full operation.
"""

from __future__ import annotations

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


OPERATORS = {
    "project_out": project_out,
    "mean_ablate": mean_ablate,
    "reference_ablate": reference_ablate,
    # the same operation; the runtime gives it the reference's values from another row of the batch
    "resample_ablate": reference_ablate,
    "clamp": clamp,
    "add": add,
}
# Operators whose target comes from a reference model's forward pass on the same batch.
NEEDS_REFERENCE = ("reference_ablate", "resample_ablate")
