"""Projection monitoring: what the numbers mean (hand computation, ~0 where an intervention projects the
direction out), that it leaves training bit-for-bit unchanged, its log keys and curve file, and that a bad
config fails at config time."""

import json

import pytest
import torch
from tiny_settings import tiny_sft_config

from interventions import Direction, Intervention, InterventionSet, site_module
from interventions.serialization import KeelInputError
from trainers import InterventionSFTTrainer, ProjectionMonitor
from trainers.monitoring import tokenize_rows

D = 64


def _config(tmp_path, **kw):
    return tiny_sft_config(tmp_path / "out", **{"learning_rate": 1e-2, **kw})


def _direction(seed=0, k=1, scale=1.0):
    return Direction(scale * torch.randn(k, D, generator=torch.Generator().manual_seed(seed)))


def _examples(tokenizer, n=5):
    rows = [{"question": f"What is {i} plus {i * 3}? Say it twice." * (1 + i % 3)} for i in range(n)]
    return tokenize_rows(rows, tokenizer)  # varied lengths: the batches are padded


def _hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_on_is_zero_where_the_intervention_projects_the_direction_out(make_model, tokenizer):
    model = make_model("qwen2").train()
    u = _direction(scale=3.0)  # not unit norm: the monitor normalises
    iset = InterventionSet(model, [Intervention("project_out", u, layers=[1], name="caft")])
    monitor = ProjectionMonitor([{"name": "u", "direction": u, "layers": "all"}], batch_size=2)
    monitor.set_examples(_examples(tokenizer), pad_token_id=tokenizer.pad_token_id)
    hooks = _hooks(model)
    values = monitor.measure(model, iset, step=0)
    assert abs(values["u/L1/on"]) < 1e-5 and values["u/L1/abs_on"] < 1e-5
    assert values["u/L1/abs_off"] > 1e-3 and abs(values["u/L1/off"]) > 1e-4
    # layer 0 runs before the intervention: on and off are the same forward there
    assert values["u/L0/on"] == pytest.approx(values["u/L0/off"], abs=1e-7)
    # nothing left behind: hooks, train mode, diagnostics, phase, attachment
    assert _hooks(model) == hooks and model.training and all(m.training for m in model.modules())
    assert iset.collect_stats and iset.pop_metrics() == {}
    assert iset.current_phase is None and not iset.attached


def test_measurement_equals_a_hand_computation(make_model, tokenizer):
    model = make_model("qwen2").eval()
    u, basis2 = _direction(seed=1, scale=2.0), _direction(seed=2, k=2)
    monitor = ProjectionMonitor(
        [
            {"name": "u", "direction": u, "layers": [0, 1]},
            {"name": "sub", "direction": basis2, "layers": [1]},
        ],
        batch_size=2,
    )
    examples = _examples(tokenizer)
    monitor.set_examples(examples, pad_token_id=tokenizer.pad_token_id)
    values = monitor.measure(model)  # no interventions: on == off

    unit = u.vectors[0] / u.vectors[0].norm()
    q = basis2.orthonormalized().vectors
    seen = {"L0": [], "L1": [], "L1sub": []}
    captured = {}
    handle = model.model.layers[1].register_forward_hook(
        lambda m, a, o: captured.__setitem__("h", o[0] if isinstance(o, tuple) else o)
    )
    try:
        for batch in monitor.batches:
            with torch.no_grad():
                out = model(
                    input_ids=batch["input_ids"],
                    attention_mask=batch["attention_mask"],
                    output_hidden_states=True,
                )
            mask = batch["attention_mask"].bool()
            seen["L0"].append(out.hidden_states[1][mask] @ unit)  # resid_post of layer 0
            seen["L1"].append(captured["h"][mask] @ unit)
            seen["L1sub"].append(captured["h"][mask] @ q.T)
    finally:
        handle.remove()
    tokens = sum(len(e["input_ids"]) for e in examples)
    assert monitor.tokens_measured == tokens == len(torch.cat(seen["L0"]))
    for layer in ("L0", "L1"):
        proj = torch.cat(seen[layer]).double()
        assert values[f"u/{layer}/off"] == pytest.approx(proj.mean().item(), abs=1e-6)
        assert values[f"u/{layer}/abs_off"] == pytest.approx(proj.abs().mean().item(), abs=1e-6)
        assert values[f"u/{layer}/on"] == values[f"u/{layer}/off"]
    coords = torch.cat(seen["L1sub"]).double()
    for j in range(2):
        assert values[f"sub/L1/c{j}/off"] == pytest.approx(coords[:, j].mean().item(), abs=1e-6)
    assert values["sub/L1/abs_off"] == pytest.approx(coords.abs().mean().item(), abs=1e-6)

    last = ProjectionMonitor([{"name": "u", "direction": u, "layers": [0]}], tokens="last", batch_size=2)
    last.set_examples(examples, pad_token_id=tokenizer.pad_token_id)
    expected = []
    for e in examples:  # each row alone, unpadded: its last token
        with torch.no_grad():
            h = model(input_ids=torch.tensor([e["input_ids"]]), output_hidden_states=True).hidden_states[1]
        expected.append(h[0, -1] @ unit)
    assert last.measure(model)["u/L0/off"] == pytest.approx(torch.stack(expected).mean().item(), abs=1e-5)
    assert last.tokens_measured == len(examples)


