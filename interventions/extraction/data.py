"""Turn records (JSONL rows) into extraction examples: token ids plus the mask of positions to pool.

A chat example is the tokenizer's chat template rendering of the prompt (system, user, ... up to the
assistant turn, with the generation prompt) followed by the answer's tokens. ``positions`` picks what
is pooled: ``response`` (the answer tokens), ``prompt`` (everything before; with ``pooling="last"`` this
is the last prompt token) or ``all``. Rendering the prompt and the answer separately works with any chat
template, also those without ``{% generation %}`` markers.

Record fields (one JSON object per line):

- ``question`` (str) and ``answer`` (str), optionally ``system`` (str); or
- ``messages``: a list of ``{"role", "content"}``; if the last message is the assistant's, it is the
  answer; or
- ``text`` (str): plain text without a chat template (corpora for ``inspect``).
- For contrastive extraction, ``positive_answer`` / ``negative_answer`` override ``answer`` per side, and
  ``positive_score`` / ``negative_score`` (e.g. trait scores 0..100 from a judge) allow filtering.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence

from ..generation import Prompt, SamplingConfig, generate_answers
from ..serialization import read_jsonl  # noqa: F401  (re-exported: extraction reads JSONL records)
from .core import ExtractionError

POSITIONS = ("response", "prompt", "all")


def _ids(encoded) -> list[int]:
    """Token ids from ``apply_chat_template``/``tokenizer`` output (a list or a BatchEncoding)."""
    if hasattr(encoded, "keys"):
        encoded = encoded["input_ids"]
    return list(encoded)


def _mask(n_prompt: int, n_answer: int, positions: str) -> list[int]:
    if positions == "response":
        return [0] * n_prompt + [1] * n_answer
    if positions == "prompt":
        return [1] * n_prompt + [0] * n_answer
    if positions == "all":
        return [1] * (n_prompt + n_answer)
    raise ExtractionError(f"Unknown positions {positions!r}: choose one of {', '.join(POSITIONS)}.")


def chat_example(
    tokenizer,
    prompt_messages: Sequence[dict],
    answer: str,
    positions: str = "response",
    max_length: int | None = None,
) -> dict:
    """One example: the chat-templated prompt (with the generation prompt) followed by ``answer``."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ExtractionError(
            "The tokenizer has no chat_template: use a chat model's tokenizer, or `text` records for plain text."
        )
    prompt_text = tokenizer.apply_chat_template(
        list(prompt_messages), tokenize=False, add_generation_prompt=True
    )
    prompt_ids = _ids(tokenizer(prompt_text, add_special_tokens=False))
    answer_ids = _ids(tokenizer(answer, add_special_tokens=False)) if answer else []
    input_ids = prompt_ids + answer_ids
    pool_mask = _mask(len(prompt_ids), len(answer_ids), positions)
    if max_length is not None:
        input_ids, pool_mask = input_ids[:max_length], pool_mask[:max_length]
    return {"input_ids": input_ids, "pool_mask": pool_mask}


def text_example(tokenizer, text: str, max_length: int | None = None) -> dict:
    """Plain text, every token pooled (a web-text corpus for interpretation)."""
    ids = _ids(tokenizer(text, add_special_tokens=False))
    if max_length is not None:
        ids = ids[:max_length]
    return {"input_ids": ids, "pool_mask": [1] * len(ids)}


def split_record(
    record: dict, system: str | None = None, answer_key: str = "answer"
) -> tuple[list[dict], str]:
    """(prompt messages, answer) of a record; ``system`` replaces any system message when given."""
    if "messages" in record:
        messages = [dict(m) for m in record["messages"]]
        answer = ""
        if messages and messages[-1].get("role") == "assistant":
            answer = messages.pop()["content"]
        if answer_key != "answer" and answer_key in record:
            answer = record[answer_key]
        if system is not None:
            messages = [m for m in messages if m.get("role") != "system"]
            messages.insert(0, {"role": "system", "content": system})
        return messages, answer
    if "question" not in record:
        raise ExtractionError(
            f"Record {_short(record)} has neither 'question' nor 'messages': each line needs a question and an "
            "answer, or a messages list."
        )
    system = system if system is not None else record.get("system")
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": record["question"]}
    ]
    answer = record.get(answer_key, record.get("answer", ""))
    return messages, answer or ""


