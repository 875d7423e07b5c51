"""Scale-out on CPU: the documented DDP command really runs two processes, and a run that asks for FSDP
(or DeepSpeed) but gets DDP is stopped with a message (trainers/distributed.py) instead of training
silently as something else (accelerate and TRL fall back without a word on CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest

from trainers.distributed import ALLOW_ENV, DistributedSetupError, check_distributed_setup, problems

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes/tiny_sft.yaml"
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]
CPU_DDP = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no"]
CPU_DDP += ["--dynamo_backend", "no"]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "KEEL_ALLOW"))}
    return dict(env, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), WANDB_MODE="disabled", HF_HUB_OFFLINE="1")


def _run(cmd: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


def _rows() -> int:
    return sum(1 for line in (ROOT / "recipes/data/tiny_chat.jsonl").read_text().splitlines() if line.strip())


@pytest.mark.distributed
def test_documented_accelerate_ddp_command_trains_with_world_size_2(tmp_path):
    out = tmp_path / "ddp"
    cmd = ACCELERATE + CPU_DDP + ["--main_process_port", "29561", "scripts/train.py", "--config", str(RECIPE)]
    result = _run(cmd + ["--output_dir", str(out), "--max_steps", "2"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "keel: distributed setup: MULTI_CPU, 2 processes (DDP)" in result.stderr
    state = json.loads((out / "trainer_state.json").read_text())
    # 2 steps x 4 rows per device x 2 processes = 16 rows of the file: the epoch counter says so
    assert state["global_step"] == 2 and state["train_batch_size"] == 4
    assert state["log_history"][-1]["epoch"] == pytest.approx(2 * 4 * 2 / _rows())


@pytest.mark.distributed
def test_fsdp_accelerate_config_on_cpu_is_stopped_not_run_as_ddp(tmp_path):
    """recipes/accelerate/fsdp2.yaml on CPU: accelerate runs DDP (or one process each) and says nothing."""
    out = tmp_path / "fsdp"
    cmd = ACCELERATE + ["--config_file", "recipes/accelerate/fsdp2.yaml", "--num_processes", "2"]
    cmd += ["--mixed_precision", "no", "--main_process_port", "29562", "scripts/train.py"]
    result = _run(cmd + ["--config", str(RECIPE), "--output_dir", str(out), "--max_steps", "2"])
    assert result.returncode != 0
    assert "keel train: the distributed setup is not what was asked for" in result.stderr
    assert "FSDP was asked for" in result.stderr and "ACCELERATE_USE_FSDP=true" in result.stderr
    assert not (out / "trainer_state.json").exists()  # stopped before the first step


@pytest.mark.distributed
def test_trainer_fsdp_under_torchrun_on_cpu_is_stopped(tmp_path):
    """SFT with fsdp="full_shard" under torchrun on CPU trains as DDP (STACK-FACTS addendum 2 §2)."""
    out = tmp_path / "fsdp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29563"]
    cmd += ["scripts/train.py", "--config", str(RECIPE), "--output_dir", str(out), "--max_steps", "2"]
    result = _run(cmd + ["--fsdp", "full_shard"])
    assert result.returncode != 0
    assert (
        "FSDP was asked for (fsdp=" in result.stderr
        and "accelerate runs MULTI_CPU, 2 processes" in result.stderr
    )
    assert not (out / "trainer_state.json").exists()


# --- the check itself, on stand-ins (no processes) ------------------------------------------------


def _trainer(kind: str, processes: int = 1, main: bool = True, **args):
    accelerator = SimpleNamespace(
        distributed_type=SimpleNamespace(value=kind), num_processes=processes, is_main_process=main
    )
    defaults = dict(fsdp=[], deepspeed=None)
    return SimpleNamespace(accelerator=accelerator, args=SimpleNamespace(**{**defaults, **args}))


@pytest.fixture
def clean_env(monkeypatch):
    for key in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "WORLD_SIZE", ALLOW_ENV):
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


def test_what_was_asked_and_got_agree(clean_env, capsys):
    check_distributed_setup(_trainer("NO"))  # one process, nothing asked: silent
    assert capsys.readouterr().err == ""
    clean_env.setenv("WORLD_SIZE", "2")
    check_distributed_setup(_trainer("MULTI_GPU", 2))
    assert "keel: distributed setup: MULTI_GPU, 2 processes (DDP)" in capsys.readouterr().err
    clean_env.setenv("ACCELERATE_USE_FSDP", "true")
    check_distributed_setup(_trainer("FSDP", 2, fsdp=["full_shard"]))
    check_distributed_setup(_trainer("FSDP", 2, main=False))  # only the main process prints
    assert capsys.readouterr().err.count("distributed setup") == 1


@pytest.mark.parametrize(
    "env, kind, processes, args, expected",
    [
        (
            {"WORLD_SIZE": "2"},
            "MULTI_CPU",
            2,
            {"fsdp": ["full_shard"]},
            "FSDP was asked for (fsdp=full_shard)",
        ),
        ({"ACCELERATE_USE_FSDP": "true", "WORLD_SIZE": "2"}, "NO", 1, {}, "2 processes were launched"),
        (
            {"ACCELERATE_USE_DEEPSPEED": "true", "WORLD_SIZE": "2"},
            "MULTI_CPU",
            2,
            {},
            "DeepSpeed was asked for",
        ),
        ({"WORLD_SIZE": "2"}, "MULTI_GPU", 2, {"deepspeed": "ds_zero3.json"}, "deepspeed='ds_zero3.json'"),
    ],
)
def test_fallbacks_are_stopped(clean_env, env, kind, processes, args, expected):
    for key, value in env.items():
        clean_env.setenv(key, value)
    trainer = _trainer(kind, processes, **args)
    with pytest.raises(DistributedSetupError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        check_distributed_setup(trainer)
    assert problems(trainer.args, trainer.accelerator)


def test_fallback_can_be_allowed_with_a_loud_warning(clean_env, capsys):
    clean_env.setenv("WORLD_SIZE", "2")
    clean_env.setenv(ALLOW_ENV, "1")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_distributed_setup(_trainer("MULTI_CPU", 2, fsdp=["full_shard"]))
    assert any("FSDP was asked for" in str(w.message) for w in caught)
    assert "WARNING: the distributed setup is not what was asked for" in capsys.readouterr().err
