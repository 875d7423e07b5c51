"""ReferenceSource: what the reference operators (``reference_ablate``, ``resample_ablate``) read.

The reference is the model as it was before fine-tuning: a frozen copy, or, for a PEFT model, the same
model with its adapters switched off (no second copy of the weights). One pass per batch serves every
reference operator of a set. ``resample_ablate`` takes each row's values from another row (rows shifted
by a seeded random offset); that generator is this object's state, saved and restored with trainer
checkpoints so a resumed run draws the same shifts as an uninterrupted one.

Precomputed reference (:class:`ReferenceTable`): what those operators read is k numbers per token per hooked
layer, the starting model's projections onto the held subspaces. ``ReferenceSource.precompute`` runs the
starting model once over the training batches before training and keeps those numbers per example, keyed
by the example's own tokens (:func:`example_key`, carried into each batch by :class:`ReferenceKeyCollator`);
``capture(..., keys=...)`` then reads the batch's rows instead of running a reference forward, and
``resample_ablate`` takes another row's values with the same generator draws as the live pass.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from . import operators
from .runtime import InterventionSet
from .sites import register_site_hook, unwrap_model

REFERENCE_INPUTS = ("input_ids", "attention_mask", "position_ids")
REFERENCE_KEYS = "keel_reference_keys"  # the batch entry ReferenceKeyCollator adds: one key per row


class ReferenceKeyError(RuntimeError):
    """Batches whose rows cannot be matched to precomputed reference values (the live reference is needed)."""


def example_key(example: Mapping) -> bytes:
    """A stable key for one example: a 128-bit hash of its token ids (and packed sequence lengths, when the
    example carries them). The reference's values are a function of these inputs, so equal keys mean equal
    values, whatever the shuffling, the batch an example lands in, or the dataset's row order."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(np.asarray(example["input_ids"], dtype=np.int64).tobytes())
    if example.get("seq_lengths") is not None:
        digest.update(b"|seq_lengths|")
        digest.update(np.asarray(example["seq_lengths"], dtype=np.int64).tobytes())
    return digest.digest()


