"""keel.loading: tiny models, saved folders, PEFT adapters, datasets by file or folder, and the refusals."""

import json
import sys
from pathlib import Path

import pytest
import torch
from datasets import IterableDataset
from trl import ModelConfig

from keel.loading import (
    LoadError,
    ModelSpec,
    kbit_device_map,
    load_dataset_any,
    load_model,
    quantization_config,
    resolve_dtype,
)

ROOT = Path(__file__).resolve().parents[3]
TINY_DATA = ROOT / "recipes/data/tiny_chat.jsonl"


def _logits(model, tokenizer, text="Quick question about rivers"):
    ids = tokenizer(text, return_tensors="pt").input_ids
    model.eval()  # from_config leaves train mode on (gpt2 has dropout)
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("arch", ["qwen2", "llama", "gpt2"])
def test_tiny_model_is_a_real_architecture_and_the_same_every_time(arch):
    model, tokenizer = load_model(f"tiny:{arch}")
    assert model.config.model_type == arch
    assert model.config.vocab_size == len(tokenizer)
    assert tokenizer.chat_template and "{% generation %}" in tokenizer.chat_template
    assert next(model.parameters()).dtype == torch.float32  # "auto" on the CPU
    again, _ = load_model(ModelSpec(f"tiny:{arch}"))
    weights, same = model.state_dict(), again.state_dict()
    assert weights.keys() == same.keys() and all(torch.equal(weights[k], same[k]) for k in weights)
    assert torch.equal(_logits(model, tokenizer), _logits(again, tokenizer))


def test_unknown_tiny_architecture_names_the_known_ones():
    with pytest.raises(LoadError, match=r"Unknown tiny model 'tiny:nope'.*qwen2"):
        load_model("tiny:nope")


def test_dtype_is_applied_and_checked():
    model, _ = load_model("tiny:qwen2", dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    with pytest.raises(LoadError, match="Unknown dtype 'fp8'"):
        resolve_dtype("fp8", "cpu")


def test_local_saved_folder_loads_the_same_model_and_tokenizer(tmp_path):
    model, tokenizer = load_model("tiny:qwen2")
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, loaded_tokenizer = load_model(ModelSpec(str(tmp_path), device="cpu"))
    assert loaded_tokenizer.chat_template == tokenizer.chat_template
    assert loaded_tokenizer("a b c").input_ids == tokenizer("a b c").input_ids
    assert torch.equal(_logits(loaded, loaded_tokenizer), _logits(model, tokenizer))
    # model_init_kwargs reach from_pretrained
    kwargs = {"use_cache": False, "dtype": "bfloat16"}
    no_cache, _ = load_model(ModelSpec(str(tmp_path), model_kwargs=kwargs))
    assert no_cache.config.use_cache is False and next(no_cache.parameters()).dtype == torch.bfloat16


def test_tiny_model_refuses_from_pretrained_kwargs():
    with pytest.raises(LoadError, match="model_init_kwargs"):
        load_model(ModelSpec("tiny:qwen2", model_kwargs={"use_cache": False}))


def test_peft_adapter_folder_loads_on_top_of_the_base(tmp_path):
    from peft import LoraConfig, get_peft_model

    base, tokenizer = load_model("tiny:qwen2")
    before = _logits(base, tokenizer)
    peft_model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)  # B starts at zero: make the adapter change the outputs
    expected = _logits(peft_model, tokenizer)
    assert not torch.allclose(expected, before)
    peft_model.save_pretrained(tmp_path / "adapter")

    model, _ = load_model(ModelSpec("tiny:qwen2", adapter=str(tmp_path / "adapter")))
    assert hasattr(model, "peft_config")
    assert torch.allclose(_logits(model, tokenizer), expected, atol=1e-5)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)
    trainable, _ = load_model(
        ModelSpec("tiny:qwen2", adapter=str(tmp_path / "adapter"), trainable_adapter=True)
    )
    assert any(p.requires_grad for n, p in trainable.named_parameters() if "lora_" in n)


def test_adapter_folder_without_adapter_config_is_refused(tmp_path):
    with pytest.raises(LoadError, match="no adapter_config.json"):
        load_model(ModelSpec("tiny:qwen2", adapter=str(tmp_path)))


# --- quantization --------------------------------------------------------------------------------------


def test_no_quantization_flags_no_config():
    assert quantization_config() is None
    assert quantization_config(model_args=ModelConfig(model_name_or_path="tiny:qwen2")) is None


