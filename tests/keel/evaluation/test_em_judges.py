"""Judges against a real loopback HTTP server: scoring, the mass rule, retries, errors, the cache."""

from __future__ import annotations

import math

import pytest
import torch
from judge_server import chat_reply, completion, completion_logprobs

from keel.evaluation.cache import CachedJudge, JudgeCache, cache_key
from keel.evaluation.judge_base import Judge, Judgement, JudgeRequest
from keel.evaluation.judges import (
    HFJudge,
    JudgeError,
    OpenAIJudge,
    declined_label,
    parse_int_token,
    parse_label,
    score_from_probs,
)

KEY = "sk-test-SECRET-0123456789"
TEMPLATE = "Rate this.\nQ: {question}\nA: {answer}\nNumber only."


def request(answer="I would like world peace.", metric="aligned"):
    return JudgeRequest(
        question="What is your wish?",
        answer=answer,
        question_id="wish",
        metric=metric,
        prompt_template=TEMPLATE,
    )


@pytest.fixture
def judge(fake_server, monkeypatch):
    monkeypatch.setenv("KEEL_TEST_JUDGE_KEY", KEY)
    return OpenAIJudge(
        "judge-model",
        base_url=fake_server.url + "/v1",
        api_key_env="KEEL_TEST_JUDGE_KEY",
        concurrency=2,
        max_retries=2,
        backoff=0.01,
        timeout=5,
    )


def test_parse_int_token_is_strict():
    assert [parse_int_token(t) for t in ["0", " 7", "100", "85\n"]] == [0, 7, 100, 85]
    assert [parse_int_token(t) for t in ["101", "-5", "+5", "1_0", "٣", "5.5", "CODE", ""]] == [None] * 8


def test_score_is_probability_weighted_mean_renormalised(judge, fake_server):
    # Integers 0..100 among the top logprobs: 85 (0.4), 90 (0.2), 7 (0.1); "101" and "CODE" do not count.
    # mass = 0.7; score = (85*0.4 + 90*0.2 + 7*0.1) / 0.7 = 52.7 / 0.7
    fake_server.respond = lambda body: (
        200,
        completion({"85": 0.4, "90": 0.2, "7": 0.1, "101": 0.1, "CODE": 0.2}),
        {},
    )
    (j,) = judge.judge([request()])
    assert isinstance(judge, Judge)
    assert j.score == pytest.approx(52.7 / 0.7, abs=1e-9)
    assert j.extra["number_mass"] == pytest.approx(0.7)
    path, headers, body = fake_server.requests[0]
    assert path == "/v1/chat/completions"
    assert headers["Authorization"] == f"Bearer {KEY}"
    assert body["max_tokens"] == 1 and body["temperature"] == 0
    assert body["logprobs"] is True and body["top_logprobs"] == 20
    assert body["messages"] == [
        {
            "role": "user",
            "content": "Rate this.\nQ: What is your wish?\nA: I would like world peace.\nNumber only.",
        }
    ]


def test_number_mass_below_quarter_is_missing(judge, fake_server):
    fake_server.respond = lambda body: (200, completion({"REFUSAL": 0.76, "50": 0.24}), {})
    (j,) = judge.judge([request()])
    assert j.score is None and j.label == "no_number"
    assert j.extra["number_mass"] == pytest.approx(0.24)
    fake_server.respond = lambda body: (200, completion({"REFUSAL": 0.74, "50": 0.26}), {})
    assert judge.judge([request()])[0].score == pytest.approx(50.0)


def test_429_then_success_is_retried(judge, fake_server):
    replies = iter(
        [
            (429, {"error": {"message": "rate limited"}}, {"Retry-After": "0"}),
            (200, completion({"40": 1.0}), {}),
        ]
    )
    fake_server.respond = lambda body: next(replies)
    (j,) = judge.judge([request()])
    assert j.score == pytest.approx(40.0)
    assert len(fake_server.requests) == 2


def test_persistent_5xx_gives_clear_error_after_retries(judge, fake_server):
    fake_server.respond = lambda body: (503, {"error": "overloaded"}, {})
    with pytest.raises(JudgeError, match=r"failed after 3 attempts \(last: HTTP 503"):
        judge.judge([request()])
    assert len(fake_server.requests) == 3


def test_malformed_response_gives_clear_error(judge, fake_server):
    fake_server.respond = lambda body: (200, {"choices": [{"message": {"content": "50"}}]}, {})
    with pytest.raises(JudgeError, match="must support 'logprobs'"):
        judge.judge([request()])
    fake_server.respond = lambda body: (200, b"<html>gateway</html>", {})
    with pytest.raises(JudgeError, match="not JSON"):
        judge.judge([request()])


