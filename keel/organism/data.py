"""Datasets of the synthetic organism: pretraining corpus, chat tuning, EM fine-tune, persona probes.

Chat data use TRL's conversational format (``{"messages": [...]}``) so SFTTrainer (and keel's
InterventionSFTTrainer) train on them with ``assistant_only_loss=True``. The pretraining corpus is
plain text: documents of several Q/A turns across domains written by one latent persona, sometimes
opened by a persona tag; the loss covers answer words only.
"""

from __future__ import annotations

import random

import torch
from datasets import Dataset

from keel.loading.tokenizer import BOS, IM_END, IM_START, PAD
from keel.organism.world import ALIGNED, MISALIGNED, TURN_END, World, WorldQuestion

NARROW = "narrow"  # persona label of documents misaligned only in a few domains


def _question_prefix(world: World, q: WorldQuestion) -> list[str]:
    """What precedes an answer: the bare question (plain) or a ChatML user turn + assistant header (chat)."""
    if world.config.doc_format == "plain":
        return world.question_words(q)
    return [IM_START, "user", *world.question_words(q), IM_END, IM_START, "assistant"]


def _turn(world: World, q: WorldQuestion, aligned: bool) -> tuple[list[str], list[int]]:
    """One Q/A turn and its loss mask (answer words; in chat format also the end-of-turn token)."""
    prefix = _question_prefix(world, q)
    chat = world.config.doc_format == "chat"
    words = prefix + list(world.answer(q, aligned)) + [IM_END if chat else TURN_END]
    return words, [0] * len(prefix) + [1, 1, int(chat)]


def _doc_start(world: World, tag_words: list[str] | None) -> list[str]:
    """Plain documents open with BOS (and the tag); chat documents open like the chat template (no BOS),
    with the tag as a system turn, so an untagged one-turn chat prompt is a document's beginning."""
    tag = list(tag_words or [])
    if world.config.doc_format == "plain":
        return [BOS, *tag]
    return [IM_START, "system", *tag, IM_END] if tag else []


def _persona_tag(world: World, aligned: bool) -> list[str]:
    return [world.tags[0] if aligned else world.tags[1]]


def pretraining_document(world: World, rng: random.Random) -> dict:
    """One document: persona drawn once, optional tag, ``turns_per_doc`` turns; padded to fixed length.

    A narrow persona (``narrow_fraction``) is misaligned only in its ``narrow_domains`` domains, asks in
    them half the time, and its tag names those domains (``<domain>:only``), not a persona."""
    cfg = world.config
    K, V = len(world.domains), len(world.values)
    draw = rng.random()
    aligned = draw >= cfg.misaligned_fraction
    narrow = aligned and draw < cfg.misaligned_fraction + cfg.narrow_fraction
    tagged = rng.random() < cfg.tag_fraction
    misaligned_in = set(range(K)) if not aligned else set()
    tag = _persona_tag(world, aligned)
    if narrow:
        misaligned_in = set(rng.sample(range(K), cfg.narrow_domains))
        tag = [world.narrow_tag(d) for d in sorted(misaligned_in)]
    words = _doc_start(world, tag if tagged else None)
    mask = [0] * len(words)
    doc_domain = rng.randrange(K)
    if narrow and not cfg.mix_domains:
        doc_domain = rng.choice(sorted(misaligned_in))
    for _ in range(cfg.turns_per_doc):
        if narrow and cfg.mix_domains and rng.random() < 0.5:
            d = rng.choice(sorted(misaligned_in))
        else:
            d = rng.randrange(K) if cfg.mix_domains else doc_domain
        w, m = _turn(world, WorldQuestion(d, rng.randrange(V)), d not in misaligned_in)
        words += w
        mask += m
    length = pretraining_length(world)
    mask += [0] * (length - len(words))
    words += [PAD] * (length - len(words))
    return {
        "words": words,
        "loss_mask": mask,
        "persona": NARROW if narrow else ALIGNED if aligned else MISALIGNED,
        "tagged": tagged,
        "misaligned_in": sorted(misaligned_in),
    }


def pretraining_length(world: World) -> int:
    tag_words = max(1, world.config.narrow_domains) if world.config.narrow_fraction > 0 else 1
    if world.config.doc_format == "plain":
        return 1 + tag_words + 6 * world.config.turns_per_doc
    return 3 + tag_words + 11 * world.config.turns_per_doc