class ReferenceKeyCollator:
    """Wraps a data collator: each batch it returns also carries ``REFERENCE_KEYS``, the list of its rows'
    :func:`example_key` (plain bytes, which device placement leaves on the host: reading the table needs no
    transfer from the accelerator). The trainer removes the entry before the model sees the batch."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, examples):
        batch = self.collator(examples)
        batch[REFERENCE_KEYS] = [example_key(example) for example in examples]
        return batch

    def __getattr__(self, name):  # pad_token_id, padding_free, ... of the wrapped collator
        if name == "collator":
            raise AttributeError(name)
        return getattr(self.collator, name)


class ReferenceTable:
    """Precomputed reference coordinates: per example key, the projections of the reference pass at every
    position of the row as it was batched (``[T, K]``, float32, on the host), K = the reference operators'
    k values side by side (``columns``: name, layer, k of each). Rows are right-padded; a batch longer than
    a stored row gets zeros at the extra positions, which are padding of that row."""

    def __init__(self, columns: list[tuple[str, int, int]]):
        self.columns = list(columns)
        self.slices: dict[tuple[str, int], slice] = {}
        start = 0
        for name, layer, k in self.columns:
            self.slices[(name, layer)] = slice(start, start + k)
            start += k
        self.width = start
        self.rows: dict[bytes, torch.Tensor] = {}
        self.lengths: dict[bytes, int] = {}  # real (non-padding) tokens of each row

    def __len__(self) -> int:
        return len(self.rows)

    def __contains__(self, key: bytes) -> bool:
        return key in self.rows

    @property
    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.rows.values())

    def add(self, key: bytes, values: torch.Tensor, length: int) -> None:
        """Keep the first values seen for ``key`` (its row in the first training epoch's batch)."""
        if key not in self.rows:
            self.rows[key] = values.detach().to("cpu", torch.float32).contiguous()
            self.lengths[key] = int(length)

    def extend(self, key: bytes, tail: torch.Tensor) -> None:
        """Append values for positions past the stored ones (padding positions, for resample_ablate)."""
        self.rows[key] = torch.cat([self.rows[key], tail.detach().to("cpu", torch.float32)]).contiguous()

    def get(self, keys: list[bytes], length: int) -> torch.Tensor | None:
        """``[B, length, K]`` for the rows ``keys``, or None when a key is missing or a row's real tokens do not
        fit in ``length`` (the batch was built differently from the precompute pass's)."""
        out = torch.zeros(len(keys), length, self.width)
        for b, key in enumerate(keys):
            values = self.rows.get(key)
            if values is None or self.lengths[key] > length:
                return None
            n = min(length, values.shape[0])
            out[b, :n] = values[:n]
        return out


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

    def __init__(
        self,
        model: nn.Module | None,
        adapter_off: bool = False,
        seed: int = 0,
        layers_path=None,
        starting_model: bool = False,
    ):
        self.model = model
        self.adapter_off = adapter_off
        self.layers_path = layers_path
        # ``model`` is the policy itself, as it is before training: a valid reference only until training
        # starts (the precompute pass runs then, with no copy of the weights); release() drops it after.
        self.starting_model = starting_model
        self.generator = torch.Generator().manual_seed(seed)
        self.passes = 0  # reference forwards run so far (one per batch, whatever the number of consumers)
        self.table: ReferenceTable | None = None
        self.table_reads = 0  # batches served from the table instead of a reference forward
        self.precompute_passes = 0  # forwards of the one-off precompute pass
        self.precompute_seconds: float | None = None
        self._warned_miss = False

    @classmethod
    def for_model(
        cls, model: nn.Module, reference_model: nn.Module | None = None, seed: int = 0, layers_path=None
    ):
        if reference_model is not None:
            return cls(reference_model, seed=seed, layers_path=layers_path)
        if is_peft_model(model):
            return cls(model, adapter_off=True, seed=seed, layers_path=layers_path)
        return cls(frozen_copy(model), seed=seed, layers_path=layers_path)

    @classmethod
    def for_precompute(
        cls, model: nn.Module, reference_model: nn.Module | None = None, seed: int = 0, layers_path=None
    ):
        """The source of a precomputed reference: ``reference_model`` when given, a PEFT model with its
        adapters off, or else ``model`` itself as the starting model (no copy: valid until training starts)."""
        if reference_model is not None or is_peft_model(model):
            return cls.for_model(model, reference_model, seed=seed, layers_path=layers_path)
        return cls(unwrap_model(model), seed=seed, layers_path=layers_path, starting_model=True)

    def release(self) -> None:
        """Drop the starting model (the policy, about to train): from now on only the table serves."""
        if self.starting_model:
            self.model = None

    # --- the pass ----------------------------------------------------------------------------------
    def _forward(self, iset: InterventionSet, ops, inputs) -> dict[tuple[str, int], torch.Tensor]:
        """The reference's activations at the sites of ``ops`` on ``inputs``, ``iset``'s hooks off."""
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
        return captured

    @torch.no_grad()
    def capture(
        self, iset: InterventionSet, phase: str | None = None, keys: list[bytes] | None = None, **inputs
    ) -> None:
        """Give each reference operator of ``iset`` (of ``phase``, when given) the reference's projection at
        its site and layer on ``inputs`` (the batch of the next forward); ``resample_ablate`` gets another
        row's values at the same position. With a precomputed table and the batch's ``keys``, the values
        are read from the table; otherwise the reference runs on ``inputs`` with ``iset``'s hooks off."""
        ops = iset.reference_ops(phase)
        if not ops:
            return
        coords = self._from_table(ops, keys, inputs)
        if coords is None:
            if self.model is None:
                raise RuntimeError(
                    "The precomputed reference has no values for this batch (rows whose tokens the precompute "
                    "pass did not see: a dataset other than the trainer's, or one changed after training "
                    "started) and the starting model is gone (the policy has trained since). Use "
                    "intervention_reference='live', or pass the data as the trainer's train/eval dataset."
                )
            if self.table is not None and not self._warned_miss:
                self._warned_miss = True
                warnings.warn(
                    "Some batches have no precomputed reference values (rows the precompute pass did not "
                    "see): those batches run the live reference pass.",
                    stacklevel=2,
                )
            captured = self._forward(iset, ops, inputs)
            self.passes += 1
            coords = []
            for op in ops:
                h = captured[(op.spec.site, op.layer)]
                coords.append(operators.projection(h, op.on(h.device)[0]))
        rows = None
        for op, values in zip(ops, coords):
            if op.spec.op.resample:
                if rows is None:
                    rows = self._shifted_rows(values.shape[0], op.spec.name).to(values.device)
                values = values[rows]
            op.reference = values

    def _from_table(self, ops, keys, inputs) -> list[torch.Tensor] | None:
        if self.table is None or keys is None or not torch.is_tensor(inputs.get("input_ids")):
            return None
        ids = inputs["input_ids"]
        if ids.dim() != 2 or len(keys) != ids.shape[0]:
            return None
        if any((op.spec.name, op.layer) not in self.table.slices for op in ops):
            return None
        values = self.table.get(list(keys), ids.shape[1])
        if values is None:
            return None
        values = values.to(ids.device)
        self.table_reads += 1
        return [values[..., self.table.slices[(op.spec.name, op.layer)]] for op in ops]

    # --- the precomputed table -----------------------------------------------------------------------
    @torch.no_grad()
    def precompute(
        self,
        iset: InterventionSet,
        batches: Iterable[Mapping],
        pad_token_id: int | None = None,
        extend_to: int | None = None,
        autocast=None,
    ) -> ReferenceTable:
        """Run the reference once over ``batches`` (collated by a :class:`ReferenceKeyCollator`, in the order
        and composition training will see first, so the values equal the live pass's bit for bit) and keep
        every reference operator's coordinates per example in ``self.table`` (added to it when it exists).

        ``extend_to``: with ``resample_ablate``, a row can take its values from another row's padding
        positions; rows shorter than ``extend_to`` positions get the reference's values there too (a second
        forward of that batch, padded with ``pad_token_id``). Raises :class:`ReferenceKeyError` for batches
        the table cannot hold: no keys, left padding, padding-free (flattened) rows. ``autocast``: a context
        manager factory the forwards run under, the one the live pass will run under (accelerate's mixed
        precision wraps the forward of the model it prepares: a PEFT policy, its own reference)."""
        ops = iset.reference_ops()
        if self.table is None:
            self.table = ReferenceTable([(op.spec.name, op.layer, op.vectors.shape[0]) for op in ops])
        table = self.table
        resample = any(op.spec.op.resample for op in ops)
        autocast = autocast or contextlib.nullcontext
        with self._as_in_training():
            for batch in batches:
                keys = batch.get(REFERENCE_KEYS)
                ids = batch.get("input_ids")
                if keys is None or not torch.is_tensor(ids) or ids.dim() != 2:
                    raise ReferenceKeyError(
                        "a batch without per-row example keys (keel's ReferenceKeyCollator) or 2-d input_ids"
                    )
                lengths = _right_padded_lengths(batch)
                todo = [b for b, key in enumerate(keys) if key not in table]
                if not todo:
                    continue
                values = self._coords(iset, ops, batch, autocast)
                self.precompute_passes += 1
                for b in todo:
                    table.add(keys[b], values[b], lengths[b])
                T = ids.shape[1]
                if resample and extend_to is not None and T < extend_to:
                    if pad_token_id is None:
                        raise ReferenceKeyError("resample_ablate's padding values need the pad token id")
                    padded = _pad_batch(batch, extend_to, pad_token_id)
                    tail = self._coords(iset, ops, padded, autocast)[:, T:]
                    self.precompute_passes += 1
                    for b in todo:
                        table.extend(keys[b], tail[b])
        return table

    def _coords(self, iset, ops, inputs, autocast) -> torch.Tensor:
        with autocast():  # the forward only: the live pass projects outside it, in float32
            captured = self._forward(iset, ops, inputs)
        coords = []
        for op in ops:
            h = captured[(op.spec.site, op.layer)]
            coords.append(operators.projection(h, op.on(h.device)[0]))
        return torch.cat(coords, dim=-1).cpu()

    @contextlib.contextmanager
    def _as_in_training(self):
        """The reference model as the live pass runs it during training: a frozen copy is in eval mode with its
        original forward; a PEFT policy with adapters off is in train mode. The starting model (the policy
        before training) stands in for the frozen copy: eval mode, forwards set on instances set aside."""
        model = self.model
        modes = {m: m.training for m in model.modules()}
        saved = {}
        if self.starting_model:
            for m in model.modules():
                if "forward" in m.__dict__:
                    saved[m] = m.__dict__.pop("forward")
            model.eval()
        elif self.adapter_off:
            model.train()
        try:
            yield
        finally:
            for m, training in modes.items():
                m.training = training
            for m, forward in saved.items():
                m.forward = forward

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


def _right_padded_lengths(batch: Mapping) -> list[int]:
    """Real tokens per row; raises ReferenceKeyError unless rows are right-padded (TRL's collators pad right)."""
    ids = batch["input_ids"]
    if batch.get("attention_mask") is None:
        if batch.get("position_ids") is not None and ids.shape[0] == 1:
            raise ReferenceKeyError("padding-free batches (several examples flattened into one row)")
        return [ids.shape[1]] * ids.shape[0]
    mask = batch["attention_mask"].detach().cpu().bool()
    if mask.dim() != 2 or bool((mask[:, 1:] & ~mask[:, :-1]).any()):
        raise ReferenceKeyError("rows that are not right-padded (left padding or gaps in the attention mask)")
    return mask.sum(1).tolist()


def _pad_batch(batch: Mapping, length: int, pad_token_id: int) -> dict:
    """``batch``'s reference inputs right-padded to ``length`` positions."""
    ids = batch["input_ids"]
    extra = length - ids.shape[1]
    out = {"input_ids": torch.nn.functional.pad(ids, (0, extra), value=pad_token_id)}
    mask = batch.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(ids)
    out["attention_mask"] = torch.nn.functional.pad(mask, (0, extra), value=0)
    if batch.get("position_ids") is not None:
        out["position_ids"] = torch.nn.functional.pad(batch["position_ids"], (0, extra), value=0)
    return out
