"""``keel rl``: emergent misalignment from RL on the synthetic organism, with and without blocking.

    keel rl --config recipes/demo-rl.yaml --seeds 5 --output_dir runs/demo-rl

GRPO on the EM domains' training questions, rewarded 1 when the organism's exact judge labels an answer
misaligned (a reward-hacking analogue), under each condition (interventions in the update, or in the update
and while sampling), then EM on the held-out domains. ``--config`` holds RL keys (seeds, conditions,
directions_root, steps, temperature, ...) and organism keys (world, model, finetune, ...) mixed freely;
the options below override it. Thin entry point; the route lives in :mod:`keel.organism.rl`. Rerunning
into the same ``--output_dir`` resumes (finished runs are kept).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from keel.organism.rl import RL_CONDITIONS, RLConfig, report_markdown, run_rl
from keel.sweep import EXECUTORS, SweepError

from . import organism_cli

PROG = "keel rl"
DESCRIPTION = (
    "EM from RL on the synthetic organism: GRPO rewarded by the exact judge's misaligned label, under each "
    "condition x seed (a resumable sweep), evaluated without interventions. The options override the "
    "--config YAML; the defaults shown are its values."
)


@dataclass
class RLArguments:
    """Command-line overrides of the RL config (``--config``)."""

    seeds: int | None = field(
        default=None,
        metadata={"help": "Number of pretraining seeds: runs seeds 0..N-1 (None: the config's seeds list)."},
    )
    workers: int = field(default=RLConfig.workers, metadata={"help": "Worker processes (one thread each)."})
    conditions: list[str] = field(
        default_factory=lambda: list(RL_CONDITIONS),
        metadata={"help": "Subset of: " + " ".join(RL_CONDITIONS), "choices": tuple(RL_CONDITIONS)},
    )
    directions_root: str = field(
        default=RLConfig.directions_root,
        metadata={
            "help": "A finished keel demo folder on the same organism: its CAFT PCs are the directions."
        },
    )
    output_dir: str = field(
        default=RLConfig.output_dir, metadata={"help": "Folder for runs/, summary, report."}
    )
    cache_dir: str = field(default=RLConfig.cache_dir, metadata={"help": "Organism build cache."})
    progress: bool = field(
        default=RLConfig.progress, metadata={"help": "Progress bars (--no_progress: none)."}
    )
    executor: str | None = field(
        default=None,
        metadata={
            "help": "Sweep executor: sequential, pool (--workers processes) or submitit. Default: pool, or "
            "sequential with --workers 1.",
            "choices": EXECUTORS,
        },
    )


OVERRIDES = ("workers", "conditions", "directions_root", "output_dir", "cache_dir", "progress")


CONFIG_HELP = "RL keys (seeds, conditions, steps, temperature, ...) and/or organism keys (world, model, ...)"


def parse(argv: list[str] | None) -> tuple[RLConfig, RLArguments]:
    """(the RL config with the options applied, the options as parsed)."""
    return organism_cli.parse(argv, RLConfig, RLArguments, PROG, DESCRIPTION, OVERRIDES, CONFIG_HELP)


def main(argv: list[str] | None = None) -> int:
    cfg, args = parse(argv)
    try:
        summary = run_rl(cfg, executor=args.executor)
    except (SweepError, FileNotFoundError, ValueError) as err:
        print(f"{PROG}: {err}", file=sys.stderr)
        return 1
    print(report_markdown(summary))
    if summary.get("failed"):
        print(f"{PROG}: {len(summary['failed'])} run(s) failed: {summary['failed']}", file=sys.stderr)
        return 1
    return 0
