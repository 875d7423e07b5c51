"""The one loader every keel command and the organism use: models, tokenizers, adapters and datasets.

A model is named by a hub id, a local folder, or ``tiny:<model_type>`` (a random-init tiny model of a
real architecture with an offline chat tokenizer, so recipes and tests run with no network; the same
name always builds the same weights). A PEFT adapter folder loads on top of any of them. Quantized
loading goes through TRL's ``get_quantization_config`` and needs bitsandbytes; where it cannot be
honoured it is refused, never silently ignored.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from interventions.serialization import KeelInputError

from .tiny import TINY_CONFIGS, tiny_model
from .tokenizer import build_chat_tokenizer

TINY_PREFIX = "tiny:"
DTYPES = ("auto", "float32", "bfloat16", "float16")


class LoadError(KeelInputError):
    """A model, adapter or dataset that cannot be loaded as asked; the message says what to change."""


@dataclass
class ModelSpec:
    """What to load. ``quantization`` is a ``BitsAndBytesConfig`` (see :func:`quantization_config`)."""

    name_or_path: str
    adapter: str | None = None
    tokenizer: str | None = None
    revision: str | None = None
    dtype: str | None = "auto"
    attn_implementation: str | None = None
    trust_remote_code: bool = False
    quantization: object | None = None
    device: str | None = None  # None: leave where from_pretrained puts it (Trainer moves it itself)
    trainable_adapter: bool = False  # load the adapter's weights trainable (resume a LoRA fine-tune)
    model_kwargs: dict | None = None  # more from_pretrained kwargs (SFTConfig.model_init_kwargs)


def is_tiny(name: str) -> bool:
    return isinstance(name, str) and name.startswith(TINY_PREFIX)


def resolve_dtype(dtype: str | None, device: str | None) -> torch.dtype | str | None:
    """``auto`` means bf16 on a GPU and float32 on the CPU (bf16 matmuls are slow and lossy on CPU)."""
    if dtype is None:
        return None
    if dtype not in DTYPES:
        raise LoadError(f"Unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}.")
    if dtype == "auto":
        on_gpu = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
        return torch.bfloat16 if on_gpu else torch.float32
    return getattr(torch, dtype)


def quantization_config(load_in_4bit: bool = False, load_in_8bit: bool = False, model_args=None):
    """TRL's quantization config for these flags, after checking it can be honoured: bitsandbytes is
    installed, and (with ``model_args``) the model is not a ``tiny:`` one built in memory."""
    if model_args is not None:
        load_in_4bit, load_in_8bit = model_args.load_in_4bit, model_args.load_in_8bit
    if not (load_in_4bit or load_in_8bit):
        return None
    bits = 4 if load_in_4bit else 8
    name = getattr(model_args, "model_name_or_path", None)
    if is_tiny(name):
        # Checked first: installing bitsandbytes would not help.
        raise LoadError(_tiny_quantized_message(name, bits))
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise LoadError(
            f"load_in_{bits}bit needs bitsandbytes, which is not installed: pip install 'keel-trl[quant]' "
            f"(or 'bitsandbytes>=0.50'), or drop --load_in_{bits}bit."
        ) from None
    from trl import ModelConfig, get_quantization_config  # trl's trainer utils take seconds to import

    if model_args is None:
        model_args = ModelConfig(load_in_4bit=load_in_4bit, load_in_8bit=load_in_8bit)
    if model_args.dtype in (None, "auto"):
        # TRL passes dtype on as the 4-bit compute dtype; keel's "auto" is resolved as for the weights.
        model_args = copy.copy(model_args)
        model_args.dtype = str(resolve_dtype("auto", None)).removeprefix("torch.")
    return get_quantization_config(model_args)


def _tiny_quantized_message(name: str, bits: int | None = None) -> str:
    flag = f"--load_in_{bits}bit" if bits else "--load_in_4bit/8bit"
    return (
        f"{name} is built in memory, so it cannot be loaded quantized. Save it with save_pretrained and pass "
        f"that folder to test quantized loading, or drop {flag}."
    )


def kbit_device_map(device: str | None):
    """Where a quantized model is placed at load time (bitsandbytes quantizes on placement; the Trainer
    does not move quantized models): ``device`` if given, else this process's GPU, else the CPU."""
    if device is not None:
        return {"": device}
    if torch.cuda.is_available():
        from accelerate import PartialState

        return {"": PartialState().local_process_index}
    return None


def load_tokenizer(spec: ModelSpec):
    """The tokenizer: ``spec.tokenizer``, else the adapter folder when it holds one (a fine-tune may have
    changed the chat template), else the model's."""
    if spec.tokenizer is None and is_tiny(spec.name_or_path):
        return build_chat_tokenizer()
    source = spec.tokenizer
    if source is None and spec.adapter and Path(spec.adapter, "tokenizer_config.json").is_file():
        source = spec.adapter
    source = source or spec.name_or_path
    if is_tiny(source):
        return build_chat_tokenizer()
    if _plain_fast_tokenizer(source):
        # transformers 5 would swap in the model type's tokenizer class (e.g. Qwen2Tokenizer, which splits
        # digits) for a folder whose tokenizer.json says otherwise: load the saved tokenizer as it is.
        return PreTrainedTokenizerFast.from_pretrained(source)
    return AutoTokenizer.from_pretrained(
        source, revision=spec.revision, trust_remote_code=spec.trust_remote_code
    )


