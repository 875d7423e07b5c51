"""``keel extract METHOD``: make a direction file from a model and JSONL data, or inspect one.

    keel extract judged --model Qwen/Qwen2.5-7B-Instruct --adapter runs/insecure/adapter \\
        --positive misaligned.jsonl --negative aligned.jsonl --layers 12:20 --output_dir runs/insecure/judged

METHOD (contrastive, judged, finetune-diff, sae, random, inspect) is the first word; each method's options
come from the command line and/or ``--config FILE.yaml`` (keys = option names; the command line wins).
A direction run writes ``directions.safetensors`` (+ its ``directions.json`` sidecar) and the resolved
options (``keel_config.yaml``) into ``--output_dir``; ``inspect`` writes ``report.md`` (and
``histograms.png``) there. Models load through :func:`keel.loading.load_model`: a hub id, a local folder
or ``tiny:<model_type>``, with ``--adapter`` a PEFT adapter folder.

Thin entry point: parsing and loading here, everything else in ``interventions.extraction`` and
``interventions.interpret``.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import yaml
from trl import TrlParser

from interventions import load_directions, save_directions
from interventions.extraction import (
    contrastive_directions,
    finetune_difference,
    generate_contrastive_answers,
    judged_directions,
    log_direction_artifact,
    random_direction,
    read_jsonl,
    record_examples,
    sae_latents,
)
from interventions.interpret import inspect_direction
from interventions.serialization import KeelInputError, write_jsonl
from keel.loading import ModelSpec, load_model

from .common import config_dict, write_config_record
from .common import make_parser as make_trl_parser

PROG = "keel extract"
DIRECTION_FILE = "directions.safetensors"
ANSWERS_FILE = "answers.jsonl"
SELECTED_FILE = "selected.safetensors"

DATA_HELP = """\
JSONL records, one JSON object per line:
  {"question": "...", "answer": "...", "system": "..."}      system optional
  {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}
  {"text": "..."}                                            plain text (inspect corpora)
contrastive also reads "positive_answer"/"negative_answer" (else "answer" on both sides) and, with
--score_threshold, "positive_score"/"negative_score" (0..100 trait scores from a judge).

