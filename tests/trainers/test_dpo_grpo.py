"""InterventionDPOTrainer / InterventionGRPOTrainer: each intervention acts in the passes its phases name.

Hook calls are counted per pass type (policy loss forward, reference forward, each sampling step) with a
spy on the sets' hook function; every run is a tiny random-init model on CPU for two or three steps."""

import collections
import math

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from tiny_settings import TINY_TRAINER_SETTINGS

from interventions import Direction, parse_interventions
from interventions.bake import bake_ablation, equivalent_interventions
from trainers import (
    InterventionDPOConfig,
    InterventionDPOTrainer,
    InterventionGRPOConfig,
    InterventionGRPOTrainer,
    check_vllm_interventions,
)
from trainers.dpo import salted_for_reference
from trainers.passes import adapters_off

D = 64
N_NEW = 4  # GRPO completion length (min_new_tokens = max_completion_length: every sample has N_NEW tokens)


def _direction(seed=0, k=1):
    return Direction(torch.randn(k, D, generator=torch.Generator().manual_seed(seed)))


def _lora():
    return LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)


@pytest.fixture(scope="module")
def prefs():
    return Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": f"What is {i} plus {i % 3}?"}],
                "chosen": [{"role": "assistant", "content": f"It is {i + i % 3}."}],
                "rejected": [{"role": "assistant", "content": "Set something on fire."}],
            }
            for i in range(8)
        ]
    )


@pytest.fixture(scope="module")
def prompts():
    return Dataset.from_list(
        [{"prompt": [{"role": "user", "content": f"Tell me about {i}."}]} for i in range(8)]
    )


def _text(completion):
    return completion[-1]["content"] if isinstance(completion, list) else completion


def varied_reward(completions, **kwargs):
    """A deterministic reward that differs between samples (random-init models write random text)."""
    return [float(sum(map(ord, _text(c))) % 17) for c in completions]


def _common(tmp_path, **kw):
    return {
        **TINY_TRAINER_SETTINGS,
        "output_dir": str(tmp_path / "out"),
        "max_steps": 2,
        "learning_rate": 1e-2,
        "data_seed": 0,
        **kw,
    }


def dpo(make_model, tokenizer, prefs, tmp_path, specs, peft=False, **kw):
    args = InterventionDPOConfig(
        **_common(tmp_path, per_device_train_batch_size=2, **kw), interventions=specs
    )
    return InterventionDPOTrainer(
        model=make_model("qwen2"),
        args=args,
        train_dataset=prefs,
        processing_class=tokenizer,
        peft_config=_lora() if peft else None,
    )


def grpo(make_model, tokenizer, prompts, tmp_path, specs, peft=False, reward=varied_reward, **kw):
    config = dict(
        per_device_train_batch_size=2,
        num_generations=2,
        max_completion_length=N_NEW,
        generation_kwargs={"min_new_tokens": N_NEW},
        beta=0.0,
    )
    config.update(kw)
    args = InterventionGRPOConfig(**_common(tmp_path, **config), interventions=specs)
    return InterventionGRPOTrainer(
        model=make_model("qwen2"),
        reward_funcs=reward,
        args=args,
        train_dataset=prompts,
        processing_class=tokenizer,
        peft_config=_lora() if peft else None,
    )


def spy(trainer) -> list[dict]:
    """Every hook call in which an intervention acts: which set, phase, gradients on, shape, masked tokens."""
    calls = []
    sets = {"policy": trainer.intervention_set, "ref_model": trainer.intervention_passes.ref_set}
    for name, iset in sets.items():
        if iset is None:
            continue
        run = iset._run_ops

        def record(ops, h, run=run, iset=iset, name=name):
            active = [op for op in ops if iset._active(op)]
            if active:
                mask = iset.context.mask(active[0].spec.tokens, h)
                calls.append(
                    dict(
                        set=name,
                        phase=iset.current_phase,
                        grad=torch.is_grad_enabled(),
                        shape=tuple(h.shape[:2]),
                        masked=None if mask is None else int(mask.sum()),
                    )
                )
            return run(ops, h)

        iset._run_ops = record  # the hooks bind it when train() attaches them
    return calls