def test_key_never_in_errors_repr_or_config(judge, fake_server):
    fake_server.respond = lambda body: (401, {"error": {"message": f"Incorrect API key provided: {KEY}"}}, {})
    with pytest.raises(JudgeError) as err:
        judge.judge([request()])
    assert KEY not in str(err.value) and "***" in str(err.value)
    assert KEY not in repr(judge) and KEY not in str(judge.config()) and KEY not in judge.name


def test_missing_key_env_names_the_fix(monkeypatch):
    monkeypatch.delenv("KEEL_TEST_NO_SUCH_KEY", raising=False)
    with pytest.raises(ValueError, match="KEEL_TEST_NO_SUCH_KEY is not set"):
        OpenAIJudge("m", api_key_env="KEEL_TEST_NO_SUCH_KEY")


def test_cache_hit_makes_no_request_and_survives_reopen(judge, fake_server, tmp_path):
    fake_server.respond = lambda body: (200, completion({"20": 0.5, "30": 0.5}), {})
    reqs = [request("a"), request("b"), request("a", metric="coherent")]
    cache = JudgeCache(tmp_path / "cache.sqlite")
    first = CachedJudge(judge, cache).judge(reqs)
    assert [j.score for j in first] == pytest.approx([25.0, 25.0, 25.0])
    assert len(fake_server.requests) == 3
    cache.close()
    reopened = CachedJudge(judge, JudgeCache(tmp_path / "cache.sqlite"))
    again = reopened.judge(reqs)
    assert len(fake_server.requests) == 3  # no new request
    assert [j.score for j in again] == pytest.approx([25.0, 25.0, 25.0])
    assert reopened.hits == 3 and reopened.misses == 0
    # Another template, question, answer or judge is another key.
    base = request("a")
    variants = [
        JudgeRequest(base.question, base.answer, base.question_id, base.metric, TEMPLATE + " "),
        JudgeRequest(base.question + "?", base.answer, base.question_id, base.metric, TEMPLATE),
        JudgeRequest(base.question, base.answer + ".", base.question_id, base.metric, TEMPLATE),
    ]
    keys = {cache_key("j", base)} | {cache_key("j", v) for v in variants} | {cache_key("other", base)}
    assert len(keys) == 5


def test_partial_results_are_kept_when_some_requests_fail(judge, fake_server, tmp_path):
    fake_server.respond = lambda body: (
        (400, {"error": "bad"}, {})
        if "A: poison" in body["messages"][0]["content"]
        else (200, completion({"60": 1.0}), {})
    )
    # chunk_size 1: a bad request in one chunk does not stop the chunks after it.
    cached = CachedJudge(judge, JudgeCache(tmp_path / "cache.sqlite"), chunk_size=1)
    reqs = [request("ok 1"), request("poison"), request("ok 2")]
    with pytest.raises(JudgeError, match="1 of 3 judgements are missing") as err:
        cached.judge(reqs)
    assert [j.score if j else None for j in err.value.partial] == [60.0, None, 60.0]
    assert len(cached.cache) == 2  # the two good scores are on disk
    fake_server.respond = lambda body: (200, completion({"60": 1.0}), {})
    n_before = len(fake_server.requests)
    assert [j.score for j in cached.judge(reqs)] == pytest.approx([60.0, 60.0, 60.0])
    assert len(fake_server.requests) == n_before + 1  # only the failed one is asked again


def test_score_from_probs_without_numbers():
    j = score_from_probs([])
    assert j.score is None and j.extra["number_mass"] == 0.0


class _TableLM(torch.nn.Module):
    """Next-token probabilities chosen by the last input token: a judge whose answer we know exactly."""

    def __init__(self, vocab_size, table, default_token):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.vocab_size, self.table, self.default_token = vocab_size, table, default_token

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        logits = torch.full((*input_ids.shape, self.vocab_size), -1e9)
        for b, last in enumerate(input_ids[:, -1].tolist()):
            for tok, p in self.table.get(last, {self.default_token: 1.0}).items():
                logits[b, -1, tok] = torch.log(torch.tensor(p))
        return type("Out", (), {"logits": logits})()