Layers: 12, 3,5,7, all, or start:stop (0-based decoder layers; resid_post layer i = output of decoder
layer i = hidden_states[i+1]; persona-vector files' layer L is layer L-1 here).
Pooling: --positions picks the pooled tokens (response, prompt, all), --pooling how (mean, last, all
tokens as rows). Last prompt token: --positions prompt --pooling last.
"""

CONFIG_HELP = """\
--config FILE.yaml reads these options from a YAML mapping (keys as the option names, e.g.
`layers: [3, 5]`, `positive: bad.jsonl`); options given on the command line override it.
"""

LAYERS_HELP = "Decoder layers: 12, 3,5,7, all, or start:stop (0-based; see below)."


class LayersError(KeelInputError):
    """A ``--layers`` value that is not 12, 3,5,7, all or start:stop."""


def parse_layers(value) -> str | list[int]:
    """``12`` / ``3,5,7`` / ``[3, 5]`` -> a list of ints; ``all`` and ``start:stop`` stay strings.

    Checks the form only; ranges are checked against the model when it is loaded.
    """
    bad = LayersError(
        f"--layers {value!r}: use an int (12), a list (3,5,7), all, or start:stop (4:8, 4:, :-2)."
    )
    if isinstance(value, bool):
        raise bad
    if isinstance(value, int):
        return [value]
    if isinstance(value, (list, tuple)):
        if not value or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise bad
        return list(value)
    if not isinstance(value, str):
        raise bad
    text = value.strip()
    if text == "all":
        return text
    try:
        if ":" in text:
            start, stop = text.split(":")  # one colon exactly
            for part in (start, stop):
                if part.strip():
                    int(part)
            return text
        layers = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise bad from None
    if not layers:
        raise bad
    return layers


def parse_rows(value) -> list[int] | None:
    """``--select``: ``0,3`` or a YAML list/int -> row indices."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    try:
        if isinstance(value, (list, tuple)):
            return [int(v) for v in value]
        rows = [int(x) for x in str(value).split(",") if x.strip()]
    except ValueError:
        rows = []
    if not rows:
        raise KeelInputError(f"--select {value!r}: give row indices, e.g. 0,3.")
    return rows


def _check_choices(config) -> None:
    """Literal fields from a --config file skip argparse's choices check; check them here."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        kind, value = hints[f.name], getattr(config, f.name)
        if typing.get_origin(kind) is Literal and value not in typing.get_args(kind):
            raise KeelInputError(f"--{f.name} {value!r}: use one of {', '.join(typing.get_args(kind))}.")


# ---- the configs ---------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class OutputArguments:
    output_dir: str = field(
        metadata={"help": f"Output folder: {DIRECTION_FILE} (+ .json sidecar) and keel_config.yaml."}
    )

    def __post_init__(self):
        _check_choices(self)


@dataclass(kw_only=True)
class ArtifactArguments:
    report_to: Literal["none", "wandb"] = field(
        default="none", metadata={"help": "wandb: log the direction file as a W&B artifact."}
    )
    wandb_project: str | None = field(default=None, metadata={"help": "W&B project."})
    artifact_name: str | None = field(
        default=None, metadata={"help": "W&B artifact name (default: the output folder's name)."}
    )


@dataclass(kw_only=True)
class ModelArguments(OutputArguments):
    model: str = field(
        metadata={
            "help": "Hub id, local folder, or tiny:<model_type> (the base model when --adapter is set)."
        }
    )
    adapter: str | None = field(
        default=None,
        metadata={"help": "PEFT (LoRA) adapter folder loaded on --model: read the fine-tuned model."},
    )
    tokenizer: str | None = field(
        default=None, metadata={"help": "Tokenizer name or path (default: the adapter's, else the model's)."}
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow the model repo's own code."})
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = field(
        default="float32", metadata={"help": "Weights dtype (auto: bf16 on GPU, float32 on CPU)."}
    )
    device: str = field(default="auto", metadata={"help": "cpu, cuda, cuda:1 or auto."})
    batch_size: int = field(default=16, metadata={"help": "Examples per forward pass."})
    max_length: int | None = field(default=None, metadata={"help": "Truncate examples to this many tokens."})
    progress: bool = field(default=True, metadata={"help": "Show progress bars (--no_progress: none)."})


@dataclass(kw_only=True)
class ActivationArguments(ArtifactArguments, ModelArguments):
    layers: str = field(default="all", metadata={"help": LAYERS_HELP})
    site: Literal["resid_post", "resid_pre", "attn_out", "mlp_out"] = field(
        default="resid_post", metadata={"help": "Activation site read at each layer."}
    )
    padding_side: Literal["right", "left"] = field(default="right", metadata={"help": "Batch padding side."})
    positions: Literal["response", "prompt", "all"] = field(
        default="response", metadata={"help": "Tokens pooled: the response, the prompt, or all."}
    )
    pooling: Literal["mean", "last", "all"] = field(
        default="mean", metadata={"help": "How: mean, last token, or all tokens as rows."}
    )

    def __post_init__(self):
        super().__post_init__()
        self.layers = parse_layers(self.layers)


@dataclass(kw_only=True)
class ContrastiveArguments(ActivationArguments):
    """Persona vector: the same answers under a positive vs a negative system prompt."""

    data: str = field(metadata={"help": "JSONL with question + answer (or positive_answer/negative_answer)."})
    positive_system: str = field(metadata={"help": "System prompt that elicits the trait."})
    negative_system: str = field(metadata={"help": "System prompt that suppresses it."})
    score_threshold: float | None = field(
        default=None, metadata={"help": "Keep pairs with positive_score >= t and negative_score < 100-t."}
    )
    normalize: bool = field(
        default=True, metadata={"help": "Unit rows (--no_normalize: the raw mean difference)."}
    )
    generate: bool = field(
        default=False,
        metadata={
            "help": "Let the model answer each question under both system prompts first (records need "
            f"only 'question'); the answers are saved as <output_dir>/{ANSWERS_FILE}."
        },
    )
    max_new_tokens: int = field(default=200, metadata={"help": "Answer length with --generate."})
    seed: int = field(default=0, metadata={"help": "Sampling seed with --generate."})


@dataclass(kw_only=True)
class JudgedArguments(ActivationArguments):
    """Mean difference of two answer sets (e.g. judged misaligned vs aligned)."""

    positive: str = field(metadata={"help": "JSONL of answers showing the concept (e.g. misaligned)."})
    negative: str = field(metadata={"help": "JSONL of reference answers (e.g. aligned)."})
    normalize: bool = field(
        default=True, metadata={"help": "Unit rows (--no_normalize: the raw mean difference)."}
    )


@dataclass(kw_only=True)
class PairArguments(ActivationArguments):
    adapter: str | None = field(
        default=None,
        metadata={"help": "PEFT adapter folder: base = adapter off, fine-tuned = adapter on."},
    )
    finetuned: str | None = field(
        default=None,
        metadata={"help": "Fine-tuned model (hub id, folder or tiny:<type>; same architecture as --model)."},
    )
    data: str = field(metadata={"help": "JSONL chats (ideally answered by the fine-tuned model)."})
    pooling: Literal["mean", "last", "all"] = field(
        default="all", metadata={"help": "How: mean, last token, or all tokens as rows."}
    )

    def __post_init__(self):
        super().__post_init__()
        if bool(self.finetuned) == bool(self.adapter):
            raise KeelInputError("give exactly one of --finetuned MODEL and --adapter ADAPTER_DIR.")


@dataclass(kw_only=True)
class FinetuneDiffArguments(PairArguments):
    """CAFT: PCA of per-token fine-tuned minus base activations."""

    n_components: int = field(default=20, metadata={"help": "Principal components per layer."})
    max_tokens: int = field(default=50_000, metadata={"help": "Per-layer cap on kept difference rows."})
    seed: int = field(default=0, metadata={"help": "Reservoir sampling seed."})
    centre: bool = field(
        default=True,
        metadata={
            "help": "PCA of centred differences (--no_centre: top singular vectors of the raw differences, "
            "which keeps the fine-tune's average shift)."
        },
    )


@dataclass(kw_only=True)
class SAEArguments(PairArguments):
    """Decoder rows of the SAE latents the fine-tune changed most."""

    sae: str = field(metadata={"help": "SAELens-style folder (sae_weights.safetensors + cfg.json)."})
    n_latents: int = field(default=20, metadata={"help": "Latents kept."})
    rank_by: Literal["change", "attribution"] = field(default="change", metadata={"help": "Ranking."})
    sign: Literal["positive", "abs"] = field(
        default="positive", metadata={"help": "positive: latents switched on; abs: by magnitude."}
    )

    def __post_init__(self):
        super().__post_init__()
        single = self.layers == "all" or (isinstance(self.layers, list) and len(self.layers) == 1)
        if not single:
            raise KeelInputError("one SAE covers one layer: pass a single --layers value (or all).")


@dataclass(kw_only=True)
class RandomArguments(ArtifactArguments, OutputArguments):
    """Norm-matched random baseline."""

    like: str | None = field(
        default=None, metadata={"help": "Direction file to match (k, norms, site, layer)."}
    )
    layer: int | None = field(
        default=None, metadata={"help": "Which direction of --like (if it holds several)."}
    )
    d_model: int | None = field(default=None, metadata={"help": "Width, without --like."})
    k: int = field(default=1, metadata={"help": "Rows, without --like."})
    seed: int = field(default=0, metadata={"help": "Random seed (+ i for the i-th direction of --like)."})

    def __post_init__(self):
        super().__post_init__()
        if self.like is None and self.d_model is None:
            raise KeelInputError("give --like DIRECTION_FILE, or --d_model (and --k).")


@dataclass(kw_only=True)
class InspectArguments(ModelArguments):
    """Top activating windows and projection histograms of a direction file."""

    output_dir: str = field(
        metadata={"help": f"Report folder: report.md, histograms.png (and {SELECTED_FILE} with --select)."}
    )
    direction: str = field(metadata={"help": "Direction file (also accepted as the word after 'inspect')."})
    data: str = field(metadata={"help": "Corpus JSONL (text, or chats: all tokens are read)."})
    compare: list[str] | None = field(
        default=None, metadata={"help": "Two JSONL sets (A B) for projection histograms."}
    )
    layer: int | None = field(default=None, metadata={"help": "Which direction of the file (default: all)."})
    top_k: int = field(default=20, metadata={"help": "Windows per row and sign."})
    window: int = field(
        default=10, metadata={"help": "Tokens per window (8 before, the token, 1 after at 10)."}
    )
    max_length: int | None = field(default=256, metadata={"help": "Truncate examples to this many tokens."})
    select: str | None = field(
        default=None,
        metadata={"help": f"Rows to keep, e.g. 0,3 (written to <output_dir>/{SELECTED_FILE})."},
    )

    def __post_init__(self):
        super().__post_init__()
        self.select = parse_rows(self.select)
        if self.compare is not None and len(self.compare) != 2:
            raise KeelInputError(f"--compare takes two JSONL files (A B), got {len(self.compare)}.")


METHODS: dict[str, type] = {
    "contrastive": ContrastiveArguments,
    "judged": JudgedArguments,
    "finetune-diff": FinetuneDiffArguments,
    "sae": SAEArguments,
    "random": RandomArguments,
    "inspect": InspectArguments,
}


# ---- parsing -------------------------------------------------------------------------------------------


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Option defaults shown, and the epilog's layout kept."""


def _summary(config_type: type) -> str:
    return (config_type.__doc__ or "").strip().splitlines()[0]


def usage() -> str:
    lines = [f"usage: {PROG} METHOD [--config FILE.yaml] [options] --output_dir DIR", ""]
    lines += ["Make a direction file from a model and JSONL data, or inspect one.", "", "methods:"]
    lines += [f"  {name:<14} {_summary(cls)}" for name, cls in METHODS.items()]
    lines += ["", f"Run `{PROG} METHOD --help` for a method's options.", "", DATA_HELP]
    return "\n".join(lines)


def make_parser(method: str) -> TrlParser:
    """The TrlParser of one method: its options, the --config note and the data/layer help."""
    config_type = METHODS[method]
    parser = make_trl_parser((config_type,), f"{PROG} {method}", _summary(config_type))
    parser.formatter_class = _HelpFormatter
    parser.epilog = CONFIG_HELP + ("" if method == "random" else "\n" + DATA_HELP)
    return parser


def parse_config(method: str, argv: list[str]):
    """The method's config from ``argv`` (with ``--config``); bad input exits with a message naming it."""
    prog = f"{PROG} {method}"
    try:
        (config,) = make_parser(method).parse_args_and_config(args=argv)
    except yaml.YAMLError as err:
        raise SystemExit(f"{prog}: the --config file is not valid YAML: {err}") from None
    except (KeelInputError, ValueError, FileNotFoundError) as err:
        raise SystemExit(f"{prog}: {err}") from None
    return config


# ---- running -------------------------------------------------------------------------------------------


def _device(name: str) -> str:
    if name != "auto":
        return name
    return "cuda" if torch.cuda.is_available() else "cpu"


def _load(args: ModelArguments, name: str | None = None, adapter: str | None = None):
    """(model in eval mode, tokenizer) through the one loader."""
    spec = ModelSpec(
        name or args.model,
        adapter=adapter,
        tokenizer=args.tokenizer,
        dtype=args.dtype,
        device=_device(args.device),
        trust_remote_code=args.trust_remote_code,
    )
    model, tokenizer = load_model(spec)
    return model.eval(), tokenizer


def _extractor_options(args: ActivationArguments) -> dict:
    options = dict(batch_size=args.batch_size, padding_side=args.padding_side)
    if not args.progress:
        options["progress"] = False
    return options


def _contrastive(args: ContrastiveArguments) -> dict:
    model, tok = _load(args, adapter=args.adapter)
    records = read_jsonl(args.data)
    if args.generate:
        records = generate_contrastive_answers(
            model, tok, records, args.positive_system, args.negative_system,
            max_new_tokens=args.max_new_tokens, seed=args.seed, progress=args.progress,
        )  # fmt: skip
        write_jsonl(Path(args.output_dir) / ANSWERS_FILE, records)
    return contrastive_directions(
        model, tok, records, args.positive_system, args.negative_system, args.layers,
        positions=args.positions, pooling=args.pooling, score_threshold=args.score_threshold,
        max_length=args.max_length, site=args.site, normalize=args.normalize, source=args.data,
        **_extractor_options(args),
    )  # fmt: skip


def _judged(args: JudgedArguments) -> dict:
    model, tok = _load(args, adapter=args.adapter)
    return judged_directions(
        model, tok, read_jsonl(args.positive), read_jsonl(args.negative), args.layers,
        positions=args.positions, pooling=args.pooling, max_length=args.max_length, site=args.site,
        normalize=args.normalize, source=f"{args.positive} vs {args.negative}", **_extractor_options(args),
    )  # fmt: skip


def _pair(args: PairArguments):
    """(base, fine-tuned or None, tokenizer, examples): two models, or one PEFT model (adapter off/on)."""
    base, tok = _load(args, adapter=args.adapter)
    tuned = _load(args, name=args.finetuned)[0] if args.finetuned else None
    examples = record_examples(
        tok, read_jsonl(args.data), positions=args.positions, max_length=args.max_length
    )
    return base, tuned, examples


def _finetune_diff(args: FinetuneDiffArguments) -> dict:
    base, tuned, examples = _pair(args)
    return finetune_difference(
        base, tuned, examples, args.layers, n_components=args.n_components, site=args.site,
        pooling=args.pooling, max_tokens=args.max_tokens, seed=args.seed, centre=args.centre,
        source=args.data, **_extractor_options(args),
    )  # fmt: skip


def _sae(args: SAEArguments) -> dict:
    base, tuned, examples = _pair(args)
    layer = None if args.layers == "all" else args.layers[0]
    return sae_latents(
        base, tuned, examples, args.sae, layer=layer, n_latents=args.n_latents, rank_by=args.rank_by,
        sign=args.sign, site=args.site, pooling=args.pooling, source=args.data, **_extractor_options(args),
    )  # fmt: skip


def _random(args: RandomArguments) -> dict:
    if args.like:
        likes = load_directions(args.like)
        if args.layer is not None:
            likes = [d for d in likes if d.layer == args.layer]
            if not likes:
                raise KeelInputError(f"{args.like} holds no direction for layer {args.layer}.")
        return {
            (d.layer if d.layer is not None else i): random_direction(like=d, seed=args.seed + i)
            for i, d in enumerate(likes)
        }
    return {0: random_direction(args.d_model, args.k, seed=args.seed)}


def _inspect(args: InspectArguments) -> int:
    out = Path(args.output_dir)
    directions = load_directions(args.direction)
    if args.layer is not None:
        directions = [d for d in directions if d.layer == args.layer]
        if not directions:
            raise KeelInputError(f"{args.direction} holds no direction for layer {args.layer}.")
    if args.select is not None:
        if len(directions) != 1:
            raise KeelInputError("--select picks rows of one direction: add --layer to choose which.")
        picked = directions[0].select(args.select)
        print(f"selected rows {args.select} -> {save_directions([picked], out / SELECTED_FILE)}")
    model, tok = _load(args, adapter=args.adapter)
    corpus = record_examples(tok, read_jsonl(args.data), positions="all", max_length=args.max_length)
    compare = None
    if args.compare:
        compare = {
            Path(p).stem: record_examples(tok, read_jsonl(p), max_length=args.max_length)
            for p in args.compare
        }
    before = max(args.window - 2, 0)
    after = args.window - before - 1
    for d in directions:
        folder = out if len(directions) == 1 else out / f"layer_{d.layer}"
        path = inspect_direction(
            model, d, corpus, folder, tokenizer=tok, compare=compare, top_k=args.top_k, before=before,
            after=after, batch_size=args.batch_size, progress=None if args.progress else False,
        )  # fmt: skip
        print(f"report: {path}")
    return 0


EXTRACTORS = {
    "contrastive": _contrastive,
    "judged": _judged,
    "finetune-diff": _finetune_diff,
    "sae": _sae,
    "random": _random,
}


def run(method: str, args) -> Path | None:
    """Run ``method`` with its parsed config; returns the direction file written (None for inspect)."""
    write_config_record(args.output_dir, {"extract": {"method": method, **config_dict(args)}})
    if method == "inspect":
        _inspect(args)
        return None
    directions = EXTRACTORS[method](args)
    ordered = [directions[k] for k in sorted(directions)]
    path = save_directions(ordered, Path(args.output_dir) / DIRECTION_FILE)
    for d in ordered:
        print(f"layer {d.layer}: k={d.k} method={d.method} site={d.site}")
    print(f"wrote {path}")
    if args.report_to == "wandb":
        name = args.artifact_name or re.sub(r"[^A-Za-z0-9._-]", "-", Path(args.output_dir).resolve().name)
        name = log_direction_artifact(path, ordered, name=name, project=args.wandb_project)
        print(f"logged W&B artifact {name!r} (type direction)")
    return path


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(usage())
        return 0
    if not argv or argv[0] not in METHODS:
        what = f"unknown method {argv[0]!r}" if argv else "give a method"
        print(f"{PROG}: {what}.\n\n{usage()}", file=sys.stderr)
        return 2
    method, rest = argv[0], argv[1:]
    if method == "inspect" and rest and not rest[0].startswith("-"):
        rest = ["--direction", *rest]  # `keel extract inspect FILE ...`
    args = parse_config(method, rest)
    try:
        run(method, args)
    except (KeelInputError, ValueError, FileNotFoundError) as err:
        raise SystemExit(f"{PROG} {method}: {err}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
