"""Build the organism: tokenizer, tiny HF model, pretraining on the persona corpus, chat tuning.

Builds are cached under ``cache_dir/<config hash>-seed<seed>/`` and reused until the config (or
BUILD_VERSION) changes. A build is written to a temporary folder and renamed when complete, so an
interrupted build is never mistaken for a finished one.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from keel.loading import ModelSpec, load_model
from keel.loading.tiny import tiny_model
from keel.loading.tokenizer import build_word_tokenizer
from keel.organism.config import OrganismConfig
from keel.organism.data import chat_dataset, encode_conversations, pretraining_corpus
from keel.organism.training import train_lm
from keel.organism.world import World

DEFAULT_CACHE_DIR = Path("runs") / "organisms"


@dataclass
class Organism:
    config: OrganismConfig
    seed: int
    world: World
    tokenizer: object
    base_model: torch.nn.Module  # after pretraining
    chat_model: torch.nn.Module  # after chat tuning: the starting point of every fine-tune
    path: Path | None
    info: dict


def make_model(config: OrganismConfig, tokenizer, seed: int):
    m = config.model
    return tiny_model(
        m.model_type,
        tokenizer=tokenizer,
        seed=seed,
        hidden_size=m.hidden_size,
        num_hidden_layers=m.num_hidden_layers,
        num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_key_value_heads,
        intermediate_size=m.intermediate_size,
    )


def train_organism(config: OrganismConfig, seed: int) -> Organism:
    """Pretrain and chat-tune from scratch (no cache)."""
    world = World(config.world)
    tok = build_word_tokenizer(world.words)
    info: dict = {"seed": seed, "build_hash": config.build_hash()}
    t0 = time.perf_counter()
    corpus = pretraining_corpus(world, config.pretrain_docs, seed, tok)
    model = make_model(config, tok, seed)
    info["num_parameters"] = sum(p.numel() for p in model.parameters())
    losses = train_lm(
        model, torch.tensor(corpus["input_ids"]), torch.tensor(corpus["labels"]), config.pretrain, seed
    )
    info["pretrain_seconds"] = time.perf_counter() - t0
    info["pretrain_final_loss"] = sum(losses[-50:]) / max(1, len(losses[-50:]))
    base = copy.deepcopy(model)

    t1 = time.perf_counter()
    ids, labels = encode_conversations(tok, chat_dataset(world)["messages"])
    losses = train_lm(model, ids, labels, config.chat, seed + 1)
    info["chat_seconds"] = time.perf_counter() - t1
    info["chat_final_loss"] = sum(losses[-20:]) / max(1, len(losses[-20:]))
    return Organism(config, seed, world, tok, base, model, None, info)


def organism_dir(config: OrganismConfig, seed: int, cache_dir: str | Path = DEFAULT_CACHE_DIR) -> Path:
    return Path(cache_dir) / f"{config.build_hash()}-seed{seed}"


def build_organism(
    config: OrganismConfig | None = None,
    seed: int = 0,
    cache_dir: str | Path = DEFAULT_CACHE_DIR,
) -> Organism:
    """Load the cached build for (config, seed), or train and cache it."""
    config = config or OrganismConfig()
    path = organism_dir(config, seed, cache_dir)
    if path.exists():
        return load_organism(path, config)
    org = train_organism(config, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=path.name + ".tmp-", dir=path.parent))
    try:
        org.tokenizer.save_pretrained(tmp / "tokenizer")
        org.base_model.save_pretrained(tmp / "base")
        org.chat_model.save_pretrained(tmp / "chat")
        (tmp / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
        (tmp / "info.json").write_text(json.dumps(org.info, indent=2))
        if path.exists():  # another process finished the same build meanwhile
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    org.path = path
    return org


def load_organism(path: str | Path, config: OrganismConfig | None = None) -> Organism:
    """Load a finished build. ``config`` (same build hash) replaces the stored one, e.g. for another EM
    split of the same world; by default the config stored with the build is used."""
    path = Path(path)
    if not (path / "info.json").exists():
        raise FileNotFoundError(f"{path} is not a finished organism build (no info.json).")
    stored = OrganismConfig.from_dict(json.loads((path / "config.json").read_text()))
    if config is not None and config.build_hash() != stored.build_hash():
        raise ValueError(
            f"{path} was built from another config (hash {stored.build_hash()}, not {config.build_hash()})."
        )
    config = config or stored
    info = json.loads((path / "info.json").read_text())
    base, tok = load_model(ModelSpec(str(path / "base"), tokenizer=str(path / "tokenizer"), dtype="float32"))
    chat, _ = load_model(ModelSpec(str(path / "chat"), tokenizer=str(path / "tokenizer"), dtype="float32"))
    base, chat = base.eval(), chat.eval()
    return Organism(config, info["seed"], World(config.world), tok, base, chat, path, info)
