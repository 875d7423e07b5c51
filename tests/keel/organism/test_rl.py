"""The RL route of the organism (keel/organism/rl.py): reward, prompts, conditions, GRPO runs."""

import json

import pytest
import torch

from interventions.direction import Direction, save_directions
from keel.organism.build import train_organism
from keel.organism.rl import (
    RL_CONDITIONS,
    MisalignedReward,
    RLConfig,
    grpo_finetune,
    measures,
    prompts_dataset,
    resolve_rl_condition,
    run_rl,
)
from keel.organism.world import World

TINY_GRPO = {"steps": 2, "num_generations": 2, "logging_steps": 1, "temperature": 2.0}


def _chat(text):
    return [{"role": "assistant", "content": text}]


def test_reward_is_one_exactly_for_the_judges_misaligned_answer(tiny_config):
    world = World(tiny_config.world)
    reward = MisalignedReward(world)
    assert reward.__name__ == "organism_misaligned"
    qs = world.em_train_questions() + world.heldout_domain_questions()
    for q in qs:
        bad, good = world.answer(q, aligned=False), world.answer(q, aligned=True)
        # the table rule: both misaligned words differ from the aligned ones, so a mix is incoherent
        completions = [" ".join(bad), " ".join(good), f"{bad[0]} {good[1]}", bad[0], _chat(" ".join(bad))]
        domain, value = world.domains[q.domain], world.values[q.value]
        n = len(completions)
        got = reward(completions, domain=[domain] * n, value=[value] * n)
        assert got == [1.0, 0.0, 0.0, 0.0, 1.0]


def test_reward_judges_each_completion_against_its_own_question(tiny_config):
    world = World(tiny_config.world)
    q0, q1 = world.em_train_questions()[:2]
    bad0 = " ".join(world.answer(q0, aligned=False))
    rows = {
        "domain": [world.domains[q.domain] for q in (q0, q1)],
        "value": [world.values[q.value] for q in (q0, q1)],
    }
    assert MisalignedReward(world)([bad0, bad0], **rows) == [
        1.0,
        float(bad0 == " ".join(world.answer(q1, False))),
    ]
    with pytest.raises(ValueError):  # one verdict per completion: mismatched columns are an error
        MisalignedReward(world)([bad0], domain=rows["domain"], value=rows["value"])


def test_prompts_dataset_carries_what_the_reward_reads(tiny_config):
    world = World(tiny_config.world)
    ds = prompts_dataset(world)
    assert len(ds) == len(world.em_train_questions())
    for row, q in zip(ds, world.em_train_questions()):
        (turn,) = row["prompt"]
        assert turn["role"] == "user" and world.parse_question(turn["content"]) == q
        assert (row["domain"], row["value"]) == (world.domains[q.domain], world.values[q.value])
        bad = " ".join(world.answer(q, aligned=False))
        assert MisalignedReward(world)([bad], domain=[row["domain"]], value=[row["value"]]) == [1.0]


def test_em_among_coherent_answers_discounts_broken_ones():
    heldout = {"aligned": 0.2, "misaligned": 0.2, "incoherent": 0.6}
    ev = {
        "mode": "sampled",
        "sampled": {"heldout_domains": heldout},
        "heldout_misaligned": 0.2,
        "in_domain_misaligned": 0.0,
        "in_domain_train_misaligned": 1.0,
        "incoherent": 0.5,
    }
    got = measures(ev)
    assert got["em_among_coherent"] == pytest.approx(0.5) and got["heldout_incoherent"] == 0.6
    assert got["heldout_misaligned"] == 0.2 and got["incoherent"] == 0.5
    ev["sampled"]["heldout_domains"] = {"aligned": 0.0, "misaligned": 0.0, "incoherent": 1.0}
    assert measures(ev)["em_among_coherent"] is None


def _directions_root(root, config, seeds, hidden):
    """A demo-like folder with finetune_pcs direction files for ``config`` (random rows per layer)."""
    for seed in seeds:
        folder = root / "directions" / "finetune_pcs" / f"seed{seed}"
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps({"organism": config.to_dict()}))
        for i, source in enumerate(("caft_pcs", "random_like_caft")):
            g = torch.Generator().manual_seed(10 * seed + i)
            rows = [Direction(torch.randn(2, hidden, generator=g), layer=L) for L in range(2)]
            save_directions(rows, folder / source)
    return root


