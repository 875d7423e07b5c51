"""InterventionSFTTrainer: equivalence across checkpointing modes, LoRA training, masks, lifetime."""

import pytest
import torch
from peft import LoraConfig
from tiny_settings import tiny_sft_config

from interventions import Direction, projection, site_module, unpack_output
from trainers import InterventionSFTTrainer

D = 64


def _config(tmp_path, **kw):
    return tiny_sft_config(tmp_path / "out", **kw)


def _direction(seed=0, k=1):
    return Direction(torch.randn(k, D, generator=torch.Generator().manual_seed(seed)))


def _train(make_model, tokenizer, dataset, tmp_path, interventions, **kw):
    model = make_model("qwen2", seed=0)
    trainer = InterventionSFTTrainer(
        model=model,
        args=_config(tmp_path, **kw),
        train_dataset=dataset,
        processing_class=tokenizer,
        interventions=interventions,
    )
    trainer.train()
    return trainer


def _losses(trainer):
    return torch.tensor([h["loss"] for h in trainer.state.log_history if "loss" in h])


@pytest.mark.parametrize("operator", ["project_out", "reference_ablate"])
def test_gradient_checkpointing_modes_match_no_checkpointing(
    make_model, tokenizer, chat_dataset, tmp_path, operator
):
    specs = [{"operator": operator, "direction": _direction(k=3), "layers": "all"}]
    ref = _train(make_model, tokenizer, chat_dataset, tmp_path, specs)
    params = dict(ref.model.named_parameters())
    for reentrant in (True, False):
        other = _train(
            make_model,
            tokenizer,
            chat_dataset,
            tmp_path,
            specs,
            gradient_checkpointing=True,
            gradient_checkpointing_kwargs={"use_reentrant": reentrant},
        )
        torch.testing.assert_close(_losses(other), _losses(ref), atol=1e-5, rtol=1e-5)
        for name, p in other.model.named_parameters():
            torch.testing.assert_close(p, params[name], atol=1e-5, rtol=1e-4)


def test_ablation_changes_training_and_logs_diagnostics(make_model, tokenizer, chat_dataset, tmp_path):
    plain = _train(make_model, tokenizer, chat_dataset, tmp_path, [])
    specs = [{"operator": "project_out", "direction": _direction(k=4), "layers": "all", "name": "caft"}]
    ablated = _train(make_model, tokenizer, chat_dataset, tmp_path, specs)
    assert not torch.allclose(_losses(plain), _losses(ablated))
    logs = [h for h in ablated.state.log_history if "loss" in h]
    assert logs[0]["interventions/caft/L0/proj_before"] > 1e-3
    assert logs[0]["interventions/caft/L0/proj_after"] < 1e-5
    assert logs[0]["interventions/caft/L1/hits"] == 1.0  # once per step: no double firing
    assert not ablated.intervention_set.attached


def test_coefficient_zero_training_equals_plain_sft(make_model, tokenizer, chat_dataset, tmp_path):
    plain = _train(make_model, tokenizer, chat_dataset, tmp_path, [])
    zero = _train(
        make_model,
        tokenizer,
        chat_dataset,
        tmp_path,
        [{"operator": "add", "direction": _direction(), "layers": "all", "coefficient": 0.0}],
    )
    assert torch.equal(_losses(plain), _losses(zero))
    for (n, p), (_, q) in zip(plain.model.named_parameters(), zero.model.named_parameters()):
        assert torch.equal(p, q), n