def _plain_fast_tokenizer(source: str) -> bool:
    """A local folder saved from a plain ``PreTrainedTokenizerFast`` (keel's offline tokenizers)."""
    config = Path(source, "tokenizer_config.json")
    if not config.is_file() or not Path(source, "tokenizer.json").is_file():
        return False
    try:
        cls = json.loads(config.read_text()).get("tokenizer_class")
    except json.JSONDecodeError:
        return False
    return cls in ("PreTrainedTokenizerFast", "TokenizersBackend")


def load_model(spec: ModelSpec | str, **overrides):
    """(model, tokenizer) for ``spec`` (a :class:`ModelSpec` or a name, with field overrides)."""
    if isinstance(spec, str):
        spec = ModelSpec(spec, **overrides)
    tokenizer = load_tokenizer(spec)
    if is_tiny(spec.name_or_path):
        model = _tiny(spec, tokenizer)
    else:
        kwargs = dict(revision=spec.revision, trust_remote_code=spec.trust_remote_code)
        dtype = resolve_dtype(spec.dtype, spec.device)
        if dtype is not None:
            kwargs["dtype"] = dtype
        if spec.attn_implementation:
            kwargs["attn_implementation"] = spec.attn_implementation
        if spec.quantization is not None:
            kwargs["quantization_config"] = spec.quantization
            kwargs["device_map"] = kbit_device_map(spec.device)
        extra = dict(spec.model_kwargs or {})
        if isinstance(extra.get("dtype"), str):  # as TRL's create_model_from_path reads it
            extra["dtype"] = resolve_dtype(extra["dtype"], spec.device)
        kwargs.update(extra)
        model = AutoModelForCausalLM.from_pretrained(spec.name_or_path, **kwargs)
    if spec.device is not None and spec.quantization is None:
        model = model.to(spec.device)
    if spec.adapter is not None:
        model = _with_adapter(model, spec)
    return model, tokenizer


def _tiny(spec: ModelSpec, tokenizer):
    arch = spec.name_or_path[len(TINY_PREFIX) :]
    if arch not in TINY_CONFIGS:
        raise LoadError(
            f"Unknown tiny model {spec.name_or_path!r}; use tiny:<model_type> with one of {sorted(TINY_CONFIGS)}."
        )
    if spec.quantization is not None:
        raise LoadError(_tiny_quantized_message(spec.name_or_path))
    if spec.model_kwargs:
        raise LoadError(
            f"{spec.name_or_path} is built from a config, not from_pretrained, so model_init_kwargs "
            f"{sorted(spec.model_kwargs)} cannot apply; drop them or save the model and load that folder."
        )
    model = tiny_model(arch, tokenizer=tokenizer)
    dtype = resolve_dtype(spec.dtype, spec.device)
    return model if dtype is None else model.to(dtype)


def _with_adapter(model, spec: ModelSpec):
    if not Path(spec.adapter, "adapter_config.json").is_file():
        raise LoadError(
            f"{spec.adapter} has no adapter_config.json; pass the folder a PEFT model was saved to "
            "(model.save_pretrained), or omit the adapter for a merged model."
        )
    from peft import PeftModel

    model = PeftModel.from_pretrained(model, spec.adapter, is_trainable=spec.trainable_adapter)
    return model.to(spec.device) if spec.device is not None else model


def load_dataset_any(name: str, config: str | None = None, split: str = "train", streaming: bool = False):
    """One split of a dataset: a local ``.jsonl``/``.json``/``.parquet``/``.csv`` file (its only split is
    ``train``), a folder of such files named by split (``train.jsonl``, ``test.jsonl``), a
    ``save_to_disk`` folder, or a hub dataset. ``streaming``: an ``IterableDataset`` instead."""
    from datasets import DatasetDict, load_dataset, load_from_disk

    path = Path(name)
    if path.is_dir() and any((path / f).exists() for f in ("dataset_info.json", "dataset_dict.json")):
        data = load_from_disk(str(path))
        dataset = _split(data, split, name) if isinstance(data, DatasetDict) else data
        if streaming:
            dataset = dataset.to_iterable_dataset()
    elif path.is_file() or path.is_dir():
        candidates = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
        data_files = [f for f in candidates if f.suffix in _FILE_KINDS]
        kinds = {_FILE_KINDS[f.suffix] for f in data_files}
        if len(kinds) != 1 or (path.is_dir() and len({f.stem for f in data_files}) != len(data_files)):
            raise LoadError(
                f"Cannot read dataset {path}: give a .jsonl, .json, .parquet or .csv file, or a folder of "
                "such files (one format, one file per split) named by split, e.g. train.jsonl and test.jsonl."
            )
        files = {"train": path} if path.is_file() else {f.stem: f for f in data_files}
        if split not in files:
            raise LoadError(
                f"Dataset {path} has no split {split!r} (it has {sorted(files)}). A single file is the train "
                f"split; for an eval split put {split}.jsonl beside train.jsonl in a folder and pass the folder."
            )
        if files[split].stat().st_size == 0:
            raise LoadError(_empty_message(name, split))
        try:
            dataset = load_dataset(
                kinds.pop(), data_files=str(files[split]), split="train", streaming=streaming
            )
        except ValueError as err:  # a file with no rows (a CSV header alone): "... corresponds to no data!"
            if "no data" not in str(err):
                raise
            raise LoadError(_empty_message(name, split)) from None
    else:
        dataset = load_dataset(name, name=config, split=split, streaming=streaming)
    if not streaming and len(dataset) == 0:
        raise LoadError(_empty_message(name, split))
    return dataset


def _empty_message(name: str, split: str) -> str:
    return f"Dataset {name} (split {split!r}) holds no rows; give one with examples."


_FILE_KINDS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def _split(data, split: str, name: str):
    if split not in data:
        raise LoadError(f"Dataset {name} has no split {split!r}; it has {sorted(data)}.")
    return data[split]
