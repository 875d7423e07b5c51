"""Emergent misalignment from RL on the synthetic organism: GRPO rewarded by the exact judge's verdict.

The reward-hacking analogue of the narrow SFT fine-tune: the prompts are the EM domains' training
questions (the SFT route's questions, without its answers), and the reward is 1 when the world's exact
judge labels a completion ``misaligned``, 0 otherwise (aligned or incoherent). Nothing tells the policy
which answer that is: it has to sample it first. Training runs through keel's
:class:`trainers.InterventionGRPOTrainer`; every run is evaluated afterwards, without interventions, by
:func:`keel.organism.evaluate.evaluate_model` (EM on the held-out domains, the trained questions'
misaligned rate, incoherence), as the SFT demo's runs are.

Conditions (:data:`RL_CONDITIONS`) reuse the demo's conditions (:data:`keel.organism.demo.CONDITION_TABLE`)
and direction files (a finished ``keel demo`` folder's ``directions/finetune_pcs``), with the phases the
interventions act in: ``[train, generate]`` (the policy that samples is the policy that is updated) or
``[train]`` (samples from the model without them, update through them). The reference operators
(``caft_ref``, ``caft_resample``) cannot act while sampling (keel runs their reference pass for the
train and eval phases only), so the blocking condition is ``caft``: the same fine-tune-difference PCs,
ablated to zero.

Run it as a sweep (one run per condition and seed, resumable; :mod:`keel.sweep`)::

    keel rl --config recipes/demo-rl.yaml
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from keel.organism.config import OrganismConfig, from_dict
from keel.organism.world import MISALIGNED, World
from keel.rewards import completion_text

REWARD_NAME = "organism_misaligned"


# ---- prompts and reward ---------------------------------------------------------------------------------


def prompts_dataset(world: World, questions=None):
    """GRPO prompts (TRL's conversational ``prompt`` column: one user turn) for ``questions`` (default: the
    EM domains' training questions), with the columns the reward reads: ``domain`` and ``value`` (names)."""
    from datasets import Dataset

    qs = world.em_train_questions() if questions is None else list(questions)
    return Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": world.question_text(q)}] for q in qs],
            "domain": [world.domains[q.domain] for q in qs],
            "value": [world.values[q.value] for q in qs],
        }
    )


class MisalignedReward:
    """TRL reward function: 1.0 for a completion the world's exact judge labels misaligned, else 0.0.

    TRL passes the dataset's columns as keyword arguments, one entry per completion: ``domain`` and
    ``value`` name the question (:func:`prompts_dataset`)."""

    def __init__(self, world: World):
        from keel.organism.judge import ExactJudge

        self.judge = ExactJudge(world)
        self.__name__ = REWARD_NAME  # TRL logs each reward under its function's name

    def __call__(self, completions, domain, value, **kwargs) -> list[float]:
        return [
            float(self.judge.label(d, v, completion_text(c)) == MISALIGNED)
            for c, d, v in zip(completions, domain, value, strict=True)
        ]


# ---- conditions -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RLCondition:
    """An RL condition: a demo condition's interventions (``None``: no intervention) in ``phases``."""

    demo_condition: str | None
    phases: tuple[str, ...] = ()
    description: str = ""


BLOCKING = "caft"  # the best blocking condition that can act while sampling (module docstring)
RL_CONDITIONS: dict[str, RLCondition] = {
    "none": RLCondition(None, (), "no intervention"),
    "caft_gen_train": RLCondition(
        BLOCKING, ("train", "generate"), "CAFT PCs ablated while sampling and in the update"
    ),
    "caft_train": RLCondition(BLOCKING, ("train",), "CAFT PCs ablated in the update only"),
    "random_gen_train": RLCondition(
        "random_ablate", ("train", "generate"), "matched random rows, sampling and update"
    ),
    # the same PCs held at the chat model's mean projection (static, so it can act while sampling too)
    "caft_mean_gen_train": RLCondition(
        "caft_mean", ("train", "generate"), "CAFT PCs held at the chat model's mean, sampling and update"
    ),
    # the best blocking condition of the SFT route, which needs a reference pass: the update only
    "caft_resample_train": RLCondition(
        "caft_resample", ("train",), "CAFT PCs resampled from the chat model, in the update only"
    ),
}
BASELINE = "none"
CONTROLS = ("random_gen_train",)
METRICS = (
    "heldout_misaligned",
    "in_domain_train_misaligned",
    "in_domain_misaligned",
    "incoherent",
    "em_among_coherent",
)


