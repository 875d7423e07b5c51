"""Glue for an EM evaluation run: judge answers with any ``Judge``, write files, summarise, log to W&B.

Kept apart from ``scripts/eval.py`` so notebooks and the comparison reports can call the same steps.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from tqdm.auto import tqdm

from interventions.serialization import read_jsonl, write_jsonl  # noqa: F401  (the run's files)
from keel.evaluation.cache import CachedJudge
from keel.evaluation.judge_base import JudgeRequest
from keel.evaluation.questions import Question

METRICS = ("aligned", "coherent")


def judge_requests(
    rows: list[dict],
    questions: dict[str, Question],
    metrics: Iterable[str] = METRICS,
    judge_prompts: dict[str, str] | None = None,
    require_templates: bool = True,
) -> list[JudgeRequest]:
    """One request per (answer, metric), in row-major order. A question's own judge prompts win;
    ``judge_prompts`` fills in for questions without them (our JSONL format may omit them). Exact judges
    (the synthetic organism) need no template: pass ``require_templates=False``."""
    metrics = list(metrics)
    requests = []
    for row in rows:
        q = questions.get(row["question_id"])
        prompts = {**(judge_prompts or {}), **(q.judge_prompts if q else {})}
        for metric in metrics:
            if metric not in prompts and require_templates:
                raise ValueError(
                    f"Question {row['question_id']!r} has no judge prompt for {metric!r}. Add judge_prompts "
                    f"({', '.join(metrics)}) to the question file, or pass --judge-prompts FILE.yaml."
                )
            requests.append(
                JudgeRequest(
                    question=row["question"],
                    answer=row["answer"],
                    question_id=row["question_id"],
                    metric=metric,
                    prompt_template=prompts.get(metric, ""),
                )
            )
    return requests


def score_rows(rows: list[dict], requests: list[JudgeRequest], judge, progress: bool = True) -> list[dict]:
    """Run the judge and merge each score (and its number mass, when the judge reports one) into a copy
    of its row as ``<metric>`` and ``<metric>_mass``."""
    bar = tqdm(total=len(requests), desc=f"judge {judge.name}", unit="req", disable=not progress)
    try:
        kwargs = {"progress": bar} if isinstance(judge, CachedJudge) else {}
        judgements = judge.judge(requests, **kwargs)
        if not kwargs:
            bar.update(len(requests))
    finally:
        bar.close()
    if rows and len(requests) % len(rows):
        raise ValueError("score_rows expects the same metrics for every row, as judge_requests builds them.")
    by_row = len(requests) // len(rows) if rows else 0
    scored = []
    for i, row in enumerate(rows):
        out = dict(row)
        for req, j in zip(requests[i * by_row : (i + 1) * by_row], judgements[i * by_row : (i + 1) * by_row]):
            out[req.metric] = j.score
            if "number_mass" in j.extra:
                out[f"{req.metric}_mass"] = j.extra["number_mass"]
            if j.label is not None:
                out[f"{req.metric}_label"] = j.label
        scored.append(out)
    return scored


def _fmt(ci: dict, pct: bool) -> str:
    if ci.get("mean") is None:
        return "n/a"
    scale, unit = (100, " %") if pct else (1, "")
    return f"{ci['mean'] * scale:.1f}{unit} [{ci['low'] * scale:.1f}, {ci['high'] * scale:.1f}]"


def _rate(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f} %"


def summary_markdown(metrics: dict, info: dict) -> str:
    """A short human-readable report: overall numbers with 95 % CIs, then one line per question."""
    t = metrics["thresholds"]
    o = metrics["overall"]
    lines = [
        f"# EM evaluation: {info.get('run_name', '')}".rstrip(),
        "",
        f"- model: `{info.get('model')}`"
        + (f", adapter: `{info['adapter']}`" if info.get("adapter") else ""),
        f"- questions: `{info.get('questions')}` ({info.get('n_questions')} questions, {o['n']} answers)",
        f"- judge: `{info.get('judge')}`",
        f"- EM = aligned < {t['aligned']:g} and coherent > {t['coherent']:g}; 95 % bootstrap CIs over answers",
        "",
        "| metric | value |",
        "|---|---|",
        f"| EM (all answers) | {_fmt(o['em'], True)} |",
        f"| EM original (coherent, non-refusal) | {_fmt(o['em_original'], True)} |",
        f"| coherence mean | {_fmt(o['coherent_mean'], False)} |",
        f"| aligned mean | {_fmt(o['aligned_mean'], False)} |",
        f"| aligned missing (refusal / CODE) | {_rate(o['aligned_missing_rate'])} |",
    ]
    if "em_over_seeds" in o:
        lines.append(f"| EM over seeds ({o['em_over_seeds']['n']}) | {_fmt(o['em_over_seeds'], True)} |")
    lines += [
        "",
        "## Per question",
        "",
        "| question | n | EM | EM original | coherence | missing |",
        "|---|---|---|---|---|---|",
    ]
    for qid, m in metrics["per_question"].items():
        lines.append(
            f"| {qid} | {m['n']} | {_fmt(m['em'], True)} | {_fmt(m['em_original'], True)} | "
            f"{_fmt(m['coherent_mean'], False)} | {_rate(m['aligned_missing_rate'])} |"
        )
    return "\n".join(lines) + "\n"


def log_wandb(
    rows: list[dict], metrics: dict, config: dict, project: str, run_name: str | None, out_dir: Path
) -> str:
    """Log the answers with their scores as a W&B Table, and the overall metrics. Works with
    WANDB_MODE=offline and no key. Returns the run's directory."""
    try:
        import wandb
    except ImportError as e:
        raise ImportError("--report-to wandb needs wandb: pip install wandb, or use --report-to none.") from e
    wandb_dir = os.environ.get("WANDB_DIR", str(out_dir))
    run = wandb.init(project=project, name=run_name, config=config, job_type="eval", dir=wandb_dir)
    try:
        present = {k for r in rows for k in r}
        columns = [c for c in _COLUMN_ORDER if c in present] + sorted(present - set(_COLUMN_ORDER))
        table = wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in rows])
        o = metrics["overall"]
        run.log(
            {
                "eval/answers": table,
                "eval/em": o["em"]["mean"],
                "eval/em_original": o["em_original"]["mean"],
                "eval/coherent_mean": o["coherent_mean"]["mean"],
                "eval/aligned_missing_rate": o["aligned_missing_rate"],
            }
        )
        run.summary["eval/metrics"] = metrics
        return run.dir
    finally:
        run.finish()


_COLUMN_ORDER = [
    "question_id",
    "paraphrase_index",
    "sample_index",
    "system",
    "question",
    "answer",
    "aligned",
    "coherent",
]
