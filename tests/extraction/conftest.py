import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from organisms.tiny_models import tiny_model  # noqa: E402
from organisms.tokenizer import build_chat_tokenizer  # noqa: E402

torch.set_num_threads(1)

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
    return build_chat_tokenizer()


@pytest.fixture(scope="session")
def model(tok):
    return tiny_model("qwen2", tokenizer=tok).eval()


@pytest.fixture(scope="session")
def records():
    return [{"question": q, "answer": a} for q, a in zip(QUESTIONS, ANSWERS)]