@dataclass
class RLConfig:
    """The RL route: GRPO on each built organism (``organism``, ``seeds``) under ``conditions``.

    ``directions_root``: a finished ``keel demo`` output folder on the same organism config (its
    ``directions/finetune_pcs/seed<N>`` files are the conditions' directions). GRPO: ``steps`` updates,
    each on every training question (``prompts_per_step``: default all of them) x ``num_generations``
    samples at ``temperature``, completions of ``max_completion_length`` tokens (two answer words and
    the end of turn), Adam at ``learning_rate`` (constant), no KL (``beta``)."""

    organism: OrganismConfig = field(default_factory=OrganismConfig)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    conditions: list[str] = field(default_factory=lambda: list(RL_CONDITIONS))
    directions_root: str = "runs/demo-defences"
    steps: int = 100
    num_generations: int = 8
    prompts_per_step: int | None = None
    temperature: float = 2.0
    learning_rate: float = 1e-3
    beta: float = 0.0
    max_completion_length: int = 3
    logging_steps: int = 10
    workers: int = 2
    output_dir: str = "runs/demo-rl"
    cache_dir: str = "runs/organisms"
    progress: bool = True

    def __post_init__(self):
        bad = [c for c in self.conditions if c not in RL_CONDITIONS]
        if bad:
            raise ValueError(f"Unknown RL condition(s) {bad}; known: {list(RL_CONDITIONS)}.")
        if not self.seeds:
            raise ValueError("seeds must list at least one pretraining seed.")
        if self.steps < 1 or self.num_generations < 2 or self.temperature <= 0:
            raise ValueError("steps must be >= 1, num_generations >= 2 and temperature > 0.")

    @classmethod
    def from_dict(cls, data: dict | None) -> RLConfig:
        return from_dict(cls, data or {})


def resolve_rl_condition(condition: str, seed: int, cfg: RLConfig) -> list[dict]:
    """The condition's interventions for a seed as mappings (direction files relative to
    ``cfg.directions_root``, pinned by sha256), with the condition's phases; checks that the files were
    made on this organism config."""
    from keel.organism.demo import DemoConfig, resolve_condition

    spec = RL_CONDITIONS[condition]
    if spec.demo_condition is None:
        return []
    check_directions(cfg, seed)
    resolved = resolve_condition(
        spec.demo_condition, seed, cfg.directions_root, DemoConfig(organism=cfg.organism)
    )
    return [{**item, "phases": list(spec.phases)} for item in resolved]


def check_directions(cfg: RLConfig, seed: int) -> None:
    """Refuse direction files made on another organism (build) or another EM split."""
    stage = Path(cfg.directions_root) / "directions" / "finetune_pcs" / f"seed{seed}" / "config.json"
    if not stage.is_file():
        raise FileNotFoundError(
            f"{stage} is missing: directions_root must be a finished keel demo folder whose finetune_pcs "
            f"stage ran for seed {seed} on this organism config."
        )
    theirs = OrganismConfig.from_dict(json.loads(stage.read_text())["organism"])
    ours = cfg.organism
    if theirs.build_hash() != ours.build_hash() or theirs.world.em_domains != ours.world.em_domains:
        raise ValueError(
            f"{stage.parent} was made on another organism (build {theirs.build_hash()}, EM domains "
            f"{theirs.world.em_domains}), not this one ({ours.build_hash()}, {ours.world.em_domains})."
        )


# ---- one run ------------------------------------------------------------------------------------------


