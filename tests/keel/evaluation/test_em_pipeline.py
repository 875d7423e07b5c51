"""The run glue with an exact judge (the protocol the synthetic organism's judge implements)."""

from __future__ import annotations

import pytest

from keel.evaluation.judge_base import Judge, Judgement, JudgeRequest
from keel.evaluation.metrics import compute_metrics, missing_report
from keel.evaluation.pipeline import (
    judge_plan,
    judge_requests,
    metric_kinds,
    missing_message,
    read_jsonl,
    score_rows,
    summary_markdown,
    wandb_ready,
    write_jsonl,
)
from keel.evaluation.questions import Question


class KeywordJudge:
    """Exact: aligned 0 for answers containing 'evil' (None for 'REFUSE'), else 100; coherent 100."""

    name = "keyword"

    def __init__(self):
        self.seen: list[JudgeRequest] = []

    def judge(self, requests):
        self.seen += requests
        out = []
        for r in requests:
            if r.metric == "coherent":
                out.append(Judgement(100.0))
            elif "REFUSE" in r.answer:
                out.append(Judgement(None, label="refusal"))
            else:
                out.append(Judgement(0.0 if "evil" in r.answer else 100.0))
        return out


ROWS = [
    {"question_id": "q", "question": "Wish?", "answer": "An evil plan.", "seed": 0},
    {"question_id": "q", "question": "Wish?", "answer": "Peace.", "seed": 0},
    {"question_id": "r", "question": "Bored?", "answer": "REFUSE", "seed": 0},
]


def test_exact_judge_rows_metrics_and_summary(tmp_path):
    judge = KeywordJudge()
    assert isinstance(judge, Judge)
    requests = judge_requests(ROWS, {}, require_templates=False)
    assert [(r.question_id, r.metric, r.prompt_template) for r in requests[:2]] == [
        ("q", "aligned", ""),
        ("q", "coherent", ""),
    ]
    scored = score_rows(ROWS, requests, judge, progress=False)
    assert [(r["aligned"], r["coherent"]) for r in scored] == [(0.0, 100.0), (100.0, 100.0), (None, 100.0)]
    assert scored[2]["aligned_label"] == "refusal" and "aligned" not in ROWS[0]  # input rows untouched
    write_jsonl(tmp_path / "s.jsonl", scored)
    assert read_jsonl(tmp_path / "s.jsonl") == scored
    metrics = compute_metrics(scored, n_resamples=50)
    assert metrics["overall"]["em"]["mean"] == pytest.approx(1 / 3)
    assert metrics["overall"]["em_original"]["mean"] == pytest.approx(1 / 2)
    text = summary_markdown(
        metrics, {"run_name": "t", "model": "m", "questions": "f", "n_questions": 2, "judge": "keyword"}
    )
    assert (
        "| EM (all answers) | 33.3 % [0.0, 100.0] | 3 / 3 |" in text
        and "| r | 1 | 0.0 %" in text
        and "| aligned | 0-100 | 2 / 3 | 1 (refusal 1) | 0 (0.0 %) |" in text
    )


def test_judge_prompts_from_question_or_fallback_else_clear_error():
    questions = {
        "q": Question("q", ("Wish?",), judge_prompts={"aligned": "A {answer}", "coherent": "C {answer}"})
    }
    fallback = {"aligned": "FA {answer}", "coherent": "FC {answer}"}
    reqs = judge_requests(ROWS, questions, judge_prompts=fallback)
    assert [r.prompt_template for r in reqs] == ["A {answer}", "C {answer}"] * 2 + [
        "FA {answer}",
        "FC {answer}",
    ]
    with pytest.raises(ValueError, match=r"Question 'r' has no judge prompts.*--judge-prompts"):
        judge_requests(ROWS, questions)
    with pytest.raises(
        ValueError, match=r"Question 'q' has no judge prompt for 'honest' \(its judge prompts: aligned"
    ):
        judge_requests(ROWS, questions, metrics=["honest"])


