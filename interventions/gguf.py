"""GGUF control vectors (llama.cpp ``--control-vector``, repeng ``export_gguf``) to and from keel.

The format, as llama.cpp reads it (``common_control_vector_load_one``) and repeng writes it: a GGUF file
with ``general.architecture = "controlvector"``, metadata ``controlvector.model_hint`` (the model type,
e.g. ``"llama"``; informational) and ``controlvector.layer_count`` (the number of direction tensors), and
one F32 1-D tensor ``direction.<k>`` of width ``n_embd`` per steered layer. llama.cpp reads no metadata;
it adds ``scale * direction.k`` to the output of block ``k`` (0-based), i.e. keel's ``resid_post`` at
layer ``k`` (``hidden_states[k + 1]``), at every position. ``direction.0`` is rejected ("invalid (zero)
direction tensor layer index"): block 0's output cannot be steered, so keel refuses layer 0 rather than
write a file llama.cpp will not load. Any other tensor name, a non-F32 or non-1-D tensor, or mixed widths
are errors there too, and here.

keel's side of it: an ``add`` intervention at ``resid_post`` layer ``k`` adds ``coefficient * sum of the
direction's rows``; :func:`directions_to_control_vector` computes exactly that per layer, and
:func:`control_vector_to_directions` gives one-row Directions that an ``add`` intervention with
``coefficient: s`` (layers: the file's own) turns into llama.cpp's ``--control-vector-scaled FILE s``.

Needs the ``gguf`` package (``pip install 'keel-trl[export]'``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from .direction import Direction, load_directions
from .serialization import KeelInputError

ARCHITECTURE = "controlvector"
MODEL_HINT_KEY = "controlvector.model_hint"
LAYER_COUNT_KEY = "controlvector.layer_count"
TENSOR_NAME = re.compile(r"^direction\.(\d+)$")
METHOD = "gguf_control_vector"


class ControlVectorError(KeelInputError):
    """A control vector that llama.cpp (or keel) cannot use as given; the message says how to fix it."""


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ControlVectorError(
            "GGUF control vectors need the gguf package: pip install 'keel-trl[export]' (or 'gguf>=0.10')."
        ) from None
    return gguf


def _as_vector(layer, vector) -> np.ndarray:
    """A finite float32 ``[d]`` array (``[1, d]`` is squeezed; float32 input is kept bit for bit)."""
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
        raise ControlVectorError(f"Layer keys must be ints (0-based decoder layers); got {layer!r}.")
    t = torch.as_tensor(vector).detach().cpu()
    if t.ndim == 2 and t.shape[0] == 1:
        t = t[0]
    if t.ndim != 1 or t.numel() == 0:
        raise ControlVectorError(
            f"Layer {layer}: a control vector is one [d_model] vector per layer, got shape {tuple(t.shape)}. "
            "For a [k, d] direction add its rows times the coefficient (what the add operator does): "
            "directions_to_control_vector()."
        )
    if not t.is_floating_point():
        raise ControlVectorError(f"Layer {layer}: the vector has dtype {t.dtype}; give floats.")
    t = t.to(torch.float32).contiguous()
    if not torch.isfinite(t).all():
        raise ControlVectorError(f"Layer {layer}: the vector holds NaN or inf values.")
    return t.numpy().copy()


def export_control_vector(
    path: str | Path,
    vectors_by_layer: Mapping[int, torch.Tensor],
    model_hint: str,
    num_layers: int | None = None,
) -> Path:
    """Write ``{layer: [d] vector}`` (keel resid_post layers, 0-based) as a llama.cpp control vector.

    Layer 0 is refused (llama.cpp cannot steer block 0); ``num_layers`` (the model's) checks the range.
    Vectors are written as F32 (other float dtypes are converted). The file is written atomically.
    """
    gguf = _gguf()
    if not vectors_by_layer:
        raise ControlVectorError("No vectors to export.")
    if not isinstance(model_hint, str) or not model_hint:
        raise ControlVectorError(
            "model_hint must be the model type (config.model_type, e.g. 'llama' or 'qwen2'), as repeng writes."
        )
    arrays = {int(layer): _as_vector(layer, v) for layer, v in vectors_by_layer.items()}
    bad = sorted(layer for layer in arrays if layer < 1 or (num_layers is not None and layer >= num_layers))
    if bad:
        limit = f" and < {num_layers} (the model's decoder layers)" if num_layers is not None else ""
        raise ControlVectorError(
            f"Layers {bad} cannot go into a llama.cpp control vector: layers must be >= 1{limit}. "
            "llama.cpp adds direction.k to the output of block k and rejects k = 0 ('invalid (zero) direction "
            "tensor layer index'), so block 0's output cannot be steered: drop layer 0, or steer layer 1."
        )
    widths = {layer: a.shape[0] for layer, a in arrays.items()}
    if len(set(widths.values())) != 1:
        raise ControlVectorError(f"All vectors must have the same width (n_embd); got {widths}.")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), ARCHITECTURE)
    try:
        writer.add_string(MODEL_HINT_KEY, model_hint)
        writer.add_uint32(LAYER_COUNT_KEY, len(arrays))
        for layer in sorted(arrays):
            writer.add_tensor(f"direction.{layer}", arrays[layer])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    os.replace(tmp, path)
    return path


def _field_value(reader, key: str):
    field = reader.get_field(key)
    if field is None:
        return None
    part = field.parts[field.data[0]]
    if part.dtype == np.uint8:  # a string's bytes
        return bytes(part).decode("utf-8")
    return part.tolist()[0]


def import_control_vector(path: str | Path) -> dict[int, torch.Tensor]:
    """``{layer: float32 [d] tensor}`` from a control vector file, checked as llama.cpp checks it
    (``direction.<k>`` names with k >= 1, F32, 1-D, one width); bit-exact to what was written."""
    gguf = _gguf()
    path = Path(path)
    if not path.is_file():
        raise ControlVectorError(f"{path}: no such file.")
    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, KeyError) as err:
        raise ControlVectorError(f"{path} is not a readable GGUF file: {err}") from None
    out: dict[int, torch.Tensor] = {}
    for tensor in reader.tensors:
        match = TENSOR_NAME.match(tensor.name)
        if match is None:
            raise ControlVectorError(
                f"{path}: tensor {tensor.name!r} is not a control-vector direction (names are direction.<k>); "
                "is this a model file rather than a control vector?"
            )
        layer = int(match.group(1))
        if layer == 0:
            raise ControlVectorError(
                f"{path}: direction.0 found; llama.cpp rejects it (block 0 cannot be steered)."
            )
        if tensor.tensor_type != gguf.GGMLQuantizationType.F32 or len(tensor.shape) != 1:
            raise ControlVectorError(
                f"{path}: {tensor.name} is {tensor.tensor_type.name} with shape {list(tensor.shape)}; "
                "llama.cpp needs F32 1-D direction tensors."
            )
        vector = torch.from_numpy(np.array(tensor.data, dtype=np.float32, copy=True))
        out[layer] = out[layer] + vector if layer in out else vector  # llama.cpp sums repeats
    if not out:
        raise ControlVectorError(f"{path} holds no direction tensors.")
    widths = {v.numel() for v in out.values()}
    if len(widths) != 1:
        raise ControlVectorError(f"{path}: direction tensors of different widths {sorted(widths)}.")
    return dict(sorted(out.items()))


def control_vector_info(path: str | Path) -> dict:
    """The file's metadata: architecture, model_hint, layer_count (None where absent), layers, n_embd."""
    gguf = _gguf()
    vectors = import_control_vector(path)
    reader = gguf.GGUFReader(str(path))
    return {
        "architecture": _field_value(reader, "general.architecture"),
        "model_hint": _field_value(reader, MODEL_HINT_KEY),
        "layer_count": _field_value(reader, LAYER_COUNT_KEY),
        "layers": sorted(vectors),
        "n_embd": next(iter(vectors.values())).numel(),
    }


def directions_to_control_vector(
    directions: Direction | Sequence[Direction] | str | Path,
    coefficient: float = 1.0,
    layers: Sequence[int] | None = None,
) -> dict[int, torch.Tensor]:
    """What an ``add`` intervention with these directions adds at each resid_post layer:
    ``coefficient * sum of the rows`` (several directions at one layer are summed, as stacked hooks or
    llama.cpp's repeated tensors would). ``resid_pre`` layer ``l`` is the same tensor as resid_post
    ``l - 1``. ``layers``: put a single direction that records no layer (or every direction) at these
    layers instead of its own."""
    if isinstance(directions, (str, Path)):
        directions = load_directions(directions)
    elif isinstance(directions, Direction):
        directions = [directions]
    if layers is not None and len(directions) != 1:
        raise ControlVectorError(
            f"layers= places one direction at several layers; got {len(directions)} directions. Select one."
        )
    out: dict[int, torch.Tensor] = {}
    for d in directions:
        if d.site not in ("resid_post", "resid_pre"):
            raise ControlVectorError(
                f"A direction for site {d.site!r} cannot become a control vector: llama.cpp adds to block "
                "outputs (resid_post) only."
            )
        if layers is not None:
            targets = list(layers)
        elif d.layer is None:
            raise ControlVectorError(
                "The direction records no layer: pass layers=[...] (keel resid_post layers, 0-based, >= 1)."
            )
        else:
            targets = [d.layer - 1 if d.site == "resid_pre" else d.layer]
        vector = coefficient * d.vectors.sum(0) if coefficient != 1.0 else d.vectors.sum(0)
        for layer in targets:
            out[layer] = out[layer] + vector if layer in out else vector.clone()
    return dict(sorted(out.items()))


def control_vector_to_directions(
    vectors_by_layer: Mapping[int, torch.Tensor] | str | Path,
    model_hint: str | None = None,
    source: str | None = None,
) -> list[Direction]:
    """One-row keel Directions (resid_post, the file's layers, rows as stored: not normalised) from a
    control vector file or mapping; save them with ``interventions.save_directions`` and use them as
    ``{operator: add, direction: FILE}`` (coefficient = llama.cpp's scale)."""
    if isinstance(vectors_by_layer, (str, Path)):
        info = control_vector_info(vectors_by_layer)
        model_hint = model_hint or info["model_hint"]
        source = source or str(vectors_by_layer)
        vectors_by_layer = import_control_vector(vectors_by_layer)
    extra = {"model_hint": model_hint, "format": "llama.cpp control vector (GGUF)"}
    return [
        Direction(
            vectors=torch.as_tensor(v, dtype=torch.float32).reshape(1, -1),
            site="resid_post",
            layer=int(layer),
            method=METHOD,
            source=source,
            normalization="none",
            extra=dict(extra),
        )
        for layer, v in sorted(vectors_by_layer.items())
    ]
