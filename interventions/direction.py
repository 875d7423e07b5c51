"""Direction: the payload every intervention carries, a ``[k, d_model]`` subspace plus provenance.

Saved as safetensors (tensors) beside a JSON sidecar (metadata), so a file says which model, site and
layer it belongs to and how it was made. Loaders for other formats (plain ``.pt``/``.npy``, SAELens-style
SAE weights) are conveniences that return the same object.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .serialization import KeelInputError

METADATA_SUFFIX = ".json"


class DirectionError(KeelInputError):
    """A direction that cannot be used as given; the message says how to fix it."""


@dataclass
class Direction:
    """``vectors``: ``[k, d_model]`` rows spanning one subspace; ``mean``: optional ``[k]`` reference
    projection (what mean-ablation sets the projection to).

    ``layer`` and ``site`` record where it was extracted (``resid_post`` layer ``i`` = output of decoder
    layer ``i``, 0-based). ``normalization`` says what was done to the rows: ``"none"``, ``"unit"`` or
    ``"orthonormal"``.
    """

    vectors: torch.Tensor
    site: str = "resid_post"
    layer: int | None = None
    model_id: str | None = None
    model_revision: str | None = None
    method: str = "unknown"
    source: str | None = None
    normalization: str = "none"
    mean: torch.Tensor | None = None
    created_at: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat())
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        v = torch.as_tensor(self.vectors)
        if v.ndim == 1:
            v = v.unsqueeze(0)
        if v.ndim != 2:
            raise DirectionError(
                f"A direction must have shape [k, d_model] or [d_model]; got {tuple(v.shape)}."
            )
        self.vectors = v.detach().to(torch.float32).contiguous()
        if self.mean is not None:
            m = torch.as_tensor(self.mean, dtype=torch.float32).reshape(-1)
            if m.numel() != self.k:
                raise DirectionError(f"mean has {m.numel()} entries but the direction has k={self.k} rows.")
            self.mean = m
        self.check_usable()

    @property
    def k(self) -> int:
        return self.vectors.shape[0]

    @property
    def d_model(self) -> int:
        return self.vectors.shape[1]

    def check_usable(self, d_model: int | None = None) -> None:
        """Finite, non-zero rows of the right width, or a clear error."""
        v = self.vectors
        if v.shape[0] == 0 or v.shape[1] == 0:
            raise DirectionError(f"Empty direction of shape {tuple(v.shape)}.")
        if not torch.isfinite(v).all():
            raise DirectionError(
                "The direction contains NaN or inf values; re-extract it (check for empty activation sets "
                "or a division by a zero norm)."
            )
        norms = v.norm(dim=-1)
        if (norms == 0).any():
            bad = torch.nonzero(norms == 0).flatten().tolist()
            raise DirectionError(f"Direction rows {bad} are all zero; drop them or re-extract.")
        if d_model is not None and self.d_model != d_model:
            raise DirectionError(
                f"Direction has width {self.d_model} but the model's hidden size is {d_model}: it was made "
                f"for another model (model_id={self.model_id!r}). Extract it again on this model."
            )

    # --- transformations (each returns a new Direction) ---------------------------------------------
    def select(self, rows: Sequence[int]) -> Direction:
        """Keep chosen rows (e.g. PCA components picked by hand); the choice is recorded in metadata."""
        rows = list(rows)
        bad = [r for r in rows if not -self.k <= r < self.k]
        if bad:
            raise DirectionError(f"Rows {bad} out of range for a direction with k={self.k}.")
        prior = self.extra.get("selected_rows")  # indices into the original rows, if already selected
        extra = dict(self.extra, selected_rows=[prior[r] for r in rows] if prior else rows)
        mean = None if self.mean is None else self.mean[rows]
        return replace(self, vectors=self.vectors[rows], mean=mean, extra=extra)

    def normalized(self) -> Direction:
        """Each row scaled to unit norm (for steering with a coefficient in activation units)."""
        return replace(
            self, vectors=self.vectors / self.vectors.norm(dim=-1, keepdim=True), normalization="unit"
        )

    def orthonormalized(self) -> Direction:
        """An orthonormal basis of the same subspace (QR), as subspace ablation needs.

        A stored ``mean`` is a projection onto the old rows, so it is dropped; recompute it on the new basis.
        """
        q, r = torch.linalg.qr(self.vectors.T.double())
        diag = torch.diagonal(r).abs()
        if (diag < 1e-8 * diag.max()).any():
            raise DirectionError(
                f"The {self.k} direction rows are linearly dependent; drop redundant rows before ablating."
            )
        basis = (q.T * torch.sign(torch.diagonal(r)).unsqueeze(-1)).to(torch.float32)
        return replace(self, vectors=basis, normalization="orthonormal", mean=None)

    def is_orthonormal(self, atol: float = 1e-4) -> bool:
        gram = self.vectors @ self.vectors.T
        return bool(torch.allclose(gram, torch.eye(self.k), atol=atol))

    # --- persistence -------------------------------------------------------------------------------
    def metadata(self) -> dict:
        return {
            "format": "keel.direction/v1",
            "k": self.k,
            "d_model": self.d_model,
            "site": self.site,
            "layer": self.layer,
            "model_id": self.model_id,
            "model_revision": self.model_revision,
            "method": self.method,
            "source": self.source,
            "normalization": self.normalization,
            "created_at": self.created_at,
            "extra": self.extra,
        }

    def save(self, path: str | Path) -> Path:
        """Write ``path`` (.safetensors) and its JSON sidecar; returns the tensor file's path."""
        return save_directions([self], path)

    @classmethod
    def load(cls, path: str | Path) -> Direction:
        directions = load_directions(path)
        if len(directions) != 1:
            raise DirectionError(
                f"{path} holds {len(directions)} directions (layers {[d.layer for d in directions]}); "
                "use interventions.load_directions() and pick one by layer."
            )
        return directions[0]


