"""intervention_reference='precomputed': reference_ablate / resample_ablate read the starting model's projections
from a table filled by one pass before training (keyed by each example's tokens), and training equals the
live reference pass bit for bit: losses and weights, shuffled batches with padding, LoRA or full fine-tuning."""

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from tiny_settings import tiny_sft_config

from interventions import Direction, Intervention, InterventionSet
from interventions.reference import (
    REFERENCE_KEYS,
    ReferenceKeyCollator,
    ReferenceKeyError,
    ReferenceSource,
    example_key,
)
from trainers import InterventionSFTTrainer

D = 64


def _direction(k=2, seed=0):
    return Direction(torch.randn(k, D, generator=torch.Generator().manual_seed(seed)))


def _specs(operator, tokens="all"):
    return [{"operator": operator, "direction": _direction(), "layers": "all", "tokens": tokens}]


def _trainer(make_model, tokenizer, dataset, folder, specs, mode, peft=False, **kw):
    settings = dict(max_steps=4, learning_rate=1e-2, intervention_reference=mode)
    settings.update(kw)
    return InterventionSFTTrainer(
        model=make_model("llama", seed=0),
        args=tiny_sft_config(folder, **settings),
        train_dataset=dataset,
        processing_class=tokenizer,
        interventions=specs,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear") if peft else None,
    )


def _losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def _weights(trainer):
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def _max_weight_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[n] - b[n]).abs().max().item() for n in a)


@pytest.mark.parametrize(
    "operator,peft,tokens,bf16",
    [
        ("reference_ablate", False, "all", False),
        ("resample_ablate", False, "all", False),
        ("reference_ablate", True, "completion", False),
        ("resample_ablate", True, "all", False),
        ("reference_ablate", True, "all", True),
        ("resample_ablate", False, "all", True),
    ],
)
def test_precomputed_reference_equals_the_live_pass(
    make_model, tokenizer, chat_dataset, tmp_path, operator, peft, tokens, bf16
):
    """Four shuffled steps of four rows of different lengths (right padding): same losses and weights, bit for
    bit, and no reference forward during training (every batch read its rows from the table). bf16 mixed
    precision: the live pass of a PEFT policy runs under accelerate's autocast, and so does the precompute."""
    specs = _specs(operator, tokens)
    live = _trainer(make_model, tokenizer, chat_dataset, tmp_path / "live", specs, "live", peft, bf16=bf16)
    live.train()
    pre = _trainer(
        make_model, tokenizer, chat_dataset, tmp_path / "pre", specs, "precomputed", peft, bf16=bf16
    )
    pre.train()
    source = pre.intervention_reference
    assert pre.reference_mode == "precomputed" and source.table is not None
    assert len(source.table) == len(chat_dataset)  # every example, also those the 4 steps do not reach
    assert source.passes == 0 and source.table_reads == 4
    assert live.intervention_reference.passes == 4
    assert _losses(pre) == _losses(live)
    assert _max_weight_diff(_weights(pre), _weights(live)) == 0.0
    # it did intervene: training without the intervention ends elsewhere
    plain = _trainer(make_model, tokenizer, chat_dataset, tmp_path / "plain", [], "live", peft, bf16=bf16)
    plain.train()
    assert _losses(plain) != _losses(pre)
    if not peft:  # the starting model was the policy itself: no copy of the weights is kept
        assert source.model is None
    else:
        assert source.model is pre.model


def test_resample_rows_follow_the_same_generator(make_model, tokenizer, chat_dataset, tmp_path):
    """resample_ablate draws the same row shifts from the source's generator on both paths."""
    specs = _specs("resample_ablate")
    live = _trainer(make_model, tokenizer, chat_dataset, tmp_path / "live", specs, "live")
    live.train()
    pre = _trainer(make_model, tokenizer, chat_dataset, tmp_path / "pre", specs, "precomputed")
    pre.train()
    assert torch.equal(
        live.intervention_reference.generator.get_state(), pre.intervention_reference.generator.get_state()
    )
    fresh = torch.Generator().manual_seed(0).get_state()
    assert not torch.equal(pre.intervention_reference.generator.get_state(), fresh)


