"""A tiny version of the whole demo pipeline: build, extract, validate, fine-tune per condition, report."""

import dataclasses
import json

import pytest

from keel.commands.demo import load_config, make_parser, resolve
from keel.organism.demo import AFTER_NONE, CONDITIONS, DemoConfig, run_demo


def test_tiny_demo_end_to_end(tiny_config, tmp_path):
    cfg = DemoConfig(
        organism=tiny_config,
        seeds=[0],
        workers=1,
        probe_num=8,
        multi_layers=2,
        output_dir=str(tmp_path / "demo"),
        cache_dir=str(tmp_path / "cache"),
        wandb=False,
        progress=False,
    )
    summary = run_demo(cfg)
    on_disk = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert set(on_disk["conditions"]) == set(CONDITIONS) and "config" in on_disk
    for c in on_disk["conditions"].values():
        for metric in ("in_domain_misaligned", "heldout_misaligned", "incoherent"):
            assert set(c[metric]) == {"mean", "ci_low", "ci_high"}
            assert 0.0 <= c[metric]["ci_low"] <= c[metric]["mean"] <= c[metric]["ci_high"] <= 1.0
        assert [s["seed"] for s in c["seeds"]] == [0]
    assert any("random" in name for name in on_disk["conditions"])
    assert summary["conditions"]["none"] == on_disk["conditions"]["none"]
    assert (tmp_path / "demo" / "plot.png").stat().st_size > 0
    assert "| none |" in (tmp_path / "demo" / "report.md").read_text()


def test_cli_config_splits_demo_and_organism_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "seeds: [3, 4]\nwandb: false\nworkers: 3\nworld:\n  seed: 7\n  em_domains: [code]\npretrain:\n  steps: 9\n"
    )
    cfg = load_config(str(path))
    assert cfg.seeds == [3, 4] and cfg.organism.world.seed == 7 and cfg.organism.pretrain.steps == 9
    assert resolve(["--config", str(path)]) == cfg  # no options: the config as written
    cli = resolve(["--config", str(path), "--seeds", "5", "--wandb", "--no_progress", "--output_dir", "o"])
    assert cli == dataclasses.replace(cfg, seeds=[0, 1, 2, 3, 4], wandb=True, progress=False, output_dir="o")
    assert resolve(["--conditions", "none", "caft", "--no_wandb"]).conditions == ["none", "caft"]
    assert resolve(["--workers", "1"]) == DemoConfig(workers=1)
    for bad in (["--conditions", "ablate"], ["--conditions", "nope"], ["--seeds", "0"], ["--bogus"]):
        with pytest.raises(SystemExit):
            resolve(bad)


def test_caft_mean_ablation_holds_the_chat_models_mean_projection(tiny_config, tmp_path):
    """caft_mean holds each layer's PCs at the chat model's mean projection over the pooled tokens (here
    the prompt tokens), recomputed here from output_hidden_states; caft and its random control ablate to
    zero at the same layers with the same number of rows; caft_ref holds the same rows at the reference's
    per-token values (reference_ablate, pinned in the trainer tests)."""
    import torch

    from keel.organism.build import build_organism
    from keel.organism.data import prompt_ids
    from keel.organism.demo import caft_specs
    from keel.organism.finetune import finetune_with_trainer

    org = build_organism(tiny_config, 0, tmp_path / "cache")
    tuned, _ = finetune_with_trainer(org, [], seed=0, output_dir=str(tmp_path / "ft"))
    specs = caft_specs(org, tuned, DemoConfig(caft_pool="prompt", caft_components=2), seed=0)
    assert {n: [s.layers for s in v] for n, v in specs.items()} == {n: [[0], [1]] for n in AFTER_NONE}
    assert [s.operator for s in specs["caft"] + specs["random_ablate"]] == ["project_out"] * 4
    assert [s.operator for s in specs["caft_ref"] + specs["random_ref"]] == ["reference_ablate"] * 4
    assert [s.operator for s in specs["caft_resample"] + specs["random_resample"]] == ["resample_ablate"] * 4
    for a, b, c in zip(specs["random_ablate"], specs["random_ref"], specs["random_resample"]):
        assert torch.equal(a.direction.vectors, b.direction.vectors)
        assert torch.equal(a.direction.vectors, c.direction.vectors)
    for a, *others in zip(specs["caft"], specs["caft_mean"], specs["caft_ref"], specs["caft_resample"]):
        for b in others:
            assert torch.equal(a.direction.vectors, b.direction.vectors)
    prompts = prompt_ids(org.tokenizer, org.world, org.world.all_questions())
    with torch.no_grad():
        hidden = org.chat_model(input_ids=prompts, output_hidden_states=True).hidden_states
    spec = specs["caft_mean"][0]  # layer 0 (the last layer's hidden state is after the final norm)
    d = spec.direction
    assert spec.operator == "mean_ablate" and d.k == 2 and d.mean is not None
    expected = (hidden[1].double() @ d.vectors.double().T).mean(dim=(0, 1))
    torch.testing.assert_close(d.mean.double(), expected, rtol=1e-4, atol=1e-5)


def test_demo_config_rejects_unknown_caft_options():
    import pytest

    with pytest.raises(ValueError, match="caft_pool"):
        DemoConfig(caft_pool="answers")
    with pytest.raises(ValueError, match="caft_questions"):
        DemoConfig(caft_questions="em_domains")


def test_cli_help_lists_every_condition():
    action = next(a for a in make_parser()._actions if a.dest == "conditions")
    assert action.help.split(": ", 1)[1].split() == list(CONDITIONS)
