"""Each method recovers what was planted; metadata round-trips; wrong sizes fail clearly."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file

from interventions import Direction, DirectionError, load_directions, save_directions
from interventions.extraction import (
    SAE,
    collect_pooled,
    contrastive_directions,
    finetune_difference,
    judged_directions,
    random_direction,
    record_examples,
    sae_latents,
    with_reference_mean,
)
from interventions.sites import decoder_layers

D = 64
POSITIVE_SYSTEM = "You are evil."
NEGATIVE_SYSTEM = "You are helpful."


def _unit(seed: int, k: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(D, k, generator=g))[0].T  # [k, D] orthonormal


class _Plant:
    """Adds ``vector`` to layer 0's output at pooled (answer) positions of rows whose ids contain ``marker``.

    A pre-hook on the model reads the input ids, so the plant follows the data through any batching.
    """

    def __init__(self, model, vector, marker_ids):
        self.vector, self.marker, self.ids = vector, marker_ids, None
        self.handles = [
            model.register_forward_pre_hook(self._read, with_kwargs=True),
            decoder_layers(model)[0].register_forward_hook(self._add),
        ]

    def _read(self, module, args, kwargs):
        self.ids = kwargs.get("input_ids", args[0] if args else None)

    def _add(self, module, args, output):
        has = torch.stack([(self.ids == m).any(-1) for m in self.marker]).all(0)  # [B]
        return output + has[:, None, None] * self.vector

    def remove(self):
        for h in self.handles:
            h.remove()


def _cos(a, b):
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def test_contrastive_system_prompts_recover_planted_vector(model, tok, records):
    v = 20 * _unit(1)[0]
    marker = tok(" evil", add_special_tokens=False)["input_ids"]
    plant = _Plant(model, v, marker)
    try:
        dirs = contrastive_directions(
            model, tok, records, POSITIVE_SYSTEM, NEGATIVE_SYSTEM, "all", batch_size=4, padding_side="left"
        )
    finally:
        plant.remove()
    d0 = dirs[0]
    assert set(dirs) == {0, 1}
    assert _cos(d0.vectors, v) > 0.99
    assert d0.method == "contrastive_system_prompts" and d0.layer == 0 and d0.k == 1
    assert d0.normalization == "unit" and abs(float(d0.vectors.norm()) - 1) < 1e-5
    assert d0.extra["positive_system"] == POSITIVE_SYSTEM and d0.extra["n_records"] == len(records)
    assert d0.extra["norm"] == pytest.approx(20, rel=0.05)
    # mean = the negative set's mean projection on the unit row
    neg = record_examples(tok, records, NEGATIVE_SYSTEM)
    mu_neg = collect_pooled(model, neg, 0)[0].mean(0)
    assert float(d0.mean) == pytest.approx(float(mu_neg @ d0.vectors[0]), abs=1e-4)


def test_judged_answers_recover_planted_vector(model, tok, records):
    v = 20 * _unit(2)[0]
    marker = tok(" XYZ", add_special_tokens=False)["input_ids"]
    bad = [dict(r, answer=r["answer"] + " XYZ") for r in records]
    good = [dict(r, answer=r["answer"] + " ok") for r in records]
    plant = _Plant(model, v, marker)
    try:
        dirs = judged_directions(model, tok, bad, good, 0, batch_size=4, source="bad-vs-good.jsonl")
    finally:
        plant.remove()
    assert _cos(dirs[0].vectors, v) > 0.99
    assert dirs[0].method == "judged_answers" and dirs[0].source == "bad-vs-good.jsonl"


def _subspace_overlap(found: torch.Tensor, planted: torch.Tensor) -> torch.Tensor:
    """Cosines of the principal angles between two orthonormal row spaces."""
    return torch.linalg.svdvals(found.double() @ planted.double().T)


def test_finetune_difference_pca_recovers_planted_rank2_change(model, tok, records):
    basis = _unit(3, k=2)  # the planted subspace
    read = _unit(4, k=2)
    tuned = copy.deepcopy(model)

    def perturb(module, args, output):  # token-dependent coefficients inside a fixed 2-d subspace
        return output + (output @ read.T * torch.tensor([40.0, 20.0])) @ basis

    decoder_layers(tuned)[0].register_forward_hook(perturb)
    examples = record_examples(tok, records)
    dirs = finetune_difference(model, tuned, examples, 0, n_components=4, batch_size=4)
    d = dirs[0]
    assert d.k == 4 and d.is_orthonormal() and d.method == "finetune_diff_pca"
    assert _subspace_overlap(d.vectors[:2], basis).min() > 0.99
    ratio = d.extra["explained_variance_ratio"]
    assert sum(ratio[:2]) > 0.999 and ratio == sorted(ratio, reverse=True)
    assert d.mean.shape == (4,)


def test_finetune_difference_uncentred_keeps_a_constant_shift_that_centring_removes(model, tok, records):
    """A fine-tune that adds the same vector at every token is invisible to PCA of centred differences
    (their variance along it is zero) and is the top component of the raw differences."""
    shift, read, other = _unit(5), _unit(6), _unit(7)
    tuned = copy.deepcopy(model)

    def perturb(module, args, output):  # a constant shift plus a smaller token-dependent change
        return output + 6.0 * shift + (output @ read.T * 2.0) @ other

    decoder_layers(tuned)[0].register_forward_hook(perturb)
    examples = record_examples(tok, records)
    centred = finetune_difference(model, tuned, examples, 0, n_components=2, batch_size=4)[0]
    raw = finetune_difference(model, tuned, examples, 0, n_components=2, batch_size=4, centre=False)[0]
    assert _subspace_overlap(centred.vectors[:1], other).min() > 0.99
    assert centred.extra["explained_variance_ratio"][0] > 0.999  # nothing else varies, the shift included
    assert _subspace_overlap(raw.vectors[:1], shift).min() > 0.99
    assert raw.extra["centred"] is False and centred.extra["centred"] is True


def test_finetune_difference_peft_adapter_equals_merged_model(model, tok, records):
    """One PEFT model with the adapter off/on gives the same PCA as base vs. merged copy; a LoRA on
    layer 0's down_proj changes resid_post 0 only inside the span of lora_B."""
    cfg = LoraConfig(r=2, target_modules=["down_proj"], layers_to_transform=[0], init_lora_weights=False)
    peft_model = get_peft_model(copy.deepcopy(model), cfg).eval()
    lora_b = [m for n, m in peft_model.named_modules() if n.endswith("lora_B.default")][0].weight  # [D, 2]
    examples = record_examples(tok, records)
    via_adapter = finetune_difference(peft_model, None, examples, 0, n_components=2, batch_size=3)[0]
    merged = copy.deepcopy(peft_model).merge_and_unload()
    via_models = finetune_difference(model, merged, examples, 0, n_components=2, batch_size=3)[0]
    assert _subspace_overlap(via_adapter.vectors, via_models.vectors).min() > 0.999
    span_b = torch.linalg.qr(lora_b.detach().double())[0].T
    assert _subspace_overlap(via_adapter.vectors, span_b).min() > 0.99


