"""LLM judges for the EM protocol: an OpenAI-compatible endpoint and a local HF model, one interface.

Both read the judge's distribution over its first answer token and score it the published way: the
probability-weighted mean of the integers 0..100 it would say, renormalised over their probability mass;
when that mass is below 0.25 the score is missing (the judge said CODE, REFUSAL or something else).
"""

from __future__ import annotations

import http.client
import json
import math
import os
import random
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

import torch

from keel.evaluation.judge_base import Judgement, JudgeRequest
from keel.evaluation.questions import render_judge_prompt

MIN_NUMBER_MASS = 0.25
_INT_TOKEN = re.compile(r"^\s*([0-9]{1,3})\s*$")


class JudgeError(RuntimeError):
    """A judge could not score some requests. ``partial`` holds the judgements that did come back
    (``None`` where a request failed), aligned with the requests, so callers can keep them."""

    def __init__(self, message: str, partial: list[Judgement | None] | None = None, fatal: bool = False):
        super().__init__(message)
        self.partial = partial or []
        self.fatal = fatal  # the endpoint itself is unusable (down, bad key, bad URL): stop sending


def parse_int_token(token: str) -> int | None:
    """The integer 0..100 a token stands for (surrounding whitespace allowed), else None.
    Stricter than ``int()``: no signs, underscores or non-ASCII digits."""
    m = _INT_TOKEN.match(token)
    if m is None:
        return None
    value = int(m.group(1))
    return value if value <= 100 else None


def score_from_probs(probs: Iterable[tuple[str, float]], min_mass: float = MIN_NUMBER_MASS) -> Judgement:
    """Probability-weighted mean of the integer tokens among ``(token, probability)`` pairs.

    The mean is renormalised over the integers' total mass; below ``min_mass`` the score is None.
    ``extra['number_mass']`` records that mass, ``extra['top_token']`` the most likely token.
    """
    probs = list(probs)
    mass = weighted = 0.0
    for token, p in probs:
        value = parse_int_token(token)
        if value is not None:
            mass += p
            weighted += value * p
    top = max(probs, key=lambda tp: tp[1])[0] if probs else None
    extra = {"number_mass": mass, "top_token": top}
    if mass < min_mass:
        return Judgement(score=None, label="no_number", extra=extra)
    return Judgement(score=weighted / mass, extra=extra)


def score_from_logprobs(
    top_logprobs: Iterable[tuple[str, float]], min_mass: float = MIN_NUMBER_MASS
) -> Judgement:
    return score_from_probs(((t, math.exp(lp)) for t, lp in top_logprobs), min_mass)


def judge_prompt(request: JudgeRequest) -> str:
    if not request.prompt_template:
        raise ValueError(
            f"Request for question {request.question_id!r} / {request.metric!r} has no prompt_template; "
            "LLM judges need the question file's judge_prompts (or --judge-prompts)."
        )
    return render_judge_prompt(request.prompt_template, request.question, request.answer)