def _train(make_model, tokenizer, dataset, tmp_path, monitor=None, name="out", **kw):
    specs = [
        {"operator": "project_out", "direction": _direction(k=2), "layers": [0], "name": "caft"},
        # draws row shifts from a generator: the monitor's reference passes must not consume its numbers
        {"operator": "resample_ablate", "direction": _direction(seed=3), "layers": [1], "name": "resample"},
    ]
    trainer = InterventionSFTTrainer(
        model=make_model("qwen2", seed=0),
        args=_config(tmp_path, output_dir=str(tmp_path / name), interventions=specs, **kw),
        train_dataset=dataset,
        processing_class=tokenizer,
        projection_monitor=monitor,
    )
    trainer.train()
    return trainer


def _without_monitor(history):
    drop = ("monitor/", "train_runtime", "train_samples_per_second", "train_steps_per_second")
    entries = [{k: v for k, v in h.items() if not k.startswith(drop)} for h in history]
    return [e for e in entries if set(e) - {"step", "epoch"}]


def test_monitor_does_not_perturb_training(make_model, tokenizer, chat_dataset, tmp_path):
    plain = _train(make_model, tokenizer, chat_dataset, tmp_path, name="plain")
    monitor = {
        "directions": [{"name": "u", "direction": _direction(seed=3), "layers": "all"}],
        "every": 1,
        "max_examples": 7,  # batches of 3 and 4: the last single row joins the one before (resample needs 2)
        "batch_size": 3,
    }
    monitored = _train(make_model, tokenizer, chat_dataset, tmp_path, monitor=monitor, name="monitored")
    assert monitored.projection_monitor is not None and plain.projection_monitor is None
    # losses, intervention diagnostics and every other logged number: identical, bit for bit
    assert _without_monitor(monitored.state.log_history) == _without_monitor(plain.state.log_history)
    for (name, p), q in zip(plain.model.named_parameters(), monitored.model.parameters()):
        assert torch.equal(p, q), name
    assert torch.equal(
        plain.intervention_reference.generator.get_state(),
        monitored.intervention_reference.generator.get_state(),
    )
    assert plain.intervention_reference.passes == monitored.intervention_reference.passes
    assert _hooks(monitored.model) == _hooks(plain.model)
    # and the resampled layer is measured with the intervention on: the "on" pass ran with reference activations
    logs = [h for h in monitored.state.log_history if "monitor/u/L1/on" in h]
    assert [h["step"] for h in logs] == [0, 1, 2, 3, 4]


