"""A training run with report_to wandb follows keel's conventions; checked on the offline run folder."""

import hashlib
import json

import torch

from interventions import Direction, save_directions
from interventions.tracking import read_offline_run
from trainers import InterventionSFTConfig, InterventionSFTTrainer


def test_train_run_group_job_type_tags_config_and_direction_artifact(
    make_model, tokenizer, chat_dataset, tmp_path, monkeypatch
):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_RUN_GROUP", "sweep-tiny")
    monkeypatch.setenv("KEEL_WANDB_TAGS", "condition:caft,seed:0")
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    for var in ("WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))
    path = save_directions([Direction(torch.randn(2, 64), layer=1)], tmp_path / "caft.safetensors")
    out = tmp_path / "caft-seed0"
    args = InterventionSFTConfig(
        output_dir=str(out),
        max_steps=2,
        per_device_train_batch_size=4,
        use_cpu=True,
        bf16=False,
        report_to=["wandb"],
        logging_steps=1,
        save_strategy="no",
        interventions=[{"name": "caft", "operator": "project_out", "direction": str(path), "layers": [1]}],
    )
    trainer = InterventionSFTTrainer(
        model=make_model(), args=args, train_dataset=chat_dataset, processing_class=tokenizer
    )
    import wandb

    try:
        trainer.train()
    finally:
        wandb.finish()
    (folder,) = (out / "wandb").glob("offline-run-*")
    info = read_offline_run(folder)
    assert (info["project"], info["group"], info["job_type"], info["name"]) == (
        "keel",
        "sweep-tiny",
        "train",
        "caft-seed0",
    )
    assert {"condition:caft", "seed:0", "op:project_out", "layers:[1]"} <= set(info["tags"])
    files = info["config"]["intervention_direction_files"]
    assert files["caft"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert info["config"]["interventions"][0]["operator"] == "project_out"
    assert [a["type"] for a in info["logged_artifacts"]] == ["direction"]
    assert any(
        k.endswith("interventions/caft/L1/hits") for h in info["history"] for k in h
    )  # per-layer diagnostics go to W&B
    record = json.loads((out / "wandb_run.json").read_text())
    assert record["group"] == "sweep-tiny" and record["id"] == info["id"]
