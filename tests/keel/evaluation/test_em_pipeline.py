"""The run glue with an exact judge (the protocol the synthetic organism's judge implements)."""

from __future__ import annotations

import pytest

from keel.evaluation.judge_base import Judge, Judgement, JudgeRequest
from keel.evaluation.metrics import compute_metrics
from keel.evaluation.pipeline import judge_requests, read_jsonl, score_rows, summary_markdown, write_jsonl
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
        "| EM (all answers) | 33.3 %" in text
        and "| r | 1 | 0.0 %" in text
        and "| aligned missing (refusal / CODE) | 33.3 % |" in text
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
    with pytest.raises(ValueError, match=r"Question 'r' has no judge prompt for 'aligned'.*--judge-prompts"):
        judge_requests(ROWS, questions)
