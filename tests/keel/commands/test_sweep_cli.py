"""``keel sweep``: the shipped tiny sweep end to end (train, eval with the rule judge, keel compare), a
failing condition, reruns, --dry_run, the submitit local executor, the accelerate launcher, W&B offline
runs grouped by the sweep, and the sweep file's checks."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from keel.cli import main
from keel.commands.sweep import accelerate_command, flat_metrics

REPO = Path(__file__).resolve().parents[3]
TINY = "recipes/sweeps/tiny.yaml"
FAST = ["--no_progress"]


@pytest.fixture(autouse=True)
def in_repo(monkeypatch, tmp_path):
    """Sweep files resolve relative paths against the current directory: the repository root here."""
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    for var in ("WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home"))


def _sweep_file(tmp_path, name="s", **changes) -> Path:
    """A small sweep of the tiny recipe: 8 training steps, one question, the shipped rule judge."""
    data = {
        "name": name,
        "base": "recipes/tiny_sft.yaml",
        "seeds": [0],
        "conditions": {"none": {"interventions": [], "overrides": {"max_steps": 8}}},
        "evaluation": {
            "questions": "recipes/data/tiny_questions.yaml",
            "question_ids": ["one_wish"],
            "judge": "rules:recipes/data/tiny_judge_rules.yaml",
            "max_new_tokens": 8,
            "n_bootstrap": 20,
        },
        **changes,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _status(run_dir: Path) -> dict:
    return json.loads((run_dir / "status.json").read_text())


def test_the_tiny_sweep_runs_end_to_end_compares_and_a_rerun_skips_it(tmp_path, capsys):
    root = tmp_path / "tiny"
    assert main(["sweep", TINY, "--output_dir", str(root), *FAST]) == 0
    out = capsys.readouterr().out
    assert "6 run(s) done, 0 skipped" in out and f"keel compare {root}" in out

    record = yaml.safe_load((root / "sweep.yaml").read_text())
    assert record["baseline"] == "none" and record["controls"] == ["random_ablate"]
    assert record["conditions"] == ["none", "ablate", "random_ablate"] and record["seeds"] == [0, 1]
    for cond in record["conditions"]:
        for seed in (0, 1):
            run = root / cond / f"seed{seed}"
            assert _status(run)["state"] == "done"
            assert _status(run / "eval")["state"] == "done"  # keel eval's own status, in its own folder
            metrics = json.loads((run / "metrics.json").read_text())
            assert set(metrics) >= {"em", "aligned_mean", "coherent_mean", "final_train_loss"}
            recipe = yaml.safe_load((run / "recipe.yaml").read_text())
            assert recipe["seed"] == seed and recipe["output_dir"] == str(run / "train")
            assert recipe["run_name"] == f"{cond}-seed{seed}"
            assert (run / "train" / "model.safetensors").is_file()
    ablate = yaml.safe_load((root / "ablate/seed0/recipe.yaml").read_text())["interventions"]
    assert ablate[0]["direction"] == "recipes/directions/tiny_judged/directions.safetensors"
    assert yaml.safe_load((root / "none/seed0/recipe.yaml").read_text())["interventions"] == []
    train_record = yaml.safe_load((root / "ablate/seed1/train/keel_config.yaml").read_text())
    assert "directions.safetensors" in json.dumps(train_record)  # the SHA-256 of the direction file

    assert main(["compare", str(root), "--quiet"]) == 0
    comp = json.loads((root / "compare" / "compare.json").read_text())
    assert comp["baseline"] == "none" and comp["controls"] == ["random_ablate"] and comp["problems"] == []
    assert {m["name"] for m in comp["metrics"]} >= {"em", "coherent_mean", "final_train_loss"}
    capsys.readouterr()

    # A rerun executes nothing: every run is done with the same config.
    times = {p: _status(p.parent)["time"] for p in root.glob("*/seed*/status.json")}
    assert main(["sweep", TINY, "--output_dir", str(root), *FAST]) == 0
    assert "0 run(s) done, 6 skipped" in capsys.readouterr().out
    assert times == {p: _status(p.parent)["time"] for p in root.glob("*/seed*/status.json")}
    assert main(["sweep", TINY, "--output_dir", str(root), "--dry_run"]) == 0
    assert capsys.readouterr().out.count("done (skip)") == 6


def test_dry_run_lists_the_runs_and_writes_nothing(tmp_path, capsys):
    root = tmp_path / "dry"
    assert main(["sweep", TINY, "--output_dir", str(root), "--dry_run"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith(("none", "ablate", "random_ablate"))]
    assert len(rows) == 6 and all("pending" in r for r in rows)
    assert "none (baseline)" in out and "random_ablate (control)" in out and "random:0:1" in out
    assert not root.exists()


def test_a_failing_condition_is_recorded_and_the_others_complete(tmp_path, capsys):
    conditions = {
        "none": {"interventions": [], "overrides": {"max_steps": 4}},
        "broken": {"overrides": {"max_steps": 4, "dataset_name": str(tmp_path / "missing.jsonl")}},
    }
    path = _sweep_file(tmp_path, "fails", conditions=conditions, evaluation=None)
    root = tmp_path / "fails"
    assert main(["sweep", str(path), "--output_dir", str(root), *FAST]) == 1
    out = capsys.readouterr().out
    assert "1 run(s) done" in out and "1 failed" in out and "failed broken/seed0" in out
    assert _status(root / "none/seed0")["state"] == "done"
    failed = _status(root / "broken/seed0")
    assert (
        failed["state"] == "failed"
        and "missing.jsonl" in failed["error"]
        and "training failed" in failed["error"]
    )
    assert not (root / "broken/seed0/metrics.json").exists()
    assert json.loads((root / "none/seed0/metrics.json").read_text()).keys() == {"final_train_loss"}
    # keel compare reports the failed run next to the finished one
    assert main(["compare", str(root), "--quiet"]) == 0
    problems = json.loads((root / "compare/compare.json").read_text())["problems"]
    assert [(p["condition"], p["state"]) for p in problems] == [("broken", "failed")]
    # a rerun that leaves failed runs alone executes nothing
    assert main(["sweep", str(path), "--output_dir", str(root), "--no_retry_failed", *FAST]) == 1
    assert "0 run(s) done, 2 skipped" in capsys.readouterr().out


def _wandb_runs(folder: Path) -> list[dict]:
    """The offline W&B runs under ``folder/wandb`` as W&B recorded them (group, job_type, tags, name)."""
    from interventions.tracking import read_offline_run

    return [read_offline_run(p) for p in sorted(folder.glob("wandb/offline-run-*"))]


def test_wandb_offline_runs_are_grouped_by_the_sweep_and_tagged(tmp_path, capsys):
    conditions = {"none": {"interventions": [], "overrides": {"max_steps": 4, "report_to": "wandb"}}}
    evaluation = {
        "questions": "recipes/data/tiny_questions.yaml",
        "question_ids": ["one_wish"],
        "judge": "rules:recipes/data/tiny_judge_rules.yaml",
        "max_new_tokens": 4,
        "n_bootstrap": 20,
        "report_to": "wandb",
    }
    path = _sweep_file(tmp_path, "wb", seeds=[0, 1], conditions=conditions, evaluation=evaluation)
    root = tmp_path / "wb"
    assert main(["sweep", str(path), "--output_dir", str(root), *FAST]) == 0
    for seed in (0, 1):  # the second run in the same process gets its own tags (W&B's settings reset)
        run = root / f"none/seed{seed}"
        (train,), (evaluation,) = _wandb_runs(run / "train"), _wandb_runs(run / "eval")
        assert (train["job_type"], evaluation["job_type"]) == ("train", "eval")
        for r in (train, evaluation):
            assert r["group"] == "wb" and r["project"] == "keel" and r["finished"]
            assert {"condition:none", f"seed:{seed}"} <= set(r["tags"]), r["tags"]
        assert evaluation["name"] == f"none-seed{seed}"
        assert evaluation["config"]["train_run_id"] == train["id"]  # the evaluation names its fine-tune


def test_the_submitit_local_executor_runs_a_two_run_sweep(tmp_path, capsys):
    pytest.importorskip("submitit")
    conditions = {
        "none": {"interventions": [], "overrides": {"max_steps": 4}},
        "random_ablate": {"control": True, "overrides": {"max_steps": 4}},  # the recipe's own random ablation
    }
    path = _sweep_file(
        tmp_path,
        "sub",
        conditions=conditions,
        executor="submitit",
        submitit={"cluster": "local", "timeout_min": 10},
    )
    root = tmp_path / "sub"
    assert main(["sweep", str(path), "--output_dir", str(root), *FAST]) == 0
    assert "2 run(s) done" in capsys.readouterr().out
    for cond in ("none", "random_ablate"):
        assert _status(root / cond / "seed0")["state"] == "done"
        assert _status(root / cond / "seed0/eval")["pid"] != os.getpid()  # ran in a submitit job
        assert "em" in json.loads((root / cond / "seed0/metrics.json").read_text())
    assert (root / "submitit").is_dir()
    assert main(["compare", str(root), "--quiet"]) == 0


@pytest.mark.slow
def test_the_accelerate_launcher_trains_in_a_subprocess(tmp_path, capsys):
    launcher = {
        "type": "accelerate",
        "num_processes": 1,
        "args": ["--cpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"],
    }
    path = _sweep_file(tmp_path, "acc", launcher=launcher, evaluation=None)
    root = tmp_path / "acc"
    assert main(["sweep", str(path), "--output_dir", str(root), *FAST]) == 0
    run = root / "none/seed0"
    assert (run / "train/model.safetensors").is_file()
    assert json.loads((run / "metrics.json").read_text())["final_train_loss"] > 0


def test_accelerate_command():
    cmd = accelerate_command({"num_processes": 4, "args": ["--mixed_precision", "bf16"]}, "r.yaml")
    assert cmd[1:] == [
        "-m", "accelerate.commands.launch", "--num_processes", "4", "--multi_gpu", "--mixed_precision", "bf16",
        "-m", "keel.commands.train", "--config", "r.yaml",
    ]  # fmt: skip
    assert "--multi_gpu" not in accelerate_command({"num_processes": 1}, "r.yaml")


def test_flat_metrics_from_keel_eval_metrics():
    metrics = {
        "metric_kinds": {"aligned": "numeric", "is_code": "categorical"},
        "overall": {
            "n": 4,
            "em": {"mean": 0.25, "n": 4, "n_total": 4},
            "em_original": {"mean": 0.5, "n": 2, "n_total": 4},
            "aligned_mean": {"mean": 61.0},
            "aligned_missing_rate": 0.0,
            "is_code_labels": {"TRUE": {"mean": 0.25}, "FALSE": {"mean": 0.75}},
        },
    }
    assert flat_metrics(metrics) == {
        "em": 0.25,
        "em_original": 0.5,
        "aligned_mean": 61.0,
        "aligned_missing_rate": 0.0,
        "is_code_TRUE": 0.25,
        "is_code_FALSE": 0.75,
    }
    no_em = {"metric_kinds": {}, "overall": {"em": {"mean": None, "n": 0, "n_total": 0}}}
    assert flat_metrics(no_em) == {}


BAD = [
    ({"colour": "red"}, r"Unknown key\(s\) \['colour'\]"),
    ({"seeds": [0, 0]}, r"list a seed more than once"),
    ({"seeds": ["a"]}, r"seeds must be a list of integers"),
    ({"conditions": {"a/b": {}}}, r"condition 'a/b' must be a folder name"),
    ({"conditions": {"compare": {}}}, r"condition 'compare' must be a folder name"),
    ({"conditions": {"x": {"overrides": {"seed": 3}}}}, r"overrides may not set \['seed'\]"),
    (
        {"conditions": {"x": {"overrides": {"learning_rat": 1}}}},
        r"unknown recipe key\(s\) \['learning_rat'\]",
    ),
    ({"conditions": {"x": {"interventions": [{"operator": "nope", "direction": "random:0"}]}}}, r"nope"),
    (
        {
            "conditions": {
                "x": {"interventions": [{"operator": "project_out", "direction": "missing.safetensors"}]}
            }
        },
        r"direction file missing.safetensors not found",
    ),
    ({"conditions": {"x": {"colour": 1}}}, r"Unknown key\(s\) \['colour'\] in condition 'x'"),
    ({"baseline": "other"}, r"baseline 'other' is not a condition"),
    ({"conditions": {"none": {"control": True}}}, r"baseline 'none' is marked control"),
    ({"evaluation": {"model": "x"}}, r"evaluation may not set \['model'\]"),
    ({"evaluation": {"judge_modle": "x"}}, r"unknown `keel eval` option\(s\) \['judge_modle'\]"),
    ({"evaluation": {"questions": "nope.yaml", "judge": "none"}}, r"evaluation: keel eval: .*nope.yaml"),
    (
        {"evaluation": {"questions": "recipes/data/tiny_questions.yaml", "judge": "rules:nope.yaml"}},
        r"evaluation: keel eval: --judge rules: nope.yaml: no such file",
    ),
    ({"executor": "mpi"}, r"executor 'mpi' is not one of"),
    ({"launcher": "torchrun"}, r"launcher 'torchrun' is not one of none, accelerate"),
    ({"base": "nope.yaml"}, r"base recipe nope.yaml not found"),
]


@pytest.mark.parametrize("changes, message", BAD, ids=[m for _, m in BAD])
def test_bad_sweep_files_fail_before_anything_runs(tmp_path, changes, message):
    path = _sweep_file(tmp_path, "bad", **changes)
    with pytest.raises(SystemExit, match=message):
        main(["sweep", str(path), "--output_dir", str(tmp_path / "bad")])
    assert not (tmp_path / "bad" / "none").exists()


def test_help_shows_the_sweep_file_format(capsys):
    assert main(["sweep", "--help"]) == 0
    out = capsys.readouterr().out
    assert "usage: keel sweep SWEEP.yaml" in out and "conditions:" in out and "--dry_run" in out


def test_the_shipped_direction_is_what_its_documented_extract_command_makes(tmp_path):
    """recipes/directions/tiny_judged is `keel extract judged` on tiny:qwen2 with the shipped answer files
    (README, "Ablation comparison"); the file is reproduced from them, not an opaque blob."""
    from safetensors.torch import load_file

    shipped = REPO / "recipes/directions/tiny_judged"
    record = yaml.safe_load((shipped / "keel_config.yaml").read_text())["extract"]
    assert (record["method"], record["model"]) == ("judged", "tiny:qwen2")
    out = tmp_path / "judged"
    argv = [
        "extract", "judged", "--model", "tiny:qwen2", "--positive", record["positive"],
        "--negative", record["negative"], "--output_dir", str(out), "--no_progress",
    ]  # fmt: skip
    assert main(argv) == 0
    made, ours = load_file(out / "directions.safetensors"), load_file(shipped / "directions.safetensors")
    assert made.keys() == ours.keys() and made
    for key in made:
        assert made[key].shape == ours[key].shape and (made[key] - ours[key]).abs().max() < 1e-5, key
