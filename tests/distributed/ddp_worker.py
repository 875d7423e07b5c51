"""Train a tiny model with an ablation for a few steps; rank 0 saves losses and weights.

Run as ``python ddp_worker.py OUT PER_DEVICE_BATCH [OPERATOR]`` (one process) or under
``torchrun --nproc_per_node 2``; OPERATOR defaults to project_out.
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


def main(out: str, per_device_batch: int, operator: str = "project_out") -> None:
    torch.set_num_threads(1)
    tokenizer = build_chat_tokenizer()
    model = tiny_model("qwen2", tokenizer=tokenizer, seed=0)
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"What is {i} plus {i % 5}?"},
                {"role": "assistant", "content": f"The answer is {i + i % 5}."},
            ]
        }
        for i in range(32)
    ]
    direction = Direction(torch.randn(2, 64, generator=torch.Generator().manual_seed(1)))
    args = InterventionSFTConfig(
        output_dir=os.path.join(os.path.dirname(out), "trainer"),
        max_steps=4,
        per_device_train_batch_size=per_device_batch,
        learning_rate=1e-3,
        **DDP_SFT_SETTINGS,
        interventions=[{"operator": operator, "direction": direction, "layers": "all"}],
    )
    trainer = InterventionSFTTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer
    )
    trainer.train()
    if trainer.accelerator.is_main_process:
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        diagnostics = [
            {k: v for k, v in h.items() if k.startswith("interventions/")}
            for h in trainer.state.log_history
            if "loss" in h
        ]
        state = {k: v.detach().cpu() for k, v in trainer.model.state_dict().items()}
        torch.save(
            {
                "losses": losses,
                "state": state,
                "world_size": trainer.accelerator.num_processes,
                "diagnostics": diagnostics,
            },
            out,
        )


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), *sys.argv[3:4])
