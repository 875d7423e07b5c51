"""Fixtures for the evaluation tests: a fake OpenAI-compatible server on loopback, tiny local models."""

from __future__ import annotations

import pytest
from judge_server import FakeServer


@pytest.fixture
def fake_server():
    server = FakeServer()
    yield server
    server.close()


@pytest.fixture(scope="session")
def chat_tokenizer():
    from organisms.tokenizer import build_chat_tokenizer

    return build_chat_tokenizer()


@pytest.fixture
def tiny_lm(chat_tokenizer):
    import torch

    from organisms.tiny_models import tiny_model

    torch.set_num_threads(1)
    return tiny_model("qwen2", tokenizer=chat_tokenizer)
