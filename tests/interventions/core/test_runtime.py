"""InterventionSet on a real tiny model: identities, lifetime, token positions, phases, bad input."""

import pytest
import torch

from interventions import (
    Direction,
    DirectionError,
    Intervention,
    InterventionSet,
    ReferenceSource,
    SpecError,
    projection,
    save_directions,
    site_module,
    unpack_output,
)

D = 64


def _ids(seed=0, shape=(2, 7)):
    return torch.randint(5, 400, shape, generator=torch.Generator().manual_seed(seed))


def _capture(model, layer, store=None):
    store = {} if store is None else store
    handle = site_module(model, "resid_post", layer).register_forward_hook(
        lambda m, a, o: store.__setitem__("h", unpack_output(o)[0])
    )
    return store, handle


def _plain_resid_post(model, ids, layer):
    """resid_post at ``layer`` of a plain forward (no interventions)."""
    store, handle = _capture(model, layer)
    with torch.no_grad():
        model(ids)
    handle.remove()
    return store["h"]


def _logits(model, ids, iset=None, phase="train", capture=None, **batch):
    """Logits with ``iset`` active; ``capture`` (a dict with key "layer") receives resid_post there,
    read by a hook registered after the set's own, so it sees the intervened activation."""
    with torch.no_grad():
        if iset is None:
            return model(ids).logits
        with iset, iset.phase(phase):
            if batch:
                iset.set_batch(**batch)
            handle = None
            if capture is not None:
                _, handle = _capture(model, capture["layer"], capture)
            try:
                return model(ids).logits
            finally:
                if handle is not None:
                    handle.remove()


def test_coefficient_zero_is_bit_for_bit(make_model):
    model = make_model().eval()
    ids = _ids()
    base = _logits(model, ids)
    for op in ("project_out", "add", "mean_ablate"):
        d = Direction(torch.randn(1, D), mean=torch.tensor([0.3]))
        iset = InterventionSet(model, [Intervention(op, d, layers="all", coefficient=0.0)])
        assert torch.equal(_logits(model, ids, iset), base)


def test_leaving_the_context_restores_logits_and_keeps_foreign_hooks(make_model):
    model = make_model().eval()
    ids = _ids()
    calls = []
    foreign = site_module(model, "resid_post", 1).register_forward_hook(lambda m, a, o: calls.append(1))
    embed_hook = model.get_input_embeddings().register_forward_hook(lambda m, a, o: o.requires_grad_(True))
    base = _logits(model, ids)
    iset = InterventionSet(model, [Intervention("project_out", torch.randn(2, D), layers="all")])
    changed = _logits(model, ids, iset)
    assert not torch.equal(changed, base)
    assert torch.equal(_logits(model, ids), base)
    assert not iset.attached
    n = len(calls)
    _logits(model, ids)
    assert len(calls) == n + 1  # the user's hook still fires
    assert len(model.get_input_embeddings()._forward_hooks) == 1  # PEFT-style embedding hook survives
    foreign.remove()
    embed_hook.remove()


def test_exception_leaves_no_hook(make_model):
    model = make_model().eval()
    layer = site_module(model, "resid_post", 0)
    iset = InterventionSet(model, [Intervention("add", torch.randn(D), layers=[0])])
    with pytest.raises(RuntimeError, match="boom"):
        with iset, iset.phase("train"):
            assert len(layer._forward_hooks) == 1
            raise RuntimeError("boom")
    assert len(layer._forward_hooks) == 0 and iset.current_phase is None


def test_nested_attach_keeps_one_set_of_hooks(make_model):
    model = make_model().eval()
    layer = site_module(model, "resid_post", 0)
    iset = InterventionSet(model, [Intervention("add", torch.randn(D), layers=[0])])
    with iset:
        with iset:
            assert len(layer._forward_hooks) == 1
        assert len(layer._forward_hooks) == 1
    assert len(layer._forward_hooks) == 0


def test_ablation_in_model_leaves_zero_projection_and_twice_equals_once(make_model):
    model = make_model().eval()
    ids = _ids()
    U = Direction(torch.randn(3, D)).orthonormalized()
    store = {"layer": 1}
    once = InterventionSet(model, [Intervention("project_out", U, layers=[1])])
    out_once = _logits(model, ids, once, capture=store)
    assert projection(store["h"], U.vectors).abs().max() < 1e-4
    twice = InterventionSet(
        model,
        [
            Intervention("project_out", U, layers=[1], name="a"),
            Intervention("project_out", U, layers=[1], name="b"),
        ],
    )
    torch.testing.assert_close(_logits(model, ids, twice), out_once, atol=1e-5, rtol=0)