def test_lora_with_checkpointing_and_ablation_trains_every_lora_parameter(
    make_model, tokenizer, chat_dataset, tmp_path
):
    direction = _direction(k=2)
    before_dir = direction.vectors.clone()
    model = make_model("llama")
    trainer = InterventionSFTTrainer(
        model=model,
        args=_config(
            tmp_path,
            gradient_checkpointing=True,
            learning_rate=1e-2,
            interventions=[{"operator": "project_out", "direction": direction, "layers": [1]}],
        ),
        train_dataset=chat_dataset,
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0),
    )
    lora_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert lora_before and all("lora_" in n for n in lora_before)
    # PEFT's input-embedding hook for checkpointing must survive our cleanup
    embed_hook_ids = set(trainer.model.get_input_embeddings()._forward_hooks)
    assert embed_hook_ids
    trainer.train()
    for name, p in trainer.model.named_parameters():
        if name in lora_before:
            assert not torch.equal(p, lora_before[name]), f"{name} did not change"
    assert torch.equal(direction.vectors, before_dir)
    for op in trainer.intervention_set.ops:
        assert not op.vectors.requires_grad
    assert embed_hook_ids <= set(trainer.model.get_input_embeddings()._forward_hooks)
    assert len(site_module(trainer.model, "resid_post", 1)._forward_hooks) == 0


def test_exception_inside_training_leaves_no_hook(make_model, tokenizer, chat_dataset, tmp_path):
    model = make_model("qwen2")

    class Boom(InterventionSFTTrainer):
        def compute_loss(self, *args, **kwargs):
            raise RuntimeError("boom in compute_loss")

    trainer = Boom(
        model=model,
        args=_config(tmp_path),
        train_dataset=chat_dataset,
        processing_class=tokenizer,
        interventions=[{"operator": "add", "direction": _direction(), "layers": "all"}],
    )
    with pytest.raises(RuntimeError, match="boom"):
        trainer.train()
    for layer in range(2):
        assert len(site_module(model, "resid_post", layer)._forward_hooks) == 0
    assert trainer.intervention_set.current_phase is None


class _MaskRecorder(InterventionSFTTrainer):
    """Records what the intervention set was told about each batch."""

    seen: list

    def training_step(self, model, inputs, num_items_in_batch=None):
        out = super().training_step(model, inputs, num_items_in_batch)
        ctx = self.intervention_set.context
        self.seen.append(
            (inputs["input_ids"].clone(), ctx.completion_mask.clone(), inputs.get("position_ids"))
        )
        return out


@pytest.mark.parametrize("padding_free", [False, True])
def test_completion_masks_cover_exactly_the_assistant_tokens(
    make_model, tokenizer, chat_dataset, tmp_path, padding_free
):
    trainer = _MaskRecorder(
        model=make_model("qwen2"),
        args=_config(
            tmp_path,
            max_steps=2,
            padding_free=padding_free,
            packing=padding_free,
            interventions=[
                {"operator": "add", "direction": _direction(), "layers": [0], "tokens": "completion"}
            ],
        ),
        train_dataset=chat_dataset,
        processing_class=tokenizer,
    )
    trainer.seen = []
    trainer.train()
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for input_ids, mask, position_ids in trainer.seen:
        if padding_free:
            assert input_ids.shape[0] == 1 and position_ids is not None  # packed into one row
        for row_ids, row_mask in zip(input_ids, mask):
            # every masked span is "The answer is N.<|im_end|>"; nothing of the prompt or padding is masked
            text = tokenizer.decode(row_ids[row_mask])
            spans = [s for s in text.split("<|im_end|>") if s]
            assert spans and all(s.startswith("The answer is ") for s in spans), text
            assert int((row_ids[row_mask] == im_end).sum()) == len(spans)
            assert not (row_ids[row_mask] == tokenizer.pad_token_id).any()


