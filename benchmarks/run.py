"""`make bench`: every benchmark, its figures printed and written to runs/bench/."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from benchmarks import overhead
from benchmarks.overhead import REFERENCE_CASES
from benchmarks.peers import run as peers

OUT = Path("runs/bench")


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"== overhead of interventions vs plain SFTTrainer (50M-parameter model, {device}) ==", flush=True)
    results = overhead.run(size="50m", device=device, rounds=int(os.environ.get("BENCH_ROUNDS", "3")))
    if device == "cuda":
        print("== overhead on a ~1B-parameter model, bf16, GPU ==", flush=True)
        results_1b = overhead.run(size="1b", device="cuda", rounds=3, steps=8, batch=4, seq=512)
        (OUT / "overhead_1b.json").write_text(json.dumps(results_1b, indent=2))
    figures = {
        case: {"time_ratio": r["time_ratio"], "memory_ratio": r["memory_ratio"]}
        for case, r in results.items()
        if not case.startswith("_")
    }
    (OUT / "overhead.json").write_text(json.dumps(figures, indent=2))
    (OUT / "overhead_details.json").write_text(json.dumps(results, indent=2))
    print(f"\n{'case':<34}{'time ratio':>12}{'memory ratio':>14}   (targets <= 1.03 / <= 1.02)")
    for case, r in figures.items():
        note = (
            "  (reference forward + frozen copy: not held to the targets)" if case in REFERENCE_CASES else ""
        )
        print(f"{case:<34}{r['time_ratio']:>12.4f}{r['memory_ratio']:>14.4f}{note}")
    try:
        from benchmarks import extraction_throughput
    except ImportError:
        extraction_throughput = None
    if extraction_throughput is not None:
        print("\n== extraction throughput vs a plain forward pass ==", flush=True)
        extraction = extraction_throughput.run()
        (OUT / "extraction.json").write_text(json.dumps(extraction, indent=2))
    print(
        "\n== peers: keel vs steering-vectors, repeng, pyvene, nnsight, TransformerLens "
        "(same model, batch and AdamW step) ==",
        flush=True,
    )
    peers.run(OUT, rounds=int(os.environ.get("BENCH_PEER_ROUNDS", "10")))


if __name__ == "__main__":
    main()