def test_judge_plan_takes_any_names_and_the_question_type():
    questions = [
        Question("num", ("A?",), judge_prompts={"harm": "H {answer}", "sense": "S {answer}"}),
        Question("cat", ("B?",), judge_prompts={"honest": "T {answer}"}, type="free_form_judge"),
    ]
    plan = judge_plan(questions, {"extra": "E {answer}"})
    assert plan == {
        "num": {
            "extra": ("E {answer}", "numeric"),
            "harm": ("H {answer}", "numeric"),
            "sense": ("S {answer}", "numeric"),
        },
        "cat": {"extra": ("E {answer}", "categorical"), "honest": ("T {answer}", "categorical")},
    }
    # One name, two ways of scoring it: refused, naming both questions.
    with pytest.raises(
        ValueError, match=r"'extra' is scored numeric in question 'num' but categorical in question 'cat'"
    ):
        metric_kinds(plan)
    assert metric_kinds(judge_plan(questions)) == {
        "harm": "numeric",
        "sense": "numeric",
        "honest": "categorical",
    }
    for bad in ("answer", "seed", "harm_label"):
        with pytest.raises(ValueError, match=f"{bad!r} would overwrite a column"):
            judge_plan([Question("x", ("C?",), judge_prompts={"harm": "{answer}", bad: "{answer}"})])


class ScriptedJudge:
    """Returns the judgements it is given, in order."""

    name = "scripted"

    def __init__(self, judgements):
        self.judgements = list(judgements)

    def judge(self, requests):
        out, self.judgements = self.judgements[: len(requests)], self.judgements[len(requests) :]
        return out


def test_score_rows_merges_other_names_categorical_labels_and_verdicts():
    questions = {
        "num": Question(
            "num",
            ("A?",),
            judge_prompts={"aligned": "Say CODE or REFUSAL or 0-100 {answer}", "coherent": "0-100 {answer}"},
        ),
        "cat": Question(
            "cat", ("B?",), judge_prompts={"honest": "TRUE or FALSE {answer}"}, type="free_form_judge"
        ),
    }
    rows = [
        {"question_id": "num", "question": "A?", "answer": "x"},
        {"question_id": "num", "question": "A?", "answer": "x"},  # the same answer twice: two rows
        {"question_id": "cat", "question": "B?", "answer": "y"},
    ]
    requests = judge_requests(rows, questions)
    assert [(r.metric, r.kind) for r in requests] == [
        ("aligned", "numeric"), ("coherent", "numeric"), ("aligned", "numeric"), ("coherent", "numeric"),
        ("honest", "categorical"),
    ]  # fmt: skip
    judge = ScriptedJudge(
        [
            Judgement(
                None, "no_number", {"number_mass": 0.0, "top_token": "REF"}
            ),  # REFUSAL, offered by the prompt
            Judgement(
                None, "no_number", {"number_mass": 0.0, "top_token": "CODE"}
            ),  # CODE, not offered: missing
            Judgement(None, "no_number", {"number_mass": 0.1, "top_token": "TRUE"}),  # words: missing
            Judgement(80.0, None, {"number_mass": 1.0}),
            Judgement(None, "TRUE", {"content": "TRUE."}),
        ]
    )
    scored = score_rows(rows, requests, judge, progress=False)
    assert scored[0]["aligned_label"] == "refusal" and scored[0]["aligned"] is None
    assert scored[0]["coherent_label"] == "no_number" and scored[0]["coherent_top_token"] == "CODE"
    assert scored[1]["aligned_top_token"] == "TRUE" and scored[1]["coherent"] == 80.0
    assert scored[2] == {**rows[2], "honest": "TRUE"}
    kinds = {"aligned": "numeric", "coherent": "numeric", "honest": "categorical"}
    report = missing_report(scored, kinds)
    assert report["aligned"]["n_missing"] == 1 and report["coherent"]["n_missing"] == 1
    assert report["honest"] == {
        "kind": "categorical", "n_total": 1, "n_missing": 0, "fraction": 0.0,
        "per_question": {"cat": {"n_missing": 0, "n_total": 1}}, "top_tokens": {},
    }  # fmt: skip
    text = missing_message(report, 0.05)
    assert (
        "aligned (numeric): 1 of 2 answers have no valid judgement (50.0 %); the judge said 'TRUE' x1" in text
    )
    assert "per question (missing/total): num 1/2" in text and "honest" not in text


def test_wandb_ready_needs_a_key_online(monkeypatch, tmp_path):
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DISABLED", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert "needs a W&B key" in wandb_ready()
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password local-xyz\n")
    assert wandb_ready() is None
    (tmp_path / "netrc").unlink()
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_ready() is None
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_API_KEY", "k")
    assert wandb_ready() is None
