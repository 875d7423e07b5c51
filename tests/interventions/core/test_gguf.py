"""GGUF control vectors: bit-exact round trips, the file as llama.cpp reads it, keel Direction conversion,
and steering through the file equal to steering with the original direction."""

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from interventions import Direction, Intervention, InterventionSet, load_directions, save_directions  # noqa: E402
from interventions.gguf import (  # noqa: E402
    ControlVectorError,
    control_vector_info,
    control_vector_to_directions,
    directions_to_control_vector,
    export_control_vector,
    import_control_vector,
)

D = 64


def _vectors(layers=(1, 5, 7), seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {layer: torch.randn(D, generator=gen) * 10 ** torch.randn(1, generator=gen) for layer in layers}


def test_round_trip_is_bit_exact_and_in_llama_cpp_layout(tmp_path):
    vectors = _vectors()
    path = export_control_vector(tmp_path / "cv.gguf", vectors, "qwen2")
    back = import_control_vector(path)
    assert list(back) == [1, 5, 7]
    assert all(torch.equal(back[k], vectors[k]) and back[k].dtype == torch.float32 for k in vectors)
    assert control_vector_info(path) == {
        "architecture": "controlvector",
        "model_hint": "qwen2",
        "layer_count": 3,
        "layers": [1, 5, 7],
        "n_embd": D,
    }
    reader = gguf.GGUFReader(str(path))  # what llama.cpp's loader checks: names, F32, 1-D, one width
    assert [t.name for t in reader.tensors] == ["direction.1", "direction.5", "direction.7"]
    assert all(
        t.tensor_type == gguf.GGMLQuantizationType.F32 and list(t.shape) == [D] for t in reader.tensors
    )
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize(
    "vectors,kwargs,match",
    [
        ({0: torch.ones(D)}, {}, "block 0's output cannot be steered"),
        ({-1: torch.ones(D)}, {}, "layers must be >= 1"),
        ({4: torch.ones(D)}, {"num_layers": 4}, "< 4"),
        ({1: torch.ones(D), 2: torch.ones(D + 1)}, {}, "same width"),
        ({1: torch.ones(2, D)}, {}, "directions_to_control_vector"),
        ({1: torch.tensor([1.0, float("nan")])}, {}, "NaN"),
        ({"1": torch.ones(D)}, {}, "must be ints"),
        ({}, {}, "No vectors"),
    ],
)
def test_export_refusals(tmp_path, vectors, kwargs, match):
    with pytest.raises(ControlVectorError, match=match):
        export_control_vector(tmp_path / "bad.gguf", vectors, "llama", **kwargs)
    assert not (tmp_path / "bad.gguf").exists()


def _raw_gguf(path, tensors):
    writer = gguf.GGUFWriter(str(path), "controlvector")
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize(
    "tensors,match",
    [
        ({"direction.0": np.ones(D, np.float32)}, "direction.0"),
        ({"token_embd.weight": np.ones(D, np.float32)}, "not a control-vector direction"),
        ({"direction.2": np.ones(D, np.float16)}, "F32 1-D"),
        ({"direction.2": np.ones((2, D), np.float32)}, "F32 1-D"),
        (
            {"direction.1": np.ones(D, np.float32), "direction.2": np.ones(D + 2, np.float32)},
            "different widths",
        ),
    ],
)
def test_import_refuses_what_llama_cpp_refuses(tmp_path, tensors, match):
    path = _raw_gguf(tmp_path / "raw.gguf", tensors)
    with pytest.raises(ControlVectorError, match=match):
        import_control_vector(path)


def test_import_of_a_file_without_metadata(tmp_path):
    """llama.cpp reads no metadata, so neither is required here."""
    path = _raw_gguf(tmp_path / "bare.gguf", {"direction.3": np.arange(D, dtype=np.float32)})
    assert torch.equal(import_control_vector(path)[3], torch.arange(D, dtype=torch.float32))
    assert control_vector_info(path)["model_hint"] is None


def test_directions_to_control_vector_is_what_add_adds():
    rows = torch.randn(2, D)
    vectors = directions_to_control_vector(
        [
            Direction(rows, layer=3),
            Direction(rows[0], site="resid_pre", layer=4),  # input of block 4 = output of block 3
            Direction(rows[1], layer=2),
        ],
        coefficient=2.0,
    )
    assert list(vectors) == [2, 3]
    assert torch.allclose(vectors[3], 2.0 * (rows.sum(0) + rows[0]))
    assert torch.equal(vectors[2], 2.0 * rows[1])
    placed = directions_to_control_vector(Direction(rows[0]), layers=[1, 2])
    assert list(placed) == [1, 2] and torch.equal(placed[1], rows[0])
    with pytest.raises(ControlVectorError, match="records no layer"):
        directions_to_control_vector(Direction(rows[0]))
    with pytest.raises(ControlVectorError, match="resid_post"):
        directions_to_control_vector(Direction(rows[0], site="attn_out", layer=1))


def test_direction_file_round_trip_bit_exact(tmp_path):
    original = [Direction(torch.randn(1, D), layer=layer, method="persona") for layer in (1, 3)]
    path = save_directions(original, tmp_path / "steer.safetensors")
    cv = export_control_vector(tmp_path / "steer.gguf", directions_to_control_vector(path), "llama")
    imported = control_vector_to_directions(cv)
    assert [(d.layer, d.site, d.method, d.extra["model_hint"]) for d in imported] == [
        (1, "resid_post", "gguf_control_vector", "llama"),
        (3, "resid_post", "gguf_control_vector", "llama"),
    ]
    again = load_directions(save_directions(imported, tmp_path / "back.safetensors"))
    assert all(torch.equal(a.vectors, b.vectors) for a, b in zip(original, again))


def test_steering_through_the_file_equals_steering_with_the_direction(make_model, tmp_path):
    """keel's add at resid_post k is what llama.cpp does with direction.k: the imported file, at the
    exported coefficient's scale, steers the model exactly as the original direction did."""
    model = make_model("qwen2").eval()
    original = [Direction(torch.randn(2, D), layer=1)]
    cv = export_control_vector(tmp_path / "s.gguf", directions_to_control_vector(original, 3.0), "qwen2", 2)
    imported = control_vector_to_directions(cv)
    ids = torch.randint(5, 400, (2, 7), generator=torch.Generator().manual_seed(0))

    def steered(directions, coefficient):
        spec = Intervention("add", directions[0], layers=[1], coefficient=coefficient)
        with torch.no_grad(), InterventionSet(model, [spec]) as iset, iset.phase("train"):
            return model(ids).logits

    expected, got = steered(original, 3.0), steered(imported, 1.0)
    assert (expected - got).abs().max() < 1e-5
    with torch.no_grad():
        assert (expected - model(ids).logits).abs().max() > 1e-2
