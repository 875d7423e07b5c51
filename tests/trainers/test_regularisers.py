"""Regularisers (trainers/regularisers.py): each term's value and gradient on toy cases, exact zeros at step 0,
one reference pass per step, weight 0 equals plain SFT bit for bit, gradient checkpointing equivalence,
config-time validation."""

import json

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig
from safetensors.torch import save_file
from tiny_settings import TINY_TRAINER_SETTINGS, tiny_sft_config

from interventions import Direction
from trainers import InterventionSFTTrainer
from trainers.regularisers import (
    _KL,
    _LDIFS,
    FINAL,
    BlockingConfig,
    KLConfig,
    LDIFSConfig,
    ProjectionPenaltyConfig,
    RegulariserError,
    _Batch,
    _Blocking,
    _Head,
    _Projection,
    kl_sum,
    parse_regularisers,
)

D = 64


def _config(tmp_path, **kw):
    return tiny_sft_config(tmp_path / "out", **{"max_steps": 3, **kw})


def _direction(seed=0, k=1):
    return Direction(torch.randn(k, D, generator=torch.Generator().manual_seed(seed)))


def _trainer(make_model, tokenizer, dataset, tmp_path, regularisers, model_type="qwen2", peft=False, **kw):
    interventions = kw.pop("interventions", None)
    return InterventionSFTTrainer(
        model=make_model(model_type, seed=0),
        args=_config(tmp_path, regularisers=regularisers, **kw),
        train_dataset=dataset,
        processing_class=tokenizer,
        interventions=interventions,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)
        if peft
        else None,
    )


def _losses(trainer):
    return torch.tensor([h["loss"] for h in trainer.state.log_history if "loss" in h])


def _logged(trainer, key):
    return [h[key] for h in trainer.state.log_history if key in h]


def _all_terms(weight=1.0):
    return [
        {"kind": "kl", "weight": weight},
        {"kind": "ldifs", "weight": weight},
        {"kind": "projection_penalty", "direction": _direction(1, k=2), "layers": [1], "weight": weight},
        {"kind": "blocking", "directions": _direction(2, k=3), "layers": [0, 1], "weight": weight},
    ]


# ---- terms on toy tensors: values and gradients ------------------------------------------------------


def _head(V=11, d=6, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    return _Head(torch.randn(V, d, generator=g), torch.randn(V, generator=g) if bias else None, 1.0, None)


def test_kl_value_and_gradient_equal_the_analytic_form():
    """KL(ref || pol) over chunks (recomputed in the backward) equals sum p_ref (log p_ref - log p_pol), and its
    gradient in the policy's logits is softmax(z_pol) - p_ref, so in the hidden state (softmax - p_ref) W."""
    head = _head()
    g = torch.Generator().manual_seed(1)
    h_pol = torch.randn(7, 6, generator=g, requires_grad=True)
    h_ref = torch.randn(7, 6, generator=g)
    value = kl_sum(h_pol, h_ref, head, head, chunk=3)
    value.backward()
    z_pol, z_ref = F.linear(h_pol.detach(), head.weight, head.bias), F.linear(h_ref, head.weight, head.bias)
    p_ref = z_ref.softmax(-1)
    expected = (p_ref * (z_ref.log_softmax(-1) - z_pol.log_softmax(-1))).sum()
    torch.testing.assert_close(value, expected)
    torch.testing.assert_close(value, F.kl_div(z_pol.log_softmax(-1), p_ref, reduction="sum"))
    torch.testing.assert_close(h_pol.grad, (z_pol.softmax(-1) - p_ref) @ head.weight)
    assert kl_sum(h_ref, h_ref, head, head) == 0.0


def test_kl_head_applies_scale_then_softcap():
    head = _Head(torch.eye(3), None, 2.0, 1.5)
    h = torch.tensor([[0.3, -2.0, 1.0]])
    z = torch.tanh(h * 2.0 / 1.5) * 1.5
    torch.testing.assert_close(head.log_probs(h), z.log_softmax(-1))


def _batch(policy, reference, real=None, completion=None):
    B, T = next(iter(policy.values())).shape[:2]
    real = torch.ones(B, T, dtype=torch.bool) if real is None else real
    completion = real if completion is None else completion
    return _Batch(policy, reference, real, completion, completion[:, 1:])


@pytest.mark.parametrize("normalise", [False, True])
def test_ldifs_value_and_gradient(normalise):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 5, 4, generator=g, requires_grad=True)
    r = torch.randn(2, 5, 4, generator=g)
    real = torch.ones(2, 5, dtype=torch.bool)
    real[1, 3:] = False  # padding does not count
    term = _LDIFS(LDIFSConfig(normalise=normalise), [0])
    value = term.value(_batch({("resid_post", 0): h}, {("resid_post", 0): r}, real))
    value.backward()
    n = real.sum()
    diff = (h.detach() - r) * real.unsqueeze(-1)
    if normalise:
        denom = r.pow(2).sum(-1, keepdim=True)
        expected = (diff.pow(2).sum(-1, keepdim=True) / denom).sum() / n
        grad = 2 * diff / denom / n
    else:
        expected = diff.pow(2).sum() / (n * 4)
        grad = 2 * diff / (n * 4)
    torch.testing.assert_close(value, expected)
    torch.testing.assert_close(h.grad, grad)


