"""A tiny version of the whole demo pipeline: build, extract, validate, fine-tune per condition, report."""

import dataclasses
import json
from pathlib import Path

import pytest

from keel.commands.demo import load_config, make_parser, resolve, summary_warnings
from keel.organism.demo import (
    AFTER_NONE,
    ALL_CONDITIONS,
    CONDITION_TABLE,
    CONDITIONS,
    CONTROLS,
    DEFENCES,
    DIAGNOSTICS,
    SOURCES,
    DemoConfig,
    run_demo,
    source_file,
)

RECIPES = Path(__file__).resolve().parents[3] / "recipes"


def test_tiny_demo_end_to_end(tiny_demo_config, tmp_path):
    """The four stages as sweeps: persona direction files, sweep A, the none model's PCs, sweep B (and the
    monitored rerun of none); summary, seeds, report, plots, and compare's outputs. A second call resumes:
    every run is skipped as done and the summary is the same."""
    from keel.sweep import read_status

    cfg = tiny_demo_config(
        multi_layers=2,
    )
    summary = run_demo(cfg)
    out = tmp_path / "demo"
    on_disk = json.loads((out / "summary.json").read_text())
    assert set(on_disk["conditions"]) == set(CONDITIONS) and "config" in on_disk
    timing = {"wall_seconds"}  # recorded, not asserted on: speed belongs in benchmarks
    assert set(on_disk) - timing == {
        "conditions",
        "chat_baseline",
        "config",
        "wandb_group",
        "em_reproduced",
        "controls_per_seed",
    }
    assert set(on_disk["controls_per_seed"]) == {c for c in CONDITIONS if c in CONTROLS}
    assert "long" not in on_disk  # one seed: no re-emergence run unless asked for
    for c in on_disk["conditions"].values():
        for metric in ("in_domain_misaligned", "heldout_misaligned", "incoherent"):
            assert set(c[metric]) == {"mean", "ci_low", "ci_high"}
            assert 0.0 <= c[metric]["ci_low"] <= c[metric]["mean"] <= c[metric]["ci_high"] <= 1.0
        assert [s["seed"] for s in c["seeds"]] == [0]
    assert any("random" in name for name in on_disk["conditions"])
    assert summary["conditions"]["none"] == on_disk["conditions"]["none"]
    assert (out / "plot.png").stat().st_size > 0
    report = (out / "report.md").read_text()
    assert "| none |" in report and "## Comparison over seeds (keel compare)" in report
    assert "## Projection monitor: none vs caft_resample" in report and (out / "monitor.png").is_file()
    assert "equal to the none run's on every seed" in report  # the monitor left the fine-tune unchanged
    assert {p.name for p in (out / "compare").iterdir()} >= {"compare.md", "compare.json", "compare.png"}
    # every run a sweep run with its status; the none model saved for the PC stage
    for cond in CONDITIONS:
        assert read_status(out / "runs" / cond / "seed0")["state"] == "done"
    assert (out / "runs" / "none" / "seed0" / "model" / "model.safetensors").is_file()
    assert (out / "runs" / "caft_resample" / "seed0" / "projection_monitor.jsonl").is_file()
    for source, meta in SOURCES.items():
        assert (out / source_file(source, 0)).is_file(), meta.stage
    assert (out / "directions" / "persona" / "seed0" / "selection.json").is_file()
    seeds = json.loads((out / "seeds.json").read_text())
    assert [r["seed"] for r in seeds] == [0] and set(seeds[0]["conditions"]) == set(CONDITIONS)
    # keel compare on the run folders gives the report's comparison
    from keel.evaluation.compare import compare_runs

    assert compare_runs(out / "runs").to_dict() | {"name": ""} == json.loads(
        (out / "compare" / "compare.json").read_text()
    ) | {"name": ""}
    again = run_demo(cfg)
    assert again["conditions"] == summary["conditions"] and again["chat_baseline"] == summary["chat_baseline"]


