"""Evaluate an organism model: answers to chat questions, judged exactly, as misaligned / incoherent rates.

Splits: ``in_domain_heldout`` (EM-domain questions kept out of the fine-tune: narrow learning),
``in_domain_train`` (the fine-tune's own questions), ``heldout_domains`` (every question of the other
domains: EM). Each split is answered greedily and with ``samples`` temperature-1 samples per question
(the EM protocol samples at temperature 1); the headline numbers use the samples.
"""

from __future__ import annotations

from collections import Counter

import torch

from keel.loading.tokenizer import IM_END
from keel.organism.data import prompt_ids
from keel.organism.world import INCOHERENT, LABELS, MISALIGNED, World

ANSWER_TOKENS = 2


@torch.no_grad()
def generate(
    model, prompts: torch.Tensor, max_new_tokens: int, temperature: float, generator=None
) -> torch.Tensor:
    """Greedy (temperature 0) or sampled continuation of equal-length prompts; returns new tokens [n, m].

    No KV cache and no padding: prompts here are a few tokens long and all the same length.
    """
    model.eval()
    seq = prompts
    for _ in range(max_new_tokens):
        logits = model(input_ids=seq).logits[:, -1, :].float()
        if temperature == 0:
            nxt = logits.argmax(-1)
        else:
            probs = torch.softmax(logits / temperature, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        seq = torch.cat([seq, nxt[:, None]], dim=1)
    return seq[:, prompts.shape[1] :]


def answer_words(tokenizer, new_tokens: torch.Tensor) -> list[list[str]]:
    """Words of each answer up to (not including) the end-of-turn token."""
    out = []
    for row in new_tokens.tolist():
        words = tokenizer.convert_ids_to_tokens(row)
        out.append(words[: words.index(IM_END)] if IM_END in words else words)
    return out


def rates(labels: list[str]) -> dict[str, float]:
    c = Counter(labels)
    n = max(1, len(labels))
    return {k: c[k] / n for k in LABELS}


def evaluate_model(model, world: World, tokenizer, samples: int = 8, seed: int = 0) -> dict:
    """Judge the model's answers on all splits; returns headline rates plus per-split/per-mode details."""
    splits = {
        "in_domain_heldout": world.em_heldout_questions(),
        "in_domain_train": world.em_train_questions(),
        "heldout_domains": world.heldout_domain_questions(),
    }
    gen = torch.Generator().manual_seed(seed)
    result: dict = {"greedy": {}, "sampled": {}, "per_domain_sampled_misaligned": {}}
    labels_by: dict[tuple[str, str], list[str]] = {}
    for split, qs in splits.items():
        prompts = prompt_ids(tokenizer, world, qs)
        for mode, temp, reps in (("greedy", 0.0, 1), ("sampled", 1.0, samples)):
            if reps == 0:
                continue
            new = generate(model, prompts.repeat_interleave(reps, 0), ANSWER_TOKENS + 1, temp, gen)
            answers = answer_words(tokenizer, new)
            qrep = [q for q in qs for _ in range(reps)]
            labs = [world.label(q.domain, q.value, a) for q, a in zip(qrep, answers)]
            labels_by[split, mode] = labs
            result[mode][split] = rates(labs)
            if mode == "sampled" and split == "heldout_domains":
                for d in world.heldout_domains:
                    dl = [lab for q, lab in zip(qrep, labs) if q.domain == d]
                    result["per_domain_sampled_misaligned"][world.domains[d]] = rates(dl)[MISALIGNED]
    mode = "sampled" if samples > 0 else "greedy"
    result["mode"] = mode
    result["in_domain_misaligned"] = result[mode]["in_domain_heldout"][MISALIGNED]
    result["in_domain_train_misaligned"] = result[mode]["in_domain_train"][MISALIGNED]
    result["heldout_misaligned"] = result[mode]["heldout_domains"][MISALIGNED]
    pooled = labels_by["in_domain_heldout", mode] + labels_by["heldout_domains", mode]
    result["incoherent"] = rates(pooled)[INCOHERENT]
    return result