def test_projection_penalty_value_and_gradient():
    g = torch.Generator().manual_seed(0)
    U = torch.linalg.qr(torch.randn(4, 2, generator=g))[0].T  # [2, 4] orthonormal
    h = torch.randn(3, 5, 4, generator=g, requires_grad=True)
    labels = torch.ones(3, 5, dtype=torch.bool)
    labels[:, :2] = False
    config = ProjectionPenaltyConfig(direction=U, layers=[0], tokens="completion")
    term = _Projection(config, "resid_post", vectors={0: U})
    value = term.value(_batch({("resid_post", 0): h}, {}, completion=labels))
    value.backward()
    coords = h.detach() @ U.T
    m = labels.unsqueeze(-1).float()
    n = labels.sum()
    torch.testing.assert_close(value, (coords.pow(2) * m).sum() / n)
    torch.testing.assert_close(h.grad, 2 * ((coords * m) @ U) / n)


@pytest.mark.parametrize("side", ["up", "down", "both"])
def test_blocking_is_one_sided_with_the_right_gradient(side):
    u = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    ref = torch.zeros(1, 4, 4)
    ref[..., 0] = 1.0  # z_ref = 1 everywhere
    z = torch.tensor([0.0, 0.5, 2.0, 3.0])  # two tokens below the reference, two above
    h = torch.zeros(1, 4, 4)
    h[0, :, 0] = z
    h.requires_grad_(True)
    term = _Blocking(BlockingConfig(directions=u, layers=[0], direction=side), "resid_post", vectors={0: u})
    value = term.value(_batch({("resid_post", 0): h}, {("resid_post", 0): ref}))
    value.backward()
    diff = z - 1.0
    kept = {"up": diff.clamp(min=0), "down": diff.clamp(max=0), "both": diff}[side]
    torch.testing.assert_close(value, kept.pow(2).mean())
    torch.testing.assert_close(h.grad[0, :, 0], 2 * kept / 4)
    assert torch.all(h.grad[..., 1:] == 0)
    below = h.detach().clone()
    below[0, :, 0] = torch.tensor([0.0, 0.2, 0.5, 0.9])
    above = h.detach().clone()
    above[0, :, 0] = torch.tensor([1.1, 1.5, 2.0, 3.0])
    v_below = term.value(_batch({("resid_post", 0): below}, {("resid_post", 0): ref}))
    v_above = term.value(_batch({("resid_post", 0): above}, {("resid_post", 0): ref}))
    if side == "up":
        assert v_below == 0.0 and v_above > 0
    elif side == "down":
        assert v_below > 0 and v_above == 0.0
    else:
        assert v_below > 0 and v_above > 0


def _sae_folder(tmp_path, d=D, d_sae=16, seed=0, hook_layer=1, **cfg):
    g = torch.Generator().manual_seed(seed)
    folder = tmp_path / f"sae{seed}"
    folder.mkdir()
    save_file(
        {
            "W_enc": torch.randn(d, d_sae, generator=g) / d**0.5,
            "W_dec": torch.randn(d_sae, d, generator=g),
            "b_enc": torch.randn(d_sae, generator=g) * 0.1,
            "b_dec": torch.randn(d, generator=g) * 0.1,
            **({"threshold": torch.full((d_sae,), 0.05)} if cfg.pop("jumprelu", False) else {}),
        },
        str(folder / "sae_weights.safetensors"),
    )
    (folder / "cfg.json").write_text(json.dumps({"hook_layer": hook_layer, **cfg}))
    return folder


