"""The ``keel`` command: dispatches ``keel <command> ...`` to ``keel.commands.<command>.main(argv)``.

Every command takes ``--help``; ``keel --help`` lists them.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": ("keel.commands.train", "SFT with interventions from a YAML recipe (--config FILE)"),
    "eval": ("keel.commands.eval", "EM evaluation: sample answers, judge them, write metrics"),
    "extract": (
        "keel.commands.extract",
        "extract, inspect or randomise directions (keel extract METHOD ...)",
    ),
    "demo": (
        "keel.commands.demo",
        "the synthetic EM organism: build, extract, fine-tune under conditions, compare",
    ),
    "rl": ("keel.commands.rl", "the organism under RL: GRPO rewarded for misaligned answers, with blocking"),
    "compare": ("keel.commands.compare", "compare conditions over seeds: t-intervals, ratios, control flags"),
    "bake": ("keel.commands.bake", "bake a static ablation into weights; steering vectors to/from GGUF"),
    "sweep": ("keel.commands.sweep", "train + evaluate a recipe: conditions x seeds (then keel compare)"),
}


def _usage() -> str:
    lines = ["usage: keel <command> [--config FILE.yaml] [options]", "", "commands:"]
    lines += [f"  {name:<8} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `keel <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit status. argparse's exits (0 after --help, 2 for a usage error)
    become statuses; a command's exit with a message (``SystemExit("keel x: ...")``) propagates."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"keel: unknown command {command!r}.\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    try:
        return int(module.main(rest) or 0)
    except SystemExit as exit_:
        if exit_.code is None or isinstance(exit_.code, int):
            return exit_.code or 0
        raise


if __name__ == "__main__":
    sys.exit(main())