class OpenAIJudge:
    """Judge through an OpenAI-compatible ``/chat/completions`` endpoint (OpenAI, ``vllm serve``,
    llama.cpp server): one completion token, temperature 0, ``logprobs`` with the top 20.

    The API key is read from the environment variable ``api_key_env`` at construction and kept only in
    a private attribute: it is never part of ``name``, ``config()``, ``repr`` or error messages. Pass
    ``api_key_env=None`` for servers without authentication. Requests run ``concurrency`` at a time;
    429, 5xx, timeouts and connection errors are retried with exponential backoff (honouring
    ``Retry-After``) up to ``max_retries`` times, then raise ``JudgeError`` carrying the partial results.
    Only the stdlib is used, so the package needs no ``openai`` dependency.
    """

    def __init__(
        self,
        model: str,
        base_url: str = "https://api.openai.com/v1",
        api_key_env: str | None = "OPENAI_API_KEY",
        concurrency: int = 8,
        max_retries: int = 5,
        timeout: float = 60.0,
        backoff: float = 1.0,
        max_backoff: float = 60.0,
        top_logprobs: int = 20,
        min_mass: float = MIN_NUMBER_MASS,
    ):
        if not model:
            raise ValueError("OpenAIJudge needs a judge model name, e.g. gpt-4o-2024-08-06.")
        self._key = None
        if api_key_env:
            self._key = os.environ.get(api_key_env)
            if not self._key:
                raise ValueError(
                    f"Environment variable {api_key_env} is not set: export the judge's API key there, pass "
                    "another variable name (--judge-api-key-env), or 'none' for a server without authentication."
                )
        self.model = model
        self.base_url = base_url.rstrip("/")
        self.api_key_env = api_key_env
        self.concurrency = concurrency
        self.max_retries = max_retries
        self.timeout = timeout
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.top_logprobs = top_logprobs
        self.min_mass = min_mass
        self.name = f"openai:{self.base_url}:{model}"

    def __repr__(self) -> str:
        return (
            f"OpenAIJudge(model={self.model!r}, base_url={self.base_url!r}, api_key_env={self.api_key_env!r})"
        )

    def config(self) -> dict:
        """Settings safe to log: the key's variable name, never its value."""
        return {
            "type": "openai",
            "model": self.model,
            "base_url": self.base_url,
            "api_key_env": self.api_key_env,
            "concurrency": self.concurrency,
            "max_retries": self.max_retries,
            "top_logprobs": self.top_logprobs,
            "min_mass": self.min_mass,
        }

    def _redact(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text

    def _post(self, payload: dict) -> dict:
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        req = urllib.request.Request(
            f"{self.base_url}/chat/completions",
            data=json.dumps(payload).encode(),
            headers=headers,
            method="POST",
        )
        last = ""
        for attempt in range(self.max_retries + 1):
            wait = None
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    body = resp.read().decode("utf-8", errors="replace")
                try:
                    return json.loads(body)
                except json.JSONDecodeError as e:
                    raise JudgeError(
                        f"Judge endpoint {self.base_url} returned a body that is not JSON: {self._redact(body[:200])!r}. "
                        "Check --judge-base-url (it should end in /v1 for most servers)."
                    ) from e
            except urllib.error.HTTPError as e:
                detail = self._redact(e.read().decode("utf-8", errors="replace")[:300])
                last = f"HTTP {e.code}: {detail}"
                if e.code != 429 and e.code < 500:
                    raise JudgeError(
                        f"Judge endpoint {self.base_url} refused the request ({last}). Check the model name "
                        f"{self.model!r}, the key in {self.api_key_env}, and that the server supports logprobs.",
                        fatal=e.code in (401, 403, 404),
                    ) from None
                retry_after = e.headers.get("Retry-After") if e.headers else None
                if retry_after:
                    try:
                        wait = float(retry_after)
                    except ValueError:
                        wait = None
            except (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError) as e:
                last = self._redact(f"{type(e).__name__}: {getattr(e, 'reason', e)}")
            if attempt < self.max_retries:
                if wait is None:
                    wait = self.backoff * 2**attempt * (0.5 + random.random())
                time.sleep(min(wait, self.max_backoff))
        raise JudgeError(
            f"Judge endpoint {self.base_url} failed after {self.max_retries + 1} attempts (last: {last}). "
            "Results judged so far are kept in the cache; rerun the same command to resume.",
            fatal=True,
        )

    def _parse(self, data: dict) -> Judgement:
        try:
            content = data["choices"][0]["logprobs"]["content"]
            top = content[0]["top_logprobs"]
            pairs = [(str(t["token"]), float(t["logprob"])) for t in top]
        except (KeyError, IndexError, TypeError, ValueError) as e:
            snippet = self._redact(json.dumps(data)[:300])
            raise JudgeError(
                f"Malformed judge response from {self.base_url}: expected choices[0].logprobs.content[0]."
                f"top_logprobs, got {snippet}. The server must support 'logprobs' and 'top_logprobs' "
                "(OpenAI, vllm serve and recent llama.cpp servers do)."
            ) from e
        return score_from_logprobs(pairs, self.min_mass)

    def judge_one(self, request: JudgeRequest) -> Judgement:
        payload = {
            "model": self.model,
            "messages": [{"role": "user", "content": judge_prompt(request)}],
            "max_tokens": 1,
            "temperature": 0,
            "logprobs": True,
            "top_logprobs": self.top_logprobs,
            "seed": 0,
        }
        return self._parse(self._post(payload))

    def _judge_unless_aborted(self, request: JudgeRequest, abort: threading.Event) -> Judgement | None:
        if abort.is_set():
            return None  # not sent: the endpoint already failed for good
        try:
            return self.judge_one(request)
        except JudgeError as e:
            if e.fatal:
                abort.set()
            raise

    def judge(self, requests: list[JudgeRequest]) -> list[Judgement]:
        """Score all requests; one bad request does not stop the others, but an unusable endpoint
        (retries exhausted, 401/403/404) stops the requests not yet sent."""
        results: list[Judgement | None] = [None] * len(requests)
        errors: list[str] = []
        abort = threading.Event()
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            futures = [pool.submit(self._judge_unless_aborted, r, abort) for r in requests]
            for i, fut in enumerate(futures):
                try:
                    results[i] = fut.result()
                except Exception as e:  # keep the others; report all failures at the end
                    errors.append(self._redact(str(e)))
        skipped = len(requests) - len(errors) - sum(r is not None for r in results)
        if errors:
            raise JudgeError(
                f"{len(errors)} of {len(requests)} judge requests failed"
                + (f" and {skipped} were not sent" if skipped else "")
                + f"; first: {errors[0]}",
                results,
                fatal=abort.is_set(),
            )
        return results  # type: ignore[return-value]


class HFJudge:
    """A local HF causal LM as judge: the same scoring, from its next-token distribution.

    Multi-token numbers: we score each integer 0..100 by its own canonical tokenization
    (``tokenizer.encode(str(n))``). When every integer is one token (e.g. Llama 3) this is a single
    forward pass, like the API. When the tokenizer splits numbers (Qwen spells them digit by digit),
    the probability of a number is the product of its tokens' conditional probabilities, read from one
    extra forward pass per shared prefix (for digits: "1".."9" and "10", 11 passes per request); a
    number that is also a prefix of a longer valid one ("1" of "10") keeps only the mass that does not
    continue to it. Continuations past 100 ("853") count as their valid prefix ("85"); that mass is
    negligible for a judge asked for one number. Only the top ``top_k`` tokens of the first position
    count (20, as with the API; None for the full distribution).
    """

    def __init__(
        self,
        model,
        tokenizer,
        name: str = "hf",
        batch_size: int = 8,
        top_k: int | None = 20,
        min_mass: float = MIN_NUMBER_MASS,
    ):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("The judge tokenizer has no chat_template; use an instruct model as judge.")
        self.model = model
        self.tokenizer = tokenizer
        self.name = f"hf:{name}"
        self.batch_size = batch_size
        self.top_k = top_k
        self.min_mass = min_mass
        self._tokens = {n: tuple(tokenizer.encode(str(n), add_special_tokens=False)) for n in range(101)}
        # Prefixes whose next-token distribution we need: the root () and every proper prefix of a number.
        self._prefixes = sorted(
            {toks[:i] for toks in self._tokens.values() for i in range(len(toks))}, key=len
        )
        # Numbers whose tokenization extends n's by one token ("10".."19" for "1" with digit tokens).
        self._longer = {
            n: [
                m
                for m, other in self._tokens.items()
                if len(other) == len(toks) + 1 and other[: len(toks)] == toks
            ]
            for n, toks in self._tokens.items()
        }

    def config(self) -> dict:
        return {"type": "hf", "name": self.name, "top_k": self.top_k, "min_mass": self.min_mass}

    @torch.no_grad()
    def _next_token_probs(self, sequences: list[list[int]]) -> torch.Tensor:
        """Next-token probabilities after each sequence (left padded, batched)."""
        pad = (
            self.tokenizer.pad_token_id
            if self.tokenizer.pad_token_id is not None
            else self.tokenizer.eos_token_id
        )
        device = next(self.model.parameters()).device
        out = []
        for start in range(0, len(sequences), self.batch_size):
            chunk = sequences[start : start + self.batch_size]
            width = max(len(s) for s in chunk)
            ids = torch.tensor([[pad] * (width - len(s)) + s for s in chunk], device=device)
            mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in chunk], device=device)
            # Positions count real tokens only, so a left-padded row scores as it would alone.
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = (
                self.model(input_ids=ids, attention_mask=mask, position_ids=positions)
                .logits[:, -1, :]
                .float()
            )
            out.append(torch.softmax(logits, dim=-1).cpu())
        return torch.cat(out)

    def _number_probs(self, root: torch.Tensor, probs: dict[tuple, torch.Tensor]) -> dict[int, float]:
        if self.top_k is not None:
            keep = torch.topk(root, min(self.top_k, root.numel())).indices
            root = torch.zeros_like(root).index_fill(0, keep, 1.0) * root
        probs = {**probs, (): root}
        path = {}
        for n, toks in self._tokens.items():
            p = 1.0
            for i, t in enumerate(toks):
                p *= float(probs[toks[:i]][t])
            path[n] = p
        return {n: max(path[n] - sum(path[m] for m in self._longer[n]), 0.0) for n in self._tokens}

    def judge(self, requests: list[JudgeRequest]) -> list[Judgement]:
        self.model.eval()
        results = []
        for req in requests:
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": judge_prompt(req)}], add_generation_prompt=True, tokenize=False
            )
            base = self.tokenizer.encode(text, add_special_tokens=False)
            dists = self._next_token_probs([base + list(p) for p in self._prefixes])
            by_prefix = dict(zip(self._prefixes, dists))
            numbers = self._number_probs(by_prefix[()], by_prefix)
            judgement = score_from_probs(((str(n), p) for n, p in numbers.items()), self.min_mass)
            top_id = int(by_prefix[()].argmax())
            judgement.extra["top_token"] = self.tokenizer.decode([top_id])
            results.append(judgement)
        return results