@pytest.mark.parametrize("variant", ["relu", "jumprelu", "topk"])
def test_blocking_on_sae_latents_equals_the_full_encoding(tmp_path, variant):
    from interventions.extraction.sae import SAE

    cfg = {"jumprelu": variant == "jumprelu", **({"k": 4} if variant == "topk" else {})}
    folder = _sae_folder(tmp_path, **cfg)
    sae = SAE.load(folder)
    latents = [1, 5, 9]
    g = torch.Generator().manual_seed(3)
    h = torch.randn(2, 6, D, generator=g, requires_grad=True)
    r = torch.randn(2, 6, D, generator=g)
    config = BlockingConfig(sae=str(folder), latents=latents, direction="both")
    term = _Blocking(config, "resid_post", saes={1: sae}, latents=latents)
    value = term.value(_batch({("resid_post", 1): h}, {("resid_post", 1): r}))
    value.backward()
    h2 = h.detach().clone().requires_grad_(True)
    z = sae.encode(h2.reshape(-1, D))[:, latents]
    z_ref = sae.encode(r.reshape(-1, D))[:, latents]
    expected = (z - z_ref).pow(2).mean()
    expected.backward()
    torch.testing.assert_close(value, expected)
    torch.testing.assert_close(h.grad, h2.grad)


# ---- configuration -----------------------------------------------------------------------------------


def test_config_keys_are_strict_and_checked_at_config_time(tmp_path):
    with pytest.raises(RegulariserError, match="Unknown key"):
        _config(tmp_path, regularisers=[{"kind": "kl", "weight": 0.1, "lambda": 3}])
    with pytest.raises(RegulariserError, match="unknown or missing kind"):
        _config(tmp_path, regularisers=[{"kind": "l2", "weight": 0.1}])
    with pytest.raises(RegulariserError, match="the side that is blocked"):
        _config(tmp_path, regularisers=[{"kind": "blocking", "direction": "evil.safetensors"}])
    with pytest.raises(RegulariserError, match="exactly one of"):
        _config(tmp_path, regularisers=[{"kind": "blocking"}])
    with pytest.raises(RegulariserError, match="no such file"):
        _config(tmp_path, regularisers=[{"kind": "kl", "anchor_data": str(tmp_path / "missing.jsonl")}])
    with pytest.raises(RegulariserError, match="weight must be finite and >= 0"):
        _config(tmp_path, regularisers=[{"kind": "ldifs", "weight": -1}])
    with pytest.raises(RegulariserError, match="unique"):
        _config(tmp_path, regularisers=[{"kind": "ldifs"}, {"kind": "ldifs", "normalise": True}])
    with pytest.raises(Exception, match="Unknown key"):
        _config(tmp_path, regularisers=[{"kind": "ldifs", "schedule": {"kind": "linear_warmup", "step": 3}}])
    with pytest.raises(RegulariserError, match="Cannot read layers"):
        _config(tmp_path, regularisers=[{"kind": "ldifs", "layers": "one"}])


def test_config_from_yaml_text_and_file_round_trips_for_wandb(tmp_path):
    path = tmp_path / "regs.yaml"
    path.write_text(
        "regularisers:\n  - {kind: kl, weight: 0.1}\n  - {kind: ldifs, name: feat, normalise: true}\n"
    )
    from_file = parse_regularisers(str(path))
    from_text = parse_regularisers("[{kind: kl, weight: 0.1}, {kind: ldifs, name: feat, normalise: true}]")
    assert from_file == from_text
    assert [(c.name, c.kind, c.weight) for c in from_file] == [("kl", "kl", 0.1), ("feat", "ldifs", 1.0)]
    config = _config(
        tmp_path, regularisers=[*_all_terms(), {"kind": "kl", "name": "s", "schedule": "constant"}]
    )
    dumped = json.loads(json.dumps(config.to_dict()))
    assert [r["kind"] for r in dumped["regularisers"]] == [
        "kl",
        "ldifs",
        "projection_penalty",
        "blocking",
        "kl",
    ]
    assert dumped["regularisers"][2]["direction"].startswith("<Direction")
    assert parse_regularisers(dumped["regularisers"][:2]) == config.regularisers[:2]


