"""The organism's data go through keel's InterventionSFTTrainer (TRL SFT with assistant-only loss)."""

import torch

from keel.organism.build import train_organism
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
    plain = finetune_plain(org, seed=0)
    assert not torch.equal(plain.lm_head.weight, org.chat_model.lm_head.weight)


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
