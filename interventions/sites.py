"""Where in a model an intervention acts: sites, layer indices, and the architecture registry.

Layer convention (stated once, tested against ``output_hidden_states``):
``resid_post`` at layer ``i`` is the output of decoder layer ``i`` (0-based), which is
``hidden_states[i + 1]`` of ``model(..., output_hidden_states=True)`` for every layer but the last (whose
``hidden_states`` entry has the final norm applied in transformers 5); ``resid_pre`` at layer ``i`` is
the input of decoder layer ``i`` (``hidden_states[i]``). Persona-vector files index layer 0 as the
embeddings, so their vector ``L`` belongs to ``resid_post`` at layer ``L - 1`` here.

Layers are found from ``config.model_type`` through a registry, never guessed: an unknown architecture
gets an error that says how to register it or pass ``layers_path``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

SITE_KINDS = ("resid_pre", "resid_post", "attn_out", "mlp_out")


@dataclass(frozen=True)
class ArchitectureEntry:
    """Module paths of one architecture, relative to the unwrapped causal-LM model."""

    layers_path: str
    attn_name: str = "self_attn"
    mlp_name: str = "mlp"


_REGISTRY: dict[str, ArchitectureEntry] = {}


def register_architecture(
    model_type: str, layers_path: str, attn_name: str = "self_attn", mlp_name: str = "mlp"
) -> None:
    """Teach keel where the decoder layers of ``model_type`` live (e.g. ``"model.layers"``)."""
    _REGISTRY[model_type] = ArchitectureEntry(layers_path, attn_name, mlp_name)


for _mt in ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3_text", "phi3", "olmo2"):
    register_architecture(_mt, "model.layers")
# Multimodal Gemma 3 keeps its text decoder under model.language_model.
register_architecture("gemma3", "model.language_model.layers")
register_architecture("gpt_neox", "gpt_neox.layers", attn_name="attention")
register_architecture("gpt2", "transformer.h", attn_name="attn")


def registered_model_types() -> list[str]:
    return sorted(_REGISTRY)


def unwrap_model(model: nn.Module) -> nn.Module:
    """See through DDP/accelerate (``.module``), ``torch.compile`` (``._orig_mod``) and PEFT wrappers."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        elif hasattr(model, "get_base_model") and callable(model.get_base_model):
            model = model.get_base_model()
        elif isinstance(getattr(model, "module", None), nn.Module) and not hasattr(model, "config"):
            model = model.module
    return model


def _get_path(root: nn.Module, path: str) -> nn.Module:
    obj = root
    for part in path.split("."):
        if not hasattr(obj, part):
            raise AttributeError(part)
        obj = getattr(obj, part)
    return obj


LAYERS_PATH_HELP = (
    "pass layers_path=... (Python) or intervention_layers_path: ... (recipe key), or register the model type "
    "once with interventions.register_architecture(model_type, path)"
)


def candidate_layer_lists(model: nn.Module) -> list[tuple[str, int]]:
    """(dotted path, length) of every ModuleList of same-class modules in ``model``: where decoder
    layers may live, for error messages."""
    found = []
    for name, module in unwrap_model(model).named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 1:
            if len({type(m) for m in module}) == 1:
                found.append((name, len(module)))
    return found


def _candidates_text(model: nn.Module) -> str:
    found = candidate_layer_lists(model)
    if not found:
        return "No ModuleList of repeated blocks was found in the model."
    listed = ", ".join(
        f"{path!r} ({n} x {type(_get_path(unwrap_model(model), path)[0]).__name__})" for path, n in found
    )
    return f"Layer lists found in this model: {listed}."


def _first_candidate(model: nn.Module) -> str:
    found = candidate_layer_lists(model)
    return max(found, key=lambda c: c[1])[0] if found else "model.layers"


def decoder_layers(model: nn.Module, layers_path: str | None = None) -> nn.ModuleList:
    """The model's list of decoder layers, found by ``layers_path`` or the registry."""
    base = unwrap_model(model)
    if layers_path is None:
        model_type = getattr(getattr(base, "config", None), "model_type", None)
        if model_type not in _REGISTRY:
            raise ValueError(
                f"Unknown model_type {model_type!r}: keel does not know where its decoder layers are. "
                f"{_candidates_text(base)} Register it with interventions.register_architecture("
                f"{model_type!r}, {_first_candidate(base)!r}), or pass layers_path=... (Python) / "
                f"intervention_layers_path: ... (recipe key). Known model types: {', '.join(registered_model_types())}."
            )
        layers_path = _REGISTRY[model_type].layers_path
    try:
        layers = _get_path(base, layers_path)
    except AttributeError as err:
        raise ValueError(
            f"layers_path {layers_path!r} not found on {type(base).__name__} (missing attribute {err}). "
            f"{_candidates_text(base)} Give the path of the decoder layers: {LAYERS_PATH_HELP}."
        ) from None
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(
            f"layers_path {layers_path!r} is a {type(layers).__name__}, not a ModuleList of layers. "
            f"{_candidates_text(base)}"
        )
    return layers


LAYERS_HELP = "an int (12), a list of ints ([3, 5]), 'all', or a range 'start:stop' ('4:8', '4:', ':-2')"