def test_later_epochs_read_the_first_epochs_values(make_model, tokenizer, chat_dataset, tmp_path):
    """Three epochs of 8 examples of very different lengths: later epochs batch the examples differently from the
    precompute pass (other padded lengths; resample_ablate reads other rows' padding positions past the length
    they had then, precomputed too). The reference's values then come from another batch composition than the
    live pass's: equal up to float rounding (a kernel may block a longer row differently), so the run equals
    the live one to rounding (bit for bit on the machine this was written on)."""
    data = Dataset.from_list(
        [
            {
                "messages": [
                    {"role": "user", "content": "Say it " * (1 + 3 * i)},
                    {"role": "assistant", "content": f"{i} " * (1 + (5 * i) % 7)},
                ]
            }
            for i in range(8)
        ]
    )
    specs = _specs("resample_ablate")
    live = _trainer(make_model, tokenizer, data, tmp_path / "live", specs, "live", max_steps=6)
    live.train()
    pre = _trainer(make_model, tokenizer, data, tmp_path / "pre", specs, "precomputed", max_steps=6)
    pre.train()
    assert pre.intervention_reference.table_reads == 6
    assert pre.state.epoch == live.state.epoch == 3
    torch.testing.assert_close(_losses(pre), _losses(live), rtol=1e-5, atol=0)
    assert _max_weight_diff(_weights(pre), _weights(live)) < 1e-5


def test_the_key_rides_through_the_collator_and_never_reaches_the_model(
    make_model, tokenizer, chat_dataset, tmp_path
):
    trainer = _trainer(
        make_model, tokenizer, chat_dataset, tmp_path, _specs("reference_ablate"), "precomputed", max_steps=2
    )
    assert isinstance(trainer.data_collator, ReferenceKeyCollator)
    rows = [trainer.train_dataset[i] for i in (3, 1)]
    batch = trainer.data_collator(rows)
    assert batch[REFERENCE_KEYS] == [example_key(rows[0]), example_key(rows[1])]
    assert batch[REFERENCE_KEYS][0] != batch[REFERENCE_KEYS][1]
    seen = []
    trainer.model.register_forward_pre_hook(lambda m, a, kw: seen.append(sorted(kw)), with_kwargs=True)
    trainer.train()
    assert seen and all(REFERENCE_KEYS not in keys for keys in seen)


def test_live_is_the_default(make_model, tokenizer, chat_dataset, tmp_path):
    trainer = _trainer(make_model, tokenizer, chat_dataset, tmp_path, _specs("reference_ablate"), "live")
    assert trainer.args.intervention_reference == "live" == trainer.reference_mode
    assert not isinstance(trainer.data_collator, ReferenceKeyCollator)
    with pytest.raises(ValueError, match="intervention_reference"):
        tiny_sft_config(tmp_path, intervention_reference="cached")


def test_padding_free_falls_back_to_live_with_a_warning(make_model, tokenizer, chat_dataset, tmp_path):
    """Padding-free batches flatten examples into one row: no per-example key; the live pass serves."""
    with pytest.warns(UserWarning, match="falls back to the live reference.*padding-free"):
        trainer = _trainer(
            make_model,
            tokenizer,
            chat_dataset,
            tmp_path,
            _specs("reference_ablate"),
            "precomputed",
            padding_free=True,
            max_length=None,
            max_steps=2,
        )
    assert trainer.reference_mode == "live"
    assert not isinstance(trainer.data_collator, ReferenceKeyCollator)
    trainer.train()
    assert trainer.intervention_reference.passes == 2 and trainer.intervention_reference.table is None


