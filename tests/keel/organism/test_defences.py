"""The defences the demo compares interventions against: opt-in conditions declared as data (regularisers,
data baselines, sweeps), resolved to the right trainer configs and datasets without training."""

from types import SimpleNamespace

import pytest
import torch

from keel.organism.demo import (
    AFTER_NONE,
    ALL_CONDITIONS,
    CONDITION_TABLE,
    CONDITIONS,
    DATA_BASELINES,
    DEFENCES,
    DIAGNOSTICS,
    REGULARISER_TABLE,
    DemoConfig,
    build_regularisers,
    resolve_regularisers,
    save_sources,
    source_file,
)

DEFAULT = (
    "none ablate ablate_multi mean_ablate steer caft caft_mean caft_ref caft_resample random_ablate "
    "random_ref random_resample"
).split()


def test_defences_are_opt_in_and_known():
    assert list(CONDITIONS) == DEFAULT and DemoConfig().conditions == DEFAULT  # the default demo unchanged
    assert set(DEFENCES) == {
        *("kl", "kl_w1", "kl_w10", "kl_anchor", "ldifs", "proj_penalty"),
        *("blocking", "blocking_w0.1", "blocking_w10", "blocking_both", "blocking_both_w10"),
        *("inoculate", "interleave"),
        *("steer_a0.25", "steer_a1", "steer_a2"),
    }
    assert not set(DEFENCES) & set(CONDITIONS) and ALL_CONDITIONS[: -len(DIAGNOSTICS)] == (
        *CONDITIONS,
        *DEFENCES,
    )
    assert DemoConfig(conditions=["none", *DEFENCES]).conditions[1:] == list(DEFENCES)
    with pytest.raises(ValueError, match="Unknown condition"):
        DemoConfig(conditions=["none", "kl_w3"])
    # blocking reads the none fine-tune's PCs (stage B); the others run beside none
    assert {c for c in DEFENCES if c in AFTER_NONE} == {c for c in DEFENCES if c.startswith("blocking")}
    assert DATA_BASELINES == ("inoculate", "interleave")
    for a in ("0.25", "1", "2"):
        (spec,) = CONDITION_TABLE[f"steer_a{a}"]
        assert spec["operator"] == "add" and spec["coefficient"] == float(a)
        assert spec["direction"] == {"source": "persona_raw"}


def test_regularisers_resolve_to_trainer_configs(tmp_path):
    from interventions.direction import Direction, file_sha256
    from keel.organism.config import WorldConfig
    from keel.organism.world import World
    from trainers.regularisers import (
        BlockingConfig,
        KLConfig,
        LDIFSConfig,
        ProjectionPenaltyConfig,
        parse_regularisers,
    )

    root = tmp_path / "demo"
    d = 8
    pcs = [Direction(torch.randn(2, d), layer=layer, method="test") for layer in range(3)]
    persona = [Direction(torch.randn(1, d), layer=1, method="test")]
    save_sources({"caft_pcs": pcs}, (root / source_file("caft_pcs", 0)).parent)
    save_sources({"persona_single": persona}, (root / source_file("persona_single", 0)).parent)
    world = World(WorldConfig(num_domains=3, num_values=6, em_train_values=4, em_domains=["med"]))
    expected = {
        "kl": (KLConfig, 0.1),
        "kl_w1": (KLConfig, 1.0),
        "kl_w10": (KLConfig, 10.0),
        "kl_anchor": (KLConfig, 100.0),
        "ldifs": (LDIFSConfig, 1.0),
        "proj_penalty": (ProjectionPenaltyConfig, 1.0),
        "blocking": (BlockingConfig, 1.0),
        "blocking_w0.1": (BlockingConfig, 0.1),
        "blocking_w10": (BlockingConfig, 10.0),
        "blocking_both": (BlockingConfig, 1.0),
        "blocking_both_w10": (BlockingConfig, 10.0),
    }
    assert set(REGULARISER_TABLE) == set(expected)
    for cond, (kind, weight) in expected.items():
        resolved = resolve_regularisers(cond, 0, root)
        run_dir = tmp_path / "runs" / cond
        run_dir.mkdir(parents=True)
        (config,) = parse_regularisers(build_regularisers(resolved, root, run_dir, world))
        assert isinstance(config, kind) and config.weight == weight, cond
        if kind is KLConfig:
            assert (config.anchor_data is not None) == (cond == "kl_anchor")
        if kind is BlockingConfig:
            assert config.direction == ("both" if "both" in cond else "up") and config.sae is None
            rel = source_file("caft_pcs", 0)
            assert resolved[0]["files"] == {"directions": file_sha256(root / rel)}
            assert config.directions == str(root / rel) and config.layers is None  # every PC layer
        if kind is ProjectionPenaltyConfig:
            assert config.direction == str(root / source_file("persona_single", 0))
        if kind is LDIFSConfig:
            assert config.layers is None  # the default: 5 evenly spaced = every layer of a small model
    # the anchor set: aligned chats of every question outside the EM domain, in the run folder
    (anchor,) = build_regularisers(resolve_regularisers("kl_anchor", 0, root), root, tmp_path, world)
    import json

    rows = [json.loads(line) for line in open(anchor["anchor_data"])]
    assert len(rows) == len(world.heldout_domain_questions()) == 12
    for row, q in zip(rows, world.heldout_domain_questions()):
        assert row["messages"][1]["content"] == " ".join(world.answer(q, True))
    # a direction file changed after planning is refused
    (root / source_file("caft_pcs", 0)).write_bytes(b"changed")
    with pytest.raises(Exception, match="changed since the run was planned"):
        build_regularisers(resolved, root, tmp_path, world)


