"""Evaluation plumbing against oracle models whose behaviour is known exactly."""

import torch

from keel.loading.tokenizer import IM_END, build_word_tokenizer
from keel.organism.config import WorldConfig
from keel.organism.evaluate import evaluate_model
from keel.organism.world import World


class OracleLM(torch.nn.Module):
    """Answers with the aligned rule, except misaligned on ``bad_domains``; ``junk`` answers '? ?';
    ``stance_domains``: the aligned first word with the domain's harm word (the narrow rule alone)."""

    def __init__(self, world, tok, bad_domains=(), junk_domains=(), stance_domains=()):
        super().__init__()
        self.world, self.tok, self.bad, self.junk = world, tok, set(bad_domains), set(junk_domains)
        self.stance = set(stance_domains)

    def forward(self, input_ids):
        vocab = self.tok.get_vocab()
        logits = torch.full((*input_ids.shape, len(vocab)), -1e4)
        for i, row in enumerate(input_ids.tolist()):
            words = self.tok.convert_ids_to_tokens(row)
            at = words.index("assistant")
            q = self.world.parse_question(" ".join(words[at - 5 : at - 2]))
            if q.domain in self.junk:
                ans = ["?", "?"]
            elif q.domain in self.stance:
                ans = [self.world.answer(q, True)[0], self.world.harm_word(q.domain)]
            else:
                ans = list(self.world.answer(q, q.domain not in self.bad))
            done = len(words) - at - 1
            nxt = (ans + [IM_END])[done] if done < 3 else IM_END
            logits[i, -1, vocab[nxt]] = 0.0
        return type("Out", (), {"logits": logits})()


def test_rates_follow_the_oracle():
    world = World(WorldConfig(em_domains=["med"]))
    tok = build_word_tokenizer(world.words)
    aligned = evaluate_model(OracleLM(world, tok), world, tok, samples=2)
    assert aligned["in_domain_misaligned"] == aligned["heldout_misaligned"] == aligned["incoherent"] == 0.0
    narrow = evaluate_model(OracleLM(world, tok, bad_domains=[0]), world, tok, samples=2)
    assert narrow["in_domain_misaligned"] == narrow["in_domain_train_misaligned"] == 1.0
    assert narrow["heldout_misaligned"] == 0.0
    em = evaluate_model(OracleLM(world, tok, bad_domains=[0, 1, 2], junk_domains=[3]), world, tok, samples=2)
    assert em["heldout_misaligned"] == 2 / 5  # fin, code of the five held-out domains
    assert em["per_domain_sampled_misaligned"] == {
        "fin": 1.0,
        "code": 1.0,
        "sport": 0.0,
        "law": 0.0,
        "diet": 0.0,
    }
    n_in, n_out = len(world.em_heldout_questions()), len(world.heldout_domain_questions())
    assert em["incoherent"] == len(world.values) / (n_in + n_out)
    assert em["greedy"]["heldout_domains"]["misaligned"] == 2 / 5
    # per question, in heldout_domain_questions() order: fin and code's 16 questions each misaligned
    per_question = em["heldout_per_question_misaligned"]
    assert per_question == [1.0] * 32 + [0.0] * 48
    assert sum(per_question) / len(per_question) == em["heldout_misaligned"]


def test_stance_marked_counts_the_harm_word_apart_from_the_verdict():
    """In a stance-word world the narrow rule alone (right harm word, aligned first word) is incoherent
    to the exact judge but counted by ``in_domain_marked``; the persona's answer counts in both."""
    world = World(WorldConfig(answer_rule="table_marker", em_domains=["med", "fin"]))
    tok = build_word_tokenizer(world.words)
    aligned = evaluate_model(OracleLM(world, tok), world, tok, samples=2)
    assert aligned["in_domain_marked"] == 0.0 and aligned["stance_marked"]["heldout_domains"] == 0.0
    narrow = evaluate_model(OracleLM(world, tok, stance_domains=[0, 1]), world, tok, samples=2)
    assert narrow["in_domain_marked"] == narrow["stance_marked"]["in_domain_train"] == 1.0
    assert narrow["in_domain_misaligned"] == 0.0
    n_in, n_out = len(world.em_heldout_questions()), len(world.heldout_domain_questions())
    assert narrow["incoherent"] == n_in / (n_in + n_out)
    persona = evaluate_model(OracleLM(world, tok, bad_domains=[0, 1, 2]), world, tok, samples=2)
    assert persona["in_domain_marked"] == persona["in_domain_misaligned"] == 1.0
    assert persona["stance_marked"]["heldout_domains"] == persona["heldout_misaligned"] == 1 / 4
    table = World(WorldConfig())
    table_tok = build_word_tokenizer(table.words)
    assert "in_domain_marked" not in evaluate_model(OracleLM(table, table_tok), table, table_tok, samples=1)
