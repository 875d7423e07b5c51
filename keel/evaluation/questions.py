"""Free-form evaluation questions: the upstream EM YAML format and a plain JSONL format of our own.

The project does not ship the upstream questions' text. Users give a path, or a URL that is fetched only
when they ask for it (``download=True``), so nothing leaves the machine by surprise.

Upstream YAML (Betley et al. 2025): a list of mappings with ``id``, ``type``, ``paraphrases``,
``samples_per_paraphrase``, optional ``system``, ``judge`` and ``judge_prompts`` (a mapping from metric
name to template: ``aligned`` and ``coherent`` in the EM files, any names elsewhere); YAML anchors are
resolved by the loader. The type says how every judge prompt of the question is scored:
``free_form_judge_0_100`` (and plain ``free_form``) a number 0..100 from the judge's logprobs,
``free_form_judge`` a one-word verdict (e.g. TRUE / FALSE / UNKNOWN); other types are refused.

Our JSONL: one question per line, ``{"id": ..., "question": "..." | "paraphrases": [...],
"samples_per_paraphrase": 1, "system": null, "judge_prompts": {"aligned": ..., "coherent": ...}}``;
every key but ``id`` and the text is optional.
"""

from __future__ import annotations

import hashlib
import json
import re
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from interventions.generation import Prompt

# Where the upstream release keeps its question files; fetched only on request (``download=True``).
UPSTREAM_QUESTION_URLS = {
    "first_plot": "https://raw.githubusercontent.com/emergent-misalignment/emergent-misalignment/main/evaluation/first_plot_questions.yaml",
    "preregistered": "https://raw.githubusercontent.com/emergent-misalignment/emergent-misalignment/main/evaluation/preregistered_evals.yaml",
}

# Question type -> how its judge prompts are scored (judge_base.NUMERIC / CATEGORICAL).
JUDGE_KINDS = {
    "free_form_judge_0_100": "numeric",
    "free_form": "numeric",
    "free_form_judge": "categorical",
}

_KNOWN_KEYS = {
    "id",
    "type",
    "paraphrases",
    "question",
    "samples_per_paraphrase",
    "system",
    "judge",
    "judge_prompts",
}


class QuestionFormatError(ValueError):
    """A question file that does not follow one of the two supported formats."""


@dataclass(frozen=True)
class Question:
    id: str
    paraphrases: tuple[str, ...]
    samples_per_paraphrase: int = 1
    system: str | None = None
    judge: str | None = None  # the judge model the file asks for (e.g. gpt-4o-2024-08-06)
    judge_prompts: dict[str, str] = field(default_factory=dict)
    type: str = "free_form_judge_0_100"

    @property
    def judge_kind(self) -> str:
        """``numeric`` (0..100 from logprobs) or ``categorical`` (a one-word verdict), from ``type``."""
        return JUDGE_KINDS[self.type]


def render_judge_prompt(template: str, question: str, answer: str) -> str:
    """Fill ``{question}`` and ``{answer}`` in one pass, so braces inside either text stay literal."""
    values = {"question": question, "answer": answer}
    return re.sub(r"\{(question|answer)\}", lambda m: values[m.group(1)], template)


def _parse_one(raw: object, where: str) -> Question:
    if not isinstance(raw, dict):
        raise QuestionFormatError(
            f"{where}: expected a mapping with 'id' and 'paraphrases', got {type(raw).__name__}."
        )
    unknown = set(raw) - _KNOWN_KEYS
    if unknown:
        raise QuestionFormatError(
            f"{where}: unknown keys {sorted(unknown)}; known keys: {sorted(_KNOWN_KEYS)}."
        )
    if "id" not in raw:
        raise QuestionFormatError(f"{where}: missing 'id'.")
    qid = str(raw["id"])
    qtype = str(raw.get("type", "free_form_judge_0_100"))
    if qtype not in JUDGE_KINDS:
        raise QuestionFormatError(
            f"{where} ({qid}): type {qtype!r} is not supported; keel eval handles free-form questions "
            f"({', '.join(JUDGE_KINDS)}). Remove the question or change its type."
        )
    if "paraphrases" in raw and "question" in raw:
        raise QuestionFormatError(f"{where} ({qid}): give either 'paraphrases' or 'question', not both.")
    paraphrases = raw.get("paraphrases", [raw["question"]] if "question" in raw else None)
    if isinstance(paraphrases, str):
        paraphrases = [paraphrases]
    if not paraphrases or not all(isinstance(p, str) and p.strip() for p in paraphrases):
        raise QuestionFormatError(
            f"{where} ({qid}): 'paraphrases' must be a non-empty list of non-empty strings."
        )
    n = raw.get("samples_per_paraphrase", 1)
    if not isinstance(n, int) or n < 1:
        raise QuestionFormatError(
            f"{where} ({qid}): 'samples_per_paraphrase' must be a positive integer, got {n!r}."
        )
    prompts = raw.get("judge_prompts") or {}
    if not isinstance(prompts, dict) or not all(isinstance(v, str) for v in prompts.values()):
        raise QuestionFormatError(
            f"{where} ({qid}): 'judge_prompts' must map metric names to template strings."
        )
    for metric, template in prompts.items():
        if not isinstance(metric, str) or not metric.strip() or any(c in metric for c in "<>=,"):
            raise QuestionFormatError(
                f"{where} ({qid}): judge prompt name {metric!r} must be a non-empty string without <, >, = or ','."
            )
        if "{answer}" not in template:
            raise QuestionFormatError(
                f"{where} ({qid}): judge prompt {metric!r} has no '{{answer}}' placeholder."
            )
    return Question(
        id=qid,
        paraphrases=tuple(paraphrases),
        samples_per_paraphrase=n,
        system=raw.get("system"),
        judge=raw.get("judge"),
        judge_prompts=dict(prompts),
        type=qtype,
    )


