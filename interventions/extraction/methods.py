"""Extraction methods: each supplies its own step to the :class:`ActivationExtractor` template.

- :func:`mean_difference`: difference of pooled means of two example sets (persona vectors from
  contrastive system prompts, judged aligned/misaligned answers).
- :func:`finetune_difference`: PCA of (fine-tuned - base) activations on the same tokens (CAFT).
- :func:`random_direction`: a norm-matched random baseline with the same k.
- :func:`with_reference_mean`: the mean projection of a data set, for mean-ablation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import nn

from ..direction import Direction, DirectionError, random_direction  # noqa: F401  (re-exported)
from ..sites import hidden_size, unwrap_model
from .core import ActivationExtractor, ExtractionError, RunningMean, View, peft_views
from .data import contrastive_examples, record_examples

_EXTRACTOR_KEYS = ("pad_token_id", "padding_side", "progress", "layers_path")


def _split_kwargs(kwargs: dict) -> tuple[dict, dict]:
    """Extractor options vs. Direction metadata (model_id, model_revision, source, extra)."""
    ext = {k: kwargs.pop(k) for k in _EXTRACTOR_KEYS if k in kwargs}
    allowed = {"model_id", "model_revision", "source", "extra"}
    unknown = set(kwargs) - allowed
    if unknown:
        raise TypeError(f"Unknown arguments {sorted(unknown)}; metadata may set {sorted(allowed)}.")
    return ext, kwargs


def provenance(model: nn.Module, metadata: dict) -> dict:
    """``model_id``/``model_revision`` from the model's config unless given."""
    config = getattr(unwrap_model(model), "config", None)
    out = dict(metadata)
    if out.get("model_id") is None:
        out["model_id"] = getattr(config, "_name_or_path", None) or None
    if out.get("model_revision") is None:
        out["model_revision"] = getattr(config, "_commit_hash", None)
    out["extra"] = dict(out.get("extra") or {})
    return out


class MeanDifference(ActivationExtractor):
    """Streaming means of the pooled activations of two groups, ``positive`` and ``negative``."""

    method = "mean_difference"

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.means = RunningMean()

    def step(self, group, batch, acts):
        for layer, x in acts["model"].items():
            self.means.add((group, layer), x)

    def result(self, normalize: bool = True, method: str | None = None, **metadata) -> dict[int, Direction]:
        out = {}
        for layer in self.layers:
            mu_pos, mu_neg = self.means.mean(("positive", layer)), self.means.mean(("negative", layer))
            diff = mu_pos - mu_neg
            norm = float(diff.norm())
            if norm == 0.0:
                raise ExtractionError(
                    f"Layer {layer}: the two sets have identical mean activations; the data do not differ."
                )
            vector = diff / norm if normalize else diff
            extra = dict(
                metadata.get("extra", {}),
                norm=norm,
                pooling=self.pooling,
                n_positive=self.means.counts[("positive", layer)],
                n_negative=self.means.counts[("negative", layer)],
                positive_projection=float(mu_pos @ vector),
            )
            out[layer] = self.make_direction(
                layer,
                vector.float(),
                (mu_neg @ vector).reshape(1).float(),
                method or self.method,
                "unit" if normalize else "none",
                metadata,
                extra,
            )
        return out


def mean_difference(
    model: nn.Module,
    positive_examples: Sequence[dict],
    negative_examples: Sequence[dict],
    layers: int | str | Sequence[int],
    site: str = "resid_post",
    pooling: str = "mean",
    batch_size: int = 16,
    normalize: bool = True,
    method: str = "mean_difference",
    **metadata,
) -> dict[int, Direction]:
    """Per layer, ``mean(positive) - mean(negative)`` of pooled activations, as a k=1 Direction.

    The row is unit length unless ``normalize=False`` (``extra["norm"]`` keeps the raw length either way);
    ``mean`` is the negative (reference) set's mean projection on the row, which mean-ablation needs.
    Extractor options (``pad_token_id``, ``padding_side``, ``progress``, ``layers_path``) may be passed
    too; the rest is Direction metadata (``source``, ``model_id``, ``extra``).
    """
    ext_kwargs, metadata = _split_kwargs(metadata)
    ex = MeanDifference(layers=layers, site=site, pooling=pooling, batch_size=batch_size, **ext_kwargs)
    ex.collect(positive_examples, model, group="positive")
    ex.collect(negative_examples, model, group="negative")
    return ex.result(normalize=normalize, method=method, **provenance(model, metadata))


