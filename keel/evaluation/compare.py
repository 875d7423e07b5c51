"""Compare conditions over seeds: the ablation-comparison loop's table, ratios, paired differences, flags.

The core is :func:`compare_results`, which takes in-memory results ``{condition: {seed: metrics}}`` (a
metrics mapping may be nested; it is flattened to dotted keys, and a ``{"mean": m, "low": .., "high": ..}``
leaf, as ``keel eval`` writes, counts as ``m``). :func:`load_runs` builds that mapping from run folders::

    <sweep>/sweep.yaml                  optional: baseline, controls, metrics, lower_is_better, keep,
                                        conditions, seeds
    <sweep>/<condition>/seed<N>/status.json   {"state": "done" | "failed" | "running" | "pending", ...}
    <sweep>/<condition>/seed<N>/metrics.json  (or eval/metrics.json)

Statistics (all stated in every output):

- per condition and metric: the seeds' values, their mean, and a 95 % Student-t interval over seeds,
  ``mean +- t(0.975, n-1) * sd / sqrt(n)`` (sd with n-1). With 3-5 seeds this is wider than a bootstrap
  over so few values, which is the honest width. One seed: no interval.
- against the baseline: the ratio of means, named by the metric's direction: ``cut`` = baseline /
  condition for a metric where lower is better (EM), ``kept`` = condition / baseline for a metric to keep
  (the narrow task), ``ratio`` = condition / baseline otherwise; and the paired per-seed difference
  condition - baseline over the seeds both have, with a 95 % t-interval over those differences.
- control flag: a control condition is flagged on a metric when the 95 % paired-difference interval
  excludes 0 (a random direction should change nothing). With fewer than two shared seeds the flag is
  ``None`` (not testable), never silently "fine".

Failed, unfinished and missing runs, and done runs without a metric, are listed in ``problems``.

In memory (as ``keel demo`` has its results)::

    comp = compare_results(
        {cond: {r["seed"]: r["conditions"][cond] for r in results} for cond in conditions},
        baseline="none", controls=["random_ablate"], metrics=["heldout_misaligned", "incoherent"],
    )
    write_outputs(comp, out_dir)  # compare.md, compare.csv, compare.json, compare.png
"""

from __future__ import annotations

import csv
import fnmatch
import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

CONFIDENCE = 0.95
METHOD = (
    "95 % Student-t intervals over seeds: mean +- t(0.975, n-1) * sd / sqrt(n), sd with n-1, n = seeds "
    "with the metric; one seed gives no interval. Ratios are of the means (cut = baseline / condition "
    "for lower-is-better metrics, kept = condition / baseline for metrics to keep, ratio = condition / "
    "baseline otherwise). Paired differences are condition - baseline on the seeds both have, with a "
    "95 % t-interval over the differences. A control is flagged when that paired interval excludes 0; "
    "with fewer than two shared seeds it is not testable."
)

# t(0.975, df) for df = 1..30; larger df use the Cornish-Fisher expansion (error < 1e-5 there).
T_975 = (
    12.7062047, 4.3026527, 3.1824463, 2.7764451, 2.5705818, 2.4469119, 2.3646243, 2.3060041, 2.2621572,
    2.2281389, 2.2009852, 2.1788128, 2.1603687, 2.1447867, 2.1314495, 2.1199053, 2.1098156, 2.1009220,
    2.0930241, 2.0859634, 2.0796138, 2.0738731, 2.0686576, 2.0638986, 2.0595386, 2.0555294, 2.0518305,
    2.0484071, 2.0452296, 2.0422725,
)  # fmt: skip
Z_975 = 1.959963984540054

# Metric directions by name (fnmatch patterns on the dotted name; user patterns are tried first, then
# these; "keep" before "lower", so "in_domain_train_misaligned" is the narrow task, not EM).
DEFAULT_KEEP = ("*train_misaligned*", "*coherent_mean*", "*narrow*", "*task*", "*accuracy*")
DEFAULT_LOWER = ("em", "*.em", "em_*", "*.em_*", "*misaligned*", "*incoherent*", "*loss*")
# Flattened keys left out of the default metric list (bookkeeping, not outcomes).
DEFAULT_EXCLUDE = ("run.*", "thresholds.*", "per_question.*", "config.*", "timings.*", "*.n", "n", "seed")
# Conditions that count as controls when neither the caller nor the sweep file names any.
DEFAULT_CONTROL_PREFIX = "random"