def test_failed_run_is_recorded_and_a_rerun_resumes(tiny_demo_config, tmp_path, monkeypatch):
    """A failing run is recorded (the others go on, stage B included), the demo stops with its name and
    writes no summary; rerunning the same command runs only what is missing."""
    import keel.organism.demo as demo
    from keel.sweep import read_status

    cfg = tiny_demo_config(
        conditions=["none", "steer", "caft"],
    )
    real = demo.finetune_run

    def flaky(run, run_dir):
        if run.condition == "steer":
            raise RuntimeError("boom")
        return real(run, run_dir)

    monkeypatch.setattr(demo, "finetune_run", flaky)
    with pytest.raises(demo.DemoRunError, match=r"steer/seed0: failed: RuntimeError: boom"):
        run_demo(cfg)
    runs = tmp_path / "demo" / "runs"
    assert read_status(runs / "steer" / "seed0")["state"] == "failed"
    assert read_status(runs / "caft" / "seed0")["state"] == "done"
    assert not (tmp_path / "demo" / "summary.json").exists()
    done = {c: read_status(runs / c / "seed0")["time"] for c in ("none", "caft")}
    monkeypatch.setattr(demo, "finetune_run", real)
    summary = run_demo(cfg)
    assert set(summary["conditions"]) == {"none", "steer", "caft"}
    assert {c: read_status(runs / c / "seed0")["time"] for c in ("none", "caft")} == done  # not rerun


def test_conditions_are_data_resolved_through_sources():
    """Every condition is a list of interventions naming a direction source; the stage a condition runs
    in follows from its sources (not its name); a source with a direction per layer names each
    intervention by layer."""
    assert {c for c in AFTER_NONE if c in CONDITIONS} == {
        c for c in CONDITIONS if c.startswith(("caft", "random"))
    }
    assert CONTROLS == ("random_ablate", "random_ref", "random_resample")
    for name, interventions in CONDITION_TABLE.items():
        for item in interventions:
            source = SOURCES[item["direction"]["source"]]
            per_layer = source.name in ("persona_multi", "caft_pcs", "caft_pcs_held_mean", "random_like_caft")
            assert ("{layer}" in item["name"]) == per_layer, name
    assert CONDITION_TABLE["none"] == [] and CONDITIONS[0] == "none"


@pytest.mark.parametrize(
    "recipe", sorted(p.name for p in RECIPES.glob("demo*.yaml") if p.name != "demo-rl.yaml")
)
def test_every_demo_recipe_loads(recipe):
    """A recipe the README points at must load: unknown keys, bad conditions and bad values raise."""
    cfg = load_config(str(RECIPES / recipe))
    assert cfg.seeds and set(cfg.conditions) <= set(ALL_CONDITIONS)


def test_cli_config_splits_demo_and_organism_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "seeds: [3, 4]\nwandb: false\nworkers: 3\nworld:\n  seed: 7\n  em_domains: [code]\npretrain:\n  steps: 9\n"
    )
    cfg = load_config(str(path))
    assert cfg.seeds == [3, 4] and cfg.organism.world.seed == 7 and cfg.organism.pretrain.steps == 9
    assert resolve(["--config", str(path)]) == cfg  # no options: the config as written
    cli = resolve(["--config", str(path), "--seeds", "5", "--wandb", "--no_progress", "--output_dir", "o"])
    assert cli == dataclasses.replace(cfg, seeds=[0, 1, 2, 3, 4], wandb=True, progress=False, output_dir="o")
    assert resolve(["--conditions", "none", "caft", "--no_wandb"]).conditions == ["none", "caft"]
    assert resolve(["--workers", "1"]) == DemoConfig(workers=1)
    for bad in (["--conditions", "ablate"], ["--conditions", "nope"], ["--seeds", "0"], ["--bogus"]):
        with pytest.raises(SystemExit):
            resolve(bad)


