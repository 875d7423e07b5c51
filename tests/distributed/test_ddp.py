"""Two-process DDP on CPU (gloo) equals one process with the same global batch."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("ddp_worker.py")
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.distributed
@pytest.mark.parametrize("operator", ["project_out", "reference_ablate"])
def test_two_process_ddp_matches_one_process(tmp_path, operator):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), WANDB_MODE="disabled")
    single, double = tmp_path / "one" / "r.pt", tmp_path / "two" / "r.pt"
    single.parent.mkdir()
    double.parent.mkdir()
    subprocess.run(
        [sys.executable, str(WORKER), str(single), "4", operator], check=True, env=env, cwd=ROOT, timeout=300
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29533",
            str(WORKER),
            str(double),
            "2",
            operator,
        ],
        check=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    a, b = torch.load(single), torch.load(double)
    assert a["world_size"] == 1 and b["world_size"] == 2
    torch.testing.assert_close(torch.tensor(b["losses"]), torch.tensor(a["losses"]), atol=1e-4, rtol=1e-4)
    # diagnostics are reduced over both processes: they describe the global batch, as in one process
    assert a["diagnostics"] and a["diagnostics"][0].keys() == b["diagnostics"][0].keys()
    for step_a, step_b in zip(a["diagnostics"], b["diagnostics"]):
        for key, value in step_a.items():
            assert abs(step_b[key] - value) <= 1e-4 * max(1.0, abs(value)), (key, value, step_b[key])
    for name, value in a["state"].items():
        torch.testing.assert_close(b["state"][name], value, atol=1e-5, rtol=1e-4, msg=name)
