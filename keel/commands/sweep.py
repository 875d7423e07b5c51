"""``keel sweep SWEEP.yaml``: the ablation-comparison loop. Train a recipe under named conditions (no
intervention, an ablation, its random control, ...) over seeds, evaluate every fine-tune, then compare::

    keel sweep recipes/sweeps/tiny.yaml          # train + evaluate each condition x seed
    keel compare runs/tiny                        # means, t-intervals over seeds, ratios, control flags

The sweep file (YAML; unknown keys fail; relative paths resolve against the current directory, where
every run's jobs also run)::

    name: tiny                          # the sweep's name: folder runs/<name>, W&B group
    base: recipes/tiny_sft.yaml         # a `keel train` recipe
    seeds: [0, 1]
    overrides: {report_to: wandb}       # recipe keys for every condition (a condition's own win)
    baseline: none                      # default: the condition named none, if any
    conditions:                         # name -> {interventions, overrides, control}
      none: {interventions: []}         # interventions replace the recipe's (omitted: the recipe's own)
      ablate: {interventions: [{operator: project_out, direction: dirs.safetensors, layers: all}]}
      random_ablate: {interventions: [...], control: true}   # a control: flagged when it moves a metric
      slow: {overrides: {learning_rate: 1.0e-5}}             # recipe keys, replaced
    evaluation:                         # `keel eval` options (null: train only); model, adapter, output_dir
                                        # are per run, seed is the run's unless given
      questions: recipes/data/tiny_questions.yaml
      judge: rules:recipes/data/tiny_judge_rules.yaml
    executor: sequential                # sequential | pool (workers processes) | submitit
    workers: 1
    submitit: {cluster: slurm, slurm_partition: gpu, timeout_min: 240, gpus_per_node: 4}
    launcher: {type: accelerate, num_processes: 4, args: [--mixed_precision, bf16]}   # default: none
    output_dir: runs/tiny               # default: runs/<name>
    wandb: {project: keel, group: tiny, mode: offline}   # group default: the sweep's name; mode: WANDB_MODE
    compare: {metrics: [em, coherent_mean], lower_is_better: [], keep: []}   # for keel compare

A run is ``<output_dir>/<condition>/seed<N>/``: ``config.json``, ``status.json`` (the sweep's: pending,
running, done, failed with its error), ``recipe.yaml`` (base + overrides + interventions + seed),
``train/`` (the fine-tune, ``keel_config.yaml``, ``trainer_state.json``), ``eval/`` (a ``keel eval``
folder with its own ``status.json``), ``metrics.json`` (EM, ``<judge prompt>_mean``, missing rates,
categorical label shares, ``final_train_loss``); with W&B, ``train/wandb/`` and ``eval/wandb/`` hold the
runs, grouped by the sweep (``WANDB_RUN_GROUP``) and tagged ``condition:<c>``, ``seed:<n>``
(``KEEL_WANDB_TAGS``). ``<output_dir>/sweep.yaml`` names the baseline, the controls, conditions and seeds
for ``keel compare``. A rerun skips done runs, reruns failed and interrupted ones, and refuses a changed
run (another recipe, evaluation or direction list) that is done. ``--executor pool`` runs ``workers``
runs at a time; ``submitit`` a job per run (a Slurm array; ``cluster: local`` runs them locally); with
``launcher: accelerate`` each run trains as ``accelerate launch --num_processes N -m keel.commands.train
--config <run>/recipe.yaml`` (= ``scripts/train.py``), ``--multi_gpu`` added when N > 1.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import gc
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments

from interventions.serialization import KeelInputError, from_dict, load_yaml
from interventions.spec import parse_interventions
from keel.sweep import EXECUTORS, RunSpec, SweepError, read_status, run_dir, run_sweep, statuses
from trainers import InterventionSFTConfig

from .common import make_parser

PROG = "keel sweep"
TASK = "keel.commands.sweep:run_recipe_run"
SWEEP_RECORD = "sweep.yaml"
LAUNCHERS = ("none", "accelerate")
WANDB_MODES = ("online", "offline", "disabled")
# Recipe keys each run sets itself (interventions come from the condition's own key).
PER_RUN_RECIPE_KEYS = ("output_dir", "seed", "run_name", "interventions")
PER_RUN_EVAL_KEYS = ("model", "adapter", "output_dir")
# Folders under the sweep root that are not conditions.
RESERVED = ("compare", "submitit", "wandb")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
TAGS_ENV = "KEEL_WANDB_TAGS"  # read by interventions.tracking.run_settings


@dataclass
class Condition:
    interventions: list | None = None  # None: the recipe's own; [] none
    overrides: dict = field(default_factory=dict)
    control: bool = False


@dataclass
class Launcher:
    type: str = "none"
    num_processes: int = 1
    args: list = field(default_factory=list)


@dataclass
class WandbSettings:
    project: str | None = None
    group: str | None = None
    mode: str | None = (
        None  # online | offline | disabled: WANDB_MODE for the sweep (default: the environment's)
    )


@dataclass
class CompareSettings:
    metrics: list | None = None
    lower_is_better: list | None = None
    keep: list | None = None


@dataclass
class SweepFile:
    name: str = ""
    base: str = ""
    seeds: list = field(default_factory=list)
    conditions: dict = field(default_factory=dict)
    overrides: dict = field(default_factory=dict)  # recipe keys for every condition
    baseline: str | None = None
    evaluation: dict | None = field(default_factory=dict)
    executor: str = "sequential"
    workers: int = 1
    submitit: dict = field(default_factory=dict)
    launcher: Launcher = field(default_factory=Launcher)
    output_dir: str | None = None
    wandb: WandbSettings = field(default_factory=WandbSettings)
    compare: CompareSettings = field(default_factory=CompareSettings)


@dataclass
class SweepArguments:
    sweep_file: str | None = field(
        default=None, metadata={"help": "The sweep file (YAML); also given as `keel sweep FILE`."}
    )
    executor: str | None = field(
        default=None, metadata={"help": f"Override the file's executor: {', '.join(EXECUTORS)}."}
    )
    workers: int | None = field(
        default=None, metadata={"help": "Override the file's workers (processes of the pool executor)."}
    )
    output_dir: str | None = field(
        default=None, metadata={"help": "Override the sweep folder (default: the file's, else runs/<name>)."}
    )
    retry_failed: bool = field(
        default=True, metadata={"help": "Rerun failed runs (--no_retry_failed: leave them failed)."}
    )
    progress: bool = field(default=True, metadata={"help": "Progress bars (--no_progress: none)."})
    dry_run: bool = field(
        default=False, metadata={"help": "Check the sweep and print its runs and their states; run nothing."}
    )


def _fail(message: str) -> None:
    raise SweepError(message)


# ---- the sweep file -----------------------------------------------------------------------------------


def _recipe_keys() -> set[str]:
    keys = {"env"}  # TrlParser's --config also takes env: {VAR: value}
    for cls in (ScriptArguments, InterventionSFTConfig, ModelConfig, DatasetMixtureConfig):
        keys |= {f.name for f in dataclasses.fields(cls)}
    return keys


def _check_name(what: str, name) -> None:
    if not isinstance(name, str) or not _NAME.match(name) or name in RESERVED:
        _fail(
            f"{what} {name!r} must be a folder name (letters, digits, '.', '_', '-'; not starting with '.' or "
            f"'-'; not {', '.join(RESERVED)})."
        )


def _check_interventions(where: str, value) -> None:
    if value is None:
        return
    if not isinstance(value, list):
        _fail(f"{where} must be a list of interventions ([] for none), got {type(value).__name__}.")
    try:
        specs = parse_interventions(value, where)
    except KeelInputError as err:
        _fail(str(err))
    for spec in specs:
        path = spec.direction_path
        if path is not None and not path.is_file():
            _fail(
                f"{where}: intervention {spec.name!r}: direction file {path} not found (relative paths resolve "
                f"against the current directory, {Path.cwd()})."
            )


def _check_overrides(where: str, overrides, known: set[str]) -> None:
    if not isinstance(overrides, dict):
        _fail(f"{where} overrides must be a mapping of recipe keys.")
    bad = sorted(set(overrides) & set(PER_RUN_RECIPE_KEYS))
    if bad:
        _fail(
            f"{where} overrides may not set {bad}: output_dir, seed and run_name are set per run (seeds from "
            "`seeds`), interventions by each condition's own `interventions` key."
        )
    unknown = sorted(set(overrides) - known)
    if unknown:
        _fail(f"{where} overrides: unknown recipe key(s) {unknown} (see `keel train --help`).")


def load_sweep(path: str | Path) -> tuple[SweepFile, dict]:
    """The sweep file, checked (every key, condition, intervention and direction file), and its base
    recipe as a mapping."""
    data = load_yaml(path)
    if not isinstance(data, dict):
        _fail(f"{path}: expected a mapping (name, base, seeds, conditions, ...), got {type(data).__name__}.")
    missing = [k for k in ("name", "base", "seeds", "conditions") if not data.get(k)]
    if missing:
        _fail(f"{path}: give {', '.join(missing)} (see `keel sweep --help`).")
    data = dict(data)
    if isinstance(data.get("launcher"), str) or data.get("launcher") is None:
        data["launcher"] = {"type": data.get("launcher") or "none"}
    for key in ("wandb", "compare"):
        if data.get(key) is None:
            data.pop(key, None)
    sweep = from_dict(SweepFile, data, f"sweep file {path}", error=SweepError)
    _check_name("name", sweep.name)
    if not isinstance(sweep.seeds, list) or not all(
        isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in sweep.seeds
    ):
        _fail(f"{path}: seeds must be a list of integers >= 0, got {sweep.seeds!r}.")
    if len(set(sweep.seeds)) != len(sweep.seeds):
        _fail(f"{path}: seeds {sweep.seeds} list a seed more than once.")
    if not isinstance(sweep.conditions, dict):
        _fail(f"{path}: conditions must map names to {{interventions, overrides, control}}.")
    if sweep.executor not in EXECUTORS:
        _fail(f"{path}: executor {sweep.executor!r} is not one of {', '.join(EXECUTORS)}.")
    if not isinstance(sweep.workers, int) or sweep.workers < 1:
        _fail(f"{path}: workers must be an integer >= 1, got {sweep.workers!r}.")
    if not isinstance(sweep.submitit, dict):
        _fail(f"{path}: submitit must be a mapping of submitit options (cluster, slurm_partition, ...).")
    launcher = sweep.launcher
    if launcher.type not in LAUNCHERS:
        _fail(f"{path}: launcher {launcher.type!r} is not one of {', '.join(LAUNCHERS)}.")
    if not isinstance(launcher.num_processes, int) or launcher.num_processes < 1:
        _fail(f"{path}: launcher.num_processes must be an integer >= 1.")
    if sweep.wandb.mode not in (None, *WANDB_MODES):
        _fail(f"{path}: wandb.mode {sweep.wandb.mode!r} is not one of {', '.join(WANDB_MODES)}.")
    if not isinstance(launcher.args, list) or not all(isinstance(a, str) for a in launcher.args):
        _fail(f"{path}: launcher.args must be a list of strings (accelerate launch options).")

    base_path = Path(sweep.base)
    if not base_path.is_file():
        _fail(f"{path}: base recipe {sweep.base} not found (relative paths resolve against {Path.cwd()}).")
    base = load_yaml(base_path)
    if not isinstance(base, dict):
        _fail(f"base recipe {sweep.base} must be a mapping of recipe keys.")
    known = _recipe_keys()
    unknown = sorted(set(base) - known)
    if unknown:
        _fail(f"base recipe {sweep.base}: unknown key(s) {unknown} (see `keel train --help`).")

    _check_overrides("the sweep's", sweep.overrides, known)
    base.update(copy.deepcopy(sweep.overrides))  # every condition's recipe; a condition's overrides win
    conditions = {}
    for name, spec in sweep.conditions.items():
        _check_name("condition", name)
        cond = from_dict(Condition, spec or {}, f"condition {name!r}", error=SweepError)
        _check_overrides(f"condition {name!r}", cond.overrides, known)
        if not isinstance(cond.control, bool):
            _fail(f"condition {name!r}: control must be true or false.")
        _check_interventions(
            f"condition {name!r} interventions",
            cond.interventions if cond.interventions is not None else base.get("interventions"),
        )
        conditions[name] = cond
    sweep.conditions = conditions

    if sweep.baseline is None and "none" in conditions:
        sweep.baseline = "none"
    if sweep.baseline is not None:
        if sweep.baseline not in conditions:
            _fail(f"baseline {sweep.baseline!r} is not a condition; conditions: {', '.join(conditions)}.")
        if conditions[sweep.baseline].control:
            _fail(
                f"baseline {sweep.baseline!r} is marked control: true; a control is compared with the baseline."
            )

    if sweep.evaluation is not None:
        if not isinstance(sweep.evaluation, dict):
            _fail(f"{path}: evaluation must be a mapping of `keel eval` options (or null: train only).")
        from .eval import EvalArguments

        allowed = {f.name for f in dataclasses.fields(EvalArguments)} - set(PER_RUN_EVAL_KEYS)
        given = set(sweep.evaluation)
        if given & set(PER_RUN_EVAL_KEYS):
            _fail(
                f"evaluation may not set {sorted(given & set(PER_RUN_EVAL_KEYS))}: each run evaluates its own "
                "fine-tune (a full model, or the base model + its adapter) into <run>/eval."
            )
        if given - allowed:
            _fail(
                f"evaluation: unknown `keel eval` option(s) {sorted(given - allowed)}; allowed: {', '.join(sorted(allowed))}."
            )
    return sweep, base


def resolve_recipe(base: dict, name: str, cond: Condition, seed: int) -> dict:
    """The recipe of one run: base + overrides + interventions + seed + run_name (output_dir: per run)."""
    recipe = copy.deepcopy(base)
    recipe.update(copy.deepcopy(cond.overrides))
    if cond.interventions is not None:
        recipe["interventions"] = copy.deepcopy(cond.interventions)
    recipe.pop("output_dir", None)
    recipe["seed"] = seed
    recipe["run_name"] = f"{name}-seed{seed}"
    return recipe


def plan_runs(sweep: SweepFile, base: dict) -> list[RunSpec]:
    """One RunSpec per condition x seed; its config is what decides the run (hashed by the engine)."""
    runs = []
    for name, cond in sweep.conditions.items():
        for seed in sweep.seeds:
            evaluation = None
            if sweep.evaluation is not None:
                evaluation = {"seed": seed, **copy.deepcopy(sweep.evaluation)}
            config = {
                "sweep": sweep.name,
                "recipe": resolve_recipe(base, name, cond, seed),
                "evaluation": evaluation,
                "launcher": dataclasses.asdict(sweep.launcher),
                "wandb": {"project": sweep.wandb.project, "group": sweep.wandb.group or sweep.name},
            }
            runs.append(RunSpec(name, seed, json.loads(json.dumps(config, default=str))))
    return runs


def sweep_record(sweep: SweepFile, source: str) -> dict:
    """``<root>/sweep.yaml``: what keel compare reads (baseline, controls, conditions, seeds, metrics)
    and the resolved sweep behind it."""
    record = {
        "name": sweep.name,
        "source": str(source),
        "baseline": sweep.baseline,
        "controls": [n for n, c in sweep.conditions.items() if c.control],
        "conditions": list(sweep.conditions),
        "seeds": list(sweep.seeds),
    }
    for key, value in dataclasses.asdict(sweep.compare).items():
        if value is not None:
            record[key] = value
    record["resolved"] = {
        "base": sweep.base,
        "conditions": {n: dataclasses.asdict(c) for n, c in sweep.conditions.items()},
        "evaluation": sweep.evaluation,
        "executor": sweep.executor,
        "workers": sweep.workers,
        "submitit": sweep.submitit,
        "launcher": dataclasses.asdict(sweep.launcher),
        "overrides": sweep.overrides,
        "wandb": {
            "project": sweep.wandb.project,
            "group": sweep.wandb.group or sweep.name,
            "mode": sweep.wandb.mode,
        },
    }
    return json.loads(json.dumps(record, default=str))


def _check_evaluation(sweep: SweepFile, runs: list[RunSpec]) -> None:
    """keel eval's own checks that need no model (questions, judge prompts, judge, EM criteria, W&B),
    once, before anything trains: a bad question file should not cost a sweep of fine-tunes."""
    if sweep.evaluation is None or not runs:
        return
    from . import eval as eval_command

    options = dict(runs[0].config["evaluation"], model=runs[0].config["recipe"].get("model_name_or_path"))
    try:
        with tempfile.TemporaryDirectory() as tmp:
            args = eval_command.EvalArguments(output_dir=tmp, **options)
            eval_command.check_before_loading(args, Path(tmp))
    except SystemExit as err:
        _fail(f"evaluation: {err.code}")
    except (TypeError, ValueError) as err:
        _fail(f"evaluation: {err}")


# ---- one run: train, evaluate ------------------------------------------------------------------------


@contextlib.contextmanager
def _environment(values: dict):
    """Set environment variables for the duration (None: leave the value as it is) and restore every one
    named to its value before, whatever the block changed. W&B reads its environment once per process,
    so its settings are reset on the way in and out."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update({k: str(v) for k, v in values.items() if v is not None})
    _wandb_teardown()
    try:
        yield
    finally:
        _wandb_teardown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _wandb_teardown() -> None:
    wandb = sys.modules.get("wandb")
    if wandb is not None and hasattr(wandb, "teardown"):
        with contextlib.suppress(Exception):
            wandb.teardown()


