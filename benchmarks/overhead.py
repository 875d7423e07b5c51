"""Training-step overhead of interventions against plain ``SFTTrainer`` on the same model, data and seed.

Time: all cases live in this one process and take single optimisation steps in turn (plain, a, b, c,
then the next round in rotated order); each case's time ratio is the median over rounds of its step time
divided by plain's in the same round, so the machine's drift cancels. Memory: each case runs once more in a fresh
subprocess; peak = CUDA ``max_memory_allocated`` on GPU, or on CPU the growth of the process's peak RSS
from just before the model is built (what the run itself added: weights, optimizer, activations).

``reference_ablate_precomputed`` is ``reference_ablate_2dir_all_layers`` with ``intervention_reference:
precomputed``: no reference forward and no frozen copy during training, held to the hook targets; its
one-off pass over the training data before training is timed and reported on its own (``_precompute``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

SIZES = {
    # ~50M parameters: the CPU figure the issue asks for.
    "50m": dict(
        hidden_size=640,
        intermediate_size=1792,
        num_hidden_layers=8,
        num_attention_heads=10,
        num_key_value_heads=5,
        vocab_size=8192,
    ),
    # ~1B parameters, for a GPU in bf16.
    "1b": dict(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=8,
        vocab_size=32000,
    ),
}
CASES = (
    "plain",
    "ablate_1dir_all_layers",
    "ablate_8dir_3_layers",
    "steer_1_layer",
    "reference_ablate_2dir_all_layers",
    "reference_ablate_precomputed",
)
PRECOMPUTED_CASES = ("reference_ablate_precomputed",)
# Cases that pay for a reference model's forward pass by design (a frozen copy of the weights and one
# no-grad forward per step): measured, but not held to the hook-overhead targets.
REFERENCE_CASES = ("reference_ablate_2dir_all_layers",)


def _interventions(case: str, num_layers: int, d_model: int) -> list[dict]:
    mid = num_layers // 2
    if case == "ablate_1dir_all_layers":
        return [{"operator": "project_out", "direction": "random:0:1", "layers": "all"}]
    if case == "ablate_8dir_3_layers":
        return [
            {"operator": "project_out", "direction": "random:1:8", "layers": [mid // 2, mid, mid + mid // 2]}
        ]
    if case in ("reference_ablate_2dir_all_layers", "reference_ablate_precomputed"):
        return [{"operator": "reference_ablate", "direction": "random:3:2", "layers": "all"}]
    if case == "steer_1_layer":
        return [{"operator": "add", "direction": "random:2:1", "layers": [mid], "coefficient": 4.0}]
    return []


def _dataset(vocab: int, n: int, seq: int):
    from datasets import Dataset

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, vocab, (n, seq), generator=g)
    half = seq // 2
    rows = [{"input_ids": r.tolist(), "completion_mask": [0] * half + [1] * (seq - half)} for r in ids]
    return Dataset.from_list(rows)


def _trainer(case: str, size: str, steps: int, batch: int, seq: int, device: str, out_dir: str):
    from trl import SFTConfig, SFTTrainer

    from keel.loading.tiny import tiny_model
    from keel.loading.tokenizer import build_chat_tokenizer
    from trainers import InterventionSFTConfig, InterventionSFTTrainer

    cfg = SIZES[size]
    tokenizer = build_chat_tokenizer()
    model = tiny_model("llama", seed=0, **cfg)
    bf16 = device == "cuda"
    common = dict(
        output_dir=out_dir,
        max_steps=steps,
        per_device_train_batch_size=batch,
        learning_rate=1e-4,
        use_cpu=device == "cpu",
        bf16=bf16,
        report_to=[],
        logging_steps=10_000,
        save_strategy="no",
        activation_checkpointing=False,
        seed=0,
        disable_tqdm=True,
        max_length=seq,
        dataloader_drop_last=True,
    )
    data = _dataset(cfg["vocab_size"], steps * batch, seq)
    if case == "plain":
        return SFTTrainer(
            model=model, args=SFTConfig(**common), train_dataset=data, processing_class=tokenizer
        )
    args = InterventionSFTConfig(
        **common,
        interventions=_interventions(case, cfg["num_hidden_layers"], cfg["hidden_size"]),
        intervention_reference="precomputed" if case in PRECOMPUTED_CASES else "live",
    )
    return InterventionSFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)


def _peak_rss() -> float:
    """This process's peak RSS in bytes (VmHWM: unlike ru_maxrss, it is not inherited across exec)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def _peak_memory_child(
    case: str, size: str, steps: int, batch: int, seq: int, device: str, out_dir: str
) -> float:
    import trl  # noqa: F401

    import trainers  # noqa: F401  (imports first, so the baseline holds the libraries and only the run is measured)

    base = _peak_rss()
    trainer = _trainer(case, size, steps, batch, seq, device, out_dir)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    if device == "cuda":
        return float(torch.cuda.max_memory_allocated())
    return _peak_rss() - base


