"""interventions.validation: causal tests of directions, ranking and selection."""

import pytest
import torch

from interventions import Intervention
from interventions.validation import ValidationResult, measure, rank_candidates, select, validate


@pytest.fixture
def model(make_model):
    return make_model("llama", seed=0).eval()


def _probe(model):
    """Mean probability of token 7 at the last position of a fixed batch."""
    with torch.no_grad():
        ids = torch.arange(5, 21).reshape(2, 8)
        return float(torch.softmax(model(input_ids=ids).logits[:, -1], -1)[:, 7].mean())


def _logits(model):
    with torch.no_grad():
        return model(input_ids=torch.arange(5, 21).reshape(2, 8)).logits


def test_validate_measures_and_cleans_up(model):
    before = _logits(model)
    direction = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    spec = Intervention("add", direction, layers=[1], coefficient=20.0)
    res = validate(model, spec, _probe, control_probe=_probe, name="steer")
    assert res.baseline == _probe(model) and res.intervened != res.baseline
    assert res.effect == res.baseline - res.intervened
    assert res.kept == pytest.approx(res.intervened / res.baseline)
    assert torch.equal(_logits(model), before)  # hooks removed, model untouched
    assert measure(model, [spec], _probe) == res.intervened


def test_zero_coefficient_has_zero_effect(model):
    d = torch.randn(model.config.hidden_size)
    res = validate(model, Intervention("project_out", d, layers=[0], coefficient=0.0), _probe)
    assert res.effect == 0.0 and res.relative_effect == 0.0


def test_rank_and_select(model):
    # steering the last layer along token 7's unembedding row: negative coefficients lower P(token 7)
    v = model.lm_head.weight[7].detach()
    cands = {f"c{c}": Intervention("add", v, layers=[1], coefficient=c) for c in [0.0, 10.0, -10.0, -30.0]}
    ranked = rank_candidates(model, cands, _probe, control_probe=_probe)
    effects = [r.effect for r in ranked]
    assert effects == sorted(effects, reverse=True) and {r.name for r in ranked} == set(cands)
    assert [r.name for r in ranked][-2:] == ["c0.0", "c10.0"]
    best = select(ranked, k=2)
    assert {r.name for r in best} == {"c-10.0", "c-30.0"}


def test_select_respects_the_control_and_fails_clearly():
    good = ValidationResult("good", 0.8, 0.1, 1.0, 0.95)
    broken = ValidationResult("broken", 0.8, 0.0, 1.0, 0.2)  # removes the persona by breaking the model
    assert [r.name for r in select([broken, good], k=1, min_kept=0.8)] == ["good"]
    with pytest.raises(ValueError, match="No candidate direction passed validation.*broken"):
        select([broken], min_kept=0.8)
    with pytest.raises(ValueError, match="at least one"):
        validate(None, [], _probe)