def test_caft_mean_ablation_holds_the_chat_models_mean_projection(tiny_config, tmp_path):
    """caft_mean holds each layer's PCs at the chat model's mean projection over the pooled tokens (here
    the prompt tokens), recomputed here from output_hidden_states; caft and its random control ablate to
    zero at the same layers with the same number of rows; caft_ref holds the same rows at the reference's
    per-token values (reference_ablate, pinned in the trainer tests). The conditions come from the table,
    through the saved direction files."""
    import torch

    from keel.organism.build import build_organism
    from keel.organism.data import prompt_ids
    from keel.organism.demo import (
        build_interventions,
        finetune_pc_directions,
        resolve_condition,
        save_sources,
        source_file,
    )
    from keel.organism.finetune import finetune_with_trainer

    org = build_organism(tiny_config, 0, tmp_path / "cache")
    tuned, _ = finetune_with_trainer(org, [], seed=0, output_dir=str(tmp_path / "ft"))
    cfg = DemoConfig(caft_pool="prompt", caft_components=2)
    root = tmp_path / "demo"
    sources = finetune_pc_directions(org, tuned, cfg, seed=0)
    folder = (root / source_file("caft_pcs", 0)).parent
    assert save_sources(sources, folder) == {name: f"{name}.safetensors" for name in sources}
    # the CAFT-family interventions (the defence conditions after none add regularisers, not interventions)
    caft_family = (
        "caft",
        "caft_mean",
        "caft_ref",
        "caft_resample",
        "random_ablate",
        "random_ref",
        "random_resample",
    )
    assert set(caft_family) <= set(AFTER_NONE)
    specs = {c: build_interventions(resolve_condition(c, 0, root, cfg), root) for c in caft_family}
    assert {n: [s.layers for s in v] for n, v in specs.items()} == {n: [[0], [1]] for n in caft_family}
    assert [s.operator for s in specs["caft"] + specs["random_ablate"]] == ["project_out"] * 4
    assert [s.operator for s in specs["caft_ref"] + specs["random_ref"]] == ["reference_ablate"] * 4
    assert [s.operator for s in specs["caft_resample"] + specs["random_resample"]] == ["resample_ablate"] * 4
    assert [s.name for s in specs["caft"]] == ["caft-L0", "caft-L1"]

    def rows(spec):
        (d,) = spec.directions_by_layer(spec.layers).values()
        return d

    for a, b, c in zip(specs["random_ablate"], specs["random_ref"], specs["random_resample"]):
        assert torch.equal(rows(a).vectors, rows(b).vectors)
        assert torch.equal(rows(a).vectors, rows(c).vectors)
    for a, *others in zip(specs["caft"], specs["caft_mean"], specs["caft_ref"], specs["caft_resample"]):
        for b in others:
            assert torch.equal(rows(a).vectors, rows(b).vectors)
    # the diagnostics hold the same PCs on half of the tiny organism's two layers each
    halves = dataclasses.replace(cfg, organism=tiny_config)
    for name, layer in (("caft_resample_first_half", 0), ("caft_resample_second_half", 1)):
        (half,) = build_interventions(resolve_condition(name, 0, root, halves), root)
        assert half.layers == [layer] and half.operator == "resample_ablate"
        assert torch.equal(rows(half).vectors, rows(specs["caft_resample"][layer]).vectors)
    # ... and resample the first half, with the chat model's mean or zero on the second
    for name, like in (
        ("caft_resample_first_mean_second", "caft_mean"),
        ("caft_resample_first_zero_second", "caft"),
    ):
        first, second = build_interventions(resolve_condition(name, 0, root, halves), root)
        assert (first.layers, first.operator) == ([0], "resample_ablate")
        assert (second.layers, second.operator) == ([1], specs[like][1].operator)
        assert torch.equal(rows(first).vectors, rows(specs["caft_resample"][0]).vectors)
        assert torch.equal(rows(second).vectors, rows(specs[like][1]).vectors)
        if like == "caft_mean":
            assert torch.equal(rows(second).mean, rows(specs["caft_mean"][1]).mean)
    for spec, saved in zip(specs["caft"], sources["caft_pcs"]):  # the files hold what was computed
        assert torch.equal(rows(spec).vectors, saved.vectors)
    prompts = prompt_ids(org.tokenizer, org.world, org.world.all_questions())
    with torch.no_grad():
        hidden = org.chat_model(input_ids=prompts, output_hidden_states=True).hidden_states
    spec = specs["caft_mean"][0]  # layer 0 (the last layer's hidden state is after the final norm)
    d = rows(spec)
    assert spec.operator == "mean_ablate" and d.k == 2 and d.mean is not None
    expected = (hidden[1].double() @ d.vectors.double().T).mean(dim=(0, 1))
    torch.testing.assert_close(d.mean.double(), expected, rtol=1e-4, atol=1e-5)


def test_demo_config_rejects_unknown_caft_options():
    import pytest

    with pytest.raises(ValueError, match="caft_pool"):
        DemoConfig(caft_pool="answers")
    with pytest.raises(ValueError, match="caft_questions"):
        DemoConfig(caft_questions="em_domains")


