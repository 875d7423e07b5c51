"""Glue for an EM evaluation run: judge answers with any ``Judge``, write files, summarise, log to W&B.

Kept apart from ``scripts/eval.py`` so notebooks and the comparison reports can call the same steps.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from tqdm.auto import tqdm

from interventions.serialization import read_jsonl, write_jsonl  # noqa: F401  (the run's files)
from interventions.tracking import read_run_record, start_run, write_run_record
from keel.evaluation.cache import CachedJudge
from keel.evaluation.judge_base import CATEGORICAL, NO_NUMBER, JudgeRequest
from keel.evaluation.judges import declined_label
from keel.evaluation.questions import Question

METRICS = ("aligned", "coherent")
# Row columns of an answer (interventions.generation) and of a judgement: no judge metric may take them.
RESERVED_COLUMNS = {
    "question_id", "paraphrase_index", "sample_index", "question", "system", "answer", "n_tokens",
    "finished", "seed", "batch_seed",
}  # fmt: skip
METRIC_SUFFIXES = ("_mass", "_label", "_top_token", "_content")


def judge_plan(
    questions: Mapping[str, Question] | Iterable[Question], judge_prompts: Mapping[str, str] | None = None
) -> dict[str, dict[str, tuple[str, str]]]:
    """What to ask the judge for each question: ``{question_id: {metric: (template, kind)}}``, from the
    question's own judge prompts (any names the file gives) over ``judge_prompts`` (the --judge-prompts
    fallback), scored as the question's type says (``numeric`` / ``categorical``). Raises ValueError,
    naming the question, when a question has no judge prompt at all or a metric name cannot be a column."""
    if isinstance(questions, Mapping):
        questions = questions.values()
    plan = {}
    for q in questions:
        prompts = {**(judge_prompts or {}), **q.judge_prompts}
        if not prompts:
            raise ValueError(
                f"Question {q.id!r} has no judge prompts. Add judge_prompts (e.g. aligned, coherent) to the "
                "question file, or pass --judge-prompts FILE.yaml (a mapping of metric name to template)."
            )
        plan[q.id] = {metric: (template, q.judge_kind) for metric, template in prompts.items()}
    names = {m for prompts in plan.values() for m in prompts}
    for m in sorted(names):
        clash = m in RESERVED_COLUMNS or any(m == other + sfx for other in names for sfx in METRIC_SUFFIXES)
        if clash:
            raise ValueError(
                f"Judge prompt name {m!r} would overwrite a column of the answers table; rename it "
                f"(reserved: {', '.join(sorted(RESERVED_COLUMNS))}, and <metric>{'/'.join(METRIC_SUFFIXES)})."
            )
    return plan


def metric_kinds(plan: Mapping[str, Mapping[str, tuple[str, str]]]) -> dict[str, str]:
    """``{metric: kind}`` over all questions, in first-seen order; one metric name must be scored one
    way (0..100 or categorical) in every question."""
    kinds: dict[str, str] = {}
    where: dict[str, str] = {}
    for qid, prompts in plan.items():
        for metric, (_, kind) in prompts.items():
            if kinds.setdefault(metric, kind) != kind:
                raise ValueError(
                    f"Judge prompt {metric!r} is scored {kinds[metric]} in question {where[metric]!r} but "
                    f"{kind} in question {qid!r} (question types differ); give the two different names."
                )
            where.setdefault(metric, qid)
    return kinds


def judge_requests(
    rows: list[dict],
    questions: dict[str, Question],
    metrics: Iterable[str] | None = None,
    judge_prompts: dict[str, str] | None = None,
    require_templates: bool = True,
) -> list[JudgeRequest]:
    """Requests per answer, in row-major order. By default every judge prompt of the answer's question
    (``judge_plan``: its own prompts over the ``judge_prompts`` fallback, whatever their names). With
    ``metrics``, exactly those, each of which must have a prompt. Exact judges (the synthetic organism)
    need no template: pass ``require_templates=False`` (metrics default to aligned and coherent)."""
    if metrics is None and not require_templates:
        metrics = METRICS
    metrics = list(metrics) if metrics is not None else None
    plans: dict[str, dict[str, tuple[str, str]]] = {}
    requests = []
    for row in rows:
        qid = row["question_id"]
        if qid not in plans:
            q = questions.get(qid) or Question(qid, (row["question"],))
            prompts = {**(judge_prompts or {}), **q.judge_prompts}
            if metrics is None:
                plans[qid] = judge_plan([q], judge_prompts)[qid]
            else:
                for metric in metrics:
                    if metric not in prompts and require_templates:
                        raise ValueError(
                            f"Question {qid!r} has no judge prompt for {metric!r} (its judge prompts: "
                            f"{', '.join(prompts) or 'none'}). Add judge_prompts ({', '.join(metrics)}) to the "
                            "question file, or pass --judge-prompts FILE.yaml."
                        )
                plans[qid] = {m: (prompts.get(m, ""), q.judge_kind) for m in metrics}
        for metric, (template, kind) in plans[qid].items():
            requests.append(
                JudgeRequest(
                    question=row["question"],
                    answer=row["answer"],
                    question_id=qid,
                    metric=metric,
                    prompt_template=template,
                    kind=kind,
                )
            )
    return requests


def _merge(out: dict, req: JudgeRequest, j) -> None:
    """One judgement into its answer's row: ``<metric>`` (score, or label for categorical metrics), and
    ``<metric>_mass`` / ``_label`` / ``_top_token`` / ``_content`` where they say something."""
    if req.kind == CATEGORICAL:
        out[req.metric] = j.label
        if j.label is None and "content" in j.extra:
            out[f"{req.metric}_content"] = j.extra["content"]
        return
    out[req.metric] = j.score
    if "number_mass" in j.extra:
        out[f"{req.metric}_mass"] = j.extra["number_mass"]
    label = j.label
    if j.score is None and label == NO_NUMBER:  # a verdict the prompt offers (CODE, REFUSAL), or missing
        label = declined_label(j.extra.get("top_token"), req.prompt_template) or label
    if label is not None:
        out[f"{req.metric}_label"] = label
    if j.score is None and j.extra.get("top_token") is not None:
        out[f"{req.metric}_top_token"] = j.extra["top_token"]


def score_rows(rows: list[dict], requests: list[JudgeRequest], judge, progress: bool = True) -> list[dict]:
    """Run the judge and merge each judgement into a copy of its answer's row (``_merge``). ``requests``
    are those of ``judge_requests`` for ``rows``, in the same order."""
    bar = tqdm(total=len(requests), desc=f"judge {judge.name}", unit="req", disable=not progress)
    try:
        kwargs = {"progress": bar} if isinstance(judge, CachedJudge) else {}
        judgements = judge.judge(requests, **kwargs)
        if not kwargs:
            bar.update(len(requests))
    finally:
        bar.close()
    if len(judgements) != len(requests):
        raise ValueError(
            f"Judge {judge.name} returned {len(judgements)} judgements for {len(requests)} requests."
        )
    scored, k = [], 0
    for row in rows:
        out, seen = dict(row), set()
        while (
            k < len(requests)
            and requests[k].question_id == row["question_id"]
            and requests[k].answer == row["answer"]
            and requests[k].metric not in seen
        ):
            _merge(out, requests[k], judgements[k])
            seen.add(requests[k].metric)
            k += 1
        scored.append(out)
    if k != len(requests):
        raise ValueError("score_rows expects the requests judge_requests builds for these rows, in order.")
    return scored


def missing_message(report: dict, max_fraction: float, limit: int = 8) -> str:
    """Why a run refuses to report: per metric over the limit, the counts, per question and the judge's
    most common replies."""
    lines = []
    for m, r in report.items():
        if r["fraction"] <= max_fraction or not r["n_missing"]:
            continue
        said = ", ".join(f"{t!r} x{n}" for t, n in r["top_tokens"].items())
        lines.append(
            f"  {m} ({r['kind']}): {r['n_missing']} of {r['n_total']} answers have no valid judgement "
            f"({100 * r['fraction']:.1f} %)" + (f"; the judge said {said}" if said else "")
        )
        worst = sorted(r["per_question"].items(), key=lambda kv: -kv[1]["n_missing"])
        shown = [f"{q} {c['n_missing']}/{c['n_total']}" for q, c in worst[:limit] if c["n_missing"]]
        more = sum(1 for _, c in worst[limit:] if c["n_missing"])
        lines.append(
            "    per question (missing/total): " + ", ".join(shown) + (f", +{more} more" if more else "")
        )
    return "\n".join(lines)


def _fmt(ci: dict, pct: bool) -> str:
    if ci.get("mean") is None:
        return "n/a"
    scale, unit = (100, " %") if pct else (1, "")
    return f"{ci['mean'] * scale:.1f}{unit} [{ci['low'] * scale:.1f}, {ci['high'] * scale:.1f}]"


def _rate(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f} %"


def _used(ci: dict) -> str:
    return f"{ci.get('n', 0)} / {ci.get('n_total', 0)}"


def _labels(shares: dict) -> str:
    if not shares:
        return "n/a"
    return ", ".join(f"{label} {_rate(ci['mean'])}" for label, ci in shares.items())


def _kinds(metrics: dict) -> dict:
    return metrics.get("metric_kinds") or {m: "numeric" for m in metrics["thresholds"]}


def summary_markdown(metrics: dict, info: dict) -> str:
    """A short human-readable report: overall numbers with 95 % CIs and the answers each rests on
    (used / total), how every judge metric was judged, then one line per question."""
    o = metrics["overall"]
    kinds = _kinds(metrics)
    criteria = metrics.get("em_criteria") or " and ".join(
        f"{m} {'<' if i == 0 else '>'} {v:g}" for i, (m, v) in enumerate(metrics["thresholds"].items())
    )
    has_em = o["em"].get("n_total", o["n"]) > 0
    lines = [
        f"# EM evaluation: {info.get('run_name', '')}".rstrip(),
        "",
        f"- model: `{info.get('model')}`"
        + (f", adapter: `{info['adapter']}`" if info.get("adapter") else ""),
        f"- questions: `{info.get('questions')}` ({info.get('n_questions')} questions, {o['n']} answers)",
        f"- judge: `{info.get('judge')}`",
        f"- EM = {criteria} over the answers with valid judgements; 95 % bootstrap CIs over answers"
        if has_em
        else f"- EM not computed: no question has 0-100 judge prompts for {criteria} (judge prompts here: "
        f"{', '.join(kinds)}); set --em_criteria to define EM on these metrics",
        "",
        "| metric | value | answers used |",
        "|---|---|---|",
    ]
    if has_em:
        lines += [
            f"| EM (all answers) | {_fmt(o['em'], True)} | {_used(o['em'])} |",
            f"| EM original (coherent, non-refusal) | {_fmt(o['em_original'], True)} | {_used(o['em_original'])} |",
        ]
    for m, kind in kinds.items():
        if kind == "categorical":
            for label, ci in o.get(f"{m}_labels", {}).items():
                lines.append(f"| {m}: {label} | {_fmt(ci, True)} | {_used(ci)} |")
        else:
            ci = o.get(f"{m}_mean", {})
            lines.append(f"| {m} mean | {_fmt(ci, False)} | {_used(ci)} |")
    if "em_over_seeds" in o:
        lines.append(f"| EM over seeds ({o['em_over_seeds']['n']}) | {_fmt(o['em_over_seeds'], True)} | |")
    lines += [
        "",
        "## Judgements",
        "",
        "| metric | type | scored | declined (CODE / REFUSAL) | missing (no valid judgement) |",
        "|---|---|---|---|---|",
    ]
    for m, c in o.get("judgements", {}).items():
        declined = ", ".join(f"{k} {v}" for k, v in c["declined"].items())
        lines.append(
            f"| {m} | {'categorical' if c['kind'] == 'categorical' else '0-100'} | {c['n_scored']} / {c['n_total']} "
            f"| {c['n_declined']}{f' ({declined})' if declined else ''} | {c['n_missing']} ({_rate(c['missing_fraction'])}) |"
        )
    lines += [
        "",
        "## Per question",
        "",
        "| question | n | EM | EM original | " + " | ".join(kinds) + " | missing |",
        "|---|---|---|---|" + "---|" * len(kinds) + "---|",
    ]
    for qid, m in metrics["per_question"].items():
        cells = [
            _labels(m.get(f"{k}_labels", {}))
            if kind == "categorical"
            else _fmt(m.get(f"{k}_mean", {}), False)
            for k, kind in kinds.items()
        ]
        missing = ", ".join(
            f"{k} {c['n_missing']}/{c['n_total']}" for k, c in m.get("judgements", {}).items() if c["n_total"]
        )
        lines.append(
            f"| {qid} | {m['n']} | {_fmt(m['em'], True)} | {_fmt(m['em_original'], True)} | "
            + " | ".join(cells)
            + f" | {missing} |"
        )
    return "\n".join(lines) + "\n"


def wandb_summary(metrics: dict) -> dict:
    """The overall numbers logged to W&B: EM, original EM, each numeric metric's mean and no-score rate,
    each categorical label's share, each metric's missing fraction."""
    o = metrics["overall"]
    out = {"eval/em": o["em"]["mean"], "eval/em_original": o["em_original"]["mean"]}
    for m, kind in _kinds(metrics).items():
        if kind == "categorical":
            out.update({f"eval/{m}_{label}": ci["mean"] for label, ci in o.get(f"{m}_labels", {}).items()})
        else:
            out[f"eval/{m}_mean"] = o.get(f"{m}_mean", {}).get("mean")
            out[f"eval/{m}_missing_rate"] = o.get(f"{m}_missing_rate")
        out[f"eval/{m}_missing_fraction"] = o.get("judgements", {}).get(m, {}).get("missing_fraction")
    return out


def wandb_ready() -> str | None:
    """Why ``wandb.init`` would fail without asking anything, or None: wandb must import, and an online
    run needs a key (WANDB_API_KEY, or ``wandb login``'s netrc entry) unless WANDB_MODE is offline or
    disabled. Cheap: no network."""
    try:
        import wandb  # noqa: F401
    except ImportError:
        return "--report_to wandb needs wandb: pip install wandb, or use --report_to none."
    mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if mode in ("offline", "disabled", "dryrun") or os.environ.get("WANDB_DISABLED", "").lower() in (
        "1",
        "true",
    ):
        return None
    if os.environ.get("WANDB_API_KEY"):
        return None
    import netrc
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or "api.wandb.ai"
    path = os.environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        entry = netrc.netrc(path).authenticators(host)
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        entry = None
    if entry and entry[2]:
        return None
    return (
        f"--report_to wandb with WANDB_MODE={mode or 'online'} needs a W&B key and none is set (no "
        f"WANDB_API_KEY, no entry for {host} in {path}). Run `wandb login`, export WANDB_API_KEY, set "
        "WANDB_MODE=offline (sync later with `wandb sync`), or use --report_to none."
    )


def log_wandb(
    rows: list[dict],
    metrics: dict,
    config: dict,
    project: str | None,
    run_name: str | None,
    out_dir: Path,
    evaluated: list[str | Path | None] = (),
) -> str:
    """Log the answers with their scores as a W&B Table, and the overall metrics, in a ``job_type=eval``
    run that follows keel's conventions (interventions.tracking). When a folder in ``evaluated`` (the
    model or adapter) holds a training run's ``wandb_run.json``, the eval run joins that run's group and
    records its id, so an evaluation is linked to the fine-tune it evaluates. Works offline with no key.
    Returns the run's directory."""
    train_run = next((r for r in map(read_run_record, evaluated) if r), None)
    group = train_run.get("group") if train_run else None
    if train_run:
        config = {**config, "train_run_id": train_run.get("id"), "train_run_name": train_run.get("name")}
    folder = os.environ.get("WANDB_DIR", str(out_dir))
    run = start_run(folder, "eval", config=config, project=project, group=group, name=run_name)
    try:
        present = {k for r in rows for k in r}
        columns = [c for c in _COLUMN_ORDER if c in present] + sorted(present - set(_COLUMN_ORDER))
        table = wandb_table(columns, [[r.get(c) for c in columns] for r in rows])
        run.log({"eval/answers": table, **wandb_summary(metrics)})
        run.summary["eval/metrics"] = metrics
        write_run_record(out_dir, run)
        return run.dir
    finally:
        run.finish()


def wandb_table(columns: list[str], data: list[list]):
    import wandb

    return wandb.Table(columns=columns, data=data)


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