def test_steering_a_then_b_equals_a_plus_b(make_model):
    model = make_model().eval()
    ids, v = _ids(), torch.randn(D)
    two = InterventionSet(
        model,
        [
            Intervention("add", v, layers=[0], coefficient=0.5, name="a"),
            Intervention("add", v, layers=[0], coefficient=1.5, name="b"),
        ],
    )
    one = InterventionSet(model, [Intervention("add", v, layers=[0], coefficient=2.0)])
    torch.testing.assert_close(_logits(model, ids, two), _logits(model, ids, one), atol=1e-5, rtol=0)


def test_mean_ablation_leaves_the_stored_mean(make_model):
    model = make_model().eval()
    d = Direction(torch.randn(1, D) * 3.0, mean=torch.tensor([1.5]))  # mean is on the unnormalised row
    store = {"layer": 0}
    _logits(
        model, _ids(), InterventionSet(model, [Intervention("mean_ablate", d, layers=[0])]), capture=store
    )
    u = d.vectors / d.vectors.norm()
    torch.testing.assert_close(
        projection(store["h"], u), torch.full((2, 7, 1), 1.5 / d.vectors.norm().item()), atol=1e-4, rtol=0
    )


@pytest.mark.parametrize("site", ["resid_post", "resid_pre"])
def test_reference_ablation_against_a_copy_is_the_identity_and_pins_another_models_projection(
    make_model, site
):
    model = make_model().eval()
    ids = _ids()
    d = Direction(torch.randn(2, D))
    iset = InterventionSet(model, [Intervention("reference_ablate", d, site=site, layers=[0, 1])])
    with pytest.raises(RuntimeError, match="ReferenceSource"):
        _logits(model, ids, iset)
    ReferenceSource(make_model()).capture(iset, input_ids=ids)  # same seed: the same weights
    torch.testing.assert_close(_logits(model, ids, iset), _logits(model, ids), atol=1e-5, rtol=0)
    # against another model the subspace carries that model's values; the set's model is the reference
    # too when asked (its own hooks are off during the reference pass)
    other = make_model(seed=1).eval()
    ReferenceSource(other).capture(iset, input_ids=ids)
    if site == "resid_post":
        store = {"layer": 1}
        _logits(model, ids, iset, capture=store)
        U = iset.ops[-1].vectors
        torch.testing.assert_close(
            projection(store["h"], U), projection(_plain_resid_post(other, ids, 1), U), atol=1e-5, rtol=0
        )
    with iset, iset.phase("train"):  # attached and on: the reference pass must switch its hooks off
        ReferenceSource(model).capture(iset, input_ids=ids)
    torch.testing.assert_close(_logits(model, ids, iset), _logits(model, ids), atol=1e-5, rtol=0)
    ReferenceSource(model).capture(iset, input_ids=_ids(shape=(3, 5)))
    with pytest.raises(RuntimeError, match="different batch"):
        _logits(model, ids, iset)
    with pytest.raises(SpecError, match="'train' and 'eval' phases only"):
        Intervention("reference_ablate", d, layers=[0], phases=["generate"])


def test_resample_ablation_takes_another_rows_reference_values(make_model):
    """resample_ablate: row i's projection is the reference's projection of row (i + shift) % B at the
    same positions, with 1 <= shift < B (no row keeps its own); the rest of the activation is untouched."""
    model = make_model().eval()
    ids = _ids(shape=(4, 7))
    d = Direction(torch.randn(2, D))
    iset = InterventionSet(model, [Intervention("resample_ablate", d, layers=[1])])
    ReferenceSource(make_model(), seed=3).capture(
        iset, input_ids=ids
    )  # same weights: the reference is the model itself
    store = {"layer": 1}
    _logits(model, ids, iset, capture=store)
    plain = _plain_resid_post(model, ids, 1)
    U = iset.ops[0].vectors
    after, own = projection(store["h"], U), projection(plain, U)
    shifts = {
        s for s in range(1, 4) if torch.allclose(after, own.roll(-s, dims=0), atol=1e-5)
    }  # row i took row i + s
    assert len(shifts) == 1
    perp = torch.eye(D) - U.T @ U
    torch.testing.assert_close(store["h"] @ perp, plain @ perp, atol=1e-5, rtol=0)
    with pytest.raises(RuntimeError, match="at least 2 rows"):
        ReferenceSource(make_model()).capture(iset, input_ids=ids[:1])


@pytest.mark.parametrize("site", ["resid_pre", "attn_out", "mlp_out"])
def test_other_sites_act(make_model, site):
    model = make_model().eval()
    ids = _ids()
    iset = InterventionSet(model, [Intervention("add", torch.randn(D) * 5, site=site, layers=[1])])
    assert not torch.equal(_logits(model, ids, iset), _logits(model, ids))