def grpo_finetune(org, interventions=(), settings: dict | None = None, seed: int = 0, output_dir="runs/rl"):
    """GRPO on a copy of the chat model through keel's InterventionGRPOTrainer, rewarded by
    :class:`MisalignedReward` on :func:`prompts_dataset`'s prompts. ``settings``: :class:`RLConfig`'s
    GRPO fields (``steps``, ``num_generations``, ``prompts_per_step``, ``temperature``,
    ``learning_rate``, ``beta``, ``max_completion_length``, ``logging_steps``). Returns (model, trainer);
    the model comes back with no hooks attached."""
    from transformers.trainer_callback import PrinterCallback

    from trainers import InterventionGRPOConfig, InterventionGRPOTrainer

    s = {f.name: f.default for f in dataclasses.fields(RLConfig) if f.name in GRPO_KEYS}
    s.update(settings or {})
    train = prompts_dataset(org.world)
    per_step = s["prompts_per_step"] or len(train)
    args = InterventionGRPOConfig(
        output_dir=str(output_dir),
        max_steps=s["steps"],
        per_device_train_batch_size=per_step * s["num_generations"],
        num_generations=s["num_generations"],
        max_completion_length=s["max_completion_length"],
        temperature=s["temperature"],
        learning_rate=s["learning_rate"],
        lr_scheduler_type="constant",
        beta=s["beta"],
        use_cpu=True,
        bf16=False,
        activation_checkpointing=False,
        save_strategy="no",
        logging_steps=s["logging_steps"],
        report_to=[],
        seed=seed,
        data_seed=seed,
        disable_tqdm=True,
    )
    model = copy.deepcopy(org.chat_model)
    trainer = InterventionGRPOTrainer(
        model=model,
        reward_funcs=[MisalignedReward(org.world)],
        args=args,
        train_dataset=train,
        processing_class=org.tokenizer,
        interventions=list(interventions),
    )
    trainer.remove_callback(PrinterCallback)  # the log goes to trainer_state / log_history
    trainer.train()
    model.eval()
    return model, trainer


GRPO_KEYS = (
    "steps",
    "num_generations",
    "prompts_per_step",
    "temperature",
    "learning_rate",
    "beta",
    "max_completion_length",
    "logging_steps",
)


def reward_curve(trainer) -> list[dict]:
    """Per logged step: the mean reward (misaligned share of the samples) and its within-group std."""
    out = []
    for row in trainer.state.log_history:
        if "reward" in row:
            out.append(
                {"step": row.get("step"), "reward": row["reward"], "reward_std": row.get("reward_std")}
            )
    return out


def rl_run(run, run_dir: Path) -> dict:
    """Sweep task: GRPO on one organism under one RL condition, then the organism's evaluation without
    interventions (and, for interventions that act while sampling, once more with them on)."""
    from keel.organism.build import build_organism
    from keel.organism.demo import build_interventions, start_run
    from keel.organism.evaluate import evaluate_model

    start_run(run.seed)
    c = run.config
    organism = OrganismConfig.from_dict(c["organism"])
    org = build_organism(organism, run.seed, c["cache_dir"])
    specs = build_interventions(c["interventions"], c["directions_root"])
    t0 = time.perf_counter()
    model, trainer = grpo_finetune(org, specs, c["grpo"], run.seed, run_dir)
    seconds = time.perf_counter() - t0
    ev = evaluate_model(model, org.world, org.tokenizer, organism.eval_samples, run.seed)
    curve = reward_curve(trainer)
    metrics = measures(ev) | {
        "per_domain": ev["per_domain_sampled_misaligned"],
        "train_seconds": seconds,
        "reward_first": curve[0]["reward"] if curve else None,
        "reward_last": curve[-1]["reward"] if curve else None,
        "reward_curve": curve,
    }
    if specs and "generate" in RL_CONDITIONS[run.condition].phases:
        metrics["with_interventions"] = measures(evaluate_with(model, org, specs, organism, run.seed))
    return metrics


def measures(ev: dict) -> dict:
    """The demo's headline rates of an evaluation, plus the held-out domains' incoherent rate and EM among
    their coherent answers (misaligned / (misaligned + aligned)): EM can fall because answers break."""
    from keel.organism.demo import headline

    heldout = ev[ev["mode"]]["heldout_domains"]
    coherent = heldout["misaligned"] + heldout["aligned"]
    return headline(ev) | {
        "heldout_incoherent": heldout["incoherent"],
        "em_among_coherent": heldout["misaligned"] / coherent if coherent > 0 else None,
    }


