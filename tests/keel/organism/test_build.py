"""The organism build: deterministic for a seed, cached by config hash, real HF model and template."""

import torch

import keel.organism.build as build_mod
from keel.organism.build import build_organism, load_organism, organism_dir, train_organism
from keel.organism.config import OrganismConfig


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_same_seed_gives_identical_weights(tiny_config):
    a, b = train_organism(tiny_config, seed=3), train_organism(tiny_config, seed=3)
    assert _same_weights(a.base_model, b.base_model) and _same_weights(a.chat_model, b.chat_model)
    c = train_organism(tiny_config, seed=4)
    assert not _same_weights(a.chat_model, c.chat_model)
    assert not _same_weights(a.base_model, a.chat_model)  # chat tuning changed the model
    assert a.base_model.config.model_type == "llama"
    assert a.base_model.config.vocab_size == len(a.tokenizer)


def test_build_is_cached_by_config_hash(tiny_config, tmp_path, monkeypatch):
    first = build_organism(tiny_config, seed=0, cache_dir=tmp_path)
    assert first.path == organism_dir(tiny_config, 0, tmp_path) and (first.path / "info.json").exists()
    calls = []
    monkeypatch.setattr(build_mod, "train_organism", lambda *a, **k: calls.append(a) or first)
    again = build_organism(tiny_config, seed=0, cache_dir=tmp_path)
    assert calls == [] and _same_weights(again.chat_model, first.chat_model)
    assert again.tokenizer.get_vocab() == first.tokenizer.get_vocab()
    assert again.tokenizer.chat_template == first.tokenizer.chat_template
    # another config or seed is another build
    other = OrganismConfig.from_dict(
        {**tiny_config.to_dict(), "world": {**tiny_config.to_dict()["world"], "seed": 9}}
    )
    assert organism_dir(other, 0, tmp_path) != first.path != organism_dir(tiny_config, 1, tmp_path)
    loaded = load_organism(first.path)
    assert loaded.config == tiny_config and loaded.seed == 0
    # another EM split of the same world reuses the build, with its own split
    world = {**tiny_config.to_dict()["world"], "em_domains": ["fin"]}
    split = OrganismConfig.from_dict({**tiny_config.to_dict(), "world": world})
    resplit = build_organism(split, seed=0, cache_dir=tmp_path)
    assert calls == [] and resplit.path == first.path and resplit.world.em_domains == [1]