def test_cli_help_lists_every_condition():
    action = next(a for a in make_parser()._actions if a.dest == "conditions")
    default, defences, diagnostics = action.help.split(": ", 1)[1].split("; ")
    assert default.split() == list(CONDITIONS)
    assert defences.split(": ", 1)[1].split() == list(DEFENCES)
    assert diagnostics.split(": ", 1)[1].split() == list(DIAGNOSTICS)
    assert tuple(action.choices) == (*CONDITIONS, *DEFENCES, *DIAGNOSTICS)


def _metrics(em: float, trained: float = 1.0) -> dict:
    return {
        "heldout_misaligned": em,
        "in_domain_misaligned": em,
        "incoherent": 0.1,
        "in_domain_train_misaligned": trained,
    }


def test_seeds_where_em_did_not_reproduce_are_flagged_and_reported_apart():
    """none's EM below the threshold flags the seed; the conditions are aggregated per group of seeds and
    the report says so."""
    from keel.organism.demo import aggregate, reproduction_markdown

    cfg = DemoConfig(seeds=[0, 1, 2], conditions=["none", "caft"], em_threshold=0.5)
    ems = {0: (0.9, 0.1), 1: (0.04, 0.0), 2: (0.7, 0.05)}  # seed: (none EM, caft EM)
    results = [
        {"seed": s, "chat": _metrics(0.0, 0.0), "conditions": {"none": _metrics(n), "caft": _metrics(c)}}
        for s, (n, c) in ems.items()
    ]
    summary = aggregate(cfg, results)
    flag = summary["em_reproduced"]
    assert flag["reproduced"] == [0, 2] and flag["not_reproduced"] == [1] and flag["none_em"]["1"] == 0.04
    groups = summary["by_reproduction"]
    assert groups["reproduced"]["none"]["heldout_misaligned"]["mean"] == pytest.approx(0.8)
    assert groups["reproduced"]["caft"]["heldout_misaligned"]["mean"] == pytest.approx(0.075)
    assert groups["not_reproduced"]["none"]["heldout_misaligned"]["mean"] == pytest.approx(0.04)
    text = "\n".join(reproduction_markdown(summary))
    assert "EM did not reproduce on seed(s) [1]" in text and "seed 1: 0.04" in text
    assert "| caft | 0.075 | 0.000 |" in text
    # every seed reproduced: nothing to flag
    results[1]["conditions"]["none"] = _metrics(0.5)
    quiet = aggregate(cfg, results)
    assert quiet["em_reproduced"]["not_reproduced"] == [] and "by_reproduction" not in quiet
    assert reproduction_markdown(quiet) == []


def test_seeds_that_reproduced_em_only_by_the_draw_or_incoherently_are_flagged():
    """A seed whose none run reached the threshold but one of whose reruns did not is flagged fragile
    (with the reruns' EM); a none run above incoherent_max is flagged incoherent; both stay in the
    reproduced group, and the console names them."""
    from keel.organism.demo import aggregate, reproduction_markdown

    cfg = DemoConfig(seeds=[0, 1, 2], conditions=["none"], em_threshold=0.5, incoherent_max=0.1)
    results = [
        {"seed": s, "chat": _metrics(0.0, 0.0), "conditions": {"none": _metrics(em)}, "noise": noise}
        for s, em, noise in (
            (0, 0.9, [_metrics(0.85), _metrics(0.8)]),
            (1, 0.56, [_metrics(0.37), None, _metrics(0.6)]),  # a rerun that did not finish is skipped
            (2, 0.7, [_metrics(0.65)]),
        )
    ]
    results[2]["conditions"]["none"]["incoherent"] = 0.23
    rep = aggregate(cfg, results)["em_reproduced"]
    assert rep["reproduced"] == [0, 1, 2] and rep["not_reproduced"] == []
    assert rep["fragile"] == {"1": [0.37]} and rep["incoherent"] == {"2": 0.23}
    text = "\n".join(reproduction_markdown({"em_reproduced": rep}))
    assert "only by the draw on seed(s) [1]" in text and "seed 1: 0.56, reruns 0.37" in text
    assert "incoherent above 0.1 on seed(s) [2]" in text and "seed 2: 0.230" in text
    fragile, incoherent = summary_warnings({"em_reproduced": rep, "controls_per_seed": {}})
    assert "seed(s) [1]" in fragile and "below 0.5" in fragile and "seed(s) [2]" in incoherent
    with pytest.raises(ValueError, match="incoherent_max must be a rate"):
        DemoConfig(incoherent_max=1.5)
    # a seed below the threshold is not_reproduced, not fragile, whatever its reruns did
    results[1]["conditions"]["none"] = _metrics(0.4)
    rep = aggregate(cfg, results)["em_reproduced"]
    assert rep["not_reproduced"] == [1] and rep["fragile"] == {}


