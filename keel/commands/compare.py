"""``keel compare``: compare conditions over seeds from a sweep's run folders (or a W&B group).

    keel compare runs/<sweep> [--baseline none] [--controls random_ablate random_ref] \\
        [--metrics heldout_misaligned in_domain_train_misaligned] [--output_dir runs/<sweep>/compare]
    keel compare --wandb_group ENTITY/PROJECT/GROUP --output_dir runs/<group>/compare

Reads ``<condition>/seed<N>/status.json`` and ``metrics.json`` (and ``sweep.yaml`` at the sweep root for
baseline, controls, metrics, lower_is_better, keep; flags override it) and writes ``compare.md``,
``compare.csv``, ``compare.json`` and ``compare.png``: per-seed values, means with 95 % Student-t intervals
over seeds, ratios and paired differences against the baseline, flags on controls that moved a metric, and
every failed or missing run. The library is :mod:`keel.evaluation.compare`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from keel.evaluation.compare import (
    CompareError,
    compare_runs,
    load_runs,
    load_wandb_runs,
    log_wandb,
    to_markdown,
    write_outputs,
)

from .common import parse, write_config_record


@dataclass
class CompareArguments:
    runs_dir: str | None = field(
        default=None,
        metadata={"help": "The sweep folder, <runs_dir>/<condition>/seed<N>/ (also: keel compare DIR)."},
    )
    output_dir: str | None = field(
        default=None, metadata={"help": "Output folder (default: <runs_dir>/compare)."}
    )
    baseline: str | None = field(
        default=None,
        metadata={"help": "Condition to compare against (default: sweep file, else 'none' if present)."},
    )
    controls: list[str] | None = field(
        default=None,
        metadata={
            "help": "Control conditions, flagged when they move a metric (default: sweep file, else random*)."
        },
    )
    metrics: list[str] | None = field(
        default=None,
        metadata={
            "help": "Metric names or patterns, dotted for nested ones (default: sweep file, else all)."
        },
    )
    lower_is_better: list[str] | None = field(
        default=None, metadata={"help": "Metric patterns where lower is better (ratio: cut = baseline / it)."}
    )
    keep: list[str] | None = field(
        default=None, metadata={"help": "Metric patterns to keep (ratio: kept = it / baseline)."}
    )
    wandb_group: str | None = field(
        default=None,
        metadata={"help": "Read runs from W&B instead: ENTITY/PROJECT/GROUP (needs W&B online and a key)."},
    )
    report_to: str = field(
        default="none", metadata={"help": "none, or wandb (a W&B Table of the comparison)."}
    )
    wandb_project: str = field(default="keel", metadata={"help": "W&B project for --report_to wandb."})
    run_name: str | None = field(default=None, metadata={"help": "W&B run name (default: compare-<sweep>)."})
    quiet: bool = field(default=False, metadata={"help": "Do not print the markdown report."})


def _fail(message: str) -> None:
    raise SystemExit(f"keel compare: {message}")


def _argv(argv: list[str] | None) -> list[str] | None:
    """``keel compare DIR ...`` means ``keel compare --runs_dir DIR ...``."""
    if argv and not argv[0].startswith("-"):
        return ["--runs_dir", argv[0], *argv[1:]]
    return argv


def run(args: CompareArguments):
    """Load, compare, write the outputs; returns the :class:`~keel.evaluation.compare.Comparison`."""
    if args.report_to not in ("none", "wandb"):
        _fail(f"unknown --report_to {args.report_to!r}; use none or wandb.")
    if (args.runs_dir is None) == (args.wandb_group is None):
        _fail("give a runs folder (keel compare DIR) or --wandb_group ENTITY/PROJECT/GROUP, not both.")
    try:
        if args.wandb_group:
            runs = load_wandb_runs(args.wandb_group)
            name = args.wandb_group.rsplit("/", 1)[-1]
            out = Path(args.output_dir or Path("runs") / name / "compare")
        else:
            runs = load_runs(args.runs_dir, skip={"compare", Path(args.output_dir or "compare").name})
            name = Path(args.runs_dir).resolve().name
            out = Path(args.output_dir or Path(args.runs_dir) / "compare")
        comp = compare_runs(
            runs,
            baseline=args.baseline,
            controls=args.controls,
            metrics=args.metrics,
            lower_is_better=args.lower_is_better,
            keep=args.keep,
            name=name,
        )
    except CompareError as err:
        _fail(str(err))
    paths = write_outputs(comp, out)
    write_config_record(out, {"compare": asdict(args)})
    if args.report_to == "wandb":
        log_wandb(comp, args.wandb_project, args.run_name or f"compare-{name}", out, group=name)
    if not args.quiet:
        print(to_markdown(comp))
    print(f"Wrote {', '.join(str(p) for p in paths.values())}.")
    if comp.flagged():
        print(f"{len(comp.flagged())} control flag(s): see 'Control flags' in {paths['markdown']}.")
    return comp


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``keel compare``; returns the exit status."""
    (args,) = parse((CompareArguments,), _argv(argv), "keel compare", __doc__)
    run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
