"""SAE latents as directions: rank latents by how the fine-tune changed them, output their decoder rows.

Weights use the SAELens layout: ``W_enc [d_model, d_sae]``, ``W_dec [d_sae, d_model]``, ``b_enc``,
``b_dec``, and ``threshold`` for JumpReLU; a ``cfg.json`` beside the weights may give ``k`` (TopK),
``apply_b_dec_to_input``, ``hook_layer`` and ``model_name``.

Ranking (``rank_by``):
- ``change``: mean latent activation on the fine-tuned model minus on the base model, over pooled tokens.
- ``attribution``: mean over pooled tokens of activation x (gradient of the LM loss on those tokens,
  projected on the latent's decoder row) on one model: a first-order estimate of the latent's effect.
Latent activations are encoded in chunks of rows and only their sums are kept.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from ..direction import Direction, DirectionError
from ..sites import hidden_size
from .core import ActivationExtractor, Batch, ExtractionError, RunningMean, View, pool
from .methods import _split_kwargs, model_views, provenance

RANKINGS = ("change", "attribution")


@dataclass
class SAE:
    """Encoder and decoder of a sparse autoencoder at one site."""

    W_enc: torch.Tensor
    W_dec: torch.Tensor
    b_enc: torch.Tensor
    b_dec: torch.Tensor
    threshold: torch.Tensor | None = None
    k: int | None = None
    apply_b_dec_to_input: bool = True
    cfg: dict = field(default_factory=dict)
    source: str | None = None

    def __post_init__(self) -> None:
        d_model, d_sae = self.W_enc.shape
        if tuple(self.W_dec.shape) != (d_sae, d_model):
            raise DirectionError(
                f"SAE shapes disagree: W_enc {tuple(self.W_enc.shape)} needs W_dec of shape ({d_sae}, {d_model}), "
                f"got {tuple(self.W_dec.shape)}. keel expects the SAELens layout (W_enc: [d_model, d_sae])."
            )

    @property
    def d_model(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    @classmethod
    def load(cls, path: str | Path) -> SAE:
        """From a SAELens-style directory (``sae_weights.safetensors`` + ``cfg.json``) or a file."""
        path = Path(path)
        file = path / "sae_weights.safetensors" if path.is_dir() else path
        if not file.exists():
            raise FileNotFoundError(f"No SAE weights at {file}.")
        t = load_file(str(file))
        missing = [name for name in ("W_enc", "W_dec") if name not in t]
        if missing:
            raise DirectionError(f"{file} lacks {missing} (found {sorted(t)}); is it a SAELens-style SAE?")
        cfg_path = file.parent / "cfg.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        if cfg.get("architecture") == "gated":
            raise DirectionError("Gated SAEs are not supported; use a standard, JumpReLU or TopK SAE.")
        k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k")
        d_model, d_sae = t["W_enc"].shape
        return cls(
            W_enc=t["W_enc"].float(),
            W_dec=t["W_dec"].float(),
            b_enc=t.get("b_enc", torch.zeros(d_sae)).float(),
            b_dec=t.get("b_dec", torch.zeros(d_model)).float(),
            threshold=t["threshold"].float() if "threshold" in t else None,
            k=int(k) if k else None,
            apply_b_dec_to_input=cfg.get("apply_b_dec_to_input", True),
            cfg=cfg,
            source=str(file),
        )

    def to(self, device) -> SAE:
        move = {n: getattr(self, n).to(device) for n in ("W_enc", "W_dec", "b_enc", "b_dec")}
        threshold = None if self.threshold is None else self.threshold.to(device)
        return SAE(
            **move,
            threshold=threshold,
            k=self.k,
            apply_b_dec_to_input=self.apply_b_dec_to_input,
            cfg=self.cfg,
            source=self.source,
        )

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latent activations ``[n, d_sae]`` of rows ``x [n, d_model]``."""
        x = x.float()
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        pre = x @ self.W_enc + self.b_enc
        if self.threshold is not None:  # JumpReLU
            return torch.where(pre > self.threshold, pre, 0.0)
        acts = torch.relu(pre)
        if self.k is not None:  # TopK: keep the k largest per row
            top = acts.topk(min(self.k, acts.shape[-1]), dim=-1)
            acts = torch.zeros_like(acts).scatter(-1, top.indices, top.values)
        return acts