def contrastive_directions(
    model: nn.Module,
    tokenizer,
    records: Sequence[dict],
    positive_system: str,
    negative_system: str,
    layers: int | str | Sequence[int],
    positions: str = "response",
    pooling: str = "mean",
    score_threshold: float | None = None,
    max_length: int | None = None,
    **kwargs,
) -> dict[int, Direction]:
    """Persona vectors: the same chats under a positive and a negative system prompt, mean difference
    over response tokens (by default)."""
    pos, neg = contrastive_examples(
        tokenizer, records, positive_system, negative_system, positions, score_threshold, max_length
    )
    extra = dict(
        kwargs.pop("extra", {}) or {},
        positive_system=positive_system,
        negative_system=negative_system,
        positions=positions,
        n_records=len(pos),
    )
    return mean_difference(
        model, pos, neg, layers, pooling=pooling, method="contrastive_system_prompts", extra=extra, **kwargs
    )


def judged_directions(
    model: nn.Module,
    tokenizer,
    positive_records: Sequence[dict],
    negative_records: Sequence[dict],
    layers: int | str | Sequence[int],
    positions: str = "response",
    pooling: str = "mean",
    max_length: int | None = None,
    **kwargs,
) -> dict[int, Direction]:
    """Mean difference between two sets of (question, answer) chats, e.g. misaligned vs aligned answers."""
    pos = record_examples(tokenizer, positive_records, positions=positions, max_length=max_length)
    neg = record_examples(tokenizer, negative_records, positions=positions, max_length=max_length)
    extra = dict(kwargs.pop("extra", {}) or {}, positions=positions)
    return mean_difference(
        model, pos, neg, layers, pooling=pooling, method="judged_answers", extra=extra, **kwargs
    )


class Reservoir:
    """A uniform sample of at most ``capacity`` rows from a stream (Algorithm R), on CPU in float32.

    Bounds the memory of methods that need per-token rows: ``capacity * d * 4`` bytes.
    """

    def __init__(self, capacity: int | None, seed: int = 0):
        self.capacity = capacity
        self.seen = 0
        self._chunks: list[torch.Tensor] = []
        self._data: torch.Tensor | None = None
        self._gen = torch.Generator().manual_seed(seed)

    def add(self, rows: torch.Tensor) -> None:
        rows = rows.detach().float().cpu()
        n = rows.shape[0]
        if self._data is None:
            filled = self.seen
            take = n if self.capacity is None else min(n, self.capacity - filled)
            if take:
                self._chunks.append(rows[:take])
            if self.capacity is not None and filled + take == self.capacity:
                self._data, self._chunks = torch.cat(self._chunks), []
            rest, first = rows[take:], filled + take
        else:
            rest, first = rows, self.seen
        if len(rest):
            t = first + torch.arange(len(rest), dtype=torch.float64)
            slot = (torch.rand(len(rest), generator=self._gen, dtype=torch.float64) * (t + 1)).long()
            keep = slot < self.capacity
            self._data[slot[keep]] = rest[keep]
        self.seen += n

    def rows(self) -> torch.Tensor:
        return self._data if self._data is not None else torch.cat(self._chunks)


