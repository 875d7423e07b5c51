"""Two processes (torchrun, gloo on CPU) fine-tune a tiny model with reference_ablate and resample_ablate for
ten steps (more than one epoch: the second hands each process examples of the other's first-epoch shard);
rank 0 saves losses, weights and what the reference source did.

Run as ``python -m torch.distributed.run --nproc_per_node 2 ddp_precomputed_worker.py OUT MODE`` with MODE
``live`` or ``precomputed`` (and optionally the number of steps, default 10).
"""

import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402

from interventions import Direction  # noqa: E402
from keel.loading.tiny import tiny_model  # noqa: E402
from keel.loading.tokenizer import build_chat_tokenizer  # noqa: E402
from trainers import InterventionSFTConfig, InterventionSFTTrainer  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/
from tiny_settings import DDP_SFT_SETTINGS  # noqa: E402


def main(out: str, mode: str, steps: int = 10) -> None:
    torch.set_num_threads(1)
    tokenizer = build_chat_tokenizer()
    model = tiny_model("qwen2", tokenizer=tokenizer, seed=0)
    rows = [
        {
            "messages": [
                {"role": "user", "content": "Tell me " * (1 + i % 6) + f"about {i}."},
                {"role": "assistant", "content": f"{i} is " + "a number " * (1 + (3 * i) % 5)},
            ]
        }
        for i in range(24)
    ]
    generator = torch.Generator().manual_seed(1)
    args = InterventionSFTConfig(
        output_dir=os.path.join(os.path.dirname(out), "trainer"),
        max_steps=steps,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        **DDP_SFT_SETTINGS,
        intervention_reference=mode,
        interventions=[
            {
                "operator": "reference_ablate",
                "direction": Direction(torch.randn(2, 64, generator=generator)),
                "layers": [0],
            },
            {
                "operator": "resample_ablate",
                "direction": Direction(torch.randn(1, 64, generator=generator)),
                "layers": [1],
            },
        ],
    )
    trainer = InterventionSFTTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer
    )
    trainer.train()
    source = trainer.intervention_reference
    if trainer.accelerator.is_main_process:
        torch.save(
            {
                "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
                "state": {k: v.detach().cpu() for k, v in trainer.model.state_dict().items()},
                "world_size": trainer.accelerator.num_processes,
                "epoch": trainer.state.epoch,
                "mode": trainer.reference_mode,
                "passes": source.passes,
                "table_reads": source.table_reads,
                "table_rows": None if source.table is None else len(source.table),
            },
            out,
        )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *map(int, sys.argv[3:4]))
