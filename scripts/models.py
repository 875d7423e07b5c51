"""Loading a model and tokenizer for a keel script: a hub id or local path, or ``tiny:<model_type>``.

``tiny:<model_type>`` builds a random-init tiny model of a real architecture with an offline tokenizer,
so recipes and smoke tests run with no network.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def load_model_for_training(
    name_or_path: str,
    revision: str | None = None,
    dtype: str | None = None,
    attn_implementation: str | None = None,
):
    if name_or_path.startswith("tiny:"):
        from organisms.tiny_models import tiny_model
        from organisms.tokenizer import build_chat_tokenizer

        tokenizer = build_chat_tokenizer()
        return tiny_model(name_or_path.split(":", 1)[1], tokenizer=tokenizer), tokenizer
    kwargs = {"revision": revision}
    if dtype is not None:
        kwargs["dtype"] = dtype if dtype == "auto" else getattr(torch, dtype)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, revision=revision)
    model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    return model, tokenizer


def load_dataset_any(name: str, config: str | None = None, split: str = "train"):
    """A local ``.jsonl``/``.json``/``.parquet`` file, a ``save_to_disk`` folder, or a hub dataset name."""
    from datasets import load_dataset, load_from_disk

    path = Path(name)
    if path.is_file():
        kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}.get(path.suffix)
        if kind is None:
            raise ValueError(f"Cannot read dataset file {path}: use .jsonl, .json, .parquet or .csv.")
        return load_dataset(kind, data_files=str(path), split=split)
    if path.is_dir() and (path / "dataset_info.json").exists():
        return load_from_disk(str(path))
    return load_dataset(name, name=config, split=split)
