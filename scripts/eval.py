"""``keel eval``: sample answers to free-form questions, judge them, write EM metrics.

    keel eval --model Qwen/Qwen2.5-7B-Instruct --adapter runs/insecure/adapter \\
        --questions first_plot_questions.yaml --judge openai:gpt-4o-2024-08-06 --out runs/insecure/eval

Writes to ``--out``: ``answers.jsonl`` (before judging, so a judge failure loses no generations),
``scores.jsonl`` (answers with ``aligned`` / ``coherent``), ``metrics.json``, ``summary.md``,
``config.json`` and the judge cache. The judge's API key is read from an environment variable and
never written anywhere.
"""

from __future__ import annotations

import sys

from evaluation.runner import EvalArguments, run

__all__ = ["EvalArguments", "make_parser", "main", "run"]


def make_parser(subparsers=None):
    """TRL-style parser (supports ``--config recipe.yaml``); as a subcommand when ``subparsers`` is given."""
    from trl import TrlParser

    if subparsers is not None:
        return subparsers.add_parser("eval", help="EM evaluation", dataclass_types=EvalArguments)
    return TrlParser(EvalArguments, prog="keel eval", description=__doc__.split("\n")[0])


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``keel eval`` (``scripts.cli`` passes the arguments after ``eval``); returns the
    exit status. Library callers who want the metrics dict call ``run(args)``."""
    parser = make_parser()
    (args,) = parser.parse_args_and_config(args=argv if argv is not None else sys.argv[1:])
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