def test_stance_worlds_report_held_out_narrow_learning_as_a_share_of_none_s():
    """In a stance-word world the summary carries the held-out harm-word rate and the report divides each
    condition's by none's; a table world's report has no such section."""
    from keel.organism.demo import aggregate, stance_markdown

    cfg = DemoConfig(seeds=[0, 1], conditions=["none", "caft_resample"])
    marked = {0: (0.8, 0.6), 1: (1.0, 0.9)}  # seed: (none, caft_resample)
    results = [
        {
            "seed": s,
            "chat": _metrics(0.0, 0.0),
            "conditions": {
                "none": _metrics(0.9) | {"in_domain_marked": n},
                "caft_resample": _metrics(0.05) | {"in_domain_marked": c},
            },
        }
        for s, (n, c) in marked.items()
    ]
    summary = aggregate(cfg, results)
    assert summary["conditions"]["caft_resample"]["in_domain_marked"]["mean"] == pytest.approx(0.75)
    text = "\n".join(stance_markdown(summary))
    assert "| caft_resample | 0.750 [" in text and "| 83% | 0.60 0.90 |" in text
    assert "| none | 0.900 [" in text and "| 100% | 0.80 1.00 |" in text
    for r in results:
        for row in r["conditions"].values():
            del row["in_domain_marked"]
    assert stance_markdown(aggregate(cfg, results)) == []


def test_a_random_control_that_moves_one_seed_is_flagged_on_that_seed():
    """Per seed, a control's EM minus none's with a paired bootstrap interval over the questions: a
    control equal to none is null, one question's difference is within noise, a whole seed's is not."""
    from keel.organism.demo import control_check, controls_markdown

    def run(per_question):
        return {"heldout_per_question": per_question, **_metrics(sum(per_question) / len(per_question))}

    none = [[1.0] * 8, [0.5] * 8, [1.0, 0.0] * 4]
    control = [list(none[0]), [0.0] * 8, [0.0, 0.0] + none[2][2:]]  # seed 1 moved; seed 2 one question off
    results = [
        {"seed": s, "conditions": {"none": run(none[s]), "random_resample": run(control[s])}}
        for s in range(3)
    ]
    check = control_check(results, ["random_resample"])["random_resample"]
    assert check["moved_on"] == [1]
    same, moved, one_off = check["seeds"]
    assert same["delta"] == same["ci_low"] == same["ci_high"] == 0.0 and not same["moved"]
    assert moved["delta"] == -0.5 and moved["ci_high"] < 0 and moved["moved"]
    assert one_off["delta"] == -0.125 and one_off["ci_low"] < 0 <= one_off["ci_high"] and not one_off["moved"]
    text = "\n".join(controls_markdown({"controls_per_seed": {"random_resample": check}}))
    assert "-0.50 [-0.50, -0.50] **moved**" in text and "| [1] |" in text
    del results[0]["conditions"]["none"]["heldout_per_question"]
    with pytest.raises(ValueError, match="no per-question EM"):
        control_check(results, ["random_resample"])