class SAELatentRanking(ActivationExtractor):
    """Streams latent statistics of one SAE per layer; ``rank_by`` picks the statistic."""

    method = "sae_latents"

    def __init__(self, saes: dict[int, SAE], rank_by: str = "change", chunk_rows: int = 1024, **kwargs):
        if rank_by not in RANKINGS:
            raise ExtractionError(f"Unknown rank_by {rank_by!r}: choose one of {', '.join(RANKINGS)}.")
        kwargs.setdefault("pooling", "all")
        if rank_by == "attribution":
            kwargs["stop_early"] = False  # the loss needs the whole forward
            self.keep_graph = True
        if rank_by == "attribution" and kwargs["pooling"] != "all":
            raise ExtractionError(
                "rank_by='attribution' needs per-token activations and gradients: use pooling='all' "
                f"(got {kwargs['pooling']!r})."
            )
        super().__init__(layers=sorted(saes), **kwargs)
        self.saes = saes
        self.rank_by = rank_by
        self.chunk_rows = chunk_rows
        self.stats = RunningMean()
        self.grads: dict[int, torch.Tensor] = {}

    def _sae(self, layer: int, device) -> SAE:
        sae = self.saes[layer]
        if sae.W_enc.device != device:
            sae = self.saes[layer] = sae.to(device)
        return sae

    def model_inputs(self, view: View, batch: Batch) -> dict:
        inputs = super().model_inputs(view, batch)
        if self.rank_by == "attribution":  # LM loss on the pooled tokens (the training answers)
            inputs["labels"] = torch.where(batch.pool_mask, batch.input_ids, -100).to(
                inputs["input_ids"].device
            )
        return inputs

    def forward(self, view: View, batch: Batch, store: dict):
        output = super().forward(view, batch, store)
        if self.rank_by == "attribution":
            targets = [store[layer] for layer in self.layers]
            grads = torch.autograd.grad(output.loss, targets, allow_unused=True)
            self.grads = {
                layer: torch.zeros_like(h) if g is None else g
                for layer, h, g in zip(self.layers, targets, grads)
            }
            for layer in self.layers:
                store[layer] = store[layer].detach()
        return output

    def step(self, group, batch, acts):
        for layer in self.layers:
            if self.rank_by == "change":
                for view in ("base", "finetuned"):
                    self._add_encoded(layer, view, acts[view][layer])
                self.stats.add(("reference", layer), acts["base"][layer])
            else:
                (view,) = acts
                x = acts[view][layer]
                g = self._pool_grad(layer, batch)
                self._add_attribution(layer, x, g)
                self.stats.add(("reference", layer), x)

    def _pool_grad(self, layer: int, batch: Batch) -> torch.Tensor:
        return pool(self.grads[layer], batch.pool_mask, self.pooling)

    def _add_encoded(self, layer: int, view: str, x: torch.Tensor) -> None:
        sae = self._sae(layer, x.device)
        total = torch.zeros(sae.d_sae, dtype=torch.float64, device=x.device)
        for chunk in x.split(self.chunk_rows):
            total += sae.encode(chunk).double().sum(0)
        self._accumulate((view, layer), total, x.shape[0])

    def _add_attribution(self, layer: int, x: torch.Tensor, g: torch.Tensor) -> None:
        sae = self._sae(layer, x.device)
        total = torch.zeros(sae.d_sae, dtype=torch.float64, device=x.device)
        for xc, gc in zip(x.split(self.chunk_rows), g.split(self.chunk_rows)):
            total += (sae.encode(xc) * (gc.float() @ sae.W_dec.T)).double().sum(0)
        self._accumulate(("attribution", layer), total, x.shape[0])

    def _accumulate(self, key, total: torch.Tensor, n: int) -> None:
        s = self.stats.sums
        s[key] = s[key] + total if key in s else total
        self.stats.counts[key] = self.stats.counts.get(key, 0) + n

    def scores(self, layer: int) -> torch.Tensor:
        if self.rank_by == "change":
            return self.stats.mean(("finetuned", layer)) - self.stats.mean(("base", layer))
        return self.stats.mean(("attribution", layer))

    def result(self, n_latents: int = 20, sign: str = "positive", **metadata) -> dict[int, Direction]:
        if sign not in ("positive", "abs"):
            raise ExtractionError(f"sign must be 'positive' or 'abs', got {sign!r}.")
        out = {}
        for layer in self.layers:
            sae, scores = self.saes[layer], self.scores(layer).cpu()
            key = scores if sign == "positive" else scores.abs()
            n = min(n_latents, sae.d_sae)
            latents = key.topk(n).indices.tolist()
            rows = sae.W_dec[latents].cpu()
            direction = Direction(vectors=rows)
            direction = direction.orthonormalized()
            reference = self.stats.mean(("reference", layer)).cpu()
            extra = dict(
                metadata.get("extra", {}),
                latents=latents,
                scores=[float(scores[i]) for i in latents],
                rank_by=self.rank_by,
                sign=sign,
                sae_source=sae.source,
                hook_name=sae.cfg.get("hook_name"),
                pooling=self.pooling,
            )
            out[layer] = self.make_direction(
                layer,
                direction.vectors,
                (direction.vectors.double() @ reference).float(),
                f"sae_latents:{self.rank_by}",
                "orthonormal",
                metadata,
                extra,
            )
        return out