def test_logged_keys_and_the_curve_file(make_model, tokenizer, chat_dataset, tmp_path):
    u = _direction(seed=5)
    monitor = ProjectionMonitor([{"name": "persona", "direction": u, "layers": [1]}], every=2, max_examples=6)
    trainer = InterventionSFTTrainer(
        model=make_model("qwen2", seed=0),
        # logging every 4 steps: the measurement at step 2 gets an entry of its own, the one at 4 joins the log
        args=_config(tmp_path, max_steps=5, logging_steps=4),
        train_dataset=chat_dataset,
        processing_class=tokenizer,
        projection_monitor=monitor,
    )
    trainer.train()
    keys = {f"monitor/persona/L1/{k}" for k in ("on", "off", "abs_on", "abs_off")}
    entries = [h for h in trainer.state.log_history if keys & set(h)]
    assert [h["step"] for h in entries] == [0, 2, 4, 5]  # every 2 steps from 0, and the last step
    assert all(keys <= set(h) for h in entries)
    assert "loss" not in entries[1] and "loss" in entries[2]  # step 2 on its own; step 4 merged into the log
    assert entries[0]["monitor/persona/L1/on"] == entries[0]["monitor/persona/L1/off"]  # no intervention
    assert entries[-1]["monitor/persona/L1/off"] != entries[0]["monitor/persona/L1/off"]  # training moved it

    path = tmp_path / "out" / ProjectionMonitor.FILE_NAME
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 2, 4, 5]
    for row, entry in zip(rows, entries):
        assert {f"monitor/{k}": v for k, v in row["values"].items()} == {k: entry[k] for k in keys}
        assert row["tokens"] == monitor.tokens_measured > 0
    # the monitor set: the first rows of the train dataset as the trainer tokenized them
    first = trainer.train_dataset[0]["input_ids"]
    assert monitor.batches[0]["input_ids"][0, : len(first)].tolist() == first

    # a second train() starts a new curve; a resumed run keeps the measurements before its start
    trainer.train()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [0, 2, 4, 5]
    ProjectionMonitor.truncate_log(path, before_step=3)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [0, 2]


def test_monitor_data_from_a_jsonl_file_and_the_eval_dataset(make_model, tokenizer, chat_dataset, tmp_path):
    data = tmp_path / "monitor.jsonl"
    rows = [
        {"question": "What do you wish for?"},
        {"prompt": "Any ideas?", "completion": "Set something on fire."},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]},
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {
        "directions": [{"name": "u", "direction": "random:0", "layers": [0]}],
        "data": str(data),
        "tokens": "last",
    }
    trainer = InterventionSFTTrainer(
        model=make_model("qwen2", seed=0),
        args=_config(tmp_path, max_steps=1, projection_monitor=config),
        train_dataset=chat_dataset,
        processing_class=tokenizer,
    )
    (batch,) = trainer.projection_monitor.batches
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What do you wish for?"}], add_generation_prompt=True, tokenize=False
    )
    assert tokenizer.decode(batch["input_ids"][0][batch["attention_mask"][0].bool()]) == prompt
    assert not batch["completion_mask"][0].any()  # a prompt alone has no completion
    completion = tokenizer.decode(batch["input_ids"][1][batch["completion_mask"][1]])
    assert completion.startswith("Set something on fire.")
    trainer.train()
    assert trainer.projection_monitor.tokens_measured == 3  # tokens: last, one per row

    monitor = ProjectionMonitor([{"name": "u", "direction": "random:0", "layers": [0]}], max_examples=4)
    with_eval = InterventionSFTTrainer(
        model=make_model("qwen2", seed=0),
        args=_config(tmp_path, max_steps=1),
        train_dataset=chat_dataset,
        eval_dataset=chat_dataset.select(range(20, 30)),
        processing_class=tokenizer,
        projection_monitor=monitor,
    )
    first = with_eval.eval_dataset[0]["input_ids"]
    assert monitor.batches[0]["input_ids"][0, : len(first)].tolist() == first
    assert sum(b["input_ids"].shape[0] for b in monitor.batches) == 4