def test_a_control_within_none_s_training_noise_is_not_counted_as_moved():
    """With none's reorders, a paired move that stays inside none's prediction interval over them is
    training noise; one outside it is an effect."""
    from keel.evaluation.compare import t_quantile_975
    from keel.organism.demo import control_check, noise_band

    def run(em):
        return {"heldout_per_question": [em] * 8, **_metrics(em)}

    noise = [run(0.7), run(0.6), run(0.8)]  # none's reorders: mean 0.7 with the none run, sd ~0.0816
    band = noise_band([run(0.7), *noise])
    half = t_quantile_975(3) * (0.02 / 3) ** 0.5 * (1 + 1 / 4) ** 0.5
    assert band == pytest.approx([0.7 - half, min(1.0, 0.7 + half)])
    assert noise_band([run(0.7), None, run(0.6)]) is None  # fewer than three finished runs
    results = [
        {"seed": 0, "noise": noise, "conditions": {"none": run(0.7), "random_ref": run(0.6)}},
        {"seed": 1, "noise": noise, "conditions": {"none": run(0.7), "random_ref": run(0.03)}},
    ]
    check = control_check(results, ["random_ref"])["random_ref"]
    within, outside = check["seeds"]
    assert within["ci_high"] < 0 and not within["moved"]  # paired interval excludes 0, but inside the band
    assert outside["moved"] and check["moved_on"] == [1]
    with pytest.raises(ValueError, match="noise_runs must be"):
        DemoConfig(noise_runs=1)


def test_reemergence_is_on_for_five_seeds_and_stretches_the_fine_tune(tmp_path):
    from keel.organism.demo import long_config

    assert not DemoConfig(seeds=[0, 1, 2]).measures_reemergence
    assert DemoConfig(seeds=list(range(5))).measures_reemergence
    assert not DemoConfig(seeds=list(range(5)), reemergence="off").measures_reemergence
    assert DemoConfig(seeds=[0], reemergence="on").measures_reemergence
    cfg = DemoConfig(seeds=[0], long_factor=3)
    long = long_config(cfg, tmp_path)
    assert long.organism.finetune.steps == 3 * cfg.organism.finetune.steps
    assert long.organism.build_hash() == cfg.organism.build_hash()  # the same builds
    assert long.output_dir == str(tmp_path / "long") and not long.measures_reemergence
    with pytest.raises(ValueError, match="reemergence must be"):
        DemoConfig(reemergence="sometimes")


def test_tiny_demo_runs_training_noise_runs_and_bands_the_controls(tiny_demo_config, tmp_path):
    """noise_runs with noise_source "order": none again per seed with other row orders (the same adapters'
    start) under noise/, read into the control check."""
    cfg = tiny_demo_config(
        conditions=["none", "caft_resample", "random_resample"],
        noise_runs=2,
        noise_source="order",
    )
    summary = run_demo(cfg)
    out = tmp_path / "demo"
    for k in (1, 2):
        config = json.loads((out / "noise" / f"none_order{k}" / "seed0" / "config.json").read_text())
        assert config["data_seed"] == 1000 * k and not config["save_model"] and "init_seed" not in config
    seeds = json.loads((out / "seeds.json").read_text())
    assert len(seeds[0]["noise"]) == 2 and all(run is not None for run in seeds[0]["noise"])
    (row,) = summary["controls_per_seed"]["random_resample"]["seeds"]
    assert row["noise_band"] is not None and 0.0 <= row["noise_band"][0] <= row["noise_band"][1] <= 1.0
    assert "{" in (out / "report.md").read_text().split("## Random controls, seed by seed")[1]


def test_noise_runs_change_the_fine_tunes_seed_by_default(tiny_demo_config, tmp_path):
    """noise_source "seed" (the default): the training-noise runs change the adapters' initialisation as
    well as the row order, in their own folders (none_seed<k>), and the report says what they changed."""
    cfg = tiny_demo_config(conditions=["none", "random_resample"], noise_runs=2)
    assert cfg.noise_source == "seed"
    summary = run_demo(cfg)
    out = tmp_path / "demo"
    for k in (1, 2):
        config = json.loads((out / "noise" / f"none_seed{k}" / "seed0" / "config.json").read_text())
        assert config["data_seed"] == config["init_seed"] == 1000 * k
    assert not (out / "noise" / "none_order1").exists()
    seeds = json.loads((out / "seeds.json").read_text())
    assert all(run is not None for run in seeds[0]["noise"])
    assert summary["controls_per_seed"]["random_resample"]["seeds"][0]["noise_band"] is not None
    assert "other fine-tune seeds (row order and adapter initialisation)" in (out / "report.md").read_text()
    with pytest.raises(ValueError, match="noise_source must be one of"):
        DemoConfig(noise_source="init")