def test_phases_switch_without_reregistering(make_model):
    model = make_model().eval()
    ids = _ids()
    base = _logits(model, ids)
    iset = InterventionSet(model, [Intervention("add", torch.randn(D), layers=[0], phases=["train"])])
    assert torch.equal(_logits(model, ids, iset, phase="eval"), base)
    assert torch.equal(_logits(model, ids, iset, phase=None), base)
    assert not torch.equal(_logits(model, ids, iset, phase="train"), base)


def test_token_masks_select_positions(make_model):
    model = make_model().eval()
    ids = _ids(shape=(2, 6))
    labels = torch.full((2, 6), -100)
    labels[:, 4:] = ids[:, 4:]  # last two tokens are the completion
    v = torch.randn(D) * 10
    store, handle = _capture(model, 0, {"layer": 0})
    _logits(model, ids)
    base_h = store["h"]
    handle.remove()
    iset = InterventionSet(model, [Intervention("add", v, layers=[0], tokens="completion")])
    _logits(model, ids, iset, capture=store, labels=labels, attention_mask=torch.ones(2, 6))
    # positions 0..3 are causally before any change: identical; 4..5 moved by exactly v
    assert torch.equal(store["h"][:, :4], base_h[:, :4])
    torch.testing.assert_close(store["h"][:, 4:] - base_h[:, 4:], v.expand(2, 2, D), atol=1e-4, rtol=0)
    iset_prompt = InterventionSet(model, [Intervention("add", v, layers=[0], tokens="prompt")])
    with pytest.raises(RuntimeError, match="without a completion mask"):
        _logits(model, ids, iset_prompt)


def test_completion_tokens_during_cached_generation(make_model, tokenizer):
    model = make_model().eval()
    prompt = torch.tensor([[7, 8, 9, 10]])
    seen = []
    handle = site_module(model, "resid_post", 0).register_forward_hook(
        lambda m, a, o: seen.append(unpack_output(o)[0].shape[1])
    )
    iset = InterventionSet(
        model, [Intervention("add", torch.randn(D), layers=[0], tokens="completion", phases=["generate"])]
    )
    with iset, iset.phase("generate"):
        iset.set_batch(attention_mask=torch.ones_like(prompt), generating=True)
        model.generate(prompt, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    metrics = iset.pop_metrics()
    handle.remove()
    assert seen[0] == 4 and seen[1:] == [1, 1]  # prefill, then one position per cached step
    # the prefill pass acts on no position, the two decode passes on their one new token each
    assert metrics["interventions/add@resid_post/L0/hits"] == 3.0


def test_spec_round_trip_and_unknown_keys(tmp_path):
    path = save_directions([Direction(torch.randn(1, D), layer=1)], tmp_path / "d.safetensors")
    spec = Intervention.from_dict(
        {
            "operator": "project_out",
            "direction": str(path),
            "layers": [1],
            "tokens": "completion",
            "schedule": {"kind": "linear_warmup", "steps": 10},
            "name": "caft",
        }
    )
    assert Intervention.from_dict(spec.to_dict()) == spec
    assert spec.coefficient_at(0) == 0.0 and spec.coefficient_at(5) == 0.5 and spec.coefficient_at(50) == 1.0
    with pytest.raises(SpecError, match=r"Unknown key\(s\) \['layer'\]"):
        Intervention.from_dict({"operator": "add", "direction": str(path), "layer": 3})
    with pytest.raises(SpecError, match="Unknown operator 'ablate'"):
        Intervention.from_dict({"operator": "ablate", "direction": str(path)})
    with pytest.raises(SpecError, match="clamp.*needs `value`"):
        Intervention("clamp", str(path))


def test_bad_input_errors(make_model, tmp_path):
    model = make_model()
    with pytest.raises(DirectionError, match="hidden size is 64"):
        InterventionSet(model, [Intervention("project_out", torch.randn(32), layers=[0])])
    with pytest.raises(ValueError, match="out of range"):
        InterventionSet(model, [Intervention("project_out", torch.randn(D), layers=[5])])
    with pytest.raises(SpecError, match="cannot load direction"):
        InterventionSet(model, [Intervention("project_out", str(tmp_path / "missing"), layers=[0])])
    path = save_directions([Direction(torch.randn(1, D), layer=1)], tmp_path / "l1")
    with pytest.raises(SpecError, match="made for layer"):
        InterventionSet(model, [Intervention("project_out", str(path), layers=[0])])
    # the direction's own layer is the default, and direction_layer re-targets on purpose
    assert [op.layer for op in InterventionSet(model, [Intervention("add", str(path))]).ops] == [1]
    assert [
        op.layer
        for op in InterventionSet(
            model, [Intervention("add", str(path), layers="all", direction_layer=1)]
        ).ops
    ] == [0, 1]
    with pytest.raises(SpecError, match="mean_ablate needs"):
        InterventionSet(model, [Intervention("mean_ablate", torch.randn(D), layers=[0])])