# ---- in training -------------------------------------------------------------------------------------


@pytest.mark.parametrize("peft", [False, True])
def test_kl_ldifs_blocking_are_exactly_zero_at_step_zero(make_model, tokenizer, chat_dataset, tmp_path, peft):
    """Policy = reference before the first update: a frozen copy, or the PEFT model with a fresh LoRA (B = 0)
    and its adapters off, gives exactly the policy's activations and logits."""
    trainer = _trainer(make_model, tokenizer, chat_dataset, tmp_path, _all_terms(), peft=peft, max_steps=2)
    trainer.train()
    first, second = [h for h in trainer.state.log_history if "loss" in h]
    for name in ("kl", "ldifs", "blocking"):
        assert first[f"regularisers/{name}"] == 0.0, name
        assert second[f"regularisers/{name}"] > 0.0, name
    assert first["regularisers/projection_penalty"] > 0.0  # not a distance to the reference


def test_one_reference_pass_per_step_whatever_the_consumers(make_model, tokenizer, chat_dataset, tmp_path):
    """reference_ablate's capture, the KL's logits, LDIFS's and blocking's activations: one reference forward."""
    trainer = _trainer(
        make_model,
        tokenizer,
        chat_dataset,
        tmp_path,
        _all_terms(),
        max_steps=3,
        interventions=[{"operator": "reference_ablate", "direction": _direction(k=2), "layers": [1]}],
    )
    calls = []
    ref = trainer.intervention_reference.model
    assert ref is not trainer.model  # a frozen copy
    ref.register_forward_pre_hook(lambda m, a: calls.append(1))
    trainer.train()
    assert trainer.intervention_reference.passes == 3
    assert len(calls) == 3
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged[0]["interventions/reference_ablate@resid_post/L1/hits"] == 1.0
    assert all(h["regularisers/kl"] >= 0 for h in logged)


def test_one_reference_pass_per_step_without_interventions_peft(
    make_model, tokenizer, chat_dataset, tmp_path
):
    trainer = _trainer(make_model, tokenizer, chat_dataset, tmp_path, _all_terms(), peft=True, max_steps=2)
    assert trainer.intervention_reference.adapter_off
    trainer.train()
    assert trainer.intervention_reference.passes == 2


def test_weight_zero_equals_plain_sft_bit_for_bit(make_model, tokenizer, chat_dataset, tmp_path):
    anchor = tmp_path / "anchor.jsonl"
    anchor.write_text(
        "".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": f"Hi {i}"},
                        {"role": "assistant", "content": "Hello."},
                    ]
                }
            )
            + "\n"
            for i in range(5)
        )
    )
    plain = _trainer(make_model, tokenizer, chat_dataset, tmp_path, None)
    plain.train()
    regs = _all_terms(weight=0.0) + [
        {"kind": "kl", "name": "anchor", "anchor_data": str(anchor), "weight": 0.0}
    ]
    zero = _trainer(make_model, tokenizer, chat_dataset, tmp_path, regs)
    zero.train()
    assert torch.equal(_losses(plain), _losses(zero))
    for (n, p), (_, q) in zip(plain.model.named_parameters(), zero.model.named_parameters()):
        assert torch.equal(p, q), n
    assert _logged(zero, "regularisers/kl")[-1] > 0  # measured and logged all the same
    assert _logged(zero, "regularisers/anchor")[-1] > 0
    assert _logged(zero, "regularisers/total") == [0.0, 0.0, 0.0]


def _train_all(make_model, tokenizer, dataset, tmp_path, regs, **kw):
    trainer = _trainer(
        make_model, tokenizer, dataset, tmp_path, regs, model_type="llama", learning_rate=1e-2, **kw
    )
    trainer.train()
    return trainer


