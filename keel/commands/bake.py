"""``keel bake``: fold a static ablation into a model's weights, or convert steering vectors for llama.cpp.

    keel bake --model Qwen/Qwen2.5-7B-Instruct [--adapter runs/caft] --direction dir.safetensors \\
        [--operator project_out] [--site stream] --output_dir runs/baked
    keel bake --direction persona.safetensors --gguf_out persona.gguf --model_hint qwen2 [--coefficient 4]
    keel bake --gguf_in persona.gguf --output_dir runs/persona

Three modes, one command:

* **bake** (``--model``): loads the model (an adapter is merged first), orthogonalises the weights that
  write into the residual stream, checks on random tokens that the baked model's logits equal the
  original's with the equivalent hooks (``--verify_tokens``), and writes the model, its tokenizer and
  ``keel_config.yaml`` into ``--output_dir``; the config's ``keel_baked`` records what was baked.
  ``--site stream`` (default, every layer) equals hooks at resid_pre 0 + attn_out and mlp_out of every
  layer; ``resid_post`` is accepted only where it is the same thing (parallel-residual blocks);
  ``attn_out``/``mlp_out`` take any ``--layers`` and ``--coefficient``. Operators: project_out,
  mean_ablate (the direction's stored mean), clamp (``--value``). Anything that cannot be baked exactly
  is refused with the reason (see ``interventions.bake``).
* **export** (``--gguf_out FILE``): an ``add`` (steering) direction file becomes a llama.cpp control
  vector: per resid_post layer, ``--coefficient`` times the sum of the rows (layers >= 1; block 0 cannot
  be steered in llama.cpp). ``--layers`` places a direction that records no layer.
* **import** (``--gguf_in FILE``): a control vector becomes ``directions.safetensors`` in
  ``--output_dir``, for ``{operator: add, direction: ...}`` with coefficient = llama.cpp's scale.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig

from interventions import InterventionSet, load_directions, save_directions
from interventions.bake import (
    BAKE_SITES,
    BAKEABLE_OPERATORS,
    bake_ablation,
    baked_record,
    equivalent_interventions,
)
from interventions.gguf import (
    control_vector_info,
    control_vector_to_directions,
    directions_to_control_vector,
    export_control_vector,
)
from interventions.serialization import KeelInputError
from interventions.sites import resolve_layers
from keel.loading import TINY_PREFIX, ModelSpec, is_tiny, load_model
from keel.loading.tiny import TINY_CONFIGS

from .common import parse, write_config_record

PROG = "keel bake"
DIRECTION_FILE = "directions.safetensors"


@dataclass
class BakeArguments:
    output_dir: str | None = field(
        default=None, metadata={"help": "Where the baked model (or the imported directions) are written."}
    )
    model: str | None = field(
        default=None, metadata={"help": "Model to bake: a hub id, a local folder or tiny:<model_type>."}
    )
    adapter: str | None = field(
        default=None, metadata={"help": "A PEFT adapter folder, merged into the model before baking."}
    )
    revision: str | None = field(default=None, metadata={"help": "Model revision (hub models)."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Passed to from_pretrained."})
    dtype: str | None = field(
        default=None,
        metadata={"help": "float32, bfloat16, float16 or auto (keel's: fp32 on CPU); default: as stored."},
    )
    device: str | None = field(default=None, metadata={"help": "Where to bake (cpu, cuda); default cpu."})
    direction: str | None = field(
        default=None, metadata={"help": "Direction file (keel's .safetensors + .json sidecar, .pt, .npy)."}
    )
    direction_layer: int | None = field(
        default=None,
        metadata={"help": "When the file holds one direction per layer: the one to use everywhere."},
    )
    union: bool = field(
        default=False, metadata={"help": "Bake the span of all the file's directions (all their rows)."}
    )
    operator: str = field(
        default="project_out", metadata={"help": f"One of {', '.join(BAKEABLE_OPERATORS)}."}
    )
    site: str = field(
        default="stream",
        metadata={
            "help": f"One of {', '.join(BAKE_SITES)}; stream = every write into the residual stream "
            "(equals hooks at resid_pre 0 + attn_out and mlp_out of every layer)."
        },
    )
    layers: str | None = field(
        default=None,
        metadata={
            "help": "Layers: all (bake default), 12, 3,5,7 or start:stop (attn_out/mlp_out sites, or "
            "--gguf_out for a direction that records no layer; default there: the directions' own)."
        },
    )
    value: float | None = field(default=None, metadata={"help": "clamp: the projection to clamp to."})
    coefficient: float = field(
        default=1.0,
        metadata={"help": "attn_out/mlp_out: fraction removed; --gguf_out: scale of the steering vector."},
    )
    verify_tokens: int = field(
        default=16,
        metadata={"help": "Random tokens on which baked logits are checked against hooks (0: skip)."},
    )
    verify_tolerance: float | None = field(
        default=None,
        metadata={
            "help": "Largest allowed |logit difference| (default: 1e-3 x (1 + max |logit|) in fp32, "
            "5e-2 x (1 + max |logit|) in bf16/fp16)."
        },
    )
    gguf_out: str | None = field(
        default=None, metadata={"help": "Export mode: write --direction as a llama.cpp control vector here."}
    )
    gguf_in: str | None = field(
        default=None, metadata={"help": "Import mode: read this control vector into --output_dir."}
    )
    model_hint: str | None = field(
        default=None,
        metadata={
            "help": "--gguf_out: the model type written as controlvector.model_hint (or from --model)."
        },
    )


def _fail(message: str):
    raise SystemExit(f"{PROG}: {message}")


def _layers_arg(value: str | None):
    """``all``, ``start:stop``, ``12`` or ``3,5,7`` -> what resolve_layers takes."""
    if value is None:
        return None
    text = str(value).strip()
    if text == "all" or ":" in text:
        return text
    try:
        layers = [int(x) for x in text.strip("[]").split(",") if x.strip()]
    except ValueError:
        _fail(f"--layers {value!r}: use all, an int (12), a list (3,5,7) or start:stop (4:8).")
    if not layers:
        _fail(f"--layers {value!r} names no layer.")
    return layers


def main(argv: list[str] | None = None) -> int:
    (args,) = parse((BakeArguments,), argv, PROG, __doc__)
    try:
        return run(args)
    except KeelInputError as err:
        _fail(str(err))


def run(args: BakeArguments) -> int:
    if args.gguf_out and args.gguf_in:
        _fail("give --gguf_out (export) or --gguf_in (import), not both.")
    if args.gguf_in:
        return import_gguf(args)
    if args.gguf_out:
        return export_gguf(args)
    if not args.model:
        _fail("give --model (bake), --gguf_out FILE (export steering vectors) or --gguf_in FILE (import).")
    return bake(args)


def bake(args: BakeArguments) -> int:
    if not args.direction:
        _fail("give --direction FILE: the direction to bake.")
    if not args.output_dir:
        _fail("give --output_dir: where the baked model is written.")
    out = Path(args.output_dir)
    if (out / "config.json").exists():
        _fail(f"{out} already holds a model (config.json); choose another --output_dir.")
    layers = _layers_arg(args.layers) if args.layers is not None else "all"
    options = dict(
        value=args.value,
        coefficient=args.coefficient,
        direction_layer=args.direction_layer,
        union=args.union,
    )
    # Refusals that need no model come first (a wrong operator must not cost a 15 GB load).
    hooks = equivalent_interventions(args.direction, args.operator, args.site, layers, **options)
    spec = ModelSpec(
        args.model,
        adapter=args.adapter,
        revision=args.revision,
        dtype=args.dtype,
        trust_remote_code=args.trust_remote_code,
        device=args.device,
    )
    model, tokenizer = load_model(spec)
    if args.adapter:
        model = model.merge_and_unload()
    model.eval()
    ids = None
    if args.verify_tokens > 0:
        vocab = model.get_input_embeddings().weight.shape[0]
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab, (1, args.verify_tokens), generator=generator)
        ids = ids.to(model.get_input_embeddings().weight.device)
        with torch.no_grad(), InterventionSet(model, hooks) as iset, iset.phase("train"):
            expected = model(ids).logits.float()
    bake_ablation(model, args.direction, args.operator, layers, args.site, **options)
    check = None
    if ids is not None:
        with torch.no_grad():
            got = model(ids).logits.float()
        diff = (got - expected).abs().max().item()
        half = model.get_input_embeddings().weight.dtype in (torch.bfloat16, torch.float16)
        scale = 1.0 + expected.abs().max().item()
        tolerance = (
            args.verify_tolerance if args.verify_tolerance is not None else (5e-2 if half else 1e-3) * scale
        )
        check = {"tokens": args.verify_tokens, "max_abs_logit_diff": diff, "tolerance": tolerance}
        if not diff <= tolerance:
            _fail(
                f"the baked model's logits differ from the hooked model's by {diff:.3g} (> {tolerance:.3g}) on "
                f"{args.verify_tokens} random tokens; nothing was written. Report this with the model type."
            )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    record = baked_record(model)["bakes"][-1]
    write_config_record(
        out,
        {
            "bake": dataclasses.asdict(args),
            "baked": record,
            "verification": check,
            "hooks": [h.to_dict() for h in hooks],
        },
    )
    checked = f"; logits equal the hooked model's to {check['max_abs_logit_diff']:.2g}" if check else ""
    print(
        f"{PROG}: {args.operator} at {args.site} (layers {record['layers']}) baked into {len(record['modules'])} "
        f"modules{', lm_head untied' if record['untied_lm_head'] else ''}; equivalent hooks: "
        f"{record['equivalent_hooks']}{checked}. Model written to {out}."
    )
    return 0


def _model_config(args: BakeArguments):
    if is_tiny(args.model):
        arch = args.model[len(TINY_PREFIX) :]
        if arch not in TINY_CONFIGS:
            _fail(f"unknown tiny model {args.model!r}; use one of {sorted(TINY_CONFIGS)}.")
        return AutoConfig.for_model(arch, **TINY_CONFIGS[arch])
    return AutoConfig.from_pretrained(
        args.model, revision=args.revision, trust_remote_code=args.trust_remote_code
    )


def export_gguf(args: BakeArguments) -> int:
    if not args.direction:
        _fail("--gguf_out needs --direction FILE: the steering direction(s) to export.")
    num_layers = None
    hint = args.model_hint
    if args.model:
        config = _model_config(args).get_text_config()
        hint = hint or config.model_type
        num_layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    if not hint:
        _fail(
            "--gguf_out needs --model_hint (the model type, e.g. llama or qwen2) or --model to read it from."
        )
    layers = _layers_arg(args.layers)
    if isinstance(layers, str):
        if num_layers is None:
            _fail(f"--layers {layers} needs --model to know how many layers there are; or list them (3,5,7).")
        layers = resolve_layers(layers, num_layers)
    directions = load_directions(args.direction)
    if args.direction_layer is not None:
        directions = [d for d in directions if d.layer == args.direction_layer]
        if not directions:
            _fail(f"--direction_layer {args.direction_layer} is not in {args.direction}.")
    vectors = directions_to_control_vector(directions, args.coefficient, layers)
    path = export_control_vector(args.gguf_out, vectors, hint, num_layers)
    if args.output_dir:
        write_config_record(args.output_dir, {"bake": dataclasses.asdict(args), "gguf": str(path)})
    print(
        f"{PROG}: wrote {path} (layers {sorted(vectors)}, model_hint {hint!r}, coefficient {args.coefficient}); "
        f"llama.cpp: --control-vector {path} (or --control-vector-scaled {path} SCALE).",
    )
    return 0


def import_gguf(args: BakeArguments) -> int:
    if not args.output_dir:
        _fail("--gguf_in needs --output_dir: where directions.safetensors is written.")
    info = control_vector_info(args.gguf_in)
    directions = control_vector_to_directions(args.gguf_in, model_hint=args.model_hint)
    path = save_directions(directions, Path(args.output_dir) / DIRECTION_FILE)
    write_config_record(args.output_dir, {"bake": dataclasses.asdict(args), "control_vector": info})
    print(
        f"{PROG}: {args.gguf_in} ({info['model_hint']}, layers {info['layers']}, n_embd {info['n_embd']}) -> "
        f"{path}; use it as {{operator: add, direction: {path}}} with coefficient = llama.cpp's scale."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