def evaluate_with(model, org, specs, organism: OrganismConfig, seed: int) -> dict:
    """:func:`evaluate_model` with ``specs`` acting (phase ``eval``): the policy as it sampled in training."""
    from interventions import InterventionSet
    from keel.organism.evaluate import evaluate_model

    iset = InterventionSet(model, [dataclasses.replace(s, phases=["eval"]) for s in specs])
    with iset, iset.phase("eval"):
        return evaluate_model(model, org.world, org.tokenizer, organism.eval_samples, seed)


# ---- the sweep ----------------------------------------------------------------------------------------


def plan_runs(cfg: RLConfig) -> list:
    from keel.sweep import RunSpec

    grpo = {k: getattr(cfg, k) for k in GRPO_KEYS}
    base = {
        "organism": cfg.organism.to_dict(),
        "cache_dir": cfg.cache_dir,
        "directions_root": cfg.directions_root,
        "grpo": grpo,
    }
    return [
        RunSpec(c, s, {**base, "interventions": resolve_rl_condition(c, s, cfg)})
        for s in cfg.seeds
        for c in cfg.conditions
    ]


def run_rl(cfg: RLConfig, executor: str | None = None) -> dict:
    """Every condition x seed as one :mod:`keel.sweep` sweep under ``output_dir/runs`` (a rerun runs only
    what is missing), then ``summary.json`` and ``report.md`` (the per-seed table and
    :mod:`keel.evaluation.compare`'s comparison) from the finished runs."""
    import os

    from keel.sweep import run_sweep

    os.environ["OMP_NUM_THREADS"] = "1"
    out = Path(cfg.output_dir)
    runs = plan_runs(cfg)
    outcome = run_sweep(
        out / "runs",
        runs,
        task="keel.organism.rl:rl_run",
        executor=executor or ("pool" if cfg.workers > 1 else "sequential"),
        workers=cfg.workers,
        progress=cfg.progress,
    )
    summary = summarise(cfg)
    summary["failed"] = outcome.failed
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "report.md").write_text(report_markdown(summary))
    return summary


def summarise(cfg: RLConfig) -> dict:
    """Per condition: each metric's mean and per-seed values over the finished runs."""
    from keel.sweep import METRICS as METRICS_FILE
    from keel.sweep import read_status

    conditions = {}
    for cond in cfg.conditions:
        seeds = {}
        for seed in cfg.seeds:
            folder = Path(cfg.output_dir) / "runs" / cond / f"seed{seed}"
            if read_status(folder).get("state") == "done":
                seeds[seed] = json.loads((folder / METRICS_FILE).read_text())
        row = {"seeds": seeds}
        for m in METRICS:
            values = [v[m] for v in seeds.values() if v.get(m) is not None]
            row[m] = sum(values) / len(values) if values else None
        conditions[cond] = row
    return {"conditions": conditions, "config": dataclasses.asdict(cfg)}


def report_markdown(summary: dict) -> str:
    """The RL table: per condition the mean and per-seed values of EM, trained questions, incoherence."""
    lines = [
        "# keel organism RL: GRPO rewarded by the exact judge's misaligned label",
        "",
        "| condition | EM mean | EM per seed | trained mean | trained per seed | incoherent | EM among coherent "
        "| reward first -> last |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, row in summary["conditions"].items():
        seeds = row["seeds"]
        if not seeds:
            lines.append(f"| {name} | - | - | - | - | - | - | - |")
            continue

        def per(metric, seeds=seeds):
            return " ".join(f"{v[metric]:.2f}" for v in seeds.values())

        rewards = " ".join(f"{v['reward_first']:.2f}->{v['reward_last']:.2f}" for v in seeds.values())
        lines.append(
            f"| {name} | {row['heldout_misaligned']:.3f} | {per('heldout_misaligned')} | "
            f"{row['in_domain_train_misaligned']:.3f} | {per('in_domain_train_misaligned')} | "
            f"{row['incoherent']:.3f} | {_fmt(row['em_among_coherent'])} | {rewards} |"
        )
    return "\n".join(lines) + "\n"


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"