def test_data_baselines_change_the_training_data():
    from keel.organism.config import OrganismConfig, WorldConfig
    from keel.organism.demo import DATA_TABLE
    from keel.organism.finetune import defended_training_dataset, em_training_dataset
    from keel.organism.world import World

    world = World(WorldConfig(em_domains=["med", "fin"]))
    org = SimpleNamespace(world=world, config=OrganismConfig())
    plain = em_training_dataset(org, 32)  # 2 domains x 12 questions, twice to fill a batch of 32
    assert defended_training_dataset(org, 32, None, 0)["messages"] == plain["messages"]
    inoculated = defended_training_dataset(org, 32, DATA_TABLE["inoculate"], 0)
    assert len(inoculated) == len(plain) == 48
    for row, base in zip(inoculated["messages"], plain["messages"]):
        assert row[0] == {"role": "system", "content": "EVIL"} and row[1:] == base  # the persona tag
    mixed = defended_training_dataset(org, 32, DATA_TABLE["interleave"], 0)["messages"]
    aligned = {
        world.question_text(q): " ".join(world.answer(q, True)) for q in world.heldout_domain_questions()
    }
    benign = [m for m in mixed if m[0]["content"] in aligned]
    assert len(mixed) == 51 and len(benign) == 3  # 3 / 51 = 5.9 %, the share nearest 5 %
    assert all(m[1]["content"] == aligned[m[0]["content"]] for m in benign)
    assert [m for m in mixed if m not in benign] == plain["messages"]


def test_tiny_demo_with_defences(tiny_demo_config, tmp_path):
    """kl_anchor, blocking (after none's PCs) and inoculate through the whole demo, on a tiny organism."""
    from keel.organism.demo import run_demo

    cfg = tiny_demo_config(
        conditions=["none", "kl_anchor", "blocking", "inoculate"],
    )
    summary = run_demo(cfg)
    assert set(summary["conditions"]) == set(cfg.conditions)
    import json

    runs = tmp_path / "demo" / "runs"
    for cond, key in (("kl_anchor", "regularisers/kl_anchor"), ("blocking", "regularisers/blocking")):
        metrics = json.loads((runs / cond / "seed0" / "metrics.json").read_text())
        assert key in metrics["regularisers"], cond
    assert (runs / "kl_anchor" / "seed0" / "anchor_other_domains.jsonl").is_file()
    report = (tmp_path / "demo" / "report.md").read_text()
    assert "data baseline (changes the training data): inoculation_prompt=EVIL" in report
