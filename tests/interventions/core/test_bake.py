"""Baked weights equal hooks: the stream bake against hooks at every write (resid_pre 0 + attn_out + mlp_out),
on every registered pre-norm architecture (GPT-2's Conv1D, GPT-NeoX, tied and scaled embeddings), the
parallel-residual resid_post bake, the writer sites, save/reload, and every refusal."""

import copy

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from interventions import Direction, Intervention, InterventionSet, save_directions
from interventions.bake import (
    BAKED_KEY,
    WRITERS,
    BakeError,
    bake_ablation,
    bake_intervention,
    bake_project_out,
    baked_record,
    check_bakeable,
    equivalent_interventions,
)
from interventions.direction import random_direction
from keel.loading import load_model

D = 64
TOL = 1e-4  # float32 logits; measured 1e-7 .. 4e-7 on these models


def _ids(seed=1, shape=(2, 9)):
    return torch.randint(5, 400, shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def build(make_model, tokenizer):
    """Tiny eval-mode models; ``gemma`` (v1: tied, sqrt(d)-scaled embeddings) is built here, as keel's tiny
    registry has no config for it."""

    def make(arch, **overrides):
        if arch == "gemma":
            config = AutoConfig.for_model(
                "gemma",
                hidden_size=D,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=16,
                vocab_size=len(tokenizer),
                max_position_embeddings=256,
                **overrides,
            )
            torch.manual_seed(0)
            return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
        return make_model(arch, **overrides).eval()

    return make


def _hooked(model, specs, ids):
    with torch.no_grad(), InterventionSet(model, specs) as iset, iset.phase("train"):
        return model(ids).logits


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _check_equal(model, baked, specs, ids=None):
    """Baked logits equal hooked logits, and the intervention moves them (the test is not vacuous)."""
    ids = _ids() if ids is None else ids
    expected, plain, got = _hooked(model, specs, ids), _logits(model, ids), _logits(baked, ids)
    assert (expected - plain).abs().max() > 1e-2
    diff = (got - expected).abs().max().item()
    assert diff < TOL, diff
    return diff


BASIS = random_direction(D, k=3, seed=4)
WITH_MEAN = Direction(BASIS.vectors, mean=torch.tensor([0.7, -1.2, 2.0]), normalization="orthonormal")

ARCHS = [
    ("llama", {}),
    ("llama", {"attention_bias": True, "mlp_bias": True}),
    ("qwen2", {}),
    ("qwen2", {"tie_word_embeddings": True}),
    ("qwen3", {}),
    ("mistral", {}),
    ("phi3", {}),
    ("gpt_neox", {}),
    ("gpt_neox", {"use_parallel_residual": False}),
    ("gpt2", {}),
    ("gpt2", {"tie_word_embeddings": True}),
    ("gemma", {}),
]


@pytest.mark.parametrize(
    "arch,overrides", ARCHS, ids=[f"{a}{'-' + '-'.join(o) if o else ''}" for a, o in ARCHS]
)
def test_stream_bake_equals_hooks_at_every_write(build, arch, overrides):
    model = build(arch, **overrides)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    baked = bake_project_out(copy.deepcopy(model), BASIS)
    _check_equal(model, baked, equivalent_interventions(BASIS))
    # the stream has no component along the basis after every block, and the unembedding is untouched
    with torch.no_grad():
        hidden = baked(_ids(), output_hidden_states=True).hidden_states
    for h in hidden[:-1]:  # the last entry has the final norm applied
        assert (h @ BASIS.vectors.T).abs().max() < 1e-4
    head, embedding = baked.get_output_embeddings().weight, baked.get_input_embeddings().weight
    assert head.data_ptr() != embedding.data_ptr()
    assert torch.equal(head, model.get_output_embeddings().weight)
    record = baked_record(baked)["bakes"][-1]
    assert record["untied_lm_head"] is tied and baked.config.tie_word_embeddings is False
    assert record["site"] == "stream" and record["layers"] == [0, 1] and record["k"] == 3


@pytest.mark.parametrize(
    "arch,overrides", [("qwen2", {"tie_word_embeddings": True}), ("gpt2", {}), ("gemma", {})]
)
@pytest.mark.parametrize("operator", ["mean_ablate", "clamp"])
def test_mean_and_clamp_stream_bake_offset_in_embedding(build, arch, overrides, operator):
    """The constant goes into the embedding rows once (divided by Gemma's embedding scale)."""
    model = build(arch, **overrides)
    direction, value = (WITH_MEAN, None) if operator == "mean_ablate" else (BASIS, 1.5)
    baked = bake_ablation(copy.deepcopy(model), direction, operator, value=value)
    _check_equal(model, baked, equivalent_interventions(direction, operator, value=value))


def test_stream_bake_is_not_block_boundary_hooks_on_sequential_blocks(build):
    """The placement is pinned: on a sequential block the MLP reads the attention's write before a resid_post
    hook removes it, so hooks at resid_pre 0 + resid_post all give another model, and that bake is refused."""
    model = build("llama")
    baked = bake_project_out(copy.deepcopy(model), BASIS)
    ids = _ids()
    block_hooks = equivalent_interventions(BASIS, site="resid_post")
    assert (_logits(baked, ids) - _hooked(model, block_hooks, ids)).abs().max() > 1e-3
    with pytest.raises(BakeError, match="sequential.*Bake site stream"):
        bake_project_out(copy.deepcopy(model), BASIS, site="resid_post")


def test_resid_post_bake_on_parallel_residual_blocks(build):
    """GPT-NeoX's parallel blocks have no mid-block point: there resid_post at every layer is exact."""
    model = build("gpt_neox")
    assert model.config.use_parallel_residual
    baked = bake_project_out(copy.deepcopy(model), BASIS, site="resid_post")
    specs = equivalent_interventions(BASIS, site="resid_post")
    assert [(s.site, s.layers) for s in specs] == [("resid_pre", [0]), ("resid_post", "all")]
    _check_equal(model, baked, specs)


@pytest.mark.parametrize(
    "arch,site,operator,coefficient",
    [
        ("llama", "attn_out", "project_out", 0.5),
        ("qwen2", "mlp_out", "project_out", 1.0),
        ("gpt2", "mlp_out", "clamp", 1.0),
        ("gpt_neox", "attn_out", "clamp", 0.7),
        ("gemma3_text", "attn_out", "project_out", 1.0),  # post-norm architecture: exact at the writer
    ],
)
def test_writer_sites_at_some_layers(build, arch, site, operator, coefficient):
    model = build(arch)
    value = 1.5 if operator == "clamp" else None
    args = dict(value=value, coefficient=coefficient)
    baked = bake_ablation(copy.deepcopy(model), BASIS, operator, [1], site, **args)
    specs = equivalent_interventions(BASIS, operator, site, [1], **args)
    assert [(s.site, s.layers) for s in specs] == [(site, [1])]
    _check_equal(model, baked, specs)
    assert baked_record(baked)["bakes"][-1]["untied_lm_head"] is False


def test_writer_sites_use_each_layers_own_direction(build, tmp_path):
    model = build("qwen2")
    path = save_directions(
        [Direction(random_direction(D, k=2, seed=s).vectors, layer=s) for s in (0, 1)],
        tmp_path / "per_layer.safetensors",
    )
    baked = bake_project_out(copy.deepcopy(model), path, layers="all", site="attn_out")
    _check_equal(model, baked, equivalent_interventions(path, site="attn_out", layers="all"))
    record = baked_record(baked)["bakes"][-1]
    assert record["direction_layers"] == [0, 1] and record["direction_file"]["sha256"]
    with pytest.raises(BakeError, match="different directions at different layers"):
        bake_project_out(copy.deepcopy(model), path)
    # a per-layer file at the stream: one of them, or the union of their rows
    one = bake_project_out(copy.deepcopy(model), path, direction_layer=1)
    _check_equal(model, one, equivalent_interventions(path, direction_layer=1))
    both = bake_project_out(copy.deepcopy(model), path, union=True)
    _check_equal(model, both, equivalent_interventions(path, union=True))
    assert baked_record(both)["bakes"][-1]["k"] == 4
    with pytest.raises(BakeError, match="direction_layer.*union"):
        bake_project_out(copy.deepcopy(model), [Direction(torch.randn(D)), Direction(torch.randn(D))])


def test_stream_bake_applies_a_single_layer_direction_everywhere(build, tmp_path):
    """A direction extracted at one layer is baked into the whole stream, as direction_layer says."""
    model = build("qwen2")
    path = Direction(BASIS.vectors, layer=1, method="judged").save(tmp_path / "l1.safetensors")
    baked = bake_project_out(copy.deepcopy(model), path)
    specs = equivalent_interventions(path)
    assert {s.direction_layer for s in specs} == {1}
    _check_equal(model, baked, specs)
    assert baked_record(baked)["bakes"][-1]["direction_layers"] == [1]


def test_baking_twice_equals_once_and_records_both(build):
    model = build("qwen2")
    once = bake_project_out(copy.deepcopy(model), BASIS)
    twice = bake_project_out(bake_project_out(copy.deepcopy(model), BASIS), BASIS)
    assert (_logits(once, _ids()) - _logits(twice, _ids())).abs().max() < 1e-5
    assert len(baked_record(twice)["bakes"]) == 2


@pytest.mark.parametrize("arch,overrides", [("qwen2", {"tie_word_embeddings": True}), ("gpt2", {})])
def test_saved_baked_model_reloads_equal(build, tokenizer, tmp_path, arch, overrides):
    model = build(arch, **overrides)
    direction = Direction(BASIS.vectors, model_id=f"tiny:{arch}", method="test", normalization="orthonormal")
    path = direction.save(tmp_path / "dir.safetensors")
    baked = bake_project_out(copy.deepcopy(model), path)
    baked.save_pretrained(tmp_path / "baked")
    tokenizer.save_pretrained(tmp_path / "baked")
    reloaded, _ = load_model(str(tmp_path / "baked"))
    reloaded.eval()
    assert (_logits(reloaded, _ids()) - _logits(baked, _ids())).abs().max() == 0
    _check_equal(model, reloaded, equivalent_interventions(path))
    record = baked_record(reloaded)
    assert record == baked_record(baked) and getattr(reloaded.config, BAKED_KEY) == record
    entry = record["bakes"][0]
    assert entry["direction"]["model_id"] == f"tiny:{arch}" and entry["direction"]["method"] == "test"
    assert entry["direction_file"]["path"] == str(path) and len(entry["basis_sha256"]) == 64
    assert "attn_out and mlp_out at every layer" in entry["equivalent_hooks"]
    assert (
        reloaded.get_output_embeddings().weight.data_ptr()
        != reloaded.get_input_embeddings().weight.data_ptr()
    )


# ---- refusals ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "operator,match",
    [
        ("add", "bias on the residual stream.*GGUF control vector"),
        ("reference_ablate", "second forward pass"),
        ("resample_ablate", "reference pass"),
    ],
)
def test_operators_that_cannot_be_baked(build, operator, match):
    model = build("qwen2")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(BakeError, match=match):
        bake_ablation(model, BASIS, operator)
    spec = Intervention(operator, BASIS, layers="all", phases=["train", "eval"])
    with pytest.raises(BakeError, match=match):
        bake_intervention(model, spec)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    "spec,match",
    [
        ({"tokens": "completion"}, "tokens='completion' cannot be baked"),
        ({"schedule": {"kind": "linear_warmup", "steps": 10}}, "linear_warmup schedule"),
        ({"site": "resid_pre", "layers": [0]}, "resid_pre hook alone"),
        ({"site": "resid_post", "coefficient": 0.5}, "coefficient 0.5 at resid_post"),
    ],
)
def test_spec_refusals(spec, match):
    data = {"operator": "project_out", "direction": BASIS, "layers": "all", **spec}
    with pytest.raises(BakeError, match=match):
        check_bakeable(data)


