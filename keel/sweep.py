"""Sweeps: named conditions x seeds, each run = one task (train, then evaluate), with a status per run.

A run lives in ``<root>/<condition>/seed<N>/``: ``config.json`` (the resolved run config and its hash),
``status.json`` (pending, running, done or failed with its error), ``metrics.json`` once done, and
whatever the task writes. Runs are resumable and idempotent: a rerun skips runs that are done with the
same config, restarts interrupted ones (and, by default, failed ones) from scratch, and refuses to mix a
changed config into a finished run. A failing run is recorded and the others go on.

The task is named by an import path (``"package.module:function"``, called as ``function(run, run_dir)``
and returning a flat dict of metrics), so any executor can run it in another process: in-process
(``sequential``), a local pool of worker processes (``pool``, one thread each), or a cluster through
submitit (``submitit``: a Slurm job array, or its local executor). Pool workers get one device each
where several are visible.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
import shutil
import socket
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from interventions.serialization import KeelInputError

STATES = ("pending", "running", "done", "failed")
EXECUTORS = ("sequential", "pool", "submitit")
STATUS, CONFIG, METRICS = "status.json", "config.json", "metrics.json"


class SweepError(KeelInputError):
    """A sweep that cannot run as asked; the message says what to change."""


@dataclass
class RunSpec:
    """One run of a sweep: a condition at a seed, with the task's resolved config (JSON-able)."""

    condition: str
    seed: int
    config: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.condition}/seed{self.seed}"

    def config_hash(self) -> str:
        blob = json.dumps(self.config, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


@dataclass
class SweepOutcome:
    """What a sweep call did: runs skipped as already done, executed (done or failed) per state."""

    root: Path
    skipped: list[str] = field(default_factory=list)
    done: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed


def run_dir(root: str | Path, run: RunSpec) -> Path:
    return Path(root) / run.condition / f"seed{run.seed}"


def read_status(folder: str | Path) -> dict:
    path = Path(folder) / STATUS
    if not path.is_file():
        return {"state": "pending"}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return {"state": "failed", "error": f"{path} is not valid JSON"}


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def _set_status(folder: Path, state: str, **extra) -> None:
    _write_json(folder / STATUS, {"state": state, "time": time.time(), **extra})


def resolve_task(task: str | Callable) -> Callable:
    """``"module:function"`` to the function (or a callable as is)."""
    if callable(task):
        return task
    module, _, name = str(task).partition(":")
    if not module or not name:
        raise SweepError(f"task {task!r}: write it as 'package.module:function'.")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise SweepError(f"Cannot import the sweep task {task!r}: {err}.") from None


def execute_run(task: str | Callable, run: dict, folder: str) -> dict:
    """Run one task in ``folder`` and record its status; never raises (a failure is a status)."""
    folder = Path(folder)
    spec = RunSpec(**run)
    _set_status(folder, "running", pid=os.getpid(), host=socket.gethostname(), config_hash=spec.config_hash())
    started = time.time()
    try:
        metrics = resolve_task(task)(spec, folder)
        if not isinstance(metrics, dict):
            raise TypeError(f"the task returned {type(metrics).__name__}, not a dict of metrics")
        _write_json(folder / METRICS, metrics)
    except Exception as err:  # the sweep goes on; the run says what went wrong
        _set_status(
            folder,
            "failed",
            error=f"{type(err).__name__}: {err}",
            traceback=traceback.format_exc()[-4000:],
            seconds=round(time.time() - started, 1),
            config_hash=spec.config_hash(),
        )
        return {"key": spec.key, "state": "failed", "error": f"{type(err).__name__}: {err}"}
    _set_status(folder, "done", seconds=round(time.time() - started, 1), config_hash=spec.config_hash())
    return {"key": spec.key, "state": "done"}


def plan(
    root: str | Path, runs: Sequence[RunSpec], retry_failed: bool = True
) -> tuple[list[RunSpec], list[str]]:
    """(runs to execute, keys skipped as done). Refuses a finished run whose config changed."""
    keys = [r.key for r in runs]
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    if duplicates:
        raise SweepError(
            f"The sweep lists runs {duplicates} more than once; give each condition a unique name."
        )
    todo, skipped = [], []
    for run in runs:
        folder = run_dir(root, run)
        status = read_status(folder)
        if status.get("state") == "done":
            if status.get("config_hash") != run.config_hash():
                raise SweepError(
                    f"{folder} finished with another config (hash {status.get('config_hash')}, now "
                    f"{run.config_hash()}). Give the changed sweep a new name or output_dir, or delete {folder} "
                    "to rerun it."
                )
            skipped.append(run.key)
        elif status.get("state") == "failed" and not retry_failed:
            skipped.append(run.key)
        else:
            todo.append(run)
    return todo, skipped


def _prepare(root: Path, run: RunSpec) -> Path:
    """A clean folder for a run about to (re)start: an interrupted run's partial outputs go."""
    folder = run_dir(root, run)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    _write_json(
        folder / CONFIG,
        {"condition": run.condition, "seed": run.seed, "config_hash": run.config_hash(), **run.config},
    )
    _set_status(folder, "pending", config_hash=run.config_hash())
    return folder


def run_sweep(
    root: str | Path,
    runs: Sequence[RunSpec],
    task: str,
    executor: str = "sequential",
    workers: int = 1,
    retry_failed: bool = True,
    progress: bool = True,
    submitit_options: dict | None = None,
) -> SweepOutcome:
    """Execute the runs of a sweep that are not done yet; see the module docstring."""
    if executor not in EXECUTORS:
        raise SweepError(f"Unknown executor {executor!r}: choose one of {', '.join(EXECUTORS)}.")
    resolve_task(task)  # fail now, not in every worker
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    todo, skipped = plan(root, runs, retry_failed)
    outcome = SweepOutcome(root, skipped=skipped)
    jobs = [(task, dataclasses.asdict(run), str(_prepare(root, run))) for run in todo]
    run_jobs = {"sequential": _sequential, "pool": _pool, "submitit": _submitit}[executor]
    for result in run_jobs(
        jobs, workers=workers, progress=progress, options=submitit_options or {}, root=root
    ):
        if result["state"] == "done":
            outcome.done.append(result["key"])
        else:
            outcome.failed[result["key"]] = result.get("error", "failed")
    return outcome


def _bar(total: int, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="sweep runs", unit="run", disable=not progress)


def _sequential(jobs, progress: bool, **_):
    with _bar(len(jobs), progress) as bar:
        for job in jobs:
            result = execute_run(*job)
            bar.update()
            yield result


def worker_devices(index: int, visible: str | None) -> str | None:
    """The accelerator a pool worker gets: with several visible (``CUDA_VISIBLE_DEVICES`` or, unset, the
    count torch sees), worker ``index`` takes device ``index mod n``; None leaves the setting alone."""
    if visible is None:
        return None
    devices = [d for d in visible.split(",") if d.strip()]
    return devices[index % len(devices)] if len(devices) > 1 else None


def _init_worker(counter, visible: str | None) -> None:
    """One thread per worker on CPU; one device per worker where there are several (set before CUDA
    initialises in this process)."""
    with counter.get_lock():
        index = counter.value
        counter.value += 1
    device = worker_devices(index, visible)
    if device is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = device
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


def _visible_devices() -> str | None:
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        return os.environ["CUDA_VISIBLE_DEVICES"]
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return ",".join(str(i) for i in range(n)) if n > 1 else None


def _execute_job(job):
    return execute_run(*job)


def _pool(jobs, workers: int, progress: bool, **_):
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    if not jobs:
        return
    context = mp.get_context("spawn")
    with (
        ProcessPoolExecutor(
            max(1, min(workers, len(jobs))),
            mp_context=context,
            initializer=_init_worker,
            initargs=(context.Value("i", 0), _visible_devices()),
        ) as pool,
        _bar(len(jobs), progress) as bar,
    ):
        futures = {pool.submit(_execute_job, job): job for job in jobs}
        for future in as_completed(futures):
            bar.update()
            try:
                yield future.result()
            except Exception as err:  # the worker process itself died
                run = RunSpec(**futures[future][1])
                yield {"key": run.key, "state": "failed", "error": f"worker process died: {err}"}


def _submitit(jobs, progress: bool, options: dict, root: Path, **_):
    """A job array through submitit: Slurm on a cluster (``cluster: slurm`` and ``slurm_*`` options), or
    ``cluster: local`` to run the same jobs as local processes."""
    try:
        import submitit
    except ImportError:
        raise SweepError("executor 'submitit' needs submitit: pip install submitit.") from None
    if not jobs:
        return
    options = dict(options)
    cluster = options.pop("cluster", None)
    executor = submitit.AutoExecutor(folder=str(root / "submitit"), cluster=cluster)
    if options:
        executor.update_parameters(**options)
    submitted = executor.map_array(_execute_job, jobs)
    with _bar(len(jobs), progress) as bar:
        for job, handle in zip(jobs, submitted):
            try:
                result = handle.result()
            except Exception as err:  # the job died before it could record a status
                run = RunSpec(**job[1])
                _set_status(Path(job[2]), "failed", error=f"submitit job failed: {err}"[:4000])
                result = {"key": run.key, "state": "failed", "error": f"submitit job failed: {err}"}
            bar.update()
            yield result


def statuses(root: str | Path, runs: Sequence[RunSpec]) -> dict[str, dict]:
    """The recorded status of every run of the sweep."""
    return {run.key: read_status(run_dir(root, run)) for run in runs}