SWEEP_FILES = ("sweep.yaml", "sweep.yml", "sweep.json")
SEED_DIR = re.compile(r"^seed(\d+)$")
RUN_NAME = re.compile(r"^(?P<condition>.+)[-_]seed(?P<seed>\d+)$")


class CompareError(ValueError):
    """Input compare cannot use; the message says what to change."""


# ---- statistics ---------------------------------------------------------------------------------------


def t_quantile_975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (two-sided 95 %)."""
    if df < 1:
        raise ValueError(f"t quantile needs df >= 1, got {df}.")
    if df <= len(T_975):
        return T_975[df - 1]
    z, v = Z_975, float(df)
    return (
        z
        + (z**3 + z) / (4 * v)
        + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * v**2)
        + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * v**3)
        + (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / (92160 * v**4)
    )


@dataclass(frozen=True)
class Interval:
    n: int
    mean: float | None
    sd: float | None = None
    low: float | None = None  # None: no interval (fewer than two values)
    high: float | None = None

    @property
    def half_width(self) -> float | None:
        return None if self.low is None else (self.high - self.low) / 2


def t_interval(values: Sequence[float]) -> Interval:
    """Mean and 95 % Student-t interval of ``values`` (no interval for fewer than two)."""
    x = [float(v) for v in values]
    n = len(x)
    if n == 0:
        return Interval(0, None)
    mean = sum(x) / n
    if n == 1:
        return Interval(1, mean)
    sd = math.sqrt(sum((v - mean) ** 2 for v in x) / (n - 1))
    half = t_quantile_975(n - 1) * sd / math.sqrt(n)
    return Interval(n, mean, sd, mean - half, mean + half)


# ---- metrics mappings ---------------------------------------------------------------------------------


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def flatten_metrics(metrics: Mapping, prefix: str = "") -> dict[str, float | None]:
    """Scalar metrics under dotted keys. A ``{"mean": ...}`` dict (keel eval's CI form) is its mean; W&B
    media dicts (with ``_type``), strings, lists and booleans are left out; None stays (a missing value)."""
    flat: dict[str, float | None] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            if "_type" in value:
                continue
            if "mean" in value and (value["mean"] is None or _number(value["mean"]) is not None):
                flat[name] = _number(value["mean"])
            else:
                flat.update(flatten_metrics(value, f"{name}."))
        elif value is None:
            flat[name] = None
        elif (number := _number(value)) is not None:
            flat[name] = number
    return flat


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(name == p or fnmatch.fnmatchcase(name, p) for p in patterns)


def metric_direction(name: str, lower_is_better: Iterable[str] = (), keep: Iterable[str] = ()) -> str:
    """``"keep"``, ``"lower"`` or ``"other"`` for a metric name: the caller's patterns first, then the
    defaults (:data:`DEFAULT_KEEP`, :data:`DEFAULT_LOWER`)."""
    keep, lower_is_better = list(keep), list(lower_is_better)
    for patterns, direction in (
        (keep, "keep"),
        (lower_is_better, "lower"),
        (DEFAULT_KEEP, "keep"),
        (DEFAULT_LOWER, "lower"),
    ):
        if _matches(name, patterns):
            return direction
    return "other"


RATIO_KIND = {"lower": "cut", "keep": "kept", "other": "ratio"}


def _ratio(direction: str, base: float | None, cond: float | None) -> float | None:
    """Ratio of means; inf where the denominator is 0 and the numerator is not; None where undefined."""
    if base is None or cond is None:
        return None
    num, den = (base, cond) if direction == "lower" else (cond, base)
    if den == 0:
        return None if num == 0 else math.copysign(math.inf, num)
    return num / den


# ---- the comparison -----------------------------------------------------------------------------------


@dataclass
class Cell:
    """One condition x metric: per-seed values, the interval over seeds, and the comparison with the
    baseline (None fields where there is no baseline or too few seeds)."""

    condition: str
    metric: str
    direction: str
    values: dict  # seed -> value (None: the run is done but lacks the metric; absent: no done run)
    n: int
    mean: float | None
    sd: float | None
    low: float | None
    high: float | None
    is_baseline: bool = False
    is_control: bool = False
    ratio_kind: str | None = None
    ratio: float | None = None
    paired_seeds: list = field(default_factory=list)
    diff_mean: float | None = None
    diff_low: float | None = None
    diff_high: float | None = None
    flag: bool | None = None  # controls only: True = moved the metric; None = not testable


@dataclass
class Comparison:
    conditions: list[str]
    seeds: list
    metrics: list[str]
    directions: dict[str, str]
    baseline: str | None
    controls: list[str]
    cells: list[Cell]
    problems: list[dict]
    name: str = ""
    method: str = METHOD

    def cell(self, condition: str, metric: str) -> Cell:
        for c in self.cells:
            if c.condition == condition and c.metric == metric:
                return c
        raise KeyError((condition, metric))

    def flagged(self) -> list[Cell]:
        """Control cells whose paired difference from the baseline excludes 0."""
        return [c for c in self.cells if c.flag]

    def to_dict(self) -> dict:
        return _json_safe(
            {
                "name": self.name,
                "method": self.method,
                "confidence": CONFIDENCE,
                "baseline": self.baseline,
                "controls": self.controls,
                "conditions": self.conditions,
                "seeds": self.seeds,
                "metrics": [{"name": m, "direction": self.directions[m]} for m in self.metrics],
                "cells": [
                    asdict(c) | {"values": {str(s): v for s, v in c.values.items()}} for c in self.cells
                ],
                "flagged": [{"condition": c.condition, "metric": c.metric} for c in self.flagged()],
                "problems": self.problems,
            }
        )


def _seed_key(seed):
    return (0, seed, "") if isinstance(seed, int) else (1, 0, str(seed))


def _select_metrics(requested: Sequence[str] | None, available: list[str]) -> list[str]:
    if not requested:
        return [m for m in available if not _matches(m, DEFAULT_EXCLUDE)]
    chosen: list[str] = []
    for pattern in requested:
        hits = [m for m in available if m == pattern or fnmatch.fnmatchcase(m, pattern)]
        if not hits:
            shown = ", ".join(available[:40]) + (" ..." if len(available) > 40 else "")
            raise CompareError(f"no run has a metric matching {pattern!r}; metrics found: {shown or 'none'}.")
        chosen += [m for m in hits if m not in chosen]
    return chosen


def compare_results(
    results: Mapping[str, Mapping[object, Mapping | None]],
    *,
    baseline: str | None = None,
    controls: Sequence[str] | None = None,
    metrics: Sequence[str] | None = None,
    lower_is_better: Sequence[str] = (),
    keep: Sequence[str] = (),
    conditions: Sequence[str] | None = None,
    seeds: Sequence | None = None,
    problems: Sequence[Mapping] = (),
    name: str = "",
) -> Comparison:
    """Compare conditions over seeds.

    ``results``: ``{condition: {seed: metrics}}`` for the runs that finished (a metrics mapping may be
    nested; None marks a run without metrics, listed as a problem). ``baseline``: the condition ratios and
    paired differences are taken against (default ``"none"`` when present, else no baseline).
    ``controls``: conditions that should change nothing (default: those named ``random*``; ``[]`` for
    none). ``metrics``: names or fnmatch patterns (default: every scalar except bookkeeping, see
    :data:`DEFAULT_EXCLUDE`). ``lower_is_better`` / ``keep``: patterns setting metric directions before the
    defaults. ``conditions`` / ``seeds``: the expected ones (default: those in ``results``); an expected
    run absent from ``results`` and from ``problems`` is listed as missing. ``problems``: runs already
    known to have failed or be missing (as :func:`load_runs` finds them), carried into the output."""
    conditions = list(conditions) if conditions is not None else list(results)
    conditions += [c for c in results if c not in conditions]
    problems = [dict(p) for p in problems]

    flat: dict[str, dict] = {}
    available: list[str] = []
    for cond in conditions:
        flat[cond] = {}
        for seed, m in (results.get(cond) or {}).items():
            if m is None:
                problems.append({"condition": cond, "seed": seed, "state": "done", "reason": "no metrics"})
                continue
            flat[cond][seed] = flatten_metrics(m)
            available += [k for k in flat[cond][seed] if k not in available]
    if not any(flat.values()):
        raise CompareError("no finished runs with metrics to compare.")

    all_seeds = set(seeds or ()) | {s for runs in flat.values() for s in runs}
    all_seeds |= {p["seed"] for p in problems if p.get("seed") is not None}
    seed_list = sorted(all_seeds, key=_seed_key)
    known = {(p.get("condition"), p.get("seed")) for p in problems}
    for cond in conditions:
        for seed in seed_list:
            if seed not in flat[cond] and (cond, seed) not in known and (cond, None) not in known:
                problems.append({"condition": cond, "seed": seed, "state": "missing", "reason": "no run"})

    if baseline is None and "none" in conditions:
        baseline = "none"
    if baseline is not None and baseline not in conditions:
        raise CompareError(f"baseline {baseline!r} is not a condition; conditions: {', '.join(conditions)}.")
    if baseline is not None:  # the baseline leads every table
        conditions = [baseline] + [c for c in conditions if c != baseline]
    if controls is None:
        controls = [c for c in conditions if c.startswith(DEFAULT_CONTROL_PREFIX)]
    unknown = [c for c in controls if c not in conditions]
    if unknown:
        raise CompareError(f"control(s) {unknown} are not conditions; conditions: {', '.join(conditions)}.")
    controls = [c for c in controls if c != baseline]

    chosen = _select_metrics(metrics, available)
    directions = {m: metric_direction(m, lower_is_better, keep) for m in chosen}

    cells = []
    for metric in chosen:
        base_values = {}
        if baseline is not None:
            base_values = {s: v[metric] for s, v in flat[baseline].items() if v.get(metric) is not None}
        base_mean = t_interval(list(base_values.values())).mean
        for cond in conditions:
            values = {s: flat[cond][s].get(metric) for s in sorted(flat[cond], key=_seed_key)}
            for s, v in values.items():
                if v is None:
                    problems.append(
                        {"condition": cond, "seed": s, "state": "done", "reason": f"no metric {metric!r}"}
                    )
            present = [v for v in values.values() if v is not None]
            iv = t_interval(present)
            cell = Cell(
                cond,
                metric,
                directions[metric],
                values,
                iv.n,
                iv.mean,
                iv.sd,
                iv.low,
                iv.high,
                is_baseline=cond == baseline,
                is_control=cond in controls,
            )
            if baseline is not None:
                cell.ratio_kind = RATIO_KIND[directions[metric]]
                cell.ratio = _ratio(directions[metric], base_mean, iv.mean)
                if cond != baseline:
                    paired = [s for s in values if values[s] is not None and s in base_values]
                    diff = t_interval([values[s] - base_values[s] for s in paired])
                    cell.paired_seeds = paired
                    cell.diff_mean, cell.diff_low, cell.diff_high = diff.mean, diff.low, diff.high
                    if cell.is_control and diff.low is not None:
                        cell.flag = diff.low > 0 or diff.high < 0
            cells.append(cell)

    problems.sort(key=lambda p: (str(p.get("condition")), _seed_key(p.get("seed") or 0)))
    return Comparison(
        conditions, seed_list, chosen, directions, baseline, list(controls), cells, problems, name
    )


# ---- reading runs -------------------------------------------------------------------------------------


@dataclass
class Runs:
    """Finished runs' metrics, ``{condition: {seed: metrics}}``, and the runs that did not finish."""

    results: dict[str, dict]
    problems: list[dict]
    sweep: dict
    conditions: list[str]  # every condition seen, finished or not
    seeds: list
    source: str = ""


def load_sweep(runs_dir: str | Path) -> dict:
    """The sweep file at the sweep root (``sweep.yaml`` / ``sweep.json``), or {}."""
    for fname in SWEEP_FILES:
        path = Path(runs_dir) / fname
        if path.is_file():
            try:
                data = yaml.safe_load(path.read_text()) or {}
            except yaml.YAMLError as err:
                raise CompareError(f"{path} is not valid YAML/JSON: {err}") from None
            if not isinstance(data, dict):
                raise CompareError(f"{path} must hold a mapping, not {type(data).__name__}.")
            return data
    return {}


def _read_json(path: Path):
    try:
        return json.loads(path.read_text()), None
    except (OSError, json.JSONDecodeError) as err:
        return None, f"{path.name} unreadable: {err}"


def load_runs(runs_dir: str | Path, skip: Iterable[str] = ("compare",)) -> Runs:
    """Read ``<runs_dir>/<condition>/seed<N>/{status.json, metrics.json}``. A run counts when its state
    is ``done`` (or it has metrics.json and no status.json); every other run, and every seed the sweep
    file lists that has no folder, goes into ``problems`` with its state and reason."""
    root = Path(runs_dir)
    if not root.is_dir():
        raise CompareError(f"{root} is not a folder of runs (<condition>/seed<N>/).")
    sweep = load_sweep(root)
    skip = set(skip)
    results: dict[str, dict] = {}
    problems: list[dict] = []
    conditions: list[str] = []
    seeds: set = set()
    for cond_dir in sorted(p for p in root.iterdir() if p.is_dir() and p.name not in skip):
        seed_dirs = [(int(m.group(1)), p) for p in cond_dir.iterdir() if (m := SEED_DIR.match(p.name))]
        if not seed_dirs:
            continue
        cond = cond_dir.name
        conditions.append(cond)
        results[cond] = {}
        for seed, run_dir in sorted(seed_dirs):
            seeds.add(seed)
            status, reason = None, None
            if (run_dir / "status.json").is_file():
                status, reason = _read_json(run_dir / "status.json")
            metrics_path = next(
                (p for p in (run_dir / "metrics.json", run_dir / "eval" / "metrics.json") if p.is_file()),
                None,
            )
            state = (status or {}).get("state") if isinstance(status, dict) else None
            if status is None and reason is None:
                state = "done" if metrics_path else "missing"
                reason = None if metrics_path else "no status.json or metrics.json"
            problem = {"condition": cond, "seed": seed, "path": str(run_dir)}
            if state != "done":
                detail = (status or {}).get("error") or (status or {}).get("message")
                reason = reason or (f"state {state!r}" + (f": {detail}" if detail else ""))
                problems.append(problem | {"state": state or "unknown", "reason": reason})
                continue
            if metrics_path is None:
                problems.append(problem | {"state": "done", "reason": "no metrics.json"})
                continue
            metrics, reason = _read_json(metrics_path)
            if not isinstance(metrics, dict):
                reason = reason or f"{metrics_path.name} is not a JSON object"
                problems.append(problem | {"state": "done", "reason": reason})
                continue
            results[cond][seed] = metrics
    for cond in sweep.get("conditions") or []:
        if cond not in conditions:
            conditions.append(cond)
            results[cond] = {}
            problems.append({"condition": cond, "seed": None, "state": "missing", "reason": "no run folder"})
    order = list(sweep.get("conditions") or [])
    conditions = [c for c in order if c in conditions] + [c for c in conditions if c not in order]
    seeds |= set(sweep.get("seeds") or [])
    if not conditions:
        raise CompareError(f"no <condition>/seed<N>/ run folders under {root}.")
    return Runs(results, problems, sweep, conditions, sorted(seeds, key=_seed_key), str(root))


_WANDB_STATE = {"finished": "done", "failed": "failed", "crashed": "failed", "killed": "failed"}


def load_wandb_runs(group_path: str, timeout: int = 30) -> Runs:
    """Read the runs of a W&B group ``ENTITY/PROJECT/GROUP`` through ``wandb.Api``: condition and seed from
    the run config (``condition``, ``seed``) or the run name ``<condition>-seed<N>``, metrics from the run
    summary. Needs W&B online and an API key."""
    parts = group_path.split("/")
    if len(parts) != 3 or not all(parts):
        raise CompareError(f"--wandb_group wants ENTITY/PROJECT/GROUP, got {group_path!r}.")
    entity, project, group = parts
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in ("offline", "disabled", "dryrun") or os.environ.get("WANDB_DISABLED", "").lower() == "true":
        raise CompareError(
            f"--wandb_group reads runs from the W&B server, but W&B is off here (WANDB_MODE={mode or 'unset'}). "
            "Run with WANDB_MODE=online and a key (wandb login, or WANDB_API_KEY), or compare local run "
            "folders: keel compare runs/<sweep>."
        )
    try:
        import wandb

        api = wandb.Api(timeout=timeout)
        listed = list(api.runs(f"{entity}/{project}", filters={"group": group}))
    except Exception as err:  # wandb raises several kinds (UsageError, CommError, HTTP errors)
        raise CompareError(
            f"cannot read W&B group {group_path}: {err}. Log in (wandb login, or WANDB_API_KEY) and check "
            "the entity, project and group names."
        ) from None
    if not listed:
        raise CompareError(f"W&B group {group_path} holds no runs.")
    results: dict[str, dict] = {}
    problems: list[dict] = []
    conditions: list[str] = []
    seeds: set = set()
    for run in listed:
        config = dict(run.config or {})
        cond, seed = config.get("condition"), config.get("seed")
        if cond is None or seed is None:
            m = RUN_NAME.match(run.name or "")
            if not m:
                reason = f"run {run.name!r}: no condition/seed in its config or name"
                problems.append({"condition": None, "seed": None, "state": run.state, "reason": reason})
                continue
            cond, seed = m.group("condition"), int(m.group("seed"))
        if cond not in conditions:
            conditions.append(cond)
            results[cond] = {}
        seeds.add(seed)
        state = _WANDB_STATE.get(run.state, run.state)
        where = {"condition": cond, "seed": seed, "path": "/".join(run.path)}
        if state != "done":
            problems.append(where | {"state": state, "reason": f"W&B state {run.state!r}"})
        elif seed in results[cond]:
            problems.append(where | {"state": "done", "reason": "duplicate run ignored"})
        else:
            results[cond][seed] = {
                k: v for k, v in dict(run.summary_metrics).items() if not k.startswith("_")
            }
    return Runs(results, problems, {}, conditions, sorted(seeds, key=_seed_key), f"wandb:{group_path}")


def compare_runs(runs: Runs | str | Path, **options) -> Comparison:
    """:func:`compare_results` on loaded runs; the sweep file's baseline, controls, metrics,
    lower_is_better and keep fill in options the caller leaves as None."""
    if not isinstance(runs, Runs):
        runs = load_runs(runs)
    for key in ("baseline", "controls", "metrics", "lower_is_better", "keep"):
        if options.get(key) is None and runs.sweep.get(key) is not None:
            options[key] = runs.sweep[key]
        if key != "baseline" and isinstance(options.get(key), str):  # `controls: random_ablate` in YAML
            options[key] = [options[key]]
    for key in ("lower_is_better", "keep"):
        options[key] = options.get(key) or ()
    options.setdefault("name", Path(runs.source).name if runs.source else "")
    return compare_results(
        runs.results, conditions=runs.conditions, seeds=runs.seeds, problems=runs.problems, **options
    )


# ---- outputs ------------------------------------------------------------------------------------------


def _json_safe(value):
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


def _interval(low: float | None, high: float | None) -> str:
    return "no interval (1 seed)" if low is None else f"[{_num(low)}, {_num(high)}]"


def _ratio_text(cell: Cell) -> str:
    if cell.ratio_kind is None:
        return ""
    if cell.ratio is None:
        return "-"
    if math.isinf(cell.ratio):
        return f"{cell.ratio_kind} inf (condition mean 0)"
    if cell.ratio_kind == "kept":
        return f"kept {cell.ratio:.0%}"
    return f"{cell.ratio_kind} {cell.ratio:.2f}x"


def _flag_text(cell: Cell) -> str:
    if not cell.is_control:
        return ""
    return {True: "MOVED", False: "ok", None: "not testable"}[cell.flag]


def to_markdown(comp: Comparison) -> str:
    title = f"# keel compare: {comp.name}" if comp.name else "# keel compare"
    lines = [title, "", comp.method, ""]
    lines.append(
        f"Baseline: {comp.baseline or 'none named (no ratios or differences)'}. "
        f"Controls: {', '.join(comp.controls) or 'none'}. Seeds: {', '.join(map(str, comp.seeds))}."
    )
    flagged = comp.flagged()
    lines += ["", "## Control flags", ""]
    if not comp.controls:
        lines.append("No control conditions.")
    elif flagged:
        lines += [
            f"- **{c.condition}** moved `{c.metric}`: {_num(c.diff_mean)} {_interval(c.diff_low, c.diff_high)} "
            f"vs {comp.baseline} over seeds {', '.join(map(str, c.paired_seeds))}"
            for c in flagged
        ]
    else:
        untestable = sorted({c.condition for c in comp.cells if c.is_control and c.flag is None})
        lines.append("No control moved any metric (every paired 95 % interval includes 0).")
        if untestable:
            lines.append(f"Not testable (fewer than two shared seeds): {', '.join(untestable)}.")

    lines += ["", "## Overview (mean [95 % t-interval])", ""]
    lines += ["| condition | " + " | ".join(f"`{m}`" for m in comp.metrics) + " |"]
    lines += ["|---|" + "---|" * len(comp.metrics)]
    for cond in comp.conditions:
        cells = [comp.cell(cond, m) for m in comp.metrics]
        shown = [f"{_num(c.mean)} {_interval(c.low, c.high) if c.n else ''}".strip() for c in cells]
        label = f"{cond} (baseline)" if cond == comp.baseline else cond
        label += " (control)" if cond in comp.controls else ""
        lines.append(f"| {label} | " + " | ".join(shown) + " |")

    for metric in comp.metrics:
        direction = comp.directions[metric]
        lines += ["", f"## `{metric}` ({'lower is better' if direction == 'lower' else direction})", ""]
        head = ["condition", *(f"seed {s}" for s in comp.seeds), "n", "mean", "95 % t-interval"]
        if comp.baseline:
            head += ["vs baseline", "paired diff [95 %]", "control"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for cond in comp.conditions:
            c = comp.cell(cond, metric)
            row = [cond, *(_num(c.values.get(s)) for s in comp.seeds), str(c.n), _num(c.mean)]
            row.append(_interval(c.low, c.high) if c.n else "-")
            if comp.baseline:
                diff = (
                    "baseline"
                    if c.is_baseline
                    else f"{_num(c.diff_mean)} {_interval(c.diff_low, c.diff_high) if c.paired_seeds else ''}"
                )
                row += [_ratio_text(c), diff.strip(), _flag_text(c)]
            lines.append("| " + " | ".join(row) + " |")

    lines += ["", "## Failed or missing runs", ""]
    if comp.problems:
        lines += [
            f"- {p.get('condition')} seed {p.get('seed') if p.get('seed') is not None else '(all)'}: "
            f"{p.get('state')} - {p.get('reason')}"
            for p in comp.problems
        ]
    else:
        lines.append("None: every expected run finished with every metric.")
    return "\n".join(lines) + "\n"


CSV_FIELDS = (
    "condition", "metric", "direction", "n", "mean", "sd", "low", "high", "is_baseline", "is_control",
    "ratio_kind", "ratio", "n_paired", "diff_mean", "diff_low", "diff_high", "flag",
)  # fmt: skip


def csv_rows(comp: Comparison) -> tuple[list[str], list[list]]:
    """Header and rows: one row per condition x metric, per-seed values in ``seed<N>`` columns."""
    header = [*CSV_FIELDS, *(f"seed{s}" for s in comp.seeds)]
    rows = []
    for c in comp.cells:
        d = asdict(c) | {"n_paired": len(c.paired_seeds)}
        row = [_json_safe(d[f]) for f in CSV_FIELDS] + [c.values.get(s) for s in comp.seeds]
        rows.append(["" if v is None else v for v in row])
    return header, rows


def write_csv(comp: Comparison, path: str | Path) -> Path:
    header, rows = csv_rows(comp)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return Path(path)


def plot(comp: Comparison, path: str | Path) -> Path:
    """One panel per metric: a point per seed and the mean with its 95 % t-interval per condition; the
    baseline's interval shaded; flagged controls in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(comp.metrics)
    ncols = min(k, 3)
    nrows = math.ceil(k / ncols)
    width = max(4.0, 0.7 * len(comp.conditions) + 1.5)
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, 3.6 * nrows), squeeze=False)
    for ax, metric in zip(axes.flat, comp.metrics):
        for i, cond in enumerate(comp.conditions):
            c = comp.cell(cond, metric)
            colour = "tab:red" if c.flag else ("tab:gray" if c.is_control else "tab:blue")
            colour = "black" if c.is_baseline else colour
            vals = [v for v in c.values.values() if v is not None]
            offsets = [(j - (len(vals) - 1) / 2) * 0.06 for j in range(len(vals))]
            ax.scatter([i + o for o in offsets], vals, s=14, color=colour, alpha=0.6, zorder=3)
            if c.mean is not None:
                err = None if c.low is None else [[c.mean - c.low], [c.high - c.mean]]
                ax.errorbar(i + 0.22, c.mean, yerr=err, fmt="D", ms=5, color=colour, capsize=4, zorder=4)
            if c.is_baseline and c.low is not None:
                ax.axhspan(c.low, c.high, color="black", alpha=0.07, zorder=1)
        ax.set_xticks(range(len(comp.conditions)), comp.conditions, rotation=30, ha="right")
        ax.set_xlim(-0.5, len(comp.conditions) - 0.2)
        note = {"lower": " (lower is better)", "keep": " (keep)"}.get(comp.directions[metric], "")
        ax.set_title(metric + note, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[k:]:
        ax.set_visible(False)
    fig.suptitle(
        "points: seeds; diamonds: mean with 95 % Student-t interval over seeds; black: baseline "
        "(its interval shaded); grey: controls; red: a control that moved the metric",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def write_outputs(comp: Comparison, output_dir: str | Path) -> dict[str, Path]:
    """Write ``compare.md``, ``compare.csv``, ``compare.json`` and ``compare.png`` into ``output_dir``."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "markdown": out / "compare.md",
        "csv": out / "compare.csv",
        "json": out / "compare.json",
        "png": out / "compare.png",
    }
    paths["markdown"].write_text(to_markdown(comp))
    write_csv(comp, paths["csv"])
    paths["json"].write_text(json.dumps(comp.to_dict(), indent=2))
    plot(comp, paths["png"])
    return paths


def _wandb_value(v):
    if v == "" or v in ("inf", "-inf"):
        return None
    return str(v) if isinstance(v, bool) else v


def log_wandb(
    comp: Comparison, project: str, run_name: str | None, out_dir: str | Path, group: str | None = None
) -> str:
    """Log the comparison as a W&B Table (one row per condition x metric), with the plot and the flags.
    Works with WANDB_MODE=offline. Returns the run's directory."""
    try:
        import wandb
    except ImportError as e:
        raise ImportError("--report_to wandb needs wandb: pip install wandb, or use --report_to none.") from e
    wandb_dir = os.environ.get("WANDB_DIR", str(out_dir))
    Path(wandb_dir).mkdir(parents=True, exist_ok=True)
    run = wandb.init(
        project=project,
        name=run_name,
        group=group,
        job_type="compare",
        dir=wandb_dir,
        config={"baseline": comp.baseline, "controls": comp.controls, "method": comp.method},
    )
    try:
        header, rows = csv_rows(comp)
        data = [[_wandb_value(v) for v in r] for r in rows]
        logged = {"compare/table": wandb.Table(columns=header, data=data)}
        png = Path(out_dir) / "compare.png"
        if png.is_file():
            logged["compare/plot"] = wandb.Image(str(png))
        run.log(logged)
        run.summary["compare/flagged"] = len(comp.flagged())
        run.summary["compare/problems"] = len(comp.problems)
        return run.dir
    finally:
        run.finish()