def _as_saes(sae, layer) -> dict[int, SAE]:
    if isinstance(sae, dict):
        return {int(k): v if isinstance(v, SAE) else SAE.load(v) for k, v in sae.items()}
    sae = sae if isinstance(sae, SAE) else SAE.load(sae)
    if layer is None:
        layer = sae.cfg.get("hook_layer")
    if layer is None:
        raise ExtractionError(
            "The SAE's cfg.json gives no hook_layer; pass layer=... (0-based decoder layer)."
        )
    return {int(layer): sae}


def sae_latents(
    base_model: nn.Module,
    finetuned_model: nn.Module | None,
    examples: Sequence[dict],
    sae: SAE | str | Path | dict,
    layer: int | None = None,
    n_latents: int = 20,
    rank_by: str = "change",
    sign: str = "positive",
    site: str = "resid_post",
    pooling: str = "all",
    batch_size: int = 16,
    **metadata,
) -> dict[int, Direction]:
    """Decoder rows (QR-orthonormalised) of the ``n_latents`` top-ranked SAE latents per layer.

    ``sae``: one SAE (at ``layer``, or its cfg's ``hook_layer``) or ``{layer: SAE or path}``.
    ``rank_by="change"`` compares ``base_model`` and ``finetuned_model`` (or a PEFT model's adapter off/on
    when ``finetuned_model`` is None); ``"attribution"`` uses ``finetuned_model`` if given, else
    ``base_model``, with the LM loss on the pooled tokens. ``sign="positive"`` ranks by the score itself
    (latents the fine-tune switched on), ``"abs"`` by its magnitude.
    """
    ext_kwargs, metadata = _split_kwargs(metadata)
    saes = _as_saes(sae, layer)
    d = hidden_size(base_model)
    for lay, s in saes.items():
        if s.d_model != d:
            raise DirectionError(
                f"The SAE for layer {lay} has d_model={s.d_model} but the model's hidden size is {d}: it was "
                "trained on another model."
            )
    ex = SAELatentRanking(
        saes, rank_by=rank_by, site=site, pooling=pooling, batch_size=batch_size, **ext_kwargs
    )
    if rank_by == "change":
        views = model_views(base_model, finetuned_model)
    else:
        views = [View("model", finetuned_model if finetuned_model is not None else base_model)]
    ex.collect(examples, views)
    return ex.result(n_latents=n_latents, sign=sign, **provenance(finetuned_model or base_model, metadata))