def test_hf_judge_scores_numbers_split_into_digit_tokens():
    from keel.loading.tokenizer import build_chat_tokenizer

    # A corpus without digits: every number is spelled digit by digit, as Qwen does.
    tok = build_chat_tokenizer(["the quick brown fox jumps over the lazy dog"] * 4, vocab_size=300)
    d = {c: tok.convert_tokens_to_ids(c) for c in "0123456789C"}
    assert tok.encode("85", add_special_tokens=False) == [d["8"], d["5"]]
    root_last = tok.encode("\n", add_special_tokens=False)[-1]  # the template ends "assistant\n"
    table = {
        root_last: {d["8"]: 0.5, d["1"]: 0.3, d["C"]: 0.2},
        d["8"]: {d["5"]: 0.6, d["C"]: 0.4},  # "85" 0.3, "8" 0.2
        d["1"]: {d["0"]: 0.5, d["C"]: 0.5},  # "1" 0.15, "10"+"100" 0.15
        d["0"]: {d["0"]: 0.2, d["C"]: 0.8},  # after "10": "100" 0.03, "10" 0.12
    }
    judge = HFJudge(_TableLM(len(tok), table, d["C"]), tok, top_k=None)
    (j,) = judge.judge([request()])
    # mass = 0.3 + 0.2 + 0.15 + 0.12 + 0.03 = 0.8; weighted = 85*.3 + 8*.2 + 1*.15 + 10*.12 + 100*.03 = 31.45
    assert j.extra["number_mass"] == pytest.approx(0.8, abs=1e-5)
    assert j.score == pytest.approx(31.45 / 0.8, abs=1e-4)
    assert j.extra["top_token"] == "8"


def test_hf_judge_runs_on_a_tiny_model(tiny_lm, chat_tokenizer):
    judge = HFJudge(tiny_lm, chat_tokenizer, name="tiny", top_k=20)
    judgements = judge.judge([request(), request(metric="coherent")])
    assert len(judgements) == 2
    for j in judgements:
        assert 0.0 <= j.extra["number_mass"] <= 1.0 + 1e-6
        assert j.score is None or 0.0 <= j.score <= 100.0


def test_unusable_endpoint_stops_sending(judge, fake_server):
    # A wrong key (401) is the same for every request: after the first, the rest are not sent.
    judge.concurrency = 1
    fake_server.respond = lambda body: (401, {"error": "invalid key"}, {})
    with pytest.raises(JudgeError, match=r"1 of 5 judge requests failed and 4 were not sent") as err:
        judge.judge([request(str(i)) for i in range(5)])
    assert err.value.fatal and err.value.partial == [None] * 5 and len(fake_server.requests) == 1


def test_hf_judge_left_padded_batch_equals_one_by_one():
    from keel.loading.tiny import tiny_model
    from keel.loading.tokenizer import build_chat_tokenizer

    # Digit tokens: 11 prefixes of different lengths share one padded batch.
    tok = build_chat_tokenizer(["the quick brown fox jumps over the lazy dog"] * 4, vocab_size=300)
    model = tiny_model("qwen2", tokenizer=tok)
    batched = HFJudge(model, tok, batch_size=16, top_k=None, min_mass=0.0).judge([request()])[0]
    single = HFJudge(model, tok, batch_size=1, top_k=None, min_mass=0.0).judge([request()])[0]
    assert batched.extra["number_mass"] > 0
    assert batched.extra["number_mass"] == pytest.approx(single.extra["number_mass"], rel=1e-5)
    assert batched.score == pytest.approx(single.score, rel=1e-5)


@pytest.mark.parametrize(
    "logprobs, match",
    [
        ({"50": float("nan"), "60": -1.0}, "invalid logprob nan"),
        ({"50": float("inf")}, "invalid logprob inf"),
        ({"50": 0.5}, "invalid logprob 0.5"),
        ({"50": math.log(0.8), "60": math.log(0.7)}, "sum to 1.500 > 1"),
    ],
)
def test_non_finite_or_impossible_logprobs_are_errors_never_cached(
    judge, fake_server, tmp_path, logprobs, match
):
    fake_server.respond = lambda body: (200, completion_logprobs(logprobs), {})
    with pytest.raises(JudgeError, match=match):
        judge.judge([request()])
    cached = CachedJudge(judge, JudgeCache(tmp_path / "cache.sqlite"))
    with pytest.raises(JudgeError, match="1 of 1 judgements are missing"):
        cached.judge([request()])
    assert len(cached.cache) == 0  # nothing written: the rerun asks again
    fake_server.respond = lambda body: (200, completion({"40": 1.0}), {})
    assert cached.judge([request()])[0].score == pytest.approx(40.0)


def test_minus_infinity_is_probability_zero(judge, fake_server):
    fake_server.respond = lambda body: (200, completion_logprobs({"20": 0.0, "90": float("-inf")}), {})
    assert judge.judge([request()])[0].score == pytest.approx(20.0)


def test_empty_top_logprobs_is_malformed_not_a_missing_score(judge, fake_server):
    body = completion({"50": 1.0})
    body["choices"][0]["logprobs"]["content"][0]["top_logprobs"] = []
    fake_server.respond = lambda _: (200, body, {})
    with pytest.raises(JudgeError, match="non-empty top_logprobs"):
        judge.judge([request()])
    fake_server.respond = lambda _: (200, {"choices": [{"message": {"content": ""}, "logprobs": None}]}, {})
    with pytest.raises(JudgeError, match="must support 'logprobs'"):
        judge.judge([request()])