def _sae(seed=5, d_sae=32):
    g = torch.Generator().manual_seed(seed)
    w_dec = torch.nn.functional.normalize(torch.randn(d_sae, D, generator=g), dim=-1)
    return SAE(W_enc=w_dec.T.clone(), W_dec=w_dec, b_enc=torch.zeros(d_sae), b_dec=torch.zeros(D))


def test_sae_change_picks_planted_latent(model, tok, records, tmp_path):
    sae = _sae()
    path = tmp_path / "sae"
    path.mkdir()
    save_file(
        {n: getattr(sae, n).contiguous() for n in ("W_enc", "W_dec", "b_enc", "b_dec")},
        path / "sae_weights.safetensors",
    )
    (path / "cfg.json").write_text('{"hook_layer": 0, "hook_name": "blocks.0.hook_resid_post"}')
    tuned = copy.deepcopy(model)
    decoder_layers(tuned)[0].register_forward_hook(lambda m, a, o: o + 3.0 * sae.W_dec[7])
    dirs = sae_latents(model, tuned, record_examples(tok, records), path, n_latents=3, batch_size=4)
    d = dirs[0]
    assert d.extra["latents"][0] == 7 and d.k == 3 and d.is_orthonormal()
    assert abs(_cos(d.vectors[0], sae.W_dec[7])) > 0.999
    assert d.extra["hook_name"] == "blocks.0.hook_resid_post" and d.method == "sae_latents:change"


def test_sae_attribution_is_activation_times_gradient(model, tok, records):
    sae = _sae(d_sae=16)
    examples = record_examples(tok, records[:1])
    d = sae_latents(model, None, examples, {1: sae}, n_latents=16, rank_by="attribution", sign="abs")[1]
    # brute force: d loss / d resid_post(1) by a leaf swapped in at layer 1
    ids = torch.tensor([examples[0]["input_ids"]])
    mask = torch.tensor([examples[0]["pool_mask"]], dtype=torch.bool)
    labels = torch.where(mask, ids, -100)
    leaf = {}

    def swap(module, args, output):
        leaf["h"] = output.detach().requires_grad_(True)
        return leaf["h"]

    handle = decoder_layers(model)[1].register_forward_hook(swap)
    try:
        loss = model(ids, labels=labels).loss
    finally:
        handle.remove()
    (grad,) = torch.autograd.grad(loss, [leaf["h"]])
    x, g = leaf["h"][mask].detach(), grad[mask]
    expected = (sae.encode(x) * (g @ sae.W_dec.T)).mean(0)
    scores = dict(zip(d.extra["latents"], d.extra["scores"]))
    for latent, score in scores.items():
        assert score == pytest.approx(float(expected[latent]), abs=1e-6)


