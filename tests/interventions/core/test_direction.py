"""Direction payload: persistence, transformations, loaders and the errors bad input gets."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from interventions import (
    Direction,
    DirectionError,
    load_directions,
    load_plain_tensor,
    load_sae_decoder_rows,
    save_directions,
)


def test_save_load_round_trip(tmp_path):
    d = Direction(
        torch.randn(3, 8),
        layer=4,
        model_id="tiny/qwen2",
        method="mean_diff",
        mean=torch.randn(3),
        extra={"note": "x"},
    )
    path = d.save(tmp_path / "dir")
    assert path.suffix == ".safetensors" and path.with_suffix(".json").exists()
    back = Direction.load(path)
    assert torch.equal(back.vectors, d.vectors) and torch.equal(back.mean, d.mean)
    assert back.metadata() == d.metadata()


def test_multi_layer_file(tmp_path):
    dirs = [Direction(torch.randn(1, 8), layer=i) for i in (1, 3)]
    path = save_directions(dirs, tmp_path / "layers.safetensors")
    assert [d.layer for d in load_directions(path)] == [1, 3]
    with pytest.raises(DirectionError, match="holds 2 directions"):
        Direction.load(path)


def test_orthonormalize_spans_same_subspace():
    d = Direction(torch.randn(4, 10))
    q = d.orthonormalized()
    assert q.is_orthonormal() and q.normalization == "orthonormal"
    # projecting the original rows onto the new basis reproduces them
    torch.testing.assert_close(d.vectors @ q.vectors.T @ q.vectors, d.vectors, atol=1e-5, rtol=0)


def test_select_records_rows():
    d = Direction(torch.randn(5, 6))
    s = d.select([4, 1]).select([1])
    assert s.extra["selected_rows"] == [1]
    assert torch.equal(s.vectors[0], d.vectors[1])


@pytest.mark.parametrize(
    "tensor, message",
    [
        (torch.zeros(1, 8), "all zero"),
        (torch.tensor([[1.0, float("nan")]]), "NaN"),
        (torch.randn(2, 3, 4), r"shape \[k, d_model\]"),
    ],
)
def test_bad_directions_fail_clearly(tensor, message):
    with pytest.raises(DirectionError, match=message):
        Direction(tensor)


def test_wrong_width_names_the_model():
    d = Direction(torch.randn(1, 8), model_id="other/model")
    with pytest.raises(DirectionError, match="hidden size is 16.*other/model"):
        d.check_usable(16)


def test_linearly_dependent_rows_fail():
    v = torch.randn(1, 8)
    with pytest.raises(DirectionError, match="linearly dependent"):
        Direction(torch.cat([v, 2 * v])).orthonormalized()


def test_plain_pt_and_npy(tmp_path):
    v = torch.randn(2, 8)
    torch.save(v, tmp_path / "v.pt")
    np.save(tmp_path / "v.npy", v.numpy())
    assert torch.equal(load_plain_tensor(tmp_path / "v.pt").vectors, v)
    assert torch.equal(load_directions(tmp_path / "v.npy")[0].vectors, v)
    torch.save(torch.randn(3, 2, 8), tmp_path / "per_layer.pt")
    with pytest.raises(DirectionError, match="slice the layer"):
        load_plain_tensor(tmp_path / "per_layer.pt")


def test_sae_decoder_rows(tmp_path):
    w_dec = torch.randn(32, 8)
    save_file(
        {"W_dec": w_dec, "W_enc": w_dec.T.contiguous(), "b_enc": torch.zeros(32), "b_dec": torch.zeros(8)},
        str(tmp_path / "sae_weights.safetensors"),
    )
    (tmp_path / "cfg.json").write_text(json.dumps({"hook_layer": 5, "model_name": "tiny"}))
    one = load_sae_decoder_rows(tmp_path, [7])
    assert torch.equal(one.vectors[0], w_dec[7]) and one.layer == 5 and one.extra["latents"] == [7]
    two = load_sae_decoder_rows(tmp_path, [3, 9])
    assert two.is_orthonormal()
    with pytest.raises(DirectionError, match="out of range"):
        load_sae_decoder_rows(tmp_path, [99])