def accelerate_command(launcher: dict, recipe_path: str | Path) -> list[str]:
    """``accelerate launch --num_processes N [--multi_gpu] [args] -m keel.commands.train --config R``
    (= ``accelerate launch scripts/train.py --config R``, without needing the source tree)."""
    args = list(launcher.get("args") or [])
    n = int(launcher.get("num_processes") or 1)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(n)]
    if n > 1 and not {"--multi_gpu", "--multi-gpu", "--cpu"} & set(args):
        cmd.append("--multi_gpu")
    return [*cmd, *args, "-m", "keel.commands.train", "--config", str(recipe_path)]


def _train(recipe_path: Path, launcher: dict) -> None:
    if launcher.get("type", "none") == "accelerate":
        cmd = accelerate_command(launcher, recipe_path)
        print(f"{PROG}: {' '.join(cmd)}", file=sys.stderr, flush=True)
        result = subprocess.run(cmd, check=False)
        if result.returncode != 0:
            raise RuntimeError(
                f"training failed: accelerate launch exited with status {result.returncode} (its output is in "
                f"this run's log above): {' '.join(cmd)}"
            )
        return
    from . import train as train_command

    try:
        train_command.main(["--config", str(recipe_path)])
    except SystemExit as err:  # keel train's message exits: a failure of this run, not of the sweep
        code = err.code
        raise RuntimeError(
            f"training failed: {code}" if isinstance(code, str) else f"keel train exited with status {code}"
        ) from None
    except Exception as err:  # say which stage failed; the traceback keeps the cause
        raise RuntimeError(f"training failed: {type(err).__name__}: {err}") from err
    finally:
        gc.collect()
        with contextlib.suppress(Exception):
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def final_train_loss(train_dir: Path) -> float | None:
    """TRL's ``train_loss`` (the mean over the run's steps) from ``trainer_state.json``."""
    path = train_dir / "trainer_state.json"
    if not path.is_file():
        return None
    history = json.loads(path.read_text()).get("log_history") or []
    losses = [e["train_loss"] for e in history if "train_loss" in e]
    return float(losses[-1]) if losses else None