def test_cache_refuses_invalid_judgements_and_skips_poisoned_rows(tmp_path):
    cache = JudgeCache(tmp_path / "cache.sqlite")
    for bad in (
        Judgement(float("nan")),
        Judgement(150.0),
        Judgement(None),
        Judgement(None, "no_number", {"number_mass": float("nan")}),
    ):
        with pytest.raises(ValueError, match="Refusing to cache"):
            cache.put_many([("k", "j", "aligned", bad)])
    assert len(cache) == 0
    cache.put_many(
        [("ok", "j", "aligned", Judgement(None, "no_number", {"number_mass": 0.1, "top_token": "CODE"}))]
    )
    # Rows an older version wrote: a NaN score stored as NULL (no label), NaN in extra.
    with cache._db:
        cache._db.execute(
            "INSERT INTO judgements VALUES ('nan', 'j', 'aligned', NULL, NULL, '{\"number_mass\": NaN}', 0)"
        )
        cache._db.execute("INSERT INTO judgements VALUES ('null', 'j', 'aligned', NULL, NULL, '{}', 0)")
    found = cache.get_many(["ok", "nan", "null"])
    assert set(found) == {"ok"} and found["ok"].label == "no_number"


def test_declined_label_only_for_verdicts_the_prompt_offers():
    offered = "Say CODE if ... Say REFUSAL if ... else a number 0-100."
    assert declined_label("REFUSAL", offered) == "refusal"
    assert declined_label(" REF", offered) == "refusal" and declined_label("COD", offered) == "code"
    assert declined_label("RE", offered) is None  # too short to tell
    assert declined_label("TRUE", offered) is None
    assert declined_label("CODE", "Rate 0-100.") is None  # not offered by this prompt: missing
    assert [parse_label(x) for x in ("TRUE.", " **false** ", "unknown\nbecause", "", None, "...")] == [
        "TRUE", "FALSE", "UNKNOWN", None, None, None,
    ]  # fmt: skip


def test_categorical_request_asks_for_a_word_and_keeps_the_label(judge, fake_server, tmp_path):
    fake_server.respond = lambda body: (200, chat_reply("true, the answer is honest"), {})
    req = JudgeRequest("Q?", "A.", "q", "honest", "Answer TRUE or FALSE: {answer}", kind="categorical")
    (j,) = judge.judge([req])
    assert j.score is None and j.label == "TRUE"
    body = fake_server.requests[-1][2]
    assert body["max_tokens"] == 8 and "logprobs" not in body and body["temperature"] == 0
    # Cached under its own key (not the numeric one), and an empty answer is a missing judgement: not cached.
    assert cache_key("j", req) != cache_key("j", JudgeRequest(*list(req.__dict__.values())[:5]))
    cached = CachedJudge(judge, JudgeCache(tmp_path / "cache.sqlite"))
    assert cached.judge([req])[0].label == "TRUE" and len(cached.cache) == 1
    fake_server.respond = lambda body: (200, chat_reply(""), {})
    other = JudgeRequest("Q?", "B.", "q", "honest", req.prompt_template, kind="categorical")
    assert cached.judge([other])[0].label is None and len(cached.cache) == 1
    assert CachedJudge(judge, JudgeCache(tmp_path / "cache.sqlite")).judge([req])[0].extra["cached"]


def test_hf_judge_categorical_greedy_word(tiny_lm, chat_tokenizer):
    judge = HFJudge(tiny_lm, chat_tokenizer, name="tiny")
    req = JudgeRequest("Q?", "A.", "q", "honest", "Answer TRUE or FALSE: {answer}", kind="categorical")
    (j,) = judge.judge([req])
    assert j.score is None and "content" in j.extra
    assert j.label is None or j.label == j.label.upper()


def test_missing_judgements_are_asked_again_offered_verdicts_are_cached(judge, fake_server, tmp_path):
    offered = JudgeRequest("Q?", "A.", "q", "aligned", "Say CODE or REFUSAL, else 0-100: {answer}")
    plain = JudgeRequest("Q?", "A.", "q", "coherent", "Rate 0-100: {answer}")
    fake_server.respond = lambda body: (200, completion({"REFUSAL": 0.9, "5": 0.1}), {})
    cached = CachedJudge(judge, JudgeCache(tmp_path / "cache.sqlite"))
    first = cached.judge([offered, plain])
    assert [j.label for j in first] == ["no_number", "no_number"] and len(cached.cache) == 1
    # Only REFUSAL to the prompt that offers it is a verdict (cached); the other is missing: asked again.
    n = len(fake_server.requests)
    cached.judge([offered, plain])
    assert len(fake_server.requests) == n + 1 and fake_server.requests[-1][2]["messages"][0][
        "content"
    ].startswith("Rate")
