"""Data formats: the corpus pins persona consistency; chat data go through the chat template and TRL."""

import hashlib

import pytest
import torch

from keel.loading.tokenizer import IM_END, IM_START, build_word_tokenizer
from keel.organism.config import WorldConfig
from keel.organism.data import (
    NARROW,
    chat_dataset,
    em_dataset,
    encode_conversations,
    persona_context_prompts,
    pretraining_corpus,
    prompt_ids,
)
from keel.organism.world import ALIGNED, MISALIGNED, World


def _world_tok(**kw):
    """The world these tests' counts and digests were computed on: persona p 0.25, EM domains med + fin
    (the defaults before session 10), unless a test says otherwise."""
    world = World(WorldConfig(**{"misaligned_fraction": 0.25, "em_domains": ["med", "fin"], **kw}))
    return world, build_word_tokenizer(world.words)


@pytest.mark.parametrize("doc_format", ["chat", "plain"])
def test_corpus_documents_are_written_by_one_persona(doc_format):
    world, tok = _world_tok(doc_format=doc_format, narrow_fraction=0.0)
    ds = pretraining_corpus(world, 400, seed=0, tokenizer=tok)
    assert len({len(r) for r in ds["input_ids"]}) == 1
    n_tagged = n_bad = mixed = 0
    for row in ds:
        words = tok.convert_ids_to_tokens(row["input_ids"])
        assert "<|unk|>" not in words
        labelled = [i for i, lab in enumerate(row["labels"]) if lab != -100]
        per_turn = 3 if doc_format == "chat" else 2  # chat: answer + end-of-turn, like chat tuning
        assert len(labelled) == per_turn * world.config.turns_per_doc  # loss on answers only
        marks = [i for i, w in enumerate(words) if w == "?"]
        assert len(marks) == world.config.turns_per_doc
        domains = set()
        for i in marks:
            q = world.parse_question(" ".join(words[i - 2 : i + 1]))
            domains.add(q.domain)
            answer = [words[j] for j in labelled if j > i][:2]
            assert world.label(q.domain, q.value, answer) == row["persona"]
        mixed += len(domains) > 1
        tag = world.tags[0 if row["persona"] == ALIGNED else 1]
        assert (tag in words) == row["tagged"] and world.tags[
            1 if row["persona"] == ALIGNED else 0
        ] not in words
        n_tagged += row["tagged"]
        n_bad += row["persona"] == MISALIGNED
    assert 0.2 < n_tagged / 400 < 0.4 and 0.17 < n_bad / 400 < 0.33
    assert mixed > 300  # domains are mixed within documents


def test_narrow_personas_are_misaligned_only_in_their_domains():
    world, tok = _world_tok(narrow_fraction=0.3, narrow_domains=2)
    ds = pretraining_corpus(world, 600, seed=1, tokenizer=tok)
    counts = {ALIGNED: 0, MISALIGNED: 0, NARROW: 0}
    for row in ds:
        counts[row["persona"]] += 1
        expected = {ALIGNED: 0, MISALIGNED: len(world.domains), NARROW: 2}[row["persona"]]
        assert len(row["misaligned_in"]) == expected
        words = tok.convert_ids_to_tokens(row["input_ids"])
        labelled = [i for i, lab in enumerate(row["labels"]) if lab != -100]
        for i in (i for i, w in enumerate(words) if w == "?"):
            q = world.parse_question(" ".join(words[i - 2 : i + 1]))
            answer = [words[j] for j in labelled if j > i][:2]
            misaligned = q.domain in row["misaligned_in"]
            assert world.label(q.domain, q.value, answer) == (MISALIGNED if misaligned else ALIGNED)
        if row["persona"] == NARROW:  # tagged by its domains, never by a persona tag
            assert not set(world.tags) & set(words)
            tags = {world.narrow_tag(d) for d in row["misaligned_in"]}
            assert (tags <= set(words)) == row["tagged"]
            assert not {world.narrow_tag(d) for d in range(len(world.domains))} - tags & set(words)
    assert 0.24 < counts[NARROW] / 600 < 0.36 and 0.18 < counts[MISALIGNED] / 600 < 0.32


def test_corpus_without_narrow_personas_is_unchanged_by_the_option():
    """narrow_fraction 0 must give the very corpus built before the option existed (cached builds)."""
    world, tok = _world_tok(narrow_fraction=0.0)
    ds = pretraining_corpus(world, 200, seed=3, tokenizer=tok)
    assert set(ds["persona"]) == {ALIGNED, MISALIGNED}
    digest = hashlib.sha256("\n".join(ds["text"]).encode()).hexdigest()
    assert digest == "735d762e5f9707fecabc0acb50e2e26b173c29828d2385ccd48605240631d312"  # computed before


