"""Random-init tiny configs of real HF architectures, for tests, benchmarks and the synthetic organism.

Every registered ``model_type`` of the site registry has a tiny config here, so the same code paths
(sites, trainers, extraction) run on them as on full-size checkpoints.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

_COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)

TINY_CONFIGS: dict[str, dict] = {
    "llama": dict(_COMMON),
    "qwen2": dict(_COMMON),
    "qwen3": dict(_COMMON, head_dim=16),
    "mistral": dict(_COMMON, sliding_window=None),
    "gemma2": dict(_COMMON, head_dim=16),
    "gemma3_text": dict(_COMMON, head_dim=16),
    "phi3": dict(_COMMON),
    "olmo2": dict(_COMMON),
    "gpt_neox": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    ),
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_positions=256, tie_word_embeddings=False),
}


def tiny_model(
    model_type: str = "qwen2", vocab_size: int = 512, seed: int = 0, tokenizer=None, **overrides
) -> PreTrainedModel:
    """Build a random-init float32 causal LM of ``model_type``; special-token ids come from ``tokenizer``."""
    if model_type not in TINY_CONFIGS:
        raise ValueError(f"No tiny config for model_type {model_type!r}; known: {sorted(TINY_CONFIGS)}.")
    ids = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 4}
    if tokenizer is not None:
        vocab_size = len(tokenizer)
        ids = {k: getattr(tokenizer, k) for k in ids}
    kwargs = dict(TINY_CONFIGS[model_type], vocab_size=vocab_size, **ids)
    kwargs.update(overrides)
    config = AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)
