"""``keel --help`` and ``keel <verb> --help`` for every command, through the dispatcher."""

import pytest

from keel.cli import COMMANDS, main

OPTIONS = {
    "train": ["--output_dir", "--learning_rate"],
    "eval": ["--output_dir", "--questions", "--judge"],
    "extract": ["judged", "finetune-diff", "inspect"],
    "demo": ["--output_dir", "--seeds", "--conditions", "--config"],
    "compare": ["--output_dir", "--baseline"],
    "bake": ["--output_dir", "--direction", "--gguf_out"],
    "sweep": ["--output_dir", "--executor", "--dry_run"],
    "rl": ["--output_dir", "--seeds", "--conditions", "--directions_root", "--config"],
}


def test_keel_help_lists_every_command(capsys):
    assert main(["--help"]) == 0 and main([]) == 0
    out = capsys.readouterr().out
    assert all(f"  {name} " in out for name in COMMANDS)


@pytest.mark.parametrize("verb", sorted(COMMANDS))
def test_verb_help_exits_zero(verb, capsys):
    assert set(OPTIONS) == set(COMMANDS)
    assert main([verb, "--help"]) == 0
    out = capsys.readouterr().out
    assert "usage: keel" in out and all(option in out for option in OPTIONS[verb])


@pytest.mark.parametrize("method", ["contrastive", "judged", "finetune-diff", "sae", "random", "inspect"])
def test_extract_method_help(method, capsys):
    assert main(["extract", method, "--help"]) == 0
    out = capsys.readouterr().out
    assert f"usage: keel extract {method}" in out and "--output_dir" in out and "--config" in out


def test_errors_are_exit_statuses(capsys):
    assert main(["nope"]) == 2
    assert main(["extract", "nope"]) == 2
    assert main(["extract", "judged", "--model", "tiny:qwen2"]) == 2  # argparse: required options missing
    assert "required" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="keel demo: .*seeds must list"):  # a message exit propagates
        main(["demo", "--seeds", "0"])
