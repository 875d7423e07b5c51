"""The extraction template: batching, padding masks, hooks, pooling and progress, shared by every method.

An *example* is a dict with ``input_ids: list[int]`` and ``pool_mask: list[int]`` (1 = this position is
pooled), optionally ``attention_mask``. :class:`ActivationExtractor` pads examples into batches (left or
right), runs one or more *views* of a model over each batch (a model, or a PEFT model with its adapter
switched off), captures the site activations with read-only forward hooks, pools them over the pool mask
and hands the pooled rows of one batch to the method's :meth:`~ActivationExtractor.step`. Nothing is kept
beyond a batch unless the method keeps it.

Masks come from the batch, never from tensor indices; position ids are derived from the attention mask,
so left and right padding give the same activations (also for absolute position embeddings).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..direction import Direction
from ..serialization import KeelInputError
from ..sites import SITE_KINDS, decoder_layers, register_site_hook, resolve_layers, unwrap_model

POOLINGS = ("mean", "last", "all")
PADDING_SIDES = ("right", "left")


class ExtractionError(KeelInputError):
    """Extraction input that cannot be used; the message says how to fix it."""


class _StopForward(Exception):
    """Raised by the capture hook of the deepest requested site: later layers and the LM head are skipped."""


@dataclass
class Batch:
    """One padded batch. ``index``: the examples' positions in the input list; ``offset``: how many pad
    tokens precede each row (left padding), so original position = padded position - offset."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pool_mask: torch.Tensor  # bool [B, T]
    position_ids: torch.Tensor
    index: list[int]
    offset: torch.Tensor

    def token_coords(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(example index, original position) of each row that ``pooling="all"`` returns, in order."""
        rows, cols = self.pool_mask.nonzero(as_tuple=True)
        example = torch.as_tensor(self.index, device=rows.device)[rows]
        return example, cols - self.offset.to(cols.device)[rows]

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


@dataclass
class View:
    """A model as seen by one pass: ``name`` keys the pooled activations handed to ``step``.

    ``context`` (optional) is entered around the forward, e.g. ``peft_model.disable_adapter`` for the base
    view of a fine-tuned adapter; the hooks sit on the same modules in both views.
    """

    name: str
    model: nn.Module
    context: Callable[[], contextlib.AbstractContextManager] | None = None


def peft_views(model: nn.Module) -> list[View]:
    """``base`` (adapter disabled) and ``finetuned`` (adapter enabled) views of one PEFT model."""
    if not hasattr(model, "disable_adapter"):
        raise ExtractionError(
            f"{type(model).__name__} has no disable_adapter(): pass a PEFT model, or a separate base model."
        )
    return [View("base", model, model.disable_adapter), View("finetuned", model)]


def _check_example(i: int, ex: dict) -> None:
    for key in ("input_ids", "pool_mask"):
        if key not in ex:
            raise ExtractionError(
                f"Example {i} has no {key!r}: examples are dicts with input_ids and pool_mask "
                "(build them with interventions.extraction.chat_example / text_example)."
            )
    n = len(ex["input_ids"])
    if n == 0:
        raise ExtractionError(f"Example {i} has no tokens.")
    for key in ("pool_mask", "attention_mask"):
        if key in ex and len(ex[key]) != n:
            raise ExtractionError(f"Example {i}: {key} has {len(ex[key])} entries but input_ids has {n}.")


def pad_batch(
    examples: Sequence[dict], index: Sequence[int], pad_token_id: int, padding_side: str = "right"
) -> Batch:
    """Pad examples to one ``[B, T]`` batch; pooled positions must also be attended positions."""
    if padding_side not in PADDING_SIDES:
        raise ExtractionError(f"padding_side must be one of {PADDING_SIDES}, got {padding_side!r}.")
    width = max(len(ex["input_ids"]) for ex in examples)
    B = len(examples)
    ids = torch.full((B, width), pad_token_id, dtype=torch.long)
    attn = torch.zeros(B, width, dtype=torch.long)
    pool = torch.zeros(B, width, dtype=torch.bool)
    offset = torch.zeros(B, dtype=torch.long)
    for row, ex in enumerate(examples):
        n = len(ex["input_ids"])
        start = width - n if padding_side == "left" else 0
        offset[row] = start
        span = slice(start, start + n)
        ids[row, span] = torch.as_tensor(ex["input_ids"], dtype=torch.long)
        attn[row, span] = torch.as_tensor(ex.get("attention_mask", [1] * n), dtype=torch.long)
        pool[row, span] = torch.as_tensor(ex["pool_mask"], dtype=torch.bool)
    pool &= attn.bool()
    position_ids = (attn.cumsum(-1) - 1).clamp(min=0)
    return Batch(ids, attn, pool, position_ids, list(index), offset)


def pool(h: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Pool ``h [B, T, d]`` over ``mask [B, T]`` in float32.

    ``mean``: ``[B, d]`` mean over masked positions; ``last``: ``[B, d]`` last masked position; ``all``:
    ``[n_masked, d]`` the masked rows in row-major order. Selection (not multiplication by the mask), so
    NaNs or garbage at padded positions cannot leak in.
    """
    mask = mask.to(h.device)
    if pooling == "all":
        return h[mask].float()
    if pooling == "mean":
        summed = torch.where(mask.unsqueeze(-1), h.float(), 0.0).sum(1)
        return summed / mask.sum(1, keepdim=True).clamp(min=1)
    if pooling == "last":
        T = mask.shape[1]
        last = torch.where(mask, torch.arange(T, device=h.device), -1).amax(1)
        return h[torch.arange(h.shape[0], device=h.device), last.clamp(min=0)].float()
    raise ExtractionError(f"Unknown pooling {pooling!r}: choose one of {', '.join(POOLINGS)}.")


def _model_device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _accepts(model: nn.Module, name: str) -> bool:
    return name in inspect.signature(unwrap_model(model).forward).parameters


def _pad_id(model: nn.Module, pad_token_id: int | None) -> int:
    if pad_token_id is not None:
        return int(pad_token_id)
    config = unwrap_model(model).config
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(config, attr, None)
        if isinstance(value, list):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return 0  # any id works: padded positions are masked out of attention and pooling


class ActivationExtractor:
    """Template for every extraction method.

    Owns batching, padding masks, the capture hooks, pooling and the progress bar; a method subclasses
    it and supplies :meth:`step` (consume one batch of pooled activations, streaming) and a result
    method. ``stop_early``: stop each forward after the deepest requested site, which skips the rest of
    the model and the LM head (methods that need the loss turn it off).
    """

    method = "base"
    keep_graph = False  # methods that need gradients w.r.t. the sites set this

    def __init__(
        self,
        layers: int | str | Sequence[int] = "all",
        site: str = "resid_post",
        pooling: str = "mean",
        batch_size: int = 16,
        pad_token_id: int | None = None,
        padding_side: str = "right",
        progress: bool | None = None,
        layers_path: str | None = None,
        stop_early: bool = True,
    ):
        if site not in SITE_KINDS:
            raise ExtractionError(f"Unknown site {site!r}: choose one of {', '.join(SITE_KINDS)}.")
        if pooling not in POOLINGS:
            raise ExtractionError(f"Unknown pooling {pooling!r}: choose one of {', '.join(POOLINGS)}.")
        if padding_side not in PADDING_SIDES:
            raise ExtractionError(f"padding_side must be one of {PADDING_SIDES}, got {padding_side!r}.")
        if batch_size < 1:
            raise ExtractionError(f"batch_size must be >= 1, got {batch_size}.")
        self.layer_spec = layers
        self.layers: list[int] | None = None
        self.site = site
        self.pooling = pooling
        self.batch_size = batch_size
        self.pad_token_id = pad_token_id
        self.padding_side = padding_side
        self.progress = progress
        self.layers_path = layers_path
        self.stop_early = stop_early
        self.tokens_seen = 0

    # --- what a method supplies ----------------------------------------------------------------------
    def step(self, group: str, batch: Batch, acts: dict[str, dict[int, torch.Tensor]]) -> None:
        """Consume one batch: ``acts[view][layer]`` is the pooled activation (see :func:`pool`)."""
        raise NotImplementedError

    # --- the template --------------------------------------------------------------------------------
    def _resolve(self, model: nn.Module) -> list[int]:
        num_layers = len(decoder_layers(model, self.layers_path))
        layers = resolve_layers(self.layer_spec, num_layers)
        if self.layers is not None and layers != self.layers:
            raise ExtractionError(
                f"Views resolve to different layers ({self.layers} vs {layers}); the models must share an "
                "architecture."
            )
        self.layers = layers
        return layers

    @contextlib.contextmanager
    def _capture(self, model: nn.Module, store: dict[int, torch.Tensor]) -> Iterator[None]:
        """Hooks that put each site's activation into ``store``; removed in ``finally``.

        Read-only, except with ``keep_graph`` (gradients w.r.t. the sites): the shallowest site's output
        is swapped for an equal leaf tensor that requires grad, so deeper sites stay on its graph.
        """
        layers = self._resolve(model)
        deepest, shallowest = max(layers), min(layers)
        handles = []

        def capture(layer: int, h: torch.Tensor) -> torch.Tensor | None:
            replaced = None
            if not self.keep_graph:
                h = h.detach()
            elif layer == shallowest:
                h = replaced = h.detach().requires_grad_(True)
            store[layer] = h
            if self.stop_early and layer == deepest:
                raise _StopForward
            return replaced

        try:
            for layer in layers:
                fn = functools.partial(capture, layer)
                handles.append(register_site_hook(model, self.site, layer, fn, self.layers_path))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def model_inputs(self, view: View, batch: Batch) -> dict:
        """Keyword arguments of the forward; a method may add some (e.g. ``labels``)."""
        device = _model_device(view.model)
        inputs = dict(
            input_ids=batch.input_ids.to(device),
            attention_mask=batch.attention_mask.to(device),
            position_ids=batch.position_ids.to(device),
            use_cache=False,
        )
        if not self.stop_early and not self.keep_graph and _accepts(view.model, "logits_to_keep"):
            inputs["logits_to_keep"] = 1  # the logits are not needed: skip most of the LM head
        return inputs

    def forward(self, view: View, batch: Batch, store: dict[int, torch.Tensor]):
        """One forward of ``view`` over ``batch`` with the capture hooks on; fills ``store`` and returns
        the model output (None when stopped early)."""
        inputs = self.model_inputs(view, batch)
        store.clear()
        output = None
        ctx = view.context() if view.context is not None else contextlib.nullcontext()
        with ctx, torch.set_grad_enabled(self.keep_graph):
            try:
                output = view.model(**inputs)
            except _StopForward:
                pass
        missing = [layer for layer in self.layers if layer not in store]
        if missing:
            raise ExtractionError(
                f"No activation was captured at {self.site} layers {missing} of view {view.name!r}; the "
                "model's forward never ran those modules (check layers_path)."
            )
        return output

    def make_direction(
        self, layer: int, vectors, mean, method: str, normalization: str, metadata: dict, extra: dict
    ):
        """A Direction at ``layer`` of this extractor's site, carrying the run's provenance."""
        return Direction(
            vectors=vectors,
            mean=mean,
            site=self.site,
            layer=layer,
            method=method,
            normalization=normalization,
            model_id=metadata.get("model_id"),
            model_revision=metadata.get("model_revision"),
            source=metadata.get("source"),
            extra=extra,
        )

    def batches(self, examples: Sequence[dict], pad_token_id: int) -> Iterator[Batch]:
        for start in range(0, len(examples), self.batch_size):
            chunk = examples[start : start + self.batch_size]
            index = range(start, start + len(chunk))
            yield pad_batch(chunk, index, pad_token_id, self.padding_side)

    @torch.no_grad()
    def collect(
        self, examples: Sequence[dict], views: Sequence[View] | nn.Module, group: str = "data"
    ) -> None:
        """Run every view over every batch of ``examples`` and call :meth:`step` once per batch."""
        if isinstance(views, nn.Module):
            views = [View("model", views)]
        if not views:
            raise ExtractionError("No model given to extract from.")
        examples = list(examples)
        if not examples:
            raise ExtractionError(f"No examples for {group!r}: the data set is empty (check the input file).")
        for i, ex in enumerate(examples):
            _check_example(i, ex)
        if not any(any(ex["pool_mask"]) for ex in examples):
            raise ExtractionError(
                f"No example of {group!r} has a pooled position (pool_mask is all zero): check that the "
                "records have answers, or pool over other positions."
            )
        pad_id = _pad_id(views[0].model, self.pad_token_id)
        stores = {view.name: {} for view in views}
        with contextlib.ExitStack() as stack:
            hooked = {}
            for view in views:
                if id(view.model) not in hooked:  # one set of hooks per distinct model
                    hooked[id(view.model)] = stores[view.name]
                    stack.enter_context(self._capture(view.model, hooked[id(view.model)]))
            n_batches = -(-len(examples) // self.batch_size)
            bar = tqdm(
                self.batches(examples, pad_id),
                total=n_batches,
                desc=f"{self.method}:{group}",
                disable=None if self.progress is None else not self.progress,
                leave=False,
            )
            for batch in bar:
                acts = {}
                for view in views:
                    store = hooked[id(view.model)]
                    self.forward(view, batch, store)
                    mask = batch.pool_mask
                    acts[view.name] = {layer: pool(store[layer], mask, self.pooling) for layer in self.layers}
                    store.clear()
                self.tokens_seen += batch.num_tokens * len(views)
                self.step(group, batch, acts)


class PooledCollector(ActivationExtractor):
    """Keeps every pooled row (what :func:`collect_pooled` returns); memory grows with the data."""

    method = "collect"

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.rows: dict[int, list[torch.Tensor]] = {}

    def step(self, group, batch, acts):
        for layer, x in acts["model"].items():
            self.rows.setdefault(layer, []).append(x.cpu())

    def result(self) -> dict[int, torch.Tensor]:
        return {layer: torch.cat(rows) for layer, rows in self.rows.items()}


def collect_pooled(
    model: nn.Module,
    examples: Sequence[dict],
    layers: int | str | Sequence[int],
    site: str = "resid_post",
    pooling: str = "mean",
    batch_size: int = 16,
    pad_token_id: int | None = None,
    padding_side: str = "right",
    progress: bool | None = None,
    layers_path: str | None = None,
) -> dict[int, torch.Tensor]:
    """Per layer, the pooled activations of ``examples``: ``[n_examples, d]`` (``mean``/``last``) or
    ``[n_pooled_tokens, d]`` (``all``, rows in example order)."""
    collector = PooledCollector(
        layers=layers,
        site=site,
        pooling=pooling,
        batch_size=batch_size,
        pad_token_id=pad_token_id,
        padding_side=padding_side,
        progress=progress,
        layers_path=layers_path,
    )
    collector.collect(examples, model)
    return collector.result()


@dataclass
class RunningMean:
    """Streaming sum and count of rows (float64), per key."""

    sums: dict = field(default_factory=dict)
    counts: dict = field(default_factory=dict)

    def add(self, key, rows: torch.Tensor) -> None:
        s = rows.double().sum(0)
        self.sums[key] = self.sums[key] + s if key in self.sums else s
        self.counts[key] = self.counts.get(key, 0) + rows.shape[0]

    def mean(self, key) -> torch.Tensor:
        if not self.counts.get(key):
            raise ExtractionError(f"No pooled rows for {key!r}.")
        return self.sums[key] / self.counts[key]
