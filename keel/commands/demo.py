"""``keel demo``: build the synthetic EM organism and compare interventions that prevent EM.

    keel demo --config recipes/demo.yaml --seeds 5 --output_dir runs/demo

``--config`` is the demo's own YAML: demo keys (seeds, conditions, workers, steer_alpha, ...) and organism
keys (world, model, pretrain, pretrain_docs, chat, finetune, eval_samples) mixed freely. The options
below override it; their defaults shown by ``--help`` are the config's values. Thin entry point; the
pipeline lives in :mod:`keel.organism.demo`: per seed, the persona directions (saved as files), then the
conditions x seeds as sweeps through :mod:`keel.sweep` (``--executor``), the report through
:mod:`keel.evaluation.compare`. Rerunning into the same ``--output_dir`` resumes (finished runs are kept).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from trl import TrlParser

from keel.organism.demo import (
    ALL_CONDITIONS,
    CONDITIONS,
    DEFENCES,
    DIAGNOSTICS,
    NOISE_SOURCES,
    DemoConfig,
    DemoRunError,
    run_demo,
)
from keel.sweep import EXECUTORS, SweepError

from . import organism_cli

PROG = "keel demo"
DESCRIPTION = (
    "Synthetic EM organism: pretrain (cached), extract and validate persona directions, fine-tune under "
    "each condition with InterventionSFTTrainer (a sweep of conditions x seeds, resumable), report EM with "
    "bootstrap CIs and keel compare's statistics. The options override the --config YAML; the defaults "
    "shown are its values."
)


@dataclass
class DemoArguments:
    """Command-line overrides of the demo config (``--config``)."""

    seeds: int | None = field(
        default=None,
        metadata={"help": "Number of pretraining seeds: runs seeds 0..N-1 (None: the config's seeds list)."},
    )
    workers: int = field(default=DemoConfig.workers, metadata={"help": "Worker processes (one thread each)."})
    conditions: list[str] = field(
        default_factory=lambda: list(CONDITIONS),
        metadata={
            "help": "Subset of: "
            + " ".join(CONDITIONS)
            + "; opt-in defences (regularisers, data baselines, steering sweep): "
            + " ".join(DEFENCES)
            + "; opt-in diagnostics (CAFT PCs resampled on half the layers, or other operators on the second half): "
            + " ".join(DIAGNOSTICS),
            "choices": ALL_CONDITIONS,
            "metavar": "CONDITION",
        },
    )
    output_dir: str = field(
        default=DemoConfig.output_dir, metadata={"help": "Folder for summary.json, report.md, plot.png."}
    )
    cache_dir: str = field(default=DemoConfig.cache_dir, metadata={"help": "Organism build cache."})
    wandb: bool = field(
        default=DemoConfig.wandb, metadata={"help": "Write W&B offline runs (--no_wandb: none)."}
    )
    progress: bool = field(
        default=DemoConfig.progress, metadata={"help": "Show progress bars (--no_progress: none)."}
    )
    rebuild: bool = field(
        default=DemoConfig.rebuild,
        metadata={"help": "Train the organisms from scratch instead of loading keel's shipped builds."},
    )
    reemergence: str = field(
        default=DemoConfig.reemergence,
        metadata={
            "help": "Measure every condition again after a fine-tune long_factor (3) times as long: auto "
            "(with five seeds or more), on, off.",
            "choices": ("auto", "on", "off"),
        },
    )
    noise_runs: int = field(
        default=DemoConfig.noise_runs,
        metadata={
            "help": "Fine-tune none again this many times per seed with other row orders, so the per-seed "
            "control check tells a control's effect from training noise (0: off; else >= 2)."
        },
    )
    noise_source: str = field(
        default=DemoConfig.noise_source,
        metadata={
            "help": "What the training-noise runs change: order (the training rows' order) or seed (row "
            "order and the LoRA adapters' initialisation).",
            "choices": NOISE_SOURCES,
        },
    )
    executor: str | None = field(
        default=None,
        metadata={
            "help": "Sweep executor of the stages: sequential (in this process), pool (--workers local "
            "processes) or submitit (a Slurm job array). Default: pool, or sequential with --workers 1.",
            "choices": EXECUTORS,
        },
    )


OVERRIDES = (
    "workers",
    "conditions",
    "output_dir",
    "cache_dir",
    "wandb",
    "progress",
    "rebuild",
    "reemergence",
    "noise_runs",
    "noise_source",
)


CONFIG_HELP = (
    "demo keys (seeds, conditions, workers, steer_alpha, ...) and/or organism keys (world, model, pretrain, "
    "pretrain_docs, chat, finetune, eval_samples)"
)


def make_parser(config: DemoConfig | None = None) -> TrlParser:
    """The option parser; with ``config``, each option's default is that config's value."""
    return organism_cli.make_parser(DemoArguments, PROG, DESCRIPTION, config, OVERRIDES, CONFIG_HELP)


def load_config(path: str | None) -> DemoConfig:
    """The demo config of a YAML file: organism keys at the top level go under ``organism``."""
    return organism_cli.load_config(DemoConfig, path, PROG)


def resolve(argv: list[str] | None) -> DemoConfig:
    """The config ``--config`` names (or the defaults), with the command-line options applied."""
    return parse(argv)[0]


def parse(argv: list[str] | None) -> tuple[DemoConfig, DemoArguments]:
    """(the demo config with the options applied, the options as parsed)."""
    return organism_cli.parse(argv, DemoConfig, DemoArguments, PROG, DESCRIPTION, OVERRIDES, CONFIG_HELP)


def summary_warnings(summary: dict) -> list[str]:
    """What the console must not let pass: seeds where EM did not reproduce (or only by the draw, or from
    incoherent answers), and random controls that moved EM on single seeds (saying whether none's
    training-noise band was part of the check)."""
    out = []
    failed = summary["em_reproduced"]["not_reproduced"]
    if failed:
        out.append(
            f"EM did not reproduce on seed(s) {failed} (none's EM below "
            f"{summary['em_reproduced']['threshold']:g}); report.md gives those seeds apart."
        )
    fragile = summary["em_reproduced"].get("fragile", {})
    if fragile:
        out.append(
            f"EM reproduced only by the draw on seed(s) {[int(s) for s in fragile]} (a rerun of none fell "
            f"below {summary['em_reproduced']['threshold']:g}); report.md lists the reruns."
        )
    incoherent = summary["em_reproduced"].get("incoherent", {})
    if incoherent:
        out.append(
            f"none answered incoherently above {summary['em_reproduced']['incoherent_max']:g} on seed(s) "
            f"{[int(s) for s in incoherent]}; report.md gives the rates."
        )
    checks = [("", summary["controls_per_seed"], "Random controls, seed by seed")]
    if "long" in summary:
        checks.append(
            (" after the long fine-tune", summary["long"]["controls_per_seed"], "Does EM come back?")
        )
    for when, check_of, section in checks:
        moved = {c: check["moved_on"] for c, check in check_of.items() if check["moved_on"]}
        if not moved:
            continue
        banded = all(row["noise_band"] for check in check_of.values() for row in check["seeds"])
        how = (
            "past the paired interval and none's training-noise band"
            if banded
            else "paired interval only; --noise_runs K adds none's training-noise band"
        )
        out.append(
            f"random control(s) moved EM on single seeds{when} ({moved}; {how}); report.md, '{section}'."
        )
    return out


def main(argv: list[str] | None = None) -> int:
    cfg, args = parse(argv)
    try:
        summary = run_demo(cfg, executor=args.executor)
    except (DemoRunError, SweepError) as err:
        print(f"{PROG}: {err}", file=sys.stderr)
        return 1
    print(open(f"{cfg.output_dir}/report.md").read())
    print(f"Wrote {cfg.output_dir}/summary.json, report.md, plot.png in {summary['wall_seconds']:.0f} s.")
    for warning in summary_warnings(summary):
        print(f"{PROG}: warning: {warning}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
