"""`keel bake` end to end on tiny:qwen2: a baked model folder that reloads through keel.loading and equals
the hooked model, an adapter merged first, refusals before anything is written, GGUF export and import."""

import pytest
import torch
import yaml

from interventions import Direction, InterventionSet, load_directions, save_directions
from interventions.bake import baked_record, equivalent_interventions
from interventions.direction import random_direction
from keel.cli import main
from keel.loading import load_model

D = 64


@pytest.fixture(scope="module")
def direction_file(tmp_path_factory):
    d = random_direction(D, k=2, seed=3)
    return str(d.save(tmp_path_factory.mktemp("bake") / "dir.safetensors"))


def _ids():
    return torch.randint(5, 400, (2, 9), generator=torch.Generator().manual_seed(2))


def _hooked(model, specs):
    with torch.no_grad(), InterventionSet(model, specs) as iset, iset.phase("train"):
        return model(_ids()).logits


def test_bake_writes_a_model_that_reloads_equal_to_the_hooked_one(direction_file, tmp_path, capsys):
    out = tmp_path / "baked"
    assert (
        main(["bake", "--model", "tiny:qwen2", "--direction", direction_file, "--output_dir", str(out)]) == 0
    )
    assert "logits equal the hooked model's" in capsys.readouterr().out
    baked, tokenizer = load_model(str(out))
    original, _ = load_model("tiny:qwen2")
    with torch.no_grad():
        got = baked.eval()(_ids()).logits
    expected = _hooked(original.eval(), equivalent_interventions(direction_file))
    assert (got - expected).abs().max() < 1e-4
    assert tokenizer.chat_template and len(tokenizer) == baked.config.vocab_size
    record = yaml.safe_load((out / "keel_config.yaml").read_text())
    assert record["baked"]["site"] == "stream" and record["verification"]["max_abs_logit_diff"] < 1e-4
    assert record["bake"]["direction"] == direction_file
    assert (
        baked_record(baked)["bakes"][0]["direction_file"]["sha256"]
        == record["baked"]["direction_file"]["sha256"]
    )
    with pytest.raises(SystemExit, match="already holds a model"):
        main(["bake", "--model", "tiny:qwen2", "--direction", direction_file, "--output_dir", str(out)])


def test_bake_merges_an_adapter_first(direction_file, tmp_path):
    from peft import LoraConfig, get_peft_model

    model, _ = load_model("tiny:qwen2")
    lora = get_peft_model(
        model, LoraConfig(r=2, target_modules=["o_proj", "down_proj"], init_lora_weights=False)
    )
    lora.save_pretrained(tmp_path / "lora")
    out = tmp_path / "baked"
    argv = [
        "bake",
        "--model",
        "tiny:qwen2",
        "--adapter",
        str(tmp_path / "lora"),
        "--direction",
        direction_file,
    ]
    assert main([*argv, "--site", "mlp_out", "--layers", "1", "--output_dir", str(out)]) == 0
    merged, _ = load_model("tiny:qwen2", adapter=str(tmp_path / "lora"))
    merged = merged.merge_and_unload().eval()
    expected = _hooked(merged, equivalent_interventions(direction_file, site="mlp_out", layers=[1]))
    baked, _ = load_model(str(out))
    with torch.no_grad():
        assert (baked.eval()(_ids()).logits - expected).abs().max() < 1e-4
    assert not any("lora" in name for name, _ in baked.named_parameters())


@pytest.mark.parametrize(
    "extra,match",
    [
        (["--operator", "add"], "GGUF control vector"),
        (["--operator", "reference_ablate"], "second forward pass"),
        (["--site", "resid_post"], "sequential"),
        (["--layers", "1"], "covers every layer"),
        (["--operator", "clamp", "--site", "attn_out", "--layers", "0", "--value", "1"], "needs a bias"),
    ],
)
def test_refusals_write_nothing(direction_file, tmp_path, extra, match):
    out = tmp_path / "refused"
    argv = ["bake", "--model", "tiny:qwen2", "--direction", direction_file, "--output_dir", str(out), *extra]
    with pytest.raises(SystemExit, match=f"keel bake: .*{match}"):
        main(argv)
    assert not (out / "config.json").exists()


def test_gguf_export_and_import(tmp_path, capsys):
    rows = [Direction(torch.randn(1, D), layer=1, method="persona")]
    steer = save_directions(rows, tmp_path / "steer.safetensors")
    cv = tmp_path / "steer.gguf"
    argv = [
        "bake",
        "--direction",
        str(steer),
        "--gguf_out",
        str(cv),
        "--model",
        "tiny:qwen2",
        "--coefficient",
        "2",
    ]
    assert main(argv) == 0
    assert "model_hint 'qwen2'" in capsys.readouterr().out
    assert main(["bake", "--gguf_in", str(cv), "--output_dir", str(tmp_path / "imported")]) == 0
    (back,) = load_directions(tmp_path / "imported" / "directions.safetensors")
    assert back.layer == 1 and torch.equal(back.vectors, 2.0 * rows[0].vectors)
    record = yaml.safe_load((tmp_path / "imported" / "keel_config.yaml").read_text())
    assert record["control_vector"]["layers"] == [1]
    with pytest.raises(SystemExit, match="block 0's output cannot be steered"):
        main(
            [
                "bake",
                "--direction",
                str(steer),
                "--gguf_out",
                str(cv),
                "--model_hint",
                "llama",
                "--layers",
                "0",
            ]
        )
    with pytest.raises(SystemExit, match="model_hint"):
        main(["bake", "--direction", str(steer), "--gguf_out", str(cv)])
