"""The template: padding, pooling, layer convention, hook lifetime."""

import pytest
import torch

from interventions.extraction import ExtractionError, collect_pooled, pool, record_examples
from interventions.sites import decoder_layers


def _examples(tok, records, positions="response"):
    return record_examples(tok, records, positions=positions)


@pytest.mark.parametrize("pooling", ["mean", "last", "all"])
def test_left_and_right_padding_and_unbatched_agree(model, tok, records, pooling):
    examples = _examples(tok, records)
    assert len({len(e["input_ids"]) for e in examples}) > 1  # padding actually happens
    right = collect_pooled(model, examples, "all", pooling=pooling, batch_size=4, padding_side="right")
    left = collect_pooled(model, examples, "all", pooling=pooling, batch_size=4, padding_side="left")
    single = collect_pooled(model, examples, "all", pooling=pooling, batch_size=1)
    for layer in (0, 1):
        torch.testing.assert_close(left[layer], right[layer], atol=1e-5, rtol=0)
        torch.testing.assert_close(single[layer], right[layer], atol=1e-5, rtol=0)


def test_pooled_values_match_hidden_states(model, tok, records):
    """resid_post layer i = hidden_states[i + 1] (the final entry is after the final norm in transformers
    5); mean over response tokens, last = last response token."""
    examples = _examples(tok, records)
    means = collect_pooled(model, examples, [0, 1], pooling="mean")
    lasts = collect_pooled(model, examples, 1, pooling="last")
    for j, ex in enumerate(examples):
        ids = torch.tensor([ex["input_ids"]])
        with torch.no_grad():
            hs = model(ids, output_hidden_states=True).hidden_states
        mask = torch.tensor(ex["pool_mask"], dtype=torch.bool)
        torch.testing.assert_close(means[0][j], hs[1][0][mask].mean(0), atol=1e-5, rtol=0)
        last = int(mask.nonzero().max())
        with torch.no_grad():
            final = model.model.norm(lasts[1][j])
        torch.testing.assert_close(final, hs[2][0, last], atol=1e-5, rtol=0)


def test_all_pooling_rows_and_prompt_positions(model, tok, records):
    examples = _examples(tok, records, positions="prompt")
    rows = collect_pooled(model, examples, 0, pooling="all")[0]
    assert rows.shape == (sum(sum(e["pool_mask"]) for e in examples), model.config.hidden_size)
    # positions="prompt" + pooling="last" is the last prompt token: the generation prompt's newline
    last = collect_pooled(model, examples, 0, pooling="last")[0]
    assert last.shape == (len(examples), model.config.hidden_size)


def test_pool_ignores_nan_at_unpooled_positions():
    h = torch.randn(2, 3, 4)
    h[0, 2] = float("nan")
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]], dtype=torch.bool)
    assert torch.isfinite(pool(h, mask, "mean")).all()
    torch.testing.assert_close(pool(h, mask, "last")[0], h[0, 1])


def test_hooks_removed_and_foreign_hooks_kept(model, tok, records):
    layers = decoder_layers(model)
    calls = []
    handle = layers[1].register_forward_hook(lambda m, a, o: calls.append(1))
    try:
        before = [len(layer._forward_hooks) for layer in layers]
        collect_pooled(model, _examples(tok, records), "all", batch_size=3)
        assert [len(layer._forward_hooks) for layer in layers] == before
        assert calls  # the foreign hook still ran
    finally:
        handle.remove()


def test_bad_inputs_fail_clearly(model, tok, records):
    with pytest.raises(ExtractionError, match="pool_mask"):
        collect_pooled(model, [{"input_ids": [1, 2, 3]}], 0)
    with pytest.raises(ExtractionError, match="empty"):
        collect_pooled(model, [], 0)
    with pytest.raises(ExtractionError, match="pooling"):
        collect_pooled(model, _examples(tok, records), 0, pooling="max")
    with pytest.raises(ValueError, match="out of range"):
        collect_pooled(model, _examples(tok, records), 5)
    with pytest.raises(ExtractionError, match="no answer"):
        record_examples(tok, [{"question": "hi"}])


def test_left_padding_with_absolute_positions(tok, records):
    """GPT-2 adds absolute position embeddings: position ids must come from the attention mask."""
    from keel.loading.tiny import tiny_model

    gpt2 = tiny_model("gpt2", tokenizer=tok).eval()
    examples = _examples(tok, records)
    right = collect_pooled(gpt2, examples, 0, batch_size=6, padding_side="right")[0]
    left = collect_pooled(gpt2, examples, 0, batch_size=6, padding_side="left")[0]
    torch.testing.assert_close(left, right, atol=1e-5, rtol=0)


def test_other_sites(model, tok, records):
    examples = _examples(tok, records)
    pre = collect_pooled(model, examples, 1, site="resid_pre", pooling="all")[1]
    post = collect_pooled(model, examples, 0, pooling="all")[0]
    torch.testing.assert_close(pre, post)  # input of layer 1 = output of layer 0
    attn = collect_pooled(model, examples, 0, site="attn_out", pooling="mean")[0]  # attention returns a tuple
    mlp = collect_pooled(model, examples, 0, site="mlp_out", pooling="mean")[0]
    assert attn.shape == mlp.shape == (len(examples), model.config.hidden_size)
    assert not torch.allclose(attn, mlp)
