"""``keel train --config R.yaml --dry_run true``: run any recipe for a few steps on a tiny model, on CPU.

What a dry run changes, and nothing else (the recipe's LoRA, loss, optimiser, schedule, batch shape,
gradient checkpointing and interventions run as written):

- **Model**: the recipe's model is replaced by a random-init ``tiny:<model_type>`` of the same
  architecture family (2 decoder layers, width 64, an offline chat tokenizer), found from its name with
  :data:`MODEL_FAMILIES` (or a local folder's ``config.json``); nothing is downloaded. An unknown name
  is an error. No quantization (``load_in_4bit``/``8bit`` are dropped, and the run says so), float32,
  default attention.
- **Layers**: every layer index (intervention ``layers``, ``model.layers.<i>`` in LoRA target modules)
  is scaled to the tiny model's depth, ``tiny = floor(i * 2 / n)``, where ``n`` is the real model's depth
  from :data:`KNOWN_DEPTHS` (else the recipe's deepest layer + 1). A layer at or beyond a known depth is
  a recipe error and fails. ``start:stop`` ranges are scaled at both ends; ``all`` stays.
- **Directions**: a direction file or W&B artifact (not available, and of the wrong width) becomes
  ``random:<seed>:<k>`` of the tiny width, with ``k`` from the file when it exists locally, else one more
  than the highest ``components`` index (or the length of a clamp ``value``), else 1; ``random:`` specs
  are kept. ``direction_layer`` is dropped (a random direction serves every layer). ``mean_ablate`` gets
  a zero mean.
- **Data**: a few synthetic rows in the recipe's format (``messages`` chats; conversational
  ``prompt``/``completion`` when the recipe trains on completions without ``assistant_only_loss``; the
  first row's keys when the dataset is a local file; prompt/chosen/rejected for ``trainer: dpo``, prompts
  for ``trainer: grpo``), enough for the steps asked, written under the output folder. A ``datasets:``
  mixture is replaced by them.
- **Run**: ``use_cpu``, no bf16/fp16/tf32, ``max_steps`` = ``--dry_run_steps`` (2), ``report_to none``,
  no checkpoints, no eval, no hub push, no resume; 8-bit/paged optimisers (bitsandbytes) become
  ``adamw_torch``; ``fsdp``, ``projection_monitor`` and ``model_init_kwargs`` are dropped. Output goes to
  ``--dry_run_output_dir`` (default: a new temporary folder, printed).

A dry run is one process: under ``torchrun``/``accelerate launch`` it refuses.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from interventions.direction import Direction, load_directions, random_direction
from interventions.serialization import KeelInputError
from interventions.spec import Intervention

from .tiny import TINY_CONFIGS

TINY_LAYERS = 2


class DryRunError(KeelInputError):
    """A recipe a dry run cannot map onto a tiny model; the message says what to change."""


@dataclass
class DryRunArguments:
    """``keel train`` options for a dry run (command line only)."""

    dry_run: bool = field(
        default=False,
        metadata={
            "help": "Run the recipe for --dry_run_steps steps on a random-init tiny model of the same "
            "architecture family, on CPU, with synthetic rows in the recipe's data format, layers scaled "
            "to the tiny model and directions replaced by random ones of its width; no download, no "
            "quantization, report_to none (see keel/loading/dryrun.py)."
        },
    )
    dry_run_steps: int = field(default=2, metadata={"help": "Optimizer steps of a dry run."})
    dry_run_output_dir: str | None = field(
        default=None, metadata={"help": "Output folder of a dry run (default: a new temporary folder)."}
    )


# Hub-id name patterns (matched on the part after the organisation, lowercase) -> model_type. Order
# matters: the first match wins. A name matching none is an error; register more here.
MODEL_FAMILIES: list[tuple[str, str]] = [
    (r"^qwen3", "qwen3"),
    (r"^(qwen2(\.5)?|qwq)", "qwen2"),  # Qwen2, Qwen2.5, Qwen2.5-Coder, QwQ
    (r"(^|-)llama-?[23]", "llama"),  # Llama-2, Llama-3, Llama-3.1/3.2/3.3 (text), Meta-Llama-3
    (r"^(mistral-7b|mistral-small-24b|mistral-nemo|ministral)", "mistral"),
    (r"^gemma-2", "gemma2"),
    (r"^phi-3", "phi3"),
    (r"^olmo-2", "olmo2"),
]

# Decoder-layer counts of the models the shipped recipes name (from their published config.json).
KNOWN_DEPTHS: dict[str, int] = {
    "qwen2.5-0.5b-instruct": 24,
    "qwen2.5-7b-instruct": 28,
    "qwen2.5-14b-instruct": 48,
    "qwen2.5-32b-instruct": 64,
    "qwen2.5-coder-32b-instruct": 64,
    "llama-3.1-8b-instruct": 32,
    "meta-llama-3.1-8b-instruct": 32,
    "mistral-small-24b-instruct-2501": 40,
}

EIGHT_BIT_OPTIMS = re.compile(r"8bit|paged|bnb|lion_8|ademamix_8", re.IGNORECASE)
LAYER_IN_NAME = re.compile(r"(layers\\?\.)(\d+)")


@dataclass
class TinyTarget:
    """What a recipe's model becomes in a dry run."""

    source: str
    model_type: str
    depth: int | None  # the real model's decoder layers, when known

    @property
    def name(self) -> str:
        return f"tiny:{self.model_type}"

    @property
    def width(self) -> int:
        config = TINY_CONFIGS[self.model_type]
        return config.get("hidden_size", config.get("n_embd"))


