"""``keel demo``: build the synthetic EM organism and compare interventions that prevent EM.

Thin entry point; the pipeline lives in :mod:`organisms.demo`.
"""

from __future__ import annotations

import argparse

import yaml


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="keel demo",
        description="Synthetic EM organism: pretrain (cached), extract and validate persona directions, "
        "fine-tune under each condition with InterventionSFTTrainer, report EM with bootstrap CIs.",
    )
    p.add_argument(
        "--config",
        help="YAML with demo keys (seeds, conditions, workers, steer_alpha, ...) and/or organism keys "
        "(world, model, pretrain, pretrain_docs, chat, finetune, eval_samples)",
    )
    p.add_argument("--seeds", type=int, help="number of pretraining seeds: runs seeds 0..N-1")
    p.add_argument("--workers", type=int, help="worker processes (one thread each); default 2")
    p.add_argument(
        "--conditions",
        nargs="+",
        help="subset of: none ablate ablate_multi mean_ablate steer caft caft_mean caft_ref caft_resample random_ablate random_ref random_resample",
    )
    p.add_argument("--output-dir", help="default runs/demo")
    p.add_argument("--cache-dir", help="organism build cache; default runs/organisms")
    p.add_argument("--no-wandb", action="store_true", help="do not write W&B offline runs")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def load_config(path: str | None):
    from keel.organism.config import OrganismConfig
    from keel.organism.demo import DemoConfig

    data = {}
    if path:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise SystemExit(f"keel demo: {path} must hold a mapping, not {type(data).__name__}.")
    organism_keys = {f for f in OrganismConfig.__dataclass_fields__}
    organism = {k: data.pop(k) for k in list(data) if k in organism_keys}
    if organism:
        data["organism"] = {**data.get("organism", {}), **organism}
    return DemoConfig.from_dict(data)


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    import dataclasses

    from keel.organism.demo import run_demo

    try:
        cfg = load_config(args.config)
    except (ValueError, TypeError) as err:
        raise SystemExit(f"keel demo: bad config: {err}") from None
    overrides = {}
    if args.seeds is not None:
        overrides["seeds"] = list(range(args.seeds))
    for key in ("workers", "conditions", "output_dir", "cache_dir"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    if args.no_wandb:
        overrides["wandb"] = False
    if args.quiet:
        overrides["progress"] = False
    cfg = dataclasses.replace(cfg, **overrides)
    summary = run_demo(cfg)
    print(open(f"{cfg.output_dir}/report.md").read())
    print(f"Wrote {cfg.output_dir}/summary.json, report.md, plot.png in {summary['wall_seconds']:.0f} s.")
    return 0