def direction_file_paths(path: str | Path) -> tuple[Path, Path]:
    """The tensor file and the JSON sidecar a direction path stands for."""
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_name(path.name + ".safetensors")
    return path, path.with_suffix(METADATA_SUFFIX)


def save_directions(directions: Sequence[Direction], path: str | Path) -> Path:
    """Several directions (e.g. one per layer) in one file: tensors ``{i}.vectors`` / ``{i}.mean``."""
    tensor_path, meta_path = direction_file_paths(path)
    tensor_path.parent.mkdir(parents=True, exist_ok=True)
    tensors, metas = {}, []
    for i, d in enumerate(directions):
        tensors[f"{i}.vectors"] = d.vectors.contiguous()
        if d.mean is not None:
            tensors[f"{i}.mean"] = d.mean.contiguous()
        metas.append(d.metadata())
    # Write to temporary names first so a crash never leaves a tensor file without its metadata.
    tmp_t, tmp_m = tensor_path.with_suffix(".tmp-st"), meta_path.with_suffix(".tmp-json")
    try:  # NaN/Inf would make the sidecar invalid JSON: refuse before writing anything
        text = json.dumps({"format": "keel.directions/v1", "directions": metas}, indent=2, allow_nan=False)
    except ValueError:
        raise DirectionError(
            f"Direction metadata for {tensor_path} holds NaN or Inf; fix the extraction (or drop that field) "
            "before saving, so the sidecar stays valid JSON."
        ) from None
    save_file(tensors, str(tmp_t))
    tmp_m.write_text(text)
    tmp_t.replace(tensor_path)
    tmp_m.replace(meta_path)
    return tensor_path


def load_directions(path: str | Path) -> list[Direction]:
    """Load keel's format, or (by suffix) a plain ``.pt``/``.pth``/``.npy`` tensor."""
    path = Path(path)
    if path.suffix in (".pt", ".pth", ".npy"):
        return [load_plain_tensor(path)]
    tensor_path, meta_path = direction_file_paths(path)
    if not tensor_path.exists():
        raise FileNotFoundError(f"No direction file at {tensor_path}.")
    tensors = load_file(str(tensor_path))
    if not meta_path.exists():
        raise DirectionError(
            f"{tensor_path} has no metadata sidecar {meta_path.name}; for a bare tensor file use "
            "load_plain_tensor(), or for SAE weights load_sae_decoder_rows()."
        )
    meta = json.loads(meta_path.read_text())
    out = []
    for i, m in enumerate(meta["directions"]):
        out.append(
            Direction(
                vectors=tensors[f"{i}.vectors"],
                mean=tensors.get(f"{i}.mean"),
                site=m["site"],
                layer=m["layer"],
                model_id=m["model_id"],
                model_revision=m["model_revision"],
                method=m["method"],
                source=m["source"],
                normalization=m["normalization"],
                created_at=m["created_at"],
                extra=m.get("extra", {}),
            )
        )
    return out


