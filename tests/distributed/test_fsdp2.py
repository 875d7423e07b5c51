"""FSDP2 that really shards, on CPU: torch's ``fully_shard`` on each decoder layer and the root of a tiny
model under torchrun (gloo), with a keel InterventionSet (project_out at every layer) attached. The
parameters are DTensors holding half of each tensor per rank, the hooks fire and ablate on every rank, and
the losses of a few AdamW steps equal one unsharded process on the same global batch."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("fsdp2_worker.py")
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.distributed
def test_fsdp2_shards_and_matches_one_process(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), WANDB_MODE="disabled")
    single, double = tmp_path / "one.pt", tmp_path / "two.pt"
    subprocess.run([sys.executable, str(WORKER), str(single)], check=True, env=env, cwd=ROOT, timeout=300)
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541"]
        + [str(WORKER), str(double)],
        check=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    a, b = torch.load(single), torch.load(double)
    assert a["world_size"] == 1 and b["world_size"] == 2
    # really sharded: every parameter is a DTensor whose local shard is half of dim 0
    assert set(b["kinds"].values()) == {"DTensor"}
    assert set(a["kinds"].values()) == {"Parameter"}
    for name, shape in b["full"].items():
        assert b["local"][name][0] == (shape[0] + 1) // 2, name
    # the intervention ran on the sharded model: one hook call per layer and step, projection ablated
    for metrics in (a["metrics"], b["metrics"]):
        assert metrics["ablate/L0/hits"] >= 1 and metrics["ablate/L1/hits"] >= 1
        assert metrics["ablate/L0/proj_before"] > 1e-3
        assert metrics["ablate/L0/proj_after"] < 1e-5 and metrics["ablate/L1/proj_after"] < 1e-5
    diffs = [abs(x - y) for x, y in zip(a["losses"], b["losses"])]
    assert len(diffs) == 4 and max(diffs) <= 1e-5, (a["losses"], b["losses"])
