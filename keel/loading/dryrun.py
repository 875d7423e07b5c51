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
- **Regularisers** (``regularisers:``, from the config file or ``--regularisers``): ``layers`` scaled like
  intervention layers; a ``directions`` (blocking) or ``direction`` (projection_penalty) file becomes
  ``random:<seed>:<k>`` of the tiny width (``k`` as for interventions; seed 1000 + the regulariser's index),
  ``direction_layer`` dropped; ``anchor_data`` (kl) becomes a few synthetic rows in the training data's
  format, written under the output folder; a blocking ``sae`` becomes a tiny random SAELens-style SAE
  (width of the tiny model, one latent per listed latent, ``latents`` renumbered ``0..n-1``, ``hook_layer``
  the scaled layer: the real SAE's ``cfg.json`` one when it is here, else the first of ``layers``, else the
  last tiny layer), written under the output folder; ``{layer: path}`` SAEs get one per scaled layer. Kinds,
  weights, schedules and every other key run as written.
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
import yaml

from interventions.direction import Direction, load_directions, random_direction
from interventions.serialization import KeelInputError, read_config_value
from interventions.spec import Intervention
from trainers.regularisers import parse_regularisers

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


# ---- regularisers -----------------------------------------------------------------------------------

REGULARISER_SEED = 1000  # random directions of regularisers: seed 1000 + index (interventions: their index)


def _config_path(argv: Sequence[str]) -> str | None:
    argv = list(argv)
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return None


def raw_regularisers(argv: Sequence[str]) -> list | None:
    """The recipe's regularisers as plain mappings, before they are parsed (parsing checks that anchor
    data and SAE files exist, which a dry run replaces): the last ``--regularisers`` on the command line,
    else the config file's ``regularisers`` key. ``None`` when there are none."""
    argv = list(argv)
    value = None
    for i, arg in enumerate(argv):
        if arg == "--regularisers" and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith("--regularisers="):
            value = arg.split("=", 1)[1]
    if value is None:
        path = _config_path(argv)
        if path is None or not Path(path).is_file():
            return None
        with open(path) as handle:
            config = yaml.safe_load(handle)
        value = config.get("regularisers") if isinstance(config, dict) else None
    what, value = read_config_value(value, "regularisers", key="regularisers", error=DryRunError)
    if not value:
        return None
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, dict) for v in value):
        raise DryRunError(f"{what} must be a list of mappings (kind, weight, ...), got {value!r}.")
    return [dict(v) for v in value]


def _regulariser_layers(raw: Sequence[dict] | None) -> list[int]:
    out = []
    for reg in raw or []:
        out += _int_layers(reg.get("layers"))
        if isinstance(reg.get("sae"), dict):
            out += [k for k in reg["sae"] if isinstance(k, int)]
    return out


def _random_spec(value, components, seed: int) -> tuple[str, str | None]:
    """(the ``random:`` stand-in for a direction value, a note) as :func:`tiny_intervention` does it."""
    if isinstance(value, str) and value.startswith("random:"):
        return value, None
    k = 1
    path = Path(value) if isinstance(value, (str, Path)) else None
    if path is not None and path.is_file():
        k = max(d.k for d in load_directions(path))
    elif components:
        k = max(components) + 1
    shown = f"random:{seed}:{k}"
    source = value if isinstance(value, (str, Path)) else type(value).__name__
    return shown, f"{source} -> {shown}"


def _write_tiny_sae(folder: Path, width: int, d_sae: int, hook_layer: int, seed: int) -> str:
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    w_enc = torch.randn(width, d_sae, generator=generator) / width**0.5
    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        {
            "W_enc": w_enc,
            "W_dec": w_enc.T.clone(memory_format=torch.contiguous_format),
            "b_enc": torch.zeros(d_sae),
            "b_dec": torch.zeros(width),
        },
        str(folder / "sae_weights.safetensors"),
    )
    (folder / "cfg.json").write_text(json.dumps({"hook_layer": hook_layer, "d_in": width, "d_sae": d_sae}))
    return str(folder)


def _sae_hook_layer(path) -> int | None:
    if not isinstance(path, (str, Path)):
        return None
    cfg = Path(path, "cfg.json") if Path(path).is_dir() else Path(path).with_name("cfg.json")
    if not cfg.is_file():
        return None
    layer = json.loads(cfg.read_text()).get("hook_layer")
    return layer if isinstance(layer, int) else None