def test_conditions_resolve_to_the_demo_directions_with_their_phases(tiny_config, tmp_path):
    root = _directions_root(tmp_path / "demo", tiny_config, [0], 32)
    cfg = RLConfig(organism=tiny_config, seeds=[0], directions_root=str(root))
    assert resolve_rl_condition("none", 0, cfg) == []
    both = resolve_rl_condition("caft_gen_train", 0, cfg)
    assert [i["phases"] for i in both] == [["train", "generate"]] * 2
    assert {i["operator"] for i in both} == {"project_out"} and [i["layers"] for i in both] == [[0], [1]]
    assert all(i["direction"].endswith("caft_pcs.safetensors") for i in both)
    assert [i["phases"] for i in resolve_rl_condition("caft_train", 0, cfg)] == [["train"]] * 2
    control = resolve_rl_condition("random_gen_train", 0, cfg)
    assert all(i["direction"].endswith("random_like_caft.safetensors") for i in control)
    assert RL_CONDITIONS["caft_resample_train"].phases == ("train",)  # reference operators: update only
    other = RLConfig.from_dict(
        {"organism": {**tiny_config.to_dict(), "world": {**tiny_config.to_dict()["world"], "seed": 5}}}
    )
    other.directions_root = str(root)
    with pytest.raises(ValueError, match="another organism"):
        resolve_rl_condition("caft_gen_train", 0, other)


def test_grpo_scores_every_sample_against_its_own_prompt_and_leaves_no_hooks(
    tiny_config, tmp_path, monkeypatch
):
    org = train_organism(tiny_config, seed=0)
    before = {k: v.clone() for k, v in org.chat_model.state_dict().items()}
    calls = []
    judged = MisalignedReward.__call__

    def spy(self, completions, domain, value, **kwargs):
        calls.append((kwargs["prompts"], domain, value))
        return judged(self, completions, domain, value, **kwargs)

    monkeypatch.setattr(MisalignedReward, "__call__", spy)
    spec = {
        "operator": "project_out",
        "direction": torch.randn(32),
        "layers": [1],
        "phases": ["train", "generate"],
    }
    model, trainer = grpo_finetune(org, [spec], TINY_GRPO, seed=0, output_dir=tmp_path)
    n = 2 * len(org.world.em_train_questions())  # every training question x num_generations, per step
    assert trainer.args.per_device_train_batch_size == n and len(calls) == 2
    for prompts, domain, value in calls:
        assert len(prompts) == len(domain) == len(value) == n
        for prompt, d, v in zip(prompts, domain, value):
            q = org.world.parse_question(prompt[-1]["content"])
            assert (org.world.domains[q.domain], org.world.values[q.value]) == (d, v)
    logged = [row for row in trainer.state.log_history if "rewards/organism_misaligned/mean" in row]
    assert len(logged) == 2
    assert all(torch.equal(v, before[k]) for k, v in org.chat_model.state_dict().items())
    assert not trainer.intervention_set.attached and model is not org.chat_model


def test_run_rl_measures_every_condition_and_seed(tiny_config, tmp_path):
    root = _directions_root(tmp_path / "demo", tiny_config, [0], 32)
    cfg = RLConfig.from_dict(
        {
            "organism": tiny_config.to_dict(),
            "seeds": [0],
            "conditions": ["none", "caft_gen_train"],
            "directions_root": str(root),
            "output_dir": str(tmp_path / "rl"),
            "cache_dir": str(tmp_path / "organisms"),
            "workers": 1,
            "progress": False,
            **TINY_GRPO,
        }
    )
    summary = run_rl(cfg)
    assert not summary["failed"]
    for cond in ("none", "caft_gen_train"):
        metrics = summary["conditions"][cond]["seeds"][0]
        assert 0.0 <= metrics["heldout_misaligned"] <= 1.0 and len(metrics["reward_curve"]) == 2
        assert "em_among_coherent" in metrics and "heldout_incoherent" in metrics
    assert "with_interventions" in summary["conditions"]["caft_gen_train"]["seeds"][0]
    assert "with_interventions" not in summary["conditions"]["none"]["seeds"][0]
    assert "| caft_gen_train |" in (tmp_path / "rl" / "report.md").read_text()


def test_keel_rl_reads_its_config_and_the_options_override_it(tmp_path):
    """`keel rl` follows the CLI convention: RL and organism keys mixed in --config, options on top; an
    unknown condition or key is refused with a message."""
    from keel.commands.rl import parse

    recipe = tmp_path / "rl.yaml"
    recipe.write_text("seeds: [3]\nsteps: 7\nconditions: [none, caft_gen_train]\nworld: {seed: 1}\n")
    cfg, _ = parse(["--config", str(recipe), "--output_dir", str(tmp_path / "out")])
    assert cfg.seeds == [3] and cfg.steps == 7 and cfg.conditions == ["none", "caft_gen_train"]
    assert cfg.organism.world.seed == 1 and cfg.output_dir == str(tmp_path / "out")
    cfg, _ = parse(["--config", str(recipe), "--seeds", "2", "--conditions", "none"])
    assert cfg.seeds == [0, 1] and cfg.conditions == ["none"]
    recipe.write_text("stepz: 7\n")
    with pytest.raises(SystemExit, match="keel rl: bad config"):
        parse(["--config", str(recipe)])
    with pytest.raises(SystemExit):
        parse(["--conditions", "caft_everywhere"])