def test_reference_regulariser_falls_back_to_live(make_model, tokenizer, chat_dataset, tmp_path):
    with pytest.warns(UserWarning, match="falls back to the live reference.*regulariser"):
        trainer = _trainer(
            make_model,
            tokenizer,
            chat_dataset,
            tmp_path,
            _specs("reference_ablate"),
            "precomputed",
            regularisers=[{"kind": "ldifs", "weight": 1.0, "layers": [1]}],
            max_steps=1,
        )
    assert trainer.reference_mode == "live"


def _left_padding(collator):
    def collate(examples):
        batch = collator(examples)
        order = torch.argsort(batch["attention_mask"], dim=1, stable=True)  # padding first
        for key in ("input_ids", "attention_mask", "labels"):
            batch[key] = torch.gather(batch[key], 1, order)
        return batch

    return collate


def test_batches_that_cannot_be_keyed_fall_back_to_a_frozen_copy(
    make_model, tokenizer, chat_dataset, tmp_path
):
    """A collator that pads left: the precompute pass refuses its batches, and training runs the live reference
    (a frozen copy of the starting model, made then) and equals a live run."""
    specs = _specs("reference_ablate")
    pre = _trainer(make_model, tokenizer, chat_dataset, tmp_path / "pre", specs, "precomputed")
    pre.data_collator = ReferenceKeyCollator(_left_padding(pre.data_collator.collator))
    with pytest.warns(UserWarning, match="not right-padded"):
        pre.train()
    source = pre.intervention_reference
    assert pre.reference_mode == "live" and source.table is None
    assert source.model is not pre.model and source.passes == 4
    live = _trainer(make_model, tokenizer, chat_dataset, tmp_path / "live", specs, "live")
    live.data_collator = _left_padding(live.data_collator)
    live.train()
    assert _losses(pre) == _losses(live)
    assert _max_weight_diff(_weights(pre), _weights(live)) == 0.0


def test_a_batch_outside_the_table_is_refused_once_the_starting_model_is_gone(
    make_model, tokenizer, chat_dataset, tmp_path
):
    """After training, evaluating on examples the precompute pass never saw has no reference: a clear error
    (full fine-tuning, no copy kept); a PEFT model still has its reference (adapters off): live, with a warning."""
    specs = [dict(_specs("reference_ablate")[0], phases=["train", "eval"])]
    train, other = chat_dataset.select(range(16)), chat_dataset.select(range(16, 24))
    trainer = _trainer(make_model, tokenizer, train, tmp_path / "full", specs, "precomputed", max_steps=2)
    trainer.train()
    trainer.evaluate(train)  # precomputed rows: fine
    with pytest.raises(RuntimeError, match="precomputed reference has no values"):
        trainer.evaluate(other)
    peft = _trainer(
        make_model, tokenizer, train, tmp_path / "peft", specs, "precomputed", peft=True, max_steps=2
    )
    peft.train()
    with pytest.warns(UserWarning, match="run the live reference pass"):
        peft.evaluate(other)


def test_eval_data_is_precomputed_when_an_intervention_reads_the_reference_in_eval(
    make_model, tokenizer, chat_dataset, tmp_path
):
    specs = [dict(_specs("reference_ablate")[0], phases=["train", "eval"])]
    train, held_out = chat_dataset.select(range(16)), chat_dataset.select(range(16, 24))
    results = {}
    for mode in ("live", "precomputed"):
        trainer = InterventionSFTTrainer(
            model=make_model("llama", seed=0),
            args=tiny_sft_config(
                tmp_path / mode,
                max_steps=2,
                learning_rate=1e-2,
                intervention_reference=mode,
                eval_strategy="no",
            ),
            train_dataset=train,
            eval_dataset=held_out,
            processing_class=tokenizer,
            interventions=specs,
        )
        trainer.train()
        results[mode] = trainer.evaluate()["eval_loss"]
        if mode == "precomputed":
            assert trainer.intervention_reference.passes == 0
    assert results["precomputed"] == results["live"]


