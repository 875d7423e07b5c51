"""ReferenceSource: what the reference operators (``reference_ablate``, ``resample_ablate``) read.

The reference is the model as it was before fine-tuning: a frozen copy, or, for a PEFT model, the same
model with its adapters switched off (no second copy of the weights). One pass per batch serves every
reference operator of a set. ``resample_ablate`` takes each row's values from another row (rows shifted
by a seeded random offset); that generator is this object's state, saved and restored with trainer
checkpoints so a resumed run draws the same shifts as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from . import operators
from .runtime import InterventionSet
from .sites import register_site_hook, unwrap_model

REFERENCE_INPUTS = ("input_ids", "attention_mask", "position_ids")


def is_peft_model(model: nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def frozen_copy(model: nn.Module) -> nn.Module:
    """A frozen deep copy of ``model`` (unwrapped from DDP/compile wrappers), in eval mode."""
    ref = copy.deepcopy(unwrap_model(model)).eval()
    # Trainers and accelerate may set ``forward`` on the instance (a wrapper closing over the original
    # module). deepcopy does not copy closures, so the copy's forward would run the policy: drop them.
    for module in ref.modules():
        module.__dict__.pop("forward", None)
    ref.requires_grad_(False)
    return ref


class ReferenceSource:
    """Runs the reference pass for an :class:`InterventionSet` and hands its reference operators their
    per-token coordinates.

    ``ReferenceSource.for_model(model)``: a PEFT model is its own reference (adapters off); any other
    model is deep-copied once, as it is now. Pass ``reference_model`` to use a model of your own.
    """

    STATE_FILE = "keel_reference_state.safetensors"

    def __init__(self, model: nn.Module, adapter_off: bool = False, seed: int = 0, layers_path=None):
        self.model = model
        self.adapter_off = adapter_off
        self.layers_path = layers_path
        self.generator = torch.Generator().manual_seed(seed)
        self.passes = 0  # reference forwards run so far (one per batch, whatever the number of consumers)

    @classmethod
    def for_model(
        cls, model: nn.Module, reference_model: nn.Module | None = None, seed: int = 0, layers_path=None
    ):
        if reference_model is not None:
            return cls(reference_model, seed=seed, layers_path=layers_path)
        if is_peft_model(model):
            return cls(model, adapter_off=True, seed=seed, layers_path=layers_path)
        return cls(frozen_copy(model), seed=seed, layers_path=layers_path)

    # --- the pass ----------------------------------------------------------------------------------
    @torch.no_grad()
    def capture(self, iset: InterventionSet, phase: str | None = None, **inputs) -> None:
        """Run the reference on ``inputs`` (the batch of the next forward) with ``iset``'s hooks off, and
        give each of its reference operators (of ``phase``, when given) the reference's projection at its
        site and layer; ``resample_ablate`` gets another row's values at the same position."""
        ops = iset.reference_ops(phase)
        if not ops:
            return
        device = next(self.model.parameters()).device
        batch = {k: inputs[k].to(device) for k in REFERENCE_INPUTS if inputs.get(k) is not None}
        captured: dict[tuple[str, int], torch.Tensor] = {}
        handles = []

        def keep(key):
            return lambda h: captured.__setitem__(key, h.detach())  # returns None: read only

        adapter_off = self.model.disable_adapter() if self.adapter_off else contextlib.nullcontext()
        try:
            for key in {(op.spec.site, op.layer) for op in ops}:
                handles.append(register_site_hook(self.model, *key, keep(key), self.layers_path))
            with adapter_off, iset.phase(None):
                self.model(**batch)
        finally:
            for handle in handles:
                handle.remove()
        self.passes += 1
        rows = None
        for op in ops:
            h = captured[(op.spec.site, op.layer)]
            coords = operators.projection(h, op.on(h.device)[0])
            if op.spec.op.resample:
                if rows is None:
                    rows = self._shifted_rows(h.shape[0], op.spec.name).to(h.device)
                coords = coords[rows]
            op.reference = coords

    def _shifted_rows(self, batch: int, name: str) -> torch.Tensor:
        if batch < 2:
            raise RuntimeError(
                f"Intervention {name!r} (resample_ablate) takes each row's values from another row of the "
                f"batch, and this batch has {batch}. Use at least 2 rows per device, or reference_ablate."
            )
        shift = int(torch.randint(1, batch, (1,), generator=self.generator))
        return (torch.arange(batch) + shift) % batch

    # --- state, for checkpoints --------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"resample_generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["resample_generator"])

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / self.STATE_FILE
        save_file(self.state_dict(), str(path))
        return path

    def load(self, folder: str | Path) -> bool:
        """Restore the state saved in ``folder``; False when the folder holds none."""
        path = Path(folder) / self.STATE_FILE
        if not path.is_file():
            return False
        self.load_state_dict(load_file(str(path)))
        return True
