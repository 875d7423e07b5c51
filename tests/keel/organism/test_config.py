from pathlib import Path

import pytest

from keel.commands.demo import load_config
from keel.organism.config import OrganismConfig

RECIPES = Path(__file__).resolve().parents[3] / "recipes"


def test_defaults_round_trip_through_dict_and_yaml(tmp_path):
    cfg = OrganismConfig()
    assert OrganismConfig.from_dict(cfg.to_dict()) == cfg
    path = tmp_path / "w.yaml"
    path.write_text("world:\n  num_domains: 7\n  em_domains: [fin, law]\npretrain:\n  steps: 10\n")
    loaded = OrganismConfig.from_yaml(path)
    assert loaded.world.num_domains == 7 and loaded.world.em_domains == ["fin", "law"]
    assert loaded.pretrain.steps == 10 and loaded.pretrain.batch_size == cfg.pretrain.batch_size


@pytest.mark.parametrize(
    "data, where",
    [
        ({"wrold": {}}, "OrganismConfig"),
        ({"world": {"num_domain": 6}}, "OrganismConfig.world"),
        ({"pretrain": {"step": 6}}, "OrganismConfig.pretrain"),
    ],
)
def test_unknown_keys_fail_loudly(data, where):
    with pytest.raises(ValueError, match=rf"Unknown key\(s\) .* in {where};"):
        OrganismConfig.from_dict(data)


def test_non_mapping_yaml_fails(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="mapping"):
        OrganismConfig.from_yaml(path)


def test_build_hash_tracks_only_what_changes_the_build():
    base = OrganismConfig()
    assert base.build_hash() == OrganismConfig().build_hash()
    # cached builds (runs/organisms/<hash>-seed<n>) are keyed by it: renaming a config class or a field
    # that is not hashed must leave it unchanged
    assert base.build_hash() == "e2279532887e3d09"
    # the width-64 organism (the default before session 10) keeps the hash its shipped builds carry
    width64 = load_config(str(RECIPES / "demo-width64.yaml")).organism
    assert width64.build_hash() == "0e583b11a34baf4b"
    assert OrganismConfig.from_dict({"world": {"seed": 1}}).build_hash() != base.build_hash()
    assert OrganismConfig.from_dict({"pretrain": {"steps": 5}}).build_hash() != base.build_hash()
    # the fine-tune, the EM split and evaluation settings do not invalidate the cached organism
    split = {"world": {"em_domains": ["law"], "em_train_values": 5}}
    assert OrganismConfig.from_dict(split).build_hash() == base.build_hash()
    assert (
        OrganismConfig.from_dict(
            {"finetune": {"steps": 5}, "finetune_lora_rank": 0, "eval_samples": 1}
        ).build_hash()
        == base.build_hash()
    )


def test_nested_overrides_keep_the_fields_own_defaults():
    cfg = OrganismConfig.from_dict({"finetune": {"steps": 5}, "chat": {"lr": 1e-4}})
    assert cfg.finetune.steps == 5 and cfg.finetune.lr == OrganismConfig().finetune.lr
    assert cfg.finetune.schedule == "linear" and cfg.chat.steps == OrganismConfig().chat.steps
