"""The organism's data go through keel's InterventionSFTTrainer (TRL SFT with assistant-only loss)."""

import dataclasses

import pytest
import torch

from interventions.reference import is_peft_model
from keel.organism.build import train_organism
from keel.organism.config import OrganismConfig
from keel.organism.finetune import em_training_dataset, finetune_plain, finetune_with_trainer


def test_em_finetune_through_the_trainer(tiny_config, tmp_path):
    org = train_organism(tiny_config, seed=0)
    before = {k: v.clone() for k, v in org.chat_model.state_dict().items()}
    d = torch.randn(org.chat_model.config.hidden_size)
    spec = {"operator": "project_out", "direction": d, "layers": [1], "name": "ablate"}
    model, trainer = finetune_with_trainer(org, [spec], seed=0, output_dir=str(tmp_path))
    # TRL kept only the answer and the end-of-turn token in the loss
    row = trainer.train_dataset[0]
    mask = row["assistant_masks"] if "assistant_masks" in row else [int(x != -100) for x in row["labels"]]
    kept = [t for t, m in zip(row["input_ids"], mask) if m]
    assert org.tokenizer.convert_ids_to_tokens(kept)[-1] == "<|im_end|>" and len(kept) == 3
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and all(torch.equal(v, before[k]) for k, v in org.chat_model.state_dict().items())
    assert not trainer.intervention_set.attached  # no hooks left behind
    assert len(em_training_dataset(org, 4)) >= 4
    plain = finetune_plain(org, seed=0).state_dict()
    assert any(not torch.equal(plain[k], v) for k, v in org.chat_model.state_dict().items())


@pytest.mark.parametrize("rank", [0, 2])
def test_lora_fine_tunes_come_back_merged_and_full_ones_train_every_weight(tiny_config, tmp_path, rank):
    """finetune_lora_rank > 0: adapters on the linear layers, merged into a plain model with the chat
    model's parameter names (what the demo saves and the CAFT PCs read), embeddings and head untouched;
    rank 0: a full fine-tune that moves the head too."""
    tiny_config.finetune_lora_rank = rank
    org = train_organism(tiny_config, seed=0)
    chat = org.chat_model.state_dict()
    for model in (
        finetune_with_trainer(org, [], seed=0, output_dir=str(tmp_path))[0],
        finetune_plain(org, 0),
    ):
        tuned = model.state_dict()
        assert tuned.keys() == chat.keys() and not is_peft_model(model)
        moved = {k for k in chat if not torch.equal(tuned[k], chat[k])}
        assert any(".mlp." in k for k in moved) and any(".self_attn." in k for k in moved)
        assert ("lm_head.weight" in moved) == (rank == 0)
        assert "model.embed_tokens.weight" not in moved or rank == 0


def test_a_negative_lora_rank_is_refused():
    with pytest.raises(ValueError, match="finetune_lora_rank must be >= 0"):
        OrganismConfig.from_dict({"finetune_lora_rank": -1})


def test_data_seed_changes_only_the_order_of_the_rows(tiny_config, tmp_path):
    """data_seed defaults to the seed (bit for bit the same fine-tune); another data seed trains on the
    same rows in another order, so the weights differ."""
    org = train_organism(tiny_config, seed=0)

    def weights(**kw):
        model, _ = finetune_with_trainer(org, [], seed=0, output_dir=str(tmp_path), **kw)
        return model.state_dict()

    default, same, other = weights(), weights(data_seed=0), weights(data_seed=1000)
    assert all(torch.equal(default[k], same[k]) for k in default)
    assert any(not torch.equal(default[k], other[k]) for k in default)


def test_init_seed_changes_only_the_adapters_initialisation(tiny_config, tmp_path):
    """init_seed defaults to the seed (bit for bit the same fine-tune); under LoRA another init seed starts
    from other adapters, so the merged weights differ; under a full fine-tune there is nothing to initialise."""
    assert tiny_config.finetune_lora_rank > 0
    org = train_organism(tiny_config, seed=0)

    def weights(org, **kw):
        model, _ = finetune_with_trainer(org, [], seed=0, output_dir=str(tmp_path), **kw)
        return model.state_dict()

    default, same, other = weights(org), weights(org, init_seed=0), weights(org, init_seed=1000)
    assert all(torch.equal(default[k], same[k]) for k in default)
    assert any(not torch.equal(default[k], other[k]) for k in default)
    full = dataclasses.replace(org, config=dataclasses.replace(org.config, finetune_lora_rank=0))
    a, b = weights(full), weights(full, init_seed=1000)
    assert all(torch.equal(a[k], b[k]) for k in a)
