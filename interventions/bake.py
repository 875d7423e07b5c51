"""Bake static ablations into the weights, so a model needs no hooks to run them (vLLM, llama.cpp, export).

What is exact, and why. Let ``P = I - U^T U`` for orthonormal rows ``U: [k, d]``. In a pre-norm decoder
the residual stream is a sum of writes: the embedding lookup (plus position embeddings in GPT-2) and,
per block, the attention output projection and the MLP down projection (``o_proj``/``down_proj``,
``dense``/``dense_4h_to_h``, GPT-2's ``c_proj`` Conv1D, whose weight is ``[in, out]``). Orthogonalising
every writer (``W <- P W``, ``b <- P b``, embedding rows ``e <- P e``) is ``site="stream"``: the baked
model equals, exactly (to float rounding), the original with ``project_out`` hooks at **resid_pre of
layer 0 (the embeddings), attn_out of every layer and mlp_out of every layer** (every point where the
stream is written; :func:`equivalent_interventions` builds these specs). Its stream then has no
component along ``U`` anywhere, also at every block boundary.

That is *not* the model with hooks at resid_pre 0 + resid_post of every layer, in a sequential block
(``h + attn(norm h)`` and then ``+ mlp(norm(.))``: Llama, Qwen, Mistral, Phi-3, Gemma, GPT-2): the MLP
reads the attention's write before the block-end hook removes its component along ``U``, which no
weight edit reproduces (measured on tiny models: logits differ by ~1e-2 where the intervention moves them
by ~0.2). To train with hooks and sample from baked weights, train with the ``stream`` placement. Only
parallel-residual blocks (``h + attn(ln1 h) + mlp(ln2 h)``: GPT-NeoX / Pythia with
``use_parallel_residual``) have no mid-block point, so there ``site="resid_post"`` at every layer is
baked exactly (the same weight edit, equal to hooks at resid_pre 0 + resid_post of every layer).

``mean_ablate`` and ``clamp`` (projection set to a constant ``t``) at the stream: the writers are
orthogonalised as above and ``U^T t`` is added once, to every row of the token embedding (divided by the
embedding's scale where the model scales it, as Gemma does); every later write is orthogonal to ``U``,
so the stream's projection stays ``t``. Exactly equal to ``mean_ablate``/``clamp`` at resid_pre 0 plus
``project_out`` at attn_out and mlp_out of every layer.

At the ``attn_out`` / ``mlp_out`` sites (the attention / MLP module outputs) a hook acts on one writer's
output, so baking it is exact at any set of layers, with any coefficient (``W <- (I - c U^T U) W``) and
a different direction per layer; ``mean_ablate``/``clamp`` there need the writer's bias for the offset
(GPT-2, GPT-NeoX, Llama with ``attention_bias``/``mlp_bias``).

Refused, with the reason: other operators (``add`` needs a bias on the residual stream after block ``l``,
which Llama-style blocks lack: export steering to a GGUF control vector instead, see
:mod:`interventions.gguf`; ``reference_ablate``/``resample_ablate`` need a reference pass per input);
``prompt``/``completion`` token masks (weights cannot see where a token sits in the chat); schedules;
the stream or resid_post at a subset of layers (orthogonalising some layers' writers stops new writes
there but leaves what other layers wrote, which a stream hook removes); a coefficient other than 1 at
the stream (a hook shrinks the stream's existing component again at every point, weights only scale each
new write once); resid_post on sequential blocks (above); the stream on architectures with norms *after*
the attention/MLP output (Gemma 2/3, OLMo 2: the norm rescales and re-weights a projected write, so it
is no longer orthogonal when it reaches the stream; their attn_out/mlp_out sites bake exactly);
unmerged adapters; quantized weights.

Tied embeddings: orthogonalising the token embedding would also change the unembedding, which no hook
touches, so a tied ``lm_head`` is untied first (cloned) and ``tie_word_embeddings`` set to False.

What was baked is recorded in ``config.keel_baked`` (saved with ``save_pretrained``): operator, site,
layers, the equivalent hook placement, the basis' SHA-256, the direction's metadata and file hash, the
modules changed.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .direction import Direction, DirectionError, load_directions
from .serialization import KeelInputError
from .sites import decoder_layers, hidden_size, resolve_layers, unwrap_model
from .spec import Intervention, SpecError, prepare_direction

BAKED_KEY = "keel_baked"
BAKE_FORMAT = "keel.baked/v1"
BAKEABLE_OPERATORS = ("project_out", "mean_ablate", "clamp")
BAKE_SITES = ("stream", "resid_post", "attn_out", "mlp_out")
STREAM_PLACEMENT = "resid_pre layer 0 (embeddings) + attn_out and mlp_out at every layer"
PARALLEL_PLACEMENT = "resid_pre layer 0 (embeddings) + resid_post at every layer"


class BakeError(KeelInputError):
    """An intervention or model that cannot be baked exactly; the message says why and what to do."""


@dataclass(frozen=True)
class Writers:
    """Modules that write into the residual stream. ``attn``/``mlp``: the output projections, relative
    to a decoder layer (the modules whose outputs the attn_out / mlp_out sites see, for every
    architecture registered here); ``embeddings``: extra embeddings beside the input embedding (GPT-2's
    position embedding), relative to the unwrapped model; ``parallel``: the config flag that makes the
    blocks parallel-residual (``True`` when they always are); ``stream_exact``: None when the stream bake
    keeps the stream orthogonal, else the reason it cannot."""

    attn: str
    mlp: str
    embeddings: tuple[str, ...] = ()
    parallel: str | bool = False
    stream_exact: str | None = None


_POST_NORM = (
    "its blocks apply a norm *after* the attention and MLP outputs (post_attention_layernorm / "
    "post_feedforward_layernorm) before adding them to the stream; the norm divides by the write's RMS and "
    "re-weights each dimension, so a write projected before it is no longer orthogonal after it. Keep the "
    "hook, or bake the attn_out / mlp_out sites (exact here: they act before that norm)"
)
_LLAMA_LIKE = Writers("self_attn.o_proj", "mlp.down_proj")
WRITERS: dict[str, Writers] = {
    **dict.fromkeys(("llama", "qwen2", "qwen3", "mistral", "phi3", "gemma"), _LLAMA_LIKE),
    **dict.fromkeys(
        ("gemma2", "gemma3_text", "gemma3", "olmo2"),
        Writers("self_attn.o_proj", "mlp.down_proj", stream_exact=_POST_NORM),
    ),
    "gpt_neox": Writers("attention.dense", "mlp.dense_4h_to_h", parallel="use_parallel_residual"),
    "gpt2": Writers("attn.c_proj", "mlp.c_proj", embeddings=("transformer.wpe",)),
}


def register_writers(
    model_type: str,
    attn: str,
    mlp: str,
    embeddings: Sequence[str] = (),
    parallel: str | bool = False,
    stream_exact: str | None = None,
) -> None:
    """Teach keel which modules of ``model_type`` write into the residual stream besides the input
    embedding: for pre-norm blocks, ``h + attn(norm h)`` then ``+ mlp(norm .)`` (or parallel)."""
    WRITERS[model_type] = Writers(attn, mlp, tuple(embeddings), parallel, stream_exact)


# ---- public API -------------------------------------------------------------------------------------


def bake_project_out(
    model: nn.Module,
    direction,
    layers="all",
    site: str = "stream",
    *,
    coefficient: float = 1.0,
    direction_layer: int | None = None,
    union: bool = False,
) -> nn.Module:
    """Fold ``project_out`` of ``direction``'s subspace into ``model``'s weights, in place; returns ``model``.

    ``site="stream"`` (layers ``"all"``): every write into the residual stream is orthogonalised, which
    equals ``project_out`` hooks at resid_pre 0 + attn_out and mlp_out of every layer
    (:func:`equivalent_interventions`). ``site="resid_post"`` (layers ``"all"``): the same edit, accepted
    only for parallel-residual blocks, where it equals hooks at resid_pre 0 + resid_post of every layer.
    ``site="attn_out"``/``"mlp_out"``: any layers, any coefficient. See the module docstring for why.

    ``direction``: a :class:`Direction`, a ``[k, d]`` tensor, a direction file, or a list of Directions.
    Several directions need ``direction_layer`` (use that one) or ``union=True`` (ablate the span of all
    their rows); at attn_out/mlp_out a file's per-layer directions are used at their own layers.
    """
    return bake_ablation(
        model,
        direction,
        "project_out",
        layers,
        site,
        coefficient=coefficient,
        direction_layer=direction_layer,
        union=union,
    )


def bake_ablation(
    model: nn.Module,
    direction,
    operator: str = "project_out",
    layers="all",
    site: str = "stream",
    *,
    value=None,
    coefficient: float = 1.0,
    direction_layer: int | None = None,
    union: bool = False,
) -> nn.Module:
    """:func:`bake_project_out` for ``project_out``, ``mean_ablate`` (to the direction's stored ``mean``)
    and ``clamp`` (to ``value``)."""
    _check_operator(operator, "bake")
    if site not in BAKE_SITES:
        raise BakeError(f"Unknown bake site {site!r}: choose one of {', '.join(BAKE_SITES)}.")
    spec = _spec(operator, direction, site, layers, value, coefficient, direction_layer, union)
    return _bake(model, spec, site)


def equivalent_interventions(
    direction,
    operator: str = "project_out",
    site: str = "stream",
    layers="all",
    *,
    value=None,
    coefficient: float = 1.0,
    direction_layer: int | None = None,
    union: bool = False,
    phases: Sequence[str] = ("train",),
) -> list[Intervention]:
    """The hook interventions a model baked with the same arguments equals exactly: run these during
    training (or generation with hooks) and sample from the baked weights (vLLM) with no mismatch."""
    _check_operator(operator, "bake")
    if site not in BAKE_SITES:
        raise BakeError(f"Unknown bake site {site!r}: choose one of {', '.join(BAKE_SITES)}.")
    if site in ("stream", "resid_post") and layers != "all":
        raise BakeError(f"A {site} bake covers every layer: pass layers='all' (got {layers!r}).")
    spec = _spec(operator, direction, site, layers, value, coefficient, direction_layer, union)
    common = dict(direction=spec.direction, direction_layer=spec.direction_layer, phases=list(phases))
    if site in ("attn_out", "mlp_out"):
        return [_replace_spec(spec, site=site, layers=layers, phases=list(phases), name=f"{operator}@{site}")]
    first = Intervention(
        operator, site="resid_pre", layers=[0], value=value, name=f"{operator}@embeddings", **common
    )
    if site == "resid_post":
        return [
            first,
            Intervention(
                operator,
                site="resid_post",
                layers="all",
                value=value,
                name=f"{operator}@resid_post",
                **common,
            ),
        ]
    return [
        first,
        Intervention("project_out", site="attn_out", layers="all", name="project_out@attn_out", **common),
        Intervention("project_out", site="mlp_out", layers="all", name="project_out@mlp_out", **common),
    ]


def check_bakeable(spec: Intervention | dict) -> Intervention:
    """The spec if it could be baked exactly (checks that need no model), else a :class:`BakeError`.

    A single hook spec is bakeable at attn_out / mlp_out, or at resid_post on every layer of a
    parallel-residual model; the stream bake corresponds to three specs (:func:`equivalent_interventions`).
    """
    spec = Intervention.from_dict(spec)
    name = f"Intervention {spec.name!r}"
    _check_operator(spec.operator, name)
    if spec.tokens != "all":
        raise BakeError(
            f"{name}: tokens={spec.tokens!r} cannot be baked: which tokens are prompt or completion depends on "
            "where they sit in the chat, which weights cannot see. Only tokens: all can be baked."
        )
    if spec.schedule is not None and spec.schedule.kind != "constant":
        raise BakeError(
            f"{name}: a {spec.schedule.kind} schedule moves the coefficient over training; weights hold one "
            "value. Set the coefficient you want and drop the schedule."
        )
    if spec.site == "resid_pre":
        raise BakeError(
            f"{name}: a resid_pre hook alone cannot be baked. Bake the whole stream instead "
            f"(bake_project_out(..., site='stream')), which equals hooks at {STREAM_PLACEMENT}."
        )
    if spec.site == "resid_post" and spec.coefficient != 1.0:
        raise BakeError(
            f"{name}: coefficient {spec.coefficient} at resid_post cannot be baked: the hook multiplies the "
            "stream's existing component along the direction by (1 - c) again at every layer, while weights "
            "can only scale each new write once. Use coefficient 1, or bake the attn_out / mlp_out sites."
        )
    return spec


def bake_intervention(model: nn.Module, spec: Intervention | dict) -> nn.Module:
    """Bake one hook intervention spec into ``model``'s weights (in place; returns ``model``), or refuse
    with the reason (:func:`check_bakeable`, then the model-dependent checks)."""
    spec = check_bakeable(spec)
    return _bake(model, spec, spec.site)


OPERATOR_REFUSALS = {
    "add": (
        "steering adds a constant vector after block l, i.e. a bias on the residual stream at that layer, "
        "which Llama-style blocks do not have (o_proj and down_proj carry no bias). For llama.cpp export the "
        "vectors as a GGUF control vector (interventions.gguf.export_control_vector, keel bake --gguf_out); "
        "elsewhere keep the hook"
    ),
    "reference_ablate": (
        "it sets the projection to what a reference model has on the same input, which takes a second "
        "forward pass per input; weights cannot hold that. Keep the hook, or bake mean_ablate with a mean "
        "measured on the reference model"
    ),
    "resample_ablate": (
        "it takes the reference model's projection from another row of the batch, which needs a reference "
        "pass and a batch; weights cannot hold that. Keep the hook"
    ),
}


def _check_operator(operator: str, what: str) -> None:
    if operator not in BAKEABLE_OPERATORS:
        reason = OPERATOR_REFUSALS.get(
            operator,
            "keel bakes project_out, mean_ablate and clamp only; what another operator does to weights is unknown",
        )
        raise BakeError(f"{what}: {operator} cannot be baked into weights: {reason}.")


def _spec(operator, direction, site, layers, value, coefficient, direction_layer, union) -> Intervention:
    """An :class:`Intervention` that loads and checks the direction(s) as hooks would; the stream bake
    borrows site resid_post for it."""
    if site in ("stream", "resid_post") and coefficient != 1.0:
        raise BakeError(
            f"coefficient {coefficient} at {site} cannot be baked: a hook on the stream multiplies its "
            "existing component along the direction by (1 - c) again at every point, while weights can "
            "only scale each new write once. Use coefficient 1, or bake the attn_out / mlp_out sites."
        )
    direction = _direction_arg(direction, union)
    if direction_layer is None and site in ("stream", "resid_post"):
        direction_layer = _only_layer(direction)
    return Intervention(
        operator,
        direction,
        site="resid_post" if site == "stream" else site,
        layers=layers,
        coefficient=coefficient,
        value=value,
        direction_layer=direction_layer,
        name=f"bake:{operator}@{site}",
    )


def _only_layer(direction) -> int | None:
    """The layer a single-direction file or Direction records: a stream bake applies it at every layer,
    as ``direction_layer`` says on purpose (a file with several directions still has to choose)."""
    if isinstance(direction, Direction):
        return direction.layer
    if isinstance(direction, (str, Path)) and not str(direction).startswith(("random:", "wandb:")):
        try:
            directions = load_directions(direction)
        except (FileNotFoundError, DirectionError):
            return None  # the spec reports it, naming the file
        if len(directions) == 1:
            return directions[0].layer
    return None


def _replace_spec(spec: Intervention, **changes) -> Intervention:
    data = {f: getattr(spec, f) for f in ("operator", "direction", "site", "layers", "coefficient", "value")}
    data.update(direction_layer=spec.direction_layer, **changes)
    return Intervention(**data)


def _bake(model: nn.Module, spec: Intervention, site: str) -> nn.Module:
    base = unwrap_model(model)
    _check_model(model, base)
    model_type = getattr(base.config, "model_type", None)
    writers = WRITERS.get(model_type)
    if writers is None:
        raise BakeError(
            f"keel does not know which modules of model_type {model_type!r} write into the residual stream; "
            f"known: {', '.join(sorted(WRITERS))}. For a pre-norm architecture register them with "
            f"interventions.bake.register_writers({model_type!r}, attn='self_attn.o_proj', mlp='mlp.down_proj')."
        )
    if getattr(base.config, "add_cross_attention", False):
        raise BakeError(
            "This model has cross-attention layers, which write into the residual stream too; keel's writer "
            "table does not cover them. Keep the hook."
        )
    blocks = decoder_layers(base)
    n, d = len(blocks), hidden_size(base)
    layers = resolve_layers(spec.layers if spec.layers is not None else spec.default_layers(d), n)
    whole_stream = site in ("stream", "resid_post")
    if whole_stream:
        _check_stream(spec, site, layers, n, writers, base.config, model_type)
    directions = spec.directions_by_layer(layers, d)
    prepared = {}
    for layer, direction in directions.items():
        try:
            direction.check_usable(d)
        except DirectionError as err:
            raise BakeError(f"Intervention {spec.name!r} at layer {layer}: {err}") from None
        prepared[layer] = _basis_and_target(spec, direction)
    names = {id(m): name for name, m in base.named_modules()}
    # Every module and check first, then the edits: a refusal leaves the model as it was.
    plan: list[tuple[nn.Module, float, torch.Tensor | None]] = []
    if whole_stream:
        basis, target = prepared[layers[0]]
        if any(not _same(prepared[i], (basis, target)) for i in layers):
            raise BakeError(
                f"Intervention {spec.name!r} uses different directions at different layers; a stream bake "
                "needs one subspace for the whole stream. Set direction_layer to pick one, bake the union "
                "of their rows (union=True / --union), or bake the attn_out / mlp_out sites per layer."
            )
        embedding = base.get_input_embeddings()
        offset = None if target is None else target / _embedding_scale(embedding, model_type)
        plan.append((embedding, 1.0, offset))
        plan += [(_module(base, path, model_type), 1.0, None) for path in writers.embeddings]
        for i, block in enumerate(blocks):
            plan += [(_module(block, rel, model_type, i), 1.0, None) for rel in (writers.attn, writers.mlp)]
        per_module_basis = [basis] * len(plan)
    else:
        rel = writers.attn if site == "attn_out" else writers.mlp
        per_module_basis = []
        for layer in layers:
            basis, target = prepared[layer]
            module = _module(blocks[layer], rel, model_type, layer)
            if target is not None and getattr(module, "bias", None) is None:
                raise BakeError(
                    f"{spec.operator} at {site} sets the projection to a constant, which needs a bias on "
                    f"{names[id(module)]} to hold the offset; it has none. Use project_out there, or bake "
                    "the stream (site stream: the offset then goes into the embedding once)."
                )
            plan.append((module, spec.coefficient, target))
            per_module_basis.append(basis)
    for (module, _, _), basis in zip(plan, per_module_basis):
        _check_writer(module, basis.shape[1])
    untied = _untie_embeddings(base) if whole_stream else False
    with torch.no_grad():
        for (module, alpha, target), basis in zip(plan, per_module_basis):
            _orthogonalise(module, basis, alpha, target)
    changed = [names[id(module)] for module, _, _ in plan]
    _record(base, spec, site, layers, n, directions, prepared, changed, untied)
    return model


def _check_stream(spec, site, layers, n, writers, config, model_type) -> None:
    if layers != list(range(n)):
        raise BakeError(
            f"{site} at layers {layers} of {n}: a partial set cannot be baked exactly (orthogonalising those "
            "layers' writers stops new writes along the direction there but leaves what other layers wrote, "
            "which a hook on the stream removes). Bake layers all, bake the attn_out / mlp_out sites at those "
            "layers (what the hooks there do), or keep the hook."
        )
    if writers.stream_exact is not None:
        raise BakeError(
            f"The residual stream of {model_type} cannot be baked exactly: {writers.stream_exact}."
        )
    parallel = writers.parallel is True or (
        isinstance(writers.parallel, str) and bool(getattr(config, writers.parallel, False))
    )
    if site == "resid_post" and not parallel:
        raise BakeError(
            f"resid_post hooks on {model_type} cannot be baked exactly: its blocks are sequential, so the MLP "
            "reads the attention's write before the block-end hook removes its component along the direction, "
            "which no weight edit reproduces. Bake site stream instead: it equals hooks at "
            f"{STREAM_PLACEMENT} (train with those, interventions.bake.equivalent_interventions(), to sample "
            "from baked weights with no mismatch)."
        )


def baked_record(model_or_config) -> dict | None:
    """What :func:`bake_intervention` recorded in a model's config (None for a model never baked)."""
    config = getattr(unwrap_model(model_or_config), "config", model_or_config)
    return getattr(config, BAKED_KEY, None)


# ---- helpers ----------------------------------------------------------------------------------------


def _direction_arg(direction, union: bool):
    """What an :class:`Intervention` takes as ``direction``; ``union`` stacks several into one subspace."""
    if isinstance(direction, (list, tuple)):
        if not all(isinstance(x, Direction) for x in direction):
            raise BakeError("A list of directions must hold Direction objects.")
        directions = list(direction)
    elif union and isinstance(direction, (str, Path)):
        directions = load_directions(direction)
    else:
        return direction
    if not union:
        if len(directions) == 1:
            return directions[0]
        raise BakeError(
            f"{len(directions)} directions given; pass direction_layer to use one of them, or union=True to "
            "ablate the span of all their rows."
        )
    rows = torch.cat([x.vectors for x in directions])
    first = directions[0]
    try:
        return Direction(
            rows,
            site=first.site,
            model_id=first.model_id,
            model_revision=first.model_revision,
            method=f"union({', '.join(sorted({x.method for x in directions}))})",
            source=first.source if isinstance(direction, (list, tuple)) else str(direction),
            extra={"union_of_layers": [x.layer for x in directions]},
        ).orthonormalized()
    except DirectionError as err:
        raise BakeError(f"Cannot form the union of {len(directions)} directions: {err}") from None


def _basis_and_target(spec: Intervention, direction: Direction) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Orthonormal ``[k, d]`` basis (float64) and the projection target (None for project_out), prepared
    exactly as the hook runtime prepares them (``spec.prepare_direction``)."""
    try:
        basis, mean, value = prepare_direction(spec, direction)
    except SpecError as err:
        raise BakeError(str(err)) from None
    if spec.operator == "project_out":
        target = None
    elif spec.operator == "mean_ablate":
        target = mean
    else:
        target = value.reshape(-1).expand(direction.k)
    basis = basis.double()
    return basis, None if target is None else target.double() @ basis


def _same(a, b) -> bool:
    (ua, ta), (ub, tb) = a, b
    if ua.shape != ub.shape or (ta is None) != (tb is None):
        return False
    return torch.equal(ua, ub) and (ta is None or torch.equal(ta, tb))


def _check_model(model: nn.Module, base: nn.Module) -> None:
    if hasattr(model, "peft_config") or any("lora_" in name for name, _ in base.named_modules()):
        raise BakeError(
            "The model carries a PEFT adapter: its layers add their own writes, which baking would miss. "
            "Merge it first (model = model.merge_and_unload()); keel bake --adapter does this."
        )
    for name, param in base.named_parameters():
        if not param.dtype.is_floating_point:
            raise BakeError(
                f"Parameter {name} has dtype {param.dtype} (a quantized model?): bake the full-precision "
                "model, then quantize the result."
            )


def _module(root: nn.Module, path: str, model_type: str, layer: int | None = None) -> nn.Module:
    obj = root
    for part in path.split("."):
        if not hasattr(obj, part):
            where = f"decoder layer {layer}" if layer is not None else "the model"
            raise BakeError(
                f"{where} of this {model_type} model has no module {path!r} (missing {part!r}); register its "
                "residual-stream writers with interventions.bake.register_writers()."
            )
        obj = getattr(obj, part)
    return obj


def _untie_embeddings(base: nn.Module) -> bool:
    """Give a tied ``lm_head`` its own copy of the weights, and record that in the config."""
    head, embedding = base.get_output_embeddings(), base.get_input_embeddings()
    if head is None or head.weight.data_ptr() != embedding.weight.data_ptr():
        return False
    head.weight = nn.Parameter(
        embedding.weight.detach().clone(), requires_grad=embedding.weight.requires_grad
    )
    for config in {id(c): c for c in (base.config, base.config.get_text_config())}.values():
        config.tie_word_embeddings = False
    return True


def _embedding_scale(embedding: nn.Module, model_type: str) -> float:
    """The factor the embedding module multiplies its rows by (Gemma: sqrt(d)); 1 otherwise."""
    scale = getattr(embedding, "embed_scale", None)
    if scale is None:
        if model_type.startswith("gemma"):
            raise BakeError(
                f"This {model_type} embedding ({type(embedding).__name__}) has no embed_scale: this transformers "
                "version scales embeddings elsewhere, so a mean/clamp offset cannot be placed exactly."
            )
        return 1.0
    return float(torch.as_tensor(scale).to(embedding.weight.dtype).double())


_CHUNK = 8192


def _writer_layout(module: nn.Module) -> tuple[int, torch.Tensor | None]:
    """(the weight dimension of width d_model, the bias) of a writer module."""
    if isinstance(module, nn.Embedding):
        return 1, None
    if isinstance(module, Conv1D):  # GPT-2: weight [in, out]
        return 1, module.bias
    if isinstance(module, nn.Linear):
        return 0, module.bias
    raise BakeError(
        f"Cannot bake into a {type(module).__name__}: keel handles nn.Linear, transformers Conv1D and "
        "nn.Embedding writers."
    )


def _check_writer(module: nn.Module, d: int) -> None:
    d_dim, _ = _writer_layout(module)
    if module.weight.shape[d_dim] != d:
        raise BakeError(
            f"{type(module).__name__} weight of shape {tuple(module.weight.shape)} does not write {d}-wide vectors."
        )


def _orthogonalise(module: nn.Module, basis: torch.Tensor, alpha: float, target: torch.Tensor | None) -> None:
    """Remove ``alpha`` of every write's component along ``basis`` (and add ``alpha * target`` through the
    bias, or, for an embedding, to every row), in float32/64 arithmetic, cast back to the weight's dtype."""
    weight = module.weight
    d_dim, bias = _writer_layout(module)
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    U = basis.to(weight.device, dtype)
    data = weight.data
    for start in range(0, data.shape[1 - d_dim], _CHUNK):
        if d_dim == 1:
            w = data[start : start + _CHUNK].to(dtype)
            w = w - alpha * (w @ U.T) @ U
            if target is not None and bias is None:  # embedding rows carry the offset
                w = w + alpha * target.to(w)
            data[start : start + _CHUNK] = w.to(data.dtype)
        else:
            w = data[:, start : start + _CHUNK].to(dtype)
            w = w - alpha * U.T @ (U @ w)
            data[:, start : start + _CHUNK] = w.to(data.dtype)
    if bias is not None:
        b = bias.data.to(dtype)
        b = b - alpha * (U @ b) @ U
        if target is not None:
            b = b + alpha * target.to(b)
        bias.data.copy_(b.to(bias.dtype))


