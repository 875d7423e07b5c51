"""A persistent judge cache: re-scoring the same answers costs nothing and survives interruption.

Why SQLite rather than JSONL: each judged batch is committed as one transaction, so a run killed mid-way
(Ctrl-C, a preempted GPU, an API outage) leaves every finished score on disk and never a torn line;
lookups go through the primary key without reading the whole file; several processes can share one
cache file (SQLite locks it). It is in the standard library. Only hashes of the prompt template,
question and answer are stored, not their text, so the cache stays small and holds no model output.

Only valid results are stored: ``JudgeCache`` refuses anything but a finite score in 0..100 or a label,
and ``CachedJudge`` stores only what ``judges.is_cacheable`` allows (a score, a categorical label, a
CODE / REFUSAL verdict the judge prompt offers). NaN / infinite output is never written (SQLite would
turn a NaN score into NULL, which reads back as a missing score), nor are missing judgements (the judge
said no number and no offered verdict): they are asked again on the next run. Rows that do not read
back as such results (written by older versions) count as misses.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from pathlib import Path

from keel.evaluation.judge_base import NUMERIC, Judgement, JudgeRequest
from keel.evaluation.judges import JudgeError, check_judgement, is_cacheable, is_result


def cache_key(judge_name: str, request: JudgeRequest) -> str:
    """Key = (judge, prompt template, question, answer) plus the metric (exact judges have no template)
    and, for categorical requests only, the kind (numeric keys are those of earlier versions)."""
    parts = [judge_name, request.metric, request.prompt_template, request.question, request.answer]
    if request.kind != NUMERIC:
        parts.append(request.kind)
    return hashlib.sha256(json.dumps(parts, ensure_ascii=False).encode("utf-8")).hexdigest()


def _loads(extra: str | None) -> dict | None:
    try:
        value = json.loads(extra or "{}")
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


class JudgeCache:
    """SQLite table ``judgements(key, judge, metric, score, label, extra, created)``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=60)
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS judgements (key TEXT PRIMARY KEY, judge TEXT, metric TEXT, "
            "score REAL, label TEXT, extra TEXT, created REAL)"
        )
        self._db.commit()

    def get_many(self, keys: list[str]) -> dict[str, Judgement]:
        found = {}
        with self._lock:
            for start in range(0, len(keys), 500):
                chunk = keys[start : start + 500]
                marks = ",".join("?" * len(chunk))
                rows = self._db.execute(
                    f"SELECT key, score, label, extra FROM judgements WHERE key IN ({marks})", chunk
                ).fetchall()
                for key, score, label, extra in rows:
                    loaded = _loads(extra)
                    if loaded is None:
                        continue  # unreadable row: a miss
                    j = Judgement(score=score, label=label, extra=loaded)
                    if not is_result(j, loaded.get("kind", NUMERIC)):
                        continue  # not a valid result (e.g. a NaN stored as NULL by an older version)
                    j.extra["cached"] = True
                    found[key] = j
        return found

    def put_many(self, items: list[tuple[str, str, str, Judgement]]) -> None:
        """Store ``(key, judge_name, metric, judgement)`` rows in one transaction. Raises ValueError (and
        stores nothing) when one of them is not a valid result: the cache never holds what is not a score."""
        for _key, _, metric, j in items:
            kind = j.extra.get("kind", NUMERIC) if isinstance(j, Judgement) else NUMERIC
            if not is_result(j, kind):
                raise ValueError(
                    f"Refusing to cache judgement for {metric!r} ({check_judgement(j, kind) or 'neither score nor label'})."
                )
        now = time.time()
        rows = [
            (
                key,
                judge,
                metric,
                j.score,
                j.label,
                json.dumps({k: v for k, v in j.extra.items() if k != "cached"}, allow_nan=False),
                now,
            )
            for key, judge, metric, j in items
        ]
        with self._lock, self._db:
            self._db.executemany("INSERT OR REPLACE INTO judgements VALUES (?, ?, ?, ?, ?, ?, ?)", rows)

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM judgements").fetchone()[0]

    def close(self) -> None:
        self._db.close()


class CachedJudge:
    """Wraps any ``Judge``: answers cached requests from the cache, sends only misses to the judge, in
    chunks of ``chunk_size`` that are committed as they finish (and partial results of a failed chunk),
    so an interrupted run resumes where it stopped."""

    def __init__(self, judge, cache: JudgeCache, chunk_size: int = 64):
        self.inner = judge
        self.cache = cache
        self.name = judge.name
        self.chunk_size = chunk_size
        self.hits = 0
        self.misses = 0

    def config(self) -> dict:
        inner = self.inner.config() if hasattr(self.inner, "config") else {"name": self.name}
        return {**inner, "cache": str(self.cache.path)}

    def _store(self, keys, requests, idx, got, found, failed: list[str]) -> None:
        """Cache the results among ``got`` that ``is_cacheable`` allows; an invalid one counts as a failed
        request (neither cached nor returned); a missing judgement is returned, not cached."""
        done, invalid = [], []
        for i, j in zip(idx, got):
            if j is None:
                continue
            problem = check_judgement(j, requests[i].kind)
            if problem:
                invalid.append(f"question {requests[i].question_id!r} / {requests[i].metric!r}: {problem}")
                continue
            if requests[i].kind != NUMERIC:
                j.extra["kind"] = requests[i].kind
            if is_cacheable(j, requests[i].kind, requests[i].prompt_template):
                done.append((i, j))
            else:
                found[keys[i]] = j
        if invalid:
            failed.append(
                f"judge {self.name} gave {len(invalid)} invalid judgement(s), not cached; first: {invalid[0]}"
            )
        self.cache.put_many([(keys[i], self.name, requests[i].metric, j) for i, j in done])
        found.update({keys[i]: j for i, j in done})

    def judge(self, requests: list[JudgeRequest], progress=None) -> list[Judgement]:
        keys = [cache_key(self.name, r) for r in requests]
        found = self.cache.get_many(keys)
        for k, r in zip(keys, requests):  # missing judgements cached by older versions: ask again
            if k in found and not is_cacheable(found[k], r.kind, r.prompt_template):
                del found[k]
        self.hits += sum(k in found for k in keys)
        todo = [i for i, k in enumerate(keys) if k not in found]
        self.misses += len(todo)
        if progress is not None:
            progress.update(len(requests) - len(todo))
        failed: list[str] = []
        for start in range(0, len(todo), self.chunk_size):
            idx = todo[start : start + self.chunk_size]
            batch = [requests[i] for i in idx]
            try:
                got = self.inner.judge(batch)
            except JudgeError as e:
                got = list(e.partial) + [None] * (len(batch) - len(e.partial))
                failed.append(str(e))
                if e.fatal:  # the endpoint is unusable: keep what came back and stop
                    self._store(keys, requests, idx, got, found, failed)
                    break
            if len(got) != len(batch):
                raise JudgeError(
                    f"Judge {self.name} returned {len(got)} judgements for {len(batch)} requests."
                )
            self._store(keys, requests, idx, got, found, failed)
            if progress is not None:
                progress.update(sum(j is not None for j in got))
        if failed:
            n_missing = sum(k not in found for k in keys)
            raise JudgeError(
                f"{n_missing} of {len(requests)} judgements are missing ({len(failed)} failed batch(es); "
                f"first: {failed[0]}). The others are cached in {self.cache.path}: rerun to request only the rest.",
                [found.get(k) for k in keys],
                fatal=True,
            )
        return [found[k] for k in keys]
