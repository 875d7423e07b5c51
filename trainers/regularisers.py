"""Regularisers: extra loss terms beside the task loss, the defences keel's interventions are compared against.

Configured in any keel trainer config as ``regularisers:``, a list like ``interventions``; each entry has
``name``, ``kind``, ``weight``, an optional ``schedule`` (:class:`interventions.spec.Schedule`, scaling the
weight over training) and the keys of its kind. Unknown keys fail at config time.

What each kind adds to the loss (``weight`` times the term; the term is logged, unweighted, as
``regularisers/<name>``, averaged over the micro-batches of the logging window; ``regularisers/total`` is the
weighted sum added to the task loss, so the logged ``loss`` minus it is the task loss):

- ``kl``: KL(reference || policy) of the next-token distributions, ``sum_v p_ref(v) (log p_ref(v) -
  log p_pol(v))``, averaged over the positions that predict a label (``labels != -100``, the task loss's own
  positions: the assistant tokens under ``assistant_only_loss``) of the training batch; or, with
  ``anchor_data`` (a JSONL of chat rows, tokenised with the trainer's processing class like the training
  data), of an anchor batch of ``anchor_batch_size`` rows drawn each micro-batch (seeded by the run's seed,
  the step and the process: a resumed run draws the same rows). Logits are the final hidden state times the
  output embedding (as TRL's fused LM head computes them: logit scale, then soft-capping), computed in
  chunks of positions and recomputed in the backward, so no ``[tokens, vocab]`` tensor is kept.
- ``ldifs``: the distance between policy and reference activations at ``site`` / ``layers`` (default: 5
  evenly spaced layers, ``round(linspace(0, L - 1, 5))``, resid_post), over real (attention-masked) tokens:
  ``normalise: false`` the mean over layers, tokens and hidden units of ``(h_pol - h_ref)^2`` (LDIFS's
  dimension-normalised squared L2); ``normalise: true`` the mean over layers and tokens of
  ``|h_pol - h_ref|^2 / |h_ref|^2``.
- ``projection_penalty``: the mean over layers and tokens (``tokens``: all real tokens, ``completion`` or
  ``prompt``) of ``|P h|^2``, the squared norm of the activation's projection onto the direction's subspace
  (``direction`` as in intervention specs: a file, ``random:SEED[:K]``, ``wandb:...``, a Direction, a tensor;
  orthonormalised).
- ``blocking`` (BLOCK-EM): the one-sided penalty ``mean(relu(z_pol - z_ref)^2)`` over assistant tokens
  (``labels != -100``), features and layers, where ``z`` are feature values at ``site`` / ``layers``: the
  coordinates on each unit-normalised row of ``directions``, or the activations of the SAE ``latents`` of
  ``sae`` (SAELens layout, loaded as :mod:`interventions.extraction.sae` loads it). ``direction: up``
  penalises features rising above the reference, ``down`` the mirror ``relu(z_ref - z_pol)^2`` (features
  that should not fall), ``both`` the two.

The reference is the trainer's :class:`~interventions.ReferenceSource`: the same PEFT model with its
adapters off, or a frozen copy of the starting model, run with every intervention off. One reference
forward per training micro-batch serves every consumer: ``reference_ablate``'s capture, the KL's final
hidden states, LDIFS's and blocking's activations (a second one only for the anchor batch). Policy
activations come from read-only hooks during the policy's own forward in ``compute_loss`` (registered once
per ``train()``, switched on for that forward); they are read after any intervention at the same site, as
the next layer sees them, and stored with their graph (under gradient checkpointing the hooks of decoder
layers sit outside the checkpointed forward; a site inside a layer under reentrant checkpointing is refused
with the fix). Regularisers act in training only: evaluation losses are the task loss.

Trainer-agnostic: the mixin calls this module from ``compute_loss`` whatever the TRL parent. Under DPO the
batch terms read the step's rows as TRL concatenates them (chosen and rejected; assistant tokens from
its ``completion_mask``); GRPO builds its batches inside the step (generation), so there only ``kl`` with
``anchor_data`` applies (the others are refused at the first step, naming it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from interventions import (
    Direction,
    Intervention,
    InterventionSet,
    decoder_layers,
    hidden_size,
    register_site_hook,
    resolve_layers,
    unpack_output,
    unwrap_model,
)
from interventions.extraction.sae import SAE
from interventions.operators import projection
from interventions.reference import REFERENCE_INPUTS, ReferenceSource
from interventions.serialization import KeelInputError, from_dict, read_config_value, read_jsonl
from interventions.sites import SITE_KINDS, parse_layers
from interventions.spec import Schedule

from .monitoring import tokenize_rows

WHAT = "regularisers"
PREFIX = "regularisers/"
BLOCK_SIDES = ("up", "down", "both")
PENALTY_TOKENS = ("all", "completion", "prompt")
LDIFS_LAYERS = 5
FINAL = ("final", -1)  # the backbone's output: the final hidden state, input of the LM head
KL_CHUNK = 1024  # positions per chunk of the vocabulary projection


class RegulariserError(KeelInputError):
    """A regulariser that cannot be used as configured; the message names it and the fix."""


# ---- configuration ---------------------------------------------------------------------------------


@dataclass
class RegulariserConfig:
    """Keys every regulariser has: ``name`` (default: its kind; names the logged key), ``kind``, ``weight``
    (>= 0; 0 computes and logs the term without adding it) and ``schedule`` (the weight over training)."""

    KIND: ClassVar[str] = ""

    name: str | None = None
    kind: str | None = None
    weight: float = 1.0
    schedule: Schedule | None = None

    def __post_init__(self) -> None:
        if self.kind is None:
            self.kind = self.KIND
        if self.kind != self.KIND:
            raise RegulariserError(
                f"{WHAT}: a {type(self).__name__} has kind {self.KIND!r}, not {self.kind!r}."
            )
        if self.name is None:
            self.name = self.kind
        if (
            not isinstance(self.name, str)
            or not self.name.strip()
            or "/" in self.name
            or self.name == "total"
        ):
            raise RegulariserError(
                f"{WHAT}: name must be a non-empty string without '/' and not 'total' (the logged sum), got "
                f"{self.name!r}."
            )
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)):
            raise RegulariserError(f"{WHAT}: {self.name!r}: weight must be a number, got {self.weight!r}.")
        self.weight = float(self.weight)
        if not math.isfinite(self.weight) or self.weight < 0:
            raise RegulariserError(
                f"{WHAT}: {self.name!r}: weight must be finite and >= 0, got {self.weight}."
            )
        if isinstance(self.schedule, str):
            self.schedule = Schedule(kind=self.schedule)
        if isinstance(self.schedule, dict):
            self.schedule = from_dict(Schedule, self.schedule, f"{WHAT}.{self.name}.schedule")
        if self.schedule is not None and not isinstance(self.schedule, Schedule):
            raise RegulariserError(
                f"{WHAT}: {self.name!r}: schedule must be a mapping, got {self.schedule!r}."
            )

    def weight_at(self, step: int) -> float:
        return self.weight * (self.schedule.factor(step) if self.schedule else 1.0)

    def _fail(self, message: str) -> RegulariserError:
        return RegulariserError(f"{WHAT}: {self.name!r} ({self.kind}): {message}")

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["schedule"] = dataclasses.asdict(self.schedule) if self.schedule else None
        for key in ("direction", "directions"):
            spec = self.__dict__.get("_spec")
            if key in out and spec is not None and out[key] is spec.direction:
                out[key] = spec.to_dict()["direction"]
        if isinstance(out.get("sae"), SAE):
            out["sae"] = f"<SAE {out['sae'].source}>"
        elif isinstance(out.get("sae"), dict):
            out["sae"] = {
                k: f"<SAE {v.source}>" if isinstance(v, SAE) else str(v) for k, v in out["sae"].items()
            }
        return out


def _check_site(config) -> None:
    """``site`` and the syntax of ``layers`` of a config that has them."""
    if config.site not in SITE_KINDS:
        raise config._fail(f"unknown site {config.site!r}: choose one of {', '.join(SITE_KINDS)}.")
    if config.layers is not None:
        try:
            parse_layers(config.layers)
        except ValueError as err:
            raise config._fail(str(err)) from None


def _direction_spec(config, direction) -> Intervention:
    """Directions are validated and resolved exactly as an intervention's (the operator is never applied)."""
    try:
        return Intervention(
            "project_out",
            direction,
            site=config.site,
            layers=config.layers,
            direction_layer=config.direction_layer,
            components=config.components,
            name=config.name,
        )
    except KeelInputError as err:
        raise config._fail(str(err)) from None