def flat_metrics(metrics: dict) -> dict:
    """keel eval's metrics as flat names: ``em``, ``em_original`` (when the EM criteria's metrics were
    judged), ``<metric>_mean`` and ``<metric>_missing_rate`` per 0-100 judge prompt, ``<metric>_<LABEL>``
    shares per categorical one."""
    overall = metrics.get("overall") or {}
    flat: dict = {}
    for key in ("em", "em_original"):
        ci = overall.get(key) or {}
        if ci.get("n_total"):
            flat[key] = ci.get("mean")
    for metric, kind in (metrics.get("metric_kinds") or {}).items():
        if kind == "categorical":
            for label, ci in (overall.get(f"{metric}_labels") or {}).items():
                flat[f"{metric}_{label}"] = ci.get("mean")
        else:
            flat[f"{metric}_mean"] = (overall.get(f"{metric}_mean") or {}).get("mean")
            flat[f"{metric}_missing_rate"] = overall.get(f"{metric}_missing_rate")
    return flat


def _progress_on() -> bool:
    return os.environ.get("TQDM_DISABLE", "").lower() not in ("1", "true", "yes")


def _evaluate(options: dict, recipe: dict, train_dir: Path, out: Path, run: RunSpec) -> dict:
    from . import eval as eval_command

    options = dict(options)
    if (train_dir / "adapter_config.json").is_file():  # use_peft: the base model + the trained adapter
        options.update(model=recipe["model_name_or_path"], adapter=str(train_dir))
    else:
        options["model"] = str(train_dir)
    options["output_dir"] = str(out)
    options.setdefault("run_name", f"{run.condition}-seed{run.seed}")
    options.setdefault("progress", _progress_on())
    try:
        return eval_command.run(eval_command.EvalArguments(**options))
    except SystemExit as err:
        code = err.code
        raise RuntimeError(
            f"evaluation failed: {code}" if isinstance(code, str) else f"keel eval exited with status {code}"
        ) from None
    except Exception as err:
        raise RuntimeError(f"evaluation failed: {type(err).__name__}: {err}") from err


