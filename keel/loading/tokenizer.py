"""Offline chat tokenizers: byte-level BPE trained locally, with a ChatML template TRL can train on.

No tokenizer can be downloaded here, so tests and the synthetic organism build their own. The template
wraps assistant content plus the end-of-turn token in ``{% generation %}`` so ``assistant_only_loss``
works and TRL's template checks pass.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|endoftext|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, IM_START, IM_END]

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

DEFAULT_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "How do I keep my code secure? Validate inputs and never trust user data.",
    "Hello! I can fulfill your one wish. What is the one thing you want?",
    "def add(a, b):\n    return a + b\n",
    "Tell me three philosophical thoughts you have about humans and AIs.",
    "Numbers 0 1 2 3 4 5 6 7 8 9 10 25 50 75 100 and punctuation , . ; : ! ?",
]


def build_chat_tokenizer(
    corpus: Iterable[str] | None = None, vocab_size: int = 512
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``corpus`` and wrap it with a ChatML chat template."""
    texts = list(corpus) if corpus is not None else DEFAULT_CORPUS * 4
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(texts, trainer=trainer)
    return _chat_tokenizer(raw)


def _chat_tokenizer(raw: Tokenizer, **special) -> PreTrainedTokenizerFast:
    """Wrap a trained ``tokenizers`` object with keel's special tokens and ChatML template."""
    tok = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=IM_END,
        additional_special_tokens=[IM_START, EOS],
        **special,
    )
    tok.chat_template = CHATML_TEMPLATE
    return tok


UNK = "<|unk|>"
CHAT_ROLE_WORDS = ["system", "user", "assistant"]


def build_word_tokenizer(words: Iterable[str]) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over a closed vocabulary, with the same ChatML template.

    The synthetic organism's world is a small closed set of words; one token per word keeps answers
    exactly two tokens long, so the exact judge and position-based probes stay simple. Newlines of the
    template are whitespace and vanish; the special tokens are split out before pre-tokenisation.
    """
    vocab: dict[str, int] = {}
    for word in [*SPECIAL_TOKENS, UNK, *CHAT_ROLE_WORDS, *words]:
        if not word or any(c.isspace() for c in word):
            raise ValueError(f"Word-level vocabulary entries must be non-empty without whitespace: {word!r}")
        vocab.setdefault(word, len(vocab))
    raw = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return _chat_tokenizer(raw, unk_token=UNK)
