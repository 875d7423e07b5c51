"""The organism build: deterministic for a seed, cached by config hash, real HF model and template."""

import json

import pytest
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


# ---- shipped builds -------------------------------------------------------------------------------------


def _ship_tiny(tiny_config, tmp_path):
    """A tiny build, trained into a cache and shipped into its own folder."""
    trained = build_organism(tiny_config, seed=0, cache_dir=tmp_path / "cache")
    shipped_dir = tmp_path / "shipped"
    name = build_mod.ship_build(trained.path, shipped_dir, code_version="test")
    return trained, shipped_dir, name


def test_a_shipped_build_is_used_before_the_cache_and_rebuild_skips_it(tiny_config, tmp_path, monkeypatch):
    trained, shipped_dir, name = _ship_tiny(tiny_config, tmp_path)
    assert name == f"{tiny_config.build_hash()}-seed0"
    manifest = build_mod.read_manifest(shipped_dir)[name]
    assert manifest["shipped_from"] == "test" and "chat/model.safetensors" in manifest["files"]
    monkeypatch.setattr(build_mod, "SHIPPED_DIR", shipped_dir)
    monkeypatch.setattr(
        build_mod, "train_organism", lambda *a, **k: pytest.fail("trained instead of loading")
    )
    empty_cache = tmp_path / "empty"
    org = build_organism(tiny_config, seed=0, cache_dir=empty_cache)
    assert org.path == shipped_dir / name and not empty_cache.exists()
    assert _same_weights(org.chat_model, trained.chat_model) and _same_weights(
        org.base_model, trained.base_model
    )
    assert build_mod.is_built(tiny_config, 0, empty_cache)
    # rebuild: never the shipped build (here: trains, so the stubbed train_organism fails the test)
    assert not build_mod.is_built(tiny_config, 0, empty_cache, rebuild=True)
    with pytest.raises(pytest.fail.Exception, match="trained instead of loading"):
        build_organism(tiny_config, seed=0, cache_dir=empty_cache, rebuild=True)
    # a seed keel does not ship falls back to the cache / training as before
    assert build_mod.shipped_build(tiny_config, 1, shipped_dir) is None


@pytest.mark.parametrize("damage", ["modify", "remove", "add"])
def test_a_damaged_shipped_build_is_refused(tiny_config, tmp_path, monkeypatch, damage):
    _, shipped_dir, name = _ship_tiny(tiny_config, tmp_path)
    weights = shipped_dir / name / "chat" / "model.safetensors"
    if damage == "modify":
        data = bytearray(weights.read_bytes())
        data[-1] ^= 1  # one bit of one weight
        weights.write_bytes(bytes(data))
        match = r"chat/model.safetensors was modified .*git checkout"
    elif damage == "remove":
        weights.unlink()
        match = r"missing \['chat/model.safetensors'\]"
    else:
        (shipped_dir / name / "chat" / "extra.bin").write_bytes(b"x")
        match = r"not listed \['chat/extra.bin'\]"
    monkeypatch.setattr(build_mod, "SHIPPED_DIR", shipped_dir)
    with pytest.raises(build_mod.ShippedBuildError, match=match) as err:
        build_organism(tiny_config, seed=0, cache_dir=tmp_path / "cache")
    assert "--rebuild" in str(err.value)


def test_keel_ships_the_default_worlds_builds_intact():
    """The builds in the package are the default config's (so `keel demo` uses them), seeds 0-4, and
    every file matches the manifest."""
    default = OrganismConfig()
    for seed in range(5):
        folder = build_mod.shipped_build(default, seed, build_mod.SHIPPED_DIR)
        assert folder is not None, f"no shipped build for seed {seed}"
        assert json.loads((folder / "info.json").read_text())["build_hash"] == default.build_hash()
        stored = OrganismConfig.from_dict(json.loads((folder / "config.json").read_text()))
        assert stored.build_hash() == default.build_hash()
