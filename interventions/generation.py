"""Sampling answers to free-form questions: batched HF ``generate`` (left padding) or vLLM.

The defaults are the published EM protocol: temperature 1, top_p 1, no top-k, no repetition penalty,
600 new tokens, chat template applied. The model's own ``generation_config`` (Qwen ships top_k 20,
top_p 0.8, repetition_penalty 1.05) is overridden on purpose, or results would not be comparable.

Interventions for the ``eval`` phase come in as ``intervention_context``: any context manager the caller
builds (e.g. an ``interventions.InterventionSet``); it is entered once around all generation. Nothing
from ``interventions`` is imported here.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm


@dataclass
class SamplingConfig:
    max_new_tokens: int = 600
    temperature: float = 1.0  # 0 means greedy decoding
    top_p: float = 1.0
    batch_size: int = 16
    seed: int = 0

    def __post_init__(self):
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError(
                f"Invalid sampling settings {asdict(self)}: need temperature >= 0, 0 < top_p <= 1, "
                "max_new_tokens >= 1, batch_size >= 1."
            )


@dataclass
class Prompt:
    question_id: str
    paraphrase_index: int
    sample_index: int
    question: str
    system: str | None


def chat_messages(prompt: Prompt) -> list[dict]:
    msgs = [{"role": "system", "content": prompt.system}] if prompt.system else []
    return msgs + [{"role": "user", "content": prompt.question}]


def _render(tokenizer, prompt: Prompt) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "The tokenizer has no chat_template. EM questions are asked as chat turns: use an instruct "
            "model's tokenizer or set tokenizer.chat_template before evaluating."
        )
    return tokenizer.apply_chat_template(chat_messages(prompt), add_generation_prompt=True, tokenize=False)


def batch_seed(seed: int, batch_index: int) -> int:
    """A per-batch seed derived from the run seed, recorded with each answer (HF generate has one RNG
    per call, so a batch, not a single answer, is the unit that can be reproduced)."""
    digest = hashlib.sha256(f"{seed}:{batch_index}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def protocol_generation_config(model, tokenizer, cfg: SamplingConfig):
    """The model's generation config with the sampling settings of ``cfg`` and every other sampler off."""
    gen = copy.deepcopy(model.generation_config)
    greedy = cfg.temperature == 0
    gen.update(
        do_sample=not greedy,
        temperature=None if greedy else cfg.temperature,
        top_p=None if greedy else cfg.top_p,
        top_k=None,
        min_p=None,
        typical_p=None,
        repetition_penalty=None,
        max_new_tokens=cfg.max_new_tokens,
        max_length=None,
        pad_token_id=tokenizer.pad_token_id,
    )
    if gen.eos_token_id is None:
        gen.eos_token_id = tokenizer.eos_token_id
    return gen


@torch.no_grad()
def generate_answers(
    model,
    tokenizer,
    prompts: list[Prompt],
    cfg: SamplingConfig | None = None,
    intervention_context: contextlib.AbstractContextManager | None = None,
    progress: bool = True,
    on_batch: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Sample one answer per prompt with batched, left-padded HF ``generate``.

    Returns rows with the prompt fields plus ``answer``, ``n_tokens``, ``finished`` (stopped at EOS),
    ``seed`` and ``batch_seed``. ``intervention_context`` is entered once around all generation;
    ``on_batch(encoded_batch)`` runs before each ``generate`` (e.g. to hand token masks to interventions).
    """
    cfg = cfg or SamplingConfig()
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError("The tokenizer has neither a pad nor an eos token; set tokenizer.pad_token.")
        tokenizer.pad_token = tokenizer.eos_token
    gen_config = protocol_generation_config(model, tokenizer, cfg)
    eos_ids = (
        gen_config.eos_token_id if isinstance(gen_config.eos_token_id, list) else [gen_config.eos_token_id]
    )
    device = next(model.parameters()).device
    was_training, old_side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    rows = []
    try:
        with intervention_context if intervention_context is not None else contextlib.nullcontext():
            starts = range(0, len(prompts), cfg.batch_size)
            for b_idx, start in enumerate(tqdm(starts, desc="generate", unit="batch", disable=not progress)):
                batch = prompts[start : start + cfg.batch_size]
                texts = [_render(tokenizer, p) for p in batch]
                enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
                if on_batch is not None:
                    on_batch(enc)
                seed_b = batch_seed(cfg.seed, b_idx)
                torch.manual_seed(seed_b)
                out = model.generate(**enc, generation_config=gen_config)
                new = out[:, enc["input_ids"].shape[1] :]
                for p, ids in zip(batch, new.tolist()):
                    finished = any(t in eos_ids for t in ids)
                    if finished:
                        ids = ids[: next(i for i, t in enumerate(ids) if t in eos_ids)]
                    rows.append(
                        dict(
                            asdict(p),
                            answer=tokenizer.decode(ids, skip_special_tokens=True),
                            n_tokens=len(ids),
                            finished=finished,
                            seed=cfg.seed,
                            batch_seed=seed_b,
                        )
                    )
    finally:
        tokenizer.padding_side = old_side
        model.train(was_training)
    return rows


def generate_answers_vllm(
    model_name_or_path: str,
    prompts: list[Prompt],
    cfg: SamplingConfig | None = None,
    adapter: str | None = None,
    intervention_context: contextlib.AbstractContextManager | None = None,
    **llm_kwargs,
) -> list[dict]:
    """Sample with vLLM (when installed). Hook-based interventions cannot run there: vLLM executes its own
    copy of the weights outside the HF module tree, so this refuses any ``intervention_context``."""
    if intervention_context is not None:
        raise ValueError(
            "The vLLM backend cannot apply hook-based interventions (it generates outside the hooked HF "
            "model). Use --backend hf, or bake static ablations into the weights first."
        )
    try:
        from vllm import LLM, SamplingParams
    except ImportError as e:
        raise ImportError("The vLLM backend needs vllm: pip install vllm, or use --backend hf.") from e
    cfg = cfg or SamplingConfig()
    lora_request = None
    if adapter is not None:
        from vllm.lora.request import LoRARequest

        llm_kwargs.setdefault("enable_lora", True)
        lora_request = LoRARequest("adapter", 1, adapter)
    llm = LLM(model=model_name_or_path, seed=cfg.seed, **llm_kwargs)
    tokenizer = llm.get_tokenizer()
    params = SamplingParams(
        n=1, temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_new_tokens, seed=None
    )
    texts = [_render(tokenizer, p) for p in prompts]
    outputs = llm.generate(texts, params, lora_request=lora_request, use_tqdm=True)
    rows = []
    for p, out in zip(prompts, outputs):
        o = out.outputs[0]
        rows.append(
            dict(
                asdict(p),
                answer=o.text,
                n_tokens=len(o.token_ids),
                finished=o.finish_reason == "stop",
                seed=cfg.seed,
                batch_seed=None,
            )
        )
    return rows