@dataclass
class KLConfig(RegulariserConfig):
    """``anchor_data``: a JSONL of chat rows to take the KL on instead of the training batch;
    ``anchor_batch_size``: anchor rows per micro-batch (default: ``per_device_train_batch_size``)."""

    KIND: ClassVar[str] = "kl"

    anchor_data: str | None = None
    anchor_batch_size: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.anchor_data is not None:
            if not isinstance(self.anchor_data, (str, Path)) or not Path(self.anchor_data).is_file():
                raise self._fail(f"anchor_data: {self.anchor_data}: no such file (a JSONL of chat rows).")
            self.anchor_data = str(self.anchor_data)
        size = self.anchor_batch_size
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise self._fail(f"anchor_batch_size must be a positive integer, got {size!r}.")
        if size is not None and self.anchor_data is None:
            raise self._fail("anchor_batch_size needs anchor_data.")


@dataclass
class LDIFSConfig(RegulariserConfig):
    """``site`` and ``layers`` (default: 5 evenly spaced layers); ``normalise``: divide each token's squared
    distance by the reference activation's squared norm instead of the hidden size."""

    KIND: ClassVar[str] = "ldifs"

    site: str = "resid_post"
    layers: Any = None
    normalise: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_site(self)
        if not isinstance(self.normalise, bool):
            raise self._fail(f"normalise must be true or false, got {self.normalise!r}.")


@dataclass
class ProjectionPenaltyConfig(RegulariserConfig):
    """``direction`` (as in intervention specs), ``site``, ``layers`` (default: the direction's own layer),
    ``direction_layer``, ``components``; ``tokens``: ``all`` (real tokens), ``completion`` or ``prompt``."""

    KIND: ClassVar[str] = "projection_penalty"

    direction: Any = None
    site: str = "resid_post"
    layers: Any = None
    direction_layer: int | None = None
    components: list[int] | None = None
    tokens: str = "all"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_site(self)
        if self.tokens not in PENALTY_TOKENS:
            raise self._fail(f"tokens must be one of {', '.join(PENALTY_TOKENS)}, got {self.tokens!r}.")
        self._spec = _direction_spec(self, self.direction)


