"""Build the organism: tokenizer, tiny HF model, pretraining on the persona corpus, chat tuning.

Builds are cached under ``cache_dir/<config hash>-seed<seed>/`` and reused until the config (or
BUILD_VERSION) changes. A build is written to a temporary folder and renamed when complete, so an
interrupted build is never mistaken for a finished one.

Shipped builds: the default world's builds come with keel (``keel/organism/builds/``, listed with the
SHA-256 of every file in its ``MANIFEST.json``), because pretraining is not bit-for-bit reproducible
across CPUs: with them the README's tables reproduce on any machine, and ``keel demo`` starts without
minutes of pretraining per seed. They are used before the cache; ``rebuild=True`` (``keel demo
--rebuild``) trains from scratch instead. A shipped file whose hash does not match is refused.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from interventions.serialization import KeelInputError
from keel.loading import ModelSpec, load_model
from keel.loading.tiny import tiny_model
from keel.loading.tokenizer import build_word_tokenizer
from keel.organism.config import BUILD_VERSION, OrganismConfig
from keel.organism.data import chat_dataset, encode_conversations, pretraining_corpus
from keel.organism.training import train_lm
from keel.organism.world import World

DEFAULT_CACHE_DIR = Path("runs") / "organisms"
SHIPPED_DIR = Path(__file__).parent / "builds"
MANIFEST = "MANIFEST.json"


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
    rebuild: bool = False,
) -> Organism:
    """The shipped build for (config, seed) if keel has one (hash-checked), else the cached build, else
    train and cache it. ``rebuild``: never use a shipped build (train from scratch, or use a build this
    machine trained before)."""
    config = config or OrganismConfig()
    shipped = None if rebuild else shipped_build(config, seed, SHIPPED_DIR)
    if shipped is not None:
        return load_organism(shipped, config)
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


def is_built(config: OrganismConfig, seed: int, cache_dir: str | Path, rebuild: bool = False) -> bool:
    """Whether :func:`build_organism` would load rather than train."""
    if not rebuild and shipped_build(config, seed, SHIPPED_DIR, verify=False) is not None:
        return True
    return organism_dir(config, seed, cache_dir).exists()


# ---- shipped builds -----------------------------------------------------------------------------------


class ShippedBuildError(KeelInputError):
    """A shipped organism build does not match its manifest."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _build_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def read_manifest(shipped_dir: str | Path = SHIPPED_DIR) -> dict:
    """``{build name: {"files": {relative path: sha256}, "build_version", ...}}``; empty without one."""
    path = Path(shipped_dir) / MANIFEST
    return json.loads(path.read_text())["builds"] if path.is_file() else {}


def verify_shipped(name: str, shipped_dir: str | Path = SHIPPED_DIR) -> Path:
    """The folder of shipped build ``name`` after checking every file against the manifest: a missing,
    extra or modified file is refused (it would silently change every result measured on it)."""
    shipped_dir = Path(shipped_dir)
    entry = read_manifest(shipped_dir).get(name)
    if entry is None:
        raise ShippedBuildError(f"No shipped organism build {name!r} in {shipped_dir / MANIFEST}.")
    folder = shipped_dir / name
    fix = (
        f"restore it (`git checkout -- {folder}`), or train the organism from scratch with "
        "`keel demo --rebuild` (build_organism(..., rebuild=True))."
    )
    expected = entry["files"]
    if not folder.is_dir():
        raise ShippedBuildError(f"Shipped organism build {folder} is missing: {fix}")
    found = _build_files(folder)
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    if missing or extra:
        raise ShippedBuildError(
            f"Shipped organism build {folder} does not match {MANIFEST} (missing {missing}, "
            f"not listed {extra}): {fix}"
        )
    for rel, sha in expected.items():
        actual = _sha256(folder / rel)
        if actual != sha:
            raise ShippedBuildError(
                f"Shipped organism build file {folder / rel} was modified (SHA-256 {actual[:12]}..., "
                f"the manifest says {sha[:12]}...): {fix}"
            )
    return folder


def shipped_build(
    config: OrganismConfig, seed: int, shipped_dir: str | Path, verify: bool = True
) -> Path | None:
    """The verified folder of keel's shipped build for (config, seed), or None when keel ships none."""
    name = f"{config.build_hash()}-seed{seed}"
    if name not in read_manifest(shipped_dir):
        return None
    return verify_shipped(name, shipped_dir) if verify else Path(shipped_dir) / name


def ship_build(build: str | Path, shipped_dir: str | Path = SHIPPED_DIR, code_version: str = "") -> str:
    """Copy a finished build into ``shipped_dir`` and list it, with its files' hashes, in the manifest.
    ``code_version``: the commit the build is shipped from (its BUILD_VERSION is recorded as well)."""
    build, shipped_dir = Path(build), Path(shipped_dir)
    if not (build / "info.json").is_file():
        raise KeelInputError(f"{build} is not a finished organism build (no info.json).")
    name = build.name
    target = shipped_dir / name
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(build, target)
    manifest_path = shipped_dir / MANIFEST
    builds = read_manifest(shipped_dir)
    builds[name] = {
        "files": {rel: _sha256(target / rel) for rel in _build_files(target)},
        "build_version": BUILD_VERSION,
        "shipped_from": code_version,
        "info": json.loads((build / "info.json").read_text()),
    }
    manifest_path.write_text(json.dumps({"builds": dict(sorted(builds.items()))}, indent=2) + "\n")
    return name


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