def load_plain_tensor(path: str | Path, **metadata) -> Direction:
    """A bare ``[d]`` or ``[k, d]`` tensor from ``.pt`` (loaded with ``weights_only=True``) or ``.npy``."""
    path = Path(path)
    if path.suffix == ".npy":
        tensor = torch.from_numpy(np.load(path, allow_pickle=False))
    else:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(obj, dict):
            tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
            if len(tensors) != 1:
                raise DirectionError(
                    f"{path} holds a dict with tensors {sorted(tensors)}; save the direction tensor alone."
                )
            (tensor,) = tensors.values()
        else:
            tensor = obj
    if not isinstance(tensor, torch.Tensor):
        raise DirectionError(f"{path} does not hold a tensor (got {type(tensor).__name__}).")
    if tensor.ndim == 3:
        raise DirectionError(
            f"{path} holds a {tuple(tensor.shape)} tensor, e.g. one vector per layer (persona-vector files "
            "index layer 0 as the embeddings): slice the layer you want first, then save it."
        )
    return Direction(vectors=tensor, method=metadata.pop("method", f"file:{path.suffix[1:]}"), **metadata)


def load_sae_decoder_rows(
    path: str | Path, latents: Sequence[int], orthonormalize: bool = True, **metadata
) -> Direction:
    """Decoder rows of chosen latents from SAELens-style weights (``W_dec``: ``[d_sae, d_model]``)."""
    path = Path(path)
    file = path / "sae_weights.safetensors" if path.is_dir() else path
    tensors = load_file(str(file))
    if "W_dec" not in tensors:
        raise DirectionError(
            f"{file} has no 'W_dec' tensor (found {sorted(tensors)}); is it an SAE checkpoint?"
        )
    w_dec = tensors["W_dec"]
    latents = list(latents)
    bad = [i for i in latents if not 0 <= i < w_dec.shape[0]]
    if bad:
        raise DirectionError(f"Latents {bad} out of range: the SAE has {w_dec.shape[0]} latents.")
    cfg_path = file.parent / "cfg.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    metadata.setdefault("layer", cfg.get("hook_layer"))
    metadata.setdefault("model_id", cfg.get("model_name"))
    d = Direction(
        vectors=w_dec[latents],
        method="sae_decoder",
        source=str(file),
        extra={"latents": latents, "hook_name": cfg.get("hook_name")},
        **metadata,
    )
    return d.orthonormalized() if orthonormalize and d.k > 1 else d


def random_direction(
    d_model: int | None = None, k: int = 1, seed: int = 0, like: Direction | None = None
) -> Direction:
    """A random baseline: same k, site, layer and model as ``like``; orthonormal if ``like`` is, else each
    row scaled to the norm of ``like``'s row. Without ``like``: orthonormal rows."""
    if like is not None:
        if d_model is not None and d_model != like.d_model:
            raise DirectionError(
                f"d_model={d_model} does not match the reference direction's {like.d_model}."
            )
        d_model, k = like.d_model, like.k
    if d_model is None:
        raise DirectionError("random_direction needs d_model, or a reference direction `like`.")
    gen = torch.Generator().manual_seed(seed)
    raw = torch.randn(k, d_model, generator=gen, dtype=torch.float64)
    q, r = torch.linalg.qr(raw.T)
    basis = (q.T * torch.sign(torch.diagonal(r)).unsqueeze(1)).float()
    extra = {"seed": seed}
    if like is None:
        return Direction(vectors=basis, method="random", normalization="orthonormal", extra=extra)
    orthonormal = like.normalization == "orthonormal" or (like.k > 1 and like.is_orthonormal())
    vectors = basis if orthonormal else basis * like.vectors.norm(dim=1, keepdim=True)
    extra.update(like_method=like.method, like_source=like.source, norm_matched=True)
    return Direction(
        vectors=vectors,
        site=like.site,
        layer=like.layer,
        model_id=like.model_id,
        model_revision=like.model_revision,
        method="random",
        normalization="orthonormal" if orthonormal else like.normalization,
        extra=extra,
    )


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file, so a run records exactly which direction file it used."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
