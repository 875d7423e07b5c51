"""The sweep engine: statuses, resume after a killed sweep, failures recorded, executors."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from keel.sweep import RunSpec, SweepError, read_status, run_dir, run_sweep, statuses

HERE = Path(__file__).resolve().parent
TASK = "tasks:toy"


@pytest.fixture(autouse=True)
def tasks_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))


def _runs(log, conditions=("none", "ablate", "random"), seeds=(0, 1), **cfg):
    scale = {"none": 1.0, "ablate": 0.1, "random": 0.9}
    return [
        RunSpec(c, s, {"log": str(log), "scale": scale.get(c, 0.5), **cfg.get(c, {})})
        for c in conditions
        for s in seeds
    ]


def _executions(log):
    return (
        [json.loads(line)["key"] for line in Path(log).read_text().splitlines()] if Path(log).exists() else []
    )


def _metrics(root, runs):
    return {r.key: json.loads((run_dir(root, r) / "metrics.json").read_text()) for r in runs}


def test_a_sweep_runs_every_run_once_and_a_rerun_skips_them(tmp_path):
    runs = _runs(tmp_path / "log")
    out = run_sweep(tmp_path / "s", runs, TASK, progress=False)
    assert sorted(out.done) == sorted(r.key for r in runs) and out.ok
    assert _metrics(tmp_path / "s", runs)["ablate/seed1"] == {"score": 0.2, "seed": 1}
    assert all(s["state"] == "done" for s in statuses(tmp_path / "s", runs).values())
    again = run_sweep(tmp_path / "s", runs, TASK, progress=False)
    assert again.done == [] and sorted(again.skipped) == sorted(r.key for r in runs)
    assert len(_executions(tmp_path / "log")) == len(runs)


def test_a_failing_run_is_recorded_and_the_others_complete(tmp_path):
    runs = _runs(tmp_path / "log", ablate={"fail": True})
    out = run_sweep(tmp_path / "s", runs, TASK, progress=False)
    assert set(out.failed) == {"ablate/seed0", "ablate/seed1"}
    assert len(out.done) == 4
    status = read_status(run_dir(tmp_path / "s", runs[2]))
    assert (
        status["state"] == "failed"
        and "fails on purpose" in status["error"]
        and "Traceback" in status["traceback"]
    )
    assert not (run_dir(tmp_path / "s", runs[2]) / "metrics.json").exists()
    # fixed, the rerun executes only the failed runs
    fixed = _runs(tmp_path / "log")
    with pytest.raises(
        SweepError, match="another config"
    ):  # the done runs' configs are unchanged, the failed
        run_sweep(tmp_path / "s", _runs(tmp_path / "log", none={"scale": 2.0}), TASK, progress=False)
    before = len(_executions(tmp_path / "log"))
    out = run_sweep(
        tmp_path / "s",
        [r if r.condition != "ablate" else fixed[runs.index(r)] for r in runs],
        TASK,
        progress=False,
    )
    assert sorted(out.done) == ["ablate/seed0", "ablate/seed1"]
    assert len(_executions(tmp_path / "log")) == before + 2


def test_a_killed_sweep_reruns_only_the_missing_runs_with_identical_results(tmp_path):
    """Kill a pool sweep (its workers too) mid-run, rerun: done runs are skipped, the interrupted ones
    restart from scratch, and every metric equals an uninterrupted sweep's."""
    log = tmp_path / "log"
    runs = _runs(log, none={"sleep": 0.0}, ablate={"sleep": 0.0}, random={"sleep": 30.0})
    script = (
        "import sys; sys.path.insert(0, {!r})\n"
        "from keel.sweep import RunSpec, run_sweep\n"
        "import json\n"
        "runs = [RunSpec(**r) for r in json.loads({!r})]\n"
        "run_sweep({!r}, runs, {!r}, executor='pool', workers=2, progress=False)\n"
    ).format(str(HERE), json.dumps([r.__dict__ for r in runs]), str(tmp_path / "s"), TASK)
    proc = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            states = [s["state"] for s in statuses(tmp_path / "s", runs).values()]
            if states.count("running") >= 1 and states.count("done") >= 4:
                break
            time.sleep(0.2)
        else:
            pytest.fail(f"the sweep did not reach the state to kill it in: {states}")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    states = statuses(tmp_path / "s", runs)
    done_before = {k for k, s in states.items() if s["state"] == "done"}
    interrupted = {k for k, s in states.items() if s["state"] == "running"}
    assert interrupted and len(done_before) >= 4
    executed_before = len(_executions(log))
    # the same runs (same configs, so the same hashes), with a task that skips the sleep
    out = run_sweep(tmp_path / "s", runs, "tasks:toy_fast", progress=False)
    assert set(out.skipped) == done_before
    assert set(out.done) == {r.key for r in runs} - done_before
    assert sorted(_executions(log)[executed_before:]) == sorted(out.done)
    uninterrupted = run_sweep(tmp_path / "u", runs, "tasks:toy_fast", progress=False)
    assert uninterrupted.ok
    assert _metrics(tmp_path / "s", runs) == _metrics(tmp_path / "u", runs)


def test_submitit_local_executor_runs_a_two_run_sweep(tmp_path):
    runs = _runs(tmp_path / "log", conditions=("none",), seeds=(0, 1))
    out = run_sweep(
        tmp_path / "s",
        runs,
        TASK,
        executor="submitit",
        progress=False,
        submitit_options={"cluster": "local", "timeout_min": 5},
    )
    assert sorted(out.done) == ["none/seed0", "none/seed1"], out.failed
    assert _metrics(tmp_path / "s", runs)["none/seed1"]["score"] == 2.0
    assert (tmp_path / "s" / "submitit").is_dir()


def test_bad_sweeps_are_refused(tmp_path):
    runs = _runs(tmp_path / "log")
    with pytest.raises(SweepError, match="more than once"):
        run_sweep(tmp_path / "s", runs + runs[:1], TASK, progress=False)
    with pytest.raises(SweepError, match="executor"):
        run_sweep(tmp_path / "s", runs, TASK, executor="threads", progress=False)
    with pytest.raises(SweepError, match="Cannot import"):
        run_sweep(tmp_path / "s", runs, "tasks:nope", progress=False)


def test_pool_workers_get_one_device_each_where_there_are_several():
    from keel.sweep import worker_devices

    assert [worker_devices(i, "0,1,2") for i in range(4)] == ["0", "1", "2", "0"]
    assert worker_devices(3, "5") is None and worker_devices(0, None) is None