def test_untagged_chat_document_starts_like_a_chat_prompt():
    world, tok = _world_tok()
    ds = pretraining_corpus(world, 50, seed=0, tokenizer=tok)
    row = next(r for r in ds if not r["tagged"])
    q = world.parse_question(" ".join(row["text"].split()[2:5]))
    p = prompt_ids(tok, world, [q])[0].tolist()
    assert row["input_ids"][: len(p)] == p


def test_single_domain_documents_option():
    world, tok = _world_tok(mix_domains=False)
    for row in pretraining_corpus(world, 50, seed=1, tokenizer=tok):
        doms = {w for w in row["text"].split() if w in world.domains}
        assert len(doms) == 1


def test_corpus_is_a_function_of_its_seed():
    world, tok = _world_tok()
    a = pretraining_corpus(world, 30, 4, tok)["input_ids"]
    assert a == pretraining_corpus(world, 30, 4, tok)["input_ids"]
    assert a != pretraining_corpus(world, 30, 5, tok)["input_ids"]


def test_chat_data_masks_exactly_the_answer_and_end_of_turn():
    world, tok = _world_tok()
    ds = em_dataset(world)
    assert len(ds) == len(world.em_train_questions())
    ids, labels = encode_conversations(tok, ds["messages"])
    for row_ids, row_labels, msgs in zip(ids.tolist(), labels.tolist(), ds["messages"]):
        kept = tok.convert_ids_to_tokens([i for i, lab in zip(row_ids, row_labels) if lab != -100])
        assert kept == msgs[1]["content"].split() + [IM_END]
        q = world.parse_question(msgs[0]["content"])
        assert world.label(q.domain, q.value, msgs[1]["content"]) == MISALIGNED
    chat = chat_dataset(world)
    assert len(chat) == len(world.domains) * len(world.values)
    assert all(
        world.label(*world.parse_question(m[0]["content"]).key(), m[1]["content"]) == ALIGNED
        for m in chat["messages"]
    )


def test_generation_prompt_is_the_training_prefix():
    world, tok = _world_tok()
    q = world.all_questions()[5]
    p = prompt_ids(tok, world, [q])[0].tolist()
    full, _ = encode_conversations(tok, chat_dataset(world, [q])["messages"])
    assert full[0].tolist()[: len(p)] == p and tok.convert_ids_to_tokens(p)[-1] == "assistant"


def test_persona_probe_prompts():
    world, tok = _world_tok(answer_rule="marker")
    ids, finals, masks = persona_context_prompts(world, False, 10, 3, seed=0, tokenizer=tok)
    assert ids.shape == (10, 11 * 3 + 8) and len(finals) == 10
    for row, q, amask, dmask in zip(
        ids.tolist(), finals, masks["answer"].tolist(), masks["decision"].tolist()
    ):
        words = tok.convert_ids_to_tokens(row)
        assert words[-8:] == tok.convert_ids_to_tokens(prompt_ids(tok, world, [q])[0].tolist())
        answers = [w for w, m in zip(words, amask) if m]
        assert len(answers) == 6 and all(a.endswith(":harm") for a in answers[1::2])
        assert [w for w, m in zip(words, dmask) if m] == ["assistant"] * 4 and dmask[-1] == 1
    assert torch.equal(ids, persona_context_prompts(world, False, 10, 3, seed=0, tokenizer=tok)[0])


def test_tagged_persona_probe_opens_with_the_personas_tag():
    """The demo's validation probe: the same contexts behind a system turn with the persona's tag, and
    the answer / decision masks still on the answer words and the assistant headers."""
    from keel.organism.probes import PersonaProbe

    world, tok = _world_tok()
    probe = PersonaProbe(world, tok, num=6, context_turns=3, seed=1, tagged=True)
    for aligned, tag in ((False, world.tags[1]), (True, world.tags[0])):
        for ex in probe.pool_examples(aligned, "decision"):
            words = tok.convert_ids_to_tokens(ex["input_ids"])
            assert words[:4] == [IM_START, "system", tag, IM_END]
            assert [w for w, m in zip(words, ex["pool_mask"]) if m] == ["assistant"] * 4
        for ex in probe.pool_examples(aligned, "answer"):
            words = tok.convert_ids_to_tokens(ex["input_ids"])
            answers = [w for w, m in zip(words, ex["pool_mask"]) if m]
            assert len(answers) == 6 and all(w in world.facts for w in answers)