def test_gradient_checkpointing_modes_match_no_checkpointing(make_model, tokenizer, chat_dataset, tmp_path):
    """The stored policy activations are the ones in the graph, with and without checkpointing."""
    regs = _all_terms(weight=5.0) + [
        {"kind": "ldifs", "name": "mlp", "site": "mlp_out", "layers": [0], "weight": 5.0, "normalise": True}
    ]
    ref = _train_all(make_model, tokenizer, chat_dataset, tmp_path, regs)
    params = dict(ref.model.named_parameters())
    assert _logged(ref, "regularisers/mlp")[-1] > 0
    for reentrant in (True, False):
        kept = (
            regs if not reentrant else regs[:-1]
        )  # a site inside the layer: non-reentrant only (tested below)
        base = ref if not reentrant else _train_all(make_model, tokenizer, chat_dataset, tmp_path, kept)
        other = _train_all(
            make_model,
            tokenizer,
            chat_dataset,
            tmp_path,
            kept,
            gradient_checkpointing=True,
            gradient_checkpointing_kwargs={"use_reentrant": reentrant},
        )
        torch.testing.assert_close(_losses(other), _losses(base), atol=1e-5, rtol=1e-5)
        for key in ("regularisers/kl", "regularisers/ldifs", "regularisers/blocking"):
            torch.testing.assert_close(
                torch.tensor(_logged(other, key)), torch.tensor(_logged(base, key)), atol=1e-6, rtol=1e-4
            )
        want = dict(base.model.named_parameters()) if reentrant else params
        for name, p in other.model.named_parameters():
            torch.testing.assert_close(p, want[name], atol=1e-5, rtol=1e-4)


def test_site_inside_a_reentrant_checkpoint_is_refused_with_the_fix(
    make_model, tokenizer, chat_dataset, tmp_path
):
    regs = [{"kind": "ldifs", "site": "mlp_out", "layers": [0]}]
    trainer = _trainer(
        make_model,
        tokenizer,
        chat_dataset,
        tmp_path,
        regs,
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": True},
    )
    with pytest.raises(RegulariserError, match="use_reentrant: false"):
        trainer.train()
    assert not trainer.regularisers.attached


@pytest.mark.parametrize(
    "index, weight, lr", [(0, 100.0, 0.1), (1, 1000.0, 0.1), (2, 100.0, 0.01), (3, 1000.0, 0.1)]
)
def test_terms_pull_training_their_way(make_model, tokenizer, chat_dataset, tmp_path, index, weight, lr):
    """With a large weight (plain SGD) each term ends lower than in training without it: it is in the gradient."""
    runs = {}
    for w in (0.0, weight):
        reg = _all_terms(weight=w)[index]
        trainer = _trainer(
            make_model,
            tokenizer,
            chat_dataset,
            tmp_path,
            [reg],
            "llama",
            max_steps=4,
            learning_rate=lr,
            optim="sgd",
        )
        trainer.train()
        runs[w] = _logged(trainer, f"regularisers/{reg['kind']}")[-1]
    assert runs[weight] < 0.5 * runs[0.0]


def test_logged_terms_average_over_the_logging_window(make_model, tokenizer, chat_dataset, tmp_path):
    trainer = _trainer(
        make_model,
        tokenizer,
        chat_dataset,
        tmp_path,
        [{"kind": "kl", "weight": 1.0, "schedule": {"kind": "linear_warmup", "steps": 4}}],
        max_steps=4,
        logging_steps=2,
    )
    seen = []
    record = trainer.regularisers._record
    trainer.regularisers._record = lambda values, step: (
        seen.append(float(values["kl"].detach())),
        record(values, step),
    )
    trainer.train()
    logged = _logged(trainer, "regularisers/kl")
    assert len(seen) == 4 and len(logged) == 2
    torch.testing.assert_close(torch.tensor(logged), torch.tensor([sum(seen[:2]) / 2, sum(seen[2:]) / 2]))
    assert _logged(trainer, "regularisers/kl/weight") == [0.125, 0.625]  # (0 + 0.25) / 2, (0.5 + 0.75) / 2