def test_quantizing_a_tiny_model_is_refused_whatever_is_installed():
    with pytest.raises(LoadError, match="tiny:qwen2 is built in memory.*--load_in_4bit"):
        quantization_config(model_args=ModelConfig(model_name_or_path="tiny:qwen2", load_in_4bit=True))
    with pytest.raises(LoadError, match="built in memory"):
        load_model(ModelSpec("tiny:qwen2", quantization=object()))


@pytest.mark.parametrize("bits", [4, 8])
def test_quantization_without_bitsandbytes_names_it(monkeypatch, bits):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails, installed or not
    flags = {"load_in_4bit": bits == 4, "load_in_8bit": bits == 8}
    with pytest.raises(LoadError, match=rf"load_in_{bits}bit needs bitsandbytes.*pip install"):
        quantization_config(**flags)
    with pytest.raises(LoadError, match="bitsandbytes"):
        quantization_config(model_args=ModelConfig(model_name_or_path="some/model", **flags))


def test_quantized_models_are_placed_at_load_time():
    assert kbit_device_map("cpu") == {"": "cpu"}
    assert kbit_device_map(None) == ({"": 0} if torch.cuda.is_available() else None)


# --- datasets ----------------------------------------------------------------------------------------


def _write(path: Path, rows: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(r + "\n" for r in rows))
    return path


def test_single_file_is_the_train_split_and_has_no_other():
    dataset = load_dataset_any(str(TINY_DATA))
    assert len(dataset) == len(TINY_DATA.read_text().splitlines()) and "messages" in dataset.column_names
    with pytest.raises(LoadError, match=r"no split 'test' \(it has \['train'\]\).*test.jsonl"):
        load_dataset_any(str(TINY_DATA), split="test")


def test_folder_of_files_named_by_split(tmp_path):
    rows = TINY_DATA.read_text().splitlines()
    _write(tmp_path / "train.jsonl", rows[:10])
    _write(tmp_path / "test.jsonl", rows[10:13])
    (tmp_path / "README.md").write_text("not data")
    assert len(load_dataset_any(str(tmp_path), split="train")) == 10
    assert len(load_dataset_any(str(tmp_path), split="test")) == 3
    with pytest.raises(LoadError, match=r"no split 'validation' \(it has \['test', 'train'\]\)"):
        load_dataset_any(str(tmp_path), split="validation")


def test_folder_mixing_formats_or_repeating_a_split_is_refused(tmp_path):
    rows = TINY_DATA.read_text().splitlines()[:3]
    _write(tmp_path / "train.jsonl", rows)
    _write(tmp_path / "train.json", rows)
    with pytest.raises(LoadError, match="one file per split"):
        load_dataset_any(str(tmp_path))


def test_save_to_disk_folder(tmp_path):
    from datasets import Dataset, DatasetDict

    DatasetDict(
        {"train": Dataset.from_dict({"text": ["a", "b"]}), "test": Dataset.from_dict({"text": ["c"]})}
    ).save_to_disk(str(tmp_path))
    assert load_dataset_any(str(tmp_path), split="test")["text"] == ["c"]
    with pytest.raises(LoadError, match="no split 'dev'"):
        load_dataset_any(str(tmp_path), split="dev")


def test_empty_dataset_is_an_error(tmp_path):
    header_only = tmp_path / "empty.csv"
    header_only.write_text("prompt,completion\n")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "train.jsonl").write_text("")
    for empty in (header_only, tmp_path / "folder" / "train.jsonl", tmp_path / "folder"):
        with pytest.raises(LoadError, match=r"holds no rows; give one with examples"):
            load_dataset_any(str(empty))


def test_streaming_gives_an_iterable_dataset(tmp_path):
    rows = [json.dumps({"text": f"row {i}"}) for i in range(3)]
    data = _write(tmp_path / "train.jsonl", rows)
    streamed = load_dataset_any(str(data), streaming=True)
    assert isinstance(streamed, IterableDataset)
    assert [r["text"] for r in streamed] == ["row 0", "row 1", "row 2"]


def test_a_saved_tiny_model_reloads_with_the_same_tokenizer(tmp_path):
    """transformers 5 maps a qwen2 folder to Qwen2Tokenizer (which splits digits); the loader keeps the
    saved tokenizer, so tiny:qwen2 and its saved copy tokenize alike."""
    model, tokenizer = load_model("tiny:qwen2")
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    _, reloaded = load_model(str(tmp_path / "m"))
    text = "1 2 3 hello, 42 times"
    assert reloaded(text).input_ids == tokenizer(text).input_ids
    assert reloaded.chat_template == tokenizer.chat_template