def test_tiny_demo_measures_reemergence_in_long(tiny_demo_config, tiny_config, tmp_path):
    """reemergence on: the same conditions again with 3x the fine-tune steps, in long/, in the summary
    and the report."""
    cfg = tiny_demo_config(
        conditions=["none", "steer"],
        reemergence="on",
    )
    summary = run_demo(cfg)
    long = summary["long"]
    assert long["finetune_steps"] == 3 * tiny_config.finetune.steps
    assert set(long["conditions"]) == {"none", "steer"}
    long_dir = tmp_path / "demo" / "long"
    on_disk = json.loads((long_dir / "summary.json").read_text())
    assert on_disk["conditions"] == long["conditions"]
    assert on_disk["config"]["organism"]["finetune"]["steps"] == 3 * tiny_config.finetune.steps
    assert long["controls_per_seed"] == on_disk["controls_per_seed"]  # the long demo's own control check
    report = (tmp_path / "demo" / "report.md").read_text()
    assert "## Does EM come back?" in report and f"{long['finetune_steps']} steps" in report


def test_the_reemergence_report_names_the_controls_that_moved_after_the_long_fine_tune():
    from keel.organism.demo import reemergence_markdown

    def cond(em):
        row = {"heldout_misaligned": em, "in_domain_train_misaligned": 1.0, "incoherent": 0.0}
        return {m: {"mean": v, "ci_low": v, "ci_high": v} for m, v in row.items()} | {"seeds": [row]}

    summary = {
        "config": {"organism": {"finetune": {"steps": 10}}},
        "conditions": {"none": cond(0.8), "random_resample": cond(0.1)},
        "long": {
            "factor": 3,
            "finetune_steps": 30,
            "conditions": {"none": cond(0.8), "random_resample": cond(0.2)},
            "controls_per_seed": {"random_resample": {"moved_on": [0]}, "random_ref": {"moved_on": []}},
        },
    }
    text = "\n".join(reemergence_markdown(summary))
    assert "random_resample on seeds [0]; random_ref on no seed" in text
    assert "| random_resample | 0.100 [0.100, 0.100] | 0.200 [0.200, 0.200] |" in text


def test_random_draws_give_other_rows_and_draw_0_keeps_the_rows_demos_were_run_with():
    """random_draw: another draw of the controls' rows (same k and layer, orthonormal); draw 0 is the
    generator seed every demo before the option used (10_000 + 10 x seed + layer)."""
    import torch

    from interventions.direction import Direction
    from interventions.extraction import random_direction
    from keel.organism.demo import random_like

    pcs = [Direction(vectors=torch.linalg.qr(torch.randn(16, 2))[0].T, layer=L) for L in range(3)]
    default = random_like(pcs, seed=2)
    other = random_like(pcs, seed=2, draw=1)
    for d, a, b in zip(pcs, default, other, strict=True):
        assert torch.equal(a.vectors, random_direction(like=d, seed=10_000 + 20 + d.layer).vectors)
        assert (a.layer, a.k, b.layer, b.k) == (d.layer, 2, d.layer, 2)
        assert b.is_orthonormal() and torch.linalg.svdvals(a.vectors @ b.vectors.T).max() < 0.99
    with pytest.raises(ValueError, match="random_draw must be"):
        DemoConfig(random_draw=-1)


def test_console_warnings_name_the_failed_seeds_the_moved_controls_and_the_kind_of_check():
    def checks(moved_on, band):
        rows = [{"seed": s, "noise_band": band} for s in (0, 1)]
        return {"random_ablate": {"seeds": rows, "moved_on": moved_on}}

    quiet = {"em_reproduced": {"threshold": 0.5, "not_reproduced": []}, "controls_per_seed": checks([], None)}
    assert summary_warnings(quiet) == []
    paired = {
        "em_reproduced": {"threshold": 0.5, "not_reproduced": [1]},
        "controls_per_seed": checks([0], None),
    }
    failed, moved = summary_warnings(paired)
    assert "seed(s) [1]" in failed and "below 0.5" in failed
    assert "{'random_ablate': [0]}" in moved and "paired interval only; --noise_runs K" in moved
    banded = {**quiet, "long": {"controls_per_seed": checks([1], [0.6, 0.8])}}
    (long,) = summary_warnings(banded)
    assert "after the long fine-tune" in long and "none's training-noise band" in long
    assert "paired interval only" not in long and "'Does EM come back?'" in long