def _record(
    base: nn.Module,
    spec: Intervention,
    site: str,
    layers: list[int],
    num_layers: int,
    directions: dict[int, Direction],
    prepared: dict,
    changed: list[str],
    untied: bool,
) -> None:
    digest = hashlib.sha256()
    for layer in layers:
        basis, target = prepared[layer]
        digest.update(basis.float().contiguous().numpy().tobytes())
        if target is not None:
            digest.update(target.float().contiguous().numpy().tobytes())
    first = directions[layers[0]]
    if site == "stream":
        hooks = f"{spec.operator} at resid_pre layer 0, project_out at attn_out and mlp_out at every layer"
    elif site == "resid_post":
        hooks = f"{spec.operator} at {PARALLEL_PLACEMENT}"
    else:
        hooks = f"{spec.operator} at {site} layers {layers} (coefficient {spec.coefficient})"
    entry = {
        "operator": spec.operator,
        "site": site,
        "layers": layers,
        "num_layers": num_layers,
        "equivalent_hooks": hooks,
        "coefficient": spec.coefficient,
        "value": spec.value,
        "k": int(prepared[layers[0]][0].shape[0]),
        "d_model": int(prepared[layers[0]][0].shape[1]),
        "basis_sha256": digest.hexdigest(),
        "direction": {
            key: first.metadata()[key]
            for key in ("model_id", "model_revision", "method", "source", "site", "layer", "normalization")
        },
        "direction_layers": sorted({directions[i].layer for i in layers}, key=str),
        "direction_file": spec.direction_fingerprint(),
        "modules": changed,
        "untied_lm_head": untied,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(),
    }
    previous = getattr(base.config, BAKED_KEY, None) or {}
    setattr(base.config, BAKED_KEY, {"format": BAKE_FORMAT, "bakes": [*previous.get("bakes", []), entry]})
