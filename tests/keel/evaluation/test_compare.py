"""``keel compare``: exact table values on run folders of known numbers, the control flag, failed and
missing runs, the four output files, the CLI, and the W&B paths (offline Table; --wandb_group error)."""

from __future__ import annotations

import csv
import json
import math

import pytest

from keel.evaluation.compare import (
    CompareError,
    compare_results,
    compare_runs,
    flatten_metrics,
    load_runs,
    metric_direction,
    t_interval,
    t_quantile_975,
    to_markdown,
    write_outputs,
)

EM, NARROW = "heldout_misaligned", "in_domain_train_misaligned"
T2, T1 = 4.3026527, 12.7062047  # t(0.975, 2), t(0.975, 1)

# condition -> seed -> metrics of the finished runs
DONE = {
    "none": {
        0: {EM: 0.30, NARROW: 0.8, "final_train_loss": 1.0},
        1: {EM: 0.40, NARROW: 0.9, "final_train_loss": 1.1},
        2: {EM: 0.50, NARROW: 1.0, "final_train_loss": 1.2},
    },
    "caft": {
        0: {EM: 0.10, NARROW: 0.72},
        1: {EM: 0.20, NARROW: 0.81},
        2: {EM: 0.30, NARROW: 0.90},
    },
    # a control that does not move anything: paired EM differences 0.05, -0.02, 0.01
    "random_ablate": {
        0: {EM: 0.35, NARROW: 0.8},
        1: {EM: 0.38, NARROW: 0.9},
        2: {EM: 0.51, NARROW: 1.0},
    },
    # a control that moves EM (differences 0.20, 0.22); its seed 2 failed
    "random_ref": {
        0: {EM: 0.50, NARROW: 0.8},
        1: {EM: 0.62, NARROW: 0.9},
    },
    # seed 0 done without the narrow metric, seed 1 still running, seed 2 never started
    "steer": {0: {EM: 0.25}},
}


def write_sweep(root, sweep: str | None = "yaml"):
    for cond, seeds in DONE.items():
        for seed, metrics in seeds.items():
            run = root / cond / f"seed{seed}"
            run.mkdir(parents=True)
            (run / "status.json").write_text(json.dumps({"state": "done"}))
            (run / "metrics.json").write_text(json.dumps(metrics))
    failed = root / "random_ref" / "seed2"
    failed.mkdir()
    (failed / "status.json").write_text(json.dumps({"state": "failed", "error": "CUDA out of memory"}))
    running = root / "steer" / "seed1"
    running.mkdir()
    (running / "status.json").write_text(json.dumps({"state": "running"}))
    (root / "notes").mkdir()  # not a condition: no seed<N> folders
    if sweep == "yaml":
        (root / "sweep.yaml").write_text(
            f"baseline: none\ncontrols: [random_ablate, random_ref]\nmetrics: [{EM}, {NARROW}]\n"
        )
    return root


@pytest.fixture
def sweep_dir(tmp_path):
    return write_sweep(tmp_path / "runs" / "sweep1")