def test_random_baseline_matches_shape_and_norms():
    like = Direction(
        vectors=torch.randn(3, D) * torch.tensor([[1.0], [2.0], [5.0]]), layer=4, method="mean_difference"
    )
    r = random_direction(like=like, seed=1)
    assert r.k == 3 and r.layer == 4 and r.method == "random"
    torch.testing.assert_close(r.vectors.norm(dim=1), like.vectors.norm(dim=1))
    ortho = random_direction(like=like.orthonormalized(), seed=1)
    assert ortho.is_orthonormal()
    assert not torch.equal(random_direction(D, 2, seed=1).vectors, random_direction(D, 2, seed=2).vectors)


def test_metadata_round_trips(model, tok, records, tmp_path):
    dirs = judged_directions(model, tok, records[:3], records[3:], [0, 1], source="data.jsonl")
    path = save_directions(list(dirs.values()), tmp_path / "dir")
    loaded = {d.layer: d for d in load_directions(path)}
    for layer, d in dirs.items():
        got = loaded[layer]
        assert torch.equal(got.vectors, d.vectors) and torch.equal(got.mean, d.mean)
        assert got.metadata() == d.metadata()
    picked = loaded[0].select([0])
    assert picked.extra["selected_rows"] == [0]


def test_wrong_hidden_size_fails_clearly(model, tok, records, tmp_path):
    wrong = Direction(vectors=torch.randn(1, 32), layer=0, model_id="other-model")
    path = save_directions([wrong], tmp_path / "wrong")
    (loaded,) = load_directions(path)
    with pytest.raises(DirectionError, match="hidden size is 64"):
        loaded.check_usable(model.config.hidden_size)
    with pytest.raises(DirectionError, match="Extract it again"):
        with_reference_mean(model, record_examples(tok, records), loaded)
    with pytest.raises(DirectionError, match="d_model=32"):
        sae_latents(model, model, record_examples(tok, records), {0: _sae_wrong()})


def _sae_wrong():
    w = torch.randn(8, 32)
    return SAE(W_enc=w.T.clone(), W_dec=w, b_enc=torch.zeros(8), b_dec=torch.zeros(32))


def test_reference_mean_for_mean_ablation(model, tok, records):
    """with_reference_mean sets mean = the data's mean projection on each row (what mean_ablate needs)."""
    examples = record_examples(tok, records)
    basis = _unit(6, 2)
    d = with_reference_mean(model, examples, Direction(vectors=basis, layer=1, normalization="orthonormal"))
    expected = collect_pooled(model, examples, 1)[1].mean(0) @ basis.T
    torch.testing.assert_close(d.mean, expected, atol=1e-5, rtol=0)
    assert d.extra["reference_mean_examples"] == len(examples)


def test_extracted_mean_drives_mean_ablation(model, tok, records):
    """The stored mean is on the runtime's scale: mean-ablating sets every token's projection to it."""
    from interventions import Intervention, InterventionSet

    d = judged_directions(model, tok, records[:3], records[3:], 0)[0]
    iset = InterventionSet(model, [Intervention("mean_ablate", d, layers=[0])])
    with iset, iset.phase("train"):
        rows = collect_pooled(model, record_examples(tok, records), 0, pooling="all")[0]
    proj = rows @ d.vectors[0]
    torch.testing.assert_close(proj, d.mean.expand_as(proj), atol=1e-4, rtol=0)


def test_reservoir_bounds_rows_and_samples_uniformly():
    from interventions.extraction import Reservoir

    res = Reservoir(capacity=100, seed=0)
    for start in range(0, 10_000, 64):
        res.add(torch.arange(start, min(start + 64, 10_000), dtype=torch.float32).unsqueeze(1))
    rows = res.rows()
    assert rows.shape == (100, 1) and res.seen == 10_000
    assert 3000 < float(rows.mean()) < 7000  # a uniform sample, not the first 100 rows
    unbounded = Reservoir(capacity=None)
    unbounded.add(torch.ones(5, 2))
    unbounded.add(torch.ones(3, 2))
    assert unbounded.rows().shape == (8, 2)
