"""Extraction throughput as a ratio to a plain forward pass over the same padded batches (target >= 0.9).

A ~20M-parameter random-init Llama, a few batches, one thread. Modes are timed interleaved (best of
``repeats``) so machine load hits both alike. Ratios:

- ``ratio``: mean-difference extraction at all layers vs. ``model(input_ids, attention_mask)``. Extraction
  stops after the deepest requested layer, so it also skips the LM head.
- ``ratio_middle_layer``: the same at one middle layer (CAFT and persona vectors use one or a few).
- ``ratio_hooks_only``: extraction with early stopping off vs. a forward that also skips the logits
  (``logits_to_keep=1``): the cost of the hooks, pooling and accumulation alone.
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from interventions.extraction.core import pad_batch  # noqa: E402
from interventions.extraction.methods import MeanDifference  # noqa: E402
from keel.loading.tiny import tiny_model  # noqa: E402

CONFIG = dict(
    vocab_size=8192,
    hidden_size=384,
    intermediate_size=1536,
    num_hidden_layers=6,
    num_attention_heads=6,
    num_key_value_heads=6,
)


def _data(n: int, max_len: int, vocab: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(max_len * 3 // 4, max_len + 1, (1,), generator=g))
        ids = torch.randint(5, vocab, (length,), generator=g).tolist()
        prompt = length // 2
        out.append({"input_ids": ids, "pool_mask": [0] * prompt + [1] * (length - prompt)})
    return out


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run(n_examples: int = 32, max_len: int = 64, batch_size: int = 8, repeats: int = 3) -> dict:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    model = tiny_model("llama", **CONFIG).eval()
    params = sum(p.numel() for p in model.parameters())
    examples = _data(n_examples, max_len, CONFIG["vocab_size"])
    half = n_examples // 2
    batches = [
        pad_batch(examples[i : i + batch_size], range(i, i + batch_size), 0)
        for i in range(0, n_examples, batch_size)
    ]
    tokens = sum(b.num_tokens for b in batches)

    @torch.no_grad()
    def forward(**extra):
        for b in batches:
            model(
                input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids, **extra
            )

    def extract(layers, stop_early=True):
        ex = MeanDifference(layers=layers, batch_size=batch_size, progress=False, stop_early=stop_early)
        ex.collect(examples[:half], model, group="positive")
        ex.collect(examples[half:], model, group="negative")
        ex.result()

    middle = CONFIG["num_hidden_layers"] // 2
    modes = {
        "forward": lambda: forward(use_cache=False),
        "forward_no_logits": lambda: forward(use_cache=False, logits_to_keep=1),
        "extract_all": lambda: extract("all"),
        "extract_middle": lambda: extract(middle),
        "extract_all_no_stop": lambda: extract("all", stop_early=False),
    }
    for fn in modes.values():  # warm-up
        fn()
    best = {name: float("inf") for name in modes}
    for _ in range(repeats):
        for name, fn in modes.items():
            best[name] = min(best[name], _time(fn))
    tps = {name: tokens / t for name, t in best.items()}
    result = {
        "params_millions": round(params / 1e6, 1),
        "tokens": tokens,
        "tokens_per_s": {k: round(v, 1) for k, v in tps.items()},
        "ratio": round(tps["extract_all"] / tps["forward"], 3),
        "ratio_middle_layer": round(tps["extract_middle"] / tps["forward"], 3),
        "ratio_hooks_only": round(tps["extract_all_no_stop"] / tps["forward_no_logits"], 3),
        "target": 0.9,
    }
    result["ok"] = result["ratio"] >= result["target"]
    return result


if __name__ == "__main__":
    r = run()
    print(
        f"extraction throughput ({r['params_millions']}M params, {r['tokens']} tokens): ratio to plain forward "
        f"{r['ratio']:.2f} (target >= {r['target']}); middle layer only {r['ratio_middle_layer']:.2f}; "
        f"hooks+pooling overhead only {r['ratio_hooks_only']:.2f}"
    )
    print(r)