def tiny_regulariser(
    reg: dict,
    index: int,
    target: TinyTarget,
    layer_map: LayerMap,
    data_dir: Path,
    anchor_format: str,
    rows: int,
) -> tuple[dict, list[str]]:
    """(the regulariser mapping for the tiny model, notes on what changed)."""
    new = dict(reg)
    name = reg.get("name") or reg.get("kind")
    where = f"regulariser {name!r}"
    notes = []
    seed = REGULARISER_SEED + index
    if new.get("layers") is not None:
        new["layers"] = _map_layers(new["layers"], layer_map, where)
    for key in ("directions", "direction") if reg.get("kind") in ("blocking", "projection_penalty") else ():
        value = reg.get(key)
        if value is None or (key == "direction" and reg.get("kind") == "blocking"):
            continue  # blocking's `direction` is the side (up/down/both)
        new[key], note = _random_spec(value, reg.get("components"), seed)
        new.pop("direction_layer", None)
        if note:
            notes.append(f"{where}: {key} {note}")
    if reg.get("kind") == "kl" and reg.get("anchor_data") is not None:
        n = max(8, 2 * int(reg.get("anchor_batch_size") or rows))
        path = data_dir / f"anchor_{index}.jsonl"
        with path.open("w") as handle:
            for row in synthetic_rows(anchor_format, n):
                handle.write(json.dumps(row) + "\n")
        new["anchor_data"] = str(path)
        notes.append(
            f"{where}: anchor_data {reg['anchor_data']} -> {n} synthetic {anchor_format!r} rows in {path}"
        )
    if reg.get("kind") == "blocking" and reg.get("sae") is not None:
        latents = reg.get("latents")
        if not isinstance(latents, (list, tuple)) or not latents:
            raise DryRunError(
                f"{where}: `sae` needs `latents`, a non-empty list of latent indices; got {latents!r}."
            )
        d_sae = len(latents)
        new["latents"] = list(range(d_sae))
        sae = reg["sae"]
        folder = data_dir / f"sae_{index}"
        if isinstance(sae, dict):
            tiny = {}
            for layer, _path in sae.items():
                if isinstance(layer, bool) or not isinstance(layer, int):
                    raise DryRunError(
                        f"{where}: `sae` as a mapping takes {{layer: path}} with integer layers."
                    )
                small = layer_map(layer, where)
                tiny.setdefault(
                    small, _write_tiny_sae(folder / f"L{small}", target.width, d_sae, small, seed)
                )
            new["sae"] = tiny
            shown = ", ".join(f"{k}: random" for k in tiny)
        else:
            layers = _int_layers(reg.get("layers"))
            real = _sae_hook_layer(sae)
            if real is not None:
                small = layer_map(real, where)
            elif layers:
                small = layer_map(layers[0], where)
            else:
                small = TINY_LAYERS - 1
            new["sae"] = _write_tiny_sae(folder, target.width, d_sae, small, seed)
            shown = f"random (hook_layer {small})"
        notes.append(
            f"{where}: sae {sae} -> a tiny {shown} SAE of width {target.width} with {d_sae} latents in {folder}, "
            f"latents {list(latents)} -> {new['latents']}"
        )
    return new, notes


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
    raw_regs = raw_regularisers(argv)  # mapped below; parsed without them (their files need not exist)
    no_regs = ["--regularisers", "[]"] if raw_regs else []
    script_args, training_args, model_args, dataset_args = parse(
        argv + _run_flags(out, options.dry_run_steps) + no_regs
    )
    if not model_args.model_name_or_path:
        raise DryRunError("give model_name_or_path (a hub id, a local folder or tiny:<model_type>).")
    target = tiny_target(model_args.model_name_or_path)
    specs = list(training_args.interventions or [])
    referenced = (
        [n for s in specs for n in _int_layers(s.layers)]
        + _lora_layers(model_args.lora_target_modules)
        + _regulariser_layers(raw_regs)
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
    fmt = data_format(script_args, training_args)
    data_dir = Path(out, "dry_run_data")
    data_dir.mkdir(parents=True, exist_ok=True)
    if raw_regs:
        anchor_format = (
            fmt if fmt in ("messages", "prompt_completion", "prompt_completion_text") else "messages"
        )
        world_rows = training_args.per_device_train_batch_size
        tiny_regs = []
        for i, reg in enumerate(raw_regs):
            new, reg_notes = tiny_regulariser(reg, i, target, layer_map, data_dir, anchor_format, world_rows)
            tiny_regs.append(new)
            notes += reg_notes
        try:
            training_args.regularisers = parse_regularisers(tiny_regs)
        except KeelInputError as err:
            raise DryRunError(f"{err} (after the dry run's changes: {tiny_regs})") from None
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

    world_rows = training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
    n_rows = max(8, world_rows * options.dry_run_steps)
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
    "raw_regularisers",
    "split_dry_run_argv",
    "tiny_regulariser",
    "tiny_target",
]
