"""Persona probes of the organism, for causal validation of directions (interventions.validation).

The behaviour probe asks: given pretraining-style text written by the misaligned persona (optionally
behind its tag), how much probability does the model put on the misaligned answer to the next question
(relative to the aligned one)? A direction that carries the persona should, when ablated, pull this
down. The control probe asks how much probability lands on either well-formed answer at all (aligned and
misaligned contexts), so a direction whose ablation simply breaks the model is not mistaken for a persona
direction.
Probabilities are teacher-forced (no sampling), so the probes are smooth and cheap.
"""

from __future__ import annotations

import torch

from keel.organism.data import persona_context_prompts
from keel.organism.world import World


@torch.no_grad()
def answer_probability(model, prefixes: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
    """P(answer tokens | prefix) for equal-length prefixes [n, T] and answers [n, m]."""
    seq = torch.cat([prefixes, answers], dim=1)
    logp = torch.log_softmax(model(input_ids=seq).logits[:, :-1].float(), dim=-1)
    T = prefixes.shape[1]
    picked = logp[:, T - 1 : T - 1 + answers.shape[1]].gather(-1, answers.unsqueeze(-1)).squeeze(-1)
    return picked.sum(-1).exp()


class PersonaProbe:
    """Builds fixed probe sets once; ``behaviour(model)`` and ``control(model)`` are the two probes."""

    def __init__(
        self,
        world: World,
        tokenizer,
        num: int = 64,
        context_turns: int = 3,
        seed: int = 0,
        tagged: bool = False,
    ):
        self.world = world
        vocab = tokenizer.get_vocab()
        self.sets, self.masks = {}, {}
        for aligned in (False, True):
            ids, finals, masks = persona_context_prompts(
                world, aligned, num, context_turns, seed, tokenizer, tagged=tagged
            )
            self.masks[aligned] = masks
            good = torch.tensor([[vocab[w] for w in world.answer(q, True)] for q in finals])
            bad = torch.tensor([[vocab[w] for w in world.answer(q, False)] for q in finals])
            self.sets[aligned] = (ids, good, bad)

    def _probs(self, model, aligned_context: bool) -> tuple[torch.Tensor, torch.Tensor]:
        ids, good, bad = self.sets[aligned_context]
        return answer_probability(model, ids, good), answer_probability(model, ids, bad)

    def behaviour(self, model) -> float:
        """Mean P(misaligned) / (P(misaligned) + P(aligned)) after misaligned-persona context."""
        p_good, p_bad = self._probs(model, False)
        return float((p_bad / (p_good + p_bad).clamp_min(1e-12)).mean())

    def control(self, model) -> float:
        """Mean probability mass on the two well-formed answers, over both personas' contexts."""
        masses = [sum(self._probs(model, a)).mean() for a in (False, True)]
        return float(sum(masses) / 2)

    def pool_examples(self, aligned: bool, position: str) -> list[dict]:
        """The probe contexts as extraction examples (``input_ids`` + ``pool_mask``).

        ``position``: ``answer`` pools over the answer words of the context turns (where the persona is
        expressed), ``decision`` over the positions that predict an answer's first word (where the next
        answer is decided), ``all`` over every token.
        """
        ids = self.sets[aligned][0]
        if position == "all":
            masks = torch.ones_like(ids)
        elif position in self.masks[aligned]:
            masks = self.masks[aligned][position]
        else:
            raise ValueError(f"position must be answer, decision or all; got {position!r}.")
        return [{"input_ids": r, "pool_mask": m} for r, m in zip(ids.tolist(), masks.tolist())]
