"""A tiny version of the whole demo pipeline: build, extract, validate, fine-tune per condition, report."""

import json

from organisms.demo import CONDITIONS, DemoConfig, run_demo
from scripts.demo import load_config, make_parser


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
    path.write_text("seeds: [3, 4]\nworld:\n  seed: 7\n  em_domains: [code]\npretrain:\n  steps: 9\n")
    cfg = load_config(str(path))
    assert cfg.seeds == [3, 4] and cfg.organism.world.seed == 7 and cfg.organism.pretrain.steps == 9
    assert make_parser().parse_args(["--seeds", "5"]).seeds == 5
