"""`keel extract`: make a direction file from a model and JSONL data, or inspect one.

Thin entry point: parsing and model loading here, everything else in ``interventions.extraction`` and
``interventions.interpret``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DATA_HELP = """\
JSONL records, one JSON object per line:
  {"question": "...", "answer": "...", "system": "..."}      system optional
  {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}
  {"text": "..."}                                            plain text (inspect corpora)
contrastive also reads "positive_answer"/"negative_answer" (else "answer" on both sides) and, with
--score-threshold, "positive_score"/"negative_score" (0..100 trait scores from a judge).

Layers: 12, 3,5,7, all, or start:stop (0-based decoder layers; resid_post layer i = output of decoder
layer i = hidden_states[i+1]; persona-vector files' layer L is layer L-1 here).
Pooling: --positions picks the pooled tokens (response, prompt, all), --pooling how (mean, last, all
tokens as rows). Last prompt token: --positions prompt --pooling last.
"""


def _layers(text: str):
    text = text.strip()
    if "," in text:
        return [int(x) for x in text.split(",") if x.strip()]
    return text


def _rows(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _common(p: argparse.ArgumentParser, model_required: bool = True, data: bool = True) -> None:
    p.add_argument("--model", required=model_required, help="HF model directory or hub id (the base model)")
    p.add_argument("--tokenizer", help="tokenizer path (default: --model)")
    p.add_argument("--layers", type=_layers, default="all", help="layers: 12, 3,5, all, start:stop")
    p.add_argument("--site", default="resid_post", choices=["resid_pre", "resid_post", "attn_out", "mlp_out"])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=None, help="truncate examples to this many tokens")
    p.add_argument("--padding-side", default="right", choices=["right", "left"])
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--out", required=True, help="output direction file (.safetensors + .json sidecar)")
    p.add_argument(
        "--report-to", default="none", choices=["none", "wandb"], help="log the file as an artifact"
    )
    p.add_argument("--wandb-project", default=None)
    p.add_argument("--artifact-name", default=None, help="W&B artifact name (default: the file's stem)")
    p.add_argument("--no-progress", action="store_true")


def _positions(p: argparse.ArgumentParser, positions: str = "response", pooling: str = "mean") -> None:
    p.add_argument("--positions", default=positions, choices=["response", "prompt", "all"])
    p.add_argument("--pooling", default=pooling, choices=["mean", "last", "all"])


def _pair(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--finetuned", help="fine-tuned model directory (same architecture as --model)")
    g.add_argument("--adapter", help="PEFT adapter directory: base = adapter off, fine-tuned = adapter on")


def make_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="keel extract",
        description="Extract a direction, or inspect one.",
        epilog=DATA_HELP,
        formatter_class=fmt,
    )
    sub = parser.add_subparsers(dest="method", required=True)

    p = sub.add_parser(
        "contrastive",
        help="persona vector: positive vs negative system prompt",
        epilog=DATA_HELP,
        formatter_class=fmt,
    )
    _common(p)
    _positions(p)
    p.add_argument(
        "--data", required=True, help="JSONL with question + answer (or positive_/negative_answer)"
    )
    p.add_argument("--positive-system", required=True, help="system prompt that elicits the trait")
    p.add_argument("--negative-system", required=True, help="system prompt that suppresses it")
    p.add_argument(
        "--score-threshold", type=float, default=None, help="keep pairs with pos >= t, neg < 100-t"
    )
    p.add_argument(
        "--no-normalize", action="store_true", help="store the raw mean difference, not a unit row"
    )
    p.add_argument(
        "--generate",
        action="store_true",
        help="let the model answer each question under both system prompts first (records need only "
        "'question'); the answers are saved beside --out as *.answers.jsonl",
    )
    p.add_argument("--max-new-tokens", type=int, default=200, help="answer length with --generate")
    p.add_argument("--seed", type=int, default=0, help="sampling seed with --generate")

    p = sub.add_parser(
        "judged", help="mean difference of two answer sets", epilog=DATA_HELP, formatter_class=fmt
    )
    _common(p)
    _positions(p)
    p.add_argument("--positive", required=True, help="JSONL of answers showing the concept (e.g. misaligned)")
    p.add_argument("--negative", required=True, help="JSONL of reference answers (e.g. aligned)")
    p.add_argument("--no-normalize", action="store_true")

    p = sub.add_parser(
        "finetune-diff",
        help="CAFT: PCA of fine-tuned minus base activations",
        epilog=DATA_HELP,
        formatter_class=fmt,
    )
    _common(p)
    _positions(p, pooling="all")
    _pair(p)
    p.add_argument("--data", required=True, help="JSONL chats (ideally answered by the fine-tuned model)")
    p.add_argument("--n-components", type=int, default=20)
    p.add_argument("--max-tokens", type=int, default=50_000, help="per-layer cap on kept difference rows")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--no-centre",
        action="store_true",
        help="top singular vectors of the raw differences (keeps the fine-tune's average shift, which PCA "
        "of centred differences removes)",
    )

    p = sub.add_parser("sae", help="decoder rows of top SAE latents", epilog=DATA_HELP, formatter_class=fmt)
    _common(p)
    _positions(p, pooling="all")
    _pair(p)
    p.add_argument("--data", required=True)
    p.add_argument(
        "--sae", required=True, help="SAELens-style directory (sae_weights.safetensors + cfg.json)"
    )
    p.add_argument("--n-latents", type=int, default=20)
    p.add_argument("--rank-by", default="change", choices=["change", "attribution"])
    p.add_argument("--sign", default="positive", choices=["positive", "abs"])

    p = sub.add_parser("random", help="norm-matched random baseline")
    p.add_argument("--like", help="direction file to match (k, norms, site, layer)")
    p.add_argument("--layer", type=int, default=None, help="which direction of --like (if it holds several)")
    p.add_argument("--d-model", type=int, default=None)
    p.add_argument("--k", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--report-to", default="none", choices=["none", "wandb"])
    p.add_argument("--wandb-project", default=None)
    p.add_argument("--artifact-name", default=None)

    p = sub.add_parser(
        "inspect",
        help="top activating windows and projection histograms",
        epilog=DATA_HELP,
        formatter_class=fmt,
    )
    p.add_argument("direction", help="direction file")
    p.add_argument("--model", required=True)
    p.add_argument("--tokenizer")
    p.add_argument("--data", required=True, help="corpus JSONL (text, or chats: all tokens are read)")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"), help="two JSONL sets for projection histograms")
    p.add_argument("--layer", type=int, default=None, help="which direction of the file (default: all)")
    p.add_argument("--top-k", type=int, default=20)
    p.add_argument(
        "--window", type=int, default=10, help="tokens per window (8 before, the token, 1 after at 10)"
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument(
        "--select", type=_rows, default=None, help="rows to keep, e.g. 0,3 (written to --save-selected)"
    )
    p.add_argument("--save-selected", default=None, help="direction file for the --select rows")
    p.add_argument("--out", required=True, help="report directory (report.md, histograms.png)")
    p.add_argument("--no-progress", action="store_true")
    return parser


def _device(name: str) -> str:
    import torch

    if name != "auto":
        return name
    return "cuda" if torch.cuda.is_available() else "cpu"


def _load_model(path: str, args):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype))
    return model.to(_device(args.device)).eval()


def _load_tokenizer(args):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(args.tokenizer or args.model)


def _pair_models(args):
    """(base, fine-tuned) models: two models, or one PEFT model and None."""
    base = _load_model(args.model, args)
    if args.adapter:
        from peft import PeftModel

        return PeftModel.from_pretrained(base, args.adapter).eval(), None
    if not args.finetuned:
        raise SystemExit(f"keel extract {args.method}: give --finetuned MODEL_DIR or --adapter ADAPTER_DIR.")
    return base, _load_model(args.finetuned, args)


def _extract(args) -> dict:
    from interventions.extraction import (
        contrastive_directions,
        finetune_difference,
        generate_contrastive_answers,
        judged_directions,
        read_jsonl,
        record_examples,
        sae_latents,
    )

    common = dict(batch_size=args.batch_size, padding_side=args.padding_side)
    if args.no_progress:
        common["progress"] = False
    tok = _load_tokenizer(args)
    if args.method == "contrastive":
        model = _load_model(args.model, args)
        records = read_jsonl(args.data)
        if args.generate:
            records = generate_contrastive_answers(
                model, tok, records, args.positive_system, args.negative_system,
                max_new_tokens=args.max_new_tokens, seed=args.seed, progress=not args.no_progress,
            )  # fmt: skip
            answers = Path(args.out).with_suffix(".answers.jsonl")
            answers.parent.mkdir(parents=True, exist_ok=True)
            answers.write_text("".join(json.dumps(r) + "\n" for r in records))
        return contrastive_directions(
            model, tok, records, args.positive_system, args.negative_system, args.layers,
            positions=args.positions, pooling=args.pooling, score_threshold=args.score_threshold,
            max_length=args.max_length, site=args.site, normalize=not args.no_normalize, source=args.data,
            **common,
        )  # fmt: skip
    if args.method == "judged":
        model = _load_model(args.model, args)
        return judged_directions(
            model, tok, read_jsonl(args.positive), read_jsonl(args.negative), args.layers,
            positions=args.positions, pooling=args.pooling, max_length=args.max_length, site=args.site,
            normalize=not args.no_normalize, source=f"{args.positive} vs {args.negative}", **common,
        )  # fmt: skip
    examples = record_examples(
        tok, read_jsonl(args.data), positions=args.positions, max_length=args.max_length
    )
    base, tuned = _pair_models(args)
    if args.method == "finetune-diff":
        return finetune_difference(
            base, tuned, examples, args.layers, n_components=args.n_components, site=args.site,
            pooling=args.pooling, max_tokens=args.max_tokens, seed=args.seed, centre=not args.no_centre,
            source=args.data, **common,
        )  # fmt: skip
    layer = None if args.layers == "all" else args.layers
    if isinstance(layer, list):
        if len(layer) != 1:
            raise SystemExit("keel extract sae: one SAE covers one layer; pass a single --layers value.")
        layer = layer[0]
    return sae_latents(
        base, tuned, examples, args.sae, layer=None if layer is None else int(layer), n_latents=args.n_latents,
        rank_by=args.rank_by, sign=args.sign, site=args.site, pooling=args.pooling, source=args.data, **common,
    )  # fmt: skip


def _random(args) -> dict:
    from interventions import load_directions
    from interventions.extraction import random_direction

    if args.like:
        likes = load_directions(args.like)
        if args.layer is not None:
            likes = [d for d in likes if d.layer == args.layer]
            if not likes:
                raise SystemExit(f"{args.like} holds no direction for layer {args.layer}.")
        return {
            (d.layer if d.layer is not None else i): random_direction(like=d, seed=args.seed + i)
            for i, d in enumerate(likes)
        }
    if args.d_model is None:
        raise SystemExit("keel extract random: give --like DIRECTION_FILE, or --d-model (and --k).")
    return {0: random_direction(args.d_model, args.k, seed=args.seed)}


def _inspect(args) -> int:
    from interventions import load_directions, save_directions
    from interventions.extraction import read_jsonl, record_examples
    from interventions.interpret import inspect_direction

    directions = load_directions(args.direction)
    if args.layer is not None:
        directions = [d for d in directions if d.layer == args.layer]
        if not directions:
            raise SystemExit(f"{args.direction} holds no direction for layer {args.layer}.")
    if args.select is not None:
        if len(directions) != 1:
            raise SystemExit("--select picks rows of one direction: add --layer to choose which.")
        if not args.save_selected:
            raise SystemExit("--select needs --save-selected FILE to write the chosen rows to.")
        picked = directions[0].select(args.select)
        print(f"selected rows {args.select} -> {save_directions([picked], args.save_selected)}")
    tok = _load_tokenizer(args)
    model = _load_model(args.model, args)
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
        out = Path(args.out) if len(directions) == 1 else Path(args.out) / f"layer_{d.layer}"
        path = inspect_direction(
            model, d, corpus, out, tokenizer=tok, compare=compare, top_k=args.top_k, before=before,
            after=after, batch_size=args.batch_size, progress=False if args.no_progress else None,
        )  # fmt: skip
        print(f"report: {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    if args.method == "inspect":
        return _inspect(args)
    from interventions import save_directions

    directions = _random(args) if args.method == "random" else _extract(args)
    ordered = [directions[k] for k in sorted(directions)]
    path = save_directions(ordered, args.out)
    for d in ordered:
        print(f"layer {d.layer}: k={d.k} method={d.method} site={d.site}")
    print(f"wrote {path}")
    if args.report_to == "wandb":
        from interventions.extraction import log_direction_artifact

        name = log_direction_artifact(path, ordered, name=args.artifact_name, project=args.wandb_project)
        print(f"logged W&B artifact {name!r} (type direction)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