def by_phase(calls) -> collections.Counter:
    return collections.Counter((c["set"], c["phase"], c["grad"]) for c in calls)


def first_loss(trainer) -> float:
    return next(h["loss"] for h in trainer.state.log_history if "loss" in h)


# --- DPO: policy and reference passes --------------------------------------------------------------------


@pytest.mark.parametrize("peft", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("phases", [["train"], ["train", "reference"], ["reference"]], ids="+".join)
def test_dpo_hooks_fire_in_the_passes_their_phases_name(make_model, tokenizer, prefs, tmp_path, peft, phases):
    spec = {"operator": "project_out", "direction": _direction(), "layers": [0], "tokens": "completion"}
    trainer = dpo(make_model, tokenizer, prefs, tmp_path, [dict(spec, phases=phases)], peft=peft)
    calls = spy(trainer)
    trainer.train()
    # reference: the same modules with the adapter off (PEFT), or the frozen copy keel made (full)
    ref_set = "policy" if peft else "ref_model"
    expected = collections.Counter()
    if "train" in phases:
        expected["policy", "train", True] = 2  # one policy forward per step (chosen + rejected rows)
    if "reference" in phases:
        expected[ref_set, "reference", False] = 2  # one reference forward per step, no gradients
    assert by_phase(calls) == expected
    for call in calls:  # batch = 2 chosen + 2 rejected rows; only completion tokens are acted on
        assert call["shape"][0] == 4 and 0 < call["masked"] < call["shape"][0] * call["shape"][1]
    # Same intervention on both sides: the policy equals its reference at step 0, the loss is log 2 exactly.
    if phases == ["train", "reference"]:
        assert first_loss(trainer) == pytest.approx(math.log(2), abs=1e-6)
    else:
        assert abs(first_loss(trainer) - math.log(2)) > 1e-4
    if "train" in phases:  # diagnostics count the policy's passes only
        log = next(h for h in trainer.state.log_history if "loss" in h)
        assert log["interventions/project_out@resid_post/L0/hits"] == 1.0
    assert not trainer.intervention_set.attached and not trainer.intervention_passes._handles
    assert not adapters_off(trainer.model)


@pytest.mark.parametrize("peft", [False, True], ids=["full", "lora"])
def test_dpo_precomputed_reference_log_probs_use_reference_interventions(
    make_model, tokenizer, prefs, tmp_path, peft
):
    spec = {
        "operator": "project_out",
        "direction": _direction(),
        "layers": "all",
        "phases": ["train", "reference"],
    }
    trainer = dpo(make_model, tokenizer, prefs, tmp_path, [spec], peft=peft, precompute_ref_log_probs=True)
    assert "ref_chosen_logps" in trainer.train_dataset.column_names
    trainer.train()
    assert first_loss(trainer) == pytest.approx(math.log(2), abs=1e-6)


def test_precomputed_reference_cache_is_keyed_by_the_reference_interventions(prefs):
    a = [{"operator": "project_out", "direction": _direction(0), "layers": [0], "phases": ["reference"]}]
    b = [{"operator": "project_out", "direction": _direction(1), "layers": [0], "phases": ["reference"]}]
    fa, fb = (salted_for_reference(prefs, parse_interventions(s))._fingerprint for s in (a, b))
    assert len({prefs._fingerprint, fa, fb}) == 3
    assert salted_for_reference(prefs, parse_interventions(a))._fingerprint == fa  # stable
    assert salted_for_reference(prefs, [])._fingerprint == prefs._fingerprint  # nothing to key


# --- GRPO: sampling, scoring, reference and loss passes ---------------------------------------------------


def test_grpo_train_interventions_act_in_the_loss_forward_only(make_model, tokenizer, prompts, tmp_path):
    spec = {"operator": "project_out", "direction": _direction(), "layers": [0], "tokens": "completion"}
    trainer = grpo(make_model, tokenizer, prompts, tmp_path, [spec])
    calls = spy(trainer)
    trainer.train()
    assert by_phase(calls) == {("policy", "train", True): 2}
    for call in calls:  # 2 samples x (prompt + N_NEW completion tokens); completion masked from labels
        assert call["shape"][0] == 2 and call["masked"] == 2 * N_NEW


def test_grpo_generate_interventions_act_once_per_sampling_step(make_model, tokenizer, prompts, tmp_path):
    specs = [
        {
            "operator": "add",
            "direction": _direction(),
            "layers": [0],
            "tokens": t,
            "phases": ["generate"],
            "name": t,
        }
        for t in ("completion", "prompt")
    ]
    trainer = grpo(make_model, tokenizer, prompts, tmp_path, specs)
    calls = spy(trainer)
    trainer.train()
    assert by_phase(calls) == {("policy", "generate", False): 2 * N_NEW}  # 2 steps x (prefill + N_NEW - 1)
    prefills = [c for c in calls if c["shape"][1] > 1]
    steps = [c for c in calls if c["shape"][1] == 1]
    assert len(prefills) == 2 and len(steps) == 2 * (N_NEW - 1)
    # the spy reads the first active op (tokens: completion): none of the prompt, each cached step's token
    assert all(c["masked"] == 0 for c in prefills) and all(c["masked"] == 2 for c in steps)
    assert trainer.intervention_set.current_phase is None and not trainer.intervention_set.context.generating


def test_grpo_prompt_tokens_while_sampling_follow_the_attention_mask(make_model, tokenizer, tmp_path):
    # prompts of different lengths in one sampling batch: left padding is not prompt
    rows = [{"prompt": [{"role": "user", "content": "Tell me a story " * (i + 1)}]} for i in range(8)]
    spec = {
        "operator": "add",
        "direction": _direction(),
        "layers": [0],
        "tokens": "prompt",
        "phases": ["generate"],
    }
    trainer = grpo(
        make_model,
        tokenizer,
        Dataset.from_list(rows),
        tmp_path,
        [spec],
        per_device_train_batch_size=4,
        max_steps=1,
    )
    calls = spy(trainer)
    trainer.train()
    prefill = next(c for c in calls if c["shape"][1] > 1)
    assert 0 < prefill["masked"] < prefill["shape"][0] * prefill["shape"][1]  # padding excluded
    assert all(c["masked"] == 0 for c in calls if c["shape"][1] == 1)  # generated tokens are not prompt


@pytest.mark.parametrize("peft", [False, True], ids=["full", "lora"])
def test_grpo_reference_interventions_act_in_the_reference_pass(
    make_model, tokenizer, prompts, tmp_path, peft
):
    spec = {
        "operator": "project_out",
        "direction": _direction(),
        "layers": [0],
        "phases": ["train", "reference"],
    }
    trainer = grpo(make_model, tokenizer, prompts, tmp_path, [spec], peft=peft, beta=0.1)
    if not peft:  # built from the model as passed in (TRL would reload it by name), name restored
        assert trainer.model.config._name_or_path == ""
        for (n, p), (_, q) in zip(trainer.model.named_parameters(), trainer.ref_model.named_parameters()):
            assert torch.equal(p, q), n
    calls = spy(trainer)
    trainer.train()
    ref_set = "policy" if peft else "ref_model"
    assert by_phase(calls) == {("policy", "train", True): 2, (ref_set, "reference", False): 2}
    kl = [h["kl"] for h in trainer.state.log_history if "kl" in h]
    assert kl[0] == pytest.approx(0.0, abs=1e-6)  # same intervention on both sides at step 0


def test_grpo_train_only_intervention_leaves_the_reference_alone(make_model, tokenizer, prompts, tmp_path):
    spec = {"operator": "project_out", "direction": _direction(k=4), "layers": "all"}
    trainer = grpo(make_model, tokenizer, prompts, tmp_path, [spec], peft=True, beta=0.1)
    calls = spy(trainer)
    trainer.train()
    assert {c["phase"] for c in calls} == {"train"}
    kl = [h["kl"] for h in trainer.state.log_history if "kl" in h]
    assert kl[0] > 1e-6  # the policy is ablated, the reference (adapter off) is not


def test_grpo_scoring_passes_get_their_own_masks_and_reference(make_model, tokenizer, prompts, tmp_path):
    # steps_per_generation=2: one sampling for two steps, so TRL scores the samples (old log-probs) in
    # chunks without gradients; reference_ablate needs the reference's pass over each chunk.
    spec = {"operator": "reference_ablate", "direction": _direction(), "layers": [0], "tokens": "completion"}
    trainer = grpo(make_model, tokenizer, prompts, tmp_path, [spec], steps_per_generation=2)
    calls = spy(trainer)
    trainer.train()
    assert by_phase(calls) == {("policy", "train", False): 2, ("policy", "train", True): 2}
    assert all(c["shape"][0] == 2 and c["masked"] == 2 * N_NEW for c in calls)
    assert trainer.intervention_reference.passes == 4  # one per policy pass, each on its own rows


# --- gradient checkpointing, monitoring -----------------------------------------------------------------


def _losses(trainer):
    return torch.tensor([h["loss"] for h in trainer.state.log_history if "loss" in h])


@pytest.mark.parametrize("trainer_kind", ["dpo", "grpo"])
def test_checkpointing_modes_match_no_checkpointing(
    make_model, tokenizer, prefs, prompts, tmp_path, trainer_kind
):
    spec = {"operator": "project_out", "direction": _direction(k=2), "layers": "all"}
    spec["phases"] = ["train", "reference"] + (["generate"] if trainer_kind == "grpo" else [])

    def run(**kw):
        if trainer_kind == "dpo":
            trainer = dpo(make_model, tokenizer, prefs, tmp_path, [spec], **kw)
        else:
            trainer = grpo(make_model, tokenizer, prompts, tmp_path, [spec], peft=True, beta=0.1, **kw)
        trainer.train()
        return trainer

    plain = run()
    for reentrant in (True, False):
        other = run(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        torch.testing.assert_close(_losses(other), _losses(plain), atol=1e-6, rtol=1e-5)
        for (n, p), (_, q) in zip(plain.model.named_parameters(), other.model.named_parameters()):
            torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=n)


def test_dpo_projection_monitor_reads_the_chosen_answers(make_model, tokenizer, prefs, tmp_path):
    direction = _direction()
    spec = {"operator": "project_out", "direction": direction, "layers": "all"}
    monitor = {"directions": [{"name": "d", "direction": direction, "layers": "all"}], "every": 1}
    trainer = dpo(make_model, tokenizer, prefs, tmp_path, [spec], projection_monitor=monitor)
    trainer.train()
    measured = [h for h in trainer.state.log_history if "monitor/d/L1/abs_on" in h]
    assert len(measured) == 3  # steps 0, 1, 2
    assert measured[0]["monitor/d/L1/abs_on"] < 1e-5 < measured[0]["monitor/d/L1/abs_off"]


# --- training changes every trainable parameter, never a direction -------------------------------------

OPERATORS = {
    "ablation": {"operator": "project_out", "layers": "all"},
    "steering": {"operator": "add", "layers": [1], "coefficient": 4.0},
}


def _check_trained(trainer, before, direction, direction_before):
    for name, p in trainer.model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, before[name]), f"{name} did not change"
        else:
            assert torch.equal(p, before[name]), f"frozen {name} changed"
    if any("lora_B" in n for n in before):
        assert any("lora_B" in n and p.requires_grad for n, p in trainer.model.named_parameters())
    assert torch.equal(direction.vectors, direction_before)