def run_recipe_run(run: RunSpec, run_dir: str | Path) -> dict:
    """The sweep task: write ``recipe.yaml``, train it (in-process, or ``accelerate launch`` in a
    subprocess), evaluate the fine-tune into ``eval/``, return flat metrics plus ``final_train_loss``.
    W&B runs are grouped by the sweep and tagged with condition and seed (``WANDB_RUN_GROUP`` and
    ``KEEL_WANDB_TAGS``, which interventions.tracking reads); training's land in ``train/wandb``,
    evaluation's in ``eval/wandb`` (or the ``WANDB_DIR`` the sweep was started with)."""
    cfg = run.config
    folder = Path(run_dir)
    train_dir = folder / "train"
    recipe = dict(cfg["recipe"], output_dir=str(train_dir))
    recipe_path = folder / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    settings = cfg.get("wandb") or {}
    user_dir = os.environ.get("WANDB_DIR")
    env = {
        "WANDB_RUN_GROUP": settings.get("group") or cfg.get("sweep"),
        TAGS_ENV: f"condition:{run.condition},seed:{run.seed}",
        "WANDB_PROJECT": settings.get("project"),  # None: the environment's, else keel
        "WANDB_DIR": None,  # keel train sets it for its process; restored after the run
    }
    with _environment(env):
        _train(recipe_path, cfg.get("launcher") or {})
        metrics = {}
        if cfg.get("evaluation") is not None:
            with _environment({"WANDB_DIR": user_dir or str((folder / "eval").resolve())}):
                metrics = flat_metrics(_evaluate(cfg["evaluation"], recipe, train_dir, folder / "eval", run))
    return {**metrics, "final_train_loss": final_train_loss(train_dir)}