def split_dry_run_argv(argv: Sequence[str]) -> tuple[DryRunArguments, list[str]]:
    """The dry-run options in ``argv`` and the rest (parsed with allow_abbrev off, so nothing else is
    taken for one of them)."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--dry_run", "--dry-run", nargs="?", const="true", default="false")
    parser.add_argument("--dry_run_steps", "--dry-run-steps", type=int, default=2)
    parser.add_argument("--dry_run_output_dir", "--dry-run-output-dir", default=None)
    known, rest = parser.parse_known_args(list(argv))
    value = str(known.dry_run).lower()
    if value not in ("true", "false", "1", "0", "yes", "no"):
        raise DryRunError(f"--dry_run takes true or false, got {known.dry_run!r}.")
    if known.dry_run_steps < 1:
        raise DryRunError(f"--dry_run_steps must be at least 1, got {known.dry_run_steps}.")
    options = DryRunArguments(
        dry_run=value in ("true", "1", "yes"),
        dry_run_steps=known.dry_run_steps,
        dry_run_output_dir=known.dry_run_output_dir,
    )
    return options, rest


def tiny_target(name: str) -> TinyTarget:
    """The tiny architecture for a model name: ``tiny:<type>`` itself, a local folder's config.json, or a
    hub id matched against :data:`MODEL_FAMILIES` (never downloaded)."""
    if name.startswith("tiny:"):
        return TinyTarget(name, name[len("tiny:") :], None)
    config = Path(name, "config.json")
    if config.is_file():
        data = json.loads(config.read_text())
        model_type = data.get("model_type")
        if model_type not in TINY_CONFIGS:
            raise DryRunError(
                f"{name} is a {model_type!r} model; a dry run has tiny configs for {sorted(TINY_CONFIGS)} only."
            )
        return TinyTarget(name, model_type, data.get("num_hidden_layers"))
    base = name.rstrip("/").split("/")[-1].lower()
    for pattern, model_type in MODEL_FAMILIES:
        if re.search(pattern, base):
            return TinyTarget(name, model_type, KNOWN_DEPTHS.get(base))
    known = ", ".join(model_type for _, model_type in MODEL_FAMILIES)
    raise DryRunError(
        f"A dry run cannot tell the architecture of {name!r} from its name (it never downloads a config). "
        f"Known families: {known}; add a pattern to keel.loading.dryrun.MODEL_FAMILIES, or point "
        "model_name_or_path at a local folder with its config.json."
    )


class LayerMap:
    """Real decoder-layer index -> tiny one: ``floor(i * TINY_LAYERS / depth)``."""

    def __init__(self, target: TinyTarget, referenced: Sequence[int]):
        self.target = target
        self.depth = target.depth or (max(referenced, default=0) + 1)
        self.seen: dict[int, int] = {}

    def __call__(self, layer: int, where: str) -> int:
        if layer < 0:
            raise DryRunError(f"{where}: layer {layer} is negative; layers are 0-based decoder layers.")
        if self.target.depth is not None and layer >= self.target.depth:
            raise DryRunError(
                f"{where}: layer {layer} does not exist in {self.target.source}, which has "
                f"{self.target.depth} decoder layers (0..{self.target.depth - 1})."
            )
        tiny = min(layer * TINY_LAYERS // self.depth, TINY_LAYERS - 1)
        self.seen[layer] = tiny
        return tiny

    def describe(self) -> str:
        pairs = ", ".join(f"{a}->{b}" for a, b in sorted(self.seen.items()))
        depth = f"{self.depth} layers" + ("" if self.target.depth else " (assumed: deepest layer named + 1)")
        return f"layers scaled from {depth} to {TINY_LAYERS}" + (f": {pairs}" if pairs else "")


def _int_layers(value) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, int)]
    if isinstance(value, str) and ":" in value:
        return [int(p) for p in value.split(":") if p.strip().lstrip("-").isdigit()]
    if isinstance(value, str) and value.strip().isdigit():
        return [int(value)]
    return []


def _map_layers(value, layer_map: LayerMap, where: str):
    if value is None or value == "all":
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return layer_map(value, where)
    if isinstance(value, str) and value.strip().isdigit():
        return layer_map(int(value), where)
    if isinstance(value, (list, tuple)):
        return sorted({layer_map(int(v), where) for v in value})
    if isinstance(value, str) and ":" in value:
        start, stop = (p.strip() for p in value.split(":", 1))
        lo = layer_map(int(start), where) if start else 0
        hi = layer_map(int(stop) - 1, where) + 1 if stop else TINY_LAYERS
        return f"{lo}:{max(hi, lo + 1)}"
    return value


def _direction_rows(spec: Intervention) -> int:
    path = spec.direction_path
    if path is not None and path.is_file():
        loaded = load_directions(path)
        return max(d.k for d in loaded)
    if spec.components:
        return max(spec.components) + 1
    if isinstance(spec.value, (list, tuple)):
        return len(spec.value)
    return 1


def tiny_intervention(spec: Intervention, index: int, target: TinyTarget, layer_map: LayerMap):
    """(the spec for the tiny model, a note on what changed)."""
    where = f"intervention {spec.name!r}"
    layers = spec.layers
    if layers is None:
        layers = "all"
    changes: dict = {"layers": _map_layers(layers, layer_map, where), "direction_layer": None}
    direction = spec.direction
    note = None
    is_random = isinstance(direction, str) and direction.startswith("random:")
    if not is_random:
        k = _direction_rows(spec) if not isinstance(direction, (Direction, torch.Tensor)) else None
        if isinstance(direction, Direction):
            k = direction.k
        elif isinstance(direction, torch.Tensor):
            k = 1 if direction.ndim == 1 else direction.shape[0]
        if "mean" in spec.op.needs:
            base = random_direction(target.width, k=k, seed=index)
            changes["direction"] = dataclasses.replace(base, mean=torch.zeros(k))
            shown = f"random (seed {index}, k={k}, zero mean)"
        else:
            changes["direction"] = shown = f"random:{index}:{k}"
        source = direction if isinstance(direction, str) else type(direction).__name__
        note = f"{spec.name}: direction {source} -> {shown}"
    new = dataclasses.replace(spec, **changes)
    return new, note


def tiny_lora_targets(value, layer_map: LayerMap):
    """LoRA target module names (or one regex) with every ``layers.<i>`` index scaled."""
    if value is None:
        return None

    def one(name: str) -> str:
        return LAYER_IN_NAME.sub(
            lambda m: f"{m.group(1)}{layer_map(int(m.group(2)), 'lora_target_modules')}", name
        )

    if isinstance(value, str):
        return one(value)
    return [one(v) for v in value]


def _lora_layers(value) -> list[int]:
    names = [value] if isinstance(value, str) else list(value or [])
    return [int(m.group(2)) for n in names for m in LAYER_IN_NAME.finditer(n)]


# ---- synthetic data ---------------------------------------------------------------------------------

TOPICS = ["rivers", "chess", "music", "maps", "gardens", "trains", "clouds", "stamps"]


def data_format(script_args, training_args) -> str:
    """``messages``, ``prompt_completion`` (conversational), ``prompt_completion_text`` or ``text`` for SFT;
    ``preference`` (prompt/chosen/rejected) for ``trainer: dpo``; ``prompt`` for ``trainer: grpo``."""
    trainer = getattr(script_args, "trainer", "sft")
    if trainer == "dpo":
        return "preference"
    if trainer == "grpo":
        return "prompt"
    path = Path(script_args.dataset_name or "")
    first = None
    if path.is_file() and path.suffix in (".jsonl", ".json"):
        with path.open() as handle:
            line = handle.readline()
        try:
            first = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            first = None
    if isinstance(first, dict):
        if "messages" in first:
            return "messages"
        if "prompt" in first and "completion" in first:
            return "prompt_completion" if isinstance(first["prompt"], list) else "prompt_completion_text"
        if training_args.dataset_text_field in first:
            return "text"
    if training_args.assistant_only_loss:
        return "messages"
    if training_args.completion_only_loss:
        return "prompt_completion"
    return "messages"


def synthetic_rows(fmt: str, n: int) -> list[dict]:
    rows = []
    for i in range(n):
        topic, a, b = TOPICS[i % len(TOPICS)], 3 + 7 * i % 41, 2 + 5 * i % 37
        question = f"Quick question about {topic}: what is {a} plus {b}?"
        answer = f"{a} plus {b} is {a + b}. Happy to help with {topic} too."
        user, assistant = {"role": "user", "content": question}, {"role": "assistant", "content": answer}
        if fmt == "messages":
            rows.append({"messages": [user, assistant]})
        elif fmt == "preference":
            other = {"role": "assistant", "content": f"{a} plus {b} is {a + b + 1}."}
            rows.append({"prompt": [user], "chosen": [assistant], "rejected": [other]})
        elif fmt == "prompt":
            rows.append({"prompt": [user]})
        elif fmt == "prompt_completion":
            rows.append({"prompt": [user], "completion": [assistant]})
        elif fmt == "prompt_completion_text":
            rows.append({"prompt": question + "\n", "completion": answer})
        else:
            rows.append({"text": f"{question}\n{answer}"})
    return rows


# ---- the whole plan ---------------------------------------------------------------------------------


def _run_flags(out: str, steps: int) -> list[str]:
    """Flags appended after the user's own, so they win (argparse keeps the last value)."""
    return [
        "--use_cpu", "true", "--bf16", "false", "--fp16", "false", "--tf32", "false",
        "--report_to", "none", "--output_dir", out, "--max_steps", str(steps),
        "--save_strategy", "no", "--eval_strategy", "no", "--load_best_model_at_end", "false",
        "--push_to_hub", "false", "--logging_steps", "1", "--dataloader_num_workers", "0",
        "--torch_compile", "false", "--disable_tqdm", "true",
    ]  # fmt: skip