def _paired_step_times(trainers: dict, steps: int, device: str) -> dict[str, list[float]]:
    """Alternate single optimisation steps between the cases (rotating the order each round), so slow
    drift of the machine hits every case alike; the first round only warms up."""
    prepared = {}
    for case, trainer in trainers.items():
        trainer.create_optimizer_and_scheduler(num_training_steps=steps + 1)
        batch = next(iter(trainer.get_train_dataloader()))
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1  # what train() sets before its first step
        if hasattr(trainer, "intervention_set"):
            trainer.intervention_set.attach()
        prepared[case] = (trainer, batch)
    times: dict[str, list[float]] = {c: [] for c in trainers}
    order = list(trainers)
    try:
        for step in range(steps + 1):
            for case in order[step % len(order) :] + order[: step % len(order)]:
                trainer, batch = prepared[case]
                if device == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                trainer.training_step(trainer.model, batch)
                trainer.optimizer.step()
                trainer.optimizer.zero_grad()
                if device == "cuda":
                    torch.cuda.synchronize()
                if step > 0:
                    times[case].append(time.perf_counter() - t0)
    finally:
        for trainer, _ in prepared.values():
            if hasattr(trainer, "intervention_set"):
                trainer.intervention_set.detach(force=True)
    return times


def run(
    size: str = "50m",
    device: str = "cpu",
    rounds: int = 3,
    steps: int = 6,
    batch: int = 2,
    seq: int = 128,
    out_dir: str = "runs/bench/tmp",
) -> dict:
    """``rounds * steps`` timed steps per case, interleaved step by step with plain SFTTrainer."""
    trainers = {case: _trainer(case, size, steps, batch, seq, device, out_dir) for case in CASES}
    precompute = {}
    for case in PRECOMPUTED_CASES:  # the one-off pass, before any timed step (train() would run it first)
        trainer = trainers[case]
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = trainer.precompute_reference()
        source = trainer.intervention_reference
        precompute[case] = {
            "seconds": seconds,
            "examples": len(source.table),
            "forwards": source.precompute_passes,
            "table_bytes": source.table.nbytes,
        }
        print(
            f"  {case}: one-off precompute pass {seconds:.3f}s ({len(source.table)} examples, "
            f"{source.precompute_passes} forwards, table {source.table.nbytes / 2**20:.2f} MB)",
            flush=True,
        )
    times = _paired_step_times(trainers, rounds * steps, device)
    del trainers
    for case in CASES:
        print(
            f"  {case}: median step {statistics.median(times[case]):.4f}s over {len(times[case])} steps",
            flush=True,
        )
    memory = {}
    for case in CASES:
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.overhead",
            "--child-memory",
            case,
            "--size",
            size,
            "--device",
            device,
            "--steps",
            str(steps),
            "--batch",
            str(batch),
            "--seq",
            str(seq),
        ]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=dict(os.environ)).stdout
        memory[case] = float(out.strip().splitlines()[-1])
    median = {c: statistics.median(v) for c, v in times.items()}
    # each timed step of a case against the plain step of the same round: drift cancels in the ratio
    paired = {c: statistics.median(a / b for a, b in zip(times[c], times["plain"])) for c in CASES}
    results = {
        case: {
            "time_ratio": paired[case],
            "memory_ratio": memory[case] / memory["plain"],
            "step_seconds": median[case],
            "peak_memory_bytes": memory[case],
        }
        for case in CASES
        if case != "plain"
    }
    results["_precompute"] = precompute
    results["_plain"] = {
        "step_seconds": median["plain"],
        "peak_memory_bytes": memory["plain"],
        "size": size,
        "device": device,
        "batch": batch,
        "seq": seq,
        "rounds": rounds,
        "steps": steps,
    }
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", default="50m", choices=sorted(SIZES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--child-memory", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_memory:
        print(
            _peak_memory_child(
                args.child_memory, args.size, args.steps, args.batch, args.seq, args.device, "runs/bench/tmp"
            )
        )
        return
    print(json.dumps(run(args.size, args.device, args.rounds, args.steps, args.batch, args.seq), indent=2))


if __name__ == "__main__":
    main()