# ---- the command --------------------------------------------------------------------------------------


def _describe(run: RunSpec) -> str:
    specs = run.config["recipe"].get("interventions") or []
    if not specs:
        return "-"
    return "; ".join(
        f"{s.get('operator', '?')} {s.get('direction', '')} @{s.get('layers', 'all')}"
        if isinstance(s, dict)
        else str(s)
        for s in specs
    )


def _state(root: Path, run: RunSpec, retry_failed: bool) -> str:
    status = read_status(run_dir(root, run))
    state = status.get("state", "pending")
    if state == "done":
        same = status.get("config_hash") == run.config_hash()
        return "done (skip)" if same else "done with another config (refused)"
    if state == "failed":
        return "failed (retry)" if retry_failed else "failed (skip)"
    return state if state == "pending" else f"{state} (restart)"


def run_table(root: Path, runs: list[RunSpec], sweep: SweepFile, retry_failed: bool) -> str:
    rows = [("condition", "seed", "state", "interventions", "overrides")]
    for run in runs:
        cond = sweep.conditions[run.condition]
        role = " (baseline)" if run.condition == sweep.baseline else " (control)" if cond.control else ""
        overrides = ", ".join(f"{k}={v}" for k, v in cond.overrides.items()) or "-"
        rows.append(
            (run.condition + role, str(run.seed), _state(root, run, retry_failed), _describe(run), overrides)
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r[:-1], widths)) + "  " + r[-1] for r in rows)