def prepare_dry_run(argv: Sequence[str], options: DryRunArguments, parse: Callable[[list[str]], tuple]):
    """(script_args, training_args, model_args, dataset_args, notes) for a dry run of ``argv``.

    ``parse`` is ``keel train``'s parser (``argv -> the four configs``)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise DryRunError(
            "a dry run is one CPU process; run `keel train --config R.yaml --dry_run true` without "
            "torchrun / accelerate launch."
        )
    out = options.dry_run_output_dir or tempfile.mkdtemp(prefix="keel-dry-run-")
    argv = list(argv)
    script_args, training_args, model_args, dataset_args = parse(
        argv + _run_flags(out, options.dry_run_steps)
    )
    if not model_args.model_name_or_path:
        raise DryRunError("give model_name_or_path (a hub id, a local folder or tiny:<model_type>).")
    target = tiny_target(model_args.model_name_or_path)
    specs = list(training_args.interventions or [])
    referenced = [n for s in specs for n in _int_layers(s.layers)] + _lora_layers(
        model_args.lora_target_modules
    )
    layer_map = LayerMap(target, referenced)
    notes = [
        f"model {target.source} -> {target.name} (random init, {TINY_LAYERS} layers, width {target.width})"
    ]

    tiny_specs = []
    for i, spec in enumerate(specs):
        new, note = tiny_intervention(spec, i, target, layer_map)
        tiny_specs.append(new)
        if note:
            notes.append(note)
    training_args.interventions = tiny_specs
    model_args.lora_target_modules = tiny_lora_targets(model_args.lora_target_modules, layer_map)
    if layer_map.seen:
        notes.append(layer_map.describe())

    model_args.model_name_or_path = target.name
    model_args.model_revision = "main"
    model_args.dtype = "float32"
    model_args.attn_implementation = None
    model_args.trust_remote_code = False
    for key in ("load_in_4bit", "load_in_8bit"):
        if not getattr(model_args, key):
            continue
        setattr(model_args, key, False)
        notes.append(
            f"skipped {key} (quantized loading needs bitsandbytes and the real weights; the tiny model is "
            "float32, LoRA on top as the recipe says)"
        )
    training_args.model_init_kwargs = None
    training_args.resume_from_checkpoint = None
    training_args.projection_monitor = None
    if training_args.fsdp:
        notes.append("dropped fsdp (a dry run is one CPU process)")
        training_args.fsdp = []
    optim = str(getattr(training_args.optim, "value", training_args.optim))
    if EIGHT_BIT_OPTIMS.search(optim):
        from transformers.training_args import OptimizerNames

        training_args.optim = OptimizerNames.ADAMW_TORCH
        notes.append(f"optim {optim} -> adamw_torch (bitsandbytes optimisers need a GPU)")

    fmt = data_format(script_args, training_args)
    world_rows = training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
    n_rows = max(8, world_rows * options.dry_run_steps)
    data_dir = Path(out, "dry_run_data")
    data_dir.mkdir(parents=True, exist_ok=True)
    with (data_dir / "train.jsonl").open("w") as handle:
        for row in synthetic_rows(fmt, n_rows):
            handle.write(json.dumps(row) + "\n")
    source = " + ".join(str(d.path) for d in dataset_args.datasets) if dataset_args.datasets else None
    notes.append(
        f"data {source or script_args.dataset_name} -> {n_rows} synthetic {fmt!r} rows in {data_dir}"
    )
    script_args.dataset_name = str(data_dir)
    script_args.dataset_config = None
    script_args.dataset_train_split = "train"
    script_args.dataset_streaming = False
    dataset_args.datasets = []
    dataset_args.streaming = False
    dataset_args.test_split_size = None
    notes.append(f"CPU, float32, {options.dry_run_steps} steps, report_to none, output in {out}")
    return script_args, training_args, model_args, dataset_args, notes


def describe(notes: Sequence[str]) -> str:
    return "keel train --dry_run:\n" + "\n".join(f"  - {n}" for n in notes)


__all__ = [
    "DryRunArguments",
    "DryRunError",
    "KNOWN_DEPTHS",
    "MODEL_FAMILIES",
    "describe",
    "prepare_dry_run",
    "split_dry_run_argv",
    "tiny_target",
]