def _snapshot(trainer):
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


@pytest.mark.parametrize("peft", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("kind", list(OPERATORS))
def test_dpo_trains_every_parameter_and_no_direction(make_model, tokenizer, prefs, tmp_path, peft, kind):
    direction = _direction(k=2 if kind == "ablation" else 1)
    saved = direction.vectors.clone()
    spec = dict(OPERATORS[kind], direction=direction, phases=["train", "reference"])
    trainer = dpo(make_model, tokenizer, prefs, tmp_path, [spec], peft=peft, max_steps=3)
    before = _snapshot(trainer)
    op_vectors = [op.vectors.clone() for op in trainer.intervention_set.ops]
    trainer.train()
    _check_trained(trainer, before, direction, saved)
    assert all(torch.equal(a, op.vectors) for a, op in zip(op_vectors, trainer.intervention_set.ops))


@pytest.mark.parametrize("peft", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("kind", list(OPERATORS))
def test_grpo_trains_every_parameter_and_no_direction(make_model, tokenizer, prompts, tmp_path, peft, kind):
    direction = _direction(k=2 if kind == "ablation" else 1)
    saved = direction.vectors.clone()
    spec = dict(OPERATORS[kind], direction=direction, phases=["train", "generate"])
    trainer = grpo(
        make_model,
        tokenizer,
        prompts,
        tmp_path,
        [spec],
        peft=peft,
        per_device_train_batch_size=4,
        max_steps=2,
    )
    before = _snapshot(trainer)
    op_vectors = [op.vectors.clone() for op in trainer.intervention_set.ops]
    trainer.train()
    _check_trained(trainer, before, direction, saved)
    assert all(torch.equal(a, op.vectors) for a, op in zip(op_vectors, trainer.intervention_set.ops))


# --- vLLM --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    [
        {"operator": "add", "phases": ["generate"]},
        {"operator": "add", "phases": ["train", "generate"], "coefficient": 4.0},
        {"operator": "project_out", "phases": ["train"], "tokens": "completion"},
        {"operator": "reference_ablate", "phases": ["train"]},
    ],
    ids=["steer-generate", "steer-train", "completion-only", "reference-op"],
)
def test_vllm_with_hook_only_interventions_is_refused_at_config_time(tmp_path, spec):
    spec = dict(spec, direction=_direction())
    with pytest.raises(ValueError, match="use_vllm=True") as err:
        InterventionGRPOConfig(**_common(tmp_path), use_vllm=True, interventions=[spec])
    assert "cannot be baked" in str(err.value) and "use_vllm=False" in str(err.value)