@dataclass
class BlockingConfig(RegulariserConfig):
    """``direction``: ``up`` | ``down`` | ``both`` (which change is penalised); the features: ``directions``
    (as an intervention's direction; with ``direction_layer`` / ``components``) or ``sae`` (a SAELens-style
    folder or file, or ``{layer: path}``) with ``latents`` (indices); ``site``; ``layers`` (default: the
    directions' own layer, or the SAE's ``hook_layer``)."""

    KIND: ClassVar[str] = "blocking"

    direction: str = "up"
    directions: Any = None
    sae: Any = None
    latents: list[int] | None = None
    site: str = "resid_post"
    layers: Any = None
    direction_layer: int | None = None
    components: list[int] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_site(self)
        if self.direction not in BLOCK_SIDES:
            raise self._fail(
                f"direction is the side that is blocked, one of {', '.join(BLOCK_SIDES)}; got {self.direction!r} "
                "(the feature vectors go under `directions`, or give `sae` and `latents`)."
            )
        if (self.directions is None) == (self.sae is None):
            raise self._fail("give exactly one of `directions` (feature vectors) or `sae` with `latents`.")
        if self.sae is not None:
            if self.direction_layer is not None or self.components is not None:
                raise self._fail(
                    "direction_layer and components go with `directions`; select SAE latents with `latents`."
                )
            latents = self.latents
            if (
                not isinstance(latents, (list, tuple))
                or not latents
                or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in latents)
            ):
                raise self._fail(
                    f"`sae` needs `latents`, a non-empty list of latent indices; got {latents!r}."
                )
            self.latents = list(latents)
            self._check_sae_paths()
        else:
            if self.latents is not None:
                raise self._fail(
                    "latents select SAE latents; with `directions` select rows with `components`."
                )
            self._spec = _direction_spec(self, self.directions)

    def _check_sae_paths(self) -> None:
        paths = self.sae.values() if isinstance(self.sae, dict) else [self.sae]
        if isinstance(self.sae, dict):
            if self.layers is not None:
                raise self._fail(
                    "with `sae: {layer: path}` the layers are the mapping's keys; drop `layers`."
                )
            bad = [k for k in self.sae if isinstance(k, bool) or not isinstance(k, int)]
            if bad or not self.sae:
                raise self._fail(
                    f"`sae` as a mapping takes {{layer: path}} with integer layers; got {self.sae!r}."
                )
        for path in paths:
            if isinstance(path, SAE):
                continue
            if not isinstance(path, (str, Path)) or not Path(path).exists():
                raise self._fail(f"sae: {path}: no such file or folder (SAELens-style weights).")


KINDS: dict[str, type[RegulariserConfig]] = {
    c.KIND: c for c in (KLConfig, LDIFSConfig, ProjectionPenaltyConfig, BlockingConfig)
}


def regulariser_from_dict(data, index: int = 0) -> RegulariserConfig:
    if isinstance(data, RegulariserConfig):
        return data
    what = f"{WHAT}[{index}]"
    if not isinstance(data, dict):
        raise RegulariserError(f"{what}: expected a mapping with keys name, kind, weight, ...; got {data!r}.")
    kind = data.get("kind")
    if kind not in KINDS:
        raise RegulariserError(f"{what}: unknown or missing kind {kind!r}: choose one of {', '.join(KINDS)}.")
    return from_dict(KINDS[kind], data, f"{what} ({kind})", error=RegulariserError)