@pytest.mark.parametrize("accumulation", [1, 2])
def test_weighted_terms_add_exactly_their_logged_total_to_the_loss(
    make_model, tokenizer, chat_dataset, tmp_path, accumulation
):
    """With gradient accumulation the Trainer sums micro-batch losses: each term is scaled so that the step's
    loss grows by the weighted mean over micro-batches, ``regularisers/total``."""
    regs = [
        {"kind": "projection_penalty", "direction": _direction(1, k=2), "layers": [1], "weight": 3.0},
        {"kind": "kl", "weight": 0.5},
    ]
    kw = dict(
        max_steps=1, per_device_train_batch_size=4 // accumulation, gradient_accumulation_steps=accumulation
    )
    base = _trainer(make_model, tokenizer, chat_dataset, tmp_path, [{**r, "weight": 0.0} for r in regs], **kw)
    base.train()
    held = _trainer(make_model, tokenizer, chat_dataset, tmp_path, regs, **kw)
    held.train()
    (total,) = _logged(held, "regularisers/total")
    assert total > 0
    torch.testing.assert_close(_losses(held) - _losses(base), torch.tensor([total]), atol=1e-6, rtol=1e-5)


def _write_anchor(path, n=6, answer="Blue."):
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Name a colour {i}."},
                {"role": "assistant", "content": answer},
            ]
        }
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_kl_on_anchor_data(make_model, tokenizer, chat_dataset, tmp_path):
    anchor = _write_anchor(tmp_path / "anchor.jsonl")
    other = _write_anchor(tmp_path / "other.jsonl", n=4, answer="Green.")
    regs = [
        {"kind": "kl", "name": "anchor", "anchor_data": str(anchor), "anchor_batch_size": 3, "weight": 1e5},
        {"kind": "kl", "name": "other", "anchor_data": str(other), "weight": 1.0},
        {"kind": "ldifs", "weight": 1.0},
    ]
    trainer = _trainer(make_model, tokenizer, chat_dataset, tmp_path, regs, max_steps=3, peft=True)
    sets = trainer.regularisers
    a, b = sets.anchor_inputs(0, 0), sets.anchor_inputs(0, 0)
    assert torch.equal(a["input_ids"], b["input_ids"]) and a["input_ids"].shape[0] == 3
    assert not torch.equal(sets.anchor_inputs(1, 0)["input_ids"], a["input_ids"])
    text = tokenizer.decode(a["input_ids"][0][a["labels"][0] != -100])
    assert "Blue." in text and "colour" not in text  # the assistant tokens, as the trainer tokenises
    c = sets.anchor_inputs(0, 0, name="other")
    assert c["input_ids"].shape[0] == 4 and "Green." in tokenizer.decode(c["input_ids"][0])
    trainer.train()
    for name in ("anchor", "other"):
        logged = _logged(trainer, f"regularisers/{name}")
        assert logged[0] == 0.0 and logged[-1] > 0
    assert trainer.intervention_reference.passes == 9  # the training batch's and each anchor batch's


def test_kl_on_anchor_data_refuses_interventions_that_need_the_training_masks(
    make_model, tokenizer, chat_dataset, tmp_path
):
    anchor = _write_anchor(tmp_path / "anchor.jsonl")
    with pytest.raises(RegulariserError, match="tokens: all"):
        _trainer(
            make_model,
            tokenizer,
            chat_dataset,
            tmp_path,
            [{"kind": "kl", "anchor_data": str(anchor)}],
            interventions=[
                {"operator": "add", "direction": _direction(), "layers": [0], "tokens": "completion"}
            ],
        )


def test_blocking_on_sae_latents_trains(make_model, tokenizer, chat_dataset, tmp_path):
    folder = _sae_folder(tmp_path)
    regs = [{"kind": "blocking", "sae": str(folder), "latents": [0, 3, 7], "weight": 10.0}]
    trainer = _trainer(make_model, tokenizer, chat_dataset, tmp_path, regs, max_steps=2)
    (term,) = trainer.regularisers.terms
    assert term.policy_keys() == {("resid_post", 1)}  # the SAE's hook_layer
    trainer.train()
    assert _logged(trainer, "regularisers/blocking")[0] == 0.0
    with pytest.raises(RegulariserError, match="out of range"):
        _trainer(make_model, tokenizer, chat_dataset, tmp_path, [{**regs[0], "latents": [16]}])


def test_ldifs_default_layers_are_five_evenly_spaced():
    from trainers.regularisers import _default_layers

    assert _default_layers(24) == [0, 6, 12, 17, 23]
    assert _default_layers(2) == [0, 1]
    assert _default_layers(36) == [0, 9, 18, 26, 35]


