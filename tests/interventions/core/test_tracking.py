"""keel's W&B conventions, checked on real offline runs read back from their folders."""

import pytest
import torch

from interventions import Direction, save_directions
from interventions.tracking import (
    read_offline_run,
    read_run_record,
    run_settings,
    start_run,
    use_direction_files,
    write_run_record,
)


@pytest.fixture
def offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_PROJECT", "WANDB_RUN_GROUP", "KEEL_WANDB_TAGS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "data"))
    return tmp_path


def test_settings_follow_the_convention(offline, monkeypatch):
    assert run_settings("train") == {
        "project": "keel",
        "group": None,
        "job_type": "train",
        "name": None,
        "tags": None,
    }
    monkeypatch.setenv("WANDB_PROJECT", "em")
    monkeypatch.setenv("WANDB_RUN_GROUP", "sweep-a")
    monkeypatch.setenv("KEEL_WANDB_TAGS", "condition:caft,seed:1")
    s = run_settings("eval", name="caft-seed1", tags=["op:project_out", "seed:1"])
    assert (s["project"], s["group"], s["job_type"], s["name"]) == ("em", "sweep-a", "eval", "caft-seed1")
    assert s["tags"] == ["condition:caft", "seed:1", "op:project_out"]
    assert run_settings("eval", project="explicit", group="g")["project"] == "explicit"


def test_an_offline_run_records_the_convention_and_direction_lineage(offline, monkeypatch):
    monkeypatch.setenv("WANDB_RUN_GROUP", "sweep-a")
    path = save_directions([Direction(torch.randn(2, 16), layer=3)], offline / "d.safetensors")
    run = start_run(offline / "run", "train", config={"lr": 0.1}, name="none-seed0", tags=["seed:0"])
    names = use_direction_files(run, [path])
    write_run_record(offline / "run", run)
    run.finish()
    record = read_run_record(offline / "run")
    assert record["group"] == "sweep-a" and record["job_type"] == "train" and record["name"] == "none-seed0"
    (folder,) = (offline / "run" / "wandb").glob("offline-run-*")
    info = read_offline_run(folder)
    assert (info["project"], info["group"], info["job_type"]) == ("keel", "sweep-a", "train")
    assert info["tags"] == ["seed:0"] and info["config"]["lr"] == 0.1
    assert [a["type"] for a in info["logged_artifacts"]] == ["direction"]  # offline: logged, not "used"
    assert names[0].startswith("d-") and len(names[0]) == len("d-") + 12


def test_a_record_still_being_written_is_waited_for_then_refused(offline, monkeypatch):
    """wandb's writer may not have finished the last record when a run is read back: the reader retries
    until it parses, and after ``wait`` seconds says so instead of returning a partial run."""
    import interventions.tracking as tracking

    run = start_run(offline / "run", "train", config={"lr": 0.1})
    run.finish()
    (folder,) = (offline / "run" / "wandb").glob("offline-run-*")
    expected = read_offline_run(folder)
    real, calls = tracking._log_records, []

    def half_written_first(data):
        calls.append(1)
        return [b"\xff\xff\xff"] if len(calls) == 1 else real(data)

    monkeypatch.setattr(tracking, "_log_records", half_written_first)
    assert read_offline_run(folder) == expected and len(calls) == 2
    monkeypatch.setattr(tracking, "_log_records", lambda data: [b"\xff\xff\xff"])
    with pytest.raises(ValueError, match="does not parse after 0.3 s"):
        read_offline_run(folder, wait=0.3)