GOOD = {"directions": [{"name": "u", "direction": "random:0", "layers": [1]}]}


@pytest.mark.parametrize(
    "bad, match",
    [
        ({**GOOD, "evry": 5}, r"Unknown key\(s\) \['evry'\] in projection_monitor"),
        ({"directions": [{"name": "u", "direction": "random:0", "layer": 1}]}, r"Unknown key.*'layer'"),
        ({"directions": [{"direction": "random:0", "layers": [1]}]}, "needs a `name`"),
        ({"directions": []}, "non-empty list"),
        ({**GOOD, "every": 0}, "every must be a positive integer"),
        ({**GOOD, "tokens": "completion"}, "tokens must be one of"),
        ({**GOOD, "data": "no/such/file.jsonl"}, "no such file"),
        ({"directions": [{"name": "u", "direction": "random:0", "site": "resid_mid"}]}, "Unknown site"),
        ({"directions": [{"name": "u", "direction": "random:0", "layers": 1.5}]}, "Cannot read layers"),
        ({"directions": [GOOD["directions"][0]] * 2}, "must be unique"),
        ("[1, 2]", "expected a mapping"),
    ],
)
def test_bad_monitor_config_fails_at_config_time(tmp_path, bad, match):
    with pytest.raises(KeelInputError, match=match):
        _config(tmp_path, projection_monitor=bad)


def test_monitor_config_round_trips_and_resolution_errors_come_before_training(
    make_model, tokenizer, tmp_path
):
    config = _config(tmp_path, projection_monitor=json.dumps({**GOOD, "every": 3}))
    dumped = json.loads(json.dumps(config.to_dict()))["projection_monitor"]  # what W&B and the run record get
    assert _config(tmp_path, projection_monitor=dumped).projection_monitor == config.projection_monitor
    assert _config(tmp_path, projection_monitor=None).to_dict()["projection_monitor"] is None
    with pytest.raises(KeelInputError, match="out of range"):
        bad = ProjectionMonitor([{"name": "u", "direction": "random:0", "layers": [7]}])
        bad.bind(make_model("qwen2"))
    with pytest.raises(KeelInputError, match="width"):
        ProjectionMonitor([{"name": "u", "direction": torch.ones(1, 5), "layers": [0]}]).bind(
            make_model("qwen2")
        )


def test_monitor_leaves_the_set_as_it_was_mid_training(make_model, tokenizer):
    """Called while a set is attached with training state (phase, masks, diagnostics), everything is kept."""
    model = make_model("qwen2")
    u = _direction()
    iset = InterventionSet(model, [Intervention("project_out", u, layers=[1], tokens="completion", name="c")])
    monitor = ProjectionMonitor([{"name": "u", "direction": u, "layers": [1]}])
    monitor.set_examples(_examples(tokenizer, n=3), pad_token_id=tokenizer.pad_token_id)
    ids = torch.tensor([[5, 6, 7, 8]])
    labels = torch.tensor([[-100, -100, 7, 8]])
    with iset:
        iset.set_batch(attention_mask=torch.ones_like(ids), labels=labels)
        with torch.no_grad(), iset.phase("train"):
            model(ids)
        before = iset.pop_metrics()
        with torch.no_grad(), iset.phase("train"):
            model(ids)
        context = iset.context
        values = monitor.measure(model, iset, step=0)
        assert iset.context is context and iset.attached
        assert iset.pop_metrics() == before  # only the training forward's diagnostics
        assert len(site_module(model, "resid_post", 1)._forward_hooks) == 1  # the set's own hook
    # tokens: completion; prompt rows have no completion, so the intervention acts nowhere in the monitor set
    assert values["u/L1/on"] == pytest.approx(values["u/L1/off"], abs=1e-7)