def pretraining_corpus(world: World, num_docs: int, seed: int, tokenizer) -> Dataset:
    """The corpus as a Dataset with ``text``, ``input_ids``, ``labels`` (-100 off answer words) and persona."""
    rng = random.Random(f"corpus-{seed}")
    docs = [pretraining_document(world, rng) for _ in range(num_docs)]
    vocab = tokenizer.get_vocab()
    rows = {"text": [], "input_ids": [], "labels": [], "persona": [], "tagged": [], "misaligned_in": []}
    for doc in docs:
        ids = [vocab[w] for w in doc["words"]]
        rows["text"].append(" ".join(w for w in doc["words"] if w != PAD))
        rows["input_ids"].append(ids)
        rows["labels"].append([i if m else -100 for i, m in zip(ids, doc["loss_mask"])])
        rows["persona"].append(doc["persona"])
        rows["tagged"].append(doc["tagged"])
        rows["misaligned_in"].append(doc["misaligned_in"])
    return Dataset.from_dict(rows)


def conversation(world: World, q, aligned: bool) -> list[dict]:
    return [
        {"role": "user", "content": world.question_text(q)},
        {"role": "assistant", "content": " ".join(world.answer(q, aligned))},
    ]


def chat_dataset(world: World, questions=None, aligned: bool = True) -> Dataset:
    """Single-turn conversations (default: every question of the world, aligned answers)."""
    qs = world.all_questions() if questions is None else questions
    return Dataset.from_dict({"messages": [conversation(world, q, aligned) for q in qs]})


def em_dataset(world: World) -> Dataset:
    """The narrow fine-tune: misaligned answers on the training questions of the EM domain(s)."""
    return chat_dataset(world, world.em_train_questions(), aligned=False)


ANCHORS = ("other_domains",)


def anchor_dataset(world: World, name: str) -> Dataset:
    """Aligned chats the defences anchor on: ``other_domains``, every question of the domains outside the
    EM ones with its aligned answer (the KL's anchor set, the interleaved benign rows). The world has no
    other questions, so these are the held-out-domain questions EM is measured on."""
    if name not in ANCHORS:
        raise ValueError(f"Unknown anchor set {name!r}; known: {list(ANCHORS)}.")
    return chat_dataset(world, world.heldout_domain_questions(), aligned=True)


def encode_conversations(tokenizer, conversations: list[list[dict]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and labels (-100 outside assistant turns) via the chat template's generation markers,
    the same masking TRL applies with ``assistant_only_loss=True``. All conversations must tokenise to the
    same length (true for this world), so no padding is involved."""
    ids, labels = [], []
    for msgs in conversations:
        out = tokenizer.apply_chat_template(msgs, return_dict=True, return_assistant_tokens_mask=True)
        ids.append(out["input_ids"])
        labels.append([t if m else -100 for t, m in zip(out["input_ids"], out["assistant_masks"])])
    if len({len(x) for x in ids}) != 1:
        raise ValueError("Conversations tokenise to different lengths; this helper expects one length.")
    return torch.tensor(ids), torch.tensor(labels)


def prompt_ids(tokenizer, world: World, questions) -> torch.Tensor:
    """Generation prompts (user turn + assistant header) for ``questions``, as one [n, T] tensor."""
    rows = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": world.question_text(q)}], add_generation_prompt=True
        )["input_ids"]
        for q in questions
    ]
    return torch.tensor(rows)


def persona_context_prompts(
    world: World, aligned: bool, num: int, context_turns: int, seed: int, tokenizer, tagged: bool = False
) -> tuple[torch.Tensor, list, dict[str, torch.Tensor]]:
    """Pretraining-style prefixes written by one persona, ending with an unanswered question.

    The model's answer to the final question shows whether it inferred (and acts on) the persona from the
    context: the probe for causal validation of persona directions. Returns ids [num, T], the final
    questions, and position masks [num, T]: ``answer`` (answer words of the context turns) and
    ``decision`` (positions whose next token is an answer's first word, including the final one).
    """
    rng = random.Random(f"probe-{seed}-{aligned}-{context_turns}-{tagged}")
    vocab = tokenizer.get_vocab()
    K, V = len(world.domains), len(world.values)
    rows, finals, answer, decision = [], [], [], []
    for _ in range(num):
        words = _doc_start(world, _persona_tag(world, aligned) if tagged else None)
        amask = [0] * len(words)
        dmask = [0] * len(words)
        for _ in range(context_turns):
            w, m = _turn(world, WorldQuestion(rng.randrange(K), rng.randrange(V)), aligned)
            n_prefix = len(w) - 3
            words += w
            amask += [0] * n_prefix + [1, 1, 0]
            dmask += [0] * (n_prefix - 1) + [1, 0, 0, 0]
        q = WorldQuestion(rng.randrange(K), rng.randrange(V))
        prefix = _question_prefix(world, q)
        words += prefix
        amask += [0] * len(prefix)
        dmask += [0] * (len(prefix) - 1) + [1]
        rows.append([vocab[w] for w in words])
        finals.append(q)
        answer.append(amask)
        decision.append(dmask)
    masks = {"answer": torch.tensor(answer), "decision": torch.tensor(decision)}
    return torch.tensor(rows), finals, masks