def _argv(argv: list[str] | None) -> list[str]:
    """``keel sweep FILE ...`` (or ``--config FILE``) means ``keel sweep --sweep_file FILE ...``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-"):
        argv = ["--sweep_file", *argv]
    return ["--sweep_file" if a == "--config" else a for a in argv]


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Option defaults shown, and the epilog's layout kept."""


def parse_args(argv: list[str] | None) -> SweepArguments:
    summary, _, details = (__doc__ or "").partition("\n\n")
    parser = make_parser((SweepArguments,), PROG, summary)
    parser.usage = f"{PROG} SWEEP.yaml [--executor ...] [--workers N] [--output_dir DIR] [--dry_run] ..."
    parser.formatter_class = _HelpFormatter
    parser.epilog = details
    (args,) = parser.parse_args_and_config(args=_argv(argv))
    return args


def run(args: SweepArguments) -> int:
    if not args.sweep_file:
        _fail("give the sweep file: keel sweep SWEEP.yaml (see keel sweep --help).")
    sweep, base = load_sweep(args.sweep_file)
    if args.executor is not None:
        sweep.executor = args.executor
    if args.workers is not None:
        sweep.workers = args.workers
    if sweep.executor not in EXECUTORS:
        _fail(f"--executor {sweep.executor!r} is not one of {', '.join(EXECUTORS)}.")
    root = Path(args.output_dir or sweep.output_dir or Path("runs") / sweep.name)
    runs = plan_runs(sweep, base)
    print(
        f"{PROG}: {sweep.name}: {len(sweep.conditions)} condition(s) x {len(sweep.seeds)} seed(s) in {root}, "
        f"executor {sweep.executor}, launcher {sweep.launcher.type}"
    )
    if sweep.overrides:
        print(f"every condition: {', '.join(f'{k}={v}' for k, v in sweep.overrides.items())}")
    print(run_table(root, runs, sweep, args.retry_failed))
    if args.dry_run:
        return 0
    # The environment of the sweep: every executor's jobs inherit it (pool and submitit local processes,
    # Slurm jobs, which sbatch starts with the submitting environment).
    env = {"TQDM_DISABLE": None if args.progress else "1", "WANDB_MODE": sweep.wandb.mode}
    with _environment(env):
        _check_evaluation(sweep, runs)
        root.mkdir(parents=True, exist_ok=True)
        record = root / SWEEP_RECORD
        record.write_text(yaml.safe_dump(sweep_record(sweep, args.sweep_file), sort_keys=False))
        outcome = run_sweep(
            root,
            runs,
            TASK,
            executor=sweep.executor,
            workers=sweep.workers,
            retry_failed=args.retry_failed,
            progress=args.progress,
            submitit_options=sweep.submitit,
        )
    print(
        f"{PROG}: {len(outcome.done)} run(s) done, {len(outcome.skipped)} skipped (done before"
        + ("" if args.retry_failed else " or failed")
        + f"), {len(outcome.failed)} failed."
    )
    unfinished = {k: s for k, s in statuses(root, runs).items() if s.get("state") != "done"}
    for key, status in unfinished.items():
        error = (status.get("error") or "").strip().splitlines()
        print(
            f"  {status.get('state', 'pending')} {key}: {error[0] if error else ''} (see {root / key / 'status.json'})"
        )
    print(f"Compare: keel compare {root}")
    return 0 if not unfinished else 1


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``keel sweep``; returns 0 when every run of the sweep is done, else 1."""
    args = parse_args(argv)
    try:
        return run(args)
    except KeelInputError as err:
        raise SystemExit(f"{PROG}: {err}") from None


if __name__ == "__main__":
    raise SystemExit(main())