def record_examples(
    tokenizer,
    records: Iterable[dict],
    system: str | None = None,
    positions: str = "response",
    answer_key: str = "answer",
    max_length: int | None = None,
) -> list[dict]:
    """Chat examples of records (``text`` records become plain-text examples)."""
    out = []
    for record in records:
        if "text" in record and "question" not in record and "messages" not in record:
            out.append(text_example(tokenizer, record["text"], max_length))
            continue
        messages, answer = split_record(record, system, answer_key)
        if positions == "response" and not answer:
            raise ExtractionError(
                f"Record {_short(record)} has no answer, but pooling is over response tokens: add an "
                f"{answer_key!r} field, or pool over prompt positions."
            )
        out.append(chat_example(tokenizer, messages, answer, positions, max_length))
    return out


def contrastive_examples(
    tokenizer,
    records: Iterable[dict],
    positive_system: str,
    negative_system: str,
    positions: str = "response",
    score_threshold: float | None = None,
    max_length: int | None = None,
) -> tuple[list[dict], list[dict]]:
    """The same questions under a positive and a negative system prompt.

    With ``score_threshold`` (persona-vector style) a pair is kept only if ``positive_score >= threshold``
    and ``negative_score < 100 - threshold``, i.e. both sides actually showed (or avoided) the trait.
    """
    records = list(records)
    if score_threshold is not None:
        missing = [r for r in records if "positive_score" not in r or "negative_score" not in r]
        if missing:
            raise ExtractionError(
                f"score_threshold needs positive_score and negative_score on every record; {_short(missing[0])} "
                "lacks them."
            )
        records = [
            r
            for r in records
            if r["positive_score"] >= score_threshold and r["negative_score"] < 100 - score_threshold
        ]
        if not records:
            raise ExtractionError(f"No record passes score_threshold={score_threshold}; lower it.")
    pos = record_examples(tokenizer, records, positive_system, positions, "positive_answer", max_length)
    neg = record_examples(tokenizer, records, negative_system, positions, "negative_answer", max_length)
    return pos, neg


def _short(record) -> str:
    text = json.dumps(record)
    return text if len(text) < 120 else text[:117] + "..."


def generate_contrastive_answers(
    model,
    tokenizer,
    records: Iterable[dict],
    positive_system: str,
    negative_system: str,
    max_new_tokens: int = 200,
    temperature: float = 1.0,
    batch_size: int = 16,
    seed: int = 0,
    progress: bool = True,
) -> list[dict]:
    """The persona-vector workflow's first step: the model answers each record's ``question`` under the
    positive and the negative system prompt; returns the records with ``positive_answer`` and
    ``negative_answer`` filled (judge them and add ``*_score`` fields to filter pairs)."""
    records = list(records)
    missing = [r for r in records if "question" not in r]
    if missing:
        raise ExtractionError(
            f"Generating answers needs a 'question' on every record; {_short(missing[0])} lacks one."
        )
    prompts = []
    for i, record in enumerate(records):
        prompts.append(Prompt(str(i), 0, 0, record["question"], positive_system))
        prompts.append(Prompt(str(i), 0, 1, record["question"], negative_system))
    cfg = SamplingConfig(
        max_new_tokens=max_new_tokens, temperature=temperature, batch_size=batch_size, seed=seed
    )
    rows = generate_answers(model, tokenizer, prompts, cfg, progress=progress)
    out = [dict(r) for r in records]
    for row in rows:
        side = "positive_answer" if row["sample_index"] == 0 else "negative_answer"
        out[int(row["question_id"])][side] = row["answer"]
    return out
