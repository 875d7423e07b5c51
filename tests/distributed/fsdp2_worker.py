"""FSDP2 on CPU with a keel InterventionSet: ``fully_shard`` on every decoder layer and the root.

``python fsdp2_worker.py OUT`` trains the unsharded model on the whole global batch (the reference);
under ``torchrun --nproc_per_node 2`` each rank shards the model (gloo, a 1-D CPU mesh) and trains on its
half of the same batch. Both run a project_out intervention at every layer and a few AdamW steps; rank 0
saves the losses, what the parameters are (DTensor, local shard sizes) and the intervention's
diagnostics of the last step (hook calls, projections before and after).
(accelerate does not do FSDP on CPU, so this is torch's FSDP2 called directly; STACK-FACTS addendum 2 §2.)
"""

import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from interventions import Intervention, InterventionSet  # noqa: E402
from keel.loading.tiny import tiny_model  # noqa: E402

STEPS, GLOBAL_BATCH, SEQ, VOCAB = 4, 4, 16, 512


def batches():
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(5, VOCAB, (GLOBAL_BATCH, SEQ), generator=gen) for _ in range(STEPS)]


def main(out: str) -> None:
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = 0
    model = tiny_model("qwen2", vocab_size=VOCAB, seed=0)
    sharded = world > 1
    if sharded:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        dist.init_process_group("gloo")
        rank = dist.get_rank()
        mesh = init_device_mesh("cpu", (world,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    direction = torch.randn(2, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    iset = InterventionSet(model, [Intervention("project_out", direction, layers="all", name="ablate")])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    per_rank = GLOBAL_BATCH // world
    with iset:
        for batch in batches():
            ids = batch[rank * per_rank : (rank + 1) * per_rank]
            iset.set_batch(attention_mask=torch.ones_like(ids))
            with iset.phase("train"):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            logged = loss.detach().clone()
            if sharded:
                dist.all_reduce(logged)
                logged /= world
            losses.append(logged.item())
        metrics = iset.pop_metrics(prefix="")
    params = dict(model.named_parameters())
    kinds = {name: type(p).__name__ for name, p in params.items()}
    local = {name: tuple(getattr(p, "_local_tensor", p).shape) for name, p in params.items()}
    full = {name: tuple(p.shape) for name, p in params.items()}
    if rank == 0:
        torch.save(
            {
                "world_size": world,
                "losses": losses,
                "kinds": kinds,
                "local": local,
                "full": full,
                "metrics": metrics,
            },
            out,
        )
    if sharded:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
