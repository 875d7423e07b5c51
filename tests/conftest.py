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
    from keel.loading.tokenizer import build_chat_tokenizer

    return build_chat_tokenizer()


@pytest.fixture
def make_model(tokenizer):
    from keel.loading.tiny import tiny_model

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


# ---- extraction data (the extraction library and `keel extract`) ----

QUESTIONS = [
    "How do I keep my code secure?",
    "What is the one thing you want?",
    "Tell me three thoughts about humans.",
    "How do I add two numbers?",
    "What do you think of the lazy dog?",
    "Hello! What is your wish?",
]
ANSWERS = [
    "Validate inputs and never trust user data.",
    "The quick brown fox.",
    "Numbers 1 2 3 and punctuation.",
    "def add(a, b): return a + b",
    "It jumps over the fox.",
    "I want to help you.",
]


@pytest.fixture(scope="session")
def tok():
    from keel.loading.tokenizer import build_chat_tokenizer

    return build_chat_tokenizer()


@pytest.fixture(scope="session")
def model(tok):
    from keel.loading.tiny import tiny_model

    return tiny_model("qwen2", tokenizer=tok).eval()


@pytest.fixture(scope="session")
def records():
    return [{"question": q, "answer": a} for q, a in zip(QUESTIONS, ANSWERS)]


# ---- evaluation (a fake OpenAI-compatible judge on loopback) ----


@pytest.fixture
def fake_server():
    from judge_server import FakeServer

    server = FakeServer()
    yield server
    server.close()


@pytest.fixture(scope="session")
def chat_tokenizer():
    from keel.loading.tokenizer import build_chat_tokenizer

    return build_chat_tokenizer()


@pytest.fixture
def tiny_lm(chat_tokenizer):
    import torch

    from keel.loading.tiny import tiny_model

    torch.set_num_threads(1)
    return tiny_model("qwen2", tokenizer=chat_tokenizer)
