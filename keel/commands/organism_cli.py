"""The CLI convention of the organism commands (``keel demo``, ``keel rl``): a ``--config`` YAML that mixes
the command's own keys with organism keys (world, model, finetune, ...), and command-line options that
override it, their ``--help`` defaults being the config's values. ``--seeds N`` means seeds 0..N-1."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from trl import TrlParser

from interventions.serialization import KeelInputError, load_yaml
from keel.organism.config import OrganismConfig

from .common import make_parser as make_trl_parser


def nest_organism_keys(data: dict) -> dict:
    """A config mapping with its top-level organism keys (world, model, finetune, ...) under ``organism``."""
    data = dict(data)
    organism_keys = {f for f in OrganismConfig.__dataclass_fields__}
    organism = {k: data.pop(k) for k in list(data) if k in organism_keys}
    if organism:
        data["organism"] = {**data.get("organism", {}), **organism}
    return data


def load_config(config_cls, path: str | None, prog: str):
    """``config_cls`` from a YAML file (or its defaults without one)."""
    data = (load_yaml(path) or {}) if path else {}
    if not isinstance(data, dict):
        raise SystemExit(f"{prog}: {path} must hold a mapping, not {type(data).__name__}.")
    return config_cls.from_dict(nest_organism_keys(data))


def make_parser(arguments_cls, prog: str, description: str, config, overrides, config_help: str) -> TrlParser:
    """The option parser; with ``config``, each option in ``overrides`` defaults to that config's value."""
    parser = make_trl_parser((arguments_cls,), prog, description)
    parser.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    parser.add_argument("--config", metavar="FILE.yaml", help=config_help)
    if config is not None:
        parser.set_defaults_with_config(**{key: getattr(config, key) for key in overrides})
    return parser


def parse(argv, config_cls, arguments_cls, prog: str, description: str, overrides, config_help: str):
    """(the ``--config`` config with the options applied, the options as parsed); a bad config or option
    exits with a message naming the command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    try:
        config = load_config(config_cls, known.config, prog)
    except (KeelInputError, ValueError, TypeError) as err:
        raise SystemExit(f"{prog}: bad config: {err}") from None
    parser = make_parser(arguments_cls, prog, description, config, overrides, config_help)
    try:  # (the options, the namespace holding --config)
        args, _ = parser.parse_args_into_dataclasses(args=argv)
    except ValueError as err:  # an option HfArgumentParser does not know
        raise SystemExit(f"{prog}: {err}") from None
    values = {key: getattr(args, key) for key in overrides}
    if args.seeds is not None:
        values["seeds"] = list(range(args.seeds))
    try:
        return dataclasses.replace(config, **values), args
    except ValueError as err:
        raise SystemExit(f"{prog}: {err}") from None