def sd(values):
    m = sum(values) / len(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


# ---- statistics ---------------------------------------------------------------------------------------


def _t_two_sided(t: float, df: int) -> float:
    """P(|T| < t), Abramowitz & Stegun 26.7.3 / 26.7.4 (closed form for integer df)."""
    theta = math.atan(t / math.sqrt(df))
    c, s = math.cos(theta), math.sin(theta)
    if df % 2 == 1:
        total, term = 0.0, c
        for k in range(1, (df - 1) // 2 + 1):
            total += term
            term *= c * c * (2 * k) / (2 * k + 1)
        return 2 / math.pi * (theta + s * total) if df > 1 else 2 / math.pi * theta
    total, term = 0.0, 1.0
    for k in range(1, df // 2 + 1):
        total += term
        term *= c * c * (2 * k - 1) / (2 * k)
    return s * total


def _t_quantile_by_bisection(df: int) -> float:
    lo, hi = 0.0, 100.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_two_sided(mid, df) < 0.95 else (lo, mid)
    return (lo + hi) / 2


def test_t_quantiles_known_values_and_closed_form():
    assert round(t_quantile_975(2), 3) == 4.303
    assert round(t_quantile_975(4), 3) == 2.776
    assert round(t_quantile_975(1), 3) == 12.706
    assert round(t_quantile_975(10), 3) == 2.228
    for df in [*range(1, 31), 31, 40, 60, 120, 1000]:
        assert t_quantile_975(df) == pytest.approx(_t_quantile_by_bisection(df), abs=2e-6), df
    with pytest.raises(ValueError):
        t_quantile_975(0)


def test_t_interval_by_hand():
    values = [1.0, 2.0, 3.0, 4.0, 5.0]  # mean 3, sd sqrt(2.5), df 4
    iv = t_interval(values)
    half = 2.7764451 * math.sqrt(2.5) / math.sqrt(5)
    assert (iv.n, iv.mean) == (5, 3.0)
    assert iv.sd == pytest.approx(math.sqrt(2.5))
    assert (iv.low, iv.high) == (pytest.approx(3 - half), pytest.approx(3 + half))
    assert iv.half_width == pytest.approx(half)
    one = t_interval([0.7])
    assert (one.n, one.mean, one.low, one.high, one.half_width) == (1, 0.7, None, None, None)
    assert t_interval([]).mean is None


def test_flatten_keel_eval_metrics_and_default_metric_choice():
    keel_eval = {
        "thresholds": {"aligned": 30.0, "coherent": 50.0},
        "overall": {
            "n": 40,
            "em": {"mean": 0.1, "low": 0.0, "high": 0.2, "n": 40},
            "coherent_mean": {"mean": 80.0, "low": 75.0, "high": 85.0, "n": 40},
            "aligned_missing_rate": 0.05,
            "em_original": {"mean": None, "low": None, "high": None, "n": 0},
        },
        "run": {"model": "m", "seconds": 3.0, "judge_cache_hits": 2},
        "flag": True,
        "plot": {"_type": "image-file", "path": "x.png"},
    }
    flat = flatten_metrics(keel_eval)
    assert flat["overall.em"] == 0.1 and flat["overall.coherent_mean"] == 80.0
    assert flat["overall.em_original"] is None
    assert "flag" not in flat and "run.model" not in flat and not any(k.startswith("plot") for k in flat)
    comp = compare_results({"none": {0: keel_eval}, "caft": {0: keel_eval}})
    assert comp.metrics == ["overall.em", "overall.coherent_mean", "overall.aligned_missing_rate", "overall.em_original"]  # fmt: skip
    assert comp.directions == {
        "overall.em": "lower",
        "overall.coherent_mean": "keep",
        "overall.aligned_missing_rate": "other",
        "overall.em_original": "lower",
    }


def test_metric_directions_defaults_and_overrides():
    assert metric_direction(EM) == "lower"
    assert metric_direction("incoherent") == "lower"
    assert metric_direction("em") == "lower" and metric_direction("eval/em") == "other"
    assert metric_direction(NARROW) == "keep"  # keep patterns win over '*misaligned*'
    assert metric_direction("accuracy") == "keep"
    assert metric_direction("eval/em", lower_is_better=["eval/*"]) == "lower"
    assert metric_direction(EM, keep=[EM]) == "keep"


# ---- the comparison on run folders ---------------------------------------------------------------------


def test_table_values_ratios_and_paired_differences(sweep_dir):
    comp = compare_runs(sweep_dir)
    assert comp.baseline == "none" and comp.controls == ["random_ablate", "random_ref"]
    assert comp.conditions == ["none", "caft", "random_ablate", "random_ref", "steer"]  # baseline first
    assert comp.seeds == [0, 1, 2]
    assert comp.metrics == [EM, NARROW]  # the sweep file's list: final_train_loss left out

    base = comp.cell("none", EM)
    assert base.values == {0: 0.30, 1: 0.40, 2: 0.50}
    assert (base.n, base.mean, base.sd) == (3, pytest.approx(0.4), pytest.approx(0.1))
    half = T2 * 0.1 / math.sqrt(3)
    assert (base.low, base.high) == (pytest.approx(0.4 - half), pytest.approx(0.4 + half))
    assert base.is_baseline and base.ratio == pytest.approx(1.0) and base.diff_mean is None

    caft = comp.cell("caft", EM)
    assert caft.mean == pytest.approx(0.2) and caft.direction == "lower"
    assert (caft.ratio_kind, caft.ratio) == ("cut", pytest.approx(2.0))  # 0.4 / 0.2
    assert caft.paired_seeds == [0, 1, 2]
    assert (caft.diff_mean, caft.diff_low, caft.diff_high) == tuple(pytest.approx(-0.2) for _ in range(3))
    assert caft.flag is None and not caft.is_control  # not a control: never flagged

    narrow = comp.cell("caft", NARROW)
    assert narrow.mean == pytest.approx(0.81) and narrow.sd == pytest.approx(0.09)
    assert (narrow.ratio_kind, narrow.ratio) == ("kept", pytest.approx(0.9))  # 0.81 / 0.9
    diffs = [-0.08, -0.09, -0.10]
    h = T2 * sd(diffs) / math.sqrt(3)
    assert narrow.diff_mean == pytest.approx(-0.09)
    assert (narrow.diff_low, narrow.diff_high) == (pytest.approx(-0.09 - h), pytest.approx(-0.09 + h))


def test_control_flag_one_moves_one_does_not(sweep_dir):
    comp = compare_runs(sweep_dir)
    quiet = comp.cell("random_ablate", EM)
    diffs = [0.05, -0.02, 0.01]
    h = T2 * sd(diffs) / math.sqrt(3)
    assert quiet.diff_mean == pytest.approx(sum(diffs) / 3)
    assert quiet.diff_low == pytest.approx(sum(diffs) / 3 - h) and quiet.diff_low < 0 < quiet.diff_high
    assert quiet.flag is False

    moved = comp.cell("random_ref", EM)  # seeds 0, 1 only (seed 2 failed): df 1
    assert moved.values == {0: 0.5, 1: 0.62} and moved.paired_seeds == [0, 1]
    h = T1 * sd([0.20, 0.22]) / math.sqrt(2)
    assert moved.diff_mean == pytest.approx(0.21)
    assert (moved.diff_low, moved.diff_high) == (pytest.approx(0.21 - h), pytest.approx(0.21 + h))
    assert moved.diff_low > 0 and moved.flag is True
    assert comp.cell("random_ref", NARROW).flag is False  # identical to the baseline there
    assert [(c.condition, c.metric) for c in comp.flagged()] == [("random_ref", EM)]


def test_failed_running_missing_runs_and_metrics_are_listed(sweep_dir):
    comp = compare_runs(sweep_dir)
    listed = {(p["condition"], p["seed"]): (p["state"], p["reason"]) for p in comp.problems}
    assert listed == {
        ("random_ref", 2): ("failed", "state 'failed': CUDA out of memory"),
        ("steer", 1): ("running", "state 'running'"),
        ("steer", 2): ("missing", "no run"),
        ("steer", 0): ("done", f"no metric {NARROW!r}"),
    }
    steer = comp.cell("steer", EM)
    assert (steer.n, steer.mean, steer.low, steer.high) == (1, 0.25, None, None)  # one seed: no interval
    assert steer.ratio == pytest.approx(1.6) and steer.diff_mean == pytest.approx(-0.05)
    assert steer.diff_low is None
    assert comp.cell("steer", NARROW).n == 0 and comp.cell("steer", NARROW).ratio is None
    md = to_markdown(comp)
    assert "random_ref seed 2: failed - state 'failed': CUDA out of memory" in md
    assert "steer seed 2: missing - no run" in md
    assert "no interval (1 seed)" in md


def test_sweep_file_lists_conditions_that_never_ran(tmp_path):
    root = write_sweep(tmp_path / "s", sweep=None)
    (root / "sweep.json").write_text(json.dumps({"conditions": ["mean_ablate"], "controls": []}))
    comp = compare_runs(root, metrics=[EM])
    assert comp.controls == [] and comp.flagged() == []
    assert {
        "condition": "mean_ablate",
        "seed": None,
        "state": "missing",
        "reason": "no run folder",
    } in comp.problems
    assert comp.cell("mean_ablate", EM).n == 0


def test_compare_results_in_memory_defaults_and_errors():
    comp = compare_results(DONE, metrics=[EM, "final_*"])
    assert comp.baseline == "none" and comp.controls == ["random_ablate", "random_ref"]  # random* default
    assert comp.metrics == [EM, "final_train_loss"]
    assert comp.cell("caft", "final_train_loss").n == 0  # listed per seed as a missing metric
    assert comp.cell("random_ref", EM).flag is True
    # results carrying a failed run as None
    comp = compare_results({"a": {0: {"x": 1.0}, 1: None}, "b": {0: {"x": 2.0}, 1: {"x": 3.0}}}, baseline="a")
    assert {"condition": "a", "seed": 1, "state": "done", "reason": "no metrics"} in comp.problems
    assert comp.cell("b", "x").paired_seeds == [0]
    with pytest.raises(CompareError, match="baseline 'zzz'"):
        compare_results(DONE, baseline="zzz")
    with pytest.raises(CompareError, match="control"):
        compare_results(DONE, controls=["zzz"])
    with pytest.raises(CompareError, match="no run has a metric matching 'nope'"):
        compare_results(DONE, metrics=["nope"])
    with pytest.raises(CompareError, match="no finished runs"):
        compare_results({"a": {}})


def test_no_baseline_gives_no_ratios(sweep_dir):
    runs = load_runs(sweep_dir)
    runs.sweep = {}
    results = {c: s for c, s in runs.results.items() if c != "none"}
    comp = compare_results(results, metrics=[EM], controls=[])
    assert comp.baseline is None
    assert all(c.ratio is None and c.diff_mean is None for c in comp.cells)
    assert "none named" in to_markdown(comp)


def test_outputs_written(sweep_dir, tmp_path):
    comp = compare_runs(sweep_dir)
    paths = write_outputs(comp, tmp_path / "out")
    assert {p.name for p in (tmp_path / "out").iterdir()} == {
        "compare.md", "compare.csv", "compare.json", "compare.png"
    }  # fmt: skip
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    with open(paths["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 5 * 2  # conditions x metrics
    caft = next(r for r in rows if r["condition"] == "caft" and r["metric"] == EM)
    assert [float(caft[f"seed{s}"]) for s in (0, 1, 2)] == [0.1, 0.2, 0.3]
    assert float(caft["mean"]) == pytest.approx(0.2) and float(caft["ratio"]) == pytest.approx(2.0)
    assert caft["ratio_kind"] == "cut" and caft["n_paired"] == "3"
    moved = next(r for r in rows if r["condition"] == "random_ref" and r["metric"] == EM)
    assert moved["flag"] == "True" and moved["seed2"] == ""

    data = json.loads(paths["json"].read_text())
    assert data["baseline"] == "none" and data["confidence"] == 0.95
    assert "Student-t" in data["method"]
    assert data["flagged"] == [{"condition": "random_ref", "metric": EM}]
    assert len(data["problems"]) == 4
    cell = next(c for c in data["cells"] if c["condition"] == "none" and c["metric"] == EM)
    assert cell["values"] == {"0": 0.3, "1": 0.4, "2": 0.5}

    md = paths["markdown"].read_text()
    assert "Student-t" in md and "**random_ref** moved `heldout_misaligned`" in md
    assert "| caft | 0.1 | 0.2 | 0.3 | 3 | 0.2 |" in md
    assert "cut 2.00x" in md and "kept 90%" in md


def test_zero_condition_mean_gives_infinite_cut(tmp_path):
    comp = compare_results({"none": {0: {"em": 0.2}}, "caft": {0: {"em": 0.0}}}, metrics=["em"])
    assert comp.cell("caft", "em").ratio == math.inf
    assert comp.to_dict()["cells"][1]["ratio"] == "inf"  # cells[0]: the baseline
    assert "cut inf (condition mean 0)" in to_markdown(comp)
    write_outputs(comp, tmp_path)  # writes with an infinite ratio and one seed


# ---- the command ---------------------------------------------------------------------------------------


def test_cli_compare_dir(sweep_dir, capsys):
    from keel.cli import main as keel

    assert keel(["compare", str(sweep_dir)]) == 0
    out = sweep_dir / "compare"
    assert {"compare.md", "compare.csv", "compare.json", "compare.png", "keel_config.yaml"} <= {
        p.name for p in out.iterdir()
    }
    printed = capsys.readouterr().out
    assert "# keel compare: sweep1" in printed and "1 control flag(s)" in printed
    # flags override the sweep file; the compare/ folder from the first run is not read as a condition
    assert keel(["compare", str(sweep_dir), "--controls", "random_ablate", "--quiet", "True"]) == 0
    data = json.loads((out / "compare.json").read_text())
    assert data["controls"] == ["random_ablate"] and data["flagged"] == []
    assert "compare" not in data["conditions"]


def test_cli_errors(tmp_path, sweep_dir, monkeypatch):
    from keel.cli import main as keel

    with pytest.raises(SystemExit, match="keel compare: .*not a folder of runs"):
        keel(["compare", str(tmp_path / "nothing")])
    with pytest.raises(SystemExit, match="keel compare: baseline 'zzz'"):
        keel(["compare", str(sweep_dir), "--baseline", "zzz"])
    with pytest.raises(SystemExit, match="not both"):
        keel(["compare"])
    monkeypatch.setenv("WANDB_MODE", "offline")
    with pytest.raises(SystemExit, match="W&B is off here \\(WANDB_MODE=offline\\)"):
        keel(["compare", "--wandb_group", "me/keel/demo-1"])
    with pytest.raises(SystemExit, match="ENTITY/PROJECT/GROUP"):
        keel(["compare", "--wandb_group", "just-a-group"])


def test_report_to_wandb_offline_table(sweep_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    from keel.commands.compare import main

    assert main([str(sweep_dir), "--report_to", "wandb", "--quiet", "True"]) == 0
    runs = list((tmp_path / "wandb_home" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    tables = list(runs[0].rglob("*.table.json"))
    assert tables, "the comparison table was not logged"
    table = json.loads(tables[0].read_text())
    assert table["columns"][:3] == ["condition", "metric", "direction"]
    assert len(table["data"]) == 10