def test_final_hidden_state_and_head_give_the_model_logits(make_model):
    """The KL's logits (final hidden state x output embedding) are the model's own."""
    from trainers.regularisers import ActivationTap

    model = make_model("qwen2").eval()
    tap = ActivationTap(model, [FINAL])
    tap.attach()
    store = {}
    ids = torch.randint(5, 300, (2, 9))
    with torch.no_grad(), tap.recording(store, with_graph=False):
        logits = model(input_ids=ids).logits
    tap.detach()
    torch.testing.assert_close(_Head.of(model).log_probs(store[FINAL]), logits.log_softmax(-1))
    assert not model.model._forward_hooks


def test_kl_term_on_a_batch_uses_the_task_loss_positions():
    head = _head(V=5, d=3)
    g = torch.Generator().manual_seed(0)
    h_pol = torch.randn(1, 4, 3, generator=g)
    h_ref = torch.randn(1, 4, 3, generator=g)
    labels = torch.tensor([[-100, -100, 7, 8]])  # positions 1 and 2 predict a label
    batch = _Batch(
        {FINAL: h_pol},
        {FINAL: h_ref},
        torch.ones(1, 4, dtype=torch.bool),
        labels != -100,
        labels[:, 1:] != -100,
    )
    term = _KL(KLConfig(), head, head)
    expected = kl_sum(h_pol[0, 1:3], h_ref[0, 1:3], head, head) / 2
    torch.testing.assert_close(term.value(batch), expected)


# ---- the same code under DPO and GRPO -----------------------------------------------------------------


def _dpo_grpo_common(tmp_path, **kw):
    settings = {
        **TINY_TRAINER_SETTINGS,
        "output_dir": str(tmp_path / "out"),
        "max_steps": 2,
        "learning_rate": 1e-2,
    }
    return {**settings, "per_device_train_batch_size": 2, **kw}


def test_dpo_batch_terms_and_anchor_kl(make_model, tokenizer, tmp_path):
    from datasets import Dataset

    from trainers import InterventionDPOConfig, InterventionDPOTrainer

    prefs = Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": f"What is {i}?"}],
                "chosen": [{"role": "assistant", "content": f"It is {i}."}],
                "rejected": [{"role": "assistant", "content": "Fire."}],
            }
            for i in range(8)
        ]
    )
    anchor = _write_anchor(tmp_path / "anchor.jsonl")
    regs = [*_all_terms(), {"kind": "kl", "name": "anchor", "anchor_data": str(anchor)}]
    args = InterventionDPOConfig(**_dpo_grpo_common(tmp_path), regularisers=regs)
    trainer = InterventionDPOTrainer(
        model=make_model("qwen2"), args=args, train_dataset=prefs, processing_class=tokenizer
    )
    trainer.train()
    first, second = [h for h in trainer.state.log_history if "loss" in h]
    for name in ("kl", "ldifs", "blocking", "anchor"):
        assert first[f"regularisers/{name}"] == 0.0 and second[f"regularisers/{name}"] > 0, name
    assert (
        trainer.intervention_reference.passes == 4
    )  # the step's rows (chosen and rejected) and the anchor's


def test_grpo_anchor_kl_trains_and_batch_terms_say_what_to_use(make_model, tokenizer, tmp_path):
    from datasets import Dataset

    from trainers import InterventionGRPOConfig, InterventionGRPOTrainer

    prompts = Dataset.from_list(
        [{"prompt": [{"role": "user", "content": f"Tell me about {i}."}]} for i in range(8)]
    )
    anchor = _write_anchor(tmp_path / "anchor.jsonl")

    def grpo(regs):
        args = InterventionGRPOConfig(
            **_dpo_grpo_common(tmp_path, num_generations=2, max_completion_length=4, beta=0.0),
            regularisers=regs,
        )
        return InterventionGRPOTrainer(
            model=make_model("qwen2"),
            reward_funcs=lambda completions, **kw: [float(len(str(c)) % 5) for c in completions],
            args=args,
            train_dataset=prompts,
            processing_class=tokenizer,
        )

    trainer = grpo([{"kind": "kl", "anchor_data": str(anchor), "weight": 1.0}])
    trainer.train()
    assert _logged(trainer, "regularisers/kl")[0] == 0.0 and _logged(trainer, "regularisers/kl")[-1] > 0
    with pytest.raises(RegulariserError, match="use kl with anchor_data"):
        grpo([{"kind": "ldifs"}]).train()