def parse_layers(spec) -> str | slice | list[int]:
    """Check the syntax of a layer selection without a model: ``"all"``, a slice, or a list of ints.

    Booleans, floats and non-numeric strings are refused (``true`` or ``1.5`` must not become layer 1).
    """
    if spec is None:
        raise ValueError(f"No layers given: set `layers` to {LAYERS_HELP}.")
    if isinstance(spec, bool) or isinstance(spec, float):
        raise ValueError(f"Cannot read layers {spec!r}: use {LAYERS_HELP}.")
    if isinstance(spec, int):
        return [spec]
    if isinstance(spec, str):
        text = spec.strip()
        if text == "all":
            return "all"
        try:
            if ":" in text:
                start, _, stop = text.partition(":")
                if ":" in stop:
                    raise ValueError
                return slice(int(start) if start.strip() else None, int(stop) if stop.strip() else None)
            return [int(text)]
        except ValueError:
            raise ValueError(f"Cannot read layers {spec!r}: use {LAYERS_HELP}.") from None
    if isinstance(spec, Sequence):
        bad = [i for i in spec if isinstance(i, bool) or not isinstance(i, int)]
        if bad or not spec:
            raise ValueError(
                f"Cannot read layers {spec!r} ({'entries ' + repr(bad) if bad else 'empty'}): use {LAYERS_HELP}."
            )
        return list(spec)
    raise ValueError(f"Cannot read layers {spec!r}: use {LAYERS_HELP}.")


def resolve_layers(spec: int | str | Sequence[int] | None, num_layers: int) -> list[int]:
    """Turn ``12``, ``[3, 5]``, ``"all"``, ``"4:8"`` or ``"-1"`` into sorted valid 0-based indices."""
    parsed = parse_layers(spec)
    if parsed == "all":
        idx = list(range(num_layers))
    elif isinstance(parsed, slice):
        idx = list(range(num_layers))[parsed]
    else:
        idx = parsed
    out = []
    for i in idx:
        j = i + num_layers if i < 0 else i
        if not 0 <= j < num_layers:
            raise ValueError(
                f"Layer {i} is out of range: the model has {num_layers} decoder layers (valid 0..{num_layers - 1})."
            )
        out.append(j)
    if not out:
        raise ValueError(f"Layers {spec!r} select no layer of a {num_layers}-layer model.")
    return sorted(set(out))


def site_module(model: nn.Module, kind: str, layer: int, layers_path: str | None = None) -> nn.Module:
    """The module whose forward output (or, for ``resid_pre``, input) is the site's activation."""
    if kind not in SITE_KINDS:
        raise ValueError(f"Unknown site {kind!r}: choose one of {', '.join(SITE_KINDS)}.")
    layers = decoder_layers(model, layers_path)
    (layer,) = resolve_layers(layer, len(layers))
    block = layers[layer]
    if kind in ("resid_pre", "resid_post"):
        return block
    base = unwrap_model(model)
    entry = _REGISTRY.get(getattr(base.config, "model_type", None), ArchitectureEntry(""))
    name = entry.attn_name if kind == "attn_out" else entry.mlp_name
    if not hasattr(block, name):
        raise ValueError(
            f"Decoder layer {layer} ({type(block).__name__}) has no submodule {name!r} for site {kind!r}; "
            "register the architecture with the right attn_name/mlp_name."
        )
    return getattr(block, name)


def hidden_size(model: nn.Module) -> int:
    config = unwrap_model(model).config
    config = getattr(config, "text_config", None) or config
    for attr in ("hidden_size", "n_embd", "d_model"):
        if hasattr(config, attr):
            return int(getattr(config, attr))
    raise ValueError(f"Cannot read the hidden size from {type(config).__name__}.")


def unpack_output(output):
    """Split a block output into (hidden tensor, repack function): tensor, tuple/list, or ModelOutput."""
    if isinstance(output, torch.Tensor):
        return output, lambda h: h
    if isinstance(output, (tuple, list)):
        rest = output[1:]
        return output[0], lambda h: type(output)((h, *rest))
    if hasattr(output, "keys") and hasattr(output, "__getitem__"):
        key = next(iter(output.keys()))

        def repack(h):
            output[key] = h
            return output

        return output[key], repack
    raise TypeError(f"Cannot find the hidden states in a block output of type {type(output).__name__}.")


def register_site_hook(
    model: nn.Module,
    kind: str,
    layer: int,
    fn: Callable[[torch.Tensor], torch.Tensor | None],
    layers_path: str | None = None,
):
    """Hook ``fn(h)`` on the residual stream at a site: it sees the hidden states ``[B, T, d]`` and returns
    a replacement or None (unchanged). ``resid_pre`` is a pre-hook on the layer's input (positional or
    ``hidden_states=``), the other sites a hook on the module's output. Returns the handle."""
    module = site_module(model, kind, layer, layers_path)
    if kind == "resid_pre":

        def pre_hook(module, args, kwargs):
            if args:
                new = fn(args[0])
                return None if new is None else ((new, *args[1:]), kwargs)
            new = fn(kwargs["hidden_states"])
            return None if new is None else (args, {**kwargs, "hidden_states": new})

        return module.register_forward_pre_hook(pre_hook, with_kwargs=True)

    def hook(module, args, output):
        h, repack = unpack_output(output)
        new = fn(h)
        return None if new is None else repack(new)

    return module.register_forward_hook(hook)