def test_precompute_refuses_left_padded_or_unkeyed_batches(make_model):
    model = make_model("llama", seed=0)
    iset = InterventionSet(model, [Intervention("reference_ablate", _direction(), layers=[1])])
    source = ReferenceSource(model)
    ids = torch.randint(5, 100, (2, 6))
    with pytest.raises(ReferenceKeyError, match="keys"):
        source.precompute(iset, [{"input_ids": ids}])
    left = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with pytest.raises(ReferenceKeyError, match="right-padded"):
        source.precompute(iset, [{"input_ids": ids, "attention_mask": left, REFERENCE_KEYS: [b"a", b"b"]}])


def test_table_reads_equal_the_live_capture_on_plain_tensors(make_model):
    """Unit level: capture(keys=...) from the table equals capture on the same batch, resample shifts included."""
    model = make_model("llama", seed=0)
    specs = [
        Intervention("reference_ablate", _direction(), layers=[0, 1], name="ref"),
        Intervention("resample_ablate", _direction(k=1, seed=1), layers=[1], name="res"),
    ]
    iset = InterventionSet(model, specs)
    ids = torch.randint(5, 100, (3, 7))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    mask[2, 3:] = 0
    keys = [example_key({"input_ids": ids[b, : int(mask[b].sum())]}) for b in range(3)]
    table_source = ReferenceSource(model, seed=5)
    table_source.precompute(iset, [{"input_ids": ids, "attention_mask": mask, REFERENCE_KEYS: keys}], 0, 7)
    live_source = ReferenceSource(model, seed=5)
    for _ in range(3):  # three draws of the resample shift
        live_source.capture(iset, input_ids=ids, attention_mask=mask)
        live = [op.reference.clone() for op in iset.ops]
        table_source.capture(iset, keys=keys, input_ids=ids, attention_mask=mask)
        assert all(torch.equal(a, op.reference) for a, op in zip(live, iset.ops))
    assert table_source.passes == 0 and table_source.table_reads == 3
    # a key the table does not hold, with the model still there: the live pass, with a warning
    with pytest.warns(UserWarning, match="live reference pass"):
        table_source.capture(iset, keys=[b"unknown"] * 3, input_ids=ids, attention_mask=mask)
    assert table_source.passes == 1
    # a row whose real tokens do not fit the batch (truncated differently): not read from the table
    table_source.capture(iset, keys=keys, input_ids=ids[:, :4], attention_mask=mask[:, :4])
    assert table_source.passes == 2 and table_source.table_reads == 3