def parse_regularisers(value) -> list[RegulariserConfig]:
    """Regularisers from a list of mappings (or configs), or a string: an inline YAML/JSON list or the path of
    a YAML file holding one (or a mapping with key ``regularisers``). ``None`` means none."""
    if value is None:
        return []
    what, value = read_config_value(value, WHAT, key=WHAT, error=RegulariserError)
    if value is None:
        return []
    if not isinstance(value, (list, tuple)):
        raise RegulariserError(
            f"{what} must be a list of regularisers, got {type(value).__name__}: {value!r}."
        )
    configs = [regulariser_from_dict(v, i) for i, v in enumerate(value)]
    names = [c.name for c in configs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise RegulariserError(
            f"{WHAT}: names must be unique; {duplicates} appear more than once (the default name is the kind): "
            "set `name` on each."
        )
    return configs


# ---- activations: read-only hooks ------------------------------------------------------------------


def _backbone(model: nn.Module) -> nn.Module:
    """The decoder stack whose output is the final hidden state (``PreTrainedModel.base_model``)."""
    base = unwrap_model(model)
    backbone = getattr(base, "base_model", None)
    if not isinstance(backbone, nn.Module) or backbone is base:
        raise RegulariserError(
            f"kl: cannot find the decoder stack of {type(base).__name__} (its base_model); the KL reads the final "
            "hidden state there."
        )
    return backbone


class ActivationTap:
    """Read-only hooks at sites (and ``FINAL``, the backbone's output) of one model, registered once and
    switched by :meth:`recording`: while on, each hook stores the first activation it sees into the given
    dict (``with_graph``: as is, with its autograd graph, and only while gradients are enabled; else detached)."""

    def __init__(self, model: nn.Module, keys, layers_path: str | None = None):
        self.model = model
        self.keys = sorted(set(keys), key=str)
        self.layers_path = layers_path
        self.store: dict | None = None
        self.with_graph = False
        self.missed: set = set()
        self._handles: list = []

    def attach(self) -> None:
        if self._handles:
            return
        try:
            for key in self.keys:
                keep = functools.partial(self._keep, key)
                if key == FINAL:
                    hook = functools.partial(_output_hook, keep)
                    self._handles.append(_backbone(self.model).register_forward_hook(hook))
                else:
                    self._handles.append(register_site_hook(self.model, *key, keep, self.layers_path))
        except BaseException:
            self.detach()
            raise

    def detach(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    def _keep(self, key, h: torch.Tensor) -> None:
        store = self.store
        if store is None or key in store:
            return None
        if not self.with_graph:
            store[key] = h.detach()
        elif torch.is_grad_enabled():
            store[key] = h
        else:  # inside a reentrant checkpoint's no-grad forward: this tensor is not the one in the graph
            self.missed.add(key)
        return None  # read only

    @contextlib.contextmanager
    def recording(self, store: dict, with_graph: bool) -> Iterator[dict]:
        previous = (self.store, self.with_graph)
        self.store, self.with_graph = store, with_graph
        try:
            yield store
        finally:
            self.store, self.with_graph = previous


def _output_hook(keep, module, args, output):
    keep(unpack_output(output)[0])
    return None


# ---- terms -----------------------------------------------------------------------------------------


class _Head:
    """The LM head as TRL's fused head applies it: ``h W^T + b``, times the logit scale, soft-capped.
    :meth:`of` a model looks the weight up on every use (FSDP and PEFT replace modules after the trainer is
    built); a fixed ``weight`` / ``bias`` serve plain tensors."""

    def __init__(self, weight=None, bias=None, scale: float = 1.0, softcap: float | None = None, model=None):
        self.weight, self.bias, self.scale, self.softcap, self.model = weight, bias, scale, softcap, model

    @classmethod
    def of(cls, model: nn.Module) -> _Head:
        config = unwrap_model(model).config.get_text_config()
        scale = getattr(config, "logit_scale", None)
        for key in ("output_multiplier", "lm_head_multiplier"):
            scale = getattr(config, key, None) if scale is None else scale
        if scale is None and getattr(config, "logits_scaling", None) is not None:
            scale = config.logits_scaling if config.model_type == "hyperclovax" else 1 / config.logits_scaling
        softcap = getattr(config, "final_logit_softcapping", None)
        return cls(scale=1.0 if scale is None else float(scale), softcap=softcap, model=model)

    def log_probs(self, h: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight, self.bias
        if self.model is not None:
            head = unwrap_model(self.model).get_output_embeddings()
            weight, bias = head.weight, head.bias
        if hasattr(weight, "full_tensor"):  # FSDP2: a sharded DTensor
            weight = weight.full_tensor()
            bias = bias.full_tensor() if bias is not None else None
        logits = F.linear(h.to(weight.dtype), weight, bias).float()
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits.log_softmax(-1)


def kl_sum(h_pol: torch.Tensor, h_ref: torch.Tensor, head_pol: _Head, head_ref: _Head, chunk: int = KL_CHUNK):
    """``sum over rows of KL(softmax(ref logits) || softmax(policy logits))`` for final hidden states ``[n, d]``;
    each chunk of rows is recomputed in the backward, so no ``[n, vocab]`` tensor outlives its chunk."""

    def part(hp, hr):
        with torch.no_grad():
            ref = head_ref.log_probs(hr)
        return (ref.exp() * (ref - head_pol.log_probs(hp))).sum()

    total = h_pol.new_zeros((), dtype=torch.float32)
    for start in range(0, h_pol.shape[0], chunk):
        hp, hr = h_pol[start : start + chunk], h_ref[start : start + chunk]
        if torch.is_grad_enabled() and hp.requires_grad:
            total = total + checkpoint(part, hp, hr, use_reentrant=False)
        else:
            total = total + part(hp, hr)
    return total


@dataclass
class _Batch:
    """What the terms read of one policy forward: activations (with graph), the reference's, and masks."""

    policy: dict
    reference: dict
    real: torch.Tensor  # [B, T] bool
    completion: torch.Tensor  # [B, T] bool: labels != -100
    predicts: torch.Tensor  # [B, T - 1] bool: positions whose next token is a label


def _masks(inputs: dict, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, T = like.shape[:2]
    device = like.device
    attention = inputs.get("attention_mask")
    if attention is not None and attention.dim() == 2 and tuple(attention.shape) == (B, T):
        real = attention.to(device).bool()
    else:  # padding-free rows: every position is a token
        real = torch.ones(B, T, dtype=torch.bool, device=device)
    completion = inputs.get("completion_mask")
    labels = inputs.get("labels")
    if completion is None:
        completion = labels != -100 if labels is not None else real
    completion = completion.to(device).bool() & real
    shift = inputs.get("shift_labels")
    if shift is not None:
        predicts = (shift.to(device) != -100)[:, :-1]
    elif labels is not None:
        predicts = labels.to(device)[:, 1:] != -100
    else:  # DPO's rows: the positions before each completion token
        predicts = completion[:, 1:]
    return real, completion, predicts


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values [B, T]`` over ``mask``; 0 (connected to the graph) when nothing is selected."""
    m = mask.to(values.dtype)
    return (values * m).sum() / m.sum().clamp(min=1)


class _Term:
    needs_reference = True

    def __init__(self, config: RegulariserConfig):
        self.config = config

    @property
    def name(self) -> str:
        return self.config.name

    def policy_keys(self) -> set:
        return set()

    def reference_keys(self) -> set:
        return self.policy_keys() if self.needs_reference else set()

    def value(self, batch: _Batch) -> torch.Tensor:
        raise NotImplementedError


def _default_layers(num_layers: int, n: int = LDIFS_LAYERS) -> list[int]:
    return sorted({round(i * (num_layers - 1) / max(n - 1, 1)) for i in range(n)})


class _KL(_Term):
    def __init__(self, config: KLConfig, head_pol: _Head, head_ref: _Head):
        super().__init__(config)
        self.heads = (head_pol, head_ref)
        self.anchor = config.anchor_data is not None
        self.rows: list[dict] | None = None  # the anchor examples, tokenised by RegulariserSet.bind_trainer
        self.batch_size = 1

    def policy_keys(self) -> set:
        return set() if self.anchor else {FINAL}

    def value(self, batch: _Batch) -> torch.Tensor:
        h_pol, h_ref = batch.policy[FINAL][:, :-1], batch.reference[FINAL][:, :-1]
        mask = batch.predicts
        n = mask.sum()
        if n == 0:
            return h_pol.sum() * 0.0
        return kl_sum(h_pol[mask], h_ref[mask].to(h_pol.device), *self.heads) / n


class _LDIFS(_Term):
    def __init__(self, config: LDIFSConfig, layers: list[int]):
        super().__init__(config)
        self.layers = layers

    def policy_keys(self) -> set:
        return {(self.config.site, layer) for layer in self.layers}

    def value(self, batch: _Batch) -> torch.Tensor:
        terms = []
        for key in sorted(self.policy_keys()):
            h_pol = batch.policy[key].float()
            h_ref = batch.reference[key].to(h_pol.device).float()
            diff = (h_pol - h_ref).pow(2)
            if self.config.normalise:
                per_token = diff.sum(-1) / h_ref.pow(2).sum(-1).clamp(min=torch.finfo(torch.float32).tiny)
            else:
                per_token = diff.mean(-1)
            terms.append(_masked_mean(per_token, batch.real))
        return torch.stack(terms).mean()


class _Features(_Term):
    """Feature values ``z [B, T, k]`` at each (site, layer): coordinates on vectors, or SAE latents."""

    def __init__(
        self, config, site: str, vectors: dict[int, torch.Tensor] | None = None, saes=None, latents=None
    ):
        super().__init__(config)
        self.site = site
        self.vectors = vectors or {}
        self.saes: dict[int, SAE] = saes or {}
        self.latents = latents
        self._cache: dict = {}

    def policy_keys(self) -> set:
        return {(self.site, layer) for layer in sorted(self.vectors or self.saes)}

    def features(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        if layer in self.vectors:
            key = (layer, h.device)
            if key not in self._cache:
                self._cache[key] = self.vectors[layer].to(h.device)
            return projection(h, self._cache[key])
        return _encode_latents(self._sae_on(layer, h.device), h, self.latents)

    def _sae_on(self, layer: int, device) -> SAE:
        sae = self.saes[layer]
        if sae.W_enc.device != device:
            sae = self.saes[layer] = sae.to(device)
        return sae


def _encode_latents(sae: SAE, h: torch.Tensor, latents: list[int]) -> torch.Tensor:
    """Activations of the chosen latents, differentiable in ``h``; only those latents' encoder columns are used,
    except for a TopK SAE, whose selection needs every latent."""
    x = h.float()
    if sae.k is not None:
        return sae.encode(x.reshape(-1, x.shape[-1]))[:, latents].reshape(*x.shape[:-1], len(latents))
    if sae.apply_b_dec_to_input:
        x = x - sae.b_dec
    pre = x @ sae.W_enc[:, latents] + sae.b_enc[latents]
    if sae.threshold is not None:  # JumpReLU
        return torch.where(pre > sae.threshold[latents], pre, 0.0)
    return torch.relu(pre)


class _Projection(_Features):
    needs_reference = False

    def value(self, batch: _Batch) -> torch.Tensor:
        tokens = self.config.tokens
        mask = {"all": batch.real, "completion": batch.completion, "prompt": batch.real & ~batch.completion}[
            tokens
        ]
        terms = [
            _masked_mean(self.features(layer, batch.policy[(site, layer)]).pow(2).sum(-1), mask)
            for site, layer in sorted(self.policy_keys())
        ]
        return torch.stack(terms).mean()


class _Blocking(_Features):
    def value(self, batch: _Batch) -> torch.Tensor:
        side = self.config.direction
        terms = []
        for site, layer in sorted(self.policy_keys()):
            z_pol = self.features(layer, batch.policy[(site, layer)])
            with torch.no_grad():
                z_ref = self.features(layer, batch.reference[(site, layer)].to(z_pol.device))
            diff = z_pol - z_ref
            penalty = {"up": F.relu(diff), "down": F.relu(-diff), "both": diff}[side].pow(2)
            terms.append(_masked_mean(penalty.mean(-1), batch.completion))
        return torch.stack(terms).mean()


# ---- the set ---------------------------------------------------------------------------------------


class RegulariserSet:
    """The configured regularisers bound to a trainer's model and reference; see the module docstring.

    The trainer mixin calls :meth:`reference_pass` before each training micro-batch's forward (in place of the
    reference source's capture), :meth:`compute_loss` around its parent's ``compute_loss``, and
    :meth:`pop_metrics` when it logs; ``with regularisers:`` registers the hooks for a ``train()``.
    """

    def __init__(
        self,
        configs,
        model: nn.Module,
        reference: ReferenceSource | None = None,
        layers_path: str | None = None,
    ):
        self.configs = parse_regularisers(list(configs))
        self.model = model
        self.layers_path = layers_path
        self.reference: ReferenceSource | None = None
        self.terms: list[_Term] = []
        self._anchor_pad = 0
        self.seed = 0
        self._micro = (-1, 0)
        self._sums: dict[str, list] = {}
        self._depth = 0
        self._policy_tap: ActivationTap | None = None
        self._reference_tap: ActivationTap | None = None
        self._reference_batch: dict | None = None
        self._autocast: Callable = contextlib.nullcontext
        if reference is not None:
            self.bind_reference(reference)

    @classmethod
    def from_args(cls, args, model: nn.Module, layers_path: str | None = None) -> RegulariserSet | None:
        """The set of a trainer config's ``regularisers`` (None when it has none)."""
        configs = getattr(args, "regularisers", None)
        return cls(configs, model, layers_path=layers_path) if configs else None

    def bind(self, trainer, reference: ReferenceSource | None) -> None:
        """Resolve the terms against the trainer's model and reference, and read the anchor data."""
        self.bind_reference(reference)
        self.bind_trainer(trainer)

    @property
    def needs_reference(self) -> bool:
        return any(c.kind in ("kl", "ldifs", "blocking") for c in self.configs)

    @property
    def anchor(self) -> KLConfig | None:
        return next((c for c in self.configs if isinstance(c, KLConfig) and c.anchor_data), None)

    def bind_reference(self, reference: ReferenceSource | None) -> None:
        """Resolve every term against the model (layers, directions, SAEs) and the reference."""
        if self.needs_reference and reference is None:
            raise RegulariserError(f"{WHAT}: kl, ldifs and blocking need the trainer's reference model.")
        self.reference = reference
        model = self.model
        num_layers = len(decoder_layers(model, self.layers_path))
        d_model = hidden_size(model)
        heads = None
        terms: list[_Term] = []
        for config in self.configs:
            try:
                if isinstance(config, KLConfig):
                    heads = heads or (_Head.of(model), _Head.of(reference.model))
                    terms.append(_KL(config, *heads))
                elif isinstance(config, LDIFSConfig):
                    spec = config.layers if config.layers is not None else _default_layers(num_layers)
                    terms.append(_LDIFS(config, resolve_layers(spec, num_layers)))
                elif isinstance(config, ProjectionPenaltyConfig):
                    vectors = _resolve_vectors(config._spec, num_layers, d_model, orthonormal=True)
                    terms.append(_Projection(config, config.site, vectors=vectors))
                elif isinstance(config, BlockingConfig):
                    if config.sae is not None:
                        saes = _resolve_saes(config, num_layers, d_model)
                        terms.append(_Blocking(config, config.site, saes=saes, latents=config.latents))
                    else:
                        vectors = _resolve_vectors(config._spec, num_layers, d_model, orthonormal=False)
                        terms.append(_Blocking(config, config.site, vectors=vectors))
            except RegulariserError:
                raise
            except (KeelInputError, ValueError) as err:
                raise config._fail(str(err)) from None
        self.terms = terms

    def bind_trainer(self, trainer) -> None:
        """Read what the anchor data needs from the trainer (processing class, chat template, token settings,
        batch size, seed) and check that its interventions can run on an anchor forward."""
        args = trainer.args
        self.seed = int(getattr(args, "seed", 0) or 0)
        accelerator = getattr(trainer, "accelerator", None)
        # The policy's forward runs under the trainer's mixed precision (accelerate wraps its forward); the
        # reference's must too, or a frozen copy would differ from the policy at step 0.
        self._autocast = accelerator.autocast if accelerator is not None else contextlib.nullcontext
        anchors = [t for t in self.terms if isinstance(t, _KL) and t.anchor]
        if not anchors:
            return
        iset: InterventionSet = trainer.intervention_set
        bad = sorted(
            op.spec.name
            for op in iset.ops
            if "train" in op.spec.phases and (op.needs_reference or op.spec.tokens != "all")
        )
        if bad:
            raise anchors[0].config._fail(
                f"the anchor batch runs through the policy with its training interventions on, and {bad} read a "
                "reference pass or the training batch's token masks, which the anchor batch does not have. Use "
                "tokens: all and operators without a reference for them, or the KL on the training batch (no anchor_data)."
            )
        tokenizer = getattr(trainer.processing_class, "tokenizer", trainer.processing_class)
        if tokenizer is None:
            raise anchors[0].config._fail("anchor_data needs the trainer's processing_class to tokenise it.")
        pad = getattr(tokenizer, "pad_token_id", None)
        self._anchor_pad = pad if isinstance(pad, int) else 0
        for term in anchors:
            config = term.config
            term.rows = tokenize_rows(
                read_jsonl(config.anchor_data),
                tokenizer,
                chat_template=getattr(trainer, "chat_template", None),
                assistant_only_loss=bool(getattr(args, "assistant_only_loss", False)),
                completion_only_loss=getattr(args, "completion_only_loss", None),
                max_length=getattr(args, "max_length", None),
                truncation_mode=getattr(args, "truncation_mode", "keep_start"),
                where=f"{WHAT}: {config.name!r}: anchor_data {config.anchor_data}",
            )
            term.batch_size = config.anchor_batch_size or int(args.per_device_train_batch_size)

    # --- hooks -------------------------------------------------------------------------------------
    def _batch_terms(self) -> list[_Term]:
        """The terms read from the training batch's forward (all but the KL on anchor data)."""
        return [t for t in self.terms if not (isinstance(t, _KL) and t.anchor)]

    def _keys(self) -> tuple[set, set]:
        """(policy, reference) activation keys: those of the batch terms, and the final hidden state of the
        anchor forwards."""
        batch = self._batch_terms()
        policy = {k for t in batch for k in t.policy_keys()}
        reference = {k for t in batch for k in t.reference_keys()}
        if self.anchor is not None:
            policy.add(FINAL)
            reference.add(FINAL)
        return policy, reference

    @property
    def needs_batch_reference(self) -> bool:
        """Whether some term compares with the reference on the training batch."""
        return any(t.reference_keys() for t in self._batch_terms())

    def _same_model(self) -> bool:
        return self.reference is not None and unwrap_model(self.reference.model) is unwrap_model(self.model)

    def attach(self) -> RegulariserSet:
        self._depth += 1
        if self._depth > 1:
            return self
        policy, reference = self._keys()
        try:
            if self._same_model():
                self._policy_tap = self._reference_tap = ActivationTap(
                    self.model, policy | reference, self.layers_path
                )
                self._policy_tap.attach()
            else:
                self._policy_tap = ActivationTap(self.model, policy, self.layers_path)
                self._policy_tap.attach()
                if reference:
                    self._reference_tap = ActivationTap(self.reference.model, reference, self.layers_path)
                    self._reference_tap.attach()
        except BaseException:
            self.detach(force=True)
            raise
        return self

    def detach(self, force: bool = False) -> None:
        self._depth = 0 if force else max(self._depth - 1, 0)
        if self._depth == 0:
            for tap in (self._policy_tap, self._reference_tap):
                if tap is not None:
                    tap.detach()
            self._policy_tap = self._reference_tap = None
            self._reference_batch = None

    def __enter__(self) -> RegulariserSet:
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    @property
    def attached(self) -> bool:
        return self._policy_tap is not None

    # --- the reference pass ------------------------------------------------------------------------
    def reference_pass(self, iset: InterventionSet, phase: str, inputs: dict) -> None:
        """The one reference forward over this batch: it gives ``iset``'s reference operators their
        coordinates and stores the activations (and final hidden state) the regularisers compare with."""
        source = self.reference
        if source is None:
            return
        if not (self.attached and self.needs_batch_reference):
            source.capture(iset, phase, **inputs)
            return
        store: dict = {}
        with self._reference_tap.recording(store, with_graph=False), self._autocast():
            if iset.reference_ops(phase):
                source.capture(iset, phase, **inputs)  # its forward fills the store too
            else:
                _reference_forward(source, iset, inputs)
        self._reference_batch = store

    # --- the loss ----------------------------------------------------------------------------------
    def compute_loss(
        self, trainer, parent: Callable, model, inputs, return_outputs=False, num_items_in_batch=None
    ):
        """``parent``'s loss on ``inputs`` (the policy's forward, with the hooks recording) plus the weighted
        terms; each term's value is kept for :meth:`pop_metrics`."""
        if not self.attached:
            raise RuntimeError(
                "RegulariserSet.compute_loss outside `with regularisers:` (the trainer's train())."
            )
        step = int(trainer.state.global_step)
        self._micro = (step, self._micro[1] + 1 if self._micro[0] == step else 0)
        batch_terms = self._batch_terms()
        if batch_terms and "input_ids" not in inputs:
            raise RegulariserError(
                f"{WHAT}: {[t.name for t in batch_terms]} read the policy's forward over the training batch, and "
                f"{type(trainer).__name__}'s batches have no input_ids (keys {sorted(inputs)}); use kl with anchor_data."
            )
        policy: dict = {}
        tap = self._policy_tap
        tap.missed = set()
        reference, self._reference_batch = self._reference_batch, None
        try:
            with tap.recording(policy, with_graph=True):
                out = parent(
                    model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
                )
            values: dict[str, torch.Tensor] = {}
            if batch_terms:
                batch = self._batch(batch_terms, policy, reference, inputs)
                for term in batch_terms:
                    values[term.name] = self._value(term, batch, step)
            for term in self.terms:
                if term.name not in values:  # the KL on anchor data
                    grad = term.config.weight_at(step) != 0.0
                    values[term.name] = self._value(term, self._anchor_batch(trainer, term, grad), step)
        finally:
            policy.clear()
        loss = out[0] if return_outputs else out
        scale = _ga_scale(trainer, num_items_in_batch)
        extra = None
        for term in self.terms:
            weight = term.config.weight_at(step)
            if weight != 0.0:
                contribution = values[term.name] * (weight / scale)
                extra = contribution if extra is None else extra + contribution
        self._record(values, step)
        if extra is not None:  # with every weight 0 the loss is the parent's, bit for bit
            loss = loss + extra.to(loss.device)
        return (loss, out[1]) if return_outputs else loss

    def _batch(self, terms: list[_Term], policy: dict, reference: dict | None, inputs: dict) -> _Batch:
        wanted = {k for t in terms for k in t.policy_keys()}
        missing = sorted(wanted - set(policy), key=str)
        if missing:
            missed = sorted(set(missing) & self._policy_tap.missed, key=str)
            if missed:
                raise RegulariserError(
                    f"{WHAT}: the activations at {missed} were computed inside gradient checkpointing's reentrant "
                    "forward, without their graph. Use sites resid_pre/resid_post, or set "
                    "gradient_checkpointing_kwargs: {use_reentrant: false}."
                )
            raise RuntimeError(f"{WHAT}: the policy's forward did not reach {missing}.")
        needed = {k for t in terms for k in t.reference_keys()}
        if needed and reference is None:
            raise RuntimeError(
                f"{WHAT}: no reference pass for this batch; the trainer runs RegulariserSet.reference_pass before "
                "each training forward."
            )
        for key in needed:
            if reference[key].shape != policy[key].shape:
                raise RuntimeError(
                    f"{WHAT}: reference activations {tuple(reference[key].shape)} at {key} do not match the policy's "
                    f"{tuple(policy[key].shape)}: the reference pass ran on another batch."
                )
        real, completion, predicts = _masks(inputs, policy[sorted(wanted, key=str)[0]])
        return _Batch(policy, reference or {}, real, completion, predicts)

    @staticmethod
    def _value(term: _Term, batch: _Batch, step: int) -> torch.Tensor:
        if term.config.weight_at(step) == 0.0:  # measured and logged, never added: no graph
            with torch.no_grad():
                return term.value(batch)
        return term.value(batch)

    # --- the anchor batch --------------------------------------------------------------------------
    def anchor_inputs(self, step: int, micro: int, process: int = 0, name: str | None = None) -> dict:
        """The anchor rows of KL term ``name`` (default: the first with anchor data) for micro-batch ``micro``
        of step ``step`` on process ``process``: a function of the run's seed and those numbers only, so a
        resumed run draws what an uninterrupted one would."""
        anchors = [t for t in self.terms if isinstance(t, _KL) and t.anchor]
        index, term = next((i, t) for i, t in enumerate(anchors) if name is None or t.name == name)
        if term.rows is None:
            raise RuntimeError(
                "RegulariserSet.bind_trainer(trainer) first: the anchor data is not tokenised."
            )
        seed = (((self.seed * 1_000_003 + step) * 1_009 + micro) * 101 + process) * 31 + index
        generator = torch.Generator().manual_seed(seed % (2**63))
        n, rows = term.batch_size, term.rows
        order = torch.cat([torch.randperm(len(rows), generator=generator) for _ in range(-(-n // len(rows)))])
        return _pad([rows[i] for i in order[:n].tolist()], self._anchor_pad, _device_of(self.model))

    def _anchor_batch(self, trainer, term: _KL, grad: bool) -> _Batch:
        """A reference pass and a policy forward (training interventions on) over this micro-batch's anchor rows."""
        step, micro = self._micro
        process = int(getattr(trainer.accelerator, "process_index", 0))
        inputs = self.anchor_inputs(step, micro, process, name=term.name)
        iset: InterventionSet = trainer.intervention_set
        reference: dict = {}
        with self._reference_tap.recording(reference, with_graph=False), self._autocast():
            _reference_forward(self.reference, iset, inputs)
        policy: dict = {}
        stats, iset.collect_stats = iset.collect_stats, False  # the diagnostics describe the training batch
        try:
            with self._policy_tap.recording(policy, with_graph=grad), torch.set_grad_enabled(grad):
                model = trainer.model
                model(**{k: inputs[k] for k in ("input_ids", "attention_mask")}, **_forward_kwargs(model))
        finally:
            iset.collect_stats = stats
        if FINAL not in policy or FINAL not in reference:
            raise RuntimeError(f"{WHAT}: the anchor forwards did not reach the final hidden state.")
        real, completion, predicts = _masks(inputs, policy[FINAL])
        return _Batch(policy, reference, real, completion, predicts)

    # --- metrics -----------------------------------------------------------------------------------
    def _record(self, values: dict[str, torch.Tensor], step: int) -> None:
        total = 0.0
        for term in self.terms:
            value = values[term.name].detach().double()
            weight = term.config.weight_at(step)
            total = total + weight * value
            acc = self._sums.setdefault(term.name, [0.0, 0])
            acc[0], acc[1] = acc[0] + value, acc[1] + 1
            if term.config.schedule is not None:
                self._sums.setdefault(f"{term.name}/weight", [0.0, 0])
                w = self._sums[f"{term.name}/weight"]
                w[0], w[1] = w[0] + weight, w[1] + 1
        acc = self._sums.setdefault("total", [0.0, 0])
        acc[0], acc[1] = acc[0] + total, acc[1] + 1

    def pop_metrics(
        self, prefix: str = PREFIX, sum_over_processes=None, processes: int = 1
    ) -> dict[str, float]:
        """Each term's mean over the micro-batches since the last call (``<prefix><name>``), the scheduled
        weight (``<prefix><name>/weight``) and the weighted sum (``<prefix>total``); then reset. Under several
        processes, as :meth:`InterventionSet.pop_metrics`."""
        keys = sorted(self._sums)
        if not keys:
            return {}
        sums = torch.tensor(
            [[float(self._sums[k][0]), float(self._sums[k][1])] for k in keys], dtype=torch.float64
        )
        if sum_over_processes is not None and processes > 1:
            sums = sum_over_processes(sums)
        self._sums = {}
        return {f"{prefix}{k}": s / n for k, (s, n) in zip(keys, sums.tolist()) if n > 0}


# ---- helpers ---------------------------------------------------------------------------------------


def _ga_scale(trainer, num_items_in_batch) -> int:
    """How many micro-batches the Trainer sums into one step without dividing the loss itself: a loss
    normalised by ``num_items_in_batch`` (the whole step's tokens) is not divided again, so a per-micro-batch
    mean term is divided here (as TRL does for the MoE aux loss); otherwise the Trainer divides it."""
    scaled = getattr(trainer, "loss_is_scaled_for_ga", None)
    if scaled is None:
        scaled = (
            bool(getattr(trainer, "model_accepts_loss_kwargs", False)) and num_items_in_batch is not None
        ) or getattr(trainer, "compute_loss_func", None) is not None
    return int(trainer.current_gradient_accumulation_steps) if scaled else 1


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _forward_kwargs(model: nn.Module) -> dict:
    """No KV cache; logits at one position only (the terms read hidden states)."""
    kwargs: dict[str, Any] = {"use_cache": False}
    try:
        params = inspect.signature(type(unwrap_model(model)).forward).parameters
    except (TypeError, ValueError):
        return kwargs
    if "logits_to_keep" in params:
        kwargs["logits_to_keep"] = 1
    return kwargs


@torch.no_grad()
def _reference_forward(source: ReferenceSource, iset: InterventionSet, inputs: dict) -> None:
    """The reference's forward over ``inputs`` as :meth:`ReferenceSource.capture` runs it (adapters off for a
    PEFT model, every intervention off), for when no intervention reads it; counted in ``source.passes``."""
    model = source.model
    device = _device_of(model)
    batch = {k: inputs[k].to(device) for k in REFERENCE_INPUTS if inputs.get(k) is not None}
    adapter_off = model.disable_adapter() if source.adapter_off else contextlib.nullcontext()
    with adapter_off, iset.phase(None):
        model(**batch, **_forward_kwargs(model))
    source.passes += 1


def _pad(rows: list[dict], pad_id: int, device) -> dict:
    T = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    attention = torch.zeros(len(rows), T, dtype=torch.long)
    labels = torch.full((len(rows), T), -100, dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        attention[i, :n] = 1
        labels[i, :n] = torch.tensor(r["labels"])
    return {"input_ids": ids.to(device), "attention_mask": attention.to(device), "labels": labels.to(device)}


def _resolve_vectors(
    spec: Intervention, num_layers: int, d_model: int, orthonormal: bool
) -> dict[int, torch.Tensor]:
    layer_spec = spec.layers if spec.layers is not None else spec.default_layers(d_model)
    out = {}
    for layer, direction in spec.directions_by_layer(resolve_layers(layer_spec, num_layers), d_model).items():
        direction.check_usable(d_model)
        d: Direction = direction.orthonormalized() if orthonormal else direction.normalized()
        out[layer] = d.vectors.float()
    return out


def _resolve_saes(config: BlockingConfig, num_layers: int, d_model: int) -> dict[int, SAE]:
    if isinstance(config.sae, dict):
        saes = {int(k): v if isinstance(v, SAE) else SAE.load(v) for k, v in config.sae.items()}
        layers = {k: resolve_layers(k, num_layers)[0] for k in saes}
        saes = {layers[k]: v for k, v in saes.items()}
    else:
        sae = config.sae if isinstance(config.sae, SAE) else SAE.load(config.sae)
        spec = config.layers if config.layers is not None else sae.cfg.get("hook_layer")
        if spec is None:
            raise config._fail(
                "the SAE's cfg.json gives no hook_layer; set `layers` (0-based decoder layer)."
            )
        saes = {layer: sae for layer in resolve_layers(spec, num_layers)}
    for layer, sae in saes.items():
        if sae.d_model != d_model:
            raise config._fail(
                f"the SAE for layer {layer} has d_model={sae.d_model}, the model's hidden size is {d_model}: it "
                "was trained on another model."
            )
        bad = [i for i in config.latents if i >= sae.d_sae]
        if bad:
            raise config._fail(f"latents {bad} out of range for an SAE with {sae.d_sae} latents.")
    return saes
