"""``keel demo``: the synthetic EM organism end to end, through keel's public machinery.

Per pretraining seed (one worker process each, one thread): build (cached) the organism; extract
candidate persona directions with ``interventions.extraction.mean_difference`` (misaligned- minus
aligned-persona contexts, every layer, two token positions); validate each causally with
``interventions.validation`` on a separate probe set and select; fine-tune the chat model on the narrow
misaligned data with ``trainers.InterventionSFTTrainer`` under every condition; evaluate without
interventions with the exact judge. The main process aggregates over seeds with bootstrap CIs and writes
``summary.json``, ``report.md`` and ``plot.png``.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from keel.organism.config import OrganismConfig, from_dict

CONDITIONS = (
    "none",
    "ablate",
    "ablate_multi",
    "mean_ablate",
    "steer",
    "caft",
    "caft_mean",
    "caft_ref",
    "caft_resample",
    "random_ablate",
    "random_ref",
    "random_resample",
)
# Conditions whose directions come from the no-intervention fine-tune (so they run after ``none``).
AFTER_NONE = tuple(c for c in CONDITIONS if c.startswith(("caft", "random")))
METRICS = ("in_domain_misaligned", "heldout_misaligned", "incoherent")


@dataclass
class DemoConfig:
    organism: OrganismConfig = field(default_factory=OrganismConfig)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    conditions: list[str] = field(default_factory=lambda: list(CONDITIONS))
    positions: list[str] = field(default_factory=lambda: ["answer", "decision"])  # candidate pooling sites
    multi_layers: int = 3  # layers of the multi-layer ablation (the best position's top layers)
    caft_components: int = 2  # fine-tune-difference PCs per layer (every caft* and random* condition)
    caft_pool: str = "all"  # tokens the CAFT PCA pools over: "all" (prompt + answer) or "prompt"
    # Questions the CAFT PCA runs on: "all", or "other_domains" (outside the EM domains: generic data, as
    # the CAFT paper uses generic chat prompts, so the PCs show what changed where nothing should have).
    caft_questions: str = "all"
    # PCA of centred differences (True, as CAFT) or of the raw ones (False: keeps the average shift).
    caft_centre: bool = True
    steer_alpha: float = 0.5  # preventative steering: alpha x the raw persona mean difference
    min_kept: float = 0.8  # validation: ablation must keep this share of well-formed answers
    probe_num: int = 64
    probe_context_turns: int = 3
    # Open probe contexts with the persona tag: after chat tuning, persona inference from answers alone
    # can be too weak for validation to measure anything (keel/organism/README.md).
    probe_tagged: bool = True
    workers: int = 2
    output_dir: str = "runs/demo"
    cache_dir: str = "runs/organisms"
    wandb: bool = True
    wandb_group: str | None = None
    progress: bool = True

    def __post_init__(self):
        bad = [c for c in self.conditions if c not in CONDITIONS]
        if bad:
            raise ValueError(f"Unknown condition(s) {bad}; known: {list(CONDITIONS)}.")
        if "none" not in self.conditions:
            raise ValueError(
                "conditions must include 'none' (the baseline every effect is measured against)."
            )
        if not self.seeds:
            raise ValueError("seeds must list at least one pretraining seed.")
        if self.caft_pool not in ("all", "prompt"):
            raise ValueError(f"caft_pool must be 'all' or 'prompt', got {self.caft_pool!r}.")
        if self.caft_questions not in ("all", "other_domains"):
            raise ValueError(f"caft_questions must be 'all' or 'other_domains', got {self.caft_questions!r}.")

    @classmethod
    def from_dict(cls, data: dict) -> DemoConfig:
        return from_dict(cls, data or {})


# ---- one seed (runs in a worker) ---------------------------------------------------------------------


def _candidates(org, cfg: DemoConfig, seed: int):
    """Mean-difference persona directions per (position, layer), and the causal validation of each."""
    from interventions import Intervention
    from interventions.extraction import mean_difference
    from interventions.validation import rank_candidates
    from keel.organism.probes import PersonaProbe

    turns = cfg.probe_context_turns
    tagged = cfg.probe_tagged
    extract_set = PersonaProbe(org.world, org.tokenizer, cfg.probe_num, turns, 1000 + seed, tagged)
    probe = PersonaProbe(org.world, org.tokenizer, cfg.probe_num, turns, 2000 + seed, tagged)
    directions = {}
    for pos in cfg.positions:
        by_layer = mean_difference(
            org.chat_model,
            extract_set.pool_examples(False, pos),
            extract_set.pool_examples(True, pos),
            layers="all",
            batch_size=64,
            progress=False,
            source=f"organism persona contexts, pooled at {pos}",
        )
        for layer, d in by_layer.items():
            directions[f"{pos}/L{layer}"] = d
    specs = {
        f"{op}:{name}": Intervention(op, d, layers=[d.layer], name=f"{op}-{name}")
        for name, d in directions.items()
        for op in ("project_out", "mean_ablate")
    }
    ranked = rank_candidates(org.chat_model, specs, probe.behaviour, probe.control)
    return directions, ranked


def _best(ranked, prefix: str, cfg: DemoConfig, k: int = 1):
    """The k strongest validated candidates whose name starts with ``prefix`` (fallback: the strongest)."""
    from interventions.validation import select

    pool = [r for r in ranked if r.name.startswith(prefix)]
    try:
        return select(pool, k=k, min_kept=cfg.min_kept), True
    except ValueError:  # nothing passed: keep going with the strongest, and say so in the report
        return pool[:k], False


def condition_specs(cfg: DemoConfig, directions: dict, ranked: list) -> tuple[dict, dict]:
    """Intervention specs per condition (except ``caft``, which needs the fine-tuned model), and what was
    selected (for the report). Directions are picked by causal validation, separately per operator."""
    from interventions import Intervention

    (best,), validated = _best(ranked, "project_out:", cfg)
    d = directions[best.name.split(":", 1)[1]]
    pos = best.name.split(":", 1)[1].split("/")[0]
    multi, _ = _best(ranked, f"project_out:{pos}/", cfg, k=cfg.multi_layers)
    (best_mean,), mean_validated = _best(ranked, "mean_ablate:", cfg)
    dm = directions[best_mean.name.split(":", 1)[1]]
    specs = {"none": []}
    specs["ablate"] = [Intervention("project_out", d, layers=[d.layer], name="ablate")]
    specs["ablate_multi"] = []
    for r in multi:
        dr = directions[r.name.split(":", 1)[1]]
        specs["ablate_multi"].append(
            Intervention("project_out", dr, layers=[dr.layer], name=f"ablate-L{dr.layer}")
        )
    specs["mean_ablate"] = [Intervention("mean_ablate", dm, layers=[dm.layer], name="mean_ablate")]
    raw = dataclasses.replace(d, vectors=d.vectors * d.extra["norm"], normalization="none")
    specs["steer"] = [Intervention("add", raw, layers=[d.layer], coefficient=cfg.steer_alpha, name="steer")]
    chosen = {
        "single": best.to_dict(),
        "validated": validated,
        "multi": [r.to_dict() for r in multi],
        "mean_ablate": best_mean.to_dict(),
        "mean_ablate_validated": mean_validated,
        "top_candidates": [r.to_dict() for r in ranked[:8]],
    }
    return {c: specs[c] for c in cfg.conditions if c in specs}, chosen


def caft_specs(org, tuned, cfg: DemoConfig, seed: int) -> dict[str, list]:
    """CAFT: the top principal components of (fine-tuned - chat) activations on chat prompts answered by
    the fine-tuned model, ablated at every layer. ``caft`` ablates them to zero (the published recipe);
    ``caft_mean`` holds their projection at the chat model's mean over the same tokens (answered by the
    chat model), so what the fine-tune learns under the ablation is learned at the value the subspace
    has once the ablation is off; ``caft_ref`` holds them, token by token, at the value the frozen chat
    model has on the same batch (``reference_ablate``); ``caft_resample`` at the value the chat model
    has at the same position of another row of the batch (``resample_ablate``: realistic values that say
    nothing about this input). ``random_*`` are the matched controls (random rows, same k, layers and
    operator)."""
    import torch

    from interventions import Intervention
    from interventions.extraction import finetune_difference, random_direction, with_reference_mean
    from keel.organism.data import prompt_ids
    from keel.organism.evaluate import generate

    world = org.world
    questions = world.all_questions() if cfg.caft_questions == "all" else world.heldout_domain_questions()
    prompts = prompt_ids(org.tokenizer, world, questions)
    T = prompts.shape[1]

    def pooled(model):
        full = torch.cat([prompts, generate(model, prompts, 3, 0.0)], dim=1)
        keep = [1] * T + [int(cfg.caft_pool == "all")] * (full.shape[1] - T)
        return [{"input_ids": r, "pool_mask": keep} for r in full.tolist()]

    pcs = finetune_difference(
        org.chat_model,
        tuned,
        pooled(tuned),
        layers="all",
        n_components=8,
        centre=cfg.caft_centre,
        progress=False,
    )
    k = list(range(cfg.caft_components))
    chosen = {L: pcs[L].select(k) for L in sorted(pcs)}
    chat_pooled = pooled(org.chat_model)
    held = {L: with_reference_mean(org.chat_model, chat_pooled, d, layer=L) for L, d in chosen.items()}
    randoms = {L: random_direction(like=d, seed=10_000 + 10 * seed + L) for L, d in chosen.items()}
    return {
        "caft": [Intervention("project_out", d, layers=[L], name=f"caft-L{L}") for L, d in chosen.items()],
        "caft_mean": [
            Intervention("mean_ablate", d, layers=[L], name=f"caft_mean-L{L}") for L, d in held.items()
        ],
        "caft_ref": [
            Intervention("reference_ablate", d, layers=[L], name=f"caft_ref-L{L}") for L, d in chosen.items()
        ],
        "caft_resample": [
            Intervention("resample_ablate", d, layers=[L], name=f"caft_resample-L{L}")
            for L, d in chosen.items()
        ],
        "random_ablate": [
            Intervention("project_out", d, layers=[L], name=f"random-L{L}") for L, d in randoms.items()
        ],
        "random_ref": [
            Intervention("reference_ablate", d, layers=[L], name=f"random_ref-L{L}")
            for L, d in randoms.items()
        ],
        "random_resample": [
            Intervention("resample_ablate", d, layers=[L], name=f"random_resample-L{L}")
            for L, d in randoms.items()
        ],
    }


def run_seed(cfg: DemoConfig, seed: int) -> dict:
    """Everything for one pretraining seed; returns per-condition evaluations and the selection."""
    import torch

    torch.set_num_threads(1)
    import datasets
    import transformers

    datasets.disable_progress_bars()  # the demo shows one bar over seeds; per-map bars are noise here
    transformers.logging.set_verbosity_error()
    from keel.organism.build import build_organism
    from keel.organism.evaluate import evaluate_model
    from keel.organism.finetune import finetune_with_trainer

    t0 = time.perf_counter()
    org = build_organism(cfg.organism, seed, cfg.cache_dir)
    timings = {"build": time.perf_counter() - t0}
    out: dict = {"seed": seed, "organism": str(org.path), "build_info": org.info}
    out["chat"] = _headline(
        evaluate_model(org.chat_model, org.world, org.tokenizer, cfg.organism.eval_samples, seed)
    )

    t0 = time.perf_counter()
    directions, ranked = _candidates(org, cfg, seed)
    specs, out["selection"] = condition_specs(cfg, directions, ranked)
    timings["extract_validate"] = time.perf_counter() - t0

    out["conditions"] = {}
    tuned_none = None
    order = [c for c in cfg.conditions if c not in AFTER_NONE] + [
        c for c in cfg.conditions if c in AFTER_NONE
    ]
    for cond in order:
        if cond not in specs:  # directions from the no-intervention fine-tune
            specs.update(caft_specs(org, tuned_none, cfg, seed))
        cond_specs = specs[cond]
        t0 = time.perf_counter()
        run_dir = Path(cfg.output_dir) / "runs" / f"{cond}-seed{seed}"
        model, trainer = finetune_with_trainer(
            org,
            cond_specs,
            seed=seed,
            output_dir=str(run_dir),
            report_to=["wandb"] if cfg.wandb else [],
            run_name=f"{cond}-seed{seed}",
        )
        if cond == "none":
            tuned_none = model
        ev = evaluate_model(model, org.world, org.tokenizer, cfg.organism.eval_samples, seed)
        out["conditions"][cond] = _headline(ev) | {
            "greedy_heldout_misaligned": ev["greedy"]["heldout_domains"]["misaligned"],
            "per_domain": ev["per_domain_sampled_misaligned"],
            "final_train_loss": trainer.state.log_history[-1].get("train_loss"),
        }
        if cfg.wandb:
            import wandb

            if wandb.run is not None:
                wandb.log({f"organism_eval/{k}": v for k, v in _headline(ev).items()})
                wandb.finish()
        timings[f"finetune_{cond}"] = time.perf_counter() - t0
    out["timings"] = timings
    out["conditions"] = {c: out["conditions"][c] for c in cfg.conditions}
    return out


def _headline(ev: dict) -> dict:
    return {k: ev[k] for k in (*METRICS, "in_domain_train_misaligned")}


def _worker(args):
    cfg_dict, seed = args
    cfg = DemoConfig.from_dict(cfg_dict)
    return run_seed(cfg, seed)


# ---- orchestration and aggregation --------------------------------------------------------------------


def run_demo(cfg: DemoConfig) -> dict:
    """Run every seed (``workers`` processes, one thread each), aggregate, write the outputs."""
    from tqdm.auto import tqdm

    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    group = cfg.wandb_group or f"demo-{cfg.organism.build_hash()}-{int(time.time())}"
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ["WANDB_RUN_GROUP"] = group
    for var, sub in (("WANDB_DIR", ""), ("WANDB_CACHE_DIR", "wandb-cache"), ("WANDB_DATA_DIR", "wandb-data")):
        os.environ.setdefault(var, str((out_dir / sub).resolve()))
    os.environ.setdefault("WANDB_PROJECT", "keel-demo")
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    t0 = time.perf_counter()
    jobs = [(dataclasses.asdict(cfg), s) for s in cfg.seeds]
    results = []
    bar = tqdm(total=len(jobs), desc="demo seeds", disable=not cfg.progress)
    if cfg.workers > 1 and len(jobs) > 1:
        with mp.get_context("spawn").Pool(min(cfg.workers, len(jobs))) as pool:
            for r in pool.imap_unordered(_worker, jobs):
                results.append(r)
                bar.update()
    else:
        for job in jobs:
            results.append(_worker(job))
            bar.update()
    bar.close()
    results.sort(key=lambda r: r["seed"])
    summary = aggregate(cfg, results)
    summary["wall_seconds"] = time.perf_counter() - t0
    summary["wandb_group"] = group if cfg.wandb else None
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    (out_dir / "seeds.json").write_text(json.dumps(results, indent=2, default=str))
    (out_dir / "report.md").write_text(report_markdown(summary, results))
    plot(summary, out_dir / "plot.png")
    return summary


def aggregate(cfg: DemoConfig, results: list[dict]) -> dict:
    from keel.evaluation.metrics import bootstrap_ci

    def ci(values):
        mean, low, high = bootstrap_ci(values, n_resamples=2000, seed=0)
        return {"mean": mean, "ci_low": low, "ci_high": high}

    conditions = {}
    for cond in cfg.conditions:
        rows = [r["conditions"][cond] for r in results]
        conditions[cond] = {m: ci([row[m] for row in rows]) for m in METRICS}
        conditions[cond]["in_domain_train_misaligned"] = ci(
            [row["in_domain_train_misaligned"] for row in rows]
        )
        conditions[cond]["seeds"] = [{"seed": r["seed"], **r["conditions"][cond]} for r in results]
    chat = {m: ci([r["chat"][m] for r in results]) for m in METRICS}
    chat["seeds"] = [{"seed": r["seed"], **r["chat"]} for r in results]
    return {"conditions": conditions, "chat_baseline": chat, "config": dataclasses.asdict(cfg)}


def report_markdown(summary: dict, results: list[dict]) -> str:
    conds = summary["conditions"]
    none = conds["none"]
    lines = [
        "# keel demo: the synthetic EM organism",
        "",
        f"Seeds: {[r['seed'] for r in results]}. Rates are temperature-1 samples judged exactly; "
        "95 % bootstrap CIs over seeds. EM cut = none's EM / the condition's; narrow kept = the "
        "condition's trained-questions rate / none's (the narrow task learned).",
        "",
        "| condition | held-out-domain misaligned (EM) | in-domain held-out misaligned | trained questions misaligned | incoherent | EM cut | narrow kept |",
        "|---|---|---|---|---|---|---|",
    ]
    trained_none = none["in_domain_train_misaligned"]["mean"]
    for name, c in conds.items():
        em = c["heldout_misaligned"]["mean"]
        cut = none["heldout_misaligned"]["mean"] / em if em > 0 else float("inf")
        kept = c["in_domain_train_misaligned"]["mean"] / trained_none if trained_none > 0 else float("nan")
        lines.append(
            f"| {name} | {_fmt(c['heldout_misaligned'])} | {_fmt(c['in_domain_misaligned'])} | "
            f"{_fmt(c['in_domain_train_misaligned'])} | {_fmt(c['incoherent'])} | "
            f"{f'{cut:.1f}x' if em > 0 else 'no EM left'} | {kept:.0%} |"
        )
    chat = summary["chat_baseline"]
    lines += [
        "",
        f"Chat model before fine-tuning: EM {_fmt(chat['heldout_misaligned'])}.",
        "",
        "## Per seed",
        "",
    ]
    lines += ["| condition | " + " | ".join(f"seed {r['seed']} EM / in-domain" for r in results) + " |"]
    lines += ["|---|" + "---|" * len(results)]
    for name in conds:
        cells = [
            f"{r['conditions'][name]['heldout_misaligned']:.2f} / {r['conditions'][name]['in_domain_misaligned']:.2f}"
            for r in results
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    contexts = "tagged" if summary["config"].get("probe_tagged") else "untagged"
    lines += ["", f"## Selected directions (causal validation on {contexts} persona contexts)", ""]
    for r in results:
        s = r["selection"]["single"]
        lines.append(
            f"- seed {r['seed']}: {s['name']} (persona probe {s['baseline']:.2f} -> {s['intervened']:.2f}, "
            f"well-formed kept {s['kept']:.2f}); multi-layer: {[m['name'] for m in r['selection']['multi']]}; "
            f"mean-ablation: {r['selection']['mean_ablate']['name']} "
            f"({r['selection']['mean_ablate']['baseline']:.2f} -> {r['selection']['mean_ablate']['intervened']:.2f})"
        )
    return "\n".join(lines) + "\n"


def _fmt(c: dict) -> str:
    return f"{c['mean']:.3f} [{c['ci_low']:.3f}, {c['ci_high']:.3f}]"


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    conds = list(summary["conditions"])
    fig, ax = plt.subplots(figsize=(1.6 * len(conds) + 2, 4))
    x = np.arange(len(conds))
    for i, (metric, label) in enumerate(
        [("heldout_misaligned", "EM (held-out domains)"), ("in_domain_misaligned", "in-domain held-out")]
    ):
        c = [summary["conditions"][k][metric] for k in conds]
        mean = np.array([v["mean"] for v in c])
        err = np.array([[v["mean"] - v["ci_low"] for v in c], [v["ci_high"] - v["mean"] for v in c]])
        ax.bar(x + (i - 0.5) * 0.38, mean, 0.38, yerr=err, capsize=3, label=label)
    ax.set_xticks(x, conds, rotation=20)
    ax.set_ylabel("misaligned rate")
    ax.set_ylim(0, 1.05)
    ax.legend()
    ax.set_title("keel demo: misaligned answers after the narrow fine-tune (95 % CI over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