def test_model_dependent_refusals(build, monkeypatch):
    model = build("qwen2", tie_word_embeddings=True)
    model.model.layers[0].self_attn.o_proj.bias = torch.nn.Parameter(torch.zeros(D))  # layer 1 has none
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(BakeError, match="partial set cannot be baked"):
        bake_project_out(model, BASIS, layers=[1])
    with pytest.raises(BakeError, match="coefficient 0.5 at stream"):
        bake_project_out(model, BASIS, coefficient=0.5)
    with pytest.raises(BakeError, match="needs a bias on model.layers.1.self_attn.o_proj"):
        bake_ablation(model, BASIS, "clamp", "all", "attn_out", value=1.0)
    with pytest.raises(BakeError, match="mean_ablate needs the direction's reference mean"):
        bake_ablation(model, BASIS, "mean_ablate")
    with pytest.raises(BakeError, match="Unknown bake site"):
        bake_project_out(model, BASIS, site="resid")
    with pytest.raises(Exception, match="width 32 but the model's hidden size is 64"):
        bake_project_out(model, random_direction(32, k=1))
    monkeypatch.delitem(WRITERS, "qwen2")
    with pytest.raises(BakeError, match="register_writers"):
        bake_project_out(model, BASIS)
    # every refusal came before any edit: weights, tying and config as they were
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert baked_record(model) is None


@pytest.mark.parametrize("arch", ["gemma2", "gemma3_text", "olmo2"])
def test_post_norm_architectures_refuse_the_stream(build, arch):
    model = build(arch, tie_word_embeddings=True)
    with pytest.raises(BakeError, match="norm \\*after\\* the attention and MLP"):
        bake_project_out(model, BASIS)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # untouched


def test_adapter_and_quantized_weights_are_refused(build):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(build("qwen2"), LoraConfig(r=2, target_modules=["o_proj"]))
    with pytest.raises(BakeError, match="merge_and_unload"):
        bake_project_out(peft_model, BASIS)
    model = build("qwen2")
    model.model.layers[0].self_attn.o_proj.weight = torch.nn.Parameter(
        torch.zeros(D, D, dtype=torch.uint8), requires_grad=False
    )
    with pytest.raises(BakeError, match="quantized"):
        bake_project_out(model, BASIS)