class FinetuneDiffPCA(ActivationExtractor):
    """Top principal components of centred (fine-tuned - base) activations at pooled positions (CAFT).

    Per-token difference rows are kept (PCA needs them), at most ``max_tokens`` per layer, sampled
    uniformly from the stream; means are exact over all tokens. ``centre=False`` takes the top singular
    vectors of the raw differences instead, so the fine-tune's average shift (which centring removes)
    is in the subspace; the explained-variance figures are then shares of the raw second moment.
    """

    method = "finetune_diff_pca"

    def __init__(
        self,
        n_components: int = 20,
        max_tokens: int | None = 50_000,
        seed: int = 0,
        centre: bool = True,
        **kwargs,
    ):
        kwargs.setdefault("pooling", "all")
        super().__init__(**kwargs)
        self.centre = centre
        self.n_components = n_components
        self.max_tokens = max_tokens
        self.seed = seed
        self.means = RunningMean()
        self.samples: dict[int, Reservoir] = {}

    def step(self, group, batch, acts):
        for layer in self.layers:
            base, tuned = acts["base"][layer], acts["finetuned"][layer]
            diff = tuned - base
            self.means.add(("diff", layer), diff)
            self.means.add(("base", layer), base)
            self.samples.setdefault(layer, Reservoir(self.max_tokens, self.seed + layer)).add(diff)

    def result(self, niter: int = 6, **metadata) -> dict[int, Direction]:
        out = {}
        for layer in self.layers:
            rows = self.samples[layer].rows().double()
            mean_diff = self.means.mean(("diff", layer))
            centred = rows - mean_diff.to(rows.dtype) if self.centre else rows
            n, d = centred.shape
            k = min(self.n_components, n - 1, d)
            if k < 1:
                raise ExtractionError(f"Layer {layer}: {n} difference rows are too few for PCA; add data.")
            if not bool(centred.abs().max() > 0):
                raise ExtractionError(
                    f"Layer {layer}: the fine-tuned and base activations do not differ (every difference row "
                    "is zero), so there is no fine-tune direction to find. Check that --finetuned / --adapter "
                    "is really the fine-tune (an untrained LoRA adapter changes nothing) and not the base model."
                )
            torch.manual_seed(self.seed + layer)  # svd_lowrank draws a random test matrix
            _, S, V = torch.svd_lowrank(centred, q=min(k + 10, n, d), niter=niter)
            components = V[:, :k].T  # [k, d], orthonormal
            # Orient each component so the fine-tune moved activations its positive way.
            shift = components @ mean_diff
            fallback = components.gather(1, components.abs().argmax(1, keepdim=True)).squeeze(1)
            sign = torch.where(shift.abs() > 1e-12, shift.sign(), fallback.sign())
            components = components * sign.unsqueeze(1)
            variance = S[:k] ** 2 / max(n - 1, 1)
            total = centred.pow(2).sum() / max(n - 1, 1)
            extra = dict(
                metadata.get("extra", {}),
                n_components=k,
                explained_variance=variance.tolist(),
                explained_variance_ratio=(variance / total).tolist(),
                mean_diff_norm=float(mean_diff.norm()),
                mean_diff_projection=(components @ mean_diff).tolist(),
                n_tokens=self.samples[layer].seen,
                n_tokens_used=n,
                pooling=self.pooling,
                centred=self.centre,
            )
            base_mean = self.means.mean(("base", layer))
            out[layer] = self.make_direction(
                layer,
                components.float(),
                (components @ base_mean).float(),
                self.method,
                "orthonormal",
                metadata,
                extra,
            )
        return out


def model_views(base_model: nn.Module, finetuned_model: nn.Module | None) -> list[View]:
    """``base``/``finetuned`` views: two models, or one PEFT model with its adapter off/on."""
    if finetuned_model is None:
        return peft_views(base_model)
    return [View("base", base_model), View("finetuned", finetuned_model)]


def finetune_difference(
    base_model: nn.Module,
    finetuned_model: nn.Module | None,
    examples: Sequence[dict],
    layers: int | str | Sequence[int],
    n_components: int = 20,
    site: str = "resid_post",
    pooling: str = "all",
    batch_size: int = 16,
    max_tokens: int | None = 50_000,
    seed: int = 0,
    centre: bool = True,
    **metadata,
) -> dict[int, Direction]:
    """CAFT directions: top ``n_components`` PCs of centred per-token (fine-tuned - base) differences
    (``centre=False``: of the raw differences, so the average shift is included).

    Pass ``finetuned_model=None`` and a PEFT model as ``base_model`` to compare the adapter off and on.
    ``mean`` of each Direction is the base model's mean projection (the reference for mean-ablation).
    """
    ext_kwargs, metadata = _split_kwargs(metadata)
    ex = FinetuneDiffPCA(
        n_components=n_components,
        max_tokens=max_tokens,
        seed=seed,
        centre=centre,
        layers=layers,
        site=site,
        pooling=pooling,
        batch_size=batch_size,
        **ext_kwargs,
    )
    ex.collect(examples, model_views(base_model, finetuned_model))
    return ex.result(**provenance(finetuned_model or base_model, metadata))


class MeanProjection(ActivationExtractor):
    """Streaming mean of pooled activations, to project onto directions afterwards."""

    method = "reference_mean"

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.means = RunningMean()

    def step(self, group, batch, acts):
        for layer, x in acts["model"].items():
            self.means.add(layer, x)


def with_reference_mean(
    model: nn.Module,
    examples: Sequence[dict],
    direction: Direction,
    layer: int | None = None,
    pooling: str = "mean",
    batch_size: int = 16,
    **kwargs,
) -> Direction:
    """``direction`` with ``mean`` set to the mean projection of ``examples`` on its rows (at its layer)."""
    layer = direction.layer if layer is None else layer
    if layer is None:
        raise DirectionError("The direction records no layer; pass layer=... .")
    direction.check_usable(hidden_size(model))
    ex = MeanProjection(layers=layer, site=direction.site, pooling=pooling, batch_size=batch_size, **kwargs)
    ex.collect(examples, model)
    mean = direction.vectors.double() @ ex.means.mean(ex.layers[0])
    extra = dict(direction.extra, reference_mean_pooling=pooling, reference_mean_examples=len(examples))
    return replace(direction, mean=mean.float(), layer=layer, extra=extra)