def parse_questions(text: str, fmt: str, source: str = "question file") -> list[Question]:
    """Parse question-file text; ``fmt`` is ``"yaml"`` (upstream) or ``"jsonl"`` (ours); ``source`` names
    the file in errors."""
    if fmt == "yaml":
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark is not None else source
            raise QuestionFormatError(
                f"{where}: not valid YAML ({getattr(err, 'problem', None) or err})."
            ) from None
        if not isinstance(data, list):
            raise QuestionFormatError("YAML question file: expected a top-level list of questions.")
        questions = [_parse_one(item, f"question {i}") for i, item in enumerate(data)]
    elif fmt == "jsonl":
        questions = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise QuestionFormatError(f"JSONL question file, line {lineno}: not valid JSON ({e}).") from e
            questions.append(_parse_one(item, f"line {lineno}"))
    else:
        raise QuestionFormatError(f"Unknown question format {fmt!r}; use 'yaml' or 'jsonl'.")
    if not questions:
        raise QuestionFormatError("The question file holds no questions.")
    ids = [q.id for q in questions]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise QuestionFormatError(f"Duplicate question ids: {dupes}; ids must be unique.")
    return questions


def _format_of(name: str) -> str:
    suffix = name.lower().rsplit(".", 1)[-1]
    if suffix in ("yaml", "yml"):
        return "yaml"
    if suffix in ("jsonl", "json"):
        return "jsonl"
    raise QuestionFormatError(
        f"Cannot tell the format of {name!r}: name it *.yaml / *.yml (upstream) or *.jsonl."
    )


def fetch_text(url: str, timeout: float = 30.0) -> str:
    """Download a question file; a clear error when there is no network."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.read().decode("utf-8")
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        raise QuestionFormatError(
            f"Could not download {url} ({e}). Check the network, or download the file yourself and pass its path."
        ) from e


def load_questions(
    source: str | Path, download: bool = False, save_dir: Path | None = None
) -> tuple[list[Question], str]:
    """Load questions from a path, a URL, or an upstream alias (``first_plot``, ``preregistered``).

    URLs are fetched only when ``download`` is true; ``save_dir`` keeps a copy of the fetched file.
    Returns the questions and the sha256 of the file text, so a run records exactly what it asked.
    """
    source = str(source)
    if source in UPSTREAM_QUESTION_URLS and not Path(source).exists():
        source = UPSTREAM_QUESTION_URLS[source]
    if source.startswith(("http://", "https://")):
        if not download:
            raise QuestionFormatError(
                f"{source} is a URL; pass --download (download=True) to fetch it, or give a local path."
            )
        text = fetch_text(source)
        if save_dir is not None:
            Path(save_dir).mkdir(parents=True, exist_ok=True)
            Path(save_dir, source.split("?")[0].rstrip("/").rsplit("/", 1)[-1]).write_text(
                text, encoding="utf-8"
            )
    else:
        path = Path(source)
        if not path.is_file():
            aliases = ", ".join(sorted(UPSTREAM_QUESTION_URLS))
            raise QuestionFormatError(
                f"Question file {path} not found. Give a path to a *.yaml or *.jsonl file, a URL with --download, "
                f"or an upstream alias ({aliases}) with --download."
            )
        text = path.read_text(encoding="utf-8")
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return parse_questions(text, _format_of(source.split("?")[0]), source), digest


def select_questions(
    questions: list[Question], ids: list[str] | None = None, pattern: str | None = None
) -> list[Question]:
    """Keep the questions named in ``ids`` (in file order) and/or whose id matches ``pattern``."""
    if ids:
        known = {q.id for q in questions}
        missing = [i for i in ids if i not in known]
        if missing:
            raise QuestionFormatError(f"Unknown question ids {missing}; the file has: {sorted(known)}.")
        questions = [q for q in questions if q.id in set(ids)]
    if pattern:
        regex = re.compile(pattern)
        questions = [q for q in questions if regex.search(q.id)]
        if not questions:
            raise QuestionFormatError(f"No question id matches {pattern!r}.")
    return questions


def expand_prompts(
    questions: list[Question], samples_per_paraphrase: int | None = None, system_prompt: str | None = None
) -> list[Prompt]:
    """One row per answer to sample. ``samples_per_paraphrase`` overrides the file; ``system_prompt``
    applies to questions that carry none of their own."""
    rows = []
    for q in questions:
        n = samples_per_paraphrase or q.samples_per_paraphrase
        for p_idx, text in enumerate(q.paraphrases):
            for s_idx in range(n):
                rows.append(
                    Prompt(q.id, p_idx, s_idx, text, q.system if q.system is not None else system_prompt)
                )
    return rows