def test_left_padding_with_completion_tokens_equals_unpadded(make_model, tokenizer):
    """The mask comes from labels, not indices: a left-padded batch gives the unpadded example's logits."""
    from interventions import Intervention, InterventionSet

    model = make_model("qwen2").eval()
    ids = torch.tensor([[11, 12, 13, 14, 15, 16]])
    labels = torch.tensor([[-100, -100, -100, -100, 15, 16]])
    iset = InterventionSet(
        model, [Intervention("add", _direction().vectors * 5, layers="all", tokens="completion")]
    )
    pad = tokenizer.pad_token_id
    padded = torch.cat([torch.full((1, 3), pad), ids], 1)
    padded_labels = torch.cat([torch.full((1, 3), -100), labels], 1)
    attn = (torch.arange(9) >= 3).long().unsqueeze(0)
    positions = (attn.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad(), iset, iset.phase("train"):
        iset.set_batch(attention_mask=torch.ones_like(ids), labels=labels)
        single = model(ids).logits
        iset.set_batch(attention_mask=attn, labels=padded_labels)
        batched = model(padded, attention_mask=attn, position_ids=positions).logits
    torch.testing.assert_close(batched[:, 3:], single, atol=1e-5, rtol=1e-5)


def test_unknown_spec_key_fails_at_config_time(tmp_path):
    from interventions import SpecError

    with pytest.raises(SpecError, match="Unknown key"):
        _config(tmp_path, interventions=[{"operator": "add", "direction": "x", "strength": 2}])


def test_config_serialises_interventions_for_wandb(tmp_path):
    import json

    from interventions import Intervention, save_directions

    path = save_directions([_direction()], tmp_path / "d")
    spec = {
        "operator": "project_out",
        "direction": str(path),
        "layers": [1],
        "schedule": {"kind": "linear_decay", "steps": 5},
    }
    config = _config(tmp_path, interventions=[spec])
    dumped = json.loads(json.dumps(config.to_dict()))  # what W&B's config receives
    assert [Intervention.from_dict(d) for d in dumped["interventions"]] == config.interventions


@pytest.mark.parametrize("peft", [False, True])
def test_reference_ablation_holds_the_subspace_at_the_frozen_starting_model(
    make_model, tokenizer, chat_dataset, tmp_path, peft
):
    """reference_ablate: on every training batch the policy's projection at the site equals the projection
    of the model as it was before training (an independent twin, run here on the same batches), while
    the weights move. The reference is a frozen copy (untouched by training), or for a PEFT model the
    same model with its adapters off."""
    direction = _direction(k=2)
    model = make_model("llama", seed=0)
    twin = make_model("llama", seed=0).eval()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = InterventionSFTTrainer(
        model=model,
        args=_config(tmp_path, max_steps=3, learning_rate=1e-2),
        train_dataset=chat_dataset,
        processing_class=tokenizer,
        interventions=[{"operator": "reference_ablate", "direction": direction, "layers": [1]}],
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear") if peft else None,
    )
    source = trainer.intervention_reference
    assert source.adapter_off == peft and (source.model is trainer.model) == peft
    ref = source.model
    batches, after = [], []
    trainer.model.register_forward_pre_hook(
        lambda m, args, kwargs: batches.append((kwargs["input_ids"], kwargs.get("attention_mask"))),
        with_kwargs=True,
    )
    with trainer.intervention_set:  # the set's hook first, then this one: it sees the intervened output
        handle = site_module(trainer.model, "resid_post", 1).register_forward_hook(
            lambda m, a, o: after.append(unpack_output(o)[0].detach())
        )
        try:
            trainer.train()
        finally:
            handle.remove()
    if peft:  # the reference pass runs through the same model (adapters off) just before each step's
        batches, after = batches[1::2], after[1::2]
    assert len(after) == len(batches) == 3
    U = trainer.intervention_set.ops[0].vectors
    twin_out = {}
    site_module(twin, "resid_post", 1).register_forward_hook(
        lambda m, a, o: twin_out.__setitem__("h", unpack_output(o)[0])
    )
    for h, (ids, mask) in zip(after, batches):
        with torch.no_grad():
            twin(input_ids=ids, attention_mask=mask)
        torch.testing.assert_close(projection(h, U), projection(twin_out["h"], U), atol=1e-4, rtol=0)
    if peft:
        assert any(p.abs().sum() > 0 for n, p in trainer.model.named_parameters() if "lora_B" in n)
    else:
        assert any(not torch.equal(p, start[n]) for n, p in trainer.model.named_parameters())
    if not peft:
        for name, p in ref.named_parameters():
            assert torch.equal(p, start[name]), f"reference parameter {name} moved"