@pytest.mark.parametrize("extend", [True, False])
def test_resample_reads_other_rows_padding_positions_precomputed_too(make_model, extend):
    """A later batch pads a row further than its precompute batch did; resample_ablate hands a longer row that
    row's values at those padding positions. With ``extend_to`` the table holds them (equal to the live pass up to
    float rounding: the batch is composed differently); without, they would be zeros and differ by far more:
    this is why the trainer passes the longest row's length."""
    model = make_model("llama", seed=0)
    iset = InterventionSet(model, [Intervention("resample_ablate", _direction(k=1), layers=[1])])
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(5, 100, (n,), generator=g) for n in (3, 5, 9)]
    keys = [example_key({"input_ids": r}) for r in rows]

    def batch(idx):
        T = max(len(rows[i]) for i in idx)
        ids = torch.zeros(len(idx), T, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, i in enumerate(idx):
            ids[b, : len(rows[i])], mask[b, : len(rows[i])] = rows[i], 1
        return {"input_ids": ids, "attention_mask": mask, REFERENCE_KEYS: [keys[i] for i in idx]}

    table_source, live_source = ReferenceSource(model, seed=1), ReferenceSource(model, seed=1)
    table_source.precompute(
        iset, [batch([0, 1]), batch([2, 0])], pad_token_id=0, extend_to=9 if extend else None
    )
    later = batch([2, 1, 0])
    diffs = []
    for _ in range(4):
        inputs = {k: v for k, v in later.items() if k != REFERENCE_KEYS}
        live_source.capture(iset, **inputs)
        live = iset.ops[0].reference.clone()
        table_source.capture(iset, keys=later[REFERENCE_KEYS], **inputs)
        diffs.append((live - iset.ops[0].reference).abs().max().item())
    assert table_source.passes == 0
    assert max(diffs) < 1e-6 if extend else max(diffs) > 1e-3


def test_resume_with_a_precomputed_reference_equals_the_uninterrupted_live_run(
    make_model, tokenizer, chat_dataset, tmp_path
):
    """Six steps of resample_ablate saved at step 3; a fresh trainer (new table from the starting model,
    generator state from the checkpoint) resumes: steps 4-6 equal the uninterrupted live run."""
    specs = _specs("resample_ablate")
    saving = dict(max_steps=6, save_strategy="steps", save_steps=3)
    live = _trainer(make_model, tokenizer, chat_dataset, tmp_path / "live", specs, "live", **saving)
    live.train()
    full = _trainer(make_model, tokenizer, chat_dataset, tmp_path / "full", specs, "precomputed", **saving)
    full.train()
    assert (tmp_path / "full" / "checkpoint-3" / ReferenceSource.STATE_FILE).is_file()
    resumed = _trainer(make_model, tokenizer, chat_dataset, tmp_path / "full", specs, "precomputed", **saving)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    a = {h["step"]: h["loss"] for h in live.state.log_history if "loss" in h}
    b = {h["step"]: h["loss"] for h in resumed.state.log_history if "loss" in h}
    assert [a[s] for s in (4, 5, 6)] == [b[s] for s in (4, 5, 6)]
    assert resumed.intervention_reference.passes == 0
    assert _max_weight_diff(_weights(resumed), _weights(live)) == 0.0


def test_bfd_packing_falls_back_to_live_and_wrapped_packing_is_keyed_by_packed_row(
    make_model, tokenizer, chat_dataset, tmp_path
):
    """Packing: the bfd strategies are padding-free (several examples flattened into one row, position_ids
    restarting): refused with a warning, the live pass serves. The wrapped strategy cuts the token stream into
    rows of max_length: each packed row is an example with its own key, and training equals the live pass."""
    specs = _specs("reference_ablate")
    with pytest.warns(UserWarning, match="falls back to the live reference.*packing"):
        bfd = _trainer(
            make_model,
            tokenizer,
            chat_dataset,
            tmp_path / "bfd",
            specs,
            "precomputed",
            packing=True,
            max_length=64,
        )
    assert bfd.reference_mode == "live"
    packed = dict(packing=True, packing_strategy="wrapped", max_length=24, assistant_only_loss=False)
    live = _trainer(make_model, tokenizer, chat_dataset, tmp_path / "live", specs, "live", **packed)
    live.train()
    pre = _trainer(make_model, tokenizer, chat_dataset, tmp_path / "pre", specs, "precomputed", **packed)
    pre.train()
    assert pre.reference_mode == "precomputed" and pre.intervention_reference.passes == 0
    assert len(pre.intervention_reference.table) == len(pre.train_dataset) != len(chat_dataset)  # packed rows
    assert _losses(pre) == _losses(live)
    assert _max_weight_diff(_weights(pre), _weights(live)) == 0.0


def test_the_key_collator_survives_pickling_for_dataloader_workers():
    """Worker processes receive the collate function pickled: the wrapper must round-trip (its attribute
    forwarding must not recurse on a half-built object) and still key the rows."""
    import pickle

    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    collator = pickle.loads(
        pickle.dumps(ReferenceKeyCollator(DataCollatorForLanguageModeling(pad_token_id=0)))
    )
    assert collator.pad_token_id == 0
    rows = [{"input_ids": [5, 6, 7]}, {"input_ids": [8, 9]}]
    assert collator(rows)[REFERENCE_KEYS] == [example_key(r) for r in rows]
