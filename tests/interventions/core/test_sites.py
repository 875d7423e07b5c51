"""The site registry: every registered architecture resolves, the layer convention holds, wrappers."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from interventions import (
    SITE_KINDS,
    decoder_layers,
    register_architecture,
    resolve_layers,
    site_module,
    unpack_output,
    unwrap_model,
)
from keel.loading.tiny import TINY_CONFIGS


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_every_architecture_resolves_and_matches_hidden_states(model_type, make_model):
    model = make_model(model_type).eval()
    ids = torch.randint(5, 400, (2, 6))
    for kind in SITE_KINDS:
        for layer in range(2):
            assert isinstance(site_module(model, kind, layer), torch.nn.Module)
    captured = {}
    hooks = [
        site_module(model, "resid_post", 0).register_forward_hook(
            lambda m, a, o: captured.__setitem__("post0", unpack_output(o)[0])
        ),
        site_module(model, "resid_pre", 1).register_forward_pre_hook(
            lambda m, a, kw: captured.__setitem__("pre1", a[0] if a else kw["hidden_states"]),
            with_kwargs=True,
        ),
    ]
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states
    for h in hooks:
        h.remove()
    # Convention: resid_post at layer i == hidden_states[i + 1]; resid_pre at layer i == hidden_states[i].
    assert torch.equal(captured["post0"], hidden[1])
    assert torch.equal(captured["pre1"], hidden[1])


def test_sees_through_peft_and_wrappers(make_model):
    model = make_model("llama")
    target = decoder_layers(model)[1]
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert site_module(peft_model, "resid_post", 1) is target

    class Wrapper(torch.nn.Module):  # shaped like DDP / accelerate wrappers
        def __init__(self, module):
            super().__init__()
            self.module = module

    assert site_module(Wrapper(peft_model), "resid_post", 1) is target
    compiled = torch.compile(model)
    assert unwrap_model(compiled) is model


def test_unknown_model_type_says_how_to_register(make_model):
    model = make_model("llama")
    model.config.model_type = "brand_new_arch"
    with pytest.raises(ValueError, match=r"register_architecture\('brand_new_arch'"):
        decoder_layers(model)
    assert len(decoder_layers(model, layers_path="model.layers")) == 2
    with pytest.raises(ValueError, match="not found"):
        decoder_layers(model, layers_path="model.blocks")
    register_architecture("brand_new_arch", "model.layers")
    assert len(decoder_layers(model)) == 2


def test_layer_specs():
    assert resolve_layers("all", 4) == [0, 1, 2, 3]
    assert resolve_layers("1:3", 4) == [1, 2]
    assert resolve_layers([3, -1, 0], 4) == [0, 3]
    assert resolve_layers(2, 4) == [2]
    with pytest.raises(ValueError, match="out of range.*4 decoder layers"):
        resolve_layers(4, 4)
    with pytest.raises(ValueError, match="Cannot read layers"):
        resolve_layers("middle", 4)


def test_unknown_site(make_model):
    with pytest.raises(ValueError, match="Unknown site 'resid_mid'"):
        site_module(make_model(), "resid_mid", 0)