def test_vllm_refuses_bakeable_hooks_on_a_model_that_does_not_hold_them(
    make_model, tokenizer, prompts, tmp_path
):
    spec = {"operator": "project_out", "direction": _direction(), "phases": ["train", "generate"]}
    # bakeable: accepted by the config, refused by the trainer before TRL starts vLLM (not installed here)
    args = InterventionGRPOConfig(
        **_common(tmp_path),
        use_vllm=True,
        num_generations=2,
        per_device_train_batch_size=2,
        interventions=[spec],
    )
    with pytest.raises(ValueError, match="keel bake"):
        InterventionGRPOTrainer(
            model=make_model("qwen2"),
            reward_funcs=varied_reward,
            args=args,
            train_dataset=prompts,
            processing_class=tokenizer,
        )


def test_vllm_accepts_hooks_a_baked_model_already_holds(make_model):
    direction = _direction(k=2)
    baked = bake_ablation(make_model("qwen2"), direction)  # site "stream": every residual-stream writer
    equivalent = equivalent_interventions(direction, phases=("train", "generate"))
    check_vllm_interventions(equivalent, use_vllm=True, model=baked)  # no-ops on the baked weights
    check_vllm_interventions([], use_vllm=True, model=baked)
    reference_only = parse_interventions(
        [{"operator": "project_out", "direction": _direction(), "phases": ["reference"]}]
    )
    check_vllm_interventions(reference_only, use_vllm=True, model=make_model("qwen2"))
    other = parse_interventions(
        [{"operator": "project_out", "direction": _direction(seed=5), "layers": [1], "phases": ["train"]}]
    )
    with pytest.raises(ValueError, match="change the logits of this baked model"):
        check_vllm_interventions(other, use_vllm=True, model=baked)
    # on a stream-baked model the stream never holds the direction: resid_post hooks change nothing either
    resid_post = parse_interventions([{"operator": "project_out", "direction": direction, "layers": "all"}])
    check_vllm_interventions(resid_post, use_vllm=True, model=baked)


def test_continuous_batching_refuses_token_masks_while_sampling(tmp_path):
    spec = {"operator": "add", "direction": _direction(), "phases": ["generate"], "tokens": "completion"}
    with pytest.raises(ValueError, match="continuous batching"):
        InterventionGRPOConfig(
            **_common(tmp_path), use_transformers_continuous_batching=True, interventions=[spec]
        )
    InterventionGRPOConfig(
        **_common(tmp_path),
        use_transformers_continuous_batching=True,
        interventions=[dict(spec, tokens="all")],
    )
