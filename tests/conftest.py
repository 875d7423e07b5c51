"""Shared fixtures: an offline tokenizer and tiny random-init models (no hub anywhere)."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tokenizer():
    from organisms.tokenizer import build_chat_tokenizer

    return build_chat_tokenizer()


@pytest.fixture
def make_model(tokenizer):
    from organisms.tiny_models import tiny_model

    def make(model_type: str = "qwen2", seed: int = 0, **overrides):
        return tiny_model(model_type, tokenizer=tokenizer, seed=seed, **overrides)

    return make


@pytest.fixture(scope="session")
def chat_dataset():
    from datasets import Dataset

    rows = []
    for i in range(32):
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"What is {i} plus {i % 7}?"},
                    {"role": "assistant", "content": f"The answer is {i + i % 7}."},
                ]
            }
        )
    return Dataset.from_list(rows)
